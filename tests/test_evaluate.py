import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
import policy_eval
import report
from common import CheckpointError, ConfigError, run_script
from conftest import REPO, TINY, folder_hashes, train
from data import DataError, load_pairs, make_linear_synthetic, save_pairs
from runs import load_checkpoint, save_checkpoint

MAX_SEM, EPISODES = 0.01, 600
FAST = ["--chunk=200", f"--episodes={EPISODES}", "--num_targets=20", f"--max-sem={MAX_SEM}"]
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
    for row in rows:
        extra = {"mc_error"} if row["model"] == evaluate.BAYES else {"gap_to_bayes", "gap_sem"} if row["label"] == "all" else set()
        assert row.keys() == KEYS | extra
    names = [os.path.basename(run[0]) for run in (np_btl_run, btl_run)]
    assert {r["model"] for r in rows} == {*names, evaluate.BAYES}
    assert {r["label"] for r in rows} == {"type0", "type1", "all"}
    assert sorted({r["num_context"] for r in rows}) == [0, 1, 10]  # --num-context sets num_context
    assert len(rows) == 3 * 3 * 3  # models x labels x context sizes


def test_the_episode_count_is_fixed_in_advance(evaluation):
    """No optional stopping: every n gets exactly --episodes episodes, however the SEM looks."""
    rows, _ = evaluation
    for r in rows:
        assert r["episodes"] == (EPISODES if r["label"] == "all" else EPISODES // 2)  # two labels, balanced
        assert r.get("mc_error", 0.0) == 0.0  # the paper task's reference is exact
    table = report.markdown(rows, [0, 1, 10], MAX_SEM)
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
                                       (["--num_context=[0,-1]"], "num_context"), (["--max_sem=0"], "max_sem"),
                                       (["--particles=-1"], "particles"),
                                       (["--particle_latents=0"], "particle_latents")])
def test_bad_arguments_name_the_key(np_btl_run, args, key):
    runs = [np_btl_run[0]] if key != "run" else []
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        evaluate.main([*runs, *args])


def test_particles_add_a_row_for_each_np_btl_only(np_btl_run, btl_run, tmp_path, capsys):
    """--particles: the NP-BTL also scored by the predictive under the training users' latents, on the
    same episodes; a BTL (no encoder) gets no such row. On the paper's two types it stays near Bayes."""
    rows = evaluate.main([np_btl_run[0], btl_run[0], *FAST, "--num-context=[0,3]", "--particles=256",
                          f"--out={tmp_path}"])
    assert f"note: {os.path.basename(btl_run[0])} reads no context: no particles row" in capsys.readouterr().out
    names = {r["model"] for r in rows}
    np_name, btl_name = (os.path.basename(run[0]) for run in (np_btl_run, btl_run))
    assert f"{np_name} (particles)" in names and f"{btl_name} (particles)" not in names
    for n in (0, 3):
        assert accuracy(rows, f"{np_name} (particles)", n) > accuracy(rows, "bayes_optimal", n) - 0.05


def test_models_on_different_data_are_refused(tmp_path, np_btl_run):
    train(tmp_path / "other", tmp_path / "other.npz", *TINY, "--train.steps=2", "--data.generate")
    with pytest.raises(ConfigError, match="trained on different data files"):
        evaluate.main([np_btl_run[0], str(tmp_path / "other")])


def test_zero_chunk_is_refused(np_btl_run):
    with pytest.raises(ConfigError, match="config key 'chunk'"):
        evaluate.main([np_btl_run[0], "--chunk=0", "--num-context=[0]"])


# -----------------------------------------------------------------------------
# every user error: one line, exit 2, refused before any work, nothing written


@pytest.fixture
def run_copy(tmp_path, np_btl_run):
    """A copy of the NP-BTL run (its folder is the default --out) and the hashes of its files."""
    run = str(shutil.copytree(np_btl_run[0], tmp_path / "np_btl"))
    return run, folder_hashes(run)


@pytest.fixture
def no_work(monkeypatch):
    """Any evaluation would fail differently: a refusal must come before it."""
    def work_started(*args, **kwargs):
        raise AssertionError("evaluation started")
    monkeypatch.setattr(evaluate, "load_models", work_started)
    monkeypatch.setattr(policy_eval, "load_policies", work_started)


