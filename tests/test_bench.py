"""bench.py runs both benchmarks on tiny settings and prints one table whose rows hold
measured, positive numbers (no speed target is asserted here: the README reports them)."""

import os
import re

import pytest

import bench
from common import ConfigError
from conftest import REPO, small

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


def test_random_weights_policy_bench_at_a_real_models_shape(tmp_path, capsys):
    """The GPU config (Qwen2.5-1.5B-shaped, random weights, random token pairs), shrunk to a tiny
    Qwen2 for the CPU: it builds the model from a config.json alone and trains at the given shape."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "tiny_qwen2")
    rows = dict(bench.main(["policy", os.path.join(REPO, "configs/bench_qwen2.5_1.5b.yaml"),
                            f"--policy.base={tmp_path}/tiny_qwen2", "--policy.dtype=float32", "--policy.lora.r=4",
                            "--bench.prompt_tokens=12", "--bench.response_tokens=7", "--bench.context_dim=16",
                            "--bench.random_pairs=64", "--bench.train_steps=2", "--bench.repeats=2",
                            "--bench.new_tokens=3", "--train.precompute_ref_logps"]))
    out = capsys.readouterr().out
    assert "random weights, 12 + 7 tokens a pair" in out
    # 4 episodes x 9 targets = 36 pairs a step, each 2 x (12 + 7) tokens: tokens/s = 38 x pairs/s
    pairs_per_s = numbers(rows["NP-DPO training, pairs/s (precomputed reference)"])[0]
    tokens_per_s = numbers(rows["NP-DPO training, tokens/s (chosen + rejected tokens)"])[0]
    assert tokens_per_s == pytest.approx(38 * pairs_per_s, rel=0.01)


@pytest.mark.parametrize("mode, override, key", [("reward", "--bench.repeats=1", "bench.repeats"),
                                                 ("policy", "--bench.train_steps=0", "bench.train_steps")])
def test_bad_bench_settings_name_the_key(mode, override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        bench.main([mode, override])
