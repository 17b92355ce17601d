"""bench.py runs both benchmarks on tiny settings and prints one table whose rows hold
measured, positive numbers (no speed target is asserted here: the README reports them)."""

import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import reward
from common import CheckpointError, ConfigError
from conftest import REPO, small
from data import DataError, make_linear_synthetic, save_pairs
from runs import save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def numbers(value):
    return [float(x.replace(",", "")) for x in re.findall(r"[\d,]*\.?\d+", value)]


def test_reward_bench_prints_one_table(paper_path, capsys):
    rows = bench.main(["reward", f"--data.path={paper_path}", "--bench.train_steps=3", "--bench.repeats=5"])
    out = capsys.readouterr().out
    assert out.count("| measure | value |") == 1
    assert [m.split(",")[0].split(":")[0] for m, _ in rows] == ["reward training", "reward training", "reward",
                                                                "reward", "reward", "reward", "reward"]
    adapt_particles, question, particles, adaptive = rows[-4:]
    assert "adapt to a new user under 32 particles" in adapt_particles[0]  # bench.particles
    assert len(adapt_particles[1].split(" / ")) == 2
    assert "choose the next question by infogain from 1000 cached candidates (look-ahead" in question[0]
    assert "under 32 particles" in particles[0] and "from 1000 candidates" in particles[0]
    assert all(float(v) > 0 for row in (question, particles) for v in row[1].split(" / "))
    assert "answers of a test user / with 10 random answers" in question[0]
    assert [len(row[1].split(" / ")) for row in (question, particles, adaptive)] == [3, 3, 2]
    assert "32 particles that follow the posterior over 2048 latents" in adaptive[0]
    assert all(n > 0 for _, value in rows for n in numbers(value))
    assert all(f"| {m} | {v} |" in out for m, v in rows)


def test_reward_bench_times_the_posterior_predictive(paper_path, monkeypatch):
    calls = []
    original = reward.NPBTL.predictive_log_prob_chosen
    monkeypatch.setattr(reward.NPBTL, "predictive_log_prob_chosen",
                        lambda self, batch, samples: calls.append(samples) or original(self, batch, samples))
    rows = bench.main(["reward", f"--data.path={paper_path}", "--bench.train_steps=3", "--bench.repeats=5",
                       "--model.encoder.stochastic=true", "--model.predict_samples=32"])
    assert "posterior predictive, 32 draws of z" in rows[2][0]
    assert calls == [32] * 5  # every timed adaptation draws the 32 samples
    assert "then over 32 draws of z for the best 16" in rows[-3][0]  # the question choice draws its own


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
                                                 ("policy", "--bench.train_steps=0", "bench.train_steps"),
                                                 ("reward", "--bench.particles=0", "bench.particles"),
                                                 ("reward", "--bench.particle_latents=0", "bench.particle_latents")])
def test_bad_bench_settings_name_the_key(mode, override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        bench.main([mode, override])


# -----------------------------------------------------------------------------
# bad inputs: one line each, refused before anything is timed


@pytest.fixture
def no_timing(monkeypatch):
    def timing_started(*args):
        raise AssertionError("timing started")
    monkeypatch.setattr(bench, "time_reward_training", timing_started)


def test_reward_bench_times_a_trained_run(np_btl_run, paper_path, monkeypatch):
    from data import load_pairs
    from reward import load_reward_model

    seen = []
    original = bench.time_question_choice
    monkeypatch.setattr(bench, "time_question_choice", lambda model, *a, **k: seen.append(
        {k: v.clone() for k, v in model.state_dict().items()}) or original(model, *a, **k))
    rows = bench.main(["reward", f"--data.path={paper_path}", f"--run={np_btl_run[0]}", "--bench.train_steps=3",
                       "--bench.repeats=5"])
    assert all(n > 0 for _, value in rows for n in numbers(value))
    trained = load_reward_model(np_btl_run[0], load_pairs(paper_path).dim, "cpu", paper_path)[0].state_dict()
    assert seen and all(torch.equal(w[k], trained[k]) for w in seen for k in trained)  # not the timed steps'


@pytest.mark.parametrize("overrides, message", [
    (["--data.path=missing.npz", "--data.synthetic=null"], "missing.npz: file not found"),
    (["--data.path=missing.npz"], "data.path: missing.npz not found (to generate the 'paper' task there, add "
                                  "--data.generate)")])
def test_missing_data_file_is_refused(tmp_path, no_timing, overrides, message):
    with pytest.raises(DataError, match=re.escape(message)):
        bench.main(["reward", *overrides])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("run, overrides, error, message", [
    ("btl", [], ConfigError, "--run: {run} was trained with model.kind = 'btl' (benchmarked: 'np_btl')"),
    ("np_btl", ["--model.hidden=16"], ConfigError, "--run: {run} was trained with model.hidden = 64 (benchmarked: 16)"),
    ("policy", [], CheckpointError, "--run: {run} is a policy run; bench.py reward times a reward model"),
    ("missing", [], CheckpointError, "--run: {run}: no such run dir or checkpoint file")],
    ids=["other kind", "other sizes", "policy run", "missing"])
def test_a_run_of_another_model_is_refused(np_btl_run, btl_run, paper_path, tmp_path, no_timing, run, overrides, error,
                                           message):
    save_checkpoint(str(tmp_path / "policy" / "ckpt_best.pt"), {"model": {}, "config": {}, "step": 0,
                                                                 "policy_config": {}})
    path = {"btl": btl_run[0], "np_btl": np_btl_run[0], "policy": str(tmp_path / "policy"),
            "missing": str(tmp_path / "missing")}[run]
    with pytest.raises(error, match=re.escape(message.format(run=path))):
        bench.main(["reward", f"--data.path={paper_path}", f"--run={path}", *overrides])


def test_a_run_on_data_of_another_dimension_is_refused(np_btl_run, tmp_path, no_timing):
    save_pairs(str(tmp_path / "d3.npz"), make_linear_synthetic(num_pairs=300, dim=3))
    with pytest.raises(DataError, match=f"d3.npz has options of dimension 3, but {np_btl_run[0]} was trained on "
                                        "dimension 1"):
        bench.main(["reward", f"--data.path={tmp_path}/d3.npz", f"--run={np_btl_run[0]}"])


@pytest.mark.slow
def test_cli_user_error_is_one_line_exit_2(btl_run, paper_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "reward", f"--data.path={paper_path}",
                             f"--run={btl_run[0]}"], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: --run:") and "model.kind = 'btl'" in lines[0]


def test_question_bench_answers_are_one_test_users_own(paper_path):
    from data import chosen_first, load_pairs

    data = load_pairs(paper_path)
    context = bench.user_answers(data, 10)[0]  # (10, 2, D), chosen first
    test = torch.from_numpy(data.split == "test")

    def answered_by(label):  # the test pairs as this label answered them, chosen first
        rows = test & (data.choices[:, label] >= 0)
        return chosen_first(data.pairs[rows], data.choices[rows, label] == 1)

    def explains(label):
        oriented = answered_by(label)
        return all(((oriented - pair).abs().sum((1, 2)) == 0).any() for pair in context)

    assert any(explains(label) for label in range(len(data.labels)))  # one test user's own answers
