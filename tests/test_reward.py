import math

import pytest
import torch
import torch.nn.functional as F

import bayes
import data
import reward
from data import EpisodeSampler, choice_correct, load_pairs, paper_rewards
from np_encoder import AGGREGATORS
from reward import (BTL, DPL, MODEL_KINDS, NPBTL, btl_log_prob, build_model, dpl_log_prob, load_reward_model,
                    target_metrics)
from runs import save_checkpoint
from train_reward import DEFAULTS

D = 2  # option features
MODEL_CONFIG = dict(DEFAULTS["model"], hidden=16, encoder=dict(DEFAULTS["model"]["encoder"], hidden=16, latent_dim=4))


def episode_batch(sizes, num_targets=3, seed=0):
    """Random episodes with n = sizes[i] real context pairs, padded with garbage to max(sizes)."""
    gen = torch.Generator().manual_seed(seed)
    n_max = max(sizes)
    return {"context": 10 * torch.randn(len(sizes), n_max, 2, D, generator=gen),
            "context_mask": torch.arange(n_max)[None] < torch.tensor(sizes)[:, None],  # (B, n_max)
            "targets": torch.randn(len(sizes), num_targets, 2, D, generator=gen)}


def np_btl(aggregator="mean", stochastic=False, kl_beta=1.0):
    """A small NP-BTL whose FiLM is moved off its identity init, so the latent matters."""
    torch.manual_seed(0)
    model = NPBTL(D, hidden=16, latent_dim=4, encoder_hidden=16, aggregator=aggregator, stochastic=stochastic,
                  kl_beta=kl_beta)
    with torch.no_grad():
        model.film.net[-1].weight.normal_(std=0.5)
    return model


# -----------------------------------------------------------------------------
# probabilities against hand computations


def test_btl_log_prob_by_hand():
    cases = [(0.3, -1.2), (2.0, 2.0), (-40.0, 10.0), (5.0, -3.0)]
    a, b = (torch.tensor(x, dtype=torch.float64) for x in zip(*cases))
    expected = [math.log(1 / (1 + math.exp(-(x - y)))) for x, y in cases]
    torch.testing.assert_close(btl_log_prob(a, b), torch.tensor(expected, dtype=torch.float64))


def test_dpl_log_prob_by_hand():
    cases = [(0.3, -1.2, 0.5, 0.1), (1.0, 1.0, 2.0, 1.0), (-0.4, 2.0, 0.3, 0.9), (3.0, 0.5, 1.0, 1.0)]
    ma, mb, va, vb = (torch.tensor(x, dtype=torch.float64) for x in zip(*cases))
    normal_cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    expected = [math.log(normal_cdf((a - b) / math.sqrt(s + t))) for a, b, s, t in cases]
    torch.testing.assert_close(dpl_log_prob(ma, mb, va, vb), torch.tensor(expected, dtype=torch.float64))


