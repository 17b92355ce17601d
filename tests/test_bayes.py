"""bayes.py: the Bayes-optimal reference, by hand and by its limits."""

import math

import pytest
import torch

from bayes import bayes_log_prob_chosen, population_log_prob_chosen
from data import EpisodeSampler, choice_correct, make_paper_synthetic


# -----------------------------------------------------------------------------
# Bayes-optimal predictor


def test_bayes_optimal_on_the_paper_task_is_one_minus_half_to_the_n_plus_2():
    d = make_paper_synthetic(num_pairs=10000, seed=1)
    sampler = EpisodeSampler(d, "train", num_targets=20, max_context=5, seed=0)  # 8000 pairs per label
    for n in (0, 1, 2, 3, 5):
        batch = sampler.sample(1000, num_context=n)  # standard error about 0.002 at n = 0
        accuracy = choice_correct(bayes_log_prob_chosen(d.meta, batch)).mean().item()
        assert accuracy == pytest.approx(1 - 0.5 ** (n + 2), abs=0.01), n


def test_bayes_posterior_is_certain_after_a_conflicting_pair():
    meta = {"generator": "paper", "temperature": 0.0}
    conflict = torch.tensor([[0.9], [0.6]])  # type0 prefers 0.9, type1 prefers 0.6
    agree = torch.tensor([[0.3], [0.1]])  # both prefer 0.3
    batch = {"context": torch.stack([conflict, agree])[None], "context_mask": torch.tensor([[True, True]]),
             "targets": torch.stack([torch.tensor([[0.7], [0.8]]), agree])[None]}
    # the context says type0, who prefers 0.8 to 0.7: the chosen-first target (0.7, 0.8) has probability 0
    log_prob = bayes_log_prob_chosen(meta, batch)
    assert torch.equal(log_prob.exp(), torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    masked = bayes_log_prob_chosen(meta, dict(batch, context_mask=torch.tensor([[False, True]])))
    assert torch.allclose(masked.exp(), torch.tensor([[0.5, 1.0]], dtype=torch.float64))


def test_bayes_is_none_for_an_unknown_generator(population):
    batch = EpisodeSampler(population, "train", num_targets=2, max_context=2).sample(3)
    assert bayes_log_prob_chosen({"generator": "embedder"}, batch) is None


def one_dim_episode(context_pairs, target_pairs):
    """A batch of one episode on 1-D options: a population of users w = +1 or -1 (the unit sphere in 1-D)."""
    context = torch.tensor(context_pairs, dtype=torch.float32).view(1, -1, 2, 1)
    return {"context": context, "context_mask": torch.ones(context.shape[:2], dtype=torch.bool),
            "targets": torch.tensor(target_pairs, dtype=torch.float32).view(1, -1, 2, 1)}


def test_population_bayes_by_hand_deterministic_users():
    batch = one_dim_episode([[0.9, 0.2]], [[0.7, 0.3], [0.3, 0.7]])  # chose the larger: w = +1
    meta = {"generator": "linear_population", "temperature": 0.0}
    assert torch.allclose(bayes_log_prob_chosen(meta, batch).exp(), torch.tensor([[1.0, 0.0]]))
    no_context = dict(batch, context_mask=torch.zeros(1, 1, dtype=torch.bool))
    assert torch.allclose(bayes_log_prob_chosen(meta, no_context).exp(), torch.tensor([[0.5, 0.5]]), atol=0.02)


def test_population_bayes_without_context_is_exactly_one_half(population):
    """A symmetric prior gives P = 1/2 for every pair at n = 0: no Monte Carlo noise, in 3-D and at T > 0."""
    batch = EpisodeSampler(population, "test", num_targets=10, max_context=5, seed=0).sample(32, num_context=0)
    for temperature in (0.0, 0.1):
        log_prob, groups = population_log_prob_chosen({"temperature": temperature}, batch, num_samples=400)
        assert (choice_correct(log_prob) == 0.5).all() and (choice_correct(groups) == 0.5).all()  # exact ties


def test_population_bayes_by_hand_bradley_terry_users():
    """Posterior over w = +1 / -1 after choosing 0.6 over 0.5 at temperature 0.1, then the predictive."""
    batch = one_dim_episode([[0.6, 0.5]], [[0.8, 0.2]])
    meta = {"generator": "linear_population", "temperature": 0.1}
    sig = lambda x: 1 / (1 + math.exp(-x))
    plus = sig(1.0) / (sig(1.0) + sig(-1.0))  # P(w = +1 | context)
    exact = plus * sig(6.0) + (1 - plus) * sig(-6.0)
    log_prob, groups = population_log_prob_chosen(meta, batch, num_samples=20000)
    assert log_prob.exp().item() == pytest.approx(exact, abs=0.01)
    assert groups.shape == (4, 1, 1) and torch.allclose(groups.exp(), log_prob.exp(), atol=0.02)
