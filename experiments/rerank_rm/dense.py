"""
Diagnostic (experiments/rerank_rm/PLAN.md): the steering world's features with each training user answering
EXTRA more training pairs, by the world's Bradley-Terry rule on their preference (temperature 1, as
world.annotated_pair). Validation and test answers, pairs, features and users are copied unchanged.

    PYTHONPATH=. python experiments/rerank_rm/dense.py data/steer_world data/steer_world_dense4 72
"""

import json
import math
import os
import shutil
import sys

import numpy as np

import world


def main(src, out, extra, seed=0):
    d = dict(np.load(os.path.join(src, "features.npz")))
    rows = [json.loads(line) for line in open(os.path.join(src, "pairs.jsonl"))]
    preferences = json.load(open(os.path.join(src, "users.json")))
    rng = np.random.default_rng(seed)
    choices, train_rows = d["choices"].copy(), np.flatnonzero(d["split"] == "train")
    for u, name in enumerate(d["labels"]):
        if not name.startswith("train"):
            continue
        free = train_rows[choices[train_rows, u] < 0]
        for r in rng.choice(free, extra, replace=False):
            q, a, b = rows[r]["prompt"], rows[r]["response_a"], rows[r]["response_b"]
            margin = world.gold_reward(q, b, preferences[name]) - world.gold_reward(q, a, preferences[name])
            choices[r, u] = int(rng.random() < 1 / (1 + math.exp(-margin)))
    os.makedirs(out)
    for name in ("users.json", "pairs.jsonl"):
        shutil.copy(os.path.join(src, name), out)
    np.savez(os.path.join(out, "features.npz"), **dict(d, choices=choices))
    answered = (choices >= 0).sum(0)
    print(f"{out}: answers per user {answered.min()} to {answered.max()}; {int((choices >= 0).sum())} in all")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
