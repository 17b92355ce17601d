"""
Evaluating policies (evaluate.py POLICY_RUN...): the implicit-reward accuracy of DPO on a
user's unseen pairs as the context grows, and generations scored by the world's gold
reward, on conflicting and agreeing pairs, beside plain DPO, per-label oracles and the
known-preference ceiling. The steering world's own protocol is steer_eval.py.
"""

import functools
import os

import torch

from common import ConfigError, check
from data import DataError, EpisodeSampler, chosen_first
from report import cell, markdown, mean_sem, plot_steering, plot_world, seed_groups, sem, table_rows, world_tables
from runs import check_runs, load_checkpoint, resolve_path, run_dir_of


def is_policy_checkpoint(path):
    return "policy_config" in load_checkpoint(path)


def check_rerank_options(config):
    """evaluate.py's and steer.py's --rerank, --rerank_latent: a reward run that exists, before anything loads."""
    check(config["rerank_latent"] in ("encoder", "particles"), "rerank_latent", "must be encoder or particles")
    if config["rerank"]:
        check_runs([config["rerank"]])
        check(not is_policy_checkpoint(config["rerank"]), "rerank",
              f"{config['rerank']} is a policy run; give a reward run")


def policy_role(policy, run_config):
    """'np_dpo', 'known' (FiLM on the users' true preferences), 'dpo', or 'oracle:<label>'
    for a DPO policy trained on one label only."""
    if policy.encoder is not None:
        return "np_dpo"
    if policy.film is not None:
        return "known"
    labels = run_config["data"]["labels"]
    return f"oracle:{labels[0]}" if labels and len(labels) == 1 else "dpo"


def load_policies(paths, device, world_data=""):
    """{name: (policy, role)}, and the shared evaluation inputs of the first run, or of the
    folder world_data: the same world built with other test users (same_training_pairs)."""
    from policy import load_policy
    from text import load_inputs

    policies, first, configs, trained_on = {}, None, {}, set()
    for path in paths:
        policy, checkpoint = load_policy(path if not os.path.isdir(path) else os.path.join(path, "ckpt_best.pt"),
                                         device=device)
        first = first or checkpoint
        name = os.path.basename(os.path.normpath(run_dir_of(path)))
        if name in policies:
            raise ConfigError(f"two runs are named {name}: give runs in folders of different names")
        policies[name] = (policy.eval(), policy_role(policy, checkpoint["config"]))
        configs[name] = checkpoint["config"]
        trained_on.add(resolve_path(checkpoint["config"]["data"]["pairs"], checkpoint))
    d = first["config"]["data"]
    first_config = dict(first["config"], data=dict(d, pairs=resolve_path(d["pairs"], first),
                                                   features=resolve_path(d["features"], first)))
    if world_data:
        if os.path.isfile(world_data):
            raise DataError(f"world_data: {world_data} is a file: give the folder prepare/steer_world.py wrote")
        files = {k: os.path.join(world_data, f) for k, f in WORLD_FILES.items()}
        missing = [f for f in files.values() if not os.path.isfile(f)]
        if missing:
            raise DataError(f"world_data: {missing[0]} not found (the folder holds {', '.join(WORLD_FILES.values())})")
        for pairs in sorted(trained_on):  # every run's world, not only the first's
            same_training_pairs(pairs, files["pairs"])
        first_config["data"].update(files)
    inputs_config = dict(first_config, data=dict(first_config["data"], labels=None, toy=False))
    data, token_pairs, tokenizer = load_inputs(inputs_config)
    first_config["run_configs"] = configs
    return policies, data, token_pairs, tokenizer, first_config


WORLD_FILES = {"pairs": "pairs.jsonl", "features": "features.npz", "preferences": "users.json"}


def same_training_pairs(trained_on, path):
    """Other test users of the runs' world, never another world: the train and val pairs of
    `path` must be those of the runs' pairs file, row for row (a DataError otherwise)."""
    from text import read_text_pairs

    seen = [[r for r in read_text_pairs(p) if r["split"] != "test"] for p in (trained_on, path)]
    if seen[0] != seen[1]:
        raise DataError(f"world_data: the train and val pairs of {path} are not those of {trained_on}, which the "
                        "runs were trained on: give their world built again with other test users only "
                        "(prepare/steer_world.py)")


