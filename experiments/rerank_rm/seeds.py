"""
Addendum 7 (experiments/rerank_rm/PLAN.md): the reranker over its own training seed. Reads the eval.json of each
reward-model seed's test run (the three NP-DPO seeds each) and prints, at n = 0 / 1 / 3 / 5 / 10: each reward-model
seed's mean over the policy seeds, the mean over reward-model seeds with their sd, the sd over all policy x
reward-model pairs, and how many of those pairs rise at every step.

    python experiments/rerank_rm/seeds.py experiments/rerank_rm/test_rerank_particles experiments/rerank_rm/test_rerank_particles_rm1 experiments/rerank_rm/test_rerank_particles_rm2
"""

import json
import statistics
import sys

SIZES = (0, 1, 3, 5, 10)
CEILING = "experiments/checkpoint_trajectory/test_t0.1/eval.json"  # the known-preference policies (README's ceiling)


def main(folders):
    per_rm, pairs = [], []
    for folder in folders:
        with open(f"{folder}/eval.json") as f:
            rows = [r for r in json.load(f) if r["model"].startswith("steer_world_np_dpo")]
        curves = [[100 * r[f"normalised@{n}"][0] for n in SIZES] for r in rows]
        pairs += curves
        per_rm.append([statistics.mean(c) for c in zip(*curves)])
        print(f"{folder}: {len(rows)} policy seeds, mean " + " / ".join(f"{x:.1f}" for x in per_rm[-1]))
    mean = [statistics.mean(c) for c in zip(*per_rm)]
    sd_rm = [statistics.stdev(c) for c in zip(*per_rm)]
    sd_all = [statistics.stdev(c) for c in zip(*pairs)]
    with open(CEILING) as f:
        ceiling = statistics.mean(100 * r["normalised@None"][0] for r in json.load(f) if "known" in r["model"])
    rising = sum(all(b > a for a, b in zip(c, c[1:])) for c in pairs)
    print("mean over reward-model seeds: " + " / ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(mean, sd_rm)) +
          " (± sd over reward-model seeds)")
    print("sd over all policy x reward-model pairs: " + " / ".join(f"{s:.1f}" for s in sd_all))
    print(f"pairs rising at every step: {rising} of {len(pairs)}; at n = 10, {mean[-1]:.1f} of the ceiling's {ceiling:.1f} "
          f"= {100 * mean[-1] / ceiling:.1f} % (90 %: {0.9 * ceiling:.1f})")


if __name__ == "__main__":
    main(sys.argv[1:])
