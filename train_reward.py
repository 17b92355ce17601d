"""
Train a reward model (NP-BTL, BTL or DPL) on feature pairs.

    python train_reward.py configs/synthetic.yaml              # NP-BTL on the paper's task
    python train_reward.py configs/synthetic_btl.yaml          # the BTL baseline
    python train_reward.py configs/synthetic.yaml --train.steps=500 --out_dir=runs/short
    python train_reward.py configs/synthetic.yaml --resume     # continue the run in out_dir
    python train_reward.py configs/synthetic.yaml --overwrite  # replace the run in out_dir
    torchrun --nproc_per_node=4 train_reward.py configs/synthetic.yaml  # data-parallel, same result

Writes to out_dir: config.yaml, log.jsonl, ckpt_best.pt (lowest validation loss) and
ckpt_last.pt. Then: python evaluate.py runs/synthetic_np_btl

Nothing is written before the loop starts (runs.claimed_run_folder): a folder that
holds a run needs --resume or --overwrite, a policy run or a folder in use by another
process is refused, and --resume refuses changes to model.* or the data's dimension.
A missing data.path is generated only at its generator's default path (or with
--data.generate); a mistyped path is an error.

Length: the run decides it from validation. After warm-up the learning rate stays flat
until val/loss has not improved for train.patience evaluations (or 80% of the cap
train.steps is used), then decays by a cosine over train.cooldown x the steps trained so
far, and the run ends. train.patience=0 gives a cosine over a fixed train.steps instead.

Episodes: one user (label) each, n context pairs (n uniform in [min_context,
max_context]) and num_targets target pairs, disjoint; the loss is on targets only.
Validation scores the same fixed val episodes at every eval, at each context size.

Under torchrun, train.batch_size stays the global batch: every process draws the same
global batch and trains on its own equal slice, gradients are averaged across processes,
so N processes follow the 1-process run (up to float summation order; the stochastic
encoder's noise differs: each rank draws its own). All ranks validate; rank 0 alone prints,
logs and saves. Checkpoints keep every rank's random state, so --resume on the same
number of processes is exact.
"""

import math
import os
import sys

import torch
from tqdm import tqdm

from common import (ConfigError, check, check_finite, check_positive, cooldown_steps, graceful_stop, load_config, log,
                    lr_at, print_config, run_script, save_config, seed_everything)
from data import DataError, choice_correct, load_training_data, to_device, train_val_samplers
from defaults import REWARD_RUN as DEFAULTS
from dist import (any_rank, average_gradients, barrier, check_replicas_agree, is_main, mean_over_ranks,
                  restore_rng_states, rng_states, setup_distributed, start_replicas)
from reward import MODEL_KINDS, build_model
from runs import check_resume, check_run_folder, claimed_run_folder, load_checkpoint, save_checkpoint


def validate_config(config, world_size=1):
    t, e, m = config["train"], config["eval"], config["model"]
    check_positive(config, "train.lr", "model.hidden", "model.layers", "model.encoder.hidden", "model.encoder.layers",
                   "model.encoder.latent_dim")
    check(m["kl_beta"] >= 0, "model.kl_beta", "must be non-negative")
    labels = config["data"]["labels"]
    check(labels is None or isinstance(labels, list), "data.labels", f"must be a list of labels, e.g. [{labels}]")
    check(config["model"]["kind"] in MODEL_KINDS, "model.kind", f"must be one of {MODEL_KINDS}")
    check(config["model"]["encoder"]["aggregator"] in ("mean", "sum", "attention"), "model.encoder.aggregator",
          "must be mean, sum or attention")
    check(t["lr"] > 0, "train.lr", "must be positive")
    check(0 <= t["min_lr"] <= t["lr"], "train.min_lr", "must lie in [0, train.lr]")
    check(t["steps"] > 0, "train.steps", "must be positive")
    check(t["patience"] >= 0, "train.patience", "must be non-negative (0 = off)")
    check(0 < t["cooldown"] <= 1, "train.cooldown", "must lie in (0, 1]")
    check(config["model"]["predict_samples"] >= 0, "model.predict_samples", "must be non-negative (0 = at the mean z)")
    check(t["epochs"] >= 0, "train.epochs", "must be non-negative")
    check(t["batch_size"] > 0, "train.batch_size", "must be positive")
    check(t["batch_size"] % world_size == 0, "train.batch_size",
          f"must be divisible by the number of processes ({world_size}): it is the global batch")
    check(t["num_targets"] > 0, "train.num_targets", "must be positive")
    check(0 <= t["min_context"] <= t["max_context"], "train.min_context", "must lie in [0, train.max_context]")
    check(e["interval"] > 0, "eval.interval", "must be positive")
    check(len(e["context_sizes"]) > 0 and all(isinstance(n, int) and n >= 0 for n in e["context_sizes"]),
          "eval.context_sizes", "must be a non-empty list of non-negative integers")
    check(config["data"]["synthetic"] in ("paper", "linear", None), "data.synthetic", "must be paper, linear or null")


