"""
Steer a trained run by one user's choices: a policy answers a prompt as that user would
want, a reward run says what it learned about them. The choices come from a file
(--context) or from questions asked here (--ask=K; dialogue.py, chosen by queries.py).

    python steer.py runs/steer_world_np_dpo --context=examples/world_context.jsonl --prompt="Tell me about owls."
    python steer.py runs/steer_world_np_dpo --ask=5 --selector=runs/steer_world_reward --prompt="Tell me about owls."
    python steer.py runs/steer_world_dpo --prompt="Tell me about owls."     # plain DPO reads no context
    python steer.py runs/steer_world_np_dpo --context=examples/world_context.jsonl --prompt="Tell me about owls." \
        --rerank=runs/steer_world_reranker --temperature=0.3      # the best of 16 draws by an NP-BTL reading the same
    python steer.py runs/synthetic_np_btl --ask=5 --save=me.jsonl           # a reward run asks, then says what it learned
    python steer.py runs/three_types_np_btl --ask=3 --particles=32          # ... asking and predicting under particles
    python steer.py runs/population_np_btl --ask=6 --particles=32 --adaptive  # ... particles that follow the posterior

A user's context is embedded exactly as the run's training features were
(text.embed_pairs, with the run's embedder), then encoded into z.
"""

import json
import math
import os
import sys

import torch

import queries
from bayes import type_likelihood
from common import ConfigError, check, load_config, pick_device, run_script
from data import DataError, chosen_first, load_pairs, true_rewards
from dialogue import ask_for_policy, ask_person, candidate_pool, check_save_path, save_rows, world_summary
from policy import policy_checkpoint, policy_from_checkpoint, run_model
from policy_eval import check_rerank_options
from reward import run_data_path
from runs import resolve_path, run_stage
from text import check_known_words, embed_pairs, load_embedder, read_text_pairs, tokenize_pairs, tokenize_prompt


# -----------------------------------------------------------------------------
# a policy run: python steer.py POLICY_RUN --prompt=TEXT [--context=FILE | --ask=K]


POLICY_CLI = {
    "context": "",  # JSONL of one user's choices (text pairs, text.py); '' = none (plain DPO takes none)
    "prompt": "",  # what to answer
    "ask": 0,  # first have this many answers: ask the person (one pair of responses at a time) all that
    # --context does not already hold (dialogue.py)
    "selector": "",  # the reward run that chooses the questions (NP-BTL on the policy's context features)
    "strategy": "infogain",  # random | uncertainty | infogain; without --selector: random
    "pool": 1000,  # candidate questions: pairs of the run's data (its test split)
    "save": "",  # write the person's answers (with --context's) here, as a context file
    "samples": 1,  # responses to print
    "rerank": "",  # a reward run (an NP-BTL on the policy's context features): each response printed is the best
    # of rerank_samples draws by its reward for this user (policy_eval.Reranker; evaluate.py --rerank)
    "rerank_samples": 16,  # ... draws per response
    "rerank_latent": "particles",  # ... the NP-BTL's latent: particles (the posterior mean of its training users'
    # latents, RESULTS "What limits the reranker") or encoder (its encoder's latent of the context)
    "temperature": 1.0,  # 0 = greedy
    "max_new_tokens": 128,  # response length cap
    "seed": 0,  # sampling seed
    "device": "auto",  # auto | cpu | cuda
}


POLICY_USAGE = ("usage: python steer.py POLICY_RUN --prompt=TEXT [--context=FILE.jsonl] [--ask=K [--selector=REWARD_RUN] "
         "[--save=FILE.jsonl] [--pool=N]] [--samples=N] [--rerank=REWARD_RUN [--rerank_samples=N] [--rerank_latent=L]] [--temperature=T] [--max_new_tokens=N] [--seed=S] "
         "[--device=auto|cpu|cuda]")


EXAMPLE_CONTEXT = "examples/context.jsonl"  # a user's choices in the toy world, in the repository


