"""The terminal dialogue (dialogue.py): its loop, and a reward run's dialogue driven through stdin."""

import io
import json
import os
import subprocess
import sys

import pytest

import dialogue
from common import run_script
from conftest import REPO, folder_hashes


def test_read_choice_reads_numbers_skip_stop_and_asks_again():
    out = io.StringIO()
    assert dialogue.read_choice(io.StringIO("x\n 2 \n"), out) == 1
    assert "please type 1, 2, s or q" in out.getvalue()
    assert dialogue.read_choice(io.StringIO("1\n"), out) == 0
    assert dialogue.read_choice(io.StringIO("S\n"), out) == "skip"
    assert dialogue.read_choice(io.StringIO("q\n"), out) == "stop"
    assert dialogue.read_choice(io.StringIO(""), out) == "stop"  # end of piped input


def test_converse_counts_answers_not_skips_and_stops_early():
    recorded, questions = [], iter(range(10))
    given = dialogue.converse(3, lambda: next(questions), lambda q: (f"q{q}", "a", "b"),
                              lambda q, c: recorded.append((q, c)), io.StringIO("1\ns\n2\nq\n"), io.StringIO())
    assert given == 2 and recorded == [(0, 0), (1, None), (2, 1)]  # q: stopped before a third answer
    recorded, questions = [], iter(range(10))
    out = io.StringIO()
    assert dialogue.converse(2, lambda: next(questions), lambda q: (f"q{q}", "first text", "second text"),
                             lambda q, c: recorded.append((q, c)), io.StringIO("2\n1\n1\n"), out) == 2
    assert recorded == [(0, 1), (1, 0)]
    assert "Question 1 of 2: q0\n  1. first text\n  2. second text\n" in out.getvalue()


def test_save_path_is_checked_before_any_question(tmp_path):
    (tmp_path / "old.jsonl").write_text("{}\n")
    with pytest.raises(Exception, match="exists: give a new file"):
        dialogue.check_save_path(str(tmp_path / "old.jsonl"))
    with pytest.raises(Exception, match="no folder"):
        dialogue.check_save_path(str(tmp_path / "nope" / "a.jsonl"))
    dialogue.check_save_path(str(tmp_path / "old.jsonl"), str(tmp_path / "old.jsonl"))  # extending --context


def reward_cli(monkeypatch, capsys, answers, *argv):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers))
    dialogue.reward_cli(list(argv))
    return capsys.readouterr().out


def test_reward_dialogue_asks_well_chosen_questions_and_saves(np_btl_run, monkeypatch, capsys, tmp_path):
    """On the paper task the first infogain question is one the two types answer differently, and the
    answers are saved; --context resumes from them and asks only the rest."""
    save = str(tmp_path / "me.jsonl")
    out = reward_cli(monkeypatch, capsys, "2\ns\n2\n", np_btl_run[0], "--ask=2", "--pool=200", f"--save={save}")
    assert out.count("Question 1 of 2") == 1 and out.count("Question 2 of 2") == 2  # the skip asked another
    with open(save) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 and all(r["choice"] == 1 and len(r["option_a"]) == 1 for r in rows)
    a, b = rows[0]["option_a"][0], rows[0]["option_b"][0]
    r0 = [y if y < 0.5 else 2 * y for y in (a, b)]  # the paper's two reward functions
    r1 = [y if y < 0.5 else 1 - y for y in (a, b)]
    assert (r0[0] > r0[1]) != (r1[0] > r1[1])  # a question that tells the types apart
    assert "your answers fit" in out and "wrote 2 answers" in out
    out = reward_cli(monkeypatch, capsys, "1\n", np_btl_run[0], "--ask=3", "--pool=200", f"--context={save}",
                     f"--save={save}")
    assert "starting from 2 answers" in out and out.count("Question 1 of 1") == 1
    with open(save) as f:
        assert len(f.readlines()) == 3


def test_reward_dialogue_scores_pairs(np_btl_run, monkeypatch, capsys, tmp_path):
    score = tmp_path / "pairs.jsonl"
    score.write_text('{"option_a": [0.9], "option_b": [0.6]}\n{"option_a": [0.1], "option_b": [0.3]}\n')
    out = reward_cli(monkeypatch, capsys, "1\n", np_btl_run[0], "--ask=1", "--pool=200", f"--score={score}")
    lines = [line for line in out.splitlines() if line.startswith("  0.") or line.startswith("  1.0")]
    assert len(lines) == 2 and float(lines[1].split()[0]) < 0.5  # both types prefer 0.3 to 0.1


