"""Question selection (queries.py) and its evaluation (evaluate.py --queries): values by hand,
the limit on the paper task, and that the selection never sees an answer."""

import json
import math
import os

import pytest
import torch

import evaluate
import particles as particle_lib
import queries
from common import ConfigError
from data import choice_correct, load_pairs, make_paper_synthetic
from reward import NPBTL, load_reward_model

LN2 = math.log(2)


def test_mutual_information_by_hand():
    half = torch.tensor(0.5)
    assert queries.mutual_information(half * half, half, half).item() == pytest.approx(0.0, abs=1e-7)  # independent
    assert queries.mutual_information(half, half, half).item() == pytest.approx(LN2)  # the same answer twice
    # P(A=1, B=1) = 0.4, P(A=1) = P(B=1) = 0.5: cells 0.4, 0.1, 0.1, 0.4
    by_hand = 2 * 0.4 * math.log(0.4 / 0.25) + 2 * 0.1 * math.log(0.1 / 0.25)
    assert queries.mutual_information(torch.tensor(0.4), half, half).item() == pytest.approx(by_hand)


def test_epig_by_hand():
    """Two equally likely users. Candidate 0 splits them (they answer it oppositely), candidate 1
    does not; the one target splits them too. Knowing the answer to candidate 0 gives the
    target's answer: ln 2; candidate 1 gives nothing."""
    p_cand = torch.tensor([[[1.0, 0.7], [0.0, 0.7]]])  # (B=1, S=2 users, C=2)
    p_targ = torch.tensor([[[0.0], [1.0]]])  # (1, 2, T=1)
    gain = queries.epig(p_cand, p_targ, torch.tensor([[0.5, 0.5]]))
    assert gain[0, 0].item() == pytest.approx(LN2)
    assert gain[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    # a posterior sure of the user: nothing left to learn
    assert queries.epig(p_cand, p_targ, torch.tensor([[1.0, 0.0]])).abs().max().item() < 1e-6


def paper_users(num_users, num_candidates, seed=0):
    """Users of both types of the paper task, each with candidates (shown) and answers."""
    data, gen = make_paper_synthetic(4000, seed=seed), torch.Generator().manual_seed(seed)
    types = torch.arange(num_users) % 2
    rows = torch.rand(num_users, len(data.pairs), generator=gen).argsort(1)[:, :num_candidates]
    second = data.choices[rows, types[:, None]].bool()
    chosen_first = torch.where(second[..., None, None], data.pairs[rows].flip(2), data.pairs[rows])
    cand, answers = queries.shown(chosen_first, gen)
    return data, types, cand, answers, data.pairs[:16].expand(num_users, 16, 2, 1)


def test_bayes_infogain_identifies_a_paper_user_with_one_question():
    """The types disagree on half the pairs: one random answer identifies the user half the time,
    one infogain answer always (the paper task's limit with active questions: 100 %)."""
    data, types, cand, answers, targets = paper_users(200, 50)
    belief, gen = queries.BayesBelief(data.meta), torch.Generator().manual_seed(1)
    posterior = {}
    for strategy in queries.STRATEGIES:
        context, picks = queries.ask(belief, strategy, cand, answers, 1, targets, gen)
        weights = belief.answer_probs(context, torch.ones(200, 1, dtype=torch.bool), targets)[1]
        posterior[strategy] = weights.gather(1, types[:, None]).squeeze(1)
    assert (posterior["infogain"] == 1).all() and (posterior["uncertainty"] == 1).all()
    assert 0.3 < (posterior["random"] == 1).float().mean() < 0.7
    # argmin instead of argmax would pick the pairs the types agree on
    gains = belief.infogain(cand.new_zeros(200, 0, 2, 1), torch.ones(200, 0, dtype=torch.bool), cand, targets)
    worst = gains.argmin(1)
    lik = belief.answer_probs(cand.new_zeros(200, 0, 2, 1), torch.ones(200, 0, dtype=torch.bool), cand)[0]
    assert (lik[torch.arange(200), 0, worst] == lik[torch.arange(200), 1, worst]).all()


def test_the_selection_never_sees_an_answer():
    """The same candidates with every answer reversed: the same questions are asked first, and the
    context holds each pair with the user's chosen option first."""
    data, types, cand, answers, targets = paper_users(40, 30)
    belief = queries.BayesBelief(data.meta)
    for strategy in queries.STRATEGIES:
        one = queries.ask(belief, strategy, cand, answers, 1, targets, torch.Generator().manual_seed(3))
        other = queries.ask(belief, strategy, cand, ~answers, 1, targets, torch.Generator().manual_seed(3))
        assert torch.equal(one[1], other[1])
        assert torch.equal(one[0], other[0].flip(2))
    context, picks = queries.ask(belief, "infogain", cand, answers, 4, targets, torch.Generator().manual_seed(3))
    assert all(len(set(row.tolist())) == 4 for row in picks)  # no question twice
    lik = belief.answer_probs(context, torch.ones(40, 4, dtype=torch.bool), context)[0]  # (B, K, 4)
    assert (lik[torch.arange(40), types].diagonal(dim1=-2, dim2=-1) == 1).all()  # the true type chose the first


def test_random_questions_are_the_same_for_every_belief():
    data, _, cand, answers, targets = paper_users(20, 30)
    model = NPBTL(1, hidden=8, latent_dim=2, encoder_hidden=8)
    picks = [queries.ask(b, "random", cand, answers, 5, targets, torch.Generator().manual_seed(4))[1]
             for b in (queries.BayesBelief(data.meta), queries.ModelBelief(model))]
    assert torch.equal(*picks)


def brute_force_lookahead(model, context, cand, targets):
    """The deterministic model's gain, one candidate and answer at a time."""
    gains = []
    for c in range(cand.shape[1]):
        pair = cand[:, c:c + 1]
        p_c = model.log_prob_chosen({"context": context, "context_mask": torch.ones(1, context.shape[1],
                                                                                    dtype=torch.bool),
                                     "targets": pair}).exp().item()
        p_t = []
        for answered in (pair, pair.flip(2)):
            extended = torch.cat([context, answered], 1)
            p_t.append(model.log_prob_chosen({"context": extended, "context_mask": torch.ones(1, extended.shape[1],
                                                                                             dtype=torch.bool),
                                              "targets": targets}).exp()[0])
        total = 0.0
        for t in range(targets.shape[1]):
            joint = torch.tensor([[p_c * p_t[0][t], p_c * (1 - p_t[0][t])],
                                  [(1 - p_c) * p_t[1][t], (1 - p_c) * (1 - p_t[1][t])]])
            outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
            total += torch.xlogy(joint, joint / outer).sum().item()
        gains.append(total / targets.shape[1])
    return torch.tensor(gains)


def test_lookahead_of_a_deterministic_model_by_brute_force(np_btl_run):
    model, _ = load_reward_model(np_btl_run[0], 1)  # the paper task's NP-BTL, trained: z matters
    gen = torch.Generator().manual_seed(0)
    context, cand, targets = (torch.rand(1, k, 2, 1, generator=gen) for k in (0, 8, 5))
    with torch.no_grad():
        fast = queries.ModelBelief(model).infogain(context, torch.ones(1, 0, dtype=torch.bool), cand, targets)
        slow = brute_force_lookahead(model, context, cand, targets)
    assert fast[0] == pytest.approx(slow, abs=1e-5)
    assert slow.max() > 0.05  # z matters: a test of zeros would pass anything


def test_a_latent_that_ignores_the_context_gains_nothing():
    """With FiLM at identity the reward ignores z: no answer moves a prediction."""
    model = NPBTL(2, hidden=8, latent_dim=3, encoder_hidden=8).eval()
    context, cand, targets = torch.rand(2, 3, 2, 2), torch.rand(2, 6, 2, 2), torch.rand(2, 5, 2, 2)
    with torch.no_grad():
        gain = queries.ModelBelief(model).infogain(context, torch.ones(2, 3, dtype=torch.bool), cand, targets)
    assert gain.abs().max().item() < 1e-6


def test_population_bayes_belief_learns_the_direction():
    """A continuous linear population: answers along one axis make the posterior's draws point there."""
    meta = {"generator": "linear_population", "temperature": 0.1}
    belief = queries.BayesBelief(meta, samples=4000)
    e0 = torch.eye(3)[0]
    context = torch.stack([torch.stack([e0 * 0.9, e0 * 0.1])] * 5)[None]  # (1, 5, 2, 3): more of x0 is better
    probs, weights = belief.answer_probs(context, torch.ones(1, 5, dtype=torch.bool),
                                         torch.stack([e0, -e0])[None, None])
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (weights[0] * probs[0, :, 0]).sum().item() > 0.95


class LinearUsers(torch.nn.Module):
    """r(option, z) = option . z / temperature: a linear population's true reward, as a reward model."""

    def __init__(self, temperature):
        super().__init__()
        self.temperature = temperature

    def rewards(self, options, latent):
        return (options * latent[:, None, None]).sum(-1) / self.temperature


def test_particles_of_the_true_reward_are_the_bayes_posterior():
    """With the generator's reward and its prior draws as particles, ParticleBelief is BayesBelief:
    the same answer probabilities, posterior weights and information gains."""
    meta, gen = {"generator": "linear_population", "temperature": 0.1}, torch.Generator().manual_seed(3)
    draws = queries.sphere_samples(3000, 3, torch.Generator().manual_seed(0)).float()
    particles = queries.ParticleBelief(LinearUsers(0.1), particle_lib.Particles(draws))
    bayes = queries.BayesBelief(meta, 3000, seed=0)
    context, cand, targets = (torch.randn(2, k, 2, 3, generator=gen) for k in (4, 7, 5))
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    p1, w1 = particles.answer_probs(context, mask, cand)
    p2, w2 = bayes.answer_probs(context, mask, cand)
    assert torch.allclose(p1, p2, atol=1e-5) and torch.allclose(w1, w2, atol=1e-5)
    assert w1[0].max() > 10 / 3000  # the context moved the posterior: the check is not of a uniform one
    gains = particles.infogain(context, mask, cand, targets)
    assert torch.allclose(gains, bayes.infogain(context, mask, cand, targets), atol=1e-5)
    assert gains.std() > 0.01


def test_posterior_latent_of_the_true_reward_is_the_bayes_posterior_mean():
    """evaluate.py --rerank_latent=particles: with the generator's reward and its prior draws as the
    latents, the latent is the Bayes posterior mean of the user's direction; with no answers, the prior's."""
    meta, gen = {"generator": "linear_population", "temperature": 0.1}, torch.Generator().manual_seed(3)
    draws = queries.sphere_samples(3000, 3, torch.Generator().manual_seed(0)).float()
    context = torch.randn(2, 4, 2, 3, generator=gen)
    _, weights = queries.BayesBelief(meta, 3000, seed=0).answer_probs(context, torch.ones(2, 4, dtype=torch.bool),
                                                                     context[:, :1])
    z = particle_lib.posterior_latent(LinearUsers(0.1), context, draws)
    assert torch.allclose(z, weights @ draws, atol=1e-5)
    assert (z - draws.mean(0)).norm(dim=-1).min() > 0.3  # the answers moved it: not the prior mean
    assert torch.allclose(particle_lib.posterior_latent(LinearUsers(0.1), context[:, :0], draws),
                          draws.mean(0).expand(2, 3), atol=1e-6)


def test_particle_predictor_of_the_true_reward_is_the_bayes_predictive():
    """evaluate.py --particles: with the generator's reward and its prior draws as particles, the
    looked-up predictive is BayesBelief's on the same episodes (context sizes 0 and 3, padded)."""
    from data import EpisodeSampler, make_linear_synthetic

    data = make_linear_synthetic(num_users=60, pairs_per_user=20, dim=3, temperature=0.1, seed=1)
    draws = queries.sphere_samples(3000, 3, torch.Generator().manual_seed(0)).float()
    predict = particle_lib.particle_predictor(LinearUsers(0.1), data, "test", particle_lib.Particles(draws), rows_per_call=7)
    bayes = queries.BayesBelief(data.meta, 3000, seed=0)
    sampler = EpisodeSampler(data, "test", 5, 3, seed=0)
    for n in (0, 3):
        batch = sampler.sample(6, num_context=n)
        batch["context_mask"][:2, 1:] = False  # two episodes with one answer: padding must not count
        probs, weights = bayes.answer_probs(batch["context"], batch["context_mask"], batch["targets"])
        expected = torch.einsum("bs,bst->bt", weights, probs).log()  # targets come chosen first
        assert torch.allclose(predict(batch), expected, atol=1e-5)
        assert n == 0 or weights.max() > 3 / 3000  # the answers moved the posterior


def test_particle_probabilities_are_reused_only_for_the_same_pool():
    belief = queries.ParticleBelief(LinearUsers(1.0), particle_lib.Particles(torch.randn(50, 2)))
    a, b, c = torch.randn(1, 6, 2, 2), torch.randn(1, 6, 2, 2), torch.randn(1, 6, 2, 2)
    first = belief.probs(a)
    assert belief.probs(a) is first  # asked about again: not recomputed
    assert not torch.allclose(belief.probs(b), first)  # another pool of the same shape: recomputed
    belief.probs(c)  # two pools are kept, a third one pushes the oldest out
    assert belief.probs(a) is not first and torch.equal(belief.probs(a), first)


def two_certain_types(per_type=171):
    """Particles of two user types who disagree on every pair, each certain (saturated sigmoids)
    and equally many: after no answer the posterior is an exact tie on every pair."""
    z = torch.tensor([[1.0, -1.0]])
    return LinearUsers(1e-4), particle_lib.Particles(torch.cat([z, -z]).repeat_interleave(per_type, 0))


def test_a_tie_of_the_posterior_scores_one_half_in_either_orientation():
    """particle_lib.mixture: summed without care, an exact tie came out just under 1/2 in both
    orientations of a pair, scored wrong for every user (three types, 512 particles: -4.4 points
    at n = 1)."""
    from data import EpisodeSampler, make_linear_synthetic

    model, particles = two_certain_types()
    data = make_linear_synthetic(num_users=60, pairs_per_user=20, dim=2, temperature=0.1, seed=1)
    batch = EpisodeSampler(data, "test", 8, 0, seed=0).sample(16, num_context=0)
    swapped = dict(batch, flipped=~batch["flipped"], targets=batch["targets"].flip(-2))
    predict, belief = particle_lib.particle_predictor(model, data, "test", particles), queries.ParticleBelief(model, particles)
    for score in (predict, belief.log_prob_chosen):
        first, second = choice_correct(score(batch)), choice_correct(score(swapped))
        assert torch.equal(first + second, torch.ones_like(first))  # each pair credited once in all


def test_summarised_particles_predict_as_all_the_latents():
    """k-means to one particle per tight cluster, weighted by its share: the posterior predictive of
    the 200 latents with 3 particles. Unweighted centroids would not be (the clusters are 2:1:1)."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -1.0]])
    latents = centres.repeat_interleave(torch.tensor([100, 50, 50]), 0) + 1e-4 * torch.randn(200, 2, generator=gen)
    summary = particle_lib.summarise(latents, 3)
    assert len(summary.latents) == 3 and torch.allclose(summary.log_prior.exp().sort().values,
                                                        torch.tensor([0.25, 0.25, 0.5]))
    assert torch.cdist(summary.latents, centres).min(1).values.max() < 1e-3
    assert particle_lib.summarise(latents, 200).log_prior is None  # no fewer particles asked: all, equally weighted
    model = LinearUsers(1.0)
    context, targets = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 6, 2, 2, generator=gen)
    for n in (0, 1, 3):
        batch = {"context": context[:, :n], "context_mask": torch.ones(2, n, dtype=torch.bool), "targets": targets}
        every = queries.ParticleBelief(model, particle_lib.Particles(latents)).log_prob_chosen(batch)
        assert torch.allclose(queries.ParticleBelief(model, summary).log_prob_chosen(batch), every, atol=1e-3)
        unweighted = queries.ParticleBelief(model, particle_lib.Particles(summary.latents)).log_prob_chosen(batch)
        assert not torch.allclose(unweighted, every, atol=1e-2)


def test_adaptive_particles_follow_the_posterior():
    """AdaptiveBelief: after 8 answers its 32 particles, summarised from the posterior over all 3,000
    latents, predict as those do; 32 fixed centroids of the prior cannot (few of them fit the answers).
    With as many particles as latents it is ParticleBelief."""
    gen = torch.Generator().manual_seed(4)
    model, latents = LinearUsers(0.1), particle_lib.Particles(queries.sphere_samples(3000, 3, gen).float())
    context, targets = torch.randn(2, 8, 2, 3, generator=gen), torch.randn(2, 20, 2, 3, generator=gen)
    mask = torch.ones(2, 8, dtype=torch.bool)
    exact = particle_lib.mixture(*reversed(queries.ParticleBelief(model, latents).answer_probs(context, mask, targets)))

    def error(belief):
        probs, weights = belief.answer_probs(context, mask, targets)
        assert torch.allclose(weights.sum(1), torch.ones(2))
        return (particle_lib.mixture(weights, probs) - exact).abs().mean().item()

    adaptive, fixed = error(queries.AdaptiveBelief(model, latents, 32)), error(
        queries.ParticleBelief(model, particle_lib.summarise(latents.latents, 32)))
    assert adaptive < 0.02 and fixed > 2 * adaptive, (adaptive, fixed)
    every = queries.AdaptiveBelief(model, latents, 3000)
    assert torch.allclose(every.infogain(context, mask, targets[:, :6], targets[:, 6:]),
                          queries.ParticleBelief(model, latents).infogain(context, mask, targets[:, :6], targets[:, 6:]))


class ContextMean(torch.nn.Module):
    """A 'model' whose latent is the mean difference chosen - rejected of its context."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def infer_latent(self, context, mask):
        diff = (context[:, :, 0] - context[:, :, 1]) * mask[..., None]
        return diff.sum(1) / mask.sum(1, keepdim=True)


def test_particles_are_read_from_training_users_only(paper_path):
    data = load_pairs(paper_path)
    data.pairs[torch.from_numpy(data.split != "train")] = float("nan")  # any val or test pair read shows
    z = particle_lib.training_latents(ContextMean(), data, context_size=4, num=64)
    assert z.shape == (64, 1) and torch.isfinite(z).all()
    assert len(z.unique()) > 32  # different contexts, not one episode repeated


# -----------------------------------------------------------------------------
# evaluate.py --queries


FAST = ["--query.episodes=200", "--query.pool=20", "--query.questions=3", "--num_targets=10", "--chunk=100"]


def test_evaluate_queries_writes_curves(np_btl_run, btl_run, tmp_path, capsys):
    out = str(tmp_path / "q")
    rows = evaluate.main([np_btl_run[0], btl_run[0], "--queries=random,infogain", *FAST, f"--out={out}"])
    with open(os.path.join(out, "queries.json")) as f:
        assert json.load(f) == rows
    assert not os.path.exists(os.path.join(out, "eval.json"))
    name = os.path.basename(np_btl_run[0])
    assert "reads no context" in capsys.readouterr().out  # the BTL is named, not silently dropped
    assert {(r["model"], r["strategy"]) for r in rows} == {(name, "random"), (name, "infogain"),
                                                         ("bayes_optimal", "random"), ("bayes_optimal", "infogain")}
    curve = {(r["model"], r["strategy"], r["questions"]): r for r in rows}
    assert all(r["episodes"] == 200 for r in rows) and {r["questions"] for r in rows} == {0, 1, 2, 3}
    # no question asked: every strategy sees the same empty context and the same targets
    assert curve[(name, "random", 0)]["accuracy"] == curve[(name, "infogain", 0)]["accuracy"]
    assert curve[("bayes_optimal", "infogain", 1)]["accuracy"] == 1.0  # one well-chosen question identifies the user
    assert curve[("bayes_optimal", "random", 1)]["accuracy"] < 0.95
    assert "gap_to_bayes_active" not in curve[("bayes_optimal", "infogain", 1)]
    assert curve[(name, "infogain", 1)]["gap_to_bayes_active"] == pytest.approx(
        curve[(name, "infogain", 1)]["accuracy"] - 1.0, abs=1e-6)


def test_evaluate_queries_with_particles(np_btl_run, tmp_path, monkeypatch):
    """--query.belief=particles: the same episodes and model predictions, the particles' questions."""
    rows, asked = {}, []
    infogain = queries.ParticleBelief.infogain
    monkeypatch.setattr(queries.ParticleBelief, "infogain", lambda *a: asked.append(1) or infogain(*a))
    for belief in ("lookahead", "particles"):
        out = evaluate.main([np_btl_run[0], "--queries=infogain", *FAST, f"--query.belief={belief}",
                             "--query.particles=256", f"--out={tmp_path}/{belief}"])
        rows[belief] = {(r["model"], r["questions"]): r["accuracy"] for r in out}
    name = os.path.basename(np_btl_run[0])
    assert rows["particles"][(name, 0)] == rows["lookahead"][(name, 0)]  # no question: the same prediction
    assert rows["particles"][("bayes_optimal", 2)] == rows["lookahead"][("bayes_optimal", 2)]
    assert len(asked) == 3 * 2  # 3 questions, 2 chunks of episodes: every model question by the particles
    assert rows["particles"][(name, 1)] > 0.9  # one question on which the paper's two types disagree


def test_evaluate_queries_with_adaptive_particles(np_btl_run, tmp_path, monkeypatch):
    """--query.belief=adaptive: every model question chosen by AdaptiveBelief, a good first one."""
    asked = []
    infogain = queries.AdaptiveBelief.infogain
    monkeypatch.setattr(queries.AdaptiveBelief, "infogain", lambda *a: asked.append(1) or infogain(*a))
    out = evaluate.main([np_btl_run[0], "--queries=infogain", *FAST, "--query.belief=adaptive",
                         "--query.particles=16", f"--out={tmp_path}/adaptive"])
    rows = {(r["model"], r["questions"]): r["accuracy"] for r in out}
    assert len(asked) == 3 * 2
    assert rows[(os.path.basename(np_btl_run[0]), 1)] > 0.9


@pytest.mark.parametrize("flag, message", [("--queries=infogian", "unknown strategy 'infogian'"),
                                           ("--queries=random,random", "names a strategy twice"),
                                           ("--query.pool=0", "query.pool"),
                                           ("--query.belief=particle", "query.belief"),
                                           ("--query.world_pool=12", "for --queries on steering-world policies")])
def test_query_mistakes_are_one_line(np_btl_run, tmp_path, flag, message):
    with pytest.raises(ConfigError, match=message):
        evaluate.main([np_btl_run[0], flag, f"--out={tmp_path}/q"])
    assert not os.path.exists(tmp_path / "q")


def test_particles_with_queries_names_the_question_key(np_btl_run, tmp_path):
    """--particles scores the context-size table; with --queries it would be ignored: refused instead."""
    with pytest.raises(ConfigError, match="config key 'particles'.*--query.belief=particles"):
        evaluate.main([np_btl_run[0], "--queries=infogain", "--particles=64", f"--out={tmp_path}/q"])
    assert not os.path.exists(tmp_path / "q")


def test_a_pool_too_large_for_the_users_is_named(np_btl_run, paper_path, tmp_path):
    test_pairs = int((load_pairs(paper_path).split == "test").sum())
    with pytest.raises(Exception, match="query.pool"):
        evaluate.main([np_btl_run[0], "--queries=random", f"--query.pool={test_pairs}", f"--out={tmp_path}/q"])
    assert not os.path.exists(tmp_path / "q")


def test_candidates_and_targets_are_disjoint_answered_pairs_of_the_split(paper_path):
    data = load_pairs(paper_path)
    config = {"num_targets": 10, "chunk": 50, "seed": 0,
              "query": {"pool": 30, "episodes": 100, "target_inputs": 8}}
    chunks = list(queries.episode_chunks(data, "test", config, seed=0))
    assert sum(len(c["cand"]) for c in chunks) == 100
    second = torch.cat([c["answers"] for c in chunks]).float().mean()
    assert 0.4 < second < 0.6  # shown in a random order: which option comes first says nothing
    test_options = {round(v, 6) for v in data.pairs[torch.from_numpy(data.split == "test")].flatten().tolist()}
    for c in chunks:
        for cand, targets in zip(c["cand"], c["targets"]):
            shown = {tuple(sorted(round(v, 6) for v in pair.flatten().tolist())) for pair in cand}
            held_out = {tuple(sorted(round(v, 6) for v in pair.flatten().tolist())) for pair in targets}
            assert len(shown) == 30 and len(held_out) == 10 and not shown & held_out
            assert {v for pair in shown | held_out for v in pair} <= test_options


class NoGain:
    """A belief under which every question is worth exactly the same."""

    def infogain(self, context, mask, cand, targets):
        return torch.zeros(cand.shape[:2])


def test_ties_are_broken_at_random_not_by_position():
    data, _, cand, answers, targets = paper_users(50, 20)
    _, picks = queries.ask(NoGain(), "infogain", cand, answers, 1, targets, torch.Generator().manual_seed(0))
    assert len(set(picks[:, 0].tolist())) > 5  # spread over the pool, not the first candidate every time


def test_stochastic_beliefs_by_their_definitions():
    """A stochastic NP-BTL: the look-ahead averages the predictions over draws of q(z | context + answer)
    (checked against the deterministic look-ahead at scale -> 0), and EPIG from draws is epig() of the
    draws' answer probabilities; a deterministic model has no draws to take EPIG from."""
    torch.manual_seed(0)
    model = NPBTL(1, hidden=8, latent_dim=2, encoder_hidden=8, stochastic=True).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    context, cand, targets = torch.rand(3, 2, 2, 1), torch.rand(3, 5, 2, 1), torch.rand(3, 4, 2, 1)
    mask = torch.ones(3, 2, dtype=torch.bool)
    with torch.no_grad():
        gain = queries.ModelBelief(model, samples=8).infogain(context, mask, cand, targets)
        assert gain.shape == (3, 5) and (gain >= -1e-6).all() and gain.max() > 1e-4
        model.encoder.min_scale = 0.0  # draws collapse onto the mean: the deterministic look-ahead
        torch.nn.init.constant_(model.encoder.head[-1].bias[2:], -30.0)  # softplus(-30) ~ 0
        torch.nn.init.zeros_(model.encoder.head[-1].weight[2:])
        collapsed = queries.ModelBelief(model, samples=8).infogain(context, mask, cand, targets)
        deterministic = queries.ModelBelief(model, samples=8)
        deterministic.samples = 1
        assert collapsed == pytest.approx(deterministic.infogain(context, mask, cand, targets), abs=1e-5)
        belief = queries.ModelBelief(NPBTL(1, hidden=8, latent_dim=2, encoder_hidden=8, stochastic=True), samples=4,
                                     lookahead=False)
        torch.manual_seed(1)
        by_epig = belief.infogain(context, mask, cand, targets)
        torch.manual_seed(1)
        p_c, p_t = belief.answer_probs(context, mask, cand)[0], belief.answer_probs(context, mask, targets)[0]
        assert by_epig == pytest.approx(queries.epig(p_c, p_t, torch.full((3, 4), 0.25)), abs=1e-6)
    with pytest.raises(ValueError, match="needs a stochastic"):
        queries.ModelBelief(NPBTL(1, hidden=8), lookahead=False).infogain(context, mask, cand, targets)


def test_a_stochastic_models_screen_keeps_the_best_at_the_mean_then_looks_again_over_draws():
    """Only the `screen` candidates with the largest look-ahead gain at the mean of q(z | ...) are
    looked ahead at over draws (the rest score -1), as a batch and for one user (whose look-ahead
    skips blocks), with the values of the look-ahead over draws on those candidates alone."""
    torch.manual_seed(0)
    model = NPBTL(1, hidden=8, latent_dim=2, encoder_hidden=8, stochastic=True).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    for B, C in ((3, 40), (1, 300)):  # (1, 300): one user, in blocks of 128
        context, cand, targets = torch.rand(B, 2, 2, 1), torch.rand(B, C, 2, 1), torch.rand(B, 4, 2, 1)
        mask = torch.ones(B, 2, dtype=torch.bool)
        with torch.no_grad():
            at_mean = queries.ModelBelief(model, samples=1).infogain(context, mask, cand, targets)
            torch.manual_seed(1)
            screened = queries.ModelBelief(model, samples=8, screen=5).infogain(context, mask, cand, targets)
            top = at_mean.topk(5, 1).indices
            kept = cand.gather(1, top[..., None, None].expand(-1, -1, 2, 1))
            torch.manual_seed(1)
            over_draws = queries.ModelBelief(model, samples=8, screen=0).infogain(context, mask, kept, targets)
        assert ((screened >= 0).sum(1) == 5).all() and (screened[screened < 0] == -1).all()
        assert torch.allclose(screened.gather(1, top), over_draws, atol=1e-6)
        assert not torch.allclose(over_draws, at_mean.gather(1, top), atol=1e-3)  # the draws count


def test_questions_are_scored_with_evaluates_predictive():
    """--queries scores a stochastic NP-BTL as evaluate.py does (predict_samples draws; 0: the mean
    of q), not with the draws its training config validated with."""
    torch.manual_seed(0)
    model = NPBTL(1, hidden=8, latent_dim=2, encoder_hidden=8, stochastic=True, predict_samples=2).eval()
    batch = {"context": torch.rand(4, 3, 2, 1), "context_mask": torch.ones(4, 3, dtype=torch.bool),
             "targets": torch.rand(4, 5, 2, 1)}
    with torch.no_grad():
        assert torch.equal(queries.predictor(model, 0)(batch), model.log_prob_chosen(batch, samples=0))
        torch.manual_seed(1)
        by_evaluate = queries.predictor(model, 64)(batch)
        torch.manual_seed(1)
        assert torch.equal(by_evaluate, model.log_prob_chosen(batch, samples=64))
        torch.manual_seed(1)
        assert not torch.equal(by_evaluate, model.log_prob_chosen(batch))  # its own 2 draws
    deterministic = NPBTL(1, hidden=8)
    assert queries.predictor(deterministic, 64) == deterministic.log_prob_chosen


def test_target_probs_in_tiles_equal_one_forward():
    torch.manual_seed(0)
    model = NPBTL(1, hidden=8, latent_dim=2, encoder_hidden=8).eval()
    targets, z = torch.rand(16, 2, 1), torch.randn(1000, 2)  # 256 latents a tile: four tiles
    with torch.no_grad():
        r = model.rewards(targets[None], z)
        assert torch.allclose(particle_lib.target_probs(model, targets, z), torch.sigmoid(r[..., 0] - r[..., 1]))


def test_one_users_pruned_lookahead_picks_what_the_full_one_picks(np_btl_run):
    """The dialogue's shortcut (skip candidates whose answer entropy cannot beat the best gain) is exact."""
    model, _ = load_reward_model(np_btl_run[0], 1)
    gen = torch.Generator().manual_seed(2)
    for n in (0, 1, 5):
        context, cand, targets = (torch.rand(1, k, 2, 1, generator=gen) for k in (n, 700, 16))
        mask = torch.ones(1, n, dtype=torch.bool)
        with torch.no_grad():
            belief = queries.ModelBelief(model)
            pruned = belief.infogain(context, mask, cand, targets)
            belief.block = 10_000  # one block: every candidate looked at
            full = belief.infogain(context, mask, cand, targets)
        assert pruned.argmax() == full.argmax() and pruned.max() == pytest.approx(full.max().item(), abs=1e-6)
        looked_at = pruned[0] >= 0
        assert torch.allclose(pruned[0][looked_at], full[0][looked_at], atol=1e-6)


def test_exact_active_asks_about_what_the_targets_depend_on():
    """Four hypotheses, two bits (h = 2 * b1 + b2). The targets depend on b1 only; candidate 0 reveals
    b2, candidate 1 reveals b1, candidate 2 nothing: candidate 1 first. Once b1 is known nothing
    is left to learn about the targets. Ignoring the targets (any informative candidate) fails."""
    bit1, bit2 = torch.tensor([0.0, 0, 1, 1]), torch.tensor([0.0, 1, 0, 1])
    p_cand = torch.stack([0.05 + 0.9 * bit2, 0.05 + 0.9 * bit1, torch.full((4,), 0.5)], 1)  # (G, C)
    p_targ = torch.stack([0.1 + 0.8 * bit1, 0.9 - 0.8 * bit1], 1)  # (G, T)
    for seed in range(5):
        picks = queries.exact_active(p_cand, p_targ, torch.tensor([True, True, False]), 2,
                                     torch.Generator().manual_seed(seed))
        assert picks[0].item() == 1 and len(set(picks.tolist())) == 2
    gains = queries.epig(p_cand[None], p_targ[None], torch.full((1, 4), 0.25))[0]
    assert gains[1] > 0.1 and gains[0].abs() < 1e-6 and gains[2].abs() < 1e-6


def test_active_positions_are_each_users_best_questions_in_order_with_their_answers(paper_path):
    """train_policy.py's train.active_selector: every user of a sampler is asked, from their own
    answered pairs, what the belief values most, in order; the belief reads the recorded answers."""
    from data import EpisodeSampler, chosen_first
    sampler = EpisodeSampler(load_pairs(paper_path), "train", 4, 3, seed=0)
    seen = []

    class Likes:  # values a pair by the sum of its two options, whichever is shown first
        def infogain(self, context, mask, cand, targets):
            seen.append(context)
            return cand.sum((2, 3))

    positions = queries.active_positions(Likes(), sampler, 3, seed=1)
    users = torch.arange(len(sampler.counts))
    value = sampler.data.pairs[sampler.table].sum((2, 3))  # (L, W), every column answered here
    assert positions.shape == (len(users), 3)
    assert torch.equal(positions, value.topk(3, 1).indices)
    answered = chosen_first(sampler.data.pairs[sampler.table[users[:, None], positions]],
                            sampler.choice_table[users[:, None], positions].bool())
    assert torch.equal(torch.cat([c for c in seen if c.shape[1] == 2]), answered[:, :2])
