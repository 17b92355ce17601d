"""
Train a steerable policy with NP-DPO (or plain DPO, the baseline) on text pairs.

    python train_policy.py                                     # configs/steer_world.yaml: the steering world, CPU
    python train_policy.py configs/steer_world_dpo.yaml        # plain DPO on the same data (the baseline)
    python train_policy.py configs/steer_world_known.yaml      # FiLM on the users' true preferences (the ceiling)
    python train_policy.py configs/steer_world_active.yaml     # half the contexts: a reward run's chosen questions
    python train_policy.py configs/steer_text.yaml             # the one-bit two-type world (concise vs detailed)
    python train_policy.py configs/uf_hh_dpo.yaml              # the paper's LLM setting (GPU and hub)
    python train_policy.py --train.steps=100 --resume          # dotted overrides, continue a run
    torchrun --nproc_per_node=4 train_policy.py configs/uf_hh_dpo.yaml   # data-parallel

Inputs (data.*): text pairs as JSONL (text.py's format) and, row-aligned with them,
a feature-pair .npz of context embeddings (prepare/embed.py). The context encoder reads
the embeddings; the policy reads tokens. With data.toy (the default), a built-in
world's missing inputs at their default paths (or anywhere, with data.generate) are
built first: its text pairs (and, for the steering world of world.py, each user's
true preference in data.preferences), the base model fine-tuned on the world's
responses (the reference policy, written to policy.base), and its last-token
embeddings. A mistyped input path is an error.

Writes to out_dir: config.yaml, log.jsonl, ckpt_best.pt (lowest val DPO loss) and
ckpt_last.pt, which hold only LoRA, FiLM and encoder weights, and adapter/: the best
LoRA as a peft adapter folder (PeftModel.from_pretrained opens it) with FiLM and
encoder weights in steering.safetensors. As in train_reward.py, nothing is written
before the loop, and a run folder needs --resume or --overwrite. Then:
    python evaluate.py runs/steer_world_np_dpo runs/steer_world_dpo runs/steer_world_known
    python steer.py runs/steer_world_np_dpo --context=examples/world_context.jsonl --prompt="Tell me about owls."

An episode is one user: n context pairs (embeddings) and num_targets target pairs
(tokens), disjoint; each target's DPO loss is conditioned on the episode's latent.
An optimizer step averages the gradients of train.grad_accum micro-batches of
train.batch_size episodes each.

Under torchrun (torch.distributed: nccl on GPUs, gloo on CPU) the grad_accum
micro-batches of a step are split across the N processes (N must divide grad_accum),
so a config gives the same effective batch, batch_size * grad_accum episodes, on 1 or
N processes: every rank draws the same global batch, runs its own micro-batches, and
gradients are averaged in one all-reduce before the update. With dropout off the run
follows the 1-process run up to float summation order; each rank draws its own dropout
masks. Rank 0 alone builds missing toy inputs (the others wait), validates, prints, logs
and saves. Checkpoints keep every rank's random state, so --resume on the same number of
processes ends bit for bit where an uninterrupted run would.

train.precompute_ref_logps runs the reference once per pair before training (the
train and val pairs, split across ranks) instead of in every step: the reference is
frozen, so this changes nothing but the cost (a quarter of a step on the toy task, bench.py).

Departures from the paper's code:
1. Context and target pairs of an episode are disjoint (data.EpisodeSampler), and the
   reference is the policy with LoRA and FiLM switched off, not a deep copy.
2. train.nll_weight adds the chosen responses' NLL per token to the DPO loss (RPO,
   Pang et al., 2024), for every policy alike (NP-DPO, plain DPO, known preference):
   0.3 by default, 1.0 in the two-type configs. With pure DPO (0, the paper's
   objective, as configs/uf_hh_dpo.yaml uses) the steering world's known-preference
   policy drifted off topic (relevance 18 % against the reference's 64 %) and ended
   below the reference in gold reward; see the README.
3. The two-type world's prompts are split 80/10/10 by prompt, so test prompts are unseen;
   the steering world splits its topics, and its users, so test users and topics are.
4. train.encoder_warmup_steps first trains the context encoder alone with the NP-BTL
   loss on the context features (reward.NPBTL, a reward head that is then dropped).
   Trained by DPO alone, the encoder of the steering world did not learn to tell users
   apart within the default budget (NP-DPO scored as plain DPO); see the README.
"""