def check_cli(config, rest):
    """Usage and values, before anything is loaded."""
    if len(rest) != 1:
        raise ConfigError(POLICY_USAGE if not rest else f"expected one RUN, got {len(rest)}: {' '.join(rest)} ({POLICY_USAGE})")
    check(config["prompt"] is not None and config["prompt"].strip() != "", "prompt",
          'must not be empty: give the text to answer, e.g. --prompt="Tell me about bees."')
    check(config["samples"] >= 1, "samples", "must be at least 1")
    check(math.isfinite(config["temperature"]) and config["temperature"] >= 0, "temperature",
          "must be 0 (greedy) or a positive number")
    check(config["max_new_tokens"] >= 1, "max_new_tokens", "must be at least 1")
    check(config["ask"] >= 0, "ask", "must be 0 or more questions")
    check(config["pool"] >= 1, "pool", "must be at least 1")
    check(config["strategy"] in ("random", "uncertainty", "infogain"), "strategy",
          "must be random, uncertainty or infogain")
    check(not config["save"] or config["ask"] > 0, "save", "saves the answers to --ask's questions: give --ask=K")
    check(config["rerank_samples"] >= 1, "rerank_samples", "must be at least 1")
    check(not (config["rerank"] and config["temperature"] == 0), "temperature",
          "--rerank picks among sampled draws: greedy decoding (0) draws one response; give e.g. --temperature=0.3")
    check_rerank_options(config)


def read_context(path):
    """One user's choices from a text-pair JSONL: (the rows they answered, their label).
    Every problem is a one-line DataError naming the file."""
    try:
        rows = read_text_pairs(path)
    except DataError as e:
        if not getattr(e, "problems", None):
            raise
        more = f" (and {len(e.problems) - 1} more bad lines)" if len(e.problems) > 1 else ""
        raise DataError(f"{e.problems[0]}{more}: each line is a JSON object with prompt, response_a, response_b "
                        f"and choices {{label: 0, 1 or null}}, as in {EXAMPLE_CONTEXT}") from None
    except OSError as e:  # a folder, no permission
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    labels = sorted({label for row in rows for label in row["choices"]})
    if not rows:
        raise DataError(f"{path}: holds no choices (an empty file); give one user's choices, as in {EXAMPLE_CONTEXT}")
    if len(labels) > 1:
        raise DataError(f"{path}: holds the choices of {len(labels)} users ({', '.join(map(repr, labels))}); "
                        "the policy is steered by one user: keep one label in the file")
    answered = [row for row in rows if row["choices"][labels[0]] is not None]
    if not answered:
        raise DataError(f"{path}: every choice of {labels[0]!r} is null: nothing to steer by "
                        "(0 = the user chose response_a, 1 = response_b)")
    return answered, labels[0]


def steering_context(path, run, steered, asking=False):
    """(rows, label) of the user's choices for a policy with a context encoder; None for plain DPO
    (and for a dialogue that starts from no answers)."""
    given = bool(path and path.strip())
    if not steered:
        check(not asking, "ask", f"{run} is plain DPO (no context encoder): no answer would change its responses")
        if given:
            print(f"note: {run} is plain DPO (no context encoder): --context is ignored", file=sys.stderr)
        return None
    if asking and not given:
        return None
    check(given, "context", "this policy is steered by a user's choices: give --context=FILE.jsonl, their "
          f"choices between two responses (as in {EXAMPLE_CONTEXT})")
    return read_context(path)


@torch.no_grad()
def context_features(checkpoint, rows, path, device):
    """Both responses of each row embedded as the run's features were (text.embed_pairs,
    the run's embedder): (n, 2, D), and which model that was."""
    data_config, trust = checkpoint["config"].get("data") or {}, checkpoint["policy_config"]["trust_remote_code"]
    key = "data.embedder" if data_config.get("embedder") else "policy.base"
    name = data_config.get("embedder") or checkpoint["policy_config"]["base"]
    tokenizer, embedder, pooling = run_model(name, key, checkpoint, lambda p: load_embedder(p, device, trust))
    for row in rows:
        for field in ("prompt", "response_a", "response_b"):
            check_known_words(tokenizer, row[field], f"{path}: {field} {row[field]!r}")
    max_length = data_config.get("max_length", math.inf)
    dropped = tokenize_pairs(rows, tokenizer, max_length)[1]
    if dropped:
        raise DataError(f"{path}: {dropped} of {len(rows)} pairs are longer than data.max_length = {max_length} "
                        "tokens (prompt + response), the longest the run was trained on: shorten them")
    return embed_pairs(rows, tokenizer, embedder, pooling), f"{key} = {name}"


