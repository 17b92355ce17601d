"""
The steerable policy of NP-DPO: a causal LM with LoRA adapters whose decoder layers
are FiLM-modulated by a user latent z, the context encoder that infers z from the
user's context pairs, and the DPO loss.

    pi(y | x, z): the output hidden states h (B, T, H) of each conditioned decoder
    layer become gamma(z) * h + beta(z). FiLM starts at identity and LoRA's B at zero,
    so a fresh policy computes exactly the base model.

The DPO reference is the same network with LoRA and FiLM switched off
(`reference_mode()`), so the base weights are held once. With `encoder.latent_dim = 0`
there is no FiLM and no encoder: the same code is plain DPO with LoRA.

Steer a trained policy with a user's few choices: steer.py.

Usage:
    policy = SteerablePolicy(build_base_model("Qwen/Qwen2-0.5B"), config, context_dim=D)
    latent = policy.infer_latent(context, context_mask)          # (B, latent_dim)
    logits = policy(input_ids, attention_mask, latent=latent)   # one latent per row
    with policy.conditioned(latent): ...                         # or for a whole block
    out = policy.generate(prompt_ids, attention_mask, latent=latent, num_return_sequences=4)
    loss, metrics = dpo_step(policy, batch, beta=0.1)

A checkpoint holds only what is trained (LoRA, FiLM, encoder) plus the policy
config; `load_policy` rebuilds the base model from `policy.base` and loads them.

Departures from the paper's code:
1. The reference is not a deep copy of the base model (TRL's create_reference_model)
   but the policy's own network with adapters disabled and no FiLM: one copy of the
   base weights in memory. It runs in eval mode (no dropout), as TRL's copy does.
2. One FiLM generator (np_encoder.FiLM, a 2-layer MLP) emits every conditioned
   layer's (gamma, beta) rather than a separate single-linear FiLM per layer.
3. In generate(), each latent is repeated for the num_return_sequences / num_beams
   copies of its prompt (the paper's code passes the unexpanded latent). A latent
   whose rows cannot match the batch is an error, never a silent broadcast.
4. The response log-probability shifts labels by slicing, not torch.roll; a response
   mask on position 0 (which no logit predicts) is an error, where torch.roll would
   score that token with the last position's logits.
"""

import contextlib
import copy
import functools
import operator
import os
import shutil
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import REQUIRED, CheckpointError, ConfigError
from data import choice_correct
from np_encoder import ContextEncoder, FiLM, modulate
from runs import load_checkpoint, resolve_path, save_checkpoint

DEFAULTS = {
    "base": REQUIRED,  # hub name or local path of the causal LM
    "dtype": "float32",  # dtype of the base weights: float32, bfloat16 or float16
    "trust_remote_code": False,  # run modelling code shipped with the checkpoint
    "lora": {
        "r": 8,  # adapter rank
        "alpha": 16,  # scaling numerator: the update is (alpha / r) * B A
        "dropout": 0.05,  # dropout on the adapter input
        "targets": None,  # module names; None = LORA_TARGETS[model_type]
    },
    "film": {
        "hidden": 64,  # width of the FiLM generator's hidden layer
        "layers": None,  # indices of conditioned decoder layers; None = all
    },
    "encoder": {  # the layout of reward.MODEL_DEFAULTS["encoder"]
        "hidden": 256,  # width of the context encoder
        "layers": 2,  # depth of its pair MLP
        "latent_dim": 16,  # size of z; 0 = no z: no FiLM and no encoder (plain DPO)
        "aggregator": "attention",  # mean, sum or attention
        "stochastic": False,  # Gaussian q(z | context); the policy uses its mean
    },
}

warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft 0.21 on transformers 5

LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # Conv1D: weights stored (in, out)
}

DECODER_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


# -----------------------------------------------------------------------------
# the base model and its adapters


def build_base_model(name_or_config, dtype=None, trust_remote_code=False):
    """A causal LM from a hub name or local path, or a random one from a transformers config."""
    from transformers import AutoModelForCausalLM, PretrainedConfig  # here: importing this module stays light

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(name_or_config, PretrainedConfig):
        return AutoModelForCausalLM.from_config(name_or_config, dtype=dtype, trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(name_or_config, dtype=dtype, trust_remote_code=trust_remote_code)


def decoder_layers(model):
    """The ModuleList of decoder blocks of a transformers causal LM."""
    for path in DECODER_LAYER_PATHS:
        try:
            return operator.attrgetter(path)(model)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} "
                     f"(looked for {', '.join(DECODER_LAYER_PATHS)})")