import os
import sys

import torch
from tqdm import tqdm

import policy as policy_lib
import queries
from common import (ConfigError, check, check_finite, check_positive, graceful_stop, load_config, log, lr_at,
                    print_config, run_script, save_config, seed_everything)
from data import DataError, train_val_samplers
from defaults import POLICY_RUN as DEFAULTS
from dist import (any_rank, average_gradients, check_replicas_agree, is_main, mean_over_ranks, restore_rng_states,
                  rng_states, setup_distributed, start_replicas)
from runs import check_resume, check_run_folder, check_runs, claimed_run_folder, load_checkpoint
from text import autocast, episode_batch, known_latents, load_inputs, make_batch, micro_batches, reference_logprobs
from toy import WORLD_PATHS, build_missing, toy_inputs_to_build


def validate_config(config, world_size=1):
    t, p = config["train"], config["policy"]
    check_positive(config, "train.lr", "policy.lora.r", "policy.lora.alpha", "policy.encoder.hidden",
                   "policy.encoder.layers", "policy.film.hidden", "data.max_length", "data.toy_pairs",
                   "toy_model.hidden_size", "toy_model.layers", "toy_model.heads", "toy_model.intermediate_size",
                   "toy_model.sft_steps", "toy_model.sft_batch_size", "toy_model.sft_lr")
    check(p["encoder"]["latent_dim"] >= 0, "policy.encoder.latent_dim", "must be non-negative (0 = plain DPO)")
    check(0 <= p["lora"]["dropout"] < 1, "policy.lora.dropout", "must lie in [0, 1)")
    labels = config["data"]["labels"]
    check(labels is None or isinstance(labels, list), "data.labels", f"must be a list of labels, e.g. [{labels}]")
    check(t["lr"] > 0, "train.lr", "must be positive")
    check_positive(config, "train.steering_lr_scale")
    check(isinstance(t["encoder_warmup_steps"], int) and t["encoder_warmup_steps"] >= 0, "train.encoder_warmup_steps",
          "must be a non-negative number of steps (0 = off)")
    check(0 <= t["min_lr"] <= t["lr"], "train.min_lr", "must lie in [0, train.lr]")
    check(t["steps"] > 0 and t["batch_size"] > 0 and t["grad_accum"] > 0, "train.steps",
          "steps, batch_size and grad_accum must be positive")
    check(t["grad_accum"] % world_size == 0, "train.grad_accum",
          f"must be divisible by the number of processes ({world_size}): its micro-batches are split among them")
    check(t["beta"] > 0, "train.beta", "must be positive")
    check(0 <= t["min_context"] <= t["max_context"], "train.min_context", "must lie in [0, train.max_context]")
    check(t["autocast"] in ("bf16", "fp16", "none"), "train.autocast", "must be bf16, fp16 or none")
    check(config["eval"]["interval"] > 0, "eval.interval", "must be positive")
    check(config["data"]["world"] in WORLD_PATHS, "data.world", f"must be one of {', '.join(WORLD_PATHS)}")
    users = config["data"]["world_users"]
    check(isinstance(users, list) and len(users) == 3 and all(isinstance(u, int) and u > 0 for u in users),
          "data.world_users", "must be three positive numbers of users: [train, val, test]")
    check_positive(config, "data.world_pairs_per_user", "data.world_answers_per_pair", "data.world_corpus")
    check(t["condition_on"] in ("context", "preferences"), "train.condition_on", "must be context or preferences")
    check(0 < t["active_fraction"] <= 1, "train.active_fraction", "must lie in (0, 1]")
    check(not t["active_selector"] or (p["encoder"]["latent_dim"] > 0 and t["condition_on"] == "context"),
          "train.active_selector", "chooses an NP-DPO's contexts: this policy reads none (plain DPO or known)")


# -----------------------------------------------------------------------------
# the toy task's inputs: text pairs, a fine-tuned base model, context embeddings


# -----------------------------------------------------------------------------
# batches, validation, checkpoints


