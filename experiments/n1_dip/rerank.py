"""
Feasibility check (not a committed method): best-of-N reranking of an NP-DPO policy's
samples by the NP-BTL reward model (the question selector), both reading the same
context, the samples drawn at TEMPERATURE (default 1). Beside it: the policy at T = 0.1
(the headline's decoding), at TEMPERATURE with no reranking, an oracle that picks the best of the same N by the user's gold reward,
a user-blind reranker (the NP-BTL with no context, its prior latent, for every n: what reranking gains without
reading the user), the best of the same N by the gold reward at the Bayes posterior mean preference, and the Bayes reranker: the one of the same N with the highest posterior-expected normalised gold reward given the same
context pairs (the posterior over the world's preference grid; steer_eval.bayes_limit's decision, restricted to the N
draws). No reranker reading those pairs picks better among these draws in expectation: it bounds what a better reward
model could add to reranking.
With PROBE (experiments/rerank_rm/known_probe.py's saved MLP), one more column: the best of the same N by that
MLP's reward at the user's TRUE preference on the same features (no inference): what a reward model on these
features could pick if it knew the user; and the same MLP at the Bayes posterior mean preference of the n pairs
(inference as good as it gets, scored on the features).
All normalised against the reference sampled at T = 0.1 (the headline's scale).

    PYTHONPATH=. python experiments/n1_dip/rerank.py runs/steer_world_np_dpo_s0 runs/steer_world_reward [N] [TEMPERATURE] [SPLIT] [PROBE]
"""

import sys

import torch

import world
from evaluate import DEFAULTS
from policy_eval import load_policies
from reward import load_reward_model
from steer_eval import (BAYES_GRID, TestUsers, attribute_table, eval_prompts, normalised, reference_and_best,
                        rewards_from_attributes, sample_texts)
from text import embed_pairs, load_embedder, read_text_pairs


def main(run, reward_run, N=8, temperature=1.0, split="test", probe=None, sizes=(0, 1, 3, 5, 10)):
    torch.set_grad_enabled(False)
    policies, data, _, tokenizer, run_config = load_policies([run], torch.device("cpu"))
    policy, role = next(iter(policies.values()))
    rm, _ = load_reward_model(reward_run, data.dim)
    emb_tok, embedder, pooling = load_embedder(run_config["policy"]["base"], "cpu")
    users = TestUsers(data, read_text_pairs(run_config["data"]["pairs"]), split)
    cold = dict(DEFAULTS["policy_eval"], temperature=0.1)
    hot = dict(cold, temperature=temperature)
    prompts = eval_prompts(split, cold["prompts"])
    if probe:  # built before the seed: its initialisation draws nothing the samples use
        from experiments.rerank_rm.known_probe import probe_net
        state = torch.load(probe, weights_only=True)
        probe = probe_net(state["0.weight"].shape[1] - 2)
        probe.load_state_dict(state)
    torch.manual_seed(0)
    ref_attrs, reference, best = reference_and_best(policy, users, tokenizer, prompts, cold, "cpu")
    grid = BAYES_GRID.double()  # (G, 2) the Bayes posterior's preference grid
    cands = torch.tensor([[a["length"], a["tone"], a["relevance"]] for a in world.candidate_responses()],
                         dtype=torch.float64)
    grid_ref = rewards_from_attributes(ref_attrs[None], grid[:, None, None, :]).mean((1, 2))  # (G,)
    grid_best = rewards_from_attributes(cands[None], grid[:, None, :]).max(1).values  # (G,)
    U, w = len(users.labels), users.preferences

    print(f"{run} + {reward_run}, split {split}: {U} users x {len(prompts)} prompts, best of {N} at T = {temperature:g}")
    print(f"| n | T = 0.1 | T = {temperature:g} | best of N by NP-BTL | best of N by gold (oracle) | best of N by the Bayes "
          "posterior | by the gold reward at the posterior mean | best of N by NP-BTL, no context |" + (" best of N by the probe, true preference | by the probe, posterior mean |" if probe else "") +
          "\n|---|---|---|---|---|---|---|---|" + ("---|---|" if probe else ""))
    gen, means = torch.Generator().manual_seed(0), []
    for n in sizes:
        out = {k: [] for k in ("cold", "hot", "rerank", "oracle", "bayes", "bayes_mean", "blind") + (("probe", "probe_mean") if probe else ())}
        for q in prompts:
            drawn = [users.context(u, n, gen, exclude_prompt=q) for u in range(U)]
            context = torch.stack([c for c, _ in drawn])
            z_policy, z_reward = policy.infer_latent(context), rm.infer_latent(context, None)
            cold_a = attribute_table([(q, t) for t in sample_texts(policy, tokenizer, q, z_policy, U, cold["samples"],
                                                                  cold, "cpu")]).view(U, -1, 3)
            texts = sample_texts(policy, tokenizer, q, z_policy, U, N, hot, "cpu")
            hot_a = attribute_table([(q, t) for t in texts]).view(U, N, 3)
            feats = embed_pairs([{"prompt": q, "response_a": t, "response_b": t} for t in texts], emb_tok, embedder,
                                pooling)[:, 0].view(U, N, -1)
            scores = rm.rewards(feats, z_reward)  # (U, N)
            gold = rewards_from_attributes(hot_a, w[:, None, :])  # (U, N)
            pick = lambda s: hot_a.gather(1, s.argmax(1)[:, None, None].expand(-1, 1, 3))
            out["cold"].append(cold_a)
            out["hot"].append(hot_a)
            out["rerank"].append(pick(scores))
            out["oracle"].append(pick(gold))
            weights = users.posterior_weights([rows for _, rows in drawn])  # (U, G)
            grid_gold = rewards_from_attributes(hot_a[:, None], grid[None, :, None, :])  # (U, G, N)
            grid_norm = (grid_gold - grid_ref[:, None]) / (grid_best - grid_ref)[:, None]
            out["bayes"].append(pick(torch.einsum("ug,ugn->un", weights, grid_norm)))
            out["bayes_mean"].append(pick(rewards_from_attributes(hot_a, (weights @ grid)[:, None, :])))
            out["blind"].append(pick(rm.rewards(feats, rm.infer_latent(context[:, :0], None))))
            if probe:
                pref = w[:, None, :].float().expand(-1, N, -1)
                out["probe"].append(pick(probe(torch.cat([feats, pref], -1)).squeeze(-1)))
                pref = (weights @ grid).float()[:, None, :].expand(-1, N, -1)
                out["probe_mean"].append(pick(probe(torch.cat([feats, pref], -1)).squeeze(-1)))
        row = []
        for k, v in out.items():
            a = torch.stack(v, 1)  # (U, Q, S, 3)
            reward = rewards_from_attributes(a, w[:, None, None, :]).mean((1, 2))
            row.append(normalised(reward, reference, best).mean().item())
        print(f"| {n} | " + " | ".join(f"{100 * x:.1f}" for x in row) + " |", flush=True)
        means.append(row)
    means = torch.tensor(means).mean(0)
    print("| mean over n | " + " | ".join(f"{100 * x:.1f}" for x in means.tolist()) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(x) for x in sys.argv[3:4]), *(float(x) for x in sys.argv[4:5]), *sys.argv[5:7])
