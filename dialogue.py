"""
Asking a person which of two options they prefer, one question at a time, in a terminal:
the loop that `policy.py RUN --ask=K` and the reward runs' dialogue share.

    python dialogue.py runs/synthetic_np_btl --ask=3          # a reward run asks you 3 questions
    printf '1\\n2\\ns\\n1\\n' | python policy.py runs/steer_world_np_dpo --ask=3 --selector=runs/steer_world_reward \\
        --prompt="Tell me about owls."

Each question shows two numbered options, wrapped to the terminal, chosen by `--strategy`
(queries.py) from a pool of candidates. The person types 1 or 2 (their choice), s (skip:
not asked again) or q (stop early); anything else asks again. End of input counts as q,
so piped answers work; Ctrl-C stops asking and keeps the answers given.

A reward run's dialogue (`python dialogue.py RUN`) shows pairs of option features from
the run's test split, then prints what the answers say (for a known generator, which of
its users they fit) and, with `--score=FILE`, P(option_a preferred) for each pair in FILE.
Answers are saved with `--save=FILE` and resumed with `--context=FILE` (`--ask` counts
them): JSONL lines {"option_a": [features], "option_b": [features], "choice": 0 | 1}
(1 = option_b preferred); a --score file has the same lines without "choice". The
policy's dialogue saves data.py's text pairs, the format of policy.py's --context.
"""

import json
import math
import os
import shutil
import sys
import textwrap

import torch

import queries
from common import ConfigError, check, load_config, resolve_path, run_script
from data import DataError, load_pairs, read_text_pairs, true_rewards, type_likelihood
from reward import run_data_path

CHOICES = {"1": 0, "2": 1}  # what the person types -> which option they chose (0 = the first shown)


def wrap(text, indent="     "):
    """Wrapped to the terminal; a lone '.' or '?' token is never carried to the start of a line."""
    width = max(40, min(100, shutil.get_terminal_size((80, 24)).columns))
    glued = text.replace(" .", "\u00a0.").replace(" ?", "\u00a0?")  # no-break space: wrap keeps them joined
    return textwrap.fill(glued, width=width, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False).replace("\u00a0", " ")


def read_choice(stdin=None, out=None):
    """'1' / '2' as 0 / 1, 's' as 'skip', 'q' or end of input as 'stop'."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    while True:
        out.write("  your choice [1 / 2, s = skip, q = stop]: ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("(end of input)\n")
            return "stop"
        answer = line.strip().lower()
        if not stdin.isatty():
            out.write(answer + "\n")  # piped: echo it, so the transcript shows what was chosen
        if answer in CHOICES:
            return CHOICES[answer]
        if answer in ("s", "skip"):
            return "skip"
        if answer in ("q", "quit", "stop"):
            return "stop"
        out.write("  please type 1, 2, s or q\n")


def converse(num_questions, pick, show, record, stdin=None, out=None):
    """Up to `num_questions` answered questions. pick() -> the next question (or None: none left);
    show(question) -> (heading, first option text, second option text); record(question, choice)
    with choice 0 / 1 (which option shown was preferred) or None (skipped). Returns the answers given."""
    out = out or sys.stdout
    given = 0
    while given < num_questions:  # a skipped question does not count
        question = pick()
        if question is None:
            out.write("no questions left to ask\n")
            break
        heading, first, second = show(question)
        out.write(f"\nQuestion {given + 1} of {num_questions}: {heading}\n")
        out.write(f"  1. {wrap(first)[5:]}\n  2. {wrap(second)[5:]}\n")
        try:
            choice = read_choice(stdin, out)
        except KeyboardInterrupt:  # stop asking, keep the answers given (Ctrl-C again quits)
            out.write("\n(Ctrl-C: no more questions; the answers given are kept)\n")
            break
        if choice == "stop":
            break
        record(question, None if choice == "skip" else choice)
        given += choice != "skip"
    return given


def check_save_path(path, context_path=""):
    """--save: a new file in an existing folder, or the --context file itself (extended). Checked
    before any question is asked, so no answer is lost to a bad path."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"--save={path}: no folder {folder} to write it in")
    same = context_path and os.path.exists(context_path) and os.path.abspath(path) == os.path.abspath(context_path)
    if os.path.exists(path) and not same:
        raise ConfigError(f"--save={path} exists: give a new file (or the --context file, to add to it)")