def add_lora(model, lora_config):
    """Wraps `model` in place with LoRA adapters; its base weights are frozen."""
    model_type = model.config.model_type
    targets = lora_config["targets"] or LORA_TARGETS.get(model_type)
    if not targets:
        raise ConfigError(f"config key 'policy.lora.targets': no default targets for model type "
                          f"'{model_type}' (known: {', '.join(LORA_TARGETS)}); list the module names")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_config["r"], lora_alpha=lora_config["alpha"], lora_dropout=lora_config["dropout"],
                        target_modules=list(targets), fan_in_fan_out=model_type == "gpt2", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def film_layer_indices(layers, num_layers):
    if layers is None:
        return list(range(num_layers))
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad or len({i % num_layers for i in layers}) != len(layers):
        raise ConfigError(f"config key 'policy.film.layers': {layers} must be distinct indices "
                          f"of the {num_layers} decoder layers")
    return sorted(i % num_layers for i in layers)


# -----------------------------------------------------------------------------
# the policy


class SteerablePolicy(nn.Module):
    """LoRA-adapted LM + FiLM on decoder-layer outputs + optional context encoder.

    `config` is the `policy` section (DEFAULTS); `context_dim` the size of a context
    option's embedding (0 = latents are given directly, no encoder).
    """

    def __init__(self, base_model, config, context_dim=0):
        super().__init__()
        self.config = dict(copy.deepcopy(config), context_dim=context_dim)
        layers = decoder_layers(base_model)
        self.lm = add_lora(base_model, config["lora"])
        f, e = config["film"], config["encoder"]
        self.film = self.encoder = None
        self._film_state = None  # (gamma, beta, expand) inside conditioned(), else None
        self._in_reference = False
        if e["latent_dim"] > 0:
            indices = film_layer_indices(f["layers"], len(layers))
            hidden_size = base_model.config.get_text_config().hidden_size
            self.film = FiLM(e["latent_dim"], hidden_size, len(indices), f["hidden"])
            for slot, index in enumerate(indices):
                layers[index].register_forward_hook(functools.partial(self._film_hook, slot))
        if e["latent_dim"] > 0 and context_dim > 0:
            self.encoder = ContextEncoder(context_dim, e["hidden"], e["latent_dim"], e["layers"],
                                          e["aggregator"], e["stochastic"])

    def forward(self, input_ids, attention_mask=None, latent=None):
        """Logits (B, T, V); `latent` (B, latent_dim) conditions row b on latent[b]."""
        with self.conditioned(latent) if latent is not None else contextlib.nullcontext():
            return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, latent=None, **generate_kwargs):
        """transformers' generate; latent row b conditions prompt b and all its copies
        (num_return_sequences, beams), which generate() lays out as rows b*k .. b*k+k-1."""
        if latent is not None and latent.shape[0] != input_ids.shape[0]:
            raise ValueError(f"generate() got {latent.shape[0]} latent rows for {input_ids.shape[0]} prompts: "
                             "give one latent row per prompt")
        with self.conditioned(latent, expand=True) if latent is not None else contextlib.nullcontext():
            return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    def infer_latent(self, context, context_mask=None):
        """context (B, n, 2, context_dim) -> z (B, latent_dim), or the mean of q(z | context)."""
        if self.encoder is None:
            raise ValueError("this policy has no context encoder (encoder.latent_dim = 0 or context_dim = 0)")
        out = self.encoder(context, context_mask)
        return out[0] if self.encoder.stochastic else out

    @contextlib.contextmanager
    def conditioned(self, latent, expand=False):
        """Inside the block every forward is FiLM-modulated by `latent` (B, latent_dim).

        expand=True lets a batch of k * B rows use latent row b for rows b*k .. b*k+k-1,
        as generate() lays out num_return_sequences and beams.
        """
        if self.film is None:
            raise ValueError("this policy has no FiLM (encoder.latent_dim = 0): it takes no latent")
        if self._in_reference:
            raise RuntimeError("conditioned() inside reference_mode(): the reference has no FiLM")
        if latent.dim() != 2 or latent.shape[1] != self.config["encoder"]["latent_dim"]:
            raise ValueError(f"latent must be (batch, {self.config['encoder']['latent_dim']}), "
                             f"got {tuple(latent.shape)}")
        gamma, beta = self.film(latent)  # (L, B, H) each
        with self._film_state_set((gamma, beta, expand)):
            yield

    @contextlib.contextmanager
    def reference_mode(self):
        """The DPO reference: adapters disabled, no FiLM, eval mode (no dropout)."""
        was_training = self.lm.training
        self._in_reference = True
        self.lm.eval()
        try:
            with self._film_state_set(None), self.lm.disable_adapter():
                yield
        finally:
            self._in_reference = False
            self.lm.train(was_training)

    def enable_gradient_checkpointing(self):
        """Activation checkpointing of every decoder layer; backward() may run after the
        conditioned() block has closed. transformers 5 checkpoints a layer's forward, so
        the FiLM hook runs outside the checkpoint; where the hook is inside it (transformers
        4 checkpoints __call__), context_fn gives the recompute the forward's latent."""
        kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_contexts}
        self.lm.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)

    def _checkpoint_contexts(self):
        return contextlib.nullcontext(), self._film_state_set(self._film_state)

    @contextlib.contextmanager
    def _film_state_set(self, state):
        previous, self._film_state = self._film_state, state
        try:
            yield
        finally:
            self._film_state = previous

    def _film_hook(self, slot, module, args, output):
        if self._film_state is None:
            return None  # unconditioned: the layer's output is kept
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, H)
        gamma, beta = self._film_rows(slot, hidden.shape[0])
        hidden = modulate(hidden, gamma.to(hidden.dtype), beta.to(hidden.dtype))
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _film_rows(self, slot, rows):
        gamma, beta, expand = self._film_state
        gamma, beta = gamma[slot], beta[slot]  # (B, H) each
        if rows == gamma.shape[0]:
            return gamma, beta
        if expand and rows % gamma.shape[0] == 0:
            k = rows // gamma.shape[0]
            return gamma.repeat_interleave(k, dim=0), beta.repeat_interleave(k, dim=0)  # (B * k, H)
        raise ValueError(f"the latent has {gamma.shape[0]} rows but the model runs a batch of {rows} "
                         "sequences: give one latent row per sequence")

    def trained_state_dict(self):
        """Only what is trained: LoRA (peft's keys), FiLM and encoder. Never base weights."""
        from peft import get_peft_model_state_dict

        state = {"lora": get_peft_model_state_dict(self.lm)}
        if self.film is not None:
            state["film"] = self.film.state_dict()
        if self.encoder is not None:
            state["encoder"] = self.encoder.state_dict()
        return state

    def load_trained_state_dict(self, state):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.lm, state["lora"])
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise RuntimeError(f"LoRA weights do not fit this model: unexpected {result.unexpected_keys[:3]}, "
                               f"missing {missing[:3]}")
        for name in ("film", "encoder"):
            module = getattr(self, name)
            if (module is None) != (name not in state):
                raise RuntimeError(f"checkpoint and policy config disagree about the {name}")
            if module is not None:
                module.load_state_dict(state[name])


