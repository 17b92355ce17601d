"""
Synthetic preference data with a known generator (so the Bayes-optimal accuracy is exact).

    python prepare/synthetic.py --out=data/paper_synthetic.npz        # the paper's task
    python prepare/synthetic.py --generator=linear --dim=8 --num_types=4 --temperature=0.1 --out=data/linear.npz
    python prepare/synthetic.py --generator=linear --num_users=2000 --pairs_per_user=40 --out=data/users.npz
    python prepare/synthetic.py --generator=waves --num_types=3 --out=data/three_types.npz
    python prepare/synthetic.py --generator=linear --num_users=2000 --pairs_per_user=40 --dim=4 --temperature=0.1 \
        --test_pairs_per_user=250 --out=data/population_pool.npz   # test users with 250 pairs each

The generators are data.make_paper_synthetic, make_waves_synthetic and make_linear_synthetic.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

from common import REQUIRED, check, check_positive, load_options, run_script
from data import describe, make_linear_synthetic, make_paper_synthetic, make_waves_synthetic, save_pairs
from runs import check_not_there, check_out_path

DEFAULTS = {
    "out": REQUIRED,  # where to write the .npz
    "generator": "paper",  # paper | waves | linear
    "num_pairs": 20000,  # pairs (paper, waves, linear with user types)
    "seed": 0,  # generator seed
    "dim": 8,  # option features (linear)
    "num_types": 2,  # user types answering every pair (waves, linear)
    "waves": 2,  # sine harmonics in each type's 1-D reward (waves)
    "num_users": 0,  # > 0: a continuous population of users instead of types (linear)
    "pairs_per_user": 40,  # pairs each user answers (linear, num_users > 0)
    "test_pairs_per_user": 0,  # more than pairs_per_user: test users answer this many (a pool for --queries)
    "temperature": 0.0,  # 0: deterministic choices; > 0: Bradley-Terry sampling (waves, linear)
    "overwrite": False,  # replace an existing --out (runs may have been trained on it)
}


def main(argv):
    config = load_options(DEFAULTS, argv)
    check(config["generator"] in ("paper", "waves", "linear"), "generator",
          f"unknown generator '{config['generator']}' (paper | waves | linear)")
    check_positive(config, "num_pairs", "dim", "num_types", "waves", "pairs_per_user")
    check(config["num_users"] >= 0 and config["temperature"] >= 0 and config["test_pairs_per_user"] >= 0,
          "num_users", "num_users, test_pairs_per_user and temperature must be non-negative")
    more = config["test_pairs_per_user"]
    check(not more or (config["generator"] == "linear" and config["num_users"] > 0 and more > config["pairs_per_user"]),
          "test_pairs_per_user", "gives a population's test users more pairs: needs --generator=linear, "
          f"--num_users > 0 and a count above pairs_per_user = {config['pairs_per_user']} (0: as many as the others)")
    check_out_path("out", config["out"])
    check_not_there(config["out"], config["overwrite"])
    if config["generator"] == "paper":
        data = make_paper_synthetic(config["num_pairs"], config["seed"])
    elif config["generator"] == "waves":
        keys = ("num_pairs", "num_types", "temperature", "waves", "seed")
        data = make_waves_synthetic(**{k: config[k] for k in keys})
    else:
        keys = ("num_pairs", "dim", "num_types", "temperature", "num_users", "pairs_per_user", "seed",
                "test_pairs_per_user")
        data = make_linear_synthetic(**{k: config[k] for k in keys})
    save_pairs(config["out"], data)
    print(f"wrote {config['out']}: {describe(data)}")
    return data


if __name__ == "__main__":
    run_script(main)