def rank_slice(batch, rank, world_size):
    """This process's equal share of a global batch of episodes."""
    size = len(batch["label_rows"]) // world_size
    return {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}


@torch.no_grad()
def validate(model, sampler, config, device):
    """Loss and accuracy on fixed val episodes at each context size in eval.context_sizes."""
    e = config["eval"]
    sizes = e["context_sizes"]
    sampler.gen.manual_seed(config["seed"] + 1)  # the same episodes at every validation
    model.eval()
    metrics, losses = {}, []
    for n in sizes:
        batch = to_device(sampler.sample(e["episodes"], num_context=n), device)
        log_prob = model.log_prob_chosen(batch)
        losses.append(-log_prob.mean().item())
        metrics[f"val/acc@{n}"] = choice_correct(log_prob).mean().item()
    model.train()
    return {"val/loss": sum(losses) / len(losses), **metrics}


def save(name, model, optimizer, sampler, config, step, best, metrics, torch_rng):
    save_checkpoint(os.path.join(config["out_dir"], name), {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config,
        "step": step, "best_val_loss": best["loss"], "best_step": best["step"],
        "decay_start": best["decay_start"], "metrics": metrics,
        "data_dim": sampler.data.dim, "data_sha256": sampler.data.meta["sha256"],
        "cwd": os.getcwd(), "sampler_rng": sampler.gen.get_state(), "torch_rng": torch_rng})


def restore(checkpoint, model, optimizer, sampler, data, config, rank=0, world_size=1):
    """Continue from a checkpoint whose config check_resume accepted. -> (step, best: val/loss and its step)"""
    saved_dim = checkpoint.get("data_dim", data.dim)
    if saved_dim != data.dim:
        raise DataError(f"--resume: {data.path} has options of dimension {data.dim}, but the run in "
                        f"{config['out_dir']} was trained on dimension {saved_dim}")
    if checkpoint.get("data_sha256", data.meta["sha256"]) != data.meta["sha256"]:
        raise DataError(f"--resume: {data.path} has changed since the run in {config['out_dir']} was trained on it "
                        "(its contents differ): resume on the same data, or start a new run")
    if checkpoint["step"] >= config["train"]["steps"]:
        raise ConfigError(f"--resume: the run in {config['out_dir']} is at step {checkpoint['step']} and "
                          f"train.steps = {config['train']['steps']}: raise train.steps to train further")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    sampler.gen.set_state(checkpoint["sampler_rng"])
    restore_rng_states(checkpoint["torch_rng"], rank, world_size)
    if is_main(rank):
        print(f"resumed from step {checkpoint['step']}")
    return checkpoint["step"], {"loss": checkpoint["best_val_loss"], "step": checkpoint.get("best_step", 0),
                                "decay_start": checkpoint.get("decay_start")}


def start_cooldown(done, best, config):
    """With train.patience: the step at which the learning rate starts its final decay, once
    val/loss has not improved for `patience` evaluations (or 80% of the step cap is used)."""
    t = config["train"]
    if t["patience"] == 0 or best["decay_start"] is not None:
        return best["decay_start"]
    plateau = done - best["step"] >= t["patience"] * config["eval"]["interval"]
    return done if plateau or done >= 0.8 * t["steps"] else None


def last_step(best, t):
    """The run's final step: the step cap, or the end of the cool-down once it has started."""
    if t["patience"] == 0 or best["decay_start"] is None:
        return t["steps"]
    return min(t["steps"], best["decay_start"] + cooldown_steps(best["decay_start"], t))


