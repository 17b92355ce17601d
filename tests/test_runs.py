"""runs.py: atomic checkpoints, and run folders never lost to a rerun, a wrong config or two jobs at once."""

import os
import subprocess
import sys

import pytest
import torch

from common import CheckpointError, ConfigError, TrainingError, check_finite, lr_at, pick_device, run_script
from runs import check_resume, check_run_folder, claimed_run_folder, load_checkpoint, resolve_path, save_checkpoint

# -----------------------------------------------------------------------------
# checkpoints


def checkpoint():
    return {"model": {"w": torch.arange(6.0).view(2, 3)}, "config": {"seed": 0}, "step": 4, "best_val_loss": 0.5}


def test_checkpoint_round_trip_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "sub" / "ckpt.pt")
    save_checkpoint(path, checkpoint())
    save_checkpoint(path, checkpoint())  # overwriting is fine too
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], checkpoint()["model"]["w"])
    assert loaded["step"] == 4 and loaded["config"] == {"seed": 0}


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, checkpoint())
    with pytest.raises(Exception):
        save_checkpoint(path, dict(checkpoint(), step=lambda: 0))  # a lambda cannot be pickled
    assert load_checkpoint(path)["step"] == 4


def test_load_checkpoint_from_a_run_dir(tmp_path):
    save_checkpoint(str(tmp_path / "ckpt_best.pt"), checkpoint())
    assert load_checkpoint(str(tmp_path))["step"] == 4


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*ckpt_best.pt"):
        load_checkpoint(str(tmp_path))


def test_truncated_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, checkpoint())
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(RuntimeError, match=f"{path}: not a readable checkpoint"):
        load_checkpoint(path)


def test_a_text_file_given_as_a_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("stage: reward\n")
    with pytest.raises(RuntimeError, match="config.yaml: not a readable checkpoint .not a file torch.save wrote: give "
                                           "a run folder or its ckpt_best.pt.$"):
        load_checkpoint(str(path))


def test_foreign_dict_is_refused(tmp_path):
    path = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(RuntimeError, match=f"{path}: not a checkpoint of this codebase"):
        load_checkpoint(path)


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused_and_does_not_run(tmp_path):
    marker, path = tmp_path / "pwned", str(tmp_path / "evil.pt")
    torch.save({"model": Payload(marker), "config": {}, "step": 0}, path)
    with pytest.raises(RuntimeError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_rng_states_restore_each_rank_and_read_older_checkpoints(capsys):
    from dist import restore_rng_states, rng_states

    torch.manual_seed(1)
    states = rng_states()  # without torchrun: [this process's state]
    expected = torch.rand(3)
    for saved in (states, states[0]):  # this format, and an older checkpoint's single state
        torch.manual_seed(2)
        restore_rng_states(saved, rank=0, world_size=1)
        assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(2)
    restore_rng_states(states * 2, rank=0, world_size=1)  # written by 2 processes, resumed by 1
    assert torch.equal(torch.rand(3), expected)
    assert "holds 2 processes' random states, this run has 1" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# run folders


RUN = {"out_dir": "run", "resume": False, "overwrite": False}


def claim(out_dir, **settings):
    return claimed_run_folder(dict(RUN, out_dir=str(out_dir), **settings), "reward")


def test_a_claimed_folder_holds_a_lock_that_another_claim_is_refused(tmp_path):
    with claim(tmp_path / "run"):
        assert os.path.exists(tmp_path / "run" / ".lock")
        with pytest.raises(ConfigError, match=fr"run is in use by process {os.getpid()} on .*: wait for it"):
            check_run_folder(dict(RUN, out_dir=str(tmp_path / "run")), "reward")
        with pytest.raises(ConfigError, match="in use by process"):
            with claim(tmp_path / "run"):
                pass
    assert not os.path.exists(tmp_path / "run")  # nothing was written inside: the folder goes again


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    with claim(tmp_path / "run"):
        (tmp_path / "run" / "ckpt_last.pt").write_text("x")
    with pytest.raises(ConfigError, match="run already holds a run \\(ckpt_last.pt\\): continue it with --resume, "
                                          "or replace it with --overwrite"):
        check_run_folder(dict(RUN, out_dir=str(tmp_path / "run")), "reward")
    check_run_folder(dict(RUN, out_dir=str(tmp_path / "run"), resume=True), "reward")
    with claim(tmp_path / "run", overwrite=True):
        assert os.listdir(tmp_path / "run") == [".lock"]  # the old run's files are gone


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume continues the run in out_dir and --overwrite replaces it"):
        check_run_folder(dict(RUN, out_dir=str(tmp_path), resume=True, overwrite=True), "reward")


def test_a_run_of_the_other_stage_is_refused_even_with_overwrite(tmp_path):
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("stage: policy\nout_dir: run\n")
    with pytest.raises(ConfigError, match=r"holds a policy run \(made by train_policy.py\): train_reward.py will not"):
        check_run_folder(dict(RUN, out_dir=str(tmp_path / "run"), overwrite=True), "reward")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "run is a file, not a folder"),
    (lambda p: (p.parent / "file").write_text("x"), "cannot create .*: .*file is a file"),
])
def test_an_out_dir_that_cannot_be_a_folder_is_refused(tmp_path, make, message):
    out_dir = tmp_path / "run"
    make(out_dir)
    target = out_dir if out_dir.exists() else tmp_path / "file" / "run"
    with pytest.raises(ConfigError, match=message):
        check_run_folder(dict(RUN, out_dir=str(target)), "reward")


