import json
import os
import signal

import pytest
import torch

from common import (REQUIRED, CheckpointError, ConfigError, check, graceful_stop, load_checkpoint, load_config, log, save_checkpoint,
                    save_config, seed_everything)

DEFAULTS = {
    "name": "run",
    "resume": False,
    "out": None,
    "train": {"lr": 1e-3, "steps": 100, "sizes": [0, 1]},
    "model": {"encoder": {"aggregator": "mean"}},
}


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


# -----------------------------------------------------------------------------
# config


def test_dotted_overrides_are_applied_and_parsed_as_literals():
    config, rest = load_config(DEFAULTS, ["--train.steps=7", "--train.sizes=[2,3]", "--model.encoder.aggregator=sum"])
    assert config["train"] == {"lr": 1e-3, "steps": 7, "sizes": [2, 3]}
    assert config["model"]["encoder"]["aggregator"] == "sum"
    assert rest == []
    assert DEFAULTS["train"]["steps"] == 100  # the defaults are not mutated


def test_yaml_file_is_applied_then_overrides_win(tmp_path):
    path = write(tmp_path / "c.yaml", "name: from_yaml\ntrain:\n  steps: 5\n  lr: 0.5\n")
    config, rest = load_config(DEFAULTS, [path, "extra", "--train.steps=9"])
    assert config["name"] == "from_yaml"
    assert config["train"]["lr"] == 0.5
    assert config["train"]["steps"] == 9
    assert rest == ["extra"]


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        load_config(DEFAULTS, ["--train.nope=1"])


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  encoder:\n    width: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.encoder.width'"):
        load_config(DEFAULTS, [path])


def test_key_below_a_leaf_is_unknown():
    with pytest.raises(ConfigError, match="unknown config key 'train.lr.x'"):
        load_config(DEFAULTS, ["--train.lr.x=1"])


@pytest.mark.parametrize("arg, key", [("--train.steps=abc", "train.steps"), ("--train.steps=1.5", "train.steps"),
                                      ("--train.lr=fast", "train.lr"), ("--resume=1", "resume"),
                                      ("--train.sizes=3", "train.sizes")])
def test_wrong_type_names_the_key(arg, key):
    with pytest.raises(ConfigError, match=f"config key '{key}': expected"):
        load_config(DEFAULTS, [arg])


def test_scalar_for_a_section_names_the_key():
    with pytest.raises(ConfigError, match="config key 'train': expected a mapping"):
        load_config(DEFAULTS, ["--train=5"])


def test_int_is_accepted_for_float():
    config, _ = load_config(DEFAULTS, ["--train.lr=1"])
    assert config["train"]["lr"] == 1.0 and isinstance(config["train"]["lr"], float)


def test_scientific_notation_is_a_float():
    config, _ = load_config(DEFAULTS, ["--train.lr=3e-4"])
    assert config["train"]["lr"] == 3e-4


def test_bare_flag_sets_a_bool():
    config, _ = load_config(DEFAULTS, ["--resume"])
    assert config["resume"] is True


def test_bare_flag_on_a_non_bool_key_asks_for_a_value():
    with pytest.raises(ConfigError, match=r"--train.steps needs a value: --train.steps=\.\.\."):
        load_config(DEFAULTS, ["--train.steps"])


def test_none_default_accepts_any_value():
    config, _ = load_config(DEFAULTS, ["--out=somewhere"])
    assert config["out"] == "somewhere"


def test_required_value_missing_names_the_key():
    defaults = {"data": {"out": REQUIRED}, "seed": 0}
    with pytest.raises(ConfigError, match="config key 'data.out': a value is required"):
        load_config(defaults, ["--seed=1"])
    config, _ = load_config(defaults, ["--data.out=x.npz"])
    assert config["data"]["out"] == "x.npz"


def test_aliases_and_hyphens():
    config, _ = load_config(DEFAULTS, ["--sizes=[4]"], aliases={"sizes": "train.sizes"})
    assert config["train"]["sizes"] == [4]
    assert load_config({"max_sem": 0.1}, ["--max-sem=0.5"])[0]["max_sem"] == 0.5


def test_missing_yaml_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(DEFAULTS, [str(tmp_path / "nope.yaml")])


def test_yaml_file_that_is_not_a_mapping_is_an_error(tmp_path):
    path = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top level"):
        load_config(DEFAULTS, [path])


def test_check_names_the_key():
    check(True, "train.lr", "must be positive")
    with pytest.raises(ConfigError, match="config key 'train.lr': must be positive"):
        check(False, "train.lr", "must be positive")


def test_save_config_round_trips(tmp_path):
    config, _ = load_config(DEFAULTS, ["--train.steps=3"])
    os.makedirs(tmp_path / "run")
    save_config(config, str(tmp_path / "run"))
    assert load_config(DEFAULTS, [str(tmp_path / "run" / "config.yaml")])[0] == config


# -----------------------------------------------------------------------------
# seed, logging, signals


def test_seed_everything_is_reproducible():
    seed_everything(3)
    a = torch.rand(5)
    seed_everything(3)
    assert torch.equal(a, torch.rand(5))


def test_log_prints_and_appends_jsonl(tmp_path, capsys):
    log({"step": 1, "loss": 0.123456}, str(tmp_path))
    log({"step": 2, "loss": 0.5})
    log({"step": 3, "loss": 0.25}, str(tmp_path))
    assert "step 1 | loss 0.1235" in capsys.readouterr().out
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 0.123456}, {"step": 3, "loss": 0.25}]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_graceful_stop_records_the_signal_and_restores_handlers(sig):
    before = signal.getsignal(sig)
    with graceful_stop() as stop:
        assert stop["signal"] is None
        os.kill(os.getpid(), sig)
        assert stop["signal"] == sig  # the process is still alive
    assert signal.getsignal(sig) is before


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


def test_space_separated_value_is_read_for_a_non_bool_key():
    config, rest = load_config(DEFAULTS, ["--train.lr", "0.5", "--resume", "run_dir"])
    assert config["train"]["lr"] == 0.5 and config["resume"] is True and rest == ["run_dir"]


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
