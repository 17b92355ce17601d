"""
Which question to ask a new user next: choosing context pairs actively.

A question is a candidate pair (a, b); the user's answer says which they prefer. After
each answer the model's belief about the user's latent z is updated, and the next
question is chosen greedily from the candidates not yet asked:

- random:      uniformly (today's context: whatever pairs the user happens to answer);
- uncertainty: the largest predictive entropy H[P(a > b | context)];
- infogain:    the largest expected information gain about the user's answers on a set
               of unlabelled target pairs t (EPIG: mean over t of the mutual information
               I(y_ab; y_t | context), both answers drawn from the current posterior).

How a model gives that mutual information (`ModelBelief`): it looks ahead. For each
candidate and each of its two answers, the encoder reads the context plus that answer,
and the model predicts the targets (`ContextEncoder.extended`: the context's pairs are embedded
once and each answer is added to their summary); the gain is the mutual information of the joint
P(y_ab | context) P(y_t | context + y_ab), both the model's own predictions: how much
its predictions would move, weighted by how likely each answer is. A deterministic
NP-BTL predicts at its z; a stochastic one by the Monte Carlo posterior predictive over
`samples` draws of q(z | ...). Draws cost: a stochastic model first looks ahead at the
mean of q for every candidate, and only the `screen` best are looked at again over
draws (on three types, 16 kept of 90 and 32 draws pick better first questions than 8
draws for all: RESULTS.md). Approximations: the amortised encoder stands in for Bayes' rule,
`samples` draws for the integral over z, and the screen for the draws' ranking of
every candidate. The BALD-style alternative,
EPIG from draws of q(z | context) alone (P(y_ab, y_t) = mean_s P(y_ab | z_s) P(y_t | z_s);
`lookahead=False`), asks worse questions on the three-type task (76.35 % after one
question against 81.97 % with the look-ahead): q(z | context) is trained to predict,
not to be a calibrated posterior.
- particles (`ParticleBelief`, evaluate.py --query.belief=particles): the encoder's latents of
  the training users, weighted by the model's likelihood of the answers; EPIG under them is
  exact for that posterior. On a continuous population it asks better questions than the
  look-ahead (RESULTS.md), but a user's first question costs every candidate under every particle;
  `particles.summarise` (k-means) keeps fewer, weighted particles: on K-type tasks 32 do as 2,048 do.
- adaptive (`AdaptiveBelief`, --query.belief=adaptive): at every question, the posterior over
  all the training latents, summarised by weighted k-means into a few particles that follow it:
  on the population as good as all 2,048 latents, and as fast as the look-ahead.
- the Bayes reference (data.py's generators): the exact posterior over user types, or
  importance-weighted draws from the population prior (`bayes_samples`).

A BTL or DPL ignores the context, so no question changes its predictions.

The question selection never sees an answer: candidates are shown in a random order of
their two options, and `answers` (the user's) is read only after a candidate is picked.

    python queries.py      # asks the paper task's two user types five questions each
"""

import functools
import math

import torch

from bayes import pair_log_lik, sphere_samples, type_likelihood
from data import DataError, choice_correct, chosen_first
from particles import mixture, particle_weights, posterior_summary, target_probs, training_particles
from reward import load_reward_model

STRATEGIES = ("random", "uncertainty", "infogain")


def entropy(p):
    """Binary entropy in nats, 0 at p = 0 or 1."""
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))


def mutual_information(p11, p_a, p_b):
    """I(A; B) of two binary answers from P(A = 1, B = 1) and the marginals (broadcast)."""
    cells = torch.stack([p11, p_a - p11, p_b - p11, 1 - p_a - p_b + p11]).clamp(min=0)
    return entropy(p_a) + entropy(p_b) + torch.xlogy(cells, cells).sum(0)