def conflicting_only(data):
    """The same pairs, with choices kept only where every label answered and not all agree."""
    answered = (data.choices >= 0).all(1)
    conflict = answered & (data.choices.min(1).values != data.choices.max(1).values)
    choices = torch.where(conflict[:, None], data.choices, torch.full_like(data.choices, -1))
    return type(data)(data.pairs, choices, data.labels, data.split, data.meta, data.path)


@torch.no_grad()
def implicit_reward_rows(policies, data, token_pairs, pad_id, config, device):
    """DPO implicit-reward accuracy on held-out conflicting pairs, per label and n."""
    from policy import implicit_reward, policy_and_reference_logprobs
    from text import episode_batch

    p = config["policy_eval"]
    conflicts = conflicting_only(data)
    sampler = EpisodeSampler(conflicts, config["split"], p["num_targets"], max(config["num_context"]), seed=config["seed"])
    rows = []
    for n in sorted(config["num_context"]):
        sampler.gen.manual_seed(config["seed"] + n)
        label_rows = torch.arange(p["episodes"]) % len(sampler.labels)
        per_model = {name: [] for name in policies}
        for start in range(0, p["episodes"], p["batch_episodes"]):
            chunk = label_rows[start:start + p["batch_episodes"]]
            episodes = sampler.sample(len(chunk), num_context=n, label_rows=chunk)
            batch = episode_batch(episodes, token_pairs, pad_id, device)
            for name, (policy, _) in policies.items():
                chosen, rejected, ref_chosen, ref_rejected = policy_and_reference_logprobs(policy, batch)
                margin = implicit_reward(chosen, ref_chosen) - implicit_reward(rejected, ref_rejected)  # (E * T,)
                correct = (margin > 0).float() + 0.5 * (margin == 0).float()
                per_model[name].append(correct.view(len(chunk), -1).mean(1).cpu())
        accs = {name: torch.cat(v) for name, v in per_model.items()}
        rows += table_rows(accs, label_rows, sampler.labels, n, config["max_label_rows"])
    return rows


def user_contexts(data, candidates, exclude_prompt_rows, n, count, gen):
    """`count` contexts of n pairs (count, n, 2, D), chosen first, drawn from `candidates`
    (rows, label column) minus the rows of the evaluated prompt."""
    rows, column = candidates
    allowed = rows[~torch.isin(rows, exclude_prompt_rows)]
    picks = torch.rand(count, len(allowed), generator=gen).argsort(1)[:, :n]  # (count, n)
    pair_idx = allowed[picks]
    return chosen_first(data.pairs[pair_idx], data.choices[pair_idx, column].bool())  # (count, n, 2, D)


@torch.no_grad()
def sample_responses(policy, tokenizer, prompt, count, samples, latent, config, device):
    """`count` * `samples` responses to one prompt (texts), row r*samples + s from latent row r."""
    from text import tokenize_prompt

    p = config["policy_eval"]
    prompt_ids = torch.tensor([tokenize_prompt(tokenizer, prompt)] * count, device=device)
    out = policy.generate(prompt_ids, torch.ones_like(prompt_ids), latent=latent, do_sample=True,
                          temperature=p["temperature"], num_return_sequences=samples,
                          max_new_tokens=p["max_new_tokens"], pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, prompt_ids.shape[1]:], skip_special_tokens=True)