@torch.no_grad()
def validate(policy, sampler, token_pairs, pad_id, config, device, ref_logps=None, latents=None):
    """DPO loss and implicit-reward accuracy on fixed val episodes at each context size."""
    e, t = config["eval"], config["train"]
    sampler.gen.manual_seed(config["seed"] + 1)  # the same episodes at every validation
    policy.eval()
    metrics, losses = {}, []
    for n in e["context_sizes"]:
        batch = make_batch(sampler, token_pairs, e["episodes"], pad_id, device, n, ref_logps, latents)
        with autocast(device, t["autocast"]):
            loss, step_metrics = policy_lib.dpo_step(policy, batch, t["beta"], t["nll_weight"])
        losses.append(loss.item())
        metrics[f"val/acc@{n}"] = step_metrics["rewards/accuracies"]
    policy.train()
    return {"val/loss": sum(losses) / len(losses), **metrics}


def restore(checkpoint, policy, optimizer, sampler, data, config, rank=0, world_size=1):
    """Continue from a checkpoint whose config check_resume accepted. -> (step, best_val_loss)"""
    saved_dim = checkpoint.get("policy_config", {}).get("context_dim", data.dim)
    if saved_dim != data.dim:
        raise DataError(f"--resume: {data.path} has context features of dimension {data.dim}, but the run in "
                        f"{config['out_dir']} was trained on dimension {saved_dim}")
    if checkpoint.get("data_sha256", data.meta["sha256"]) != data.meta["sha256"]:
        raise DataError(f"--resume: {config['data']['pairs']} or {config['data']['features']} has changed since the "
                        f"run in {config['out_dir']} was trained on it: resume on the same data, or start a new run")
    if checkpoint["step"] >= config["train"]["steps"]:
        raise ConfigError(f"--resume: the run in {config['out_dir']} is at step {checkpoint['step']} and "
                          f"train.steps = {config['train']['steps']}: raise train.steps to train further")
    policy.load_trained_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    sampler.gen.set_state(checkpoint["sampler_rng"])
    restore_rng_states(checkpoint["torch_rng"], rank, world_size)
    if is_main(rank):
        print(f"resumed from step {checkpoint['step']}")
    return checkpoint["step"], checkpoint["best_val_loss"]


def save(name, policy, optimizer, sampler, config, step, best_val_loss, metrics, torch_rng):
    policy_lib.save_policy(os.path.join(config["out_dir"], name), policy, config, step,
                           optimizer=optimizer.state_dict(), best_val_loss=best_val_loss, metrics=metrics,
                           sampler_rng=sampler.gen.get_state(), torch_rng=torch_rng,
                           data_sha256=sampler.data.meta["sha256"])
    if name == "ckpt_best.pt":  # the best weights also as a peft adapter folder (+ FiLM and encoder)
        policy_lib.save_adapter_folder(os.path.join(config["out_dir"], "adapter"), policy)


# -----------------------------------------------------------------------------
# the loop


