"""
Asking a person which of two options they prefer, one question at a time, in a terminal:
the loop that steer.py's --ask=K runs for a policy and for a reward run.

    python steer.py runs/synthetic_np_btl --ask=3          # a reward run asks you 3 questions
    printf '1\\n2\\ns\\n1\\n' | python steer.py runs/steer_world_np_dpo --ask=3 --selector=runs/steer_world_reward \\
        --prompt="Tell me about owls."

Each question shows two numbered options, wrapped to the terminal, chosen by `--strategy`
(queries.py) from a pool of candidates. The person types 1 or 2 (their choice), s (skip:
not asked again) or q (stop early); anything else asks again. End of input counts as q,
so piped answers work; Ctrl-C stops asking and keeps the answers given.

A reward run's dialogue (`python steer.py REWARD_RUN`) shows pairs of option features from
the run's test split, then prints what the answers say (for a known generator, which of
its users they fit) and, with `--score=FILE`, P(option_a preferred) for each pair in FILE.
Answers are saved with `--save=FILE` and resumed with `--context=FILE` (`--ask` counts
them): JSONL lines {"option_a": [features], "option_b": [features], "choice": 0 | 1}
(1 = option_b preferred); a --score file has the same lines without "choice". The
policy's dialogue saves text pairs (text.py), the format of steer.py's --context.
"""

import json
import os
import shutil
import sys
import textwrap

import torch

import queries
from common import ConfigError
from data import chosen_first, load_pairs
from runs import resolve_path
from text import read_text_pairs

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
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"--save={path}: {folder} is a file, not a folder")
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
            context.append(chosen_first(cand[q], choice == 1))
            answers.append((q, choice))

    converse(num_questions, pick, show, record, stdin, out)
    return answers


def ask_for_policy(cand_rows, cand_features, belief, strategy, num_questions, known, known_features, label, seed):
    """The policy's dialogue: returns the answered text rows (the known ones first), each with
    choices {label: 0 | 1}. known_features (n, 2, D): the known rows' context features."""
    context = [chosen_first(f, row["choices"][label] == 1) for f, row in zip(known_features, known)]
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
