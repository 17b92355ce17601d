import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import reward
import train_reward
from common import CheckpointError, ConfigError, TrainingError, load_config, lr_at
from conftest import REPO, TINY, folder_hashes, run_torchrun, train
from data import DataError
from runs import load_checkpoint


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# end to end


def test_np_btl_learns_the_paper_task(np_btl_run):
    out_dir, metrics = np_btl_run
    assert metrics["val/acc@10"] > 0.85
    assert metrics["val/acc@10"] > metrics["val/acc@0"] + 0.1
    assert {"ckpt_best.pt", "ckpt_last.pt", "config.yaml", "log.jsonl"} <= set(os.listdir(out_dir))
    config, _ = load_config(train_reward.DEFAULTS, [os.path.join(out_dir, "config.yaml")])  # reusable as is
    assert config == load_checkpoint(out_dir)["config"]
    assert config["train"]["steps"] == 300 and config["out_dir"] == out_dir
    log = read_log(out_dir)
    assert [row["step"] for row in log] == [100, 200, 300]
    assert {k: log[-1][k] for k in metrics} == metrics


def test_checkpoints_hold_the_best_and_the_last_step(np_btl_run):
    out_dir, _ = np_btl_run
    log, best, last = read_log(out_dir), load_checkpoint(out_dir), load_checkpoint(os.path.join(out_dir, "ckpt_last.pt"))
    best_row = min(log, key=lambda row: row["val/loss"])
    assert best["step"] == best_row["step"] and best["best_val_loss"] == best_row["val/loss"]
    assert last["step"] == 300 and last["best_val_loss"] == best["best_val_loss"]
    assert {"model", "optimizer", "config", "step", "metrics", "sampler_rng", "torch_rng"} <= last.keys()


@pytest.mark.parametrize("kind", ["btl", "dpl"])
def test_baselines_train(tmp_path, paper_path, kind):
    metrics = train(tmp_path, paper_path, f"--model.kind={kind}", "--train.steps=100", "--train.warmup_steps=20",
                    "--eval.interval=100", "--eval.episodes=64")
    assert metrics["val/acc@0"] > 0.65  # about 0.75 is the best a context-blind model can do


def test_stochastic_np_btl_learns(tmp_path, paper_path):
    metrics = train(tmp_path, paper_path, "--model.encoder.stochastic=true", "--model.encoder.aggregator=mean",
                    "--train.steps=200", "--train.warmup_steps=20", "--eval.interval=200", "--eval.episodes=64",
                    "--eval.context_sizes=[0,10]")
    assert metrics["val/acc@10"] > 0.85


def test_data_is_generated_at_a_missing_path_only_when_asked(tmp_path):
    path = str(tmp_path / "new" / "paper.npz")
    with pytest.raises(DataError, match=f"data.path: {path} not found .*add --data.generate"):
        train(tmp_path / "run", path, *TINY, "--train.steps=2")  # a typo is not an invitation
    assert not os.path.exists(path) and not os.path.exists(tmp_path / "run")
    train(tmp_path / "run", path, *TINY, "--train.steps=2", "--data.generate")
    assert data.load_pairs(path).meta["generator"] == "paper"


def test_data_is_generated_at_its_default_path():
    train_reward.main(["--out_dir=run", *TINY, "--train.steps=2"])  # in a tmp dir (conftest)
    assert data.load_pairs("data/paper_synthetic.npz").meta["generator"] == "paper"


def test_missing_data_without_a_generator_is_an_error(tmp_path):
    path = str(tmp_path / "nope.npz")
    with pytest.raises(DataError, match=f"{path}: file not found"):
        train(tmp_path / "run", path, "--data.synthetic=null", *TINY)


def test_lr_schedule_by_hand():
    t = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "steps": 110}
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_at(110, t) == pytest.approx(0.1)


# -----------------------------------------------------------------------------
# config validation