@torch.no_grad()
def user_context(policy, checkpoint, rows, label, path, device):
    """The user's context pairs embedded as in training, chosen first: (1, n, 2, D)."""
    features, embedder = context_features(checkpoint, rows, path, device)  # (n, 2, D)
    if features.shape[-1] != policy.config["context_dim"]:
        raise DataError(f"{path}: {embedder} embeds it in {features.shape[-1]} dimensions, but the policy's "
                        f"encoder reads {policy.config['context_dim']} (its features came from another embedder)")
    second = torch.tensor([row["choices"][label] == 1 for row in rows])
    return chosen_first(features, second)[None].to(device)


def reranker_of(checkpoint, config, device):
    """policy_eval.Reranker for --rerank=RUN on the policy's world (its pairs and features), or None."""
    from policy_eval import Reranker

    if not config["rerank"]:
        return None
    data_config, p = checkpoint["config"]["data"], checkpoint["policy_config"]
    paths = {key: resolve_path(data_config[key], checkpoint) for key in ("features", "pairs")}
    data, text_rows = load_pairs(paths["features"]), read_text_pairs(paths["pairs"], data_config["skip_bad_lines"])
    return Reranker(config["rerank"], data, resolve_path(p["base"], checkpoint), config["rerank_samples"], device,
                    text_rows, config["rerank_latent"])


