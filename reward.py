"""
Reward models over option features, each with its loss beside it.

- BTL: one reward r(x) for everybody; P(a > b) = sigmoid(r(a) - r(b)).
- DPL: mean-variance distributional preference learning (Siththaranjan et al., 2023):
  r(x) ~ N(mu(x), sigma(x)^2), P(a > b) = Phi((mu_a - mu_b) / sqrt(sigma_a^2 + sigma_b^2)).
- NP-BTL: r(x, z), z inferred from the user's context pairs by the NP encoder; the
  reward MLP's hidden layers are FiLM-modulated by z. Deterministic z is trained by
  the target negative log-likelihood; Gaussian z by the NP ELBO.

Every model takes an episode batch from data.EpisodeSampler (targets oriented as
(chosen, rejected)) and returns the log-probability that the chosen option wins.

    python reward.py        # prints the three models for the synthetic task

To be asked questions by a reward run: `python steer.py RUN --ask=3`.

Departures from the paper's code:
1. The stochastic NP-BTL's posterior is q(z | context + targets), encoded with the
   padding mask, and the ELBO is per target: mean NLL + beta * KL / num_targets.
2. A stochastic NP-BTL predicts with the posterior predictive E_{z ~ q(z | context)}
   [sigmoid(r(a, z) - r(b, z))] over model.predict_samples draws (0: at the mean of q,
   as the paper's code does). One z is one reward function: where the posterior still
   spreads over users who disagree, only the mixture can express their majority vote.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import CheckpointError
from data import DataError, choice_correct
from np_encoder import ContextEncoder, FiLM, gaussian_kl, mlp, modulate
from runs import load_checkpoint, resolve_path

MODEL_KINDS = ("btl", "dpl", "np_btl")


def btl_log_prob(reward_a, reward_b):
    """log P(a preferred to b) under Bradley-Terry-Luce."""
    return F.logsigmoid(reward_a - reward_b)


def dpl_log_prob(mean_a, mean_b, var_a, var_b):
    """log P(a preferred to b) when rewards are independent Gaussians."""
    return torch.special.log_ndtr((mean_a - mean_b) / torch.sqrt(var_a + var_b))


def target_metrics(log_prob):
    """Loss and accuracy of per-target log-probabilities of the chosen option (B, T)."""
    return -log_prob.mean(), choice_correct(log_prob).mean()


class BTL(nn.Module):
    def __init__(self, input_dim, hidden=64, layers=3):
        super().__init__()
        self.net = mlp([input_dim] + [hidden] * layers + [1])

    def rewards(self, options, latent=None):
        return self.net(options).squeeze(-1)  # (..., 2)

    def log_prob_chosen(self, batch):
        r = self.rewards(batch["targets"])  # (B, T, 2)
        return btl_log_prob(r[..., 0], r[..., 1])

    def loss(self, batch):
        loss, acc = target_metrics(self.log_prob_chosen(batch))
        return loss, {"loss": loss.item(), "acc": acc.item()}


class DPL(nn.Module):
    def __init__(self, input_dim, hidden=64, layers=3, min_var=1e-4):
        super().__init__()
        self.net = mlp([input_dim] + [hidden] * layers + [2])
        self.min_var = min_var

    def rewards(self, options, latent=None):
        """Mean rewards (..., 2); `mean_var` gives the variances too."""
        return self.mean_var(options)[0]

    def mean_var(self, options):
        mean, raw_var = self.net(options).unbind(-1)
        return mean, self.min_var + F.softplus(raw_var)

    def log_prob_chosen(self, batch):
        mean, var = self.mean_var(batch["targets"])  # (B, T, 2) each
        return dpl_log_prob(mean[..., 0], mean[..., 1], var[..., 0], var[..., 1])

    def loss(self, batch):
        loss, acc = target_metrics(self.log_prob_chosen(batch))
        return loss, {"loss": loss.item(), "acc": acc.item()}


class NPBTL(nn.Module):
    def __init__(self, input_dim, hidden=64, layers=3, latent_dim=16, encoder_hidden=64,
                 encoder_layers=2, aggregator="mean", stochastic=False, kl_beta=1.0, predict_samples=0):
        super().__init__()
        self.encoder = ContextEncoder(input_dim, encoder_hidden, latent_dim, encoder_layers,
                                      aggregator, stochastic)
        sizes = [input_dim] + [hidden] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.film = FiLM(latent_dim, hidden, num_layers=layers)
        self.out = nn.Linear(hidden, 1)
        self.stochastic, self.kl_beta = stochastic, kl_beta
        self.predict_samples = predict_samples if stochastic else 0  # 0: predict at the mean of q(z | context)

    def infer_latent(self, context, mask=None):
        """The latent used for prediction: z, or the mean of q(z | context)."""
        out = self.encoder(context, mask)
        return out[0] if self.stochastic else out

    def rewards(self, options, latent):
        """options (B, ..., D), latent (B, latent_dim) -> rewards (B, ...)."""
        gammas, betas = self.film(latent)  # (layers, B, H) each
        h = options
        for layer, gamma, beta in zip(self.layers, gammas, betas):
            h = F.gelu(modulate(layer(h), gamma, beta))
        return self.out(h).squeeze(-1)

    def log_prob_chosen(self, batch, latent=None, samples=None):
        """log P(chosen) of the targets (B, T): at `latent` if given, else the posterior
        predictive over `samples` draws of q(z | context) (default: self.predict_samples;
        0 = at the mean of q, or the deterministic z)."""
        samples = self.predict_samples if samples is None else samples
        if latent is None and samples > 0:
            return self.predictive_log_prob_chosen(batch, samples)
        if latent is None:
            latent = self.infer_latent(batch["context"], batch["context_mask"])
        r = self.rewards(batch["targets"], latent)  # (B, T, 2)
        return btl_log_prob(r[..., 0], r[..., 1])

    def predictive_log_prob_chosen(self, batch, samples):
        """log E_{z ~ q(z | context)}[sigmoid(r(a, z) - r(b, z))] by Monte Carlo: a mixture of
        rewards, so it can express what no single z can (a majority vote that is no ranking)."""
        if not self.stochastic:
            raise ValueError("the posterior predictive needs a stochastic encoder (model.encoder.stochastic)")
        mean, scale = self.encoder(batch["context"], batch["context_mask"])  # (B, latent_dim) each
        z = mean + scale * torch.randn(samples, *mean.shape, device=mean.device)  # (S, B, latent_dim)
        targets = batch["targets"].expand(samples, *batch["targets"].shape)  # (S, B, T, 2, D)
        r = self.rewards(targets.flatten(0, 1), z.flatten(0, 1)).view(samples, *targets.shape[1:4])  # (S, B, T, 2)
        return btl_log_prob(r[..., 0], r[..., 1]).logsumexp(0) - math.log(samples)

    def loss(self, batch):
        if not self.stochastic:
            loss, acc = target_metrics(self.log_prob_chosen(batch))
            return loss, {"loss": loss.item(), "acc": acc.item()}
        context, mask, targets = batch["context"], batch["context_mask"], batch["targets"]
        prior_mean, prior_scale = self.encoder(context, mask)
        everything = torch.cat([context, targets], dim=1)  # (B, n + T, 2, D)
        full_mask = torch.cat([mask, torch.ones(targets.shape[:2], dtype=torch.bool, device=mask.device)], 1)
        post_mean, post_scale = self.encoder(everything, full_mask)
        z = post_mean + post_scale * torch.randn_like(post_scale)
        nll, acc = target_metrics(self.log_prob_chosen(batch, latent=z))
        kl = gaussian_kl(post_mean, post_scale, prior_mean, prior_scale).mean()
        loss = nll + self.kl_beta * kl / targets.shape[1]
        return loss, {"loss": loss.item(), "nll": nll.item(), "kl": kl.item(), "acc": acc.item()}


MODEL_DEFAULTS = {
    "kind": "np_btl",  # np_btl | btl | dpl
    "hidden": 64,  # reward MLP width
    "layers": 3,  # reward MLP hidden layers
    "kl_beta": 1.0,  # KL weight in the ELBO (stochastic np_btl only)
    "predict_samples": 0,  # > 0: predict with the posterior predictive over this many z ~ q(z | context)
    "encoder": {
        "hidden": 64,  # context encoder width
        "layers": 2,  # pair-embedding MLP layers
        "latent_dim": 16,  # size of z
        "aggregator": "attention",  # attention (a learned query attends to the pairs) | mean | sum
        "stochastic": False,  # Gaussian z trained by the ELBO, else deterministic
    },
}


def build_model(model_config, input_dim):
    """model_config: a config's `model` section (MODEL_DEFAULTS)."""
    c, kind = model_config, model_config["kind"]
    if kind == "btl":
        return BTL(input_dim, c["hidden"], c["layers"])
    if kind == "dpl":
        return DPL(input_dim, c["hidden"], c["layers"])
    if kind == "np_btl":
        e = c["encoder"]
        return NPBTL(input_dim, c["hidden"], c["layers"], e["latent_dim"], e["hidden"], e["layers"],
                     e["aggregator"], e["stochastic"], c["kl_beta"], c.get("predict_samples", 0))
    raise ValueError(f"config key 'model.kind': unknown model '{kind}' (expected one of {MODEL_KINDS})")