def test_choice_correct_and_target_metrics():
    log_prob = torch.log(torch.tensor([[0.9, 0.5], [0.2, 0.7]]))
    assert torch.equal(choice_correct(log_prob), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    loss, acc = target_metrics(log_prob)
    assert loss.item() == pytest.approx(-math.log(0.9 * 0.5 * 0.2 * 0.7) / 4)
    assert acc.item() == pytest.approx(0.625)


def test_btl_scores_its_own_rewards_and_ignores_the_context():
    torch.manual_seed(0)
    model, batch = BTL(D, hidden=8), episode_batch([2, 4])
    r = model.net(batch["targets"])[..., 0]  # (B, T, 2)
    torch.testing.assert_close(model.log_prob_chosen(batch), F.logsigmoid(r[..., 0] - r[..., 1]))
    other = episode_batch([0, 1], seed=1)
    assert torch.equal(model.log_prob_chosen(batch), model.log_prob_chosen(dict(other, targets=batch["targets"])))


def test_dpl_scores_its_own_rewards_by_hand():
    torch.manual_seed(0)
    model, batch = DPL(D, hidden=8), episode_batch([1], num_targets=4)
    out = model.net(batch["targets"])[0].double()  # (T, 2, 2): option, (mean, raw variance)
    var = model.min_var + F.softplus(out[..., 1])
    assert (var >= model.min_var).all()
    expected = [math.log(0.5 * (1 + math.erf((m[0] - m[1]).item() / math.sqrt(2 * (v[0] + v[1]).item()))))
                for m, v in zip(out[..., 0], var)]
    torch.testing.assert_close(model.log_prob_chosen(batch)[0].double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# NP-BTL


def test_np_btl_at_init_ignores_the_context_and_equals_a_plain_mlp():
    torch.manual_seed(0)
    model = NPBTL(D, hidden=16, latent_dim=4, encoder_hidden=16, aggregator="attention")
    batch, other = episode_batch([3, 0, 5]), episode_batch([1, 4, 2], seed=1)
    log_prob = model.log_prob_chosen(batch)
    assert torch.equal(log_prob, model.log_prob_chosen(dict(other, targets=batch["targets"])))
    h = batch["targets"]
    for layer in model.layers:
        h = F.gelu(layer(h))
    r = model.out(h)[..., 0]  # (B, T, 2)
    torch.testing.assert_close(log_prob, btl_log_prob(r[..., 0], r[..., 1]))


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_np_btl_padded_batch_equals_unpadded_episodes(aggregator, stochastic):
    model, sizes = np_btl(aggregator, stochastic), [0, 3, 1, 5]
    batch = episode_batch(sizes)
    padded = model.log_prob_chosen(batch)  # (B, T)
    assert not torch.allclose(padded[1], model.log_prob_chosen(dict(batch, context_mask=~batch["context_mask"]))[1])
    for i, n in enumerate(sizes):
        alone = {"context": batch["context"][i:i + 1, :n], "context_mask": torch.ones(1, n, dtype=torch.bool),
                 "targets": batch["targets"][i:i + 1]}
        torch.testing.assert_close(padded[i:i + 1], model.log_prob_chosen(alone), atol=1e-5, rtol=0)


def test_deterministic_np_btl_loss_is_the_target_nll():
    model, batch = np_btl(), episode_batch([2, 3])
    loss, metrics = model.loss(batch)
    log_prob = model.log_prob_chosen(batch)
    torch.testing.assert_close(loss, -log_prob.mean())
    assert metrics["acc"] == pytest.approx(choice_correct(log_prob).mean().item())


@pytest.mark.parametrize("kl_beta", [0.0, 2.5])
def test_stochastic_np_btl_elbo(kl_beta):
    model, batch = np_btl("attention", stochastic=True, kl_beta=kl_beta), episode_batch([2, 0, 4], num_targets=5)
    loss, metrics = model.loss(batch)
    assert metrics["kl"] >= 0
    assert loss.item() == pytest.approx(metrics["nll"] + kl_beta * metrics["kl"] / 5, rel=1e-6)
    loss.backward()  # gradients reach the encoder through the reparameterised sample
    assert model.encoder.pair_net[0].weight.grad.abs().sum() > 0


def test_stochastic_np_btl_predicts_at_the_posterior_mean():
    model, batch = np_btl("mean", stochastic=True), episode_batch([2, 3])
    mean, _ = model.encoder(batch["context"], batch["context_mask"])
    torch.testing.assert_close(model.infer_latent(batch["context"], batch["context_mask"]), mean)
    assert torch.equal(model.log_prob_chosen(batch), model.log_prob_chosen(batch))  # no sampling at prediction


def test_build_model_unknown_kind_names_the_key():
    with pytest.raises(ValueError, match="config key 'model.kind': unknown model 'gpt'"):
        build_model(dict(MODEL_CONFIG, kind="gpt"), D)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_load_reward_model_gives_identical_log_probs(tmp_path, kind):
    config = {"model": dict(MODEL_CONFIG, kind=kind)}
    torch.manual_seed(0)
    model = build_model(config["model"], D).eval()
    save_checkpoint(str(tmp_path / "ckpt_best.pt"), {"model": model.state_dict(), "config": config, "step": 1})
    loaded, loaded_config = load_reward_model(str(tmp_path), D)
    batch = episode_batch([2, 0])
    assert not loaded.training and loaded_config == config
    assert torch.equal(loaded.log_prob_chosen(batch), model.log_prob_chosen(batch))


# -----------------------------------------------------------------------------
# the latent is used, on a trained model


@pytest.fixture(scope="module")
def trained(np_btl_run, paper_path):
    model, _ = load_reward_model(np_btl_run[0], 1)
    return model, EpisodeSampler(load_pairs(paper_path), "test", num_targets=50, max_context=10, seed=0)


def agreement_with_types(model, batch):
    """Fraction of targets on which the model's pick agrees with each true type's pick: (K,)."""
    pick_first = model.log_prob_chosen(batch) > math.log(0.5)  # (B, T)
    rewards = paper_rewards(batch["targets"][..., 0])  # (B, T, 2, K)
    return (pick_first[..., None] == (rewards[..., 0, :] > rewards[..., 1, :])).float().mean((0, 1))


@torch.no_grad()
def test_flipping_a_type0_context_makes_the_model_follow_type1(trained):
    model, sampler = trained
    batch = sampler.sample(200, num_context=10, label_rows=torch.zeros(200, dtype=torch.long))
    as_given = agreement_with_types(model, batch)
    flipped = agreement_with_types(model, dict(batch, context=batch["context"].flip(2)))
    assert as_given[0] > 0.9 and as_given[0] > as_given[1] + 0.2
    assert flipped[1] > 0.9 and flipped[1] > flipped[0] + 0.2


@torch.no_grad()
def test_ten_context_pairs_beat_none(trained):
    model, sampler = trained
    batch = sampler.sample(400, num_context=10)
    accuracy = lambda b: choice_correct(model.log_prob_chosen(b)).mean().item()
    with_context = accuracy(batch)
    without = accuracy(dict(batch, context_mask=torch.zeros_like(batch["context_mask"])))
    assert with_context > 0.95 and with_context > without + 0.15


# -----------------------------------------------------------------------------
# the posterior predictive


def cyclic_triple(meta, grid=60):
    """Options y1, y2, y3 whose majority preference (n = 0) is a cycle under the generator."""
    ys = torch.linspace(0.01, 0.99, grid)
    rewards = data.true_rewards(meta, ys[:, None])  # (G, K)
    beats = (rewards[:, None] > rewards[None]).float().mean(-1) > 0.5  # (G, G): i beats j by majority
    cycles = torch.nonzero(beats[:, :, None] & beats[None, :, :] & beats.T[:, None, :])  # i > j > k > i
    a, b, c = cycles[0].tolist()
    return ys[a], ys[b], ys[c]


class EvenPrior(torch.nn.Module):
    """q(z | context) = N(0, I) in 3-D: z's argmax is each of 3 types with probability 1/3."""
    def forward(self, context, mask):
        return torch.zeros(len(context), 3), torch.ones(len(context), 3)


def test_the_posterior_predictive_expresses_a_majority_vote_that_no_single_latent_can():
    """A model that has learned the types exactly (z's argmax picks a type's true reward) and
    q(z | no context) that spreads evenly over them: its predictive is the Bayes-optimal
    n = 0 answer, the majority vote, even on a cycle; every single z gives a ranking."""
    generated = data.make_waves_synthetic(num_pairs=10, num_types=3, seed=0)
    model = reward.NPBTL(1, latent_dim=3, stochastic=True, predict_samples=3000)
    model.encoder = EvenPrior()
    def rewards(options, latent):  # (B, ..., 1), (B, 3) -> (B, ...): type argmax(z)'s true reward
        per_type = 1000 * data.true_rewards(generated.meta, options)  # (B, ..., 3): near-deterministic choices
        index = latent.argmax(-1).view(-1, *[1] * (per_type.dim() - 1)).expand(*per_type.shape[:-1], 1)
        return per_type.gather(-1, index).squeeze(-1)
    model.rewards = rewards
    y1, y2, y3 = cyclic_triple(generated.meta)
    targets = torch.tensor([[[y1, y2], [y2, y3], [y3, y1]]])[..., None]  # (1, 3, 2, 1): each first option wins
    batch = {"context": torch.zeros(1, 0, 2, 1), "context_mask": torch.zeros(1, 0, dtype=torch.bool),
             "targets": targets}
    torch.manual_seed(0)
    assert (model.log_prob_chosen(batch).exp() > 0.5).all()  # the predictive follows the cycle
    optimal = bayes.bayes_log_prob_chosen(generated.meta, batch).exp()
    assert torch.allclose(model.log_prob_chosen(batch).exp(), optimal.float(), atol=0.03)
    for k in range(3):  # any single z is one type's ranking: it loses at least one pair of the cycle
        latent = torch.nn.functional.one_hot(torch.tensor([k]), 3).float()
        assert (model.log_prob_chosen(batch, latent=latent).exp() < 0.5).any()
