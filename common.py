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
import datetime
import difflib
import json
import math
import os
import random
import signal
import sys

import numpy as np
import torch
import yaml

REQUIRED = "???"  # a default that the user must set (always text: a path, a name, a prompt)


class UserError(Exception):
    """Something the user can fix: the scripts print its message on one line and exit 2."""


class ConfigError(UserError, ValueError):
    """A bad config value; the message names the key."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or run folder that is missing, unreadable or of another kind."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the message says what to do."""


def check_finite(loss, step, out_dir):
    if not torch.isfinite(loss):
        last = os.path.join(out_dir, "ckpt_last.pt")
        kept = f"{last} holds the last good checkpoint" if os.path.exists(last) else "no checkpoint was saved yet"
        raise TrainingError(f"non-finite loss ({loss.item()}) at step {step}: stopped before the update; {kept}")


def run_script(main):
    """Every script's entry point. A user error prints one line and exits 2, a run that
    cannot go on exits 1, Ctrl-C exits quietly with 130; nothing else is caught."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        print((sys.modules[main.__module__].__doc__ or "").strip())  # a script's docstring is its help
        return
    try:
        main(sys.argv[1:])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank done before any tears gloo down (a rare abort otherwise)
    except UserError as e:  # under torchrun every rank raises it: rank 0 alone says so
        sys.exit(_exit_line(e, 2) if os.environ.get("RANK", "0") == "0" else 2)
    except TrainingError as e:
        sys.exit(_exit_line(e, 1))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _exit_line(error, code):
    print(f"error: {error}", file=sys.stderr)
    return code


# -----------------------------------------------------------------------------
# config


def _cli_value(default, text):
    """A command-line value as a person means it: a text key keeps its text verbatim
    (`--prompt=yes`, `--out_dir=2024-05-01`); other keys read it as a YAML literal."""
    if text == "null":
        return None
    if isinstance(default, str):
        return os.path.expanduser(text) if text.startswith("~/") else text  # the shell leaves ~ after '=' alone
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, list, dict, type(None))) else text


def _whole_number(value):
    """1e3 -> 1000 for an integer key; None if `value` is not a whole number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _check_type(key, default, value):
    if value is None and not (default is None or isinstance(default, str)):
        raise ConfigError(f"config key '{key}': a value is required (got null or nothing)")
    if default is None or value is None:
        return value
    if isinstance(default, str) and isinstance(value, datetime.date):
        return value.isoformat()  # YAML reads 2024-05-01 as a date
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, int) and not isinstance(value, int) and _whole_number(value) is not None:
        return _whole_number(value)  # 1e3 or 1000.0 for an integer key
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, type(default)):
        return value
    hint = ""
    if isinstance(value, str) and value.startswith("[") and not value.endswith("]"):
        hint = " (the shell split the list at a space: quote it, or write it without spaces)"
    elif isinstance(default, list) and not isinstance(value, list):
        hint = f" (a list is written in brackets: [{value}])"
    raise ConfigError(f"config key '{key}': expected {type(default).__name__}, got {value!r}{hint}")


def _set(config, dotted_key, value, from_cli=False):
    node, parts = config, dotted_key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = sorted(node) if isinstance(node, dict) else []
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"did you mean '{'.'.join(parts[:i] + close + parts[i + 1:])}'? " if close else ""
            raise ConfigError(f"unknown config key '{dotted_key}' ({hint}known here: {', '.join(known)})")
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if from_cli:
        value = _cli_value(old, value)
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


