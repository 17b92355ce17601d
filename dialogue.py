"""
Asking a person which of two responses they prefer, in a terminal: the loop that the
steering CLIs (`policy.py RUN --ask=K`, `reward.py RUN --ask=K`) share.

Each question shows two numbered options, wrapped to the terminal. The person types
1 or 2 (their choice), s (skip: this question is not asked again) or q (stop early);
anything else asks again. End of input counts as q, so piped answers work:

    printf '1\\n2\\ns\\n1\\n' | python policy.py runs/steer_world_np_dpo --ask=3 --prompt="Tell me about owls."

The questions go to stdout, the prompts for a choice too, so a transcript reads in order.
"""

import json
import os
import shutil
import sys
import textwrap

import torch

from common import ConfigError

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
    from common import resolve_path
    from data import load_pairs, read_text_pairs

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


def selector_belief(path, dim, samples=8):
    """The belief of a reward run (NP-BTL) on the policy's context features: it chooses the questions."""
    import queries
    from data import DataError
    from reward import load_reward_model

    model, _ = load_reward_model(path, dim, "cpu", "the policy's context features")
    if not hasattr(model, "encoder"):
        raise DataError(f"--selector={path} reads no context (a {type(model).__name__}): it cannot choose questions")
    return queries.ModelBelief(model, samples)


def ask_person(cand_rows, cand_features, belief, strategy, num_questions, known, known_features, label, seed,
               stdin=None, out=None):
    """Asks up to num_questions questions; returns the answered text rows (the known ones first),
    each with choices {label: 0 | 1}. known_features (n, 2, D): the known rows' context features."""
    import queries

    answered_rows, excluded = list(known), torch.zeros(1, len(cand_rows), dtype=torch.bool)
    context = [queries.answered(f, row["choices"][label] == 1) for f, row in zip(known_features, known)]
    gen = torch.Generator().manual_seed(seed)
    dim = cand_features.shape[-1]
    targets = cand_features[torch.randint(len(cand_features), (16,), generator=gen)][None]

    def pick():
        if excluded.all():
            return None
        ctx = torch.stack(context)[None] if context else cand_features.new_zeros(1, 0, 2, dim)
        return int(queries.next_question(belief, strategy, ctx, cand_features[None], excluded, targets, gen))

    def record(q, choice):
        excluded[0, q] = True
        if choice is not None:
            context.append(queries.answered(cand_features[q], choice == 1))
            answered_rows.append({**{k: cand_rows[q][k] for k in ("prompt", "response_a", "response_b")},
                                  "choices": {label: choice}})

    show = lambda q: (f"which answer to \"{cand_rows[q]['prompt']}\" do you prefer?", cand_rows[q]["response_a"],
                      cand_rows[q]["response_b"])
    converse(num_questions, pick, show, record, stdin, out)
    return answered_rows


def world_summary(rows, label):
    """One line on what the answers say about a steering-world user (world.preference_posterior)."""
    import world

    answers = [(r["prompt"], r["response_b"], r["response_a"]) if r["choices"][label] == 1 else
               (r["prompt"], r["response_a"], r["response_b"]) for r in rows]
    if not rows:
        return "no answers: nothing learned about you yet"
    post = world.preference_posterior(answers)
    (length, length_sd), (tone, tone_sd) = post["length"], post["tone"]
    says = f"your {len(rows)} answer" + ("s say" if len(rows) != 1 else " says")
    return (f"{says} (the world's exact posterior): about {length:.1f} ± {length_sd:.1f} "
            f"sentences, tone {tone:+.2f} ± {tone_sd:.2f} (-1 harsh, +1 warm)")
