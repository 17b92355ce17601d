"""
Speed figures for the README, measured on this machine.

    python bench.py                                   # reward: configs/synthetic.yaml, an untrained model
    python bench.py configs/synthetic.yaml --run=runs/synthetic_np_btl
    python bench.py policy                            # NP-DPO: configs/steer_text.yaml
    python bench.py policy configs/steer_text.yaml --train.batch_size=16

Reward: training throughput (episodes/s, optimizer steps of train.batch_size
episodes, data sampling included) and the latency of adapting to a new user: infer
the latent from `context_pairs` context pairs, then score `candidate_pairs` candidate
pairs (median and 90th percentile over `repeats` calls, batch of one user).

Policy: NP-DPO training throughput (pairs/s and tokens/s of optimizer steps, policy
and reference forwards, backward and batching included), peak memory on a GPU, and
the latency of adapting to a new user: latent from `context_pairs` embedded pairs,
then greedy generation of `new_tokens` tokens.
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


def bench_policy(argv):
    import policy as policy_lib
    import train_policy
    from data import tokenize_prompt

    defaults = dict(train_policy.DEFAULTS, bench={
        "train_steps": 20,  # timed optimizer steps (after 3 warm-up steps)
        "context_pairs": 10,  # a new user's context size
        "new_tokens": 32,  # greedily generated tokens
        "repeats": 20,  # latency measurements
    })
    config, _ = load_config(defaults, argv or ["configs/steer_text.yaml"])
    seed_everything(config["seed"])
    device = pick_device(config["device"])
    data, token_pairs, tokenizer = train_policy.load_inputs(config)
    t, b, p = config["train"], config["bench"], config["policy"]
    policy = policy_lib.SteerablePolicy(policy_lib.build_base_model(p["base"], p["dtype"]), p, data.dim).to(device)
    optimizer = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=t["lr"])
    sampler = EpisodeSampler(data, "train", t["num_targets"], t["max_context"], t["min_context"], seed=0)
    pairs = tokens = 0
    for step in range(3 + b["train_steps"]):
        if step == 3:
            sync(device)
            start, pairs, tokens = time.perf_counter(), 0, 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        batch = train_policy.make_batch(sampler, token_pairs, t["batch_size"], tokenizer.pad_token_id, device)
        with train_policy.autocast(device, t["autocast"]):
            loss, _ = policy_lib.dpo_step(policy, batch, t["beta"], t["nll_weight"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pairs += batch["chosen_input_ids"].shape[0]
        tokens += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    policy.eval()
    context = sampler.sample(1, num_context=b["context_pairs"])["context"].to(device)
    prompt = torch.tensor([tokenize_prompt(tokenizer, "tell me about cats .")], device=device)
    times = []
    with torch.no_grad():
        for _ in range(b["repeats"]):
            begin = time.perf_counter()
            latent = policy.infer_latent(context) if policy.encoder is not None else None
            policy.generate(prompt, torch.ones_like(prompt), latent=latent, do_sample=False, min_new_tokens=b["new_tokens"],
                            max_new_tokens=b["new_tokens"], pad_token_id=tokenizer.pad_token_id)
            sync(device)
            times.append(time.perf_counter() - begin)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, base {p['base']}, "
          f"batch {t['batch_size']} episodes x {t['num_targets']} targets\n")
    print("| measure | value |\n|---|---|")
    print(f"| NP-DPO training, pairs/s | {pairs / seconds:,.1f} |")
    print(f"| NP-DPO training, tokens/s (chosen + rejected tokens; each runs policy and reference) | {tokens / seconds:,.0f} |")
    print(f"| peak GPU memory, GiB | {'n/a (CPU)' if device.type != 'cuda' else f'{peak:.2f}'} |")
    print(f"| adapt to a new user: latent from {b['context_pairs']} pairs + {b['new_tokens']} greedy tokens, "
          f"median ms | {1000 * statistics.median(times):.1f} |")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv):
    if argv and argv[0] == "policy":
        return bench_policy(argv[1:])
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