@pytest.mark.parametrize("overrides, key", [
    (["--train.lr=-0.001"], "train.lr"),
    (["--train.min_lr=0.01"], "train.min_lr"),  # above train.lr
    (["--train.min_context=5", "--train.max_context=3"], "train.min_context"),
    (["--train.min_context=-1"], "train.min_context"),
    (["--train.steps=0"], "train.steps"),
    (["--train.batch_size=0"], "train.batch_size"),
    (["--train.num_targets=0"], "train.num_targets"),
    (["--model.kind=gpt"], "model.kind"),
    (["--model.encoder.aggregator=max"], "model.encoder.aggregator"),
    (["--eval.interval=0"], "eval.interval"),
    (["--eval.context_sizes=[1,-2]"], "eval.context_sizes"),
    (["--data.synthetic=cubic"], "data.synthetic"),
])
def test_bad_config_names_the_key_before_writing_anything(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        train(tmp_path / "run", tmp_path / "paper.npz", *overrides)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("overrides, message", [
    (["--train.num_targets=3200"], r"label 'type\d' has 3200 answered pairs in split 'train', fewer than "
                                   r"train.num_targets \+ train.max_context = 3210"),
    (["--eval.num_targets=398"], r"label 'type\d' has 400 answered pairs in split 'val', fewer than "
                                 r"eval.num_targets \+ the largest of eval.context_sizes = 401"),
])
def test_settings_larger_than_a_labels_pairs_stop_before_training(tmp_path, paper_path, overrides, message):
    with pytest.raises(DataError, match=message):
        train(tmp_path / "run", paper_path, *TINY, *overrides)
    assert not os.path.exists(tmp_path / "run")  # nothing written, no step trained


def test_unexpected_positional_argument(tmp_path):
    with pytest.raises(ConfigError, match=r"unexpected arguments \['oops'\]"):
        train_reward.main(["oops", f"--out_dir={tmp_path}"])


def test_empty_context_sizes_is_refused(tmp_path, paper_path):
    with pytest.raises(ConfigError, match="config key 'eval.context_sizes'"):
        train(tmp_path / "run", paper_path, *TINY, "--eval.context_sizes=[]")


def test_empty_value_is_refused(tmp_path, paper_path):
    with pytest.raises(ConfigError, match="config key 'train.lr'"):
        train(tmp_path / "run", paper_path, *TINY, "--train.lr=")


# -----------------------------------------------------------------------------
# stop and resume


def signal_at_training_step(monkeypatch, step, sig):
    """Deliver `sig` to this process while the training batch of `step` (1-based) is drawn."""
    sample, drawn = data.EpisodeSampler.sample, [0]

    def sample_and_signal(self, batch_size, num_context=None, label_rows=None):
        if num_context is None:  # a training batch; validation fixes num_context
            drawn[0] += 1
            if drawn[0] == step:
                os.kill(os.getpid(), sig)
        return sample(self, batch_size, num_context, label_rows)

    monkeypatch.setattr(data.EpisodeSampler, "sample", sample_and_signal)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stochastic, sig", [(False, signal.SIGINT), (True, signal.SIGTERM)],
                         ids=["deterministic-SIGINT", "stochastic-SIGTERM"])
def test_resume_equals_uninterrupted_training(tmp_path, paper_path, monkeypatch, stochastic, sig):
    args = [*TINY, f"--model.encoder.stochastic={stochastic}", "--model.encoder.aggregator=attention"]
    straight = train(tmp_path / "straight", paper_path, *args)

    signal_at_training_step(monkeypatch, 17, sig)
    with pytest.raises(SystemExit, match="stopped by a signal: .*ckpt_last.pt .* --resume"):
        train(tmp_path / "resumed", paper_path, *args)
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "resumed" / "ckpt_last.pt"))["step"] == 17
    resumed = train(tmp_path / "resumed", paper_path, *args, "--resume")

    assert resumed == straight
    assert read_log(tmp_path / "resumed") == read_log(tmp_path / "straight")
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        a, b = (load_checkpoint(str(tmp_path / run / name)) for run in ("straight", "resumed"))
        assert a["step"] == b["step"] and a["best_val_loss"] == b["best_val_loss"]
        assert_same_state(a["model"], b["model"])
        assert all(torch.equal(x, y) for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
                   for x, y in zip(s.values(), t.values()))


def test_resume_without_a_checkpoint_names_it(tmp_path, paper_path):
    with pytest.raises(CheckpointError, match="--resume: no .*run/ckpt_last.pt to continue"):
        train(tmp_path / "run", paper_path, *TINY, "--resume")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, paper_path, monkeypatch):
    loss, calls = reward.NPBTL.loss, [0]

    def loss_turning_nan(self, batch):
        calls[0] += 1
        value, metrics = loss(self, batch)
        return (value * float("nan") if calls[0] == 7 else value), metrics

    monkeypatch.setattr(reward.NPBTL, "loss", loss_turning_nan)
    with pytest.raises(TrainingError, match="non-finite loss .* at step 7: stopped"):
        train(tmp_path / "run", paper_path, *TINY, "--eval.interval=3")
    last = load_checkpoint(str(tmp_path / "run" / "ckpt_last.pt"))
    assert last["step"] == 6 and all(torch.isfinite(v).all() for v in last["model"].values())