def epig(p_cand, p_targ, weights):
    """Expected information gain about the targets' answers from posterior draws.
    p_cand (B, S, C), p_targ (B, S, T): P(first option chosen) under each of S draws of
    the user; weights (B, S), summing to 1. Returns (B, C): mean over targets of I(y_c; y_t)."""
    p_c = torch.einsum("bs,bsc->bc", weights, p_cand)
    p_t = torch.einsum("bs,bst->bt", weights, p_targ)
    p11 = torch.einsum("bs,bsc,bst->bct", weights, p_cand, p_targ)
    return mutual_information(p11, p_c[..., None], p_t[:, None]).mean(-1)


# -----------------------------------------------------------------------------
# beliefs about a user: P(first option chosen) for any pairs, given the context


class ModelBelief:
    """A trained reward model's belief (reward.py). `samples`: draws of z ~ q(z | ...) per look-ahead
    prediction of a stochastic NP-BTL; `screen`: such a model first looks ahead at the mean of q for
    every candidate and keeps this many for the look-ahead over draws (0: every candidate over draws);
    `lookahead`: infogain by looking ahead (False: EPIG from the draws); `chunk`: episodes per
    look-ahead forward (memory)."""

    def __init__(self, model, samples=32, screen=16, chunk=None, lookahead=True):
        self.model, self.chunk, self.lookahead_on = model, chunk, lookahead
        self.samples = samples if getattr(model, "stochastic", False) else 1
        self.screen = screen
        self.reads_context = hasattr(model, "encoder")

    def answer_probs(self, context, mask, pairs, samples=None):
        """(probs (B, S, P), weights (B, S)) for pairs (B, P, 2, D), over `samples` draws of z
        (default self.samples; 1: at the mean of q, or the deterministic z)."""
        m, samples = self.model, samples or self.samples
        if not self.reads_context:
            probs = m.log_prob_chosen({"targets": pairs}).exp()[:, None]
        elif samples > 1:
            mean, scale = m.encoder(context, mask)
            z = mean + scale * torch.randn(samples, *mean.shape, device=mean.device)  # (S, B, L)
            r = m.rewards(pairs.expand(samples, *pairs.shape).flatten(0, 1), z.flatten(0, 1))
            probs = torch.sigmoid(r[..., 0] - r[..., 1]).view(samples, *pairs.shape[:2]).transpose(0, 1)
        else:
            probs = m.log_prob_chosen({"context": context, "context_mask": mask, "targets": pairs}, samples=0).exp()
            probs = probs[:, None]
        S = probs.shape[1]
        return probs, torch.full(probs.shape[:2], 1 / S, device=probs.device)

    def infogain(self, context, mask, cand, targets):
        if not self.reads_context:  # a BTL: no answer changes anything
            return torch.zeros(cand.shape[:2])
        if not self.lookahead_on:
            if self.samples == 1:
                raise ValueError("EPIG from posterior draws needs a stochastic NP-BTL; use the look-ahead")
            return epig(self.answer_probs(context, mask, cand)[0], self.answer_probs(context, mask, targets)[0],
                        torch.full((len(cand), self.samples), 1 / self.samples, device=cand.device))
        keep = self.screen if self.samples > 1 and 0 < self.screen < cand.shape[1] else 0
        samples = 1 if keep else self.samples  # the screen looks ahead at the mean of q
        gains = self.all_gains(context, mask, cand, targets, samples, keep or 1)
        if not keep:
            return gains
        top = gains.topk(keep, 1).indices  # (B, keep): looked ahead at again, over draws of z
        kept = cand.gather(1, top[..., None, None].expand(-1, -1, *cand.shape[2:]))
        return torch.full_like(gains, -1.0).scatter(1, top, self.all_gains(context, mask, kept, targets,
                                                                           self.samples, keep))

    def all_gains(self, context, mask, cand, targets, samples, keep):
        """(B, C) look-ahead gains over `samples` draws; one user's may skip all but the `keep` best."""
        if len(cand) == 1 and cand.shape[1] > self.block:
            return self.pruned_lookahead(context, mask, cand, targets, samples, keep)
        chunk = self.chunk or max(1, 100_000 // (cand.shape[1] * targets.shape[1] * 4 * samples))
        return torch.cat([self.lookahead(*(x[i:i + chunk] for x in (context, mask, cand, targets)), samples)
                          for i in range(0, len(cand), chunk)])

    block = 128  # one user's candidates are looked ahead at in blocks of this many

    def pruned_lookahead(self, context, mask, cand, targets, samples, keep=1):
        """One user (the dialogue): the same `keep` best as looking ahead at every candidate, sooner. A
        candidate's gain is at most the entropy of its answer, so candidates are visited from the most
        uncertain and the rest skipped once none can beat the keep-th best gain. Skipped ones score -1."""
        bound = entropy(self.answer_probs(context, mask, cand, samples)[0].mean(1))[0]  # (C,)
        order, gains = bound.argsort(descending=True), torch.full_like(bound, -1.0)
        for start in range(0, len(order), self.block):
            idx = order[start:start + self.block]
            if bound[idx[0]] < gains.topk(keep).values[-1]:
                break
            gains[idx] = self.lookahead(context, mask, cand[:, idx], targets, samples)[0]
        return gains[None]

    def lookahead(self, context, mask, cand, targets, samples):
        """The mutual information of P(y_c | context) P(y_t | context + y_c), both the model's own
        predictions: at its z (samples = 1) or averaged over `samples` draws of q(z | ...). (B, C)"""
        m, (B, C), T, S = self.model, cand.shape[:2], targets.shape[1], samples
        p_c = self.answer_probs(context, mask, cand, S)[0].mean(1)  # (B, C)
        answered = torch.stack([cand, cand.flip(2)], 2)  # (B, C, 2, 2, D): answer 0 = first option chosen
        out = m.encoder.extended(context, mask, answered.flatten(1, 2))  # the context plus each answer
        if S > 1:
            mean, scale = out
            z = mean + scale * torch.randn(S, *mean.shape, device=mean.device)  # (S, B * C * 2, L)
            z = z.view(S, B, C * 2, -1).transpose(0, 1).reshape(B, S * C * 2, -1)
        else:
            z = (out[0] if m.stochastic else out).view(B, C * 2, -1)
        p_t = torch.stack([target_probs(m, targets[b], z[b]) for b in range(B)])  # (B, S * C * 2, T)
        p_t = p_t.view(B, S, C, 2, T).mean(1)  # given each answer
        p_bar = p_c[..., None] * p_t[:, :, 0] + (1 - p_c[..., None]) * p_t[:, :, 1]
        return mutual_information(p_c[..., None] * p_t[:, :, 0], p_c[..., None], p_bar).mean(-1)


class ParticleBelief:
    """A trained NP-BTL's rewards at a fixed set of latents (`particles`: Particles), weighted by
    Bayes' rule: weight_s ∝ prior_s prod over the context of P(answer | z_s) under the model's own
    BTL likelihood. With the training users' latents as the particles (`training_particles`), this
    is importance sampling over the empirical population of the training data: a posterior that
    the encoder's single z cannot express, and EPIG under it is exact for that posterior (as for
    BayesBelief). The probabilities of a pool's pairs under every particle are computed once and
    reused while the same tensors are asked about again (ask() asks one pool K times)."""

    def __init__(self, model, particles):
        self.model, self.particles, self._cache = model, particles, []

    def probs(self, pairs):
        """P(first option chosen) of pairs (B, P, 2, D) under each particle: (B, S, P)."""
        for seen, probs in self._cache:
            if seen is pairs:
                return probs
        probs = torch.stack([target_probs(self.model, p, self.particles.latents) for p in pairs])
        self._cache = (self._cache + [(pairs, probs)])[-2:]  # a pool's candidates and its target pairs
        return probs

    def weights(self, context, mask):
        """(B, S) the posterior over particles after the context (chosen first)."""
        latents = self.particles.latents
        lik = (torch.stack([target_probs(self.model, c, latents) for c in context]) if context.shape[1]
               else context.new_ones(len(context), len(latents), 0))
        return particle_weights(lik, mask, self.particles.log_prior)

    def answer_probs(self, context, mask, pairs):
        return self.probs(pairs), self.weights(context, mask)

    def infogain(self, context, mask, cand, targets):
        return epig(self.probs(cand), self.probs(targets), self.weights(context, mask))

    def log_prob_chosen(self, batch):
        """The posterior predictive log P(chosen) (B, T) of the batch's targets (chosen first)."""
        probs, weights = self.answer_probs(batch["context"], batch["context_mask"], batch["targets"])
        return mixture(weights, probs).clamp_min(1e-12).log()


class AdaptiveBelief(ParticleBelief):
    """ParticleBelief whose particles follow the posterior: after every answer, the posterior over all
    the training users' latents (`particles`) is summarised by weighted k-means into `num` particles,
    and the questions are chosen under those. A fixed summary spends its particles where the prior
    is, and as the answers narrow the posterior fewer of them carry weight (population, pool 30,
    validation users: 64 fixed particles fell 0.8 behind all 2,048 latents by k = 8; 64 that follow
    the posterior matched them). It costs the answers' likelihood under every latent, then every
    candidate under `num` particles, at each question: nothing is reused between questions."""

    def __init__(self, model, particles, num, seed=0):
        super().__init__(model, particles)
        self.num, self.gen = num, torch.Generator().manual_seed(seed)

    def summary(self, context, mask, *pair_sets):
        """The posterior's particles' weights (B, num), and P(first option chosen) of each set of
        pairs (B, P, 2, D) under each episode's own particles (B, num, P)."""
        z, weights = posterior_summary(self.particles.latents, self.weights(context, mask), self.num, self.gen)
        return weights, [torch.stack([target_probs(self.model, p, zb) for p, zb in zip(pairs, z)])
                         for pairs in pair_sets]

    def answer_probs(self, context, mask, pairs):
        weights, (probs,) = self.summary(context, mask, pairs)
        return probs, weights

    def infogain(self, context, mask, cand, targets):
        weights, (p_cand, p_targ) = self.summary(context, mask, cand, targets)
        return epig(p_cand, p_targ, weights)


def belief_options(query):
    """ModelBelief's keyword arguments from evaluate.py's `query` config."""
    return {k: query[k] for k in ("samples", "screen", "lookahead")}


def run_belief(path, dim, device="cpu", where="the data", particles=0, data=None, adaptive=False, latents=2048,
               **options):
    """The belief of a trained reward run (its NP-BTL) on options of dimension `dim` (from `where`):
    a ModelBelief (`options` as its), or with particles > 0 a ParticleBelief under that many
    particles of the training users of `data` (training_particles); adaptive: an AdaptiveBelief,
    that many particles following the posterior over `latents` training users' latents."""
    model, config = load_reward_model(path, dim, device, where)
    if not hasattr(model, "encoder"):
        raise DataError(f"{path} reads no context (a {type(model).__name__}): its rewards are the same for "
                        "everyone, so there is nothing to ask")
    if particles and adaptive:
        cloud = training_particles(model, data, config["train"]["max_context"], latents)
        return AdaptiveBelief(model, cloud, particles)
    if particles:
        return ParticleBelief(model, training_particles(model, data, config["train"]["max_context"], particles))
    return ModelBelief(model, **options)


class BayesBelief:
    """The exact posterior of a known generator (data.py meta): over its user types, or for a
    continuous linear population, `samples` prior draws weighted by the context likelihood."""

    def __init__(self, meta, samples=2000, seed=0):
        self.meta = meta
        self.population = meta.get("generator") == "linear_population"
        self.samples, self.seed = samples, seed

    def answer_probs(self, context, mask, pairs):
        if self.population:
            w = sphere_samples(self.samples, pairs.shape[-1], torch.Generator().manual_seed(self.seed))
            t = self.meta["temperature"]
            log_w = torch.where(mask[..., None], pair_log_lik(context, w, t), 0.0).sum(1)  # (B, S)
            probs = pair_log_lik(pairs, w, t).exp().transpose(1, 2)  # (B, S, P)
        else:
            lik = torch.where(mask[..., None], type_likelihood(self.meta, context), 1.0)  # (B, n, K)
            log_w = lik.log().sum(1)  # (B, K)
            probs = type_likelihood(self.meta, pairs).transpose(1, 2)  # (B, K, P)
        weights = torch.softmax(log_w, -1)
        return probs.float(), weights.nan_to_num(1 / log_w.shape[-1]).float()  # no prior draw fits: uniform

    def infogain(self, context, mask, cand, targets):
        probs, weights = self.answer_probs(context, mask, torch.cat([cand, targets], 1))
        return epig(probs[..., :cand.shape[1]], probs[..., cand.shape[1]:], weights)


def exact_active(p_cand, p_targ, answers, num_questions, gen):
    """Bayes-active questions over a finite set of G user hypotheses (a grid), uniform prior:
    p_cand (G, C) and p_targ (G, T) P(second option chosen) under each; answers (C,) bool, the
    user's (read once asked). Greedy EPIG under the exact posterior; returns the picks (K,)."""
    log_post, asked, picks = torch.zeros(len(p_cand), dtype=torch.float64), torch.zeros(p_cand.shape[1], dtype=bool), []
    cand, targ = p_cand[None].float(), p_targ[None].float()
    for _ in range(num_questions):
        worth = epig(cand, targ, torch.softmax(log_post, 0)[None].float())[0]
        worth += 1e-6 * torch.rand(worth.shape, generator=gen)  # ties broken at random
        pick = int(worth.masked_fill(asked, -math.inf).argmax())
        asked[pick] = True
        picks.append(pick)
        p = p_cand[:, pick].double().clamp(1e-12, 1 - 1e-12)
        log_post += (p if answers[pick] else 1 - p).log()
    return torch.tensor(picks, dtype=torch.long)


def scores(belief, strategy, context, mask, cand, targets, gen):
    """(B, C) how much each candidate is worth asking; the largest is asked."""
    if strategy == "random":
        return torch.rand(cand.shape[:2], generator=gen)
    if strategy == "uncertainty":
        probs, weights = belief.answer_probs(context, mask, cand)
        return entropy(torch.einsum("bs,bsc->bc", weights, probs))
    if strategy == "infogain":
        return belief.infogain(context, mask, cand, targets)
    raise ValueError(f"unknown strategy '{strategy}' (expected one of {STRATEGIES})")


@torch.no_grad()
def next_question(belief, strategy, context, cand, excluded, targets, gen):
    """(B,) index of the candidate to ask next: the best not yet asked or skipped (`excluded` (B, C))."""
    mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    worth = scores(belief, strategy, context, mask, cand, targets, gen).cpu().float()
    worth += 1e-6 * torch.rand(worth.shape, generator=gen)  # ties broken at random, never by position
    return worth.masked_fill(excluded, -math.inf).argmax(1)


@torch.no_grad()
def ask(belief, strategy, cand, answers, num_questions, targets, gen, context=None):
    """Greedy sequential questions to a batch of simulated users.

    cand (B, C, 2, D): candidate pairs as shown; answers (B, C) bool, True where the user
    prefers the second option (read only once a candidate is asked); targets (B, T, 2, D):
    unlabelled pairs whose answers infogain is about; context (B, n0, 2, D): answers
    already given, chosen first. Returns the context after the questions (B, n0 + K, 2, D),
    chosen first, in asking order, and the asked candidates' indices (B, K).
    """
    B, rows = len(cand), torch.arange(len(cand))
    context = cand.new_zeros(B, 0, *cand.shape[2:]) if context is None else context
    asked, picks = torch.zeros(cand.shape[:2], dtype=torch.bool), []
    for _ in range(num_questions):
        pick = next_question(belief, strategy, context, cand, asked, targets, gen)
        asked[rows, pick] = True
        context = torch.cat([context, chosen_first(cand[rows, pick], answers[rows, pick])[:, None]], 1)
        picks.append(pick)
    return context, torch.stack(picks, 1) if picks else torch.zeros(B, 0, dtype=torch.long)


def shown(pairs, gen):
    """Chosen-first pairs (B, C, 2, D) in a random order of their options, as a user sees them,
    and the answers (B, C) bool: True where the second option shown is the chosen one."""
    second = torch.rand(pairs.shape[:2], generator=gen) < 0.5
    return chosen_first(pairs, second), second


# -----------------------------------------------------------------------------
# evaluation: accuracy on a user's held-out pairs against the number of questions asked


def episode_chunks(data, split, config, seed):
    """Fixed-in-advance episodes of the split's users: a candidate pool of `pool` answered pairs,
    `num_targets` held-out answered pairs (disjoint from the pool) and `target_inputs` unlabelled
    pairs of the split for infogain. Users balanced, round-robin. Yields dicts of tensors."""
    from data import EpisodeSampler

    q = config["query"]
    sampler = EpisodeSampler(data, split, config["num_targets"], q["pool"], seed=seed,
                             size_keys="query.pool + num_targets")
    split_rows = torch.from_numpy(data.split == split).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed + 1)
    for start in range(0, q["episodes"], config["chunk"]):
        rows = torch.arange(start, min(start + config["chunk"], q["episodes"])) % len(sampler.labels)
        batch = sampler.sample(len(rows), num_context=q["pool"], label_rows=rows)
        cand, answers = shown(batch["context"], gen)
        inputs = split_rows[torch.randint(len(split_rows), (len(rows), q["target_inputs"]), generator=gen)]
        yield {"cand": cand, "answers": answers, "targets": batch["targets"], "target_inputs": data.pairs[inputs],
               "seed": seed + 7919 * start}


