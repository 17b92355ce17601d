"""
Weight averaging, a first look: the element-wise mean of the saved weights (LoRA, FiLM, encoder) of
several checkpoints of one run, written as a run folder that evaluate.py scores.

    python experiments/checkpoint_trajectory/average_checkpoints.py OUT FOLDER [FOLDER ...]

FOLDERs are keep_checkpoints.py's step folders of one run (e.g. .../exp_traj_np_dpo_s0_step0250 ...
_step1500); OUT gets the first folder's config.yaml and log.jsonl and the averaged ckpt_best.pt.
"""

import os
import shutil
import sys

import torch


def main(out, folders):
    checkpoints = [torch.load(os.path.join(f, "ckpt_best.pt"), weights_only=False, map_location="cpu")
                   for f in folders]
    averaged = checkpoints[0]
    averaged["model"] = {part: {key: torch.stack([c["model"][part][key].float() for c in checkpoints]).mean(0)
                                for key in weights}
                         for part, weights in checkpoints[0]["model"].items()}
    os.makedirs(out, exist_ok=False)
    for name in ("config.yaml", "log.jsonl"):
        shutil.copy(os.path.join(folders[0], name), out)
    torch.save(averaged, os.path.join(out, "ckpt_best.pt"))


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit("usage: average_checkpoints.py OUT FOLDER FOLDER [FOLDER ...]")
    main(sys.argv[1], sys.argv[2:])