# -----------------------------------------------------------------------------
# data-parallel (torchrun)

@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, paper_path):
    args = [*TINY, f"--data.path={paper_path}"]
    train(tmp_path / "one", paper_path, *TINY)
    result = run_torchrun("train_reward.py", args, tmp_path / "two", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]  # also: the ranks' final weights agree exactly
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        a, b = (load_checkpoint(str(tmp_path / run / name)) for run in ("one", "two"))
        assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()  # no 'module.' prefix
        assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-5) for k in a["model"])
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")  # rank 0 alone logs
    assert [row["step"] for row in log_two] == [row["step"] for row in log_one] == [10, 20, 30]
    assert all(b[k] == pytest.approx(a[k], abs=1e-5) for a, b in zip(log_one, log_two) for k in a)


def test_global_batch_must_divide_among_processes():
    config, _ = load_config(train_reward.DEFAULTS, ["--train.batch_size=10"])
    train_reward.validate_config(config, world_size=2)
    with pytest.raises(ConfigError, match="config key 'train.batch_size': must be divisible by the number of "
                                          r"processes \(3\)"):
        train_reward.validate_config(config, world_size=3)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_ends_like_an_uninterrupted_run(tmp_path, paper_path):
    """SIGKILL gives no chance to save: the run resumes from the last interval checkpoint."""
    args = [*TINY, "--train.steps=1500", "--eval.interval=50", f"--data.path={paper_path}"]
    straight = train(tmp_path / "a", paper_path, *args)
    last = tmp_path / "b" / "ckpt_last.pt"
    process = subprocess.Popen([sys.executable, "train_reward.py", f"--out_dir={tmp_path / 'b'}", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    process.kill()
    process.wait()
    killed_at = load_checkpoint(str(last))["step"]
    assert 0 < killed_at < 1500, "the run was not interrupted; make it longer"
    assert train(tmp_path / "b", paper_path, *args, "--resume") == straight


# -----------------------------------------------------------------------------
# a run folder is never lost to an ordinary mistake; user errors write nothing


@pytest.fixture
def finished_run(tmp_path, paper_path):
    """A finished 20-step run in tmp_path/run and the hashes of its files."""
    train(tmp_path / "run", paper_path, *TINY, "--train.steps=20")
    return str(tmp_path / "run"), folder_hashes(tmp_path / "run")


@pytest.mark.parametrize("args, error, message", [
    ([], ConfigError, r"run already holds a run \(config.yaml, log.jsonl, ckpt_last.pt, ckpt_best.pt\): continue it "
                      "with --resume, or replace it with --overwrite"),
    (["--resume", "--overwrite"], ConfigError, "--resume continues the run in out_dir and --overwrite replaces it"),
    (["--resume", "--model.hidden=32"], ConfigError, r"--resume: .*run was trained with model.hidden = 16 \(given "
                                                     r"32\): these shape the model and cannot change on resume"),
    (["--resume", "--model.kind=btl"], ConfigError, r"model.kind = 'np_btl' \(given 'btl'\)"),
    (["--resume"], ConfigError, r"--resume: the run in .*run is at step 20 and train.steps = 20: raise train.steps"),
    (["--resume", "--train.steps=10"], ConfigError, "is at step 20 and train.steps = 10"),
    (["--resume", "--train.steps=40", "--seed=-1"], ConfigError, "config key 'seed'"),
    (["--device=gpu"], ConfigError, "unknown device 'gpu'"),
])
def test_mistakes_leave_a_finished_run_untouched(finished_run, paper_path, args, error, message):
    out_dir, before = finished_run
    with pytest.raises(error, match=message):
        train(out_dir, paper_path, *TINY, "--train.steps=20", *args)
    assert folder_hashes(out_dir) == before


def test_resume_with_data_of_another_dimension_names_the_file(finished_run, tmp_path):
    out_dir, before = finished_run
    other = str(tmp_path / "wide.npz")
    data.save_pairs(other, data.make_linear_synthetic(num_pairs=4000, dim=3))
    with pytest.raises(DataError, match=f"--resume: {other} has options of dimension 3, but the run in .* was "
                                        "trained on dimension 1"):
        train(out_dir, other, *TINY, "--train.steps=40", "--resume")
    assert folder_hashes(out_dir) == before


def test_overwrite_replaces_the_run(finished_run, paper_path):
    out_dir, before = finished_run
    train(out_dir, paper_path, *TINY, "--train.steps=10", "--overwrite")
    assert load_checkpoint(os.path.join(out_dir, "ckpt_last.pt"))["step"] == 10
    assert [row["step"] for row in read_log(out_dir)] == [10]  # the old log went with the old run


def test_resume_records_changed_keys_beside_their_original_values(finished_run, paper_path):
    out_dir, _ = finished_run
    train(out_dir, paper_path, *TINY, "--train.steps=30", "--train.lr=5e-4", "--resume")
    events = [row for row in read_log(out_dir) if row.get("event") == "resume"]
    assert events == [{"step": 20, "event": "resume", "changed": {"train.steps": [20, 30], "train.lr": [1e-3, 5e-4]}}]
    assert load_config(train_reward.DEFAULTS, [os.path.join(out_dir, "config.yaml")])[0]["train"]["steps"] == 30


def test_a_policy_config_or_run_folder_is_refused(finished_run, tmp_path):
    with pytest.raises(ConfigError, match=r"configs/steer_text.yaml is a config for train_policy.py \(stage: policy\)"):
        train_reward.main([os.path.join(REPO, "configs/steer_text.yaml"), f"--out_dir={tmp_path}/new"])
    os.makedirs(tmp_path / "policy_run")
    (tmp_path / "policy_run" / "config.yaml").write_text("stage: policy\n")
    before = folder_hashes(tmp_path / "policy_run")
    with pytest.raises(ConfigError, match="holds a policy run .*: train_reward.py will not write there"):
        train_reward.main([f"--out_dir={tmp_path}/policy_run", "--overwrite"])
    assert folder_hashes(tmp_path / "policy_run") == before and not os.path.exists(tmp_path / "new")


def test_an_empty_config_file_does_not_count_as_all_defaults(finished_run, tmp_path):
    out_dir, before = finished_run
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty.yaml holds no settings"):
        train_reward.main([str(tmp_path / "empty.yaml"), f"--out_dir={out_dir}"])
    assert folder_hashes(out_dir) == before


def run_script_file(args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "train_reward.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--seed=-1"], "config key 'seed': must lie in"),
    (["--device=cuda"] if not torch.cuda.is_available() else ["--device=tpu"], "config key 'device'"),
    (["--train.steps=1e3", "--data.path=typo.npz"], "data.path: typo.npz not found"),
    (["--out_dir=taken_by_a_file"], "taken_by_a_file is a file, not a folder"),
    (["--out_dir=taken_by_a_file/run"], "cannot create .*taken_by_a_file/run: .*taken_by_a_file is a file"),
    (["broken.yaml"], r"broken.yaml, line \d+: not valid YAML"),
    (["--resume"], "--resume: no runs/synthetic_np_btl/ckpt_last.pt to continue"),
])
@pytest.mark.slow
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    (tmp_path / "taken_by_a_file").write_text("x")
    (tmp_path / "broken.yaml").write_text("train:\n  steps: [1\n")
    before = folder_hashes(tmp_path)
    result = run_script_file(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert re.search(message, result.stderr) and "Traceback" not in result.stderr
    assert folder_hashes(tmp_path) == before


@pytest.mark.slow
def test_two_trainings_into_one_folder_the_second_is_refused(tmp_path, paper_path):
    args = [f"--data.path={paper_path}", "--out_dir=run", *TINY, "--train.steps=100000", "--eval.interval=50"]
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "train_reward.py"), *args], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not os.path.exists(tmp_path / "run" / "ckpt_last.pt") and time.time() < deadline:
            time.sleep(0.2)
        second = run_script_file([*args, "--overwrite"], tmp_path)
        assert second.returncode == 2
        assert re.match(fr"error: run is in use by process {first.pid} on .*: wait for it to finish", second.stderr)
    finally:
        first.send_signal(signal.SIGINT)  # saves and exits
        first.wait(timeout=60)
    assert load_config(train_reward.DEFAULTS, [str(tmp_path / "run" / "config.yaml")])[0]["train"]["steps"] == 100000