@torch.no_grad()
def accuracy_curves(predict, belief, strategy, chunk, questions, device):
    """Per-episode accuracy (E, questions + 1) on the chunk's targets after 0..K questions chosen
    by `strategy` under `belief`; `predict(batch)` gives log P(chosen) (E, T)."""
    on = {k: v.to(device) if torch.is_tensor(v) else v for k, v in chunk.items()}
    gen = torch.Generator().manual_seed(chunk["seed"])  # the same random questions for every belief
    context, _ = ask(belief, strategy, on["cand"], chunk["answers"], questions, on["target_inputs"], gen)
    accs = []
    for k in range(questions + 1):
        torch.manual_seed(chunk["seed"] + k)  # a stochastic model's predictive: the same draws for every strategy
        batch = {"context": context[:, :k], "context_mask": torch.ones(context.shape[0], k, dtype=torch.bool,
                                                                       device=context.device),
                 "targets": on["targets"]}
        accs.append(choice_correct(predict(batch)).mean(1).cpu())
    return torch.stack(accs, 1)


def predictor(model, samples):
    """batch -> log P(chosen) as evaluate.py scores a model: a stochastic NP-BTL by its posterior
    predictive over `samples` draws of z (0: at the mean of q)."""
    if getattr(model, "stochastic", False):
        return functools.partial(model.log_prob_chosen, samples=samples)
    return model.log_prob_chosen


