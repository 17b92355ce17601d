"""
The known-preference policy's response to the tone it is given: for a sweep of target
tones at fixed target lengths, the mean and sd over samples of the generated tone and
the mean length (test prompts, 8 samples each, seed 0).

    PYTHONPATH=. python experiments/n1_dip/tone_response.py runs/steer_world_known_s0 0.1 [LENGTH ...]
"""

import sys

import torch

import world
from evaluate import DEFAULTS
from policy_eval import load_policies
from steer_eval import attribute_table, eval_prompts, sample_texts


def main(run, temperature, lengths=(2.0, 3.5, 5.0), samples=8):
    torch.set_grad_enabled(False)
    policies, _, _, tokenizer, _ = load_policies([run], torch.device("cpu"))
    policy, role = next(iter(policies.values()))
    assert role == "known", f"{run} is not a known-preference run"
    p = dict(DEFAULTS["policy_eval"], temperature=temperature)
    prompts = eval_prompts("test", p["prompts"])
    tones = torch.linspace(-1, 1, 21)
    print(f"{run}, T = {temperature}: {len(prompts)} test prompts x {samples} samples per target")
    for length in lengths:
        latent = torch.tensor([world.preference_latent([length, t]) for t in tones.tolist()], dtype=torch.float32)
        torch.manual_seed(0)
        a = torch.stack([attribute_table([(q, x) for x in sample_texts(policy, tokenizer, q, latent, len(tones), samples,
                                                                       p, "cpu")]).view(len(tones), samples, 3)
                         for q in prompts], 1)  # (tones, Q, S, 3)
        print(f"\ntarget length {length}\n\n| target tone | generated tone, mean (sd) | length |\n|---|---|---|")
        for i, t in enumerate(tones.tolist()):
            g = a[i, ..., 1].flatten()
            print(f"| {t:+.1f} | {g.mean():+.2f} ({g.std():.2f}) | {a[i, ..., 0].mean():.2f} |")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), *([tuple(float(x) for x in sys.argv[3:])] if sys.argv[3:] else []))
