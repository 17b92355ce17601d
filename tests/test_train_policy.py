"""The NP-DPO training script on a small toy task: it learns, saves only what it
trains, resumes exactly, refuses bad configs; evaluate.py and policy.py use its runs."""

import json
import os
import signal

import pytest
import torch

import data
import evaluate
import policy as policy_lib
import train_policy
from common import ConfigError, load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def small(root, *overrides):
    """Overrides for a seconds-long toy run whose inputs live under `root`."""
    return [f"--data.pairs={root}/pairs.jsonl", f"--data.features={root}/features.npz",
            f"--policy.base={root}/base", "--data.toy_pairs=800", "--toy_model.hidden_size=32",
            "--toy_model.intermediate_size=64", "--toy_model.sft_steps=150", "--toy_model.sft_batch_size=32",
            "--policy.lora.r=4", "--policy.film.hidden=32", "--policy.encoder.hidden=32", "--policy.film.latent_dim=8",
            "--train.steps=60", "--train.warmup_steps=5", "--train.batch_size=4", "--train.num_targets=4",
            "--eval.interval=30", "--eval.episodes=16", "--eval.context_sizes=[0,5]", *overrides]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """Toy pairs, a fine-tuned tiny base and its embeddings, built once."""
    root = str(tmp_path_factory.mktemp("toy"))
    config, _ = train_policy.load_config(train_policy.DEFAULTS, small(root))
    train_policy.build_toy_inputs(config)
    return root


@pytest.fixture(scope="module")
def np_dpo_run(toy_root, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("np_dpo"))
    metrics = train_policy.main(small(toy_root, f"--out_dir={out_dir}", "--train.steps=150", "--eval.interval=50",
                                      "--eval.episodes=48", "--train.nll_weight=0", "--train.lr=3e-3"))
    return out_dir, metrics


def test_toy_inputs_are_aligned(toy_root):
    rows = data.read_text_pairs(f"{toy_root}/pairs.jsonl")
    features = data.load_pairs(f"{toy_root}/features.npz")
    assert len(rows) == len(features.pairs) == 800 and features.labels == ["concise", "detailed"]
    assert features.pairs.shape[1:] == (2, 32)
    assert [row["split"] for row in rows] == features.split.tolist()


def test_short_np_dpo_run_moves_implicit_reward_accuracy_above_chance(np_dpo_run):
    _, metrics = np_dpo_run
    assert metrics["val/acc@5"] > 0.75  # 48 episodes x 4 targets: chance is 0.5


def test_checkpoint_holds_only_trained_tensors(np_dpo_run, toy_root):
    checkpoint = load_checkpoint(os.path.join(np_dpo_run[0], "ckpt_last.pt"))
    assert set(checkpoint["model"]) == {"lora", "film", "encoder"}
    assert all("lora_" in key for key in checkpoint["model"]["lora"])
    trained = sum(t.numel() for part in checkpoint["model"].values() for t in part.values())
    policy, _ = policy_lib.load_policy(os.path.join(np_dpo_run[0], "ckpt_last.pt"))
    assert trained == sum(p.numel() for p in policy.parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_run(toy_root, tmp_path):
    args = ["--train.steps=3", "--eval.interval=3", "--policy.lora.dropout=0.0"]
    plain = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/a", *args))
    checkpointed = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/b", *args, "--train.gradient_checkpointing"))
    assert checkpointed == pytest.approx(plain, abs=1e-5)


def test_plain_dpo_run_has_no_encoder(toy_root, tmp_path):
    train_policy.main(small(toy_root, f"--out_dir={tmp_path}", "--policy.film.latent_dim=0", "--train.steps=4",
                            "--eval.interval=2"))
    assert set(load_checkpoint(os.path.join(tmp_path, "ckpt_best.pt"))["model"]) == {"lora"}


def signal_at_step(monkeypatch, step, sig):
    make_batch, calls = train_policy.make_batch, [0]

    def make_batch_and_signal(sampler, token_pairs, batch_size, pad_id, device, num_context=None):
        if num_context is None:  # a training batch
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), sig)
        return make_batch(sampler, token_pairs, batch_size, pad_id, device, num_context)

    monkeypatch.setattr(train_policy, "make_batch", make_batch_and_signal)


def test_resume_equals_uninterrupted_training(toy_root, tmp_path, monkeypatch):
    args = ["--train.steps=12", "--eval.interval=5", "--policy.lora.dropout=0.1"]
    straight = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/a", *args))
    with monkeypatch.context() as patch:
        signal_at_step(patch, 7, signal.SIGINT)
        with pytest.raises(SystemExit, match="continue with --resume"):
            train_policy.main(small(toy_root, f"--out_dir={tmp_path}/b", *args))
    assert load_checkpoint(f"{tmp_path}/b/ckpt_last.pt")["step"] == 7
    resumed = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/b", *args, "--resume"))
    assert resumed == straight
    a, b = (load_checkpoint(f"{tmp_path}/{x}/ckpt_last.pt")["model"] for x in "ab")
    for part in a:
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


@pytest.mark.parametrize("override, key", [
    ("--train.beta=0", "train.beta"), ("--train.lr=-1", "train.lr"), ("--train.min_context=11", "train.min_context"),
    ("--train.autocast=fp8", "train.autocast"), ("--train.grad_accum=0", "train.steps")])
def test_bad_config_names_the_key(toy_root, tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}", override))


def test_features_must_align_with_pairs(toy_root, tmp_path):
    rows = data.read_text_pairs(f"{toy_root}/pairs.jsonl")
    data.write_text_pairs(f"{tmp_path}/fewer.jsonl", rows[:-1])
    with pytest.raises(data.DataError, match="row-aligned"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}", f"--data.pairs={tmp_path}/fewer.jsonl",
                                "--data.toy=false"))


def test_evaluate_policy_mode(np_dpo_run, tmp_path):
    rows = evaluate.main([np_dpo_run[0], "--num-context=[0,3]", "--policy_eval.episodes=16",
                          "--policy_eval.contexts_per_prompt=2", "--policy_eval.samples_per_context=2",
                          f"--out={tmp_path}"])
    accuracy = [r for r in rows if "accuracy" in r]
    steering = [r for r in rows if "gold_reward" in r]
    assert {r["label"] for r in accuracy} == {"concise", "detailed", "all"}
    assert {(r["label"], r["num_context"]) for r in steering} == {(l, n) for l in ("concise", "detailed") for n in (0, 3)}
    assert all(r["samples"] > 0 and r["sem"] >= 0 for r in steering)
    assert json.load(open(tmp_path / "eval.json")) == rows


def test_policy_cli_steers_from_a_context_file(np_dpo_run, tmp_path, capsys):
    rows = [{"prompt": "tell me about cats .", "response_a": "cats are nice .",
             "response_b": "cats are nice . cats look old .", "choices": {"me": 0}}]
    data.write_text_pairs(f"{tmp_path}/me.jsonl", rows)
    policy_lib.main([np_dpo_run[0], f"--context={tmp_path}/me.jsonl", "--prompt=describe tea .", "--samples=2",
                     "--max_new_tokens=12"])
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert len(lines) == 2 and all(lines)
