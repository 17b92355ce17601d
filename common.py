"""
The few things every script shares: one config mechanism, seeding, logging and
one checkpoint format. nanoGPT keeps these in `configurator.py`; we keep them here.

Config: a script declares its DEFAULTS as a nested dict. A YAML file (first
positional argument ending in .yaml/.yml) overrides them, then dotted command-line
overrides `--train.lr=3e-4` (parsed as YAML literals). An unknown key or a value
of the wrong type is an error that names the key; `???` marks a required value.
"""

import contextlib
import copy
import json
import math
import os
import random
import signal

import numpy as np
import torch
import yaml

REQUIRED = "???"  # a default that the user must set


class ConfigError(ValueError):
    """A bad config value; the message names the key."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the message says what to do."""


def check_finite(loss, step, out_dir):
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite loss ({loss.item()}) at step {step}: stopped before the update; "
                            f"{out_dir}/ckpt_last.pt holds the last good checkpoint")


# -----------------------------------------------------------------------------
# config


def _parse_literal(text):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _check_type(key, default, value):
    if value is None and not (default is None or isinstance(default, str)):
        raise ConfigError(f"config key '{key}': a value is required (got null or nothing)")
    if default is None or default == REQUIRED or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f"config key '{key}': expected {type(default).__name__}, got {value!r}")


def _set(config, dotted_key, value):
    node, parts = config, dotted_key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            raise ConfigError(f"unknown config key '{dotted_key}' (known here: {known})")
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if isinstance(old, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted_key}': expected a mapping, got {value!r}")
        for k, v in value.items():
            _set(config, f"{dotted_key}.{k}", v)
    else:
        node[parts[-1]] = _check_type(dotted_key, old, value)


