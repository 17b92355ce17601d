"""
How much of a user's preference the context encoder recovers after the NP-BTL warm-up
alone (train_policy.warm_up_encoder), as a function of the warm-up length.

    PYTHONPATH=. python experiments/encoder_probe.py 5000 20000
    PYTHONPATH=. python experiments/encoder_probe.py --standardise 2000 5000

--standardise z-scores every feature dimension by the train split's mean and sd before the
warm-up (a probe only: the encoder has no such option yet).

For each count: a fresh policy (seed 0) on the steering world's default inputs, its
encoder warmed up, then z from 10 context pairs of each user; a linear read-out of
(length, tone) from z is fitted on 400 train users and scored (R^2) on the 40
validation users. Needs the default inputs (run `python train_policy.py` once).
"""

import sys

import torch

import data
import policy as policy_lib
import steer_eval
import text
import train_policy
from common import load_config, seed_everything


def read_out_r2(policy, d, rows, gen):
    train, val = steer_eval.TestUsers(d, rows, "train"), steer_eval.TestUsers(d, rows, "val")
    with torch.no_grad():
        z_train = policy.infer_latent(torch.stack([train.context(u, 10, gen)[0] for u in range(400)]))
        z_val = policy.infer_latent(torch.stack([val.context(u, 10, gen)[0] for u in range(len(val.labels))]))
    design = lambda z: torch.cat([z, torch.ones(len(z), 1)], 1).double()  # noqa: E731
    weights = torch.linalg.lstsq(design(z_train), train.preferences[:400]).solution
    pred, truth = design(z_val) @ weights, val.preferences
    return (1 - ((pred - truth) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)).tolist()


def main(counts, standardise=False):
    for steps in counts:
        config, _ = load_config(train_policy.DEFAULTS, [f"--train.encoder_warmup_steps={steps}"])
        seed_everything(0)
        d, _, _ = text.load_inputs(config)
        if standardise:
            train = d.pairs[torch.from_numpy(d.split == "train")].reshape(-1, d.dim)
            d.pairs = (d.pairs - train.mean(0)) / train.std(0)
        sampler, _ = data.train_val_samplers(d, config)
        policy = policy_lib.SteerablePolicy(policy_lib.build_base_model(config["policy"]["base"]), config["policy"],
                                            context_dim=d.dim)
        train_policy.warm_up_encoder(policy, sampler, config, torch.device("cpu"))
        r2 = read_out_r2(policy, d, text.read_text_pairs(config["data"]["pairs"]), torch.Generator().manual_seed(0))
        print(f"{steps} warm-up steps{' (standardised features)' if standardise else ''}: validation R^2 of "
              f"a linear read-out, length {r2[0]:.2f}, tone {r2[1]:.2f}")


if __name__ == "__main__":
    flag = "--standardise" in sys.argv[1:]
    main([int(a) for a in sys.argv[1:] if a != "--standardise"] or [5000, 20000], flag)