def evaluate(models, data, split, strategies, config, device, bayes=None, particles=None):
    """{(row name, strategy): per-episode accuracies (E, K + 1)} for each NP model and strategy,
    and for the Bayes reference (`bayes(batch)` -> log P(chosen), or None) with random and
    infogain questions under the exact posterior. A model's questions are chosen by its
    ModelBelief, or by a ParticleBelief (AdaptiveBelief for query.belief = adaptive) where
    `particles` ({name: Particles}) is given; either way the model predicts as evaluate.py scores it."""
    q, out = config["query"], {}

    def model_belief(name, model):
        if q["belief"] == "adaptive":
            return AdaptiveBelief(model, particles[name], q["particles"], config["seed"])
        return ParticleBelief(model, particles[name]) if particles else ModelBelief(model, **belief_options(q))

    for chunk in episode_chunks(data, split, config, config["seed"]):
        runs = [(name, model_belief(name, m), predictor(m, config["predict_samples"]), s)
                for name, m in models.items() for s in strategies]
        if bayes is not None:
            belief = BayesBelief(data.meta, q["bayes_samples"], config["seed"])
            runs += [("bayes_optimal", belief, bayes, s) for s in ("random", "infogain")]
        for name, belief, predict, strategy in runs:
            out.setdefault((name, strategy), []).append(
                accuracy_curves(predict, belief, strategy, chunk, q["questions"], device))
    return {key: torch.cat(parts) for key, parts in out.items()}