def save_rows(path, rows):
    """JSONL rows, written atomically (a crash leaves the old file whole)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the policy's dialogue: pairs of responses from the run's data, chosen by a reward run


def candidate_pool(checkpoint, size, seed, avoid):
    """(text rows, features (C, 2, D)) of up to `size` pairs from the run's data (its test split where
    it has one): the candidate questions, with their cached context embeddings. Rows in `avoid`
    (answers already given) are left out."""
    d = checkpoint["config"]["data"]
    rows = read_text_pairs(resolve_path(d["pairs"], checkpoint), d.get("skip_bad_lines", False))
    features = load_pairs(resolve_path(d["features"], checkpoint))
    seen = {(r["prompt"], r["response_a"], r["response_b"]) for r in avoid}
    usable = [i for i, r in enumerate(rows) if (r["prompt"], r["response_a"], r["response_b"]) not in seen]
    test = [i for i in usable if features.split[i] == "test"]
    usable = test or usable
    gen = torch.Generator().manual_seed(seed)
    picked = [usable[i] for i in torch.randperm(len(usable), generator=gen)[:size].tolist()]
    return [rows[i] for i in picked], features.pairs[picked]


def ask_person(cand, context, show, belief, strategy, num_questions, gen, excluded=None, stdin=None, out=None):
    """Asks up to num_questions of the candidates cand (C, 2, D), shown by show(index) -> (heading,
    first, second), each chosen by `strategy` under `belief` given the answers so far; `context`
    (a list of (2, D) pairs, chosen first) is extended in place, and candidates in `excluded` (1, C)
    are never asked. infogain is about 16 of the candidates. Returns [(index, choice 0 | 1)]."""
    excluded = torch.zeros(1, len(cand), dtype=torch.bool) if excluded is None else excluded
    targets = cand[torch.randint(len(cand), (16,), generator=gen)][None]
    answers = []

    def pick():
        if excluded.all():
            return None
        ctx = torch.stack(context)[None] if context else cand.new_zeros(1, 0, *cand.shape[1:])
        return int(queries.next_question(belief, strategy, ctx, cand[None], excluded, targets, gen))

    def record(q, choice):
        excluded[0, q] = True
        if choice is not None:
            context.append(queries.answered(cand[q], choice == 1))
            answers.append((q, choice))

    converse(num_questions, pick, show, record, stdin, out)
    return answers


def ask_for_policy(cand_rows, cand_features, belief, strategy, num_questions, known, known_features, label, seed):
    """The policy's dialogue: returns the answered text rows (the known ones first), each with
    choices {label: 0 | 1}. known_features (n, 2, D): the known rows' context features."""
    context = [queries.answered(f, row["choices"][label] == 1) for f, row in zip(known_features, known)]
    show = lambda q: (f"which answer to \"{cand_rows[q]['prompt']}\" do you prefer?", cand_rows[q]["response_a"],
                      cand_rows[q]["response_b"])
    new = ask_person(cand_features, context, show, belief, strategy, num_questions,
                     torch.Generator().manual_seed(seed))
    return list(known) + [{**{k: cand_rows[q][k] for k in ("prompt", "response_a", "response_b")},
                           "choices": {label: choice}} for q, choice in new]


def world_summary(rows, label):
    """One line on what the answers say about a steering-world user (world.preference_posterior)."""
    import world  # only the steering world's dialogue needs it

    answers = [(r["prompt"], r["response_b"], r["response_a"]) if r["choices"][label] == 1 else
               (r["prompt"], r["response_a"], r["response_b"]) for r in rows]
    if not rows:
        return "no answers: nothing learned about you yet"
    post = world.preference_posterior(answers)
    (length, length_sd), (tone, tone_sd) = post["length"], post["tone"]
    says = f"your {len(rows)} answer" + ("s say" if len(rows) != 1 else " says")
    return (f"{says} (the world's exact posterior): about {length:.1f} ± {length_sd:.1f} "
            f"sentences, tone {tone:+.2f} ± {tone_sd:.2f} (-1 harsh, +1 warm)")


# -----------------------------------------------------------------------------
# the reward run's dialogue: python dialogue.py RUN --ask=K