@pytest.mark.parametrize("args, message", [
    (["--ask=1", "--save={tmp}/old.jsonl"], "exists: give a new file"),
    (["--ask=1", "--save={tmp}/no/such.jsonl"], "no folder"),
    (["--save={tmp}/new.jsonl"], "give --ask=K"),
    ([], "give --ask=K to be asked K questions"),
    (["--ask=1", "--strategy=best"], "strategy"),
    (["--context={tmp}/bad.jsonl"], "bad.jsonl:1: each line is a JSON object"),
    (["--context={tmp}/text.jsonl"], "this looks like a text pair for policy.py"),
    (["--context={tmp}/wrong_dim.jsonl"], "options of 2 features, the run's have 1"),
    (["--context={tmp}/nan.jsonl"], "must be finite numbers"),
    (["--context={tmp}/bool.jsonl"], "'choice' must be 0 (option_a preferred) or 1, got True"),
    (["--context={tmp}/binary.jsonl"], "not UTF-8 text"),
    (["--score={tmp}/empty.jsonl"], "holds no pairs (an empty file)"),
    (["--ask=1", "--context={tmp}"], "no such file (a folder)"),
])
def test_reward_dialogue_mistakes_are_one_line_and_write_nothing(np_btl_run, tmp_path, args, message):
    (tmp_path / "old.jsonl").write_text("{}\n")
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    (tmp_path / "wrong_dim.jsonl").write_text('{"option_a": [0.1, 0.2], "option_b": [0.3, 0.4], "choice": 0}\n')
    (tmp_path / "text.jsonl").write_text('{"prompt": "p", "response_a": "a", "response_b": "b", "choices": {"me": 0}}\n')
    (tmp_path / "nan.jsonl").write_text('{"option_a": [NaN], "option_b": [0.3], "choice": 0}\n')
    (tmp_path / "bool.jsonl").write_text('{"option_a": [0.1], "option_b": [0.3], "choice": true}\n')
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    before = folder_hashes(tmp_path)
    result = subprocess.run([sys.executable, os.path.join(REPO, "dialogue.py"), np_btl_run[0],
                             *(a.format(tmp=tmp_path) for a in args)], input="1\n", capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert folder_hashes(tmp_path) == before


def test_reward_dialogue_refuses_a_btl(btl_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dialogue.py", btl_run[0], "--ask=1"])
    with pytest.raises(SystemExit) as exit_info:
        run_script(dialogue.reward_cli)
    assert exit_info.value.code == 2 and "nothing to ask" in capsys.readouterr().err


def test_resuming_never_asks_an_answered_pair_again(np_btl_run, monkeypatch, capsys, tmp_path):
    save = str(tmp_path / "me.jsonl")
    reward_cli(monkeypatch, capsys, "1\n2\n", np_btl_run[0], "--ask=2", "--pool=50", f"--save={save}")
    out = reward_cli(monkeypatch, capsys, "1\n1\n1\n", np_btl_run[0], "--ask=5", "--pool=50", f"--context={save}",
                     f"--save={save}")
    with open(save) as f:
        pairs = [tuple(sorted(json.loads(line)["option_a"] + json.loads(line)["option_b"])) for line in f]
    assert len(pairs) == 5 and len(set(pairs)) == 5 and "starting from 2 answers" in out


def test_no_answers_write_no_file(np_btl_run, monkeypatch, capsys, tmp_path):
    out = reward_cli(monkeypatch, capsys, "q\n", np_btl_run[0], "--ask=2", f"--save={tmp_path}/me.jsonl")
    assert "nothing learned" in out and "nothing written" in out and os.listdir(tmp_path) == []


def test_ctrl_c_stops_asking_and_keeps_the_answers():
    class Interrupting(io.StringIO):
        def readline(self):
            if self.tell() >= 2:
                raise KeyboardInterrupt
            return super().readline()

    recorded, out = [], io.StringIO()
    given = dialogue.converse(3, iter(range(9)).__next__, lambda q: ("q", "a", "b"),
                              lambda q, c: recorded.append(c), Interrupting("2\n1\n"), out)
    assert given == 1 and recorded == [1] and "Ctrl-C" in out.getvalue()