def steering_rows(policies, data, tokenizer, text_rows, config, device):
    """Gold reward of generations for every label and n, and win-rate against plain DPO."""
    from toy import toy_gold_reward

    p, split = config["policy_eval"], config["split"]
    torch.manual_seed(config["seed"])
    gen = torch.Generator().manual_seed(config["seed"])
    in_split = torch.from_numpy(data.split == split)
    prompts = sorted({row["prompt"] for row, keep in zip(text_rows, in_split.tolist()) if keep})
    prompt_rows = {q: torch.tensor([i for i, row in enumerate(text_rows) if row["prompt"] == q]) for q in prompts}
    count, samples = p["contexts_per_prompt"], p["samples_per_context"]
    scores = {}  # (model, label, n) -> (prompts * count, samples) gold rewards
    for name, (policy, role) in policies.items():
        for j, label in enumerate(data.labels):
            candidates = (torch.nonzero(in_split & (data.choices[:, j] >= 0)).squeeze(1), j)
            if role.startswith("oracle:") and role != f"oracle:{label}":
                continue
            for n in sorted(config["num_context"]) if role == "np_dpo" else [None]:
                per_prompt = []
                for q in prompts:
                    latent = None
                    if role == "np_dpo":
                        context = user_contexts(data, candidates, prompt_rows[q], n, count, gen).to(device)
                        latent = policy.infer_latent(context)
                    texts = sample_responses(policy, tokenizer, q, count, samples, latent, config, device)
                    per_prompt.append(torch.tensor([toy_gold_reward(q, t, label) for t in texts]).view(count, samples))
                scores[(name, label, n)] = torch.cat(per_prompt)
    return scores


def steering_table(scores, policies, labels, sizes):
    """Rows of gold reward (and win-rate against plain DPO) and their Markdown table.
    A policy without a context encoder has one row per label (num_context None),
    repeated in every column of the table."""
    dpo = next((name for name, (_, role) in policies.items() if role == "dpo"), None)
    rows, lines = [], ["| model | label | " + " | ".join(f"n={n}" for n in sizes) + " |",
                       "|---|---|" + "---|" * len(sizes)]
    for (name, label, n), s in scores.items():
        row = {"model": name, "num_context": n, "label": label, "gold_reward": s.mean().item(),
               "sem": sem(s.mean(1)), "samples": s.numel()}
        if dpo is not None and name != dpo:
            wins = (s > scores[(dpo, label, None)]).float() + 0.5 * (s == scores[(dpo, label, None)]).float()
            row.update(win_rate=wins.mean().item(), win_rate_sem=sem(wins.mean(1)))
        rows.append(row)
    cell = {(r["model"], r["label"], r["num_context"]): r for r in rows}
    for name, label in dict.fromkeys((r["model"], r["label"]) for r in rows):
        cells = []
        for n in sizes:
            r = cell.get((name, label, n)) or cell[(name, label, None)]
            cells.append(f"{r['gold_reward']:.3f} ± {r['sem']:.3f}" + (f" (win {r['win_rate']:.2f})" if "win_rate" in r else ""))
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def closure_lines(rows, policies, labels, sizes):
    """Share of the gap from plain DPO to each label's oracle that NP-DPO closes at each n."""
    gold = {(r["model"], r["label"], r["num_context"]): r["gold_reward"] for r in rows}
    roles = {role: name for name, (_, role) in policies.items()}
    if "dpo" not in roles or "np_dpo" not in roles:
        return "Gap closure needs a plain DPO run and an NP-DPO run."
    lines = ["Gap closure (NP-DPO - DPO) / (oracle - DPO), gold reward:"]
    for label in labels:
        oracle = roles.get(f"oracle:{label}")
        if oracle is None:
            lines.append(f"  {label}: no oracle run given")
            continue
        base, top = gold[(roles["dpo"], label, None)], gold[(oracle, label, None)]
        curve = [gold[(roles["np_dpo"], label, n)] for n in sizes]
        rising = all(b >= a for a, b in zip(curve, curve[1:]))
        lines.append(f"  {label}: " + ", ".join(f"n={n} {100 * (g - base) / (top - base):.1f}%" for n, g in zip(sizes, curve))
                     + f"; gold reward {'rises' if rising else 'does not rise'} monotonically with n")
    return "\n".join(lines)