def _default_of(config, dotted_key):
    node = config
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _find_required(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _find_required(value, f"{prefix}{key}.")
        elif value == REQUIRED:
            yield prefix + key


def load_config(defaults, argv, aliases=None):
    """Defaults <- YAML file <- `--key=value` (or `--key value`) overrides.
    Returns (config, positionals).

    A bare `--flag` sets a boolean key to true. `aliases` maps extra flag names
    (e.g. 'num-context') to dotted keys; hyphens in flags are read as underscores.
    """
    config, positionals, overrides = copy.deepcopy(defaults), [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            positionals.append(arg)
            continue
        key, has_value, text = arg[2:].partition("=")
        key = (aliases or {}).get(key, key.replace("-", "_"))
        if not has_value and args and not args[0].startswith("--") and not isinstance(_default_of(config, key), bool):
            has_value, text = True, args.pop(0)  # `--key value`
        overrides.append((key, _parse_literal(text) if has_value else True))
    yaml_files = [p for p in positionals if p.endswith((".yaml", ".yml"))]
    for path in yaml_files:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        for key, value in loaded.items():
            _set(config, key, value)
    for key, value in overrides:
        _set(config, key, value)
    missing = list(_find_required(config))
    if missing:
        raise ConfigError(f"config key '{missing[0]}': a value is required")
    return config, [p for p in positionals if p not in yaml_files]


def check(condition, key, reason):
    """Config validation in one line: `check(lr > 0, 'train.lr', 'must be positive')`."""
    if not condition:
        raise ConfigError(f"config key '{key}': {reason}")


def print_config(config):
    print(yaml.safe_dump(config, sort_keys=False).rstrip())


def save_config(config, out_dir):
    """Writes out_dir/config.yaml; a fresh (not resumed) run also starts a new log.jsonl."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    if not config.get("resume") and os.path.exists(os.path.join(out_dir, "log.jsonl")):
        os.remove(os.path.join(out_dir, "log.jsonl"))


# -----------------------------------------------------------------------------
# seed, device, logging


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step, t):
    """Learning rate at `step` for a `train` config section: linear warmup over
    warmup_steps, then cosine decay from lr to min_lr at `steps`."""
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    progress = min(1.0, (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"]))
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * progress))


def log(metrics, out_dir=None):
    """One call per interval: print a line and append it to out_dir/log.jsonl."""
    text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    print(text)
    if out_dir is not None:
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")


@contextlib.contextmanager
def graceful_stop():
    """Inside the block, SIGINT/SIGTERM set stop['signal'] instead of killing the
    process, so a training loop can finish its step and save before it exits."""
    stop = {"signal": None}
    def handler(signum, frame):
        stop["signal"] = signum
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def rng_state():
    """torch's CPU (and CUDA) generator states, for exact resumption."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states():
    """Every process's rng_state(), a list indexed by rank: under torchrun the ranks' streams
    differ (dropout on micro-batches of other shapes), so a checkpoint keeps each one.
    A collective: every rank calls it."""
    if not distributed():
        return [rng_state()]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states


def restore_rng_states(states, rank, world_size):
    """This process's state from rng_states(). A checkpoint written by another number of
    processes (or an older one holding a single state) gives every rank the first state:
    the run goes on, but not bit for bit."""
    states = states if isinstance(states, list) else [states]
    if len(states) != world_size and is_main(rank):
        print(f"note: the checkpoint holds {len(states)} processes' random states, this run has {world_size}; "
              "continuing with the first one's")
    set_rng_state(states[rank] if len(states) == world_size else states[0])


# -----------------------------------------------------------------------------
# data-parallel training (torchrun); without torchrun every helper is a no-op


def setup_distributed(device_name):
    """Returns (rank, world_size, local_rank, device). Under torchrun (RANK, WORLD_SIZE
    and LOCAL_RANK set) it joins the process group: nccl on CUDA, gloo on CPU; each
    process takes GPU LOCAL_RANK. Otherwise (0, 1, 0, pick_device(device_name))."""
    if "RANK" not in os.environ:
        return 0, 1, 0, pick_device(device_name)
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, local_rank, device


def is_main(rank):
    """Rank 0 alone prints, logs and writes files."""
    return rank == 0


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier():
    if distributed():
        torch.distributed.barrier()


def cleanup_distributed():
    if distributed():
        torch.distributed.destroy_process_group()


def sum_over_ranks(tensor):
    """The sum of `tensor` over all processes (itself when there is one)."""
    if not distributed():
        return tensor
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor)
    return tensor


def mean_over_ranks(tensor):
    """The mean of `tensor` over all processes (itself when there is one)."""
    if not distributed():
        return tensor
    return sum_over_ranks(tensor) / torch.distributed.get_world_size()


def start_replicas(parameters, seed, rank):
    """Every process takes rank 0's initial weights (as DDP does at wrap time), then seeds
    torch with seed + rank, so that dropout and sampling noise differ across ranks
    (nanoGPT's seed offset). Without torchrun it does nothing."""
    if not distributed():
        return
    for p in parameters:
        torch.distributed.broadcast(p.data, src=0)
    torch.manual_seed(seed + rank)


def any_rank(flag, device):
    """True on every process if `flag` is true on any one: all ranks stop at the same step."""
    return bool(mean_over_ranks(torch.tensor(float(flag), device=device)) > 0)


def average_gradients(parameters):
    """Replaces each trainable parameter's gradient by its mean over processes, in one
    all-reduce. Each rank's loss is a mean over an equal slice of the global batch, so
    this is the single-process gradient of the global batch. A missing grad counts as 0."""
    if not distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = mean_over_ranks(torch.cat([p.grad.flatten() for p in params]))
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def check_replicas_agree(parameters):
    """Raises TrainingError unless every process holds rank 0's weights: a cheap end-of-run invariant."""
    if not distributed():
        return
    flat = torch.cat([p.detach().flatten() for p in parameters])
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    if not any_rank(not torch.equal(flat, reference), flat.device):
        return
    raise TrainingError("data-parallel replicas diverged: some rank's weights differ from rank 0's")


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, checkpoint):
    """Atomic: write a temp file in the same folder, then rename over the target."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Loads with weights_only=True, so a crafted pickle cannot run code."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt_best.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise RuntimeError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict) or not {"model", "config", "step"} <= checkpoint.keys():
        raise RuntimeError(f"{path}: not a checkpoint of this codebase (missing model/config/step)")
    return checkpoint