def read_yaml(path):
    """A config file's mapping; a missing, empty or malformed file is a ConfigError with its line."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a folder, not a config file")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = " (indent with spaces: YAML does not allow tabs)" if "\\t" in problem or "\t" in problem else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    if loaded is None:
        raise ConfigError(f"{path} holds no settings: an empty config is not taken as 'all defaults' "
                          "(run without a config file for those)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return loaded


def _check_stage(defaults, stage, source):
    """A trainer's DEFAULTS name its stage (reward | policy); a config of the other stage is refused."""
    mine = defaults.get("stage")
    if mine is not None and stage != mine:
        raise ConfigError(f"{source} is a config for train_{stage}.py (stage: {stage}), "
                          f"not for train_{mine}.py")


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
        if key == "config" and "config" not in defaults:
            raise ConfigError("give the config file as a plain argument (script.py configs/x.yaml), not --config")
        default = _default_of(config, key)
        if not has_value and args and not args[0].startswith("--") and not isinstance(default, bool):
            has_value, text = True, args.pop(0)  # `--key value`
        if not has_value and default is not None and not isinstance(default, (bool, dict)):
            raise ConfigError(f"--{key} needs a value: --{key}=...")
        overrides.append((key, text if has_value else True, has_value))
    yaml_files = [p for p in positionals if p.endswith((".yaml", ".yml"))]
    if len(yaml_files) > 1:
        raise ConfigError(f"give one config file, not {len(yaml_files)} ({', '.join(yaml_files)}): "
                          "put what differs into --key=value overrides")
    for path in yaml_files:
        loaded = read_yaml(path)
        _check_stage(defaults, loaded.get("stage", defaults.get("stage")), path)
        for key, value in loaded.items():
            _set(config, key, value)
    for key, value, from_cli in overrides:
        _set(config, key, value, from_cli)
    _check_stage(defaults, config.get("stage"), "--stage")
    missing = list(_find_required(config))
    if missing:
        raise ConfigError(f"config key '{missing[0]}': a value is required")
    if "seed" in config:
        check(0 <= config["seed"] < 2**32, "seed", "must lie in [0, 2**32 - 1]")
    return config, [p for p in positionals if p not in yaml_files]


def load_options(defaults, argv):
    """A preparation script's config: --key=value overrides only (no positional
    argument), printed before any work."""
    config, rest = load_config(defaults, argv)
    if rest:
        raise ConfigError(f"unexpected arguments {rest} (give --key=value overrides)")
    print_config(config)
    return config


def check(condition, key, reason):
    """Config validation in one line: `check(lr > 0, 'train.lr', 'must be positive')`."""
    if not condition:
        raise ConfigError(f"config key '{key}': {reason}")


def check_positive(config, *keys):
    """Every dotted key holds a finite number > 0 (sizes, counts, rates)."""
    flat = flatten(config)
    for key in keys:
        check(flat[key] is not None and math.isfinite(flat[key]) and flat[key] > 0, key,
              f"must be a positive number, got {flat[key]}")


def print_config(config):
    print(yaml.safe_dump(config, sort_keys=False).rstrip())


def save_config(config, out_dir):
    """Writes out_dir/config.yaml atomically (inside claimed_run_folder)."""
    path = os.path.join(out_dir, "config.yaml")
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(f"{path}.tmp{os.getpid()}", path)


def flatten(config, prefix=""):
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# -----------------------------------------------------------------------------
# seed, device, logging


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'; a device that does
    not exist or is not available here is a ConfigError."""
    name = name.strip().lower()  # CPU, Cuda
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "mps" and torch.backends.mps.is_available():
        return torch.device("mps")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"config key 'device': unknown device {name!r} (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {name!r} is not available here (torch {torch.__version__} "
                          "sees no CUDA GPU); use --device=cpu or --device=auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"config key 'device': {name!r}, but there are {torch.cuda.device_count()} GPUs")
    return device


def lr_at(step, t, decay_start=None):
    """Learning rate at `step` for a `train` config section: linear warmup over
    warmup_steps, then cosine decay from lr to min_lr at `steps`. With train.patience the
    run decides its own length: lr stays flat until `decay_start` (the step validation
    stopped improving), then decays over cooldown_steps(decay_start, t)."""
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    if t.get("patience", 0) > 0:
        if decay_start is None:
            return t["lr"]
        start, length = decay_start, cooldown_steps(decay_start, t)
    else:
        start, length = t["warmup_steps"], t["steps"] - t["warmup_steps"]
    progress = min(1.0, max(0, step - start) / max(1, length))
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * progress))


def cooldown_steps(decay_start, t):
    """The cosine cool-down after a plateau: train.cooldown times the steps trained so far."""
    return max(1, math.ceil(t["cooldown"] * decay_start))


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