def sample_responses(policy, tokenizer, prompt_ids, latent, config):
    """config['samples'] decoded responses to the prompt (1, T), sampled, or greedy at temperature 0."""
    t = config["temperature"]
    sampling = {"do_sample": True, "temperature": t} if t > 0 else {"do_sample": False}
    out = policy.generate(prompt_ids, torch.ones_like(prompt_ids), latent=latent,
                          num_return_sequences=config["samples"], max_new_tokens=config["max_new_tokens"],
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.batch_decode(out[:, prompt_ids.shape[1]:], skip_special_tokens=True)


def ask_and_save(checkpoint, config, context, device):
    """The dialogue (dialogue.py): questions from the run's data, chosen by --selector's reward run
    (random without one); returns (rows, label) of every answer, which --save writes."""
    rows, label = context or ([], "me")
    known_features = context_features(checkpoint, rows, config["context"], device)[0].cpu() if rows else None
    cand_rows, cand_features = candidate_pool(checkpoint, config["pool"], config["seed"], rows)
    strategy, belief = config["strategy"], None
    if config["selector"]:
        belief = queries.run_belief(config["selector"], cand_features.shape[-1],
                                    where=checkpoint["config"]["data"]["features"])
    elif strategy != "random" and config["ask"] > len(rows):
        print("note: no --selector (a reward run on this policy's context features): random questions",
              file=sys.stderr)
        strategy = "random"
    if rows:
        print(f"starting from {len(rows)} answers of {label!r} in {config['context']}")
    remaining = max(0, config["ask"] - len(rows))  # --ask counts the answers from --context too
    rows = ask_for_policy(cand_rows, cand_features, belief, strategy, remaining, rows,
                               known_features if known_features is not None else [], label, config["seed"])
    if checkpoint["config"]["data"].get("world") == "continuum":
        print("\n" + world_summary(rows, label))
    if config["save"] and rows:
        save_rows(config["save"], rows)
        print(f"wrote {len(rows)} answer{'s' if len(rows) != 1 else ''} to {config['save']}")
    elif config["save"]:
        print(f"no answers: nothing written to {config['save']}")
    if not rows:
        print("no answers: the response is steered by no context (the policy's n = 0 behaviour)")
        return None
    print(f"\nsteered by {len(rows)} answer{'s' if len(rows) != 1 else ''}; the response to {config['prompt']!r}:")
    return rows, label


def steer_policy(argv):
    from transformers import AutoTokenizer
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # stderr carries one line per note or error, not loading bars
    if {"-h", "--help"} & set(argv):
        print(POLICY_USAGE)
        return
    config, rest = load_config(POLICY_CLI, argv)
    check_cli(config, rest)
    device = pick_device(config["device"])
    checkpoint = policy_checkpoint(rest[0], device)
    steered = "encoder" in checkpoint["model"]  # it holds encoder weights iff the policy reads a context
    if "film" in checkpoint["model"] and not steered:
        raise ConfigError(f"{rest[0]} is a known-preference policy (train.condition_on = preferences): a ceiling "
                          "conditioned on a user's true preference vector, not on choices; score it with evaluate.py")
    check_save_path(config["save"], config["context"])
    context = steering_context(config["context"], rest[0], steered, asking=config["ask"] > 0)
    p = checkpoint["policy_config"]
    tokenizer = run_model(p["base"], "policy.base", checkpoint,
                          lambda path: AutoTokenizer.from_pretrained(path, trust_remote_code=p["trust_remote_code"]))
    check_known_words(tokenizer, config["prompt"], "--prompt")
    prompt_ids = torch.tensor([tokenize_prompt(tokenizer, config["prompt"])], device=device)
    policy = policy_from_checkpoint(checkpoint, device=device).eval()
    check(steered or not config["rerank"], "rerank", f"{rest[0]} is plain DPO (no context encoder): its draws "
          "are the same for every user, so there is no user to rerank them for")
    reranker = reranker_of(checkpoint, config, device)  # checked before any question is asked
    if config["ask"]:
        context = ask_and_save(checkpoint, config, context, device)
    pairs = (user_context(policy, checkpoint, *context, config["context"] or "your answers", device) if context
             else torch.zeros(1, 0, 2, policy.config["context_dim"], device=device))  # (1, n, 2, D)
    latent = policy.infer_latent(pairs) if context else None
    if context and not config["ask"]:
        print(f"steered by {len(context[0])} choices of {context[1]!r} from {config['context']}", file=sys.stderr)
    torch.manual_seed(config["seed"])
    k = reranker.samples if reranker else 1
    texts = sample_responses(policy, tokenizer, prompt_ids, latent, dict(config, samples=config["samples"] * k))
    if reranker:  # response i: the best of draws i * k .. i * k + k - 1 by the NP-BTL's reward for this user
        best = reranker.scores(config["prompt"], texts, pairs).view(config["samples"], k).argmax(1)
        texts = [texts[i * k + j] for i, j in enumerate(best.tolist())]
    for text in texts:
        print(text)

# -----------------------------------------------------------------------------
# a reward run: python steer.py REWARD_RUN --ask=K


REWARD_CLI = {
    "ask": 0,  # answers to have: the questions asked are those --context does not already answer
    "strategy": "infogain",  # random | uncertainty | infogain (queries.py)
    "pool": 1000,  # candidate questions: pairs of the run's test split
    "context": "",  # JSONL of answers already given (as --save writes them)
    "save": "",  # write every answer (from --context too) here
    "score": "",  # JSONL of pairs to score: {"option_a": [...], "option_b": [...]}
    "seed": 0,  # which pairs form the pool; ties between questions
    "particles": 0,  # > 0: ask and predict under this many particles of the training users (particles.py)
    "adaptive": False,  # with --particles=S: the S particles follow the posterior over 2,048 training users'
    # latents, summarised anew at every question (queries.AdaptiveBelief); predictions under all 2,048
}


REWARD_USAGE = ("usage: python steer.py REWARD_RUN [--ask=K] [--strategy=infogain] [--pool=N] [--context=FILE] "
                "[--save=FILE] [--score=FILE] [--seed=S] [--particles=S [--adaptive]]")


MAX_SHOWN_DIM = 8  # options with more features than this (embeddings of text) cannot be shown to a person


def read_feature_pairs(path, dim, need_choice):
    """[(pair (2, D), choice or None)] from a JSONL of option feature pairs; every problem is one line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file" + (" (a folder)" if os.path.isdir(path) else ""))
    fields = '"option_a": [numbers], "option_b": [numbers]' + (', "choice": 0 or 1' if need_choice else "")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text: each line is a JSON object {{{fields}}}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            options = [row["option_a"], row["option_b"]]
            if not all(isinstance(o, list) and o and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in o) for o in options):
                raise TypeError
            pair = torch.tensor(options, dtype=torch.float32)
            choice = row.get("choice")
        except (ValueError, KeyError, TypeError, AttributeError):
            hint = " (this looks like a text pair, for a policy run)" if '"response_a"' in line else ""
            raise DataError(f"{path}:{number}: each line is a JSON object {{{fields}}}{hint}") from None
        if not torch.isfinite(pair).all():
            raise DataError(f"{path}:{number}: option features must be finite numbers (NaN or infinity found)")
        if pair.shape[1] != dim:
            raise DataError(f"{path}:{number}: options of {pair.shape[1]} features, the run's have {dim}")
        if need_choice and (choice not in (0, 1) or isinstance(choice, bool)):
            raise DataError(f"{path}:{number}: 'choice' must be 0 (option_a preferred) or 1, got {choice!r}")
        out.append((pair, choice))
    if not out:
        raise DataError(f"{path}: holds no pairs (an empty file)")
    return out


def plural(count, word):
    return f"{count} {word}" + ("" if count == 1 else "s")


def option_text(x):
    return f"y = {x[0]:.3f}" if len(x) == 1 else "x = [" + ", ".join(f"{v:.2f}" for v in x.tolist()) + "]"


def learned_lines(predict, data, context, labels_only=10):
    """What the answers say: the exact posterior over a known generator's users, and how often the
    model (`predict`: batch -> log P(chosen)), given the answers, agrees with each of them on the
    test split's pairs."""
    lines, mask = [], torch.ones(1, len(context), dtype=torch.bool)
    test = data.pairs[torch.from_numpy(data.split == "test")][:2000]
    rewards = true_rewards(data.meta, test)  # (N, 2, K) or None
    if rewards is not None and len(data.labels) <= labels_only:
        likelihood = type_likelihood(data.meta, context).prod(0) if len(context) else torch.ones(len(data.labels))
        if likelihood.sum() == 0:
            lines.append("your answers fit none of the generator's user types exactly (each type would have "
                         "answered at least one question the other way)")
        else:
            weights = (likelihood / likelihood.sum()).tolist()  # the exact posterior, uniform prior
            best = max(range(len(weights)), key=weights.__getitem__)
            lines.append(f"your answers fit user type {data.labels[best]} best (exact posterior "
                         + ", ".join(f"{label} {w:.2f}" for label, w in zip(data.labels, weights)) + ")")
        with torch.no_grad():
            p = predict({"context": context[None], "context_mask": mask, "targets": test[None]})[0]
        agree = [((p > math.log(0.5)) == (rewards[:, 0, k] > rewards[:, 1, k])).float().mean().item()
                 for k in range(rewards.shape[-1])]
        lines.append("given them, the model agrees with " + ", ".join(
            f"{label} on {100 * a:.0f} %" for label, a in zip(data.labels, agree)) + f" of {len(test)} test pairs")
    return lines


def steer_reward(argv):
    """python steer.py REWARD_RUN --ask=K: a reward run asks a person, then says what it learned."""
    if {"-h", "--help"} & set(argv):
        print(REWARD_USAGE)
        return
    config, rest = load_config(REWARD_CLI, argv)
    if len(rest) != 1:
        raise ConfigError(REWARD_USAGE if not rest else f"expected one RUN, got {len(rest)}: {' '.join(rest)} ({REWARD_USAGE})")
    check(config["ask"] >= 0, "ask", "must be 0 or more questions")
    check(config["ask"] > 0 or config["context"] or config["score"], "ask",
          "give --ask=K to be asked K questions (and/or --context=FILE, --score=FILE)")
    check(not config["save"] or config["ask"] > 0, "save", "saves the answers to --ask's questions: give --ask=K")
    check(config["pool"] >= 1, "pool", "must be at least 1")
    check(config["particles"] >= 0, "particles", "must be 0 (the encoder's belief) or more")
    check(not config["adaptive"] or config["particles"] > 0, "adaptive", "moves particles: give --particles=S too")
    check(config["strategy"] in queries.STRATEGIES, "strategy", f"must be one of {', '.join(queries.STRATEGIES)}")
    check_save_path(config["save"], config["context"])
    data = load_pairs(run_data_path(rest[0]))
    belief = queries.run_belief(rest[0], data.dim, where=data.path, particles=config["particles"], data=data,
                                adaptive=config["adaptive"])
    predict = belief.log_prob_chosen if config["particles"] else belief.model.log_prob_chosen
    given = read_feature_pairs(config["context"], data.dim, True) if config["context"] else []
    scored = read_feature_pairs(config["score"], data.dim, False) if config["score"] else []
    if config["ask"] and data.dim > MAX_SHOWN_DIM:
        raise ConfigError(f"{data.path} has options of {data.dim} features (embeddings of text?), which cannot be "
                          "shown to a person: a policy run asks with its texts")
    gen = torch.Generator().manual_seed(config["seed"])
    rows = torch.from_numpy(data.split == "test").nonzero().squeeze(1)
    rows = rows[torch.randperm(len(rows), generator=gen)[:config["pool"]]]
    cand = data.pairs[rows]  # (C, 2, D) as stored: which option is first says nothing about anyone's answer
    answers = [chosen_first(pair, choice == 1) for pair, choice in given]
    excluded = torch.zeros(1, len(cand), dtype=torch.bool)  # answered in --context: never asked again
    for pair, _ in given:
        excluded[0] |= ((cand == pair).flatten(1).all(1) | (cand == pair.flip(0)).flatten(1).all(1))
    shown = lambda q: (f"which do you prefer? (pair {int(rows[q])} of {data.path})", option_text(cand[q, 0]),
                       option_text(cand[q, 1]))
    if given:
        print(f"starting from {plural(len(given), 'answer')} in {config['context']}")
    new = ask_person(cand, answers, shown, belief, config["strategy"], max(0, config["ask"] - len(given)), gen,
                     excluded)
    given += [(cand[q], choice) for q, choice in new]
    context = torch.stack(answers) if answers else cand.new_zeros(0, 2, data.dim)
    print(f"\n{plural(len(answers), 'answer')} in all")
    for line in learned_lines(predict, data, context) if answers else ["no answers: nothing learned about you yet"]:
        print(line)
    if scored:
        batch = {"context": context[None], "context_mask": torch.ones(1, len(context), dtype=torch.bool),
                 "targets": torch.stack([pair for pair, _ in scored])[None]}
        with torch.no_grad():
            probs = predict(batch)[0].exp()
        print(f"P(option_a preferred) for the pairs in {config['score']}:")
        for (pair, _), p in zip(scored, probs.tolist()):
            print(f"  {p:.3f}  a: {option_text(pair[0])}  b: {option_text(pair[1])}")
    if config["save"] and given:
        save_rows(config["save"], [{"option_a": pair[0].tolist(), "option_b": pair[1].tolist(), "choice": choice}
                                   for pair, choice in given])
        print(f"wrote {plural(len(given), 'answer')} to {config['save']}")
    elif config["save"]:
        print(f"no answers: nothing written to {config['save']}")


# -----------------------------------------------------------------------------


def main(argv):
    """A policy run or a reward run, by what RUN holds."""
    runs = [a for a in argv if not a.startswith("-")]
    if {"-h", "--help"} & set(argv):
        print(POLICY_USAGE + "\n" + REWARD_USAGE)
        return None
    if not runs:
        raise ConfigError(POLICY_USAGE)
    path = runs[0]
    if os.path.exists(path) and is_reward_run(path):
        if any(a.startswith(("--prompt", "--selector", "--samples", "--temperature", "--max_new_tokens")) for a in argv):
            raise ConfigError(f"{path} is a reward run (made by train_reward.py): it writes no responses; "
                              "give a policy run (train_policy.py), or drop the policy's options to be asked questions")
        return steer_reward(argv)
    if not os.path.exists(path):  # no run to tell the kind by: go by the options, so the error names the path
        keys = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
        if not keys <= set(POLICY_CLI) and keys <= set(REWARD_CLI):
            return steer_reward(argv)
    return steer_policy(argv)


def is_reward_run(path):
    """From the run's config.yaml when it has one (runs.run_stage), not by loading its weights twice."""
    return run_stage(path if os.path.isdir(path) else os.path.dirname(path) or ".") == "reward"


if __name__ == "__main__":
    run_script(main)