@torch.no_grad()
def active_positions(belief, sampler, num_questions, seed, chunk=100, num_targets=16):
    """(L, K) for each user of an EpisodeSampler, the positions (columns of sampler.table) of the
    K pairs that `belief` asks first by infogain, in asking order: a user's own answered pairs are
    the candidates, their recorded answers are read once asked, and infogain is about
    `num_targets` random pairs of the sampler's split (train_policy.py's train.active_selector)."""
    gen = torch.Generator().manual_seed(seed)
    split_rows = sampler.table[torch.arange(sampler.table.shape[1]) < sampler.counts[:, None]]  # every answered cell
    out = torch.zeros(len(sampler.counts), num_questions, dtype=torch.long)
    for count in sampler.counts.unique().tolist():  # users with as many pairs are one batch
        users = (sampler.counts == count).nonzero().squeeze(1)
        for part in users.split(chunk):
            rows, second = sampler.table[part, :count], sampler.choice_table[part, :count].bool()
            cand, answers = shown(chosen_first(sampler.data.pairs[rows], second), gen)
            targets = sampler.data.pairs[split_rows[torch.randint(len(split_rows), (len(part), num_targets),
                                                                  generator=gen)]]
            out[part] = ask(belief, "infogain", cand, answers, num_questions, targets, gen)[1]
    return out