def train(policy, optimizer, sampler, val_sampler, token_pairs, pad_id, config, device, step, best_val_loss,
          rank=0, world_size=1, ref_logps=None, latents=None):
    """Returns (last validation metrics, True if stopped early by SIGINT/SIGTERM). Under
    torchrun a signal on any rank stops every rank after the same step."""
    t, main_process = config["train"], is_main(rank)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and t["autocast"] == "fp16")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    own_micro_batches = t["grad_accum"] // world_size
    progress = tqdm(range(step, t["steps"]), initial=step, total=t["steps"], desc="train", mininterval=1.0,
                    disable=not main_process)
    metrics = {}
    with graceful_stop() as stop:
        for step in progress:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, t) * group.get("lr_scale", 1.0)
            # every rank draws the same global batch, then runs micro-batches rank, rank + N, ...
            episodes = micro_batches(sampler.sample(t["batch_size"] * t["grad_accum"]), t["grad_accum"])
            step_metrics, step_loss = [], 0.0
            for micro in episodes[rank::world_size]:
                batch = episode_batch(micro, token_pairs, pad_id, device, ref_logps, latents)
                with autocast(device, t["autocast"]):
                    loss, train_metrics = policy_lib.dpo_step(policy, batch, t["beta"], t["nll_weight"])
                scaler.scale(loss / own_micro_batches).backward()
                step_loss, step_metrics = step_loss + loss.detach(), step_metrics + [train_metrics]
            check_finite(mean_over_ranks(step_loss), step + 1, config["out_dir"])  # before the update, on all ranks
            average_gradients(trainable)  # before unscaling: every rank then takes the same fp16 skip decision
            if t["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, t["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.set_postfix(loss=f"{train_metrics['loss']:.4f}",
                                 acc=f"{train_metrics['rewards/accuracies']:.3f}", refresh=False)
            done = step + 1
            at_interval = done % config["eval"]["interval"] == 0 or done == t["steps"]
            stopping = any_rank(stop["signal"] is not None, device)
            if at_interval or stopping:  # collectives: every rank takes part
                torch_rng = rng_states()  # each rank's, so --resume continues each rank's dropout stream
                train_metrics = mean_metrics(step_metrics, device)  # over this step's micro-batches and ranks
            if at_interval and main_process:
                metrics = validate(policy, val_sampler, token_pairs, pad_id, config, device, ref_logps, latents)
                if metrics["val/loss"] < best_val_loss:
                    best_val_loss = metrics["val/loss"]
                    save("ckpt_best.pt", policy, optimizer, sampler, config, done, best_val_loss, metrics, torch_rng)
                log({"step": done, "lr": lr_at(step, t), **{f"train/{k}": v for k, v in train_metrics.items()},
                     **metrics}, config["out_dir"])
            if (at_interval or stopping) and main_process:
                save("ckpt_last.pt", policy, optimizer, sampler, config, done, best_val_loss, metrics, torch_rng)
            if stopping:
                progress.close()
                return metrics, True
    return metrics, False


def warm_up_encoder(policy, sampler, config, device):
    """Trains the policy's context encoder (in place) with the NP-BTL objective: a reward
    head r(x, z) on the same context features, FiLM-modulated by the encoder's z, fitted
    to the users' choices on episodes of the train split. The head is then dropped; DPO
    starts from a latent that already tells users apart."""
    import reward as reward_lib

    e, steps = config["policy"]["encoder"], config["train"]["encoder_warmup_steps"]
    model = reward_lib.NPBTL(sampler.data.dim, latent_dim=config["policy"]["encoder"]["latent_dim"],
                             encoder_hidden=e["hidden"], encoder_layers=e["layers"], aggregator=e["aggregator"],
                             stochastic=e["stochastic"]).to(device)
    model.encoder = policy.encoder  # shared: the NP-BTL loss trains the policy's encoder
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in tqdm(range(steps), desc="encoder warm-up (NP-BTL)", mininterval=1.0):
        episodes = sampler.sample(64)
        batch = {k: episodes[k].to(device) for k in ("context", "context_mask", "targets")}
        loss, metrics = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"encoder warm-up: last NP-BTL loss {metrics['loss']:.3f}, accuracy {metrics['acc']:.3f}")


def parameter_groups(policy, t):
    """LoRA at train.lr; FiLM and encoder (which learn who the user is) at steering_lr_scale times it."""
    trainable = [q for q in policy.parameters() if q.requires_grad]
    if t["steering_lr_scale"] == 1.0:  # one group, as checkpoints from before this key hold
        return [{"params": trainable}]
    steering = {id(q) for m in (policy.film, policy.encoder) if m is not None for q in m.parameters()}
    return [{"params": [q for q in trainable if id(q) not in steering]},
            {"params": [q for q in trainable if id(q) in steering], "lr_scale": t["steering_lr_scale"]}]


def mean_metrics(rows, device):
    """The mean of each metric over a step's micro-batches and over ranks."""
    keys = list(rows[0])
    values = torch.tensor([[row[k] for k in keys] for row in rows], dtype=torch.float64, device=device).mean(0)
    return dict(zip(keys, mean_over_ranks(values).tolist()))


