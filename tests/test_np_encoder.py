import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from np_encoder import AGGREGATORS, ContextEncoder, FiLM, gaussian_kl, modulate

ENCODERS = [(aggregator, stochastic) for aggregator in AGGREGATORS for stochastic in (False, True)]
D = 2  # option features


def make_encoder(aggregator, stochastic):
    torch.manual_seed(0)
    encoder = ContextEncoder(D, hidden=16, latent_dim=4, aggregator=aggregator, stochastic=stochastic, num_heads=2)
    with torch.no_grad():
        encoder.empty_summary.normal_()  # a learned prior that is not the zero vector
    return encoder


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_close(a, b, atol=1e-5):
    for x, y in zip(as_tuple(a), as_tuple(b), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def prior(encoder, batch_size=1):
    """The latent of an empty context, from the learned summary through the head."""
    out = encoder.head(encoder.empty_summary.expand(batch_size, -1))
    if not encoder.stochastic:
        return out
    mean, raw_scale = out.chunk(2, dim=-1)
    return mean, encoder.min_scale + (1 - encoder.min_scale) * torch.nn.functional.softplus(raw_scale)


@pytest.mark.parametrize("aggregator, stochastic", ENCODERS)
def test_permutation_invariance(aggregator, stochastic):
    encoder = make_encoder(aggregator, stochastic)
    context = torch.randn(3, 6, 2, D)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 1]]).bool()
    perm = torch.randperm(6)
    assert_close(encoder(context, mask), encoder(context[:, perm], mask[:, perm]))
    assert_close(encoder(context), encoder(context[:, perm]))


@pytest.mark.parametrize("aggregator, stochastic", ENCODERS)
def test_empty_context_gives_the_learned_prior(aggregator, stochastic):
    encoder = make_encoder(aggregator, stochastic)
    empty = encoder(torch.randn(2, 0, 2, D))
    assert_close(empty, prior(encoder, 2), atol=1e-6)
    # a fully masked row inside a batch: the prior, finite, and the other rows untouched
    context, mask = torch.randn(3, 4, 2, D), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]).bool()
    out = as_tuple(encoder(context, mask))
    assert all(torch.isfinite(x).all() for x in out)
    assert_close(tuple(x[1:2] for x in out), as_tuple(prior(encoder)), atol=1e-6)
    assert_close(tuple(x[2:] for x in out), as_tuple(encoder(context[2:])))


@pytest.mark.parametrize("aggregator, stochastic", ENCODERS)
def test_padded_batch_equals_unpadded_episodes(aggregator, stochastic):
    encoder = make_encoder(aggregator, stochastic)
    sizes = [0, 2, 5, 3]
    context = 100 * torch.randn(len(sizes), max(sizes), 2, D)  # padding holds large garbage
    mask = torch.arange(max(sizes))[None] < torch.tensor(sizes)[:, None]
    padded = as_tuple(encoder(context, mask))
    for i, n in enumerate(sizes):
        alone = encoder(context[i:i + 1, :n])  # (1, n, 2, D), no mask
        assert_close(tuple(x[i:i + 1] for x in padded), as_tuple(alone))


@pytest.mark.parametrize("aggregator, stochastic", ENCODERS)
def test_extended_contexts_equal_encoding_each_one(aggregator, stochastic):
    # queries.py's look-ahead: each context plus one more pair; the shortcut must equal the long way
    encoder = make_encoder(aggregator, stochastic)
    sizes, C = [0, 2, 5], 3
    context = 100 * torch.randn(len(sizes), max(sizes), 2, D)  # padding holds large garbage
    mask = torch.arange(max(sizes))[None] < torch.tensor(sizes)[:, None]
    new = torch.randn(len(sizes), C, 2, D)
    out = as_tuple(encoder.extended(context, mask, new))
    for i, n in enumerate(sizes):
        for c in range(C):
            alone = encoder(torch.cat([context[i:i + 1, :n], new[i:i + 1, c:c + 1]], 1))
            assert_close(tuple(x[i * C + c:i * C + c + 1] for x in out), as_tuple(alone))


def test_sum_and_mean_aggregate_by_hand():
    context = torch.randn(2, 3, 2, D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    chosen, rejected = context[:, :, 0], context[:, :, 1]
    for aggregator in ("sum", "mean"):
        encoder = make_encoder(aggregator, False)
        pair = encoder.pair_net(torch.cat([chosen, rejected, chosen - rejected], -1))  # (2, 3, H)
        expected = torch.stack([pair[0, :2].sum(0), pair[1].sum(0)])
        if aggregator == "mean":
            expected = expected / torch.tensor([[2.0], [3.0]])
        assert_close(encoder.aggregate(pair, mask), expected, atol=1e-6)


def test_stochastic_scale_is_at_least_min_scale():
    encoder = make_encoder("mean", True)
    with torch.no_grad():
        encoder.head[-1].bias.fill_(-50.0)  # softplus(-50) is about 0
    _, scale = encoder(torch.randn(4, 3, 2, D))
    assert (scale >= encoder.min_scale).all()
    torch.testing.assert_close(scale, torch.full_like(scale, encoder.min_scale), atol=1e-6, rtol=0)


def test_unknown_aggregator_is_named():
    with pytest.raises(ValueError, match="aggregator must be one of .* got 'max'"):
        ContextEncoder(D, aggregator="max")


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean_q, mean_p = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    scale_q, scale_p = torch.rand(5, 7, dtype=torch.float64) + 0.1, torch.rand(5, 7, dtype=torch.float64) + 0.1
    expected = kl_divergence(Independent(Normal(mean_q, scale_q), 1), Independent(Normal(mean_p, scale_p), 1))
    torch.testing.assert_close(gaussian_kl(mean_q, scale_q, mean_p, scale_p), expected)
    torch.testing.assert_close(gaussian_kl(mean_q, scale_q, mean_q, scale_q), torch.zeros(5, dtype=torch.float64))


def test_film_is_the_identity_at_init():
    film = FiLM(latent_dim=4, features=8, num_layers=3)
    gamma, beta = film(torch.randn(5, 4))
    assert gamma.shape == beta.shape == (3, 5, 8)
    assert torch.equal(gamma, torch.ones(3, 5, 8)) and torch.equal(beta, torch.zeros(3, 5, 8))
    hidden = torch.randn(5, 6, 2, 8)
    assert torch.equal(modulate(hidden, gamma[0], beta[0]), hidden)


def test_modulate_broadcasts_over_middle_dims():
    hidden, gamma, beta = torch.randn(3, 4, 2, 5), torch.randn(3, 5), torch.randn(3, 5)
    expected = torch.stack([hidden[b] * gamma[b] + beta[b] for b in range(3)])
    torch.testing.assert_close(modulate(hidden, gamma, beta), expected)