def train(model, optimizer, sampler, val_sampler, config, device, step, best, rank=0, world_size=1):
    """The loop. Returns (last validation metrics, True if stopped early by SIGINT/SIGTERM).
    `best` holds the lowest val/loss so far, its step, and where the final decay started (train.patience).

    A stop signal ends the current step, saves ckpt_last.pt and returns: --resume then
    continues exactly as if the run had not been interrupted. Under torchrun a signal on
    any rank stops every rank after the same step.
    """
    t, out_dir, main_process = config["train"], config["out_dir"], is_main(rank)
    progress = tqdm(range(step, t["steps"]), initial=step, total=t["steps"], desc="train", mininterval=1.0,
                    disable=not main_process)
    metrics = {}
    with graceful_stop() as stop:
        for step in progress:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, t, best["decay_start"])
            # every rank draws the same global batch (same seed), then keeps its slice
            batch = to_device(rank_slice(sampler.sample(t["batch_size"]), rank, world_size), device)
            loss, train_metrics = model.loss(batch)
            check_finite(mean_over_ranks(loss.detach()), step + 1, out_dir)  # before the update, on all ranks
            loss.backward()
            average_gradients(model.parameters())
            if world_size > 1:  # log the global batch's figures
                train_metrics = {k: mean_over_ranks(torch.tensor(v, dtype=torch.float64, device=device)).item()
                                 for k, v in train_metrics.items()}
            if t["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.set_postfix(loss=f"{train_metrics['loss']:.4f}", acc=f"{train_metrics['acc']:.3f}", refresh=False)
            done = step + 1
            at_interval = done % config["eval"]["interval"] == 0 or done == last_step(best, t)
            stopping = any_rank(stop["signal"] is not None, device)
            if at_interval or stopping:
                torch_rng = rng_states()  # a collective: each rank's generator, for an exact --resume
            if at_interval:  # every rank validates (identical weights), so `best` agrees
                metrics = validate(model, val_sampler, config, device)
                improved = metrics["val/loss"] < best["loss"]
                if improved:
                    best = dict(best, loss=metrics["val/loss"], step=done)
                if best["decay_start"] is None and start_cooldown(done, best, config) is not None:
                    best["decay_start"] = done
                    if main_process:
                        print(f"val/loss last improved at step {best['step']}: cooling down until step "
                              f"{last_step(best, t)}")
                if improved and main_process:
                    save("ckpt_best.pt", model, optimizer, sampler, config, done, best, metrics, torch_rng)
                if main_process:
                    log({"step": done, "lr": lr_at(step, t, best["decay_start"]),
                         **{f"train/{k}": v for k, v in train_metrics.items()}, **metrics}, out_dir)
            if (at_interval or stopping) and main_process:
                save("ckpt_last.pt", model, optimizer, sampler, config, done, best, metrics, torch_rng)
            if stopping:
                progress.close()
                return metrics, True
            if done >= last_step(best, t):
                break
    return metrics, False


def main(argv):
    # ---- config
    config, rest = load_config(DEFAULTS, argv)
    if rest:
        raise ConfigError(f"unexpected arguments {rest} (give one .yaml file and --key=value overrides)")
    rank, world_size, _, device = setup_distributed(config["device"])  # (0, 1, 0, device) without torchrun
    main_process = is_main(rank)
    validate_config(config, world_size)
    check_run_folder(config, "reward")  # read-only: nothing is written before the loop
    checkpoint = load_checkpoint(os.path.join(config["out_dir"], "ckpt_last.pt")) if config["resume"] else None
    changed = check_resume(checkpoint["config"], config, ("stage", "model.")) if checkpoint else {}
    if main_process:
        print_config(config)
    # ---- seed
    seed_everything(config["seed"])  # the same on every rank: identical initial weights and batches
    # ---- data
    if not main_process:
        barrier()  # wait while rank 0 generates a missing data.path
    data = load_training_data(config["data"], checkpoint)
    if main_process:
        barrier()
    t = config["train"]
    sampler, val_sampler = train_val_samplers(data, config)
    if t["epochs"] > 0:
        t["steps"] = math.ceil(t["epochs"] * int(sampler.counts.sum()) / (t["batch_size"] * t["num_targets"]))
        if main_process:
            print(f"train.epochs = {t['epochs']}: {t['steps']} steps")
    if main_process:
        print(f"data: {data.path}, {len(sampler.labels)} train labels, option dim {data.dim}, {world_size} process(es)")
    # ---- model and optimizer
    model = build_model(config["model"], data.dim).to(device)
    start_replicas(model.parameters(), config["seed"], rank)
    if main_process:
        print(f"model: {config['model']['kind']}, {sum(p.numel() for p in model.parameters())} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    step, best = 0, {"loss": float("inf"), "step": 0, "decay_start": None}
    if checkpoint:
        step, best = restore(checkpoint, model, optimizer, sampler, data, config, rank, world_size)
    # ---- loop: the only part that writes to out_dir
    with claimed_run_folder(config, "reward", main_process):
        if main_process:
            save_config(config, config["out_dir"])  # the effective config
            if changed:  # recorded beside the original values, which config.yaml no longer shows
                log({"step": step, "event": "resume", "changed": changed}, config["out_dir"])
        metrics, stopped = train(model, optimizer, sampler, val_sampler, config, device, step, best, rank,
                                 world_size)
        check_replicas_agree(model.parameters())
    if stopped:  # rank 0 alone says so
        sys.exit(f"stopped by a signal: {config['out_dir']}/ckpt_last.pt holds the last step; continue with --resume"
                 if main_process else 1)
    if main_process:
        print(f"done: best checkpoint {config['out_dir']}/ckpt_best.pt")
    return metrics


if __name__ == "__main__":
    run_script(main)
