"""
Diagnostic (experiments/rerank_rm/PLAN.md): how much of a user's choices the context features can explain when
the user's true preference is given. An MLP r(features, preference) trained by Bradley-Terry on the training
users' answers (of FEATURES), scored on the validation users' answers, beside the accuracy of the users' own
gold reward on the same answers (the most any reward can score). With `attributes`, the same MLP reads each
response's true (length, tone, relevance) instead of its features: a check that the probe can reach the gold
reward's accuracy when the inputs allow it.

    PYTHONPATH=. python experiments/rerank_rm/known_probe.py data/steer_world_dense4/features.npz [STEPS] [attributes|features] [SAVE]

SAVE: the trained MLP's state_dict (features only), for experiments/n1_dip/rerank.py's probe column.
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import world


def answers(d, prefix):
    r, u = np.nonzero(d["choices"] >= 0)
    keep = np.char.startswith(d["labels"][u].astype(str), prefix)
    return r[keep], u[keep], d["choices"][r[keep], u[keep]]


def probe_net(dim):
    """r(option (..., dim), preference (..., 2)) as one MLP on their concatenation."""
    return torch.nn.Sequential(torch.nn.Linear(dim + 2, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                               torch.nn.GELU(), torch.nn.Linear(128, 1))


def main(path, steps=6000, inputs="features", save=None, seed=0):
    torch.manual_seed(seed)
    d = dict(np.load(path))
    folder = os.path.dirname(path)
    prefs = json.load(open(os.path.join(folder, "users.json")))
    rows = [json.loads(line) for line in open(os.path.join(folder, "pairs.jsonl"))]
    P = torch.tensor([prefs[name] for name in d["labels"]], dtype=torch.float32)
    X = torch.tensor(d["pairs"])  # (R, 2, D)
    if inputs == "attributes":
        X = torch.tensor([[[a["length"], a["tone"], a["relevance"]] for a in
                           (world.attributes(row["prompt"], row[k]) for k in ("response_a", "response_b"))]
                          for row in rows], dtype=torch.float32)
    net = probe_net(X.shape[-1])
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    reward = lambda r, u: net(torch.cat([X[r], P[u][:, None].expand(-1, 2, -1)], -1)).squeeze(-1)  # (N, 2)
    tr, va = answers(d, "train"), answers(d, "val")
    for step in range(steps):
        i = torch.randint(len(tr[0]), (256,))
        r = reward(torch.tensor(tr[0][i]), torch.tensor(tr[1][i]))
        b_chosen = torch.tensor(tr[2][i]).float()
        loss = F.binary_cross_entropy_with_logits(r[:, 1] - r[:, 0], b_chosen)
        opt.zero_grad(), loss.backward(), opt.step()
    with torch.no_grad():
        r = reward(torch.tensor(va[0]), torch.tensor(va[1]))
        model_acc = ((r[:, 1] > r[:, 0]).numpy() == (va[2] == 1)).mean()
    gold = np.array([world.gold_reward(rows[i]["prompt"], rows[i]["response_b"], prefs[d["labels"][u]])
                     - world.gold_reward(rows[i]["prompt"], rows[i]["response_a"], prefs[d["labels"][u]])
                     for i, u in zip(va[0], va[1])])
    print(f"{path}: validation answers {len(va[0])}; known-preference MLP on the {inputs}, {steps} steps, {100 * model_acc:.1f} %; "
          f"the users' own gold reward {100 * ((gold > 0) == (va[2] == 1)).mean():.1f} %")
    if save:
        torch.save(net.state_dict(), save)


if __name__ == "__main__":
    main(sys.argv[1], *(int(x) for x in sys.argv[2:3]), *sys.argv[3:5])
