"""Shared fixtures: every test runs in its own tmp dir, and one small NP-BTL (and one
BTL) is trained once per session on a small copy of the paper's synthetic task."""

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import data
import toy
import train_policy
import train_reward


# A tiny model and a fixed schedule: a full run takes well under a second on 2 CPU cores.
TINY = ["--model.hidden=16", "--model.encoder.hidden=16", "--model.encoder.latent_dim=4",
        "--train.batch_size=8", "--train.steps=30", "--train.warmup_steps=5", "--train.patience=0",
        "--eval.interval=10", "--eval.episodes=16", "--eval.context_sizes=[0,3]"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # scripts run from here in subprocesses


# gloo on CPU can, rarely and only under load, abort one rank as the processes exit (a C++
# thread torn down with the process group; cf. pytorch/pytorch#179291). run_torchrun then runs
# once more from scratch rather than flake CI; a test still needs one clean run.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_torchrun(script, args, out_dir, timeout):
    """`script` under torchrun with 2 processes (1 thread each), writing to `out_dir`; the CompletedProcess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
               *args, f"--out_dir={out_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 and GLOO_TEARDOWN_ABORT in result.stderr:
        shutil.rmtree(out_dir, ignore_errors=True)
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return result


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs scripts in processes of their own (torchrun included); "
                                       "CI runs them, `-m 'not slow'` skips them locally")


def prepare_main(argv):
    """prepare/<argv[0]>.py's main on the rest: prepare_main(["synthetic", "--out=x.npz"])."""
    return importlib.import_module(f"prepare.{argv[0]}").main(argv[1:])


def folder_hashes(folder):
    """{relative path: sha256} of every file under `folder`: equal before and after means nothing was written."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def train(out_dir, data_path, *overrides):
    """train_reward.main on `data_path`, writing to `out_dir`, for a fixed train.steps unless
    overridden; returns the last val metrics."""
    return train_reward.main([f"--out_dir={out_dir}", f"--data.path={data_path}", "--train.patience=0", *overrides])


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Nothing a test writes by a relative path lands in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def paper_path(tmp_path_factory):
    """The paper's task with 4000 pairs (3200 / 400 / 400 per split, both types answer all)."""
    path = str(tmp_path_factory.mktemp("data") / "paper.npz")
    data.save_pairs(path, data.make_paper_synthetic(num_pairs=4000, seed=0))
    return path


@pytest.fixture(scope="session")
def np_btl_run(tmp_path_factory, paper_path):
    """(run dir, final val metrics) of NP-BTL trained 300 steps (about 3 s)."""
    out_dir = str(tmp_path_factory.mktemp("np_btl"))
    metrics = train(out_dir, paper_path, "--train.steps=300", "--train.warmup_steps=20",
                    "--eval.interval=100", "--eval.episodes=128")
    return out_dir, metrics


@pytest.fixture(scope="session")
def btl_run(tmp_path_factory, paper_path):
    """(run dir, final val metrics) of the BTL baseline trained 100 steps."""
    out_dir = str(tmp_path_factory.mktemp("btl"))
    metrics = train(out_dir, paper_path, "--model.kind=btl", "--train.steps=100", "--train.warmup_steps=20",
                    "--eval.interval=50", "--eval.episodes=128")
    return out_dir, metrics


# -----------------------------------------------------------------------------
# the policy's toy task


def small(root, *overrides):
    """Overrides for a seconds-long toy run whose inputs live under `root`."""
    return [f"--data.pairs={root}/pairs.jsonl", f"--data.features={root}/features.npz", "--data.generate",
            f"--policy.base={root}/base", "--data.world=two_types", "--data.preferences=null", "--data.toy_pairs=800", "--toy_model.hidden_size=32",
            "--toy_model.intermediate_size=64", "--toy_model.sft_steps=150", "--toy_model.sft_batch_size=32",
            "--policy.lora.r=4", "--policy.film.hidden=32", "--policy.encoder.hidden=32", "--policy.encoder.latent_dim=8",
            "--train.steps=60", "--train.warmup_steps=5", "--train.encoder_warmup_steps=0", "--train.batch_size=4", "--train.num_targets=4",
            "--eval.interval=30", "--eval.episodes=16", "--eval.context_sizes=[0,5]", *overrides]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """Toy pairs, a fine-tuned tiny base and its embeddings, built once."""
    root = str(tmp_path_factory.mktemp("toy"))
    config, _ = train_policy.load_config(train_policy.DEFAULTS, small(root))
    toy.build_toy_inputs(config)
    return root


# -----------------------------------------------------------------------------
# text pairs, shared by test_text.py and test_prepare.py

GOOD_ROW = {"prompt": "p", "response_a": "a", "response_b": "b", "choices": {"u1": 0, "u2": None}}


def write_lines(path, lines):
    """A JSONL file of raw lines (dicts are dumped, strings written as they are)."""
    with open(path, "w") as f:
        f.write("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}tell {% endif %}")


@pytest.fixture(scope="module")
def toy_rows():
    return toy.make_toy_text_pairs(num_pairs=600, conflict_fraction=0.75, seed=0)


@pytest.fixture(scope="module")
def paper():
    """The paper's task, 2,000 pairs."""
    return data.make_paper_synthetic(num_pairs=2000, seed=0)


@pytest.fixture(scope="module")
def population():
    """A continuous linear population: 50 users answering 40 pairs each."""
    return data.make_linear_synthetic(num_users=50, pairs_per_user=40, dim=3, seed=0)
