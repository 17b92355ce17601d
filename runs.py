"""
Run folders and checkpoints: atomic writes, safe loading, and the rules that keep a
user's trained run from being lost to a rerun, a wrong config or two jobs at once.
"""

import contextlib
import fcntl
import os
import shutil
import socket
import time

import torch

from common import CheckpointError, ConfigError, TrainingError, UserError, check, flatten, read_yaml

# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, checkpoint):
    """Atomic: write a temp file in the same folder, then rename over the target. A failed
    write (disk full, read-only) leaves the previous checkpoint and no temp file behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise TrainingError(f"cannot write {path} ({e.strerror or e}); the previous one is unchanged") from None


def load_checkpoint(path, map_location="cpu"):
    """Loads with weights_only=True, so a crafted pickle cannot run code. A run folder
    means its ckpt_best.pt. Problems are CheckpointErrors naming the file."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt_best.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, a config given for a run, ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        with open(path, "rb") as f:  # torch.save writes a zip (PK) or, in the legacy format, a pickle (0x80)
            saved_by_torch = f.read(2) in (b"PK", b"\x80\x02")
        reason = f"{type(e).__name__}: {first_line}" if saved_by_torch else \
            "not a file torch.save wrote: give a run folder or its ckpt_best.pt"
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "step"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this codebase (missing model/config/step)")
    return checkpoint


def resolve_path(path, checkpoint):
    """A path recorded in a run's config, as seen from here: relative paths are tried
    from the current folder, then from the folder the run was trained in."""
    if path is None or os.path.isabs(path) or os.path.exists(path) or not checkpoint.get("cwd"):
        return path
    candidate = os.path.join(checkpoint["cwd"], path)
    return candidate if os.path.exists(candidate) else path


# -----------------------------------------------------------------------------
# run folders: never overwritten by accident, never written by two processes at once

RUN_FILES = ("config.yaml", "log.jsonl", "ckpt_last.pt", "ckpt_best.pt", "adapter")  # a folder holding any holds a run
DERIVED_FILES = ("eval.json", "accuracy.png", "reward_curves.png", "steering.png")  # replaced with it by --overwrite
LOCK_FILE = ".lock"


def run_stage(out_dir):
    """'reward' or 'policy' for the run in out_dir, from its config; None if unknown."""
    for name in ("config.yaml", "ckpt_last.pt", "ckpt_best.pt"):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            config = read_yaml(path) if name.endswith(".yaml") else load_checkpoint(path)["config"]
        except UserError:
            continue
        return config.get("stage") or ("policy" if "policy" in config else "reward")
    return None


def check_run_folder(config, stage, holding_lock=False):
    """Read-only, before any work: can this run write to out_dir? A folder that holds a
    run needs --resume or --overwrite; a run of the other stage, or a folder in use by
    another process, is refused."""
    out_dir, resume, overwrite = config["out_dir"], config["resume"], config["overwrite"]
    check(out_dir.strip() != "", "out_dir", "must name a folder")
    check(not (resume and overwrite), "resume",
          "--resume continues the run in out_dir and --overwrite replaces it: give one of them")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"config key 'out_dir': {out_dir} is a file, not a folder")
    _check_creatable(out_dir)
    if not holding_lock:
        _check_not_in_use(out_dir)
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    has_checkpoint = os.path.isfile(os.path.join(out_dir, "ckpt_last.pt"))
    other = run_stage(out_dir) if found else None
    if other is not None and other != stage:
        raise ConfigError(f"{out_dir} holds a {other} run (made by train_{other}.py): train_{stage}.py will not "
                          "write there; choose another --out_dir")
    if found and not has_checkpoint and not overwrite:
        raise ConfigError(f"{out_dir} holds a run that stopped before its first checkpoint ({', '.join(found)}): "
                          "there is nothing to resume; replace it with --overwrite")
    if resume and not has_checkpoint:
        raise CheckpointError(f"--resume: no {os.path.join(out_dir, 'ckpt_last.pt')} to continue "
                              "(drop --resume to start a new run)")
    if found and not (resume or overwrite):
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
                          "or replace it with --overwrite")


