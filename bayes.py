"""
The Bayes-optimal reference: what a predictor that knows the data's generator (data.py
meta) and sees the same context would get. Accuracy figures stand beside it. The
active-question version (the same posterior choosing questions) is queries.BayesBelief.

For K user types: the exact posterior over types (uniform prior, as labels are
balanced), then the posterior predictive of each target. For a continuous linear
population: importance sampling from the prior over users.
"""

import math

import torch
import torch.nn.functional as F

from data import true_rewards


def type_likelihood(meta, pairs):
    """P(first option chosen | user type k) for (chosen, rejected) pairs (..., 2, D) under
    the generator in `meta`: (..., K), or None when the generator is not known."""
    rewards = true_rewards(meta, pairs)  # (..., 2, K)
    if rewards is None:
        return None
    margin = rewards[..., 0, :] - rewards[..., 1, :]
    if meta.get("temperature", 0.0) == 0:
        return (margin > 0).double() + 0.5 * (margin == 0).double()
    return torch.sigmoid(margin.double() / meta["temperature"])


def bayes_log_prob_chosen(meta, batch, num_samples=16000, seed=0):
    """The Bayes-optimal predictor for an episode batch: the posterior over the
    generator's user types given the context (uniform prior, as labels are balanced),
    then the posterior predictive for each target. Returns (B, T) log P(chosen), or None.
    A continuous population has no finite set of types: population_log_prob_chosen."""
    if meta.get("generator") == "linear_population":
        return population_log_prob_chosen(meta, batch, num_samples, seed=seed)[0]
    context_lik = type_likelihood(meta, batch["context"])  # (B, n, K)
    if context_lik is None:
        return None
    context_lik = torch.where(batch["context_mask"][..., None], context_lik, torch.ones_like(context_lik))
    posterior = context_lik.prod(1)  # (B, K), unnormalised
    posterior = posterior / posterior.sum(-1, keepdim=True)
    target_lik = type_likelihood(meta, batch["targets"])  # (B, T, K)
    return (target_lik * posterior[:, None]).sum(-1).log()


def sphere_samples(num, dim, gen):
    """Points uniform on the unit sphere: the linear population's prior over users' w."""
    w = torch.randn(num, dim, generator=gen, dtype=torch.float64)
    return w / w.norm(dim=-1, keepdim=True)


def pair_log_lik(pairs, weights, temperature):
    """log P(first option chosen) of (chosen, rejected) pairs (B, m, 2, D) for each of S
    linear users (S, D): (B, m, S). Temperature 0: 0 or -inf (a tie: log 0.5)."""
    margin = (pairs[..., 0, :] - pairs[..., 1, :]).to(weights.dtype) @ weights.T  # (B, m, S)
    if temperature == 0:
        return torch.where(margin > 0, 0.0, torch.where(margin == 0, math.log(0.5), -math.inf)).to(margin.dtype)
    return F.logsigmoid(margin / temperature)


def population_log_prob_chosen(meta, batch, num_samples=16000, groups=4, seed=0, chunk=2000):
    """Bayes-optimal posterior predictive for a continuous linear population, by importance
    sampling: w from the prior (uniform on the sphere), weighted by the context likelihood,
    then E_w[P(target | w)]. The samples are split into `groups` independent sets.
    Samples come in antithetic pairs (w, -w), as the prior is symmetric. By that symmetry
    an episode with no context has the predictive 1/2 for every pair: it is set exactly, so
    the reference ties there (float error would otherwise pick a side at random).

    Returns (log P(chosen) (B, T) from all samples, per-group log P(chosen) (groups, B, T)):
    the spread of the groups' accuracies estimates the Monte Carlo error."""
    gen = torch.Generator().manual_seed(seed)
    dim, temperature = batch["context"].shape[-1], meta["temperature"]
    B, T = batch["targets"].shape[:2]
    per_group = []
    for _ in range(groups):
        top = torch.full((B, 1), -math.inf, dtype=torch.float64)  # running max of the log weights
        total, weighted = torch.zeros(B, 1, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
        for start in range(0, num_samples // groups, chunk):
            half = sphere_samples(max(1, min(chunk, num_samples // groups - start) // 2), dim, gen)
            w = torch.cat([half, -half])  # (S, D) antithetic pairs
            context = pair_log_lik(batch["context"], w, temperature)  # (B, n, S)
            log_w = torch.where(batch["context_mask"][..., None], context, 0.0).sum(1)  # (B, S)
            new_top = torch.maximum(top, log_w.max(-1, keepdim=True).values)
            rescale = torch.exp(top - new_top).nan_to_num(0.0)  # -inf - -inf: nothing accumulated yet
            weights = torch.exp(log_w - new_top)  # (B, S)
            target_prob = pair_log_lik(batch["targets"], w.float(), temperature).exp()  # (B, T, S)
            total = total * rescale + weights.sum(-1, keepdim=True)
            weighted = weighted * rescale + torch.einsum("bs,bts->bt", weights.float(), target_prob).double()
            top = new_top
        # no sample agreed with every context choice (deterministic users, long contexts): say 0.5
        per_group.append(torch.where(total > 0, weighted / total, 0.5).log())  # (B, T)
    groups_log_prob = torch.stack(per_group)  # (groups, B, T)
    groups_log_prob[:, ~batch["context_mask"].any(1)] = math.log(0.5)
    combined = groups_log_prob.logsumexp(0) - math.log(groups)  # equal-size groups: the mean of predictives
    return combined.float(), groups_log_prob.float()