def load_reward_model(path, input_dim, device="cpu", data_path="the data"):
    """A trained model from a run dir (its ckpt_best.pt) or a checkpoint file; returns (model, config).
    Options of another dimension than the run was trained on (from `data_path`) are a DataError."""
    checkpoint = load_checkpoint(path, map_location=device)
    if "policy_config" in checkpoint:
        raise CheckpointError(f"{path} is a policy run (made by train_policy.py), not a reward run")
    trained_dim = checkpoint.get("data_dim")  # older checkpoints lack it
    if trained_dim is not None and trained_dim != input_dim:
        raise DataError(f"{data_path} has options of dimension {input_dim}, but {path} was trained on "
                        f"dimension {trained_dim}")
    model = build_model(checkpoint["config"]["model"], input_dim).to(device)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise DataError(f"{data_path} has options of dimension {input_dim}, but the weights in {path} are for "
                        "another dimension (the data file changed since training?)") from None
    return model.eval(), checkpoint["config"]


def run_data_path(path):
    """The data file a reward run was trained on, as seen from here (the run may have been
    trained in another folder, with a relative data.path)."""
    checkpoint = load_checkpoint(path)
    if "policy_config" in checkpoint:
        raise CheckpointError(f"{path} is a policy run (made by train_policy.py), not a reward run: "
                              "policy.py steers and asks for policies")
    recorded = checkpoint["config"]["data"]["path"]
    resolved = resolve_path(recorded, checkpoint)
    if not os.path.exists(resolved):
        where = f" or from {checkpoint['cwd']}, where the run was trained" if checkpoint.get("cwd") else ""
        raise DataError(f"{recorded}: the data file of {path} is not found (from here{where})")
    return resolved


if __name__ == "__main__":
    for kind in MODEL_KINDS:
        model = build_model(dict(MODEL_DEFAULTS, kind=kind), input_dim=1)
        print(kind, sum(p.numel() for p in model.parameters()), "parameters\n", model)
