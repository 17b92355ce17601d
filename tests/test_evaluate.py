import json
import os
import shutil

import pytest

import evaluate
from common import ConfigError
from conftest import TINY, train
from data import load_pairs

MAX_SEM, MAX_EPISODES = 0.01, 1000
FAST = ["--chunk=200", f"--max_episodes={MAX_EPISODES}", "--num_targets=20", f"--max-sem={MAX_SEM}"]
KEYS = {"model", "num_context", "label", "accuracy", "sem", "episodes"}


@pytest.fixture(scope="module")
def evaluation(np_btl_run, btl_run, tmp_path_factory):
    """(rows, out dir) of NP-BTL and BTL side by side, via the --num-context alias."""
    out = str(tmp_path_factory.mktemp("eval"))
    rows = evaluate.main([np_btl_run[0], btl_run[0], *FAST, "--num-context=[10,0,1]", f"--out={out}"])
    return rows, out


def accuracy(rows, model, n, label="all"):
    return next(r["accuracy"] for r in rows if (r["model"], r["num_context"], r["label"]) == (model, n, label))


def test_eval_json_rows(evaluation, np_btl_run, btl_run):
    rows, out = evaluation
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f) == rows
    assert all(row.keys() == KEYS for row in rows)
    names = [os.path.basename(run[0]) for run in (np_btl_run, btl_run)]
    assert {r["model"] for r in rows} == {*names, evaluate.BAYES}
    assert {r["label"] for r in rows} == {"type0", "type1", "all"}
    assert sorted({r["num_context"] for r in rows}) == [0, 1, 10]  # --num-context sets num_context
    assert len(rows) == 3 * 3 * 3  # models x labels x context sizes


def test_sem_is_within_max_sem_unless_max_episodes_is_reached(evaluation):
    rows, _ = evaluation
    stopped_early = 0
    for n in (0, 1, 10):
        at_n = [r for r in rows if r["num_context"] == n]
        total = next(r["episodes"] for r in at_n if r["label"] == "all")
        assert all(r["episodes"] in (total, total // 2) for r in at_n)  # two labels, balanced
        if total < MAX_EPISODES:
            stopped_early += 1
            assert all(r["sem"] <= MAX_SEM for r in at_n)
    assert stopped_early > 0
    table = evaluate.markdown(rows, [0, 1, 10], MAX_SEM)
    assert table.count("(!)") == sum(r["sem"] > MAX_SEM for r in rows)


def test_bayes_optimal_rows_on_the_paper_task(evaluation, paper_path):
    rows, _ = evaluation
    data = load_pairs(paper_path)
    test_choices = data.choices[data.split == "test"]
    conflicting = (test_choices[:, 0] != test_choices[:, 1]).float().mean().item()
    # with no context the posterior stays uniform: right where the types agree, half right where they conflict
    assert accuracy(rows, evaluate.BAYES, 0) == pytest.approx(1 - conflicting / 2, abs=0.015)
    assert accuracy(rows, evaluate.BAYES, 10) > 0.99


def test_np_btl_uses_the_context_and_btl_cannot(evaluation, np_btl_run, btl_run):
    rows, _ = evaluation
    np_name, btl_name = os.path.basename(np_btl_run[0]), os.path.basename(btl_run[0])
    assert accuracy(rows, np_name, 10) > accuracy(rows, np_name, 0) + 0.15
    assert accuracy(rows, np_name, 10) > accuracy(rows, btl_name, 10) + 0.15
    assert accuracy(rows, np_name, 10) > accuracy(rows, evaluate.BAYES, 10) - 0.03


def test_default_out_is_the_run_dir_and_the_table_is_printed(tmp_path, np_btl_run, capsys):
    run = shutil.copytree(np_btl_run[0], tmp_path / "np_btl")
    evaluate.main([str(run / "ckpt_last.pt"), *FAST, "--num-context=[0,3]"])
    printed = capsys.readouterr().out
    assert "| model | label | n=0 | n=3 |" in printed and "| np_btl | all |" in printed
    assert "Gap to Bayes-optimal" in printed
    assert (run / "eval.json").exists()


def test_max_label_rows_keeps_only_the_overall_row(tmp_path, np_btl_run):
    rows = evaluate.main([np_btl_run[0], *FAST, "--num-context=[0]", "--max_label_rows=1", f"--out={tmp_path}"])
    assert {r["label"] for r in rows} == {"all"}


def test_plot_writes_pngs(tmp_path, np_btl_run):
    pytest.importorskip("matplotlib")
    evaluate.main([np_btl_run[0], *FAST, "--num-context=[0,10]", "--plot", f"--out={tmp_path}"])
    for name in ("accuracy.png", "reward_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, key", [([], "run"), (["--split=dev"], "split"), (["--num-context=[]"], "num_context"),
                                       (["--num_context=[0,-1]"], "num_context"), (["--max_sem=0"], "max_sem")])
def test_bad_arguments_name_the_key(np_btl_run, args, key):
    runs = [np_btl_run[0]] if key != "run" else []
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        evaluate.main([*runs, *args])


def test_models_on_different_data_are_refused(tmp_path, np_btl_run):
    train(tmp_path / "other", tmp_path / "other.npz", *TINY, "--train.steps=2", "--data.generate")
    with pytest.raises(ConfigError, match="trained on different data files"):
        evaluate.main([np_btl_run[0], str(tmp_path / "other")])


def test_zero_chunk_is_refused(np_btl_run):
    with pytest.raises(ConfigError, match="config key 'chunk'"):
        evaluate.main([np_btl_run[0], "--chunk=0", "--num-context=[0]"])