def evaluate_policies(paths, config, device):
    """Rows for eval.json and the function that draws the plots into a folder (None: no plots)."""
    from text import read_text_pairs

    policies, data, token_pairs, tokenizer, run_config = load_policies(paths, device, config["world_data"])
    sizes = sorted(config["num_context"])
    if run_config["data"].get("world") == "continuum":
        return evaluate_world_policies(policies, data, token_pairs, tokenizer, run_config, config, device)
    check(not config["rerank"], "rerank", "is for policy runs of the steering world (gold rewards score the picks)")
    rows = implicit_reward_rows(policies, data, token_pairs, tokenizer.pad_token_id, config, device)
    print(f"DPO implicit-reward accuracy (points ± SEM) on held-out conflicting pairs, split '{config['split']}'\n")
    print(markdown(rows, sizes, float("inf")))
    if not run_config["data"]["toy"]:
        print("\nSteering by generation needs gold rewards: only the toy task has them.")
        return rows, None
    text_rows = read_text_pairs(run_config["data"]["pairs"], run_config["data"]["skip_bad_lines"])
    scores = steering_rows(policies, data, tokenizer, text_rows, config, device)
    steer_rows, table = steering_table(scores, policies, data.labels, sizes)
    print("\nGold reward of sampled responses (± SEM over prompt x context; win = win-rate against plain DPO)\n")
    print(table + "\n\n" + closure_lines(steer_rows, policies, data.labels, sizes))
    where = f"split '{config['split']}' of {run_config['data']['pairs']}"
    return rows + steer_rows, functools.partial(plot_steering, steer_rows, data.labels, sizes, where)


class Reranker:
    """evaluate.py --rerank=RUN: NP-DPO's response is the best of `samples` draws by the reward run's
    reward for the user, an NP-BTL reading the same context pairs as NP-DPO; the draws are embedded as
    the context features were, by the policy's base model (text.embed_responses). Both are checked: the
    NP-BTL's training features must be the world's (train and val rows), and the base must embed the
    world's first pairs as their features, else a ConfigError: the draws would be scored in another space.
    latent: "encoder" (the NP-BTL's latent of the context) or "particles" (the posterior mean of
    num_latents training users' latents given the context's answers, particles.posterior_latent)."""

    def __init__(self, path, data, base, samples, device, text_rows, latent="encoder", num_latents=2048, seed=0):
        from data import load_pairs
        from particles import training_latents
        from reward import load_reward_model, run_data_path
        from text import embed_pairs, load_embedder

        self.model, train_config = load_reward_model(path, data.dim, device, data.path)
        if not hasattr(self.model, "encoder"):
            raise ConfigError(f"config key 'rerank': {path} reads no context; give an NP-BTL on the world's features")
        trained_on = run_data_path(path)
        seen = [d.pairs[torch.from_numpy(d.split != "test")] for d in (load_pairs(trained_on), data)]
        if seen[0].shape != seen[1].shape or not torch.allclose(*seen, atol=1e-5):
            raise ConfigError(f"config key 'rerank': {path} was trained on {trained_on}, whose train and val features "
                              f"are not those of {data.path}; give an NP-BTL trained on the policies' world "
                              "(configs/steer_world_reward.yaml)")
        self.tokenizer, self.embedder, self.pooling = load_embedder(base, device)
        rows = [i for i, r in enumerate(text_rows) if r["split"] != "test"][:4]
        again = embed_pairs([text_rows[i] for i in rows], self.tokenizer, self.embedder, self.pooling).flatten(0, 1)
        cosine = torch.cosine_similarity(again, data.pairs[rows].flatten(0, 1), -1).min().item()
        if cosine < 0.99:
            raise ConfigError(f"config key 'rerank': the policies' base model {base} does not embed the world's pairs "
                              f"as {data.path} holds them (cosine {cosine:.3f}); the features were made by another "
                              "model")
        self.samples, self.device, self.latent = samples, device, latent
        self.latents = (training_latents(self.model, load_pairs(trained_on), train_config["train"]["max_context"],
                                         num_latents, seed) if latent == "particles" else None)

    @torch.no_grad()
    def scores(self, prompt, texts, contexts):
        """(U, len(texts) / U) each draw's reward for its user: texts[u * k + j] answers contexts[u] (n, 2, D)."""
        from particles import posterior_latent
        from text import embed_responses

        features = embed_responses(prompt, texts, self.tokenizer, self.embedder, self.pooling).to(self.device)
        contexts = contexts.to(self.device)
        latent = (self.model.infer_latent(contexts) if self.latents is None
                  else posterior_latent(self.model, contexts, self.latents))
        return self.model.rewards(features.view(len(contexts), -1, features.shape[-1]), latent).cpu()


