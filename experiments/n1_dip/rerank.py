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
Also (experiments/rerank_rm/PLAN.md, addenda 5 and 6): the NP-BTL under a particle posterior over its 2,048
training users' latents weighted by its probability of the n answers, by the posterior-expected reward and at
the posterior-mean latent (evaluate.py --rerank_latent=particles); NP-DPO's implicit reward
log pi(y | x, z) - log pi_ref(y | x); and the posterior-mean reward plus the implicit one (or half of it), each
standardised over a user's N draws. With several reward runs, comma-separated (addendum 8): each other run's
particle-mean column, and their ensemble (the mean of every run's standardised particle-mean reward).
All normalised against the reference sampled at T = 0.1 (the headline's scale).

    PYTHONPATH=. python experiments/n1_dip/rerank.py runs/steer_world_np_dpo_s0 runs/steer_world_reward [N] [TEMPERATURE] [SPLIT] [PROBE]
"""

import sys

import torch

import world
from evaluate import DEFAULTS
from policy_eval import load_policies
from data import load_pairs
from particles import particle_weights, posterior_latent, target_probs, training_latents
from reward import load_reward_model, run_data_path
from steer_eval import (BAYES_GRID, TestUsers, attribute_table, eval_prompts, normalised, reference_and_best,
                        rewards_from_attributes, sample_texts)
from policy import sequence_logprob
from text import embed_pairs, load_embedder, prompt_response_batch, read_text_pairs, tokenize_prompt, tokenize_response


def implicit_rewards(policy, tokenizer, prompt, texts, latent, rows=64):
    """DPO's implicit reward log pi(y | x, z) - log pi_ref(y | x) of each text (count * k,), row r * k + j under
    latent row r (count, L), the texts tokenized as the policy reads a response."""
    k, pad = len(texts) // len(latent), tokenizer.pad_token_id or 0
    z, prompt_ids, out = latent.repeat_interleave(k, 0), tokenize_prompt(tokenizer, prompt), []
    for i in range(0, len(texts), rows):
        b = prompt_response_batch([prompt_ids] * len(texts[i:i + rows]),
                                  [tokenize_response(tokenizer, t) for t in texts[i:i + rows]], pad)
        mine = sequence_logprob(policy(b["input_ids"], b["attention_mask"], latent=z[i:i + rows]), b["input_ids"],
                                b["response_mask"])
        with policy.reference_mode():
            ref = sequence_logprob(policy(b["input_ids"], b["attention_mask"]), b["input_ids"], b["response_mask"])
        out.append(mine - ref)
    return torch.cat(out)


def standardised(x):
    """Each user's scores (U, N) centred and scaled over their N draws."""
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-6)


def main(run, reward_run, N=8, temperature=1.0, split="test", probe=None, sizes=(0, 1, 3, 5, 10)):
    torch.set_grad_enabled(False)
    policies, data, _, tokenizer, run_config = load_policies([run], torch.device("cpu"))
    policy, role = next(iter(policies.values()))
    members = []  # (NP-BTL, its training latents (S, L)) of each reward run given, comma-separated
    for path in reward_run.split(","):
        model, model_config = load_reward_model(path, data.dim)
        members.append((model, training_latents(model, load_pairs(run_data_path(path)), model_config["train"]["max_context"])))
    (rm, latents), others = members[0], members[1:]
    extra = tuple(f"member{i}" for i in range(1, len(members))) + (("ensemble",) if len(members) > 1 else ())
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
          "posterior | by the gold reward at the posterior mean | best of N by NP-BTL, no context | by NP-BTL's particle posterior, expected reward | at its posterior-mean latent | by NP-DPO's implicit reward | particle-mean + implicit, standardised | particle-mean + implicit / 2 |" + "".join(f" {name} |" for name in extra) + (" best of N by the probe, true preference | by the probe, posterior mean |" if probe else "") +
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra) + ("---|---|" if probe else ""))
    gen, means = torch.Generator().manual_seed(0), []
    for n in sizes:
        out = {k: [] for k in ("cold", "hot", "rerank", "oracle", "bayes", "bayes_mean", "blind", "particles", "particle_mean", "implicit", "both", "both_half") + extra + (("probe", "probe_mean") if probe else ())}
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
            post = (particle_weights(torch.stack([target_probs(rm, c, latents) for c in context]),  # (U, S)
                                     torch.ones(U, n, dtype=torch.bool)) if n else torch.full((U, len(latents)), 1 / len(latents)))
            out["particles"].append(pick(torch.stack([post[u] @ rm.rewards(feats[u][None], latents)
                                                      for u in range(U)])))
            particle_scores = rm.rewards(feats, post @ latents)
            out["particle_mean"].append(pick(particle_scores))
            implicit = implicit_rewards(policy, tokenizer, q, texts, z_policy).view(U, N)
            out["implicit"].append(pick(implicit))
            out["both"].append(pick(standardised(particle_scores) + standardised(implicit)))
            out["both_half"].append(pick(standardised(particle_scores) + 0.5 * standardised(implicit)))
            if others:  # addendum 8: the other runs' particle-mean rewards, and the mean of all runs' standardised
                member_scores = [particle_scores] + [model.rewards(feats, posterior_latent(model, context, z))
                                                     for model, z in others]
                for i, x in enumerate(member_scores[1:], 1):
                    out[f"member{i}"].append(pick(x))
                out["ensemble"].append(pick(torch.stack([standardised(x) for x in member_scores]).mean(0)))
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
