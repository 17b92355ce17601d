"""
Keep every checkpoint of running policy trainings: copies each run's ckpt_last.pt whenever it is
rewritten (every eval.interval steps), then, once every run has written a `done` file, makes one run
folder per kept step (config.yaml, log.jsonl, the checkpoint as ckpt_best.pt) that evaluate.py scores.

    python experiments/checkpoint_trajectory/keep_checkpoints.py OUT RUN [RUN ...] &
    for s in 0 1 2; do (OMP_NUM_THREADS=1 python train_policy.py --seed=$s --eval.interval=250 \
        --out_dir=runs/exp_traj_np_dpo_s$s; touch runs/exp_traj_np_dpo_s$s/done) & done; wait
    python evaluate.py OUT/* --split=val --policy_eval.temperature=0.1 --out=OUT_eval

OUT/<run>_step<NNNN>/ holds each step's folder (steps 250, 500, 750, 1000, 1500, 2000, 3000 kept).
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import ConfigError, run_script  # noqa: E402
from runs import load_checkpoint  # noqa: E402

KEEP = {250, 500, 750, 1000, 1500, 2000, 3000}


def main(args):
    if len(args) < 2 or any(a.startswith("-") for a in args):
        raise ConfigError("usage: keep_checkpoints.py OUT RUN [RUN ...]")
    out, runs = args[0], args[1:]
    if os.path.exists(out):
        raise ConfigError(f"{out} exists: give a new folder (nothing was written)")
    seen, copies = {r: 0.0 for r in runs}, []
    os.makedirs(out)
    while not all(os.path.exists(os.path.join(r, "done")) for r in runs):
        for r in runs:
            path = os.path.join(r, "ckpt_last.pt")
            if os.path.exists(path) and os.path.getmtime(path) != seen[r]:
                time.sleep(1.0)  # let the atomic replace finish
                seen[r] = os.path.getmtime(path)
                copies.append((r, os.path.join(out, f".{os.path.basename(os.path.normpath(r))}_{len(copies):03d}.pt")))
                shutil.copy(path, copies[-1][1])
        time.sleep(0.5)
    for r, path in copies:
        step = load_checkpoint(path)["step"]  # weights only
        if step in KEEP:
            folder = os.path.join(out, f"{os.path.basename(os.path.normpath(r))}_step{step:04d}")
            os.makedirs(folder, exist_ok=True)
            for name in ("config.yaml", "log.jsonl"):
                shutil.copy(os.path.join(r, name), folder)
            shutil.copy(path, os.path.join(folder, "ckpt_best.pt"))
        os.remove(path)


if __name__ == "__main__":
    run_script(main)
