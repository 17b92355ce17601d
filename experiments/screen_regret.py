"""
Does screening at the mean of q(z | ...) cost a stochastic NP-BTL good questions?
(queries.ModelBelief's `screen`.)

    PYTHONPATH=. python experiments/screen_regret.py runs/three_types_np_btl

On 300 test episodes of the run's data (pool 100, 16 unlabelled target pairs, the
first 90 candidates asked about, after k = 0, 1, 2 answers to the last ones), each
way of choosing picks one candidate. Its regret is how much less information it gains
than the best candidate, both scored by an independent look-ahead over 64 draws of z:
mean regret in nats, beside the best candidate's mean gain.
"""

import sys

import torch

from data import chosen_first, load_pairs
from queries import ModelBelief, episode_chunks
from reward import load_reward_model, run_data_path


def main(run):
    torch.set_num_threads(2)
    data = load_pairs(run_data_path(run))
    model, _ = load_reward_model(run, data.dim, "cpu", data.path)
    model.eval()
    config = {"num_targets": 50, "chunk": 300, "query": {"pool": 100, "episodes": 300, "target_inputs": 16}}
    chunk = next(episode_chunks(data, "test", config, 1234))
    cand, answers, targets = chunk["cand"][:, :90], chunk["answers"], chunk["target_inputs"]
    print("| answers | best gain | all over 8 draws | " + " | ".join(
        f"{m} kept, {s} draws" for m in (8, 16, 32) for s in (8, 16, 32)) + " |")
    print("|---" * 12 + "|")
    with torch.no_grad():
        for k in (0, 1, 2):
            context = chosen_first(chunk["cand"][:, 90:90 + k], answers[:, 90:90 + k])
            mask = torch.ones(len(cand), k, dtype=torch.bool)
            gain = lambda samples, screen, seed: (torch.manual_seed(seed), ModelBelief(  # noqa: E731
                model, samples, screen).infogain(context, mask, cand, targets))[1]
            truth = gain(64, 0, 1)
            best = truth.max(1).values
            regret = lambda score: (best - truth.gather(1, score.argmax(1, keepdim=True))[:, 0]).mean()  # noqa: E731
            cells = [regret(gain(8, 0, 2))] + [regret(gain(s, m, 5)) for m in (8, 16, 32) for s in (8, 16, 32)]
            print(f"| {k} | {best.mean():.3f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/three_types_np_btl")