def evaluate_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def assert_one_error_line(result, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def tiny_run(folder, data_path, *overrides):
    train(folder, data_path, *TINY, "--train.steps=2", *overrides)
    return str(folder)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_unavailable_device_is_one_line_and_writes_nothing(run_copy):
    run, hashes = run_copy
    result = evaluate_cli(run, "--device=cuda", "--plot")
    assert_one_error_line(result, "config key 'device': 'cuda' is not available here")
    assert folder_hashes(run) == hashes


@pytest.mark.slow
def test_cli_run_dir_without_ckpt_best_is_one_line_and_writes_nothing(run_copy):
    run, _ = run_copy
    os.remove(os.path.join(run, "ckpt_best.pt"))
    hashes = folder_hashes(run)
    result = evaluate_cli(run, cwd=os.path.dirname(run))
    assert_one_error_line(result, f"{run} holds no ckpt_best.pt (evaluate {run}/ckpt_last.pt instead?)")
    assert folder_hashes(run) == hashes


@pytest.mark.parametrize("device, message", [("gpu", "unknown device 'gpu'"), ("cuda:0", "is not available here")])
def test_bad_device_is_refused_before_the_checkpoints_are_read(run_copy, no_work, monkeypatch, device, message):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.setattr(policy_eval, "load_checkpoint", None)  # reading a checkpoint would fail differently
    with pytest.raises(ConfigError, match=f"config key 'device': .*{message}"):
        evaluate.main([run_copy[0], f"--device={device}"])


def test_plot_without_matplotlib_is_refused_before_any_work(run_copy, no_work, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails as if not installed
    with pytest.raises(ConfigError, match=r"config key 'plot': --plot needs matplotlib, which is not installed"):
        evaluate.main([run_copy[0], "--plot"])
    assert folder_hashes(run_copy[0]) == run_copy[1]  # no eval.json either


@pytest.mark.parametrize("name, message", [("nowhere", "nowhere: no such run dir or checkpoint file"),
                                           ("nowhere/ckpt_last.pt", "ckpt_last.pt: no such run dir or checkpoint file"),
                                           ("empty", "empty holds no ckpt_best.pt (not a run dir?)")])
def test_missing_runs_are_refused(tmp_path, no_work, name, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(message)):
        evaluate.main([str(tmp_path / name)])


def test_unreadable_checkpoint_is_refused(tmp_path, no_work):
    (tmp_path / "ckpt_best.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="ckpt_best.pt: not a readable checkpoint"):
        evaluate.main([str(tmp_path)])


@pytest.mark.parametrize("out, message", [("np_btl/config.yaml", "np_btl/config.yaml is a file, not a folder"),
                                          ("np_btl/config.yaml/eval", "cannot create .*config.yaml is a file")])
def test_bad_out_is_refused_before_any_work(run_copy, no_work, out, message):
    run, hashes = run_copy
    with pytest.raises(ConfigError, match=f"config key 'out': .*{message}"):
        evaluate.main([run, f"--out={os.path.join(os.path.dirname(run), out)}"])
    assert folder_hashes(run) == hashes


def test_an_explicit_out_holding_results_is_refused_unless_overwrite(run_copy, no_work, tmp_path):
    """An --out folder (say experiments/X) holding an earlier evaluation's results is not replaced
    by a rerun: one line, nothing written; --overwrite replaces them. The run's own folder is."""
    run, _ = run_copy
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "queries.json").write_text("earlier results")
    hashes = folder_hashes(str(tmp_path / "kept"))
    with pytest.raises(ConfigError, match=r"config key 'out': .*queries.json holds another evaluation's results"):
        evaluate.main([run, "--queries=random", f"--out={tmp_path / 'kept'}"])
    assert folder_hashes(str(tmp_path / "kept")) == hashes


def test_overwrite_replaces_an_explicit_outs_results(np_btl_run, tmp_path):
    (tmp_path / "eval.json").write_text("earlier results")
    rows = evaluate.main([np_btl_run[0], *FAST, "--num-context=[0]", f"--out={tmp_path}", "--overwrite"])
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(rows))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_without_permission_is_refused(run_copy, no_work, tmp_path):
    os.chmod(tmp_path / "np_btl", 0o500)
    try:
        with pytest.raises(ConfigError, match="config key 'out': cannot write to .*no permission"):
            evaluate.main([run_copy[0]])
    finally:
        os.chmod(tmp_path / "np_btl", 0o700)


def test_reward_and_policy_runs_together_are_refused(run_copy, tmp_path, no_work):
    save_checkpoint(str(tmp_path / "policy" / "ckpt_best.pt"), {"model": {}, "config": {}, "step": 0,
                                                                 "policy_config": {}})
    with pytest.raises(ConfigError, match="config key 'run': give reward runs or policy runs, not both"):
        evaluate.main([run_copy[0], str(tmp_path / "policy")])


# -----------------------------------------------------------------------------
# the run's data file, from another folder; data that no longer fits the run


@pytest.fixture
def relative_run(tmp_path, paper_path):
    """A tiny run trained here on the relative data path pairs.npz."""
    shutil.copy(paper_path, tmp_path / "pairs.npz")
    return tiny_run(tmp_path / "run", "pairs.npz")


def test_a_relative_data_path_is_found_from_another_folder(relative_run, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rows = evaluate.main([relative_run, *FAST, "--num-context=[0]"])
    assert {r["model"] for r in rows} == {"run", evaluate.BAYES}


def test_a_missing_data_file_names_both_places_tried(relative_run, tmp_path, monkeypatch):
    os.remove(tmp_path / "pairs.npz")
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(DataError, match=f"pairs.npz: the data file of {relative_run} is not found "
                                        f"\\(from here or from {tmp_path}, where the run was trained\\)"):
        evaluate.main([relative_run, *FAST])


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_data_of_another_dimension_names_the_file_and_both_dimensions(relative_run, tmp_path, old_checkpoint):
    save_pairs(str(tmp_path / "pairs.npz"), make_linear_synthetic(num_pairs=300, dim=3))
    message = "pairs.npz has options of dimension 3, but .*/run was trained on dimension 1"
    if old_checkpoint:  # saved before checkpoints carried data_dim: the weights' shapes tell
        checkpoint = load_checkpoint(relative_run)
        del checkpoint["data_dim"]
        save_checkpoint(os.path.join(relative_run, "ckpt_best.pt"), checkpoint)
        message = "pairs.npz has options of dimension 3, but the weights in .*/run are for another dimension"
    hashes = folder_hashes(relative_run)
    with pytest.raises(DataError, match=message):
        evaluate.main([relative_run, *FAST])
    assert folder_hashes(relative_run) == hashes


# -----------------------------------------------------------------------------
# eval.json first; Ctrl-C; plots


def test_eval_json_is_written_before_the_plots(run_copy, monkeypatch):
    pytest.importorskip("matplotlib")
    def broken_plot(*args):
        raise RuntimeError("a bug in plotting")
    monkeypatch.setattr(report, "plot_accuracy", broken_plot)
    with pytest.raises(RuntimeError, match="a bug in plotting"):  # a real bug keeps its traceback
        evaluate.main([run_copy[0], *FAST, "--num-context=[0]", "--plot"])
    assert json.load(open(os.path.join(run_copy[0], "eval.json")))


def test_ctrl_c_during_evaluation_exits_130_quietly_and_writes_nothing(run_copy, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "score_context_size", interrupted)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", run_copy[0], *FAST])
    with pytest.raises(SystemExit) as exit_info:
        run_script(evaluate.main)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert folder_hashes(run_copy[0]) == run_copy[1]


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept open for inspection instead of closed."""
    plt = pytest.importorskip("matplotlib.pyplot")
    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", drawn.append)
    yield drawn
    for fig in drawn:
        close(fig)


def errorbar_lines(ax):
    """{label: the data line} of the error-bar curves in `ax`."""
    return {c.get_label(): c.lines[0] for c in ax.containers}


def test_accuracy_and_reward_curve_plots_can_be_read(tmp_path, np_btl_run, btl_run, paper_path, figures):
    evaluate.main([np_btl_run[0], btl_run[0], *FAST, "--num-context=[0,10]", "--plot", f"--out={tmp_path}"])
    accuracy, curves = figures
    ax = accuracy.axes[0]
    assert f"split 'test' of {paper_path}" in ax.get_title() and "SEM" in ax.get_title()
    assert ax.get_xlabel().startswith("context pairs n") and ax.get_ylabel().endswith("(%)")
    lines = errorbar_lines(ax)
    assert len(lines) == 3 and len({(l.get_marker(), l.get_linestyle(), l.get_color()) for l in lines.values()}) == 3
    assert len({tuple(l.get_xdata()) for l in lines.values()}) == 3  # shifted apart horizontally
    assert "only the ordering of rewards is identifiable" in curves._suptitle.get_text()
    assert all("standardised" in a.get_ylabel() and a.get_legend() is not None for a in curves.axes)


def test_steering_plot_has_a_legend_per_panel_and_one_colour_per_model(tmp_path, figures):
    rows = [{"model": "np_dpo", "label": label, "num_context": n, "gold_reward": n / 10, "sem": 0.05}
            for label in ("concise", "detailed") for n in (0, 5)]
    rows += [{"model": "dpo", "label": label, "num_context": None, "gold_reward": 0.3, "sem": 0.02}
             for label in ("concise", "detailed")]
    rows += [{"model": "oracle_detailed", "label": "detailed", "num_context": None, "gold_reward": 0.9, "sem": 0.02}]
    assert report.plot_steering(rows, ["concise", "detailed"], [0, 5], "split 'test'", str(tmp_path)) == \
        ["steering.png"]
    (fig,) = figures
    colours = {}
    for ax, expected in zip(fig.axes, [{"np_dpo", "dpo (no context)"},
                                       {"np_dpo", "dpo (no context)", "oracle_detailed (no context)"}]):
        assert {t.get_text() for t in ax.get_legend().get_texts()} == expected
        for handle, label in zip(*ax.get_legend_handles_labels()):
            colour = handle.lines[0].get_color() if hasattr(handle, "lines") else handle.get_color()
            assert colours.setdefault(label, colour) == colour
    assert len(set(colours.values())) == 3
    assert "split 'test'" in fig._suptitle.get_text() and (tmp_path / "steering.png").exists()


# -----------------------------------------------------------------------------
# continuous populations and the posterior predictive


def test_a_population_gets_a_monte_carlo_reference_with_its_error(tmp_path):
    path = str(tmp_path / "users.npz")
    save_pairs(path, make_linear_synthetic(num_users=200, pairs_per_user=40, dim=3, temperature=0.1, seed=0))
    train(tmp_path / "run", path, *TINY, "--train.steps=20", "--data.synthetic=null", "--eval.num_targets=10",
          "--model.encoder.stochastic=true", "--train.num_targets=10")
    rows = evaluate.main([str(tmp_path / "run"), "--episodes=40", "--num_targets=20", "--num-context=[0,10]",
                          "--bayes_samples=400", "--predict_samples=8", "--chunk=20", "--max_label_rows=5"])
    bayes = [r for r in rows if r["model"] == evaluate.BAYES]
    assert [r["label"] for r in bayes] == ["all", "all"]  # 20 test users > max_label_rows: the overall row
    with_context = next(r for r in bayes if r["num_context"] == 10)
    assert with_context["mc_error"] > 0 and with_context["sem"] >= with_context["mc_error"]
    assert with_context["accuracy"] > 0.7
    no_context = next(r for r in bayes if r["num_context"] == 0)  # exactly 1/2 by symmetry: a tie, no MC error
    assert no_context["accuracy"] == 0.5 and no_context["mc_error"] == 0
    assert {r["model"] for r in rows} == {"run (mean z)", "run (predictive)", evaluate.BAYES}


def test_a_runs_training_config_is_not_an_evaluation_config(np_btl_run, tmp_path):
    with pytest.raises(ConfigError, match=r"config.yaml is a training config, not a run: give the run's folder"):
        evaluate.main([os.path.join(np_btl_run[0], "config.yaml")])
    # a config from configs/ whose run exists: name the run it trains, not "train it first"
    (tmp_path / "task.yaml").write_text(f"stage: reward\nout_dir: {np_btl_run[0]}\n")
    with pytest.raises(ConfigError, match=re.escape(f"give the run's folder ({np_btl_run[0]})")):
        evaluate.main([str(tmp_path / "task.yaml")])
    (tmp_path / "untrained.yaml").write_text(f"stage: reward\nout_dir: {tmp_path / 'none'}\n")
    with pytest.raises(ConfigError, match="train it first"):
        evaluate.main([str(tmp_path / "untrained.yaml")])


@pytest.mark.parametrize("arg, key", [("--policy_eval.temperature=0", "policy_eval.temperature"),
                                      ("--policy_eval.max_new_tokens=0", "policy_eval.max_new_tokens"),
                                      ("--policy_eval.episodes=0", "policy_eval.episodes")])
def test_policy_evaluation_settings_must_be_positive(np_btl_run, arg, key):
    with pytest.raises(ConfigError, match=f"config key '{key}': must be a positive number"):
        evaluate.main([np_btl_run[0], arg])


def test_a_run_still_training_is_scored_with_a_note(np_btl_run, tmp_path, capsys):
    from runs import claimed_run_folder
    config = {"out_dir": np_btl_run[0], "resume": True, "overwrite": False}
    with claimed_run_folder(config, "reward"):  # as a training does
        evaluate.main([np_btl_run[0], *FAST, "--num-context=[0]", f"--out={tmp_path}"])
    assert f"note: {np_btl_run[0]} is still training (process {os.getpid()}" in capsys.readouterr().out


def test_each_models_gap_is_its_accuracy_minus_bayes_on_the_same_episodes(evaluation):
    rows, _ = evaluation
    for row in rows:
        if "gap_to_bayes" in row:
            bayes = accuracy(rows, evaluate.BAYES, row["num_context"])
            assert row["gap_to_bayes"] == pytest.approx(row["accuracy"] - bayes, abs=1e-6)
            assert 0 < row["gap_sem"] < 0.05
