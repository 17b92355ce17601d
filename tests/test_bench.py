"""bench.py runs both benchmarks on tiny settings and prints one table whose rows hold
measured, positive numbers (no speed target is asserted here: the README reports them)."""

import re

import pytest

import bench
from common import ConfigError
from conftest import small

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def numbers(value):
    return [float(x.replace(",", "")) for x in re.findall(r"[\d,]*\.?\d+", value)]


def test_reward_bench_prints_one_table(paper_path, capsys):
    rows = bench.main(["reward", f"--data.path={paper_path}", "--bench.train_steps=3", "--bench.repeats=5"])
    out = capsys.readouterr().out
    assert out.count("| measure | value |") == 1
    assert [m.split(",")[0].split(":")[0] for m, _ in rows] == ["reward training", "reward training", "reward"]
    assert all(n > 0 for _, value in rows for n in numbers(value))
    assert all(f"| {m} | {v} |" in out for m, v in rows)


def test_policy_bench_with_precomputed_reference(toy_root, capsys):
    rows = dict(bench.main(["policy", *small(toy_root, "--bench.train_steps=2", "--bench.repeats=2",
                                             "--bench.new_tokens=4", "--train.precompute_ref_logps")]))
    assert capsys.readouterr().out.count("| measure | value |") == 1
    assert "NP-DPO training, pairs/s (precomputed reference)" in rows
    assert "NP-DPO: reference log-probs precomputed once, pairs/s" in rows
    assert all(n > 0 for value in rows.values() for n in numbers(value))


def test_bench_refuses_a_config_without_a_mode():
    with pytest.raises(ConfigError, match=r"usage: python bench.py \[reward\|policy"):
        bench.main(["configs/synthetic.yaml"])
