"""
Why the few-shot ceiling dips at n = 1 at a low sampling temperature: the decoder's tone
against the tone it is asked for. The known-preference runs are conditioned on a sweep of
preferences (tone -1..1 at three lengths) and sampled on the validation prompts; the table
gives the mean tone generated (its sd over responses) and the gold reward against the best.

    python experiments/tone_sweep.py runs/steer_world_known_s{0,1,2} > experiments/tone_sweep.md
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import world  # noqa: E402
from common import ConfigError, run_script  # noqa: E402
from policy_eval import load_policies  # noqa: E402
from steer_eval import attribute_table, eval_prompts, rewards_from_attributes, sample_texts  # noqa: E402

TONES = [-1.0, -0.6, -0.3, -0.15, 0.0, 0.15, 0.3, 0.6, 1.0]
LENGTHS = [2.0, 3.5, 5.0]


def sweep(policy, tokenizer, temperature, prompts, samples=16):
    """(lengths, tones, 3): mean generated tone, its sd, and mean gold reward."""
    out = torch.zeros(len(LENGTHS), len(TONES), 3, dtype=torch.float64)
    for i, length in enumerate(LENGTHS):
        prefs = torch.tensor([[length, t] for t in TONES], dtype=torch.float64)
        latent = torch.tensor([world.preference_latent(p) for p in prefs.tolist()])
        attrs = []
        for q in prompts:
            torch.manual_seed(0)
            texts = sample_texts(policy, tokenizer, q, latent, len(TONES), samples,
                                 {"temperature": temperature, "max_new_tokens": 40}, "cpu")
            attrs.append(attribute_table([(q, t) for t in texts]).view(len(TONES), samples, 3))
        attrs = torch.stack(attrs, 1)  # (tones, Q, S, 3)
        tone = attrs[..., 1].flatten(1)
        reward = rewards_from_attributes(attrs, prefs[:, None, None, :]).mean((1, 2))
        out[i] = torch.stack([tone.mean(1), tone.std(1), reward], 1)
    return out


def main(paths):
    if not paths or any(p.startswith("-") for p in paths):
        raise ConfigError("give known-preference policy runs, e.g. runs/steer_world_known_s{0,1,2}")
    policies, _, _, tokenizer, _ = load_policies(paths, "cpu")
    others = [name for name, (_, role) in policies.items() if role != "known"]
    if others:
        raise ConfigError(f"{', '.join(others)}: not a known-preference run (train.condition_on: preferences)")
    prompts = eval_prompts("val", 4)
    best = torch.tensor([[world.best_reward((l, t)) for t in TONES] for l in LENGTHS])
    print(f"Known-preference runs {', '.join(policies)}, validation prompts {prompts}, 16 responses per prompt "
          f"and preference; mean over runs. Cell: mean tone generated (sd over responses) / gold reward "
          f"(best possible {best.min():.2f}-{best.max():.2f}).\n")
    for temperature in (0.1, 1.0):
        runs = torch.stack([sweep(p, tokenizer, temperature, prompts) for p, _ in policies.values()])
        result = runs.mean(0)
        print(f"Temperature {temperature:g}:\n\n| length \\ tone asked | " + " | ".join(f"{t:+.2f}" for t in TONES)
              + " |\n|---|" + "---|" * len(TONES))
        for i, length in enumerate(LENGTHS):
            print(f"| {length:g} | " + " | ".join(f"{m:+.2f} ({s:.2f}) / {r:.2f}" for m, s, r in result[i].tolist()) + " |")
        print(f"\nmean gold reward over the sweep: {result[..., 2].mean():.2f} (best {best.mean():.2f})\n")
        print(f"Per run at length {LENGTHS[1]:g} (temperature {temperature:g}), mean tone written / gold reward:\n\n"
              "| run | " + " | ".join(f"{t:+.2f}" for t in TONES) + " |\n|---|" + "---|" * len(TONES))
        for name, run in zip(policies, runs):
            print(f"| {name} | " + " | ".join(f"{m:+.2f} / {r:.2f}" for m, _, r in run[1].tolist()) + " |")
        print()


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    run_script(main)
