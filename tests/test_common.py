"""common.py: the config mechanism (files, dotted overrides, values as a person means them), seeding,
logging and signals."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from common import (REQUIRED, ConfigError, check, graceful_stop, load_config, log, pick_device, save_config,
                    seed_everything)
from conftest import REPO

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
# command-line values as a person means them, malformed YAML, seed and device


TEXT_DEFAULTS = {"prompt": "hello", "name": REQUIRED, "out_dir": "runs/x", "steps": 10, "labels": None, "seed": 0}


@pytest.mark.parametrize("text", ["what about: snow?", "yes", "42", "#1 tip", "2024-05-01", "[a, b]", "x: y"])
def test_text_keys_keep_the_command_line_verbatim(text):
    config, _ = load_config(TEXT_DEFAULTS, [f"--prompt={text}", f"--out_dir={text}", f"--name={text}"])
    assert config["prompt"] == config["out_dir"] == config["name"] == text


def test_a_date_in_a_yaml_file_is_text_for_a_text_key(tmp_path):
    (tmp_path / "c.yaml").write_text("out_dir: 2024-05-01\n")
    assert load_config(TEXT_DEFAULTS, ["--name=x", str(tmp_path / "c.yaml")])[0]["out_dir"] == "2024-05-01"


@pytest.mark.parametrize("text, value", [("1e3", 1000), ("1000.0", 1000), ("2.5e2", 250), ("7", 7)])
def test_whole_numbers_are_accepted_for_integer_keys(text, value):
    config, _ = load_config(TEXT_DEFAULTS, ["--name=x", f"--steps={text}"])
    assert config["steps"] == value and isinstance(config["steps"], int)


@pytest.mark.parametrize("text", ["1.5", "1e-3", "inf", "ten"])
def test_non_whole_numbers_are_refused_for_integer_keys(text):
    with pytest.raises(ConfigError, match="config key 'steps': expected int"):
        load_config(TEXT_DEFAULTS, ["--name=x", f"--steps={text}"])


def test_null_default_still_reads_lists_and_null():
    assert load_config(TEXT_DEFAULTS, ["--name=x", "--labels=[a, b]"])[0]["labels"] == ["a", "b"]
    assert load_config(TEXT_DEFAULTS, ["--name=x", "--labels=null"])[0]["labels"] is None
    assert load_config(TEXT_DEFAULTS, ["--name=x", "--labels=2024-05-01"])[0]["labels"] == "2024-05-01"


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range_is_refused(seed):
    with pytest.raises(ConfigError, match=r"config key 'seed': must lie in \[0, 2\*\*32 - 1\]"):
        load_config(TEXT_DEFAULTS, ["--name=x", f"--seed={seed}"])


@pytest.mark.parametrize("text, message", [
    ("train:\n  steps: [1, 2\n", r"c.yaml, line \d+: not valid YAML"),
    ("train:\n\tsteps: 3\n", r"c.yaml, line 2: not valid YAML: .*\(indent with spaces: YAML does not allow tabs\)"),
    ("# only a comment\n", r"c.yaml holds no settings: an empty config is not taken as 'all defaults'"),
    ("", r"c.yaml holds no settings"),
    ("\xff\xfe", r"c.yaml"),
])
def test_malformed_yaml_gives_one_line_with_its_place(tmp_path, text, message):
    (tmp_path / "c.yaml").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=message) as error:
        load_config(TEXT_DEFAULTS, ["--name=x", str(tmp_path / "c.yaml")])
    assert "\n" not in str(error.value)


def test_a_config_path_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "c.yaml").mkdir()
    with pytest.raises(ConfigError, match="c.yaml is a folder, not a config file"):
        load_config(TEXT_DEFAULTS, ["--name=x", str(tmp_path / "c.yaml")])


@pytest.mark.parametrize("name, message", [
    ("gpu", "unknown device 'gpu'"), ("cuda:x", "unknown device 'cuda:x'"), ("", "unknown device ''"),
    pytest.param("cuda", "'cuda' is not available here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_devices_that_do_not_exist_or_are_not_here_are_refused(name, message):
    with pytest.raises(ConfigError, match=f"config key 'device': {message}"):
        pick_device(name)


def test_a_stage_names_the_trainer_a_config_is_for(tmp_path):
    defaults = {"stage": "reward", "out_dir": "x"}
    (tmp_path / "policy.yaml").write_text("stage: policy\n")
    with pytest.raises(ConfigError, match=r"policy.yaml is a config for train_policy.py \(stage: policy\), "
                                          "not for train_reward.py"):
        load_config(defaults, [str(tmp_path / "policy.yaml")])
    with pytest.raises(ConfigError, match="--stage is a config for train_policy.py"):
        load_config(defaults, ["--stage=policy"])


def test_two_config_files_are_refused(tmp_path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="give one config file, not 2 .*put what differs into --key=value"):
        load_config(TEXT_DEFAULTS, ["--name=x", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])


@pytest.mark.parametrize("arg, guess", [("--stpes=3", "steps"), ("--train.step=3", None)])
def test_a_misspelt_key_gets_a_suggestion(arg, guess):
    with pytest.raises(ConfigError, match=f"unknown config key '{arg[2:-2]}' \\(did you mean '{guess or 'train.steps'}'"):
        load_config(dict(TEXT_DEFAULTS, train={"steps": 1}), ["--name=x", arg])


def test_a_home_folder_on_the_command_line_is_expanded():
    config, _ = load_config(TEXT_DEFAULTS, ["--name=x", "--out_dir=~/runs/x"])
    assert config["out_dir"] == os.path.expanduser("~/runs/x") and "~" not in config["out_dir"]


def test_config_flag_gets_a_hint():
    with pytest.raises(ConfigError, match="give the config file as a plain argument"):
        load_config(TEXT_DEFAULTS, ["--name=x", "--config=x.yaml"])


def test_a_list_split_by_the_shell_gets_a_hint():
    with pytest.raises(ConfigError, match="the shell split the list at a space"):
        load_config(dict(TEXT_DEFAULTS, sizes=[0]), ["--name=x", "--sizes=[0,", "1]"])


def test_a_list_without_brackets_gets_a_hint():
    with pytest.raises(ConfigError, match=r"a list is written in brackets: \[5,10\]"):
        load_config(dict(TEXT_DEFAULTS, sizes=[0]), ["--name=x", "--sizes=5,10"])


@pytest.mark.slow
@pytest.mark.parametrize("script, first_words", [("train_reward.py", "Train a reward model"),
                                                 ("train_policy.py", "Train a steerable policy"),
                                                 ("evaluate.py", "Accuracy on a user's unseen pairs"),
                                                 ("bench.py", "Speed and memory figures")])
def test_help_prints_the_scripts_docstring_and_exits_0(tmp_path, script, first_words):
    result = subprocess.run([sys.executable, os.path.join(REPO, script), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(first_words) and result.stderr == ""
    assert os.listdir(tmp_path) == []


def test_space_separated_value_is_read_for_a_non_bool_key():
    config, rest = load_config(DEFAULTS, ["--train.lr", "0.5", "--resume", "run_dir"])
    assert config["train"]["lr"] == 0.5 and config["resume"] is True and rest == ["run_dir"]