# -----------------------------------------------------------------------------
# log-probabilities and the DPO loss


def sequence_logprob(logits, labels, response_mask):
    """Summed log p(labels[t] | labels[:t]) over response tokens. -> (B,)

    logits (B, T, V) computed from input_ids = labels (B, T); response_mask (B, T) is
    True at response tokens, False at prompt and padding.
    """
    if response_mask[:, 0].any():
        raise ValueError("response_mask marks position 0: a response needs a prompt token before it")
    logits = logits[:, :-1].float()  # position t predicts token t + 1
    mask = response_mask[:, 1:].bool()  # (B, T - 1)
    labels = labels[:, 1:].masked_fill(~mask, 0)  # padding ids may lie outside the vocabulary
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (B, T - 1)
    return torch.where(mask, token_logps, 0.0).sum(-1)


def implicit_reward(policy_logp, ref_logp, beta=1.0):
    """DPO's implicit reward of a response: beta * log(pi / pi_ref)."""
    return beta * (policy_logp - ref_logp)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged. Inputs (B,) log-probs.

    Returns the loss and TRL-named metrics (floats).
    """
    chosen_rewards = implicit_reward(policy_chosen, ref_chosen, beta)  # (B,)
    rejected_rewards = implicit_reward(policy_rejected, ref_rejected, beta)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    values = torch.stack([loss, chosen_rewards.mean(), rejected_rewards.mean(),
                          choice_correct(F.logsigmoid(chosen_rewards - rejected_rewards)).mean(),
                          (chosen_rewards - rejected_rewards).mean(),
                          policy_chosen.mean(), policy_rejected.mean()]).tolist()  # one device sync
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")
    return loss, dict(zip(names, values))


def concatenate_pairs(batch, pad_id=0):
    """Chosen rows then rejected rows, right-padded to one length: 3 tensors (2B, T).

    batch holds {chosen,rejected}_{input_ids,attention_mask,response_mask}, each (B, T_c) or (B, T_r).
    """
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    def pad(x, value):
        return F.pad(x, (0, length - x.shape[1]), value=value)
    return tuple(torch.cat([pad(batch[f"chosen_{key}"], value), pad(batch[f"rejected_{key}"], value)])
                 for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("response_mask", 0)))


def pair_logprobs(policy, batch, latent=None):
    """Response log-probs of chosen and rejected, (B,) each, in one forward of 2B rows."""
    input_ids, attention_mask, response_mask = concatenate_pairs(batch)  # (2B, T) each
    if latent is not None:
        latent = torch.cat([latent, latent])  # (2B, latent_dim), rows as in concatenate_pairs
    logits = policy(input_ids, attention_mask, latent=latent)
    return sequence_logprob(logits, input_ids, response_mask).chunk(2)


def policy_and_reference_logprobs(policy, batch):
    """Response log-probs (B,) of chosen and rejected under the policy and the reference.

    The latent comes from batch['context'] (or batch['latent']) when the policy has
    FiLM. With E contexts and E * T pairs, episode e's latent conditions pairs
    e*T .. e*T + T-1 (its targets, as text.episode_batch lays them out).
    Reference log-probs given in the batch (ref_{chosen,rejected}_logps, (B,)) are
    used as they are; otherwise the reference runs here."""
    latent = None
    if policy.encoder is not None:
        latent = policy.infer_latent(batch["context"], batch.get("context_mask"))  # (E, latent_dim)
    elif policy.film is not None:
        latent = batch["latent"]
    if latent is not None:
        pairs = batch["chosen_input_ids"].shape[0]
        if pairs % latent.shape[0]:
            raise ValueError(f"{pairs} pairs cannot be split evenly among {latent.shape[0]} latents")
        latent = latent.repeat_interleave(pairs // latent.shape[0], dim=0)  # (pairs, latent_dim)
    chosen, rejected = pair_logprobs(policy, batch, latent)
    if "ref_chosen_logps" in batch:  # precomputed once per pair (train.precompute_ref_logps)
        return chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    with torch.no_grad(), policy.reference_mode():
        ref_chosen, ref_rejected = pair_logprobs(policy, batch)
    return chosen, rejected, ref_chosen, ref_rejected


def dpo_step(policy, batch, beta, nll_weight=0.0):
    """The (NP-)DPO loss and metrics of a batch, plus nll_weight times the chosen
    responses' negative log-likelihood per token (RPO, Pang et al. 2024; 0 = plain DPO)."""
    chosen, rejected, ref_chosen, ref_rejected = policy_and_reference_logprobs(policy, batch)
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    if nll_weight > 0:
        nll = -chosen.sum() / batch["chosen_response_mask"][:, 1:].sum()
        loss = loss + nll_weight * nll
        metrics.update(loss=loss.item(), **{"nll/chosen": nll.item()})
    return loss, metrics


