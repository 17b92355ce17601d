"""
A steering-world run's world (world.py) built again with other test users: the same
training and validation pairs, row for row, and `test_users` new users on the test
topics, whom no run saw and no choice was made on. evaluate.py --world_data=OUT scores
the world's policy runs on them (more users: a smaller SEM over users).

    python prepare/steer_world.py --run=runs/steer_world_np_dpo --out=data/steer_world_t1250 --test_users=1250

Writes pairs.jsonl, users.json and features.npz (the pairs embedded by the run's base
model) in the folder --out, with the run's world settings (its config.yaml). The world's
seed is not recorded in a run (a second training seed reuses the first one's world):
--seed gives it, 0 for the default's; a build whose training pairs are not the run's is
refused, and so is evaluate.py given one. The first of the new test users share the old
ones' preferred length (one random stream), not their tone.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

from common import REQUIRED, check, check_positive, load_options, read_yaml, run_script
from data import DataError
from policy_eval import WORLD_FILES, same_training_pairs
from runs import check_not_there, check_out_path
from toy import build_missing

DEFAULTS = {
    "run": REQUIRED,  # a policy run of the steering world: its world settings and base model
    "out": REQUIRED,  # the folder to write
    "test_users": 1250,  # test users (the default world has 100)
    "seed": 0,  # the world's seed (the default world's: 0)
    "overwrite": False,  # replace an existing --out
}


def main(argv):
    options = load_options(DEFAULTS, argv)
    check_positive(options, "test_users")
    out, recorded = options["out"], os.path.join(options["run"], "config.yaml")
    check(os.path.isfile(recorded), "run", f"{options['run']}: not a run folder (no config.yaml)")
    config = read_yaml(recorded)
    check(config.get("stage") == "policy" and (config.get("data") or {}).get("world") == "continuum", "run",
          f"{options['run']} is not a policy run of the steering world (data.world: continuum)")
    check(os.path.isfile(os.path.join(config["policy"]["base"], "config.json")), "run",
          f"its base model {config['policy']['base']} is not found from here")
    trained_on = config["data"]["pairs"]
    check(os.path.isfile(trained_on), "run", f"its pairs {trained_on} are not found from here")
    check_out_path("out", out, folder=True)
    check(os.path.abspath(out) != os.path.abspath(os.path.dirname(trained_on)), "out",
          f"{out} is the world {options['run']} was trained on: write the new one elsewhere")
    check_not_there(out, options["overwrite"])
    check(not os.path.exists(out) or set(os.listdir(out)) <= {*WORLD_FILES.values(), "toy_settings.json"}, "out",
          f"{out} holds other files than a world's: --overwrite replaces only a folder this script wrote")
    tmp = f"{os.path.normpath(out)}.tmp{os.getpid()}"  # then renamed: an interrupted build leaves nothing
    world = {key: os.path.join(tmp, name) for key, name in WORLD_FILES.items()}
    users = [*config["data"]["world_users"][:2], options["test_users"]]
    config.update(seed=options["seed"], data=dict(config["data"], **world, world_users=users, toy=True, generate=True))
    try:
        build_missing(config)
        try:
            same_training_pairs(trained_on, world["pairs"])
        except DataError:  # a wrong --seed: another world
            raise DataError(f"--seed={options['seed']} builds another world: its training pairs are not those of "
                            f"{trained_on}, which {options['run']} was trained on (the default world's seed is 0)")
        shutil.rmtree(out, ignore_errors=True)  # only with --overwrite, a world folder
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {options['run']}'s world with {users[2]} test users to {out}")


if __name__ == "__main__":
    run_script(main)
