"""
The neural-process context encoder and the FiLM conditioning block, shared by the
reward model (reward.py) and the policy (policy.py).

A context is a set of n pairs (chosen, rejected) of one user. Each pair is embedded
by an MLP on [chosen, rejected, chosen - rejected]; the set is aggregated by a
masked mean, a masked sum, or self-attention read out through a learned query
token; a head maps the summary to a latent z (deterministic) or to a Gaussian
q(z | context) (stochastic). An empty context (n = 0) yields a learned prior.
`extended` encodes a context plus each of many one-pair answers without re-embedding
the context (queries.py's look-ahead).

    python np_encoder.py        # prints the encoder and a latent for a random context

Departures from the paper's code:
1. Padding is masked everywhere, so episodes with different n share one batch and a
   padded batch gives the same latents as its unpadded episodes.
2. n = 0 is a first-class case (a learned summary), not a zero vector fed through
   the head.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

AGGREGATORS = ("mean", "sum", "attention")


def mlp(sizes, activation=nn.GELU):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class ContextEncoder(nn.Module):
    def __init__(self, input_dim, hidden=64, latent_dim=16, layers=2, aggregator="mean",
                 stochastic=False, num_heads=4, min_scale=1e-3):
        super().__init__()
        if aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}, got '{aggregator}'")
        self.aggregator, self.stochastic, self.min_scale = aggregator, stochastic, min_scale
        self.latent_dim = latent_dim
        self.pair_net = mlp([3 * input_dim] + [hidden] * layers)
        self.empty_summary = nn.Parameter(torch.zeros(hidden))  # the summary of n = 0
        if aggregator == "attention":
            self.attention = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
            self.query = nn.Parameter(torch.randn(1, 1, hidden) / math.sqrt(hidden))
        self.head = mlp([hidden, hidden, 2 * latent_dim if stochastic else latent_dim])

    def forward(self, context, mask=None):
        """context (B, n, 2, D) as (chosen, rejected); mask (B, n) bool, True = real pair.

        Returns z (B, latent_dim), or (mean, scale) of q(z | context) if stochastic.
        """
        B, n = context.shape[:2]
        if mask is None:
            mask = torch.ones(B, n, dtype=torch.bool, device=context.device)
        return self.from_summary(self.aggregate(self.embed(context), mask))

    def embed(self, pairs):
        """(..., 2, D) pairs as (chosen, rejected) -> (..., H)."""
        chosen, rejected = pairs[..., 0, :], pairs[..., 1, :]
        return self.pair_net(torch.cat([chosen, rejected, chosen - rejected], dim=-1))

    def extended(self, context, mask, new):
        """forward() of each context (B, n, 2, D) with one more pair, each of new (B, C, 2, D):
        outputs for B * C contexts, in (b, c) order. A mean or sum aggregator adds the new pair's
        embedding to the context's sum; attention adds the new pair's key to the softmax over the
        context's keys. Either way the n pairs are embedded once, not C times."""
        h, h_new = self.embed(context), self.embed(new)  # (B, n, H), (B, C, H)
        if self.aggregator == "attention":
            summary = self.attend_extended(h, mask, h_new)
        else:
            summary = (h * mask[..., None]).sum(1)[:, None] + h_new
            if self.aggregator == "mean":
                summary = summary / (mask.sum(1) + 1)[:, None, None]
        return self.from_summary(summary.flatten(0, 1))

    def attend_extended(self, h, mask, h_new):
        """aggregate() by attention of each context plus one more pair: (B, C, H). Per head, the
        softmax over the query token and the context's keys is kept as its maximum logit, its sum of
        exponentials and its exponential-weighted values, and each new key is added to them."""
        att, (B, n, H), C = self.attention, h.shape, h_new.shape[1]
        heads, d = att.num_heads, H // att.num_heads
        (w_q, w_k, w_v), (b_q, b_k, b_v) = att.in_proj_weight.chunk(3), att.in_proj_bias.chunk(3)
        q = F.linear(self.query[0, 0], w_q, b_q).view(heads, d) / math.sqrt(d)
        keys = torch.cat([self.query.expand(B, 1, H), h], 1)  # the query token is always a key
        k, v = F.linear(keys, w_k, b_k).view(B, n + 1, heads, d), F.linear(keys, w_v, b_v).view(B, n + 1, heads, d)
        logits = torch.einsum("bnhd,hd->bnh", k, q).masked_fill(~F.pad(mask, (1, 0), value=True)[..., None], -math.inf)
        top = logits.amax(1)  # (B, heads)
        e = (logits - top[:, None]).exp()
        total, weighted = e.sum(1), torch.einsum("bnh,bnhd->bhd", e, v)
        k_new, v_new = F.linear(h_new, w_k, b_k).view(B, C, heads, d), F.linear(h_new, w_v, b_v).view(B, C, heads, d)
        logit_new = torch.einsum("bchd,hd->bch", k_new, q)
        new_top = torch.maximum(top[:, None], logit_new)  # (B, C, heads)
        old, fresh = (top[:, None] - new_top).exp(), (logit_new - new_top).exp()
        out = old[..., None] * weighted[:, None] + fresh[..., None] * v_new  # (B, C, heads, d)
        out = out / (old * total[:, None] + fresh)[..., None]
        return att.out_proj(out.flatten(-2))

    def from_summary(self, summary):
        out = self.head(summary)
        if not self.stochastic:
            return out
        mean, raw_scale = out.chunk(2, dim=-1)
        return mean, self.min_scale + (1 - self.min_scale) * F.softplus(raw_scale)

    def aggregate(self, h, mask):
        count = mask.sum(1, keepdim=True)  # (B, 1)
        if self.aggregator == "attention":
            query = self.query.expand(h.shape[0], 1, -1)
            keys = torch.cat([query, h], dim=1)  # the query token is always present
            key_padding = torch.cat([mask.new_zeros(mask.shape[0], 1), ~mask], dim=1)
            out, _ = self.attention(query, keys, keys, key_padding_mask=key_padding, need_weights=False)
            summary = out[:, 0]
        else:
            summary = (h * mask[..., None]).sum(1)
            if self.aggregator == "mean":
                summary = summary / count.clamp(min=1)
        return torch.where(count > 0, summary, self.empty_summary)


