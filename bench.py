"""
Speed figures for the README, measured on this machine.

    python bench.py                                   # configs/synthetic.yaml, an untrained model
    python bench.py configs/synthetic.yaml --run=runs/synthetic_np_btl
    python bench.py configs/synthetic.yaml --model.encoder.aggregator=attention

Reports reward training throughput (episodes/s, optimizer steps of train.batch_size
episodes, data sampling included) and the latency of adapting to a new user: infer
the latent from `context_pairs` context pairs, then score `candidate_pairs` candidate
pairs (median and 90th percentile over `repeats` calls, batch of one user).
Timings depend on torch's thread count: say which when you report them.
"""

import statistics
import sys
import time

import torch

from common import load_config, load_checkpoint, pick_device, seed_everything
from data import EpisodeSampler
from reward import build_model
from train_reward import DEFAULTS as TRAIN_DEFAULTS, prepare_data, to_device

DEFAULTS = dict(TRAIN_DEFAULTS, bench={
    "run": None,  # a run dir whose trained weights to time (speed does not depend on them)
    "train_steps": 200,  # timed optimizer steps (after 20 warm-up steps)
    "context_pairs": 10,  # a new user's context size
    "candidate_pairs": 100,  # pairs scored for that user
    "repeats": 1000,  # latency measurements
})
ALIASES = {"run": "bench.run"}


def time_training(model, sampler, config, device):
    t, b = config["train"], config["bench"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"])
    for step in range(20 + b["train_steps"]):
        if step == 20:
            start = time.perf_counter()
        loss, _ = model.loss(to_device(sampler.sample(t["batch_size"]), device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return b["train_steps"] * t["batch_size"] / (time.perf_counter() - start)


@torch.no_grad()
def time_adaptation(model, data, config, device):
    """Seconds per call of: latent from the context, then rewards of candidate pairs."""
    b = config["bench"]
    sampler = EpisodeSampler(data, "test", b["candidate_pairs"], b["context_pairs"], seed=0)
    batch = to_device(sampler.sample(1, num_context=b["context_pairs"]), device)
    model.eval()
    times = []
    for _ in range(b["repeats"]):
        start = time.perf_counter()
        latent = model.infer_latent(batch["context"]) if hasattr(model, "infer_latent") else None
        model.rewards(batch["targets"], latent)  # (1, candidates, 2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), statistics.quantiles(times, n=10)[-1]


def main(argv):
    config, _ = load_config(DEFAULTS, argv or ["configs/synthetic.yaml"], ALIASES)
    seed_everything(config["seed"])
    device = pick_device(config["device"])
    data = prepare_data(config["data"])
    t, b = config["train"], config["bench"]
    model = build_model(config["model"], data.dim).to(device)
    if b["run"]:
        model.load_state_dict(load_checkpoint(b["run"])["model"])
    sampler = EpisodeSampler(data, "train", t["num_targets"], t["max_context"], t["min_context"], seed=0)
    episodes_per_s = time_training(model, sampler, config, device)
    median, p90 = time_adaptation(model, data, config, device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"model {config['model']['kind']} ({config['model']['encoder']['aggregator']} aggregator)\n")
    print("| measure | value |\n|---|---|")
    print(f"| reward training, episodes/s (batch {t['batch_size']}, {t['num_targets']} targets) | {episodes_per_s:,.0f} |")
    print(f"| adapt to a new user: latent from {b['context_pairs']} pairs + score {b['candidate_pairs']} pairs, "
          f"median ms | {1000 * median:.3f} |")
    print(f"| same, 90th percentile ms | {1000 * p90:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