@pytest.mark.parametrize("override, key", [
    ("--model.encoder.latent_dim=-4", "model.encoder.latent_dim"), ("--model.hidden=0", "model.hidden"),
    ("--train.lr=.inf", "train.lr"), ("--model.encoder.layers=0", "model.encoder.layers")])
def test_sizes_and_rates_must_be_positive_and_finite(tmp_path, paper_path, override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}': must be a positive number"):
        train(tmp_path / "run", paper_path, *TINY, override)
    assert not os.path.exists(tmp_path / "run")


def test_labels_must_be_a_list(tmp_path, paper_path):
    with pytest.raises(ConfigError, match=r"config key 'data.labels': must be a list of labels, e.g. \[type0\]"):
        train(tmp_path / "run", paper_path, *TINY, "--data.labels=type0")


def test_a_run_that_stopped_before_its_first_checkpoint_says_to_overwrite(tmp_path, paper_path):
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("stage: reward\n")
    for extra in ([], ["--resume"]):
        with pytest.raises(ConfigError, match=r"stopped before its first checkpoint \(config.yaml\): there is "
                                              "nothing to resume; replace it with --overwrite"):
            train(tmp_path / "run", paper_path, *TINY, *extra)
    train(tmp_path / "run", paper_path, *TINY, "--train.steps=2", "--overwrite")


