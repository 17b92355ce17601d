"""
Diagnostic (experiments/rerank_rm/PLAN.md): the steering world's pairs embedded by the same base model as the
context features, but each option as [last token, mean over tokens] of the final hidden states (2 x 64 dims)
instead of the last token alone. Writes OUT/features.npz with SRC's answers, and SRC's users and pairs.

    PYTHONPATH=. python experiments/rerank_rm/mean_features.py runs/steer_world_base data/steer_world_dense4 data/steer_world_dense4_lastmean
"""

import json
import os
import shutil
import sys

import numpy as np
import torch

from text import embed_sequences, embedding_sequences, load_embedder


def main(base, src, out):
    tokenizer, model, _ = load_embedder(base, "cpu")
    rows = [json.loads(line) for line in open(os.path.join(src, "pairs.jsonl"))]
    sequences = embedding_sequences(rows, tokenizer, "last")
    feats = torch.cat([embed_sequences(sequences, tokenizer, model, p) for p in ("last", "mean")], -1)
    d = dict(np.load(os.path.join(src, "features.npz")))
    assert np.allclose(feats[:, :d["pairs"].shape[-1]].view(len(rows), 2, -1).numpy(), d["pairs"], atol=1e-4)
    os.makedirs(out)
    np.savez(os.path.join(out, "features.npz"), **dict(d, pairs=feats.view(len(rows), 2, -1).numpy()))
    for name in ("users.json", "pairs.jsonl"):
        shutil.copy(os.path.join(src, name), out)
    print(f"{out}: {tuple(feats.view(len(rows), 2, -1).shape)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(*sys.argv[1:4])