def evaluate_world_policies(policies, data, token_pairs, tokenizer, run_config, config, device):
    """The steering world (steer_eval.py): rows for eval.json, the tables, and the plots."""
    import steer_eval
    from text import read_text_pairs

    text_rows = read_text_pairs(run_config["data"]["pairs"], run_config["data"]["skip_bad_lines"])
    if "preferences" not in data.meta:
        raise DataError(f"{run_config['data']['preferences']}: the users' preferences are needed to score steering")
    users = steer_eval.TestUsers(data, text_rows, config["split"])
    reranker = (Reranker(config["rerank"], data, run_config["policy"]["base"], config["rerank_samples"], device,
                         text_rows, config["rerank_latent"], config["particle_latents"], config["seed"])
                if config["rerank"] else None)
    results = steer_eval.evaluate_world(policies, users, token_pairs, tokenizer, config, device, reranker)
    if reranker:
        results["reference"]["rerank"] = {"run": config["rerank"], "samples": reranker.samples, "latent": reranker.latent}
    groups = seed_groups(run_config["run_configs"])
    roles = {name: role for name, (_, role) in policies.items()}
    sizes = sorted(config["num_context"])
    rerank = (f"; NP-DPO's response the best of {reranker.samples} draws by {config['rerank']}'s reward"
              + (f" at the posterior mean of {config['particle_latents']} training users' latents"
                 if reranker.latent == "particles" else "") if reranker else "")
    ref_t = config["policy_eval"]["reference_temperature"]
    rerank += f"; the reference sampled at temperature {ref_t:g}" if ref_t else ""
    print(f"Steering world, split '{config['split']}': {len(users.labels)} users never seen in training, "
          f"prompts {steer_eval.eval_prompts(users.split, config['policy_eval']['prompts'])}; sampled at temperature "
          f"{config['policy_eval']['temperature']:g}{rerank}; mean ± sd over training seeds (one seed: ± SEM over "
          "users)\n")
    print(world_tables(results, groups, roles, sizes))
    ref = results["reference"]
    print(f"\nreference (the fine-tuned base): gold reward {ref['reference_reward']:.3f}, relevance "
          f"{100 * ref['relevance']:.1f} %; users' optimum (exact) {ref['best_reward']:.3f} on average")
    rows = [{"model": name, "role": roles.get(name, name), **res} for name, res in results.items()]
    return rows, functools.partial(plot_world, results, groups, roles, sizes)


