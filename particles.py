"""
Particles: a trained NP-BTL's rewards at a fixed set of latents, weighted by Bayes' rule.

The latents are the encoder's latents of the training users (`training_latents`), or a
weighted k-means summary of them (`summarise`); `posterior_summary` summarises a posterior
over them anew (queries.AdaptiveBelief). `particle_predictor` is evaluate.py --particles.
`target_probs` scores pairs under many latents at once, for every belief in queries.py.
"""

from typing import NamedTuple

import torch


def target_probs(model, targets, z):
    """P(first option chosen) of one episode's targets (T, 2, D) under each of its latents z (K, L):
    (K, T). The options are shared by the latents (no copies); on a CPU the latents go in tiles of
    about 8,192 latent-option rows, whose activations stay in cache (twice as fast as one forward)."""
    step = max(1, 8192 // (2 * len(targets))) if z.device.type == "cpu" else len(z)
    r = torch.cat([model.rewards(targets[None], z[i:i + step]) for i in range(0, len(z), step)])
    return torch.sigmoid(r[..., 0] - r[..., 1])


def particle_weights(lik, mask, log_prior=None):
    """Bayes' rule over particles: (B, S) weights from lik (B, S, n), each particle's probability of
    the user's answers, mask (B, n), True where an answer is real, and the particles' log prior
    weights (S,) (None: equal)."""
    log_w = torch.where(mask[:, None], lik.clamp_min(1e-12).log(), 0.0).sum(-1)
    return torch.softmax(log_w if log_prior is None else log_w + log_prior, -1)


def mixture(weights, probs, tie=1e-6):
    """sum_s w_s P_s (B, P) from weights (B, S) and probs (B, S, P), exactly 1/2 within `tie` of it.
    At a tie of the posterior (two user types left who disagree, each particle certain) the sum is
    1/2 only up to rounding, and came out just under it in both orientations of a pair: scored
    wrong for every user (three types, 512 particles: -4.4 points at n = 1)."""
    mixed = torch.einsum("bs,bsp->bp", weights, probs) / weights.sum(-1, keepdim=True)
    return torch.where((mixed - 0.5).abs() < tie, 0.5, mixed)


def posterior_latent(model, contexts, latents, log_prior=None):
    """The posterior mean latent (B, L) of each context (B, n, 2, D) (chosen first): the latents (S, L)
    weighted by the model's probability of the n answers (particle_weights); their prior mean at n = 0.
    evaluate.py --rerank_latent=particles: where few answers leave many users possible, it averages over
    them instead of committing to the encoder's one latent (RESULTS "What limits the reranker")."""
    B, n = contexts.shape[:2]
    if n == 0:
        lik, mask = contexts.new_ones(B, len(latents), 0), torch.ones(B, 0, dtype=torch.bool, device=contexts.device)
    else:
        lik, mask = torch.stack([target_probs(model, c, latents) for c in contexts]), contexts.new_ones(B, n).bool()
    return particle_weights(lik, mask, log_prior) @ latents


class Particles(NamedTuple):
    """A fixed set of latents (S, L) and their log prior weights (S,) (None: equal)."""
    latents: torch.Tensor
    log_prior: torch.Tensor | None = None


@torch.no_grad()
def training_latents(model, data, context_size, num=2048, seed=0):
    """`num` latents of the training users: the encoder's (the mean of q for a stochastic NP-BTL),
    round-robin over users, each read from `context_size` of the user's answered training pairs
    (the run's train.max_context, the most it learnt to read)."""
    from data import EpisodeSampler

    sampler = EpisodeSampler(data, "train", 0, context_size, seed=seed, size_keys="the run's train.max_context")
    rows = torch.arange(num) % len(sampler.labels)
    batch = sampler.sample(num, num_context=context_size, label_rows=rows)
    device = next(model.parameters()).device
    return model.infer_latent(batch["context"].to(device), batch["context_mask"].to(device))


def lloyd(x, w, centres, iters):
    """`iters` weighted k-means steps of centres (B, K, L) over the points x (S, L), weighted w (B, S):
    the centres, and the weight of the points nearest to each (B, K)."""
    (B, S), L = w.shape, x.shape[1]
    for step in range(iters + 1):
        nearest = torch.cdist(x.expand(B, S, L), centres).argmin(-1)  # (B, S)
        mass = torch.zeros(B, centres.shape[1], dtype=w.dtype, device=w.device).scatter_add_(1, nearest, w)
        if step == iters:
            return centres, mass
        sums = torch.zeros_like(centres).scatter_add_(1, nearest[..., None].expand(B, S, L), w[..., None] * x)
        centres = torch.where(mass[..., None] > 0, sums / mass.clamp_min(1e-30)[..., None], centres)


def summarise(latents, num, iters=30, seed=0):
    """Particles: `num` weighted centroids of the latents (S, L) by k-means (k-means++ start, then
    `iters` Lloyd steps), each weighted by the share of latents nearest to it; all the latents,
    equally weighted, where num >= S. A quadrature of the latents' empirical distribution: every
    particle costs a reward evaluation per pair, and on K-type tasks 16 centroids of 2,048
    latents predict as the 2,048 do (RESULTS.md)."""
    if num >= len(latents):
        return Particles(latents)
    gen = torch.Generator().manual_seed(seed)
    x = latents.cpu()
    centres = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(num - 1):  # k-means++: the next centre drawn by squared distance to the nearest
        d2 = torch.cdist(x, centres).min(1).values.square()
        pick = torch.multinomial(d2, 1, generator=gen) if d2.sum() > 0 else torch.randint(len(x), (1,), generator=gen)
        centres = torch.cat([centres, x[pick]])
    centres, mass = lloyd(x, torch.full((1, len(x)), 1 / len(x)), centres[None], iters)
    kept = mass[0] > 0
    return Particles(centres[0, kept].to(latents.device), mass[0, kept].log().to(latents.device))


def posterior_summary(x, w, num, gen, iters=5):
    """`num` weighted centroids (B, num, L) and their weights (B, num) of the points x (S, L) under
    each row of weights w (B, S): k-means++ drawn by weight x squared distance, then Lloyd steps."""
    if num >= x.shape[0]:
        return x.expand(len(w), *x.shape), w
    pick = torch.multinomial(w.cpu(), 1, generator=gen)[:, 0].to(x.device)
    centres, d2 = [x[pick]], (x - x[pick][:, None]).square().sum(-1)  # (B, L), (B, S)
    for _ in range(num - 1):
        p = w * d2
        p = torch.where(p.sum(1, keepdim=True) > 0, p, w)  # every weighted point already a centre
        pick = torch.multinomial(p.cpu(), 1, generator=gen)[:, 0].to(x.device)
        centres.append(x[pick])
        d2 = torch.minimum(d2, (x - x[pick][:, None]).square().sum(-1))
    return lloyd(x, w, torch.stack(centres, 1), iters)


def training_particles(model, data, context_size, num, latents=2048, seed=0):
    """`num` particles summarising `latents` training users' latents (training_latents, summarise)."""
    return summarise(training_latents(model, data, context_size, latents, seed), num, seed=seed)


@torch.no_grad()
def particle_predictor(model, data, split, particles, rows_per_call=1024):
    """The posterior predictive under ParticleBelief's posterior, for evaluate.py's episodes of `split`:
    batch -> log P(chosen) (B, T) = log sum_s w_s P(chosen | particle s), the weights from the context.
    Every pair of the split is scored under every particle once; an episode's context and targets
    are then looked up by their rows (the batch's pair_idx and flipped)."""
    device = particles.latents.device
    rows = torch.nonzero(torch.from_numpy(data.split == split)).squeeze(1)
    position = torch.full((len(data.pairs),), -1, dtype=torch.long)
    position[rows] = torch.arange(len(rows))
    first = torch.cat([target_probs(model, data.pairs[rows[i:i + rows_per_call]].to(device), particles.latents)
                       for i in range(0, len(rows), rows_per_call)], 1)  # (S, N): P(first option chosen)
    position = position.to(device)

    def log_prob_chosen(batch):
        n, flipped = batch["context"].shape[1], batch["flipped"]
        p_first = first[:, position[batch["pair_idx"]]].transpose(0, 1)  # (B, S, n + T)
        p_context = torch.where(flipped[:, None, :n], 1 - p_first[..., :n], p_first[..., :n])  # P(the answer)
        weights = particle_weights(p_context, batch["context_mask"], particles.log_prior)  # (B, S)
        mixed = mixture(weights, p_first[..., n:])  # P(first stored option): both orientations sum to 1
        return torch.where(flipped[:, n:], 1 - mixed, mixed).clamp_min(1e-12).log()

    return log_prob_chosen