def test_resume_refuses_data_that_changed(finished_run, paper_path, tmp_path):
    out_dir, before = finished_run
    changed = str(tmp_path / "regenerated.npz")
    data.save_pairs(changed, data.make_paper_synthetic(num_pairs=4000, seed=7))  # same shape, other pairs
    with pytest.raises(DataError, match=f"--resume: {changed} has changed since the run in .* was trained on it"):
        train(out_dir, changed, *TINY, "--train.steps=40", "--resume")
    assert folder_hashes(out_dir) == before


def test_resume_from_another_folder_finds_the_data_and_never_generates(tmp_path, monkeypatch):
    train_reward.main(["--out_dir=run", *TINY, "--train.steps=10"])  # generates data/paper_synthetic.npz here
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    train_reward.main([f"--out_dir={tmp_path}/run", *TINY, "--train.steps=20", "--resume"])
    assert os.listdir(tmp_path / "elsewhere") == []  # no new dataset generated here
    assert load_checkpoint(f"{tmp_path}/run/ckpt_last.pt")["step"] == 20


def test_a_checkpoint_that_cannot_be_written_stops_with_one_line(tmp_path, paper_path, monkeypatch):
    def disk_full(obj, path):
        open(path, "w").close()
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(TrainingError, match=r"cannot write .*ckpt_best.pt \(No space left on device\); the "
                                            "previous one is unchanged"):
        train(tmp_path / "run", paper_path, *TINY)
    assert not [f for f in os.listdir(tmp_path / "run") if ".tmp" in f]


# -----------------------------------------------------------------------------
# the run decides its length: a plateau in val/loss starts the final cool-down


def test_a_plateau_starts_the_cooldown_and_the_run_ends_with_it():
    config = {"train": {"patience": 2, "steps": 1000, "cooldown": 0.25}, "eval": {"interval": 10}}
    assert train_reward.start_cooldown(30, {"step": 20, "decay_start": None}, config) is None  # 1 eval without gain
    assert train_reward.start_cooldown(40, {"step": 20, "decay_start": None}, config) == 40
    assert train_reward.start_cooldown(800, {"step": 800, "decay_start": None}, config) == 800  # 80% of the cap
    assert train_reward.last_step({"decay_start": 40}, config["train"]) == 50
    assert train_reward.last_step({"decay_start": 960}, config["train"]) == 1000  # never past the cap


def test_resume_during_the_cooldown_equals_uninterrupted_training(tmp_path, paper_path, monkeypatch):
    args = [*TINY, "--train.patience=100", "--eval.interval=5"]  # the cool-down starts at step 25 (80% of 30)
    straight = train(tmp_path / "straight", paper_path, *args)
    assert load_checkpoint(str(tmp_path / "straight" / "ckpt_last.pt"))["decay_start"] == 25
    signal_at_training_step(monkeypatch, 27, signal.SIGINT)
    with pytest.raises(SystemExit, match="stopped by a signal"):
        train(tmp_path / "resumed", paper_path, *args)
    monkeypatch.undo()
    assert train(tmp_path / "resumed", paper_path, *args, "--resume") == straight
    assert read_log(tmp_path / "resumed") == read_log(tmp_path / "straight")
    lrs = [row["lr"] for row in read_log(tmp_path / "straight")]
    assert lrs[:5] == [1e-3] * 5 and lrs[-1] < 0.5e-3  # flat, then the cool-down (cut short by the cap)
    best_row = min(read_log(tmp_path / "straight"), key=lambda row: row["val/loss"])
    assert load_checkpoint(str(tmp_path / "straight"))["step"] == best_row["step"]  # ckpt_best: lowest val/loss