@pytest.mark.slow
def test_a_stale_lock_from_a_killed_process_is_taken_over(tmp_path, capsys):
    os.makedirs(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write('process 99999 on elsewhere'); f.flush(); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path / "run" / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match="in use by process 99999 on elsewhere"):
        check_run_folder(dict(RUN, out_dir=str(tmp_path / "run")), "reward")
    holder.kill()
    holder.wait()
    with claim(tmp_path / "run"):  # the OS dropped the dead process's lock
        pass
    assert "was left by process 99999 on elsewhere, which no longer runs (a crash?)" in capsys.readouterr().out


def test_resume_refuses_keys_that_shape_the_model_and_reports_the_others():
    saved = {"out_dir": "r", "model": {"hidden": 64, "kind": "np_btl"}, "train": {"steps": 100, "lr": 0.1}}
    new = {"out_dir": "r", "model": {"hidden": 32, "kind": "btl"}, "train": {"steps": 200, "lr": 0.1}}
    with pytest.raises(ConfigError, match=r"--resume: r was trained with model.hidden = 64 \(given 32\); "
                                          r"model.kind = 'np_btl' \(given 'btl'\): these shape the model"):
        check_resume(saved, new, ("model.",))
    assert check_resume(saved, dict(new, model=saved["model"]), ("model.",)) == {"train.steps": [100, 200]}


def test_resolve_path_tries_the_folder_the_run_was_trained_in(tmp_path):
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "x.npz").write_text("x")
    trained_in = {"cwd": str(tmp_path / "repo")}
    assert resolve_path("data/x.npz", trained_in) == str(tmp_path / "repo" / "data" / "x.npz")
    assert resolve_path("data/y.npz", trained_in) == "data/y.npz"  # not there either: as given
    assert resolve_path("Qwen/Qwen2-0.5B", {}) == "Qwen/Qwen2-0.5B"


def test_run_script_turns_user_errors_into_one_line_and_exit_2(capsys, monkeypatch):
    def main(argv):
        raise ConfigError("config key 'x': bad")
    monkeypatch.setattr(sys, "argv", ["script.py"])
    with pytest.raises(SystemExit) as exit_info:
        run_script(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: config key 'x': bad\n"
    def interrupted(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_info:
        run_script(interrupted)
    assert exit_info.value.code == 130 and "Traceback" not in capsys.readouterr().err


def test_device_names_are_case_insensitive():
    assert pick_device("CPU") == torch.device("cpu")


def test_a_non_finite_loss_names_the_checkpoint_only_if_there_is_one(tmp_path):
    with pytest.raises(TrainingError, match="at step 3: stopped before the update; no checkpoint was saved yet"):
        check_finite(torch.tensor(float("nan")), 3, str(tmp_path))
    (tmp_path / "ckpt_last.pt").write_text("x")
    with pytest.raises(TrainingError, match="ckpt_last.pt holds the last good checkpoint"):
        check_finite(torch.tensor(float("inf")), 3, str(tmp_path))


def test_lr_with_patience_is_flat_until_the_plateau_then_a_cosine_cooldown():
    t = {"lr": 1.0, "min_lr": 0.0, "warmup_steps": 10, "steps": 10000, "patience": 3, "cooldown": 0.25}
    assert lr_at(4, t) == pytest.approx(0.5) and lr_at(5000, t) == 1.0  # warmup, then flat: no decay yet
    assert lr_at(400, t, decay_start=400) == 1.0
    assert lr_at(450, t, decay_start=400) == pytest.approx(0.5)  # halfway through 100 cool-down steps
    assert lr_at(500, t, decay_start=400) == pytest.approx(0.0)
