"""
How many users does a practitioner need? Gap to the Bayes-optimal accuracy on a continuous
linear population (4-D options, Bradley-Terry choices at temperature 0.1) against the number
of training users, and against pairs per user at a fixed total. Each point is a model
trained by the given recipe and scored by evaluate.py on its own test users.

    python experiments/users_vs_gap.py                       # writes experiments/users_vs_gap.{json,md,png}
    python experiments/users_vs_gap.py --recipe="--train.steps=3000"   # another training recipe

It only runs the project's commands (prepare/synthetic.py, train_reward.py, evaluate.py) and collects
their eval.json; runs and data go under runs/users_vs_gap/ and data/users_vs_gap/.
"""

import json
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
USERS = [(250, 40), (1000, 40), (4000, 40), (16000, 40)]  # (users, pairs per user)
PAIRS = [(4000, 20), (2000, 40), (1000, 80)]  # 80,000 pairs in all
SIZES = [1, 3, 10]
RECIPE = "configs/population.yaml"


def run(*args):
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def point(users, pairs_per_user, recipe):
    """Generate, train, evaluate one setting; returns evaluate.py's gap rows."""
    name = f"u{users}_p{pairs_per_user}"
    data, out = f"data/users_vs_gap/{name}.npz", f"runs/users_vs_gap/{name}"
    if not os.path.exists(os.path.join(REPO, data)):
        run("prepare/synthetic.py", "--generator=linear", f"--num_users={users}", f"--pairs_per_user={pairs_per_user}",
            "--dim=4", "--temperature=0.1", f"--out={data}")
    targets = min(20, pairs_per_user - 10)  # every user answers context + targets
    if not os.path.exists(os.path.join(REPO, out, "ckpt_best.pt")):
        run("train_reward.py", RECIPE, f"--data.path={data}", f"--out_dir={out}", f"--train.num_targets={targets}",
            f"--eval.num_targets={targets}", *recipe)
    run("evaluate.py", out, "--num_targets=10", f"--num-context={SIZES}".replace(" ", ""), "--episodes=4000",
        "--max_label_rows=0")
    with open(os.path.join(REPO, out, "eval.json")) as f:
        rows = json.load(f)
    with open(os.path.join(REPO, out, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f][-1]["step"]
    bayes = {r["num_context"]: r["accuracy"] for r in rows if r["model"] == "bayes_optimal" and r["label"] == "all"}
    return [dict(users=users, pairs_per_user=pairs_per_user, num_context=r["num_context"], gap=r["gap_to_bayes"],
                 sem=r["gap_sem"], accuracy=r["accuracy"], bayes=bayes[r["num_context"]], steps=steps)
            for r in rows if "gap_to_bayes" in r]


def table(points, key):
    """Gap to Bayes (points ± SEM) with the Bayes-optimal accuracy beside it, one row per setting."""
    lines = [f"| {key} | steps | " + " | ".join(f"n={n}: gap (Bayes %)" for n in SIZES) + " |",
             "|---|---|" + "---|" * len(SIZES)]
    for value in dict.fromkeys(p[key] for p in points):
        mine = {p["num_context"]: p for p in points if p[key] == value}
        cells = [f"{100 * mine[n]['gap']:+.2f} ± {100 * mine[n]['sem']:.2f} ({100 * mine[n]['bayes']:.1f})" for n in SIZES]
        lines.append(f"| {value} | {mine[SIZES[0]]['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(by_users, by_pairs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, points, key, label in ((axes[0], by_users, "users", "training users (40 pairs each)"),
                                   (axes[1], by_pairs, "pairs_per_user", "pairs per user (80,000 pairs in all)")):
        for n, marker in zip(SIZES, "osD"):
            mine = [p for p in points if p["num_context"] == n]
            ax.errorbar([p[key] for p in mine], [100 * p["gap"] for p in mine], yerr=[100 * p["sem"] for p in mine],
                        marker=marker, capsize=4, label=f"n = {n} context pairs")
        ax.axhline(0, color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("gap to Bayes-optimal (points)")
        ax.legend(fontsize=7)
    fig.suptitle("NP-BTL on a continuous population: gap to Bayes-optimal, test users")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    recipe = shlex.split(argv[0].split("=", 1)[1]) if argv and argv[0].startswith("--recipe=") else []
    by_users = [row for u, p in USERS for row in point(u, p, recipe)]
    by_pairs = [row for u, p in PAIRS for row in point(u, p, recipe)]
    with open(os.path.join(HERE, "users_vs_gap.json"), "w") as f:
        json.dump({"recipe": [RECIPE, *recipe], "by_users": by_users, "by_pairs": by_pairs}, f, indent=1)
    text = table(by_users, "users") + "\n\n" + table(by_pairs, "pairs_per_user")
    with open(os.path.join(HERE, "users_vs_gap.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    plot(by_users, by_pairs, os.path.join(HERE, "users_vs_gap.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