CLI_DEFAULTS = {
    "ask": 0,  # answers to have: the questions asked are those --context does not already answer
    "strategy": "infogain",  # random | uncertainty | infogain (queries.py)
    "pool": 1000,  # candidate questions: pairs of the run's test split
    "context": "",  # JSONL of answers already given (as --save writes them)
    "save": "",  # write every answer (from --context too) here
    "score": "",  # JSONL of pairs to score: {"option_a": [...], "option_b": [...]}
    "seed": 0,  # which pairs form the pool; ties between questions
}
USAGE = ("usage: python dialogue.py RUN [--ask=K] [--strategy=infogain] [--pool=N] [--context=FILE] [--save=FILE] "
         "[--score=FILE] [--seed=S]")
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
            hint = " (this looks like a text pair for policy.py)" if '"response_a"' in line else ""
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


def learned_lines(model, data, context, labels_only=10):
    """What the answers say: the exact posterior over a known generator's users, and how often the
    model, given the answers, agrees with each of them on the test split's pairs."""
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
            p = model.log_prob_chosen({"context": context[None], "context_mask": mask, "targets": test[None]})[0]
        agree = [((p > math.log(0.5)) == (rewards[:, 0, k] > rewards[:, 1, k])).float().mean().item()
                 for k in range(rewards.shape[-1])]
        lines.append("given them, the model agrees with " + ", ".join(
            f"{label} on {100 * a:.0f} %" for label, a in zip(data.labels, agree)) + f" of {len(test)} test pairs")
    return lines


def reward_cli(argv):
    """python dialogue.py RUN --ask=K: a reward run asks a person, then says what it learned."""
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return
    config, rest = load_config(CLI_DEFAULTS, argv)
    if len(rest) != 1:
        raise ConfigError(USAGE if not rest else f"expected one RUN, got {len(rest)}: {' '.join(rest)} ({USAGE})")
    check(config["ask"] >= 0, "ask", "must be 0 or more questions")
    check(config["ask"] > 0 or config["context"] or config["score"], "ask",
          "give --ask=K to be asked K questions (and/or --context=FILE, --score=FILE)")
    check(not config["save"] or config["ask"] > 0, "save", "saves the answers to --ask's questions: give --ask=K")
    check(config["pool"] >= 1, "pool", "must be at least 1")
    check(config["strategy"] in queries.STRATEGIES, "strategy", f"must be one of {', '.join(queries.STRATEGIES)}")
    check_save_path(config["save"], config["context"])
    data = load_pairs(run_data_path(rest[0]))
    belief = queries.run_belief(rest[0], data.dim, where=data.path)
    model = belief.model
    given = read_feature_pairs(config["context"], data.dim, True) if config["context"] else []
    scored = read_feature_pairs(config["score"], data.dim, False) if config["score"] else []
    if config["ask"] and data.dim > MAX_SHOWN_DIM:
        raise ConfigError(f"{data.path} has options of {data.dim} features (embeddings of text?), which cannot be "
                          "shown to a person: ask with policy.py, which shows the text")
    gen = torch.Generator().manual_seed(config["seed"])
    rows = torch.from_numpy(data.split == "test").nonzero().squeeze(1)
    rows = rows[torch.randperm(len(rows), generator=gen)[:config["pool"]]]
    cand = data.pairs[rows]  # (C, 2, D) as stored: which option is first says nothing about anyone's answer
    answers = [queries.answered(pair, choice == 1) for pair, choice in given]
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
    for line in learned_lines(model, data, context) if answers else ["no answers: nothing learned about you yet"]:
        print(line)
    if scored:
        batch = {"context": context[None], "context_mask": torch.ones(1, len(context), dtype=torch.bool),
                 "targets": torch.stack([pair for pair, _ in scored])[None]}
        with torch.no_grad():
            probs = model.log_prob_chosen(batch)[0].exp()
        print(f"P(option_a preferred) for the pairs in {config['score']}:")
        for (pair, _), p in zip(scored, probs.tolist()):
            print(f"  {p:.3f}  a: {option_text(pair[0])}  b: {option_text(pair[1])}")
    if config["save"] and given:
        save_rows(config["save"], [{"option_a": pair[0].tolist(), "option_b": pair[1].tolist(), "choice": choice}
                                   for pair, choice in given])
        print(f"wrote {plural(len(given), 'answer')} to {config['save']}")
    elif config["save"]:
        print(f"no answers: nothing written to {config['save']}")


if __name__ == "__main__":
    run_script(reward_cli)
