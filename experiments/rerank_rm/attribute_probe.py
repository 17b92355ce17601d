"""
Diagnostic (experiments/rerank_rm/PLAN.md): how much of each option's (length, tone, relevance) an MLP
regression recovers from the base model's hidden state at the last token of prompt + response, layer by layer
(the context features are the last layer's). Trained on the training pairs' options, R^2 on the others.

    PYTHONPATH=. python experiments/rerank_rm/attribute_probe.py runs/steer_world_base data/steer_world
"""

import json
import os
import sys

import numpy as np
import torch

import world
from text import embedding_sequences, load_embedder, pad_right


def mlp_r2(X, y, train, steps=3000):
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    X = (X - X[train].mean(0)) / (X[train].std(0) + 1e-6)
    mean, sd = y[train].mean(0), y[train].std(0)
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 128), torch.nn.GELU(), torch.nn.Linear(128, 3))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    Xt, yt = X[train], (y[train] - mean) / sd
    for _ in range(steps):
        i = torch.randint(len(Xt), (256,))
        loss = ((net(Xt[i]) - yt[i]) ** 2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    with torch.no_grad():
        pred = net(X[~train]) * sd + mean
    return (1 - ((pred - y[~train]) ** 2).mean(0) / y[~train].var(0)).tolist()


def main(base, folder, seed=0):
    torch.manual_seed(seed)
    tokenizer, model, _ = load_embedder(base, "cpu")
    rows = [json.loads(line) for line in open(os.path.join(folder, "pairs.jsonl"))]
    sequences = embedding_sequences(rows, tokenizer, "last")
    attrs = np.array([[a["length"], a["tone"], a["relevance"]] for row in rows
                      for a in (world.attributes(row["prompt"], row[k]) for k in ("response_a", "response_b"))])
    train = torch.tensor(np.repeat([row["split"] == "train" for row in rows], 2))
    layers = []
    with torch.no_grad():
        for start in range(0, len(sequences), 128):
            ids, mask = pad_right(sequences[start:start + 128], 0)
            hidden = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
            layers.append([h[torch.arange(len(ids)), mask.sum(1) - 1] for h in hidden])
    for layer, states in enumerate(zip(*layers)):
        r2 = mlp_r2(torch.cat(states).numpy(), attrs, train)
        print(f"layer {layer}: held-out R^2 length {r2[0]:.3f}, tone {r2[1]:.3f}, relevance {r2[2]:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