def _check_creatable(out_dir):
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"config key 'out_dir': cannot create {out_dir}: {parent} is a file")
    if not os.access(parent if not os.path.isdir(out_dir) else out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'out_dir': cannot write to {out_dir} (no permission)")


def _lock_holder(handle):
    handle.seek(0)
    return handle.read().strip() or "another process"


def run_in_use(out_dir):
    """Who holds out_dir's lock (a training still running), or None."""
    path = os.path.join(out_dir, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(handle)
    return None


def _check_not_in_use(out_dir):
    holder = run_in_use(out_dir)
    if holder:
        raise ConfigError(f"{out_dir} is in use by {holder}: wait for it to finish, or choose another --out_dir")


@contextlib.contextmanager
def claimed_run_folder(config, stage, main_process=True):
    """The one place a trainer starts writing to out_dir. Holds an exclusive lock on
    out_dir/.lock for the block (the OS drops it if the process dies, so a crashed run's
    lock is stale and taken over), checks the folder again under the lock, and with
    --overwrite removes the old run's files. Other ranks of a torchrun job write nothing."""
    if not main_process:
        yield
        return
    out_dir = config["out_dir"]
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"config key 'out_dir': cannot create {out_dir} ({e.strerror})") from None
    handle = _acquire_lock(out_dir)
    try:
        check_run_folder(config, stage, holding_lock=True)  # another run may have written here meanwhile
        if config["overwrite"]:
            _remove_run_files(out_dir)
        yield
    finally:
        os.remove(os.path.join(out_dir, LOCK_FILE))
        handle.close()
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)


def _acquire_lock(out_dir):
    path = os.path.join(out_dir, LOCK_FILE)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            handle.close()
            raise ConfigError(f"{out_dir} is in use by {holder}: wait for it to finish, "
                              "or choose another --out_dir") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # the holder removed the file as we opened it: take the new one
    previous = _lock_holder(handle) if handle.tell() > 0 else None
    if previous:
        print(f"note: {path} was left by {previous}, which no longer runs (a crash?): taking the folder over")
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _remove_run_files(out_dir):
    for name in RUN_FILES + DERIVED_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def check_resume(saved, config, fixed_prefixes):
    """Before anything is written: keys under `fixed_prefixes` (those that shape the model)
    must equal the saved run's. Returns {key: [saved, new]} of the other keys that changed;
    they may change on resume (the step budget, for instance)."""
    old, new = flatten(saved), flatten(config)
    shared = [k for k in new if k in old]
    fixed = [k for k in shared if k.startswith(fixed_prefixes) and old[k] != new[k]]
    if fixed:
        raise ConfigError(f"--resume: {config['out_dir']} was trained with " + "; ".join(
            f"{k} = {old[k]!r} (given {new[k]!r})" for k in fixed) + ": these shape the model and cannot change "
            "on resume (start a new run with another --out_dir)")
    return {k: [old.get(k), new[k]] for k in new if k not in ("resume", "overwrite") and old.get(k) != new[k]}


# -----------------------------------------------------------------------------
# dataset files: never replaced by accident


def check_out_path(key, path, folder=False):
    """Before any work: `path` (a file to write, or a folder with folder=True) is not the
    other kind of thing, and it can be created and written. ConfigError naming `key`."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"config key '{key}': {path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise ConfigError(f"config key '{key}': {path} is a folder: give the file to write in it")
    parent = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"config key '{key}': cannot create {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"config key '{key}': cannot write to {path} (no permission in {parent})")


def check_not_there(path, overwrite):
    """A dataset is never replaced by accident: runs may have been trained on it."""
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"config key 'out': {path} exists (a run may have been trained on it): "
                          "replace it with --overwrite, or write elsewhere")


# -----------------------------------------------------------------------------
# runs to evaluate


def run_dir_of(path):
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def check_runs(paths):
    """Every run dir or checkpoint exists; a run dir holds the ckpt_best.pt we evaluate. A
    run still training is scored as its ckpt_best.pt stands now, with a note."""
    for path in paths:
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such run dir or checkpoint file")
        holder = run_in_use(run_dir_of(path))
        if holder:
            print(f"note: {run_dir_of(path)} is still training ({holder}): scoring its best checkpoint so far")
        best, last = os.path.join(path, "ckpt_best.pt"), os.path.join(path, "ckpt_last.pt")
        if os.path.isdir(path) and not os.path.isfile(best):
            hint = f" (evaluate {last} instead?)" if os.path.isfile(last) else " (not a run dir?)"
            raise CheckpointError(f"{path} holds no ckpt_best.pt{hint}")