def main(argv):
    # ---- config
    config, rest = load_config(DEFAULTS, argv or ["configs/steer_world.yaml"])
    if rest:
        raise ConfigError(f"unexpected arguments {rest} (give one .yaml file and --key=value overrides)")
    rank, world_size, _, device = setup_distributed(config["device"])  # (0, 1, 0, device) without torchrun
    main_process = is_main(rank)
    validate_config(config, world_size)
    check_run_folder(config, "policy")  # read-only: nothing is written to out_dir before the loop
    check_runs([config["train"]["active_selector"]] if config["train"]["active_selector"] else [])  # before inputs
    checkpoint = load_checkpoint(os.path.join(config["out_dir"], "ckpt_last.pt")) if config["resume"] else None
    if checkpoint:
        checkpoint["config"]["policy"] = policy_lib.current_layout(checkpoint["config"]["policy"])
    changed = check_resume(checkpoint["config"], config, ("stage", "policy.", "data.max_length")) if checkpoint else {}
    missing = toy_inputs_to_build(config) if config["data"]["toy"] else []  # a mistyped path stops here
    if checkpoint and missing:  # a resumed run never builds new inputs
        raise DataError(f"--resume: {', '.join(missing)} not found from here; resume from "
                        f"{checkpoint.get('cwd', 'the folder the run was trained in')}")
    if main_process:
        print_config(config)
    # ---- seed
    seed_everything(config["seed"])
    # ---- data
    build_missing(config, rank)  # a built-in world's inputs (toy.py); rank 0 builds, the others wait
    data, token_pairs, tokenizer = load_inputs(config)
    t, p = config["train"], config["policy"]
    sampler, val_sampler = train_val_samplers(data, config)
    if t["active_selector"]:
        queries.ask_training_users(sampler, t["active_selector"], t["active_fraction"], t["max_context"], config["seed"])
    if main_process:
        print(f"data: {len(sampler.labels)} train labels {sampler.labels[:5]}, context features of dimension "
              f"{data.dim}, {world_size} process(es)")
    # ---- model and optimizer
    seed_everything(config["seed"])  # the same init whether or not the toy inputs were just built
    base = policy_lib.build_base_model(p["base"], p["dtype"], p["trust_remote_code"])
    latents = known_latents(data, config)  # (L, d) for the known-preference policy, else None
    policy = policy_lib.SteerablePolicy(base, p, context_dim=0 if latents is not None else data.dim).to(device)
    if t["gradient_checkpointing"]:
        policy.enable_gradient_checkpointing()
    if policy.encoder is not None and t["encoder_warmup_steps"] > 0 and not checkpoint:
        warm_up_encoder(policy, sampler, config, device)
    trainable = [q for q in policy.parameters() if q.requires_grad]
    start_replicas(trainable, config["seed"], rank)
    if main_process:
        print(f"policy: {sum(q.numel() for q in trainable):,} trained parameters "
              f"(LoRA{', FiLM, encoder' if policy.encoder is not None else ''}) on a {p['base']} base")
    optimizer = torch.optim.AdamW(parameter_groups(policy, t), lr=t["lr"], weight_decay=t["weight_decay"])
    step, best_val_loss = 0, float("inf")
    if checkpoint:
        step, best_val_loss = restore(checkpoint, policy, optimizer, sampler, data, config, rank, world_size)
    ref_logps = None
    if t["precompute_ref_logps"]:
        ref_logps = reference_logprobs(policy, data, token_pairs, config, tokenizer.pad_token_id, device,
                                       rank, world_size)
    # ---- loop: the only part that writes to out_dir
    with claimed_run_folder(config, "policy", main_process):
        if main_process:
            save_config(config, config["out_dir"])  # the effective config
            if changed:  # recorded beside the original values, which config.yaml no longer shows
                log({"step": step, "event": "resume", "changed": changed}, config["out_dir"])
        metrics, stopped = train(policy, optimizer, sampler, val_sampler, token_pairs, tokenizer.pad_token_id,
                                 config, device, step, best_val_loss, rank, world_size, ref_logps, latents)
        check_replicas_agree(trainable)
    if stopped:  # rank 0 alone says so
        sys.exit(f"stopped by a signal: {config['out_dir']}/ckpt_last.pt holds the last step; continue with --resume"
                 if main_process else 1)
    if main_process:
        print(f"done: best checkpoint {config['out_dir']}/ckpt_best.pt")
    return metrics


if __name__ == "__main__":
    run_script(main)