def gaussian_kl(mean_q, scale_q, mean_p, scale_p):
    """KL(N(mean_q, scale_q) || N(mean_p, scale_p)) for diagonal Gaussians, summed over the last dim."""
    var_ratio = (scale_q / scale_p) ** 2
    diff = ((mean_q - mean_p) / scale_p) ** 2
    return 0.5 * (var_ratio + diff - 1 - var_ratio.log()).sum(-1)


class FiLM(nn.Module):
    """Feature-wise linear modulation from a latent: h -> gamma(z) * h + beta(z).

    The generator's last layer starts at zero, so gamma = 1 and beta = 0 at
    initialisation and the conditioned network starts exactly as the unconditioned one.
    `num_layers` independent (gamma, beta) pairs come from one generator.
    """

    def __init__(self, latent_dim, features, num_layers=1, hidden=None):
        super().__init__()
        self.features, self.num_layers = features, num_layers
        hidden = hidden or max(latent_dim, 64)
        self.net = mlp([latent_dim, hidden, 2 * features * num_layers])
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z):
        """z (B, latent_dim) -> gamma, beta, each (num_layers, B, features)."""
        out = self.net(z).view(z.shape[0], self.num_layers, 2, self.features)
        gamma, beta = (1 + out[:, :, 0]).transpose(0, 1), out[:, :, 1].transpose(0, 1)
        return gamma, beta


def modulate(hidden, gamma, beta):
    """hidden (B, ..., F) or (1, ..., F), shared by the B latents; gamma, beta (B, F)."""
    shape = (gamma.shape[0],) + (1,) * (hidden.dim() - 2) + (hidden.shape[-1],)
    return torch.addcmul(beta.view(shape), hidden, gamma.view(shape))


if __name__ == "__main__":
    torch.manual_seed(0)
    encoder = ContextEncoder(input_dim=1, aggregator="attention", stochastic=True)
    print(encoder)
    mean, scale = encoder(torch.rand(2, 5, 2, 1), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool())
    print("mean", mean, "\nscale", scale)