def evaluate_policy_queries(paths, strategies, config, device):
    """--queries on steering-world policies: normalised gold reward against questions asked, the
    questions chosen by the reward run query.selector (steer_eval.question_curves)."""
    import queries
    import steer_eval
    from text import read_text_pairs

    policies, data, _, tokenizer, run_config = load_policies(paths, device, config["world_data"])
    check(run_config["data"].get("world") == "continuum", "queries", "policies are scored against questions on "
          "the steering world only (data.world: continuum), where gold rewards are known")
    selector = config["query"]["selector"]
    check(bool(selector) or strategies == ["random"], "query.selector", "give the reward run that chooses the "
          "questions (an NP-BTL trained on the policy's context features, e.g. runs/steer_world_reward)")
    belief = None
    if selector:
        check_runs([selector])
        q = config["query"]  # particles: the selector's latents of the training users of these features
        belief = queries.run_belief(selector, data.dim, device, data.path, **queries.belief_options(q), data=data,
                                    particles=q["particles"] if q["belief"] != "lookahead" else 0,
                                    adaptive=q["belief"] == "adaptive", latents=config["particle_latents"])
    check(any(role in ("np_dpo", "known") for _, role in policies.values()), "run", "--queries scores policies "
          "steered by answers (NP-DPO, or known preference at the posterior mean): give at least one")
    users = steer_eval.TestUsers(data, read_text_pairs(run_config["data"]["pairs"]), config["split"])
    curves = steer_eval.question_curves(policies, belief, users, tokenizer, strategies, config, device)
    sizes = sorted(config["num_context"])
    rows = [{"model": name, "strategy": s, "questions": n, "temperature": config["policy_eval"]["temperature"],
             **{k: res[k][0] for k in ("normalised", "relevance")},
             **{f"{k}_sem": res[k][1] for k in ("normalised", "relevance")},
             "normalised_users": res["users"].tolist()} for (name, s, n), res in curves.items()]  # paired gaps
    print(f"Steering world {run_config['data']['pairs']}, split '{config['split']}', {len(users.labels)} users; "
          f"questions chosen by {selector or '-'}; sampled at temperature {config['policy_eval']['temperature']:g}"
          f"\n\nNormalised gold reward (%) ± SEM over users, against the number of questions answered:\n")
    print(strategy_header(sizes))
    for key in dict.fromkeys((r["model"], r["strategy"]) for r in rows):
        cells = [f"{100 * r['normalised']:.1f} ± {100 * r['normalised_sem']:.1f} (rel {100 * r['relevance']:.0f})"
                 for r in rows if (r["model"], r["strategy"]) == key]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    groups = {**seed_groups(run_config["run_configs"]),
              "Bayes limit (the best decision given the answers)": ["Bayes limit"]}  # in the paired tables
    if any(len(names) > 1 for names in groups.values()):
        pooled = {}
        for (model, s, n), res in curves.items():
            pooled.setdefault(model, {})[f"{s}@{n}"] = res["normalised"]
        print("\nNormalised gold reward (%), mean ± sd over training seeds (models trained with several):\n")
        print(strategy_header(sizes))
        for group, names in ((g, m) for g, m in groups.items() if len(m) > 1):
            for suffix, label in (("", group), ("@posterior", f"{group} (few-shot ceiling: z = posterior mean)")):
                models = [m + suffix for m in names]
                if not all(m in pooled for m in models):
                    continue
                for s in dict.fromkeys(s for _, s, _ in curves):  # with infogain, bayes-active too
                    print(f"| {label} | {s} | " + " | ".join(cell(pooled, models, f"{s}@{n}", 100) for n in sizes) + " |")
    if "random" in strategies:
        paired_gaps(curves, groups, sizes)
    return rows, None


def paired_gaps(curves, groups, sizes):
    """Per test user, over a model's training seeds: each strategy's normalised gold reward after n
    questions, and its gap to random's after the most (the same users, prompts and sampling seeds;
    positive: fewer chosen questions do better). Mean ± SEM over users, each user's score averaged
    over the seeds first (the same users recur under every seed), and in brackets the SEM over the
    seeds' means (none for one seed): the first is how well these trained models are measured,
    the second how the training recipe varies."""
    top = max(sizes)
    for title, paired in (("Normalised gold reward (%)", False), (f"Paired gap to random's n={top} (points)", True)):
        print(f"\n{title}, mean ± SEM over users, each averaged over the seeds (± SEM over seeds):\n\n"
              f"{strategy_header(sizes)}")
        for group, names in groups.items():
            for suffix in ("", "@posterior"):
                models = [m + suffix for m in names if (m + suffix, "random", top) in curves]
                for s in dict.fromkeys(s for m, s, _ in curves if m in models and not (paired and s == "random")):
                    print(f"| {group}{suffix} | {s} | " + " | ".join(
                        gap_cell(curves, models, s, n, top if paired else None) for n in sizes) + " |")


def gap_cell(curves, models, strategy, n, top=None):
    """One cell of paired_gaps: (models' seeds, users) scores minus random's at n = top if given."""
    paired = top is not None
    scores = torch.stack([curves[(m, strategy, n)]["users"] - (curves[(m, "random", top)]["users"] if paired else 0.0)
                          for m in models])
    mean, over_users = mean_sem(scores.mean(0))
    cell = f"{round(100 * mean, 1) + 0.0:{'+' if paired else ''}.1f} ± {100 * over_users:.1f}"  # no -0.0
    return cell + (f" (± {100 * mean_sem(scores.mean(1))[1]:.1f})" if len(models) > 1 else "")


def strategy_header(sizes):
    """The head of a table with a row per (model, strategy) and a column per number of questions."""
    return "| model | strategy | " + " | ".join(f"n={n}" for n in sizes) + " |\n|---|---|" + "---|" * len(sizes)
