"""
Weight averaging, a first look: the element-wise mean of the saved weights (LoRA, FiLM, encoder) of
several checkpoints of one run, written as a run folder that evaluate.py scores.

    python experiments/checkpoint_trajectory/average_checkpoints.py OUT FOLDER FOLDER [FOLDER ...]

FOLDERs are keep_checkpoints.py's step folders of one run (e.g. .../exp_traj_np_dpo_s0_step0250 ...
_step1500); OUT gets the first folder's config.yaml and log.jsonl and the averaged ckpt_best.pt.
"""

import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import ConfigError, run_script  # noqa: E402
from runs import load_checkpoint  # noqa: E402


def main(args):
    if len(args) < 3 or any(a.startswith("-") for a in args):
        raise ConfigError("usage: average_checkpoints.py OUT FOLDER FOLDER [FOLDER ...]")
    out, folders = args[0], args[1:]
    if os.path.exists(out):
        raise ConfigError(f"{out} exists: give a new folder (nothing was written)")
    checkpoints = [load_checkpoint(f) for f in folders]  # weights only; a clear line for a wrong path
    if any(c["config"] != checkpoints[0]["config"] for c in checkpoints):
        raise ConfigError("the checkpoints come from runs with different configs: give one run's steps")
    averaged = checkpoints[0]
    averaged["model"] = {part: {key: torch.stack([c["model"][part][key].float() for c in checkpoints]).mean(0)
                                for key in weights}
                         for part, weights in checkpoints[0]["model"].items()}
    os.makedirs(out)
    for name in ("config.yaml", "log.jsonl"):
        shutil.copy(os.path.join(folders[0], name), out)
    torch.save(averaged, os.path.join(out, "ckpt_best.pt"))


if __name__ == "__main__":
    run_script(main)
