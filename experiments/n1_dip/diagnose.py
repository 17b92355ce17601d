"""
Why the policies dip at n = 1, decomposed into the reward's terms. A known-preference
run is conditioned on the Bayes posterior mean of a test user's n random answered pairs
(evaluate.py's 'posterior' rows, the few-shot ceiling); an NP-DPO run on its encoder's
latent of the same pairs (no target: the target columns then show the posterior mean's
terms, what a policy that produced it exactly would lose).

    PYTHONPATH=. python experiments/n1_dip/diagnose.py runs/steer_world_known_s0 [TEMPERATURE]

Per n: the mean over users and prompts of each loss term against the user's true
preference (length, tone; world.LENGTH_WEIGHT * (a - w)^2, world.TONE_WEIGHT * ...), the
same terms had the policy produced exactly the posterior mean (the target it was given),
its tracking error (generated attribute against that target), relevance, and the
normalised score. The contexts are drawn as evaluate.py draws them (seed 0).
"""

import sys

import torch

import steer_eval
import world
from evaluate import DEFAULTS
from policy_eval import load_policies
from steer_eval import BAYES_GRID, TestUsers, attribute_table, eval_prompts, reference_and_best, sample_texts, user_scores
from text import read_text_pairs


def main(run, temperature=0.1, sizes=(0, 1, 3, 10)):
    torch.set_grad_enabled(False)
    policies, data, _, tokenizer, run_config = load_policies([run], torch.device("cpu"))
    policy, role = next(iter(policies.values()))
    assert role in ("known", "np_dpo"), f"{run} is neither a known-preference nor an NP-DPO run"
    users = TestUsers(data, read_text_pairs(run_config["data"]["pairs"]), "test")
    p = dict(DEFAULTS["policy_eval"], temperature=temperature)
    prompts = eval_prompts("test", p["prompts"])
    torch.manual_seed(0)
    ref_attrs, reference, best = reference_and_best(policy, users, tokenizer, prompts, p, "cpu")
    gen = torch.Generator().manual_seed(0)
    w = users.preferences  # (U, 2)
    print(f"{run}, T = {temperature}: {len(users.labels)} users x {len(prompts)} prompts x {p['samples']} samples")
    print("| n | length loss | tone loss | length loss at target | tone loss at target | length tracking "
          "| tone tracking | tone sign agrees with target | relevance | normalised |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        attrs, means = [], []
        for q in prompts:
            drawn = [users.context(u, n, gen, exclude_prompt=q) for u in range(len(users.labels))]
            m = users.posterior_weights([r for _, r in drawn]) @ BAYES_GRID.double()  # (U, 2)
            latent = (torch.tensor([world.preference_latent(x) for x in m.tolist()], dtype=torch.float32)
                      if role == "known" else policy.infer_latent(torch.stack([c for c, _ in drawn])))
            texts = sample_texts(policy, tokenizer, q, latent, len(users.labels), p["samples"], p, "cpu")
            attrs.append(attribute_table([(q, t) for t in texts]).view(len(users.labels), p["samples"], 3))
            means.append(m)
        a, m = torch.stack(attrs, 1), torch.stack(means, 1)  # (U, Q, S, 3), (U, Q, 2)
        length, tone = a[..., 0], a[..., 1]
        row = [world.LENGTH_WEIGHT * ((length - w[:, None, None, 0]) ** 2).mean(),
               world.TONE_WEIGHT * ((tone - w[:, None, None, 1]) ** 2).mean(),
               world.LENGTH_WEIGHT * ((m[..., 0] - w[:, None, 0]) ** 2).mean(),
               world.TONE_WEIGHT * ((m[..., 1] - w[:, None, 1]) ** 2).mean(),
               ((length - m[..., None, 0]) ** 2).mean().sqrt(), ((tone - m[..., None, 1]) ** 2).mean().sqrt(),
               ((tone.sign() == m[..., None, 1].sign()).double()).mean(),
               a[..., 2].mean(), user_scores(a, users, reference, best)["normalised"].mean()]
        print(f"| {n} | " + " | ".join(f"{float(x):.3f}" for x in row) + " |")


if __name__ == "__main__":
    main(sys.argv[1], *(float(x) for x in sys.argv[2:3]))