def ask_training_users(sampler, selector, fraction, num_questions, seed):
    """train_policy.py's train.active_selector: in a share `fraction` of the sampler's episodes (warm-up
    and DPO alike) the context is the first questions the reward run `selector` asks the user by
    infogain (active_positions), so the policy's encoder also learns to read chosen answers."""
    import time
    start = time.time()
    belief = run_belief(selector, sampler.data.dim, where=sampler.data.path)
    sampler.active, sampler.active_fraction = active_positions(belief, sampler, num_questions, seed), fraction
    print(f"active contexts: {num_questions} questions to each of {len(sampler.labels)} train users chosen by "
          f"{selector} in {time.time() - start:.0f} s; {fraction:.0%} of episodes read them")


def questions_to_reach(curve, level):
    """The fewest questions whose mean accuracy reaches `level`, or None."""
    hits = (curve >= level).nonzero()
    return int(hits[0]) if len(hits) else None


if __name__ == "__main__":
    from data import make_paper_synthetic

    data, gen = make_paper_synthetic(20000), torch.Generator().manual_seed(0)
    belief, users = BayesBelief(data.meta), torch.arange(400) % 2  # 200 users of each type
    rows = torch.rand(len(users), len(data.pairs), generator=gen).argsort(1)[:, :100]  # 100 candidates each
    chosen_second = data.choices[rows, users[:, None]].bool()  # (400, 100)
    cand, answers = shown(chosen_first(data.pairs[rows], chosen_second), gen)
    targets = data.pairs[:64].expand(len(users), 64, 2, 1)
    print("the paper task's two user types: mean posterior of the user's true type after 1..5 answers")
    for strategy in STRATEGIES:
        context, _ = ask(belief, strategy, cand, answers, 5, targets, gen)
        truth = [belief.answer_probs(context[:, :n], torch.ones(len(users), n, dtype=torch.bool), targets)[1]
                 .gather(1, users[:, None]).mean().item() for n in range(1, 6)]
        print(f"{strategy:>11}:", " ".join(f"{p:.3f}" for p in truth))