# -----------------------------------------------------------------------------
# checkpoints


def save_policy(path, policy, config=None, step=0, **extra):
    """One checkpoint dict (runs.save_checkpoint, atomic): trained tensors only in
    'model', the policy's own config in 'policy_config', the run's config in 'config',
    and 'cwd', from where its relative paths (policy.base, data.*) are read."""
    checkpoint = {"model": policy.trained_state_dict(), "policy_config": policy.config,
                  "config": config if config is not None else {"policy": policy.config}, "step": step,
                  "cwd": os.getcwd()}
    save_checkpoint(path, {**checkpoint, **extra})


def load_policy(path, base_model=None, device="cpu"):
    """Rebuilds the base model from policy_config['base'] (unless given) and loads the
    trained weights. `path` is a checkpoint or a run folder. Returns (policy, checkpoint)."""
    checkpoint = policy_checkpoint(path, device)
    return policy_from_checkpoint(checkpoint, base_model, device), checkpoint


def policy_checkpoint(path, device="cpu"):
    """The checkpoint of a policy run (a run folder means its ckpt_best.pt); anything
    else, a reward run included, is a CheckpointError naming `path`."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such run folder or checkpoint")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "ckpt_best.pt")):
        last = os.path.isfile(os.path.join(path, "ckpt_last.pt"))
        raise CheckpointError(f"{path}: no ckpt_best.pt in this folder " + (
            f"(a run writes it at its first validation; give {os.path.join(path, 'ckpt_last.pt')} for its last step)"
            if last else "(give the out_dir of a train_policy.py run)"))
    checkpoint = load_checkpoint(path, map_location=device)
    if "policy_config" not in checkpoint:
        run_config = checkpoint["config"]
        if run_config.get("stage") == "reward" or "model" in run_config:
            raise CheckpointError(f"{path} is a reward run, not a policy run (made by train_reward.py; "
                                  "steer.py reads either kind)")
        raise CheckpointError(f"{path}: not a policy checkpoint (no policy_config)")
    checkpoint["policy_config"] = current_layout(checkpoint["policy_config"])
    if "policy" in checkpoint["config"]:
        checkpoint["config"]["policy"] = current_layout(checkpoint["config"]["policy"])
    return checkpoint


def current_layout(policy_config):
    """A policy config as this code lays it out: runs saved before latent_dim moved from
    film to encoder (the reward model's layout) still load."""
    config = copy.deepcopy(policy_config)
    if "latent_dim" in config.get("film", {}):
        config["encoder"] = dict(config["encoder"], latent_dim=config["film"].pop("latent_dim"))
    return config


def policy_from_checkpoint(checkpoint, base_model=None, device="cpu"):
    """The policy of a checkpoint from policy_checkpoint, on the base model it names (unless given)."""
    config = checkpoint["policy_config"]
    if base_model is None:
        base_model = run_model(config["base"], "policy.base", checkpoint, lambda path: build_base_model(
            path, config["dtype"], config["trust_remote_code"]))
    policy = SteerablePolicy(base_model, config, config["context_dim"])
    policy.load_trained_state_dict(checkpoint["model"])
    return policy.to(device)


def run_model(recorded, key, checkpoint, load):
    """load(path) of the model (or tokenizer) that a run's config names at `key` (policy.base,
    data.embedder): a relative path is read from here, then from where the run was trained."""
    path = resolve_path(recorded, checkpoint)
    try:
        return load(path)
    except OSError as e:  # a moved or deleted folder, or a hub name that cannot be fetched
        reason = str(e).strip().splitlines()[0]
        if os.path.isabs(path) and not os.path.exists(path):
            reason = "no such folder (moved or deleted?)"
        elif not os.path.exists(path):
            also = f" or in {checkpoint['cwd']}" if checkpoint.get("cwd") else ""
            reason = f"no such folder here{also}, and as a hub name: {reason}"
        raise CheckpointError(f"{key} = {recorded} (recorded in the run) cannot be loaded: {reason}") from None


def save_adapter_folder(folder, policy):
    """The trained weights in the formats other tools open: the LoRA as a peft adapter
    folder (adapter_config.json + adapter_model.safetensors, for PeftModel.from_pretrained)
    and FiLM + encoder as steering.safetensors beside it. Written to a temporary folder,
    then swapped in, so a crash never leaves half a folder."""
    from safetensors.torch import save_file

    tmp, old = f"{folder}.tmp{os.getpid()}", f"{folder}.old{os.getpid()}"
    policy.lm.save_pretrained(tmp)
    steering = {f"{name}.{key}": value.contiguous() for name in ("film", "encoder") if getattr(policy, name) is not None
                for key, value in getattr(policy, name).state_dict().items()}
    if steering:
        save_file(steering, os.path.join(tmp, "steering.safetensors"))
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
