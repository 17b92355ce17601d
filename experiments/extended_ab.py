"""
How much ContextEncoder.extended saves the look-ahead: one process, the two ways of encoding
a context plus each candidate answer interleaved call by call (so the machine's drift hits
both alike): `extended` (the context's pairs embedded once) and `naive` (every extended
context encoded from scratch, the code before it). Median ms of queries.next_question by
infogain from 1,000 candidates with 16 targets, for a user with no answers, with 10 answers
of a test user (bench.user_answers), and with 10 random pairs and random answers.

    PYTHONPATH=. python experiments/extended_ab.py runs/three_types_np_btl data/three_types.npz
"""

import sys

import torch
import torch.nn.functional as F

import bench
import queries
from data import load_pairs
from np_encoder import ContextEncoder
from reward import load_reward_model


def naive(self, context, mask, new):
    B, C, n = *new.shape[:2], context.shape[1]
    ext = torch.cat([context[:, None].expand(B, C, *context.shape[1:]), new[:, :, None]], 2)
    ext_mask = F.pad(mask, (0, 1), value=True)[:, None].expand(B, C, n + 1)
    return self(ext.flatten(0, 1), ext_mask.flatten(0, 1))


def main(run, path, repeats=25):
    import time

    data = load_pairs(path)
    model = load_reward_model(run, data.dim, "cpu", path)[0].eval()
    gen = torch.Generator().manual_seed(0)
    pick = lambda k: data.pairs[torch.randint(len(data.pairs), (k,), generator=gen)][None]
    cand, targets = pick(1000), pick(16)
    cases = {"no answers": pick(0), "10 answers of a test user": bench.user_answers(data, 10),
             "10 random answers": pick(10)}
    excluded = torch.zeros(1, 1000, dtype=torch.bool)
    ways = {"extended": ContextEncoder.extended, "naive": naive}
    try:
        for name, context in cases.items():
            times = {way: [] for way in ways}
            for rep in range(repeats + 3):
                for way, impl in ways.items():
                    ContextEncoder.extended = impl
                    start = time.perf_counter()
                    queries.next_question(queries.ModelBelief(model), "infogain", context, cand, excluded, targets,
                                          torch.Generator().manual_seed(rep))
                    if rep >= 3:
                        times[way].append(1000 * (time.perf_counter() - start))
            med = {way: sorted(t)[len(t) // 2] for way, t in times.items()}
            print(f"{run}, {name}: median ms extended {med['extended']:.1f}, naive {med['naive']:.1f}")
    finally:
        ContextEncoder.extended = ways["extended"]


if __name__ == "__main__":
    main(*sys.argv[1:3])
