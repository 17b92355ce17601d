"""The terminal dialogue's loop (dialogue.py); steer.py drives it through stdin (test_steer.py)."""

import io

import pytest

import dialogue


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
