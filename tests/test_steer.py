"""steer.py: a policy steered by a user's choices (a file or a dialogue through stdin), a
reward run's dialogue, and every user mistake as one line, exit 2, nothing written."""

import hashlib
import io
import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import dialogue
import queries
import steer
import text
import toy
import train_policy
import train_reward
from common import run_script
from conftest import REPO, TINY, folder_hashes, small
from policy import build_base_model
from runs import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21


# -----------------------------------------------------------------------------
# a policy run

STEERABLE = ["--train.steps=120", "--eval.interval=60", "--train.lr=3e-3"]  # about 6 s: enough to steer by length
EXAMPLE_CONTEXT = os.path.join(REPO, "examples", "context.jsonl")
GOOD_CHOICE = {"prompt": "tell me about bees .", "response_a": "bees help people .",
               "response_b": "bees help people . bees are nice .", "choices": {"me": 0}}


def write_context(path, lines):
    """A JSONL file: dicts are dumped, strings and bytes written as they are."""
    with open(path, "wb") as f:
        for line in lines:
            line = json.dumps(line) if isinstance(line, dict) else line
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def doctored_run(source, folder, change):
    """A copy of the run's ckpt_best.pt, with change(checkpoint) applied, as folder/ckpt_best.pt."""
    checkpoint = load_checkpoint(source)
    change(checkpoint)
    save_checkpoint(os.path.join(folder, "ckpt_best.pt"), checkpoint)
    return str(folder)


def set_embedder(path):
    def change(checkpoint):
        checkpoint["config"]["data"]["embedder"] = path
    return change


def move_base(path):
    def change(checkpoint):
        checkpoint["config"]["policy"]["base"] = checkpoint["policy_config"]["base"] = path
    return change


def other_embedder(folder):
    """A toy-vocabulary model of width 16 (the toy base is 32 wide), with its tokenizer."""
    m = dict(hidden_size=16, layers=1, heads=2, intermediate_size=32)
    tokenizer = toy.toy_tokenizer()
    build_base_model(toy.toy_base_config(m, len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def cli_runs(toy_root, tmp_path_factory):
    """{name: path}: NP-DPO trained from the toy folder's parent with relative paths (so they
    must be resolved from the run), plain DPO, a reward run, and broken copies."""
    root = tmp_path_factory.mktemp("cli")
    here = os.getcwd()
    os.chdir(os.path.dirname(toy_root))
    try:
        train_policy.main([*small(os.path.basename(toy_root), *STEERABLE), f"--out_dir={root}/np_dpo"])
    finally:
        os.chdir(here)
    train_policy.main([*small(toy_root, "--policy.encoder.latent_dim=0", "--train.steps=10", "--eval.interval=10"),
                       f"--out_dir={root}/dpo"])
    data.save_pairs(f"{root}/paper.npz", data.make_paper_synthetic(num_pairs=1000, seed=0))
    train_reward.main([f"--out_dir={root}/reward", f"--data.path={root}/paper.npz", *TINY])
    best = f"{root}/np_dpo/ckpt_best.pt"
    runs = {"root": str(root), "np": f"{root}/np_dpo", "dpo": f"{root}/dpo", "reward": f"{root}/reward",
            "embedder": other_embedder(root / "embedder"), "gone": f"{root}/gone_base"}
    runs["other_embedder"] = doctored_run(best, root / "other_embedder", set_embedder(runs["embedder"]))
    runs["moved_base"] = doctored_run(best, root / "moved_base", move_base(runs["gone"]))
    os.makedirs(root / "only_last")
    save_checkpoint(f"{root}/only_last/ckpt_last.pt", load_checkpoint(f"{root}/np_dpo/ckpt_last.pt"))
    runs["only_last"] = f"{root}/only_last"
    os.makedirs(root / "corrupt")
    (root / "corrupt" / "ckpt_best.pt").write_bytes(b"not a checkpoint")
    runs["corrupt"] = f"{root}/corrupt"
    return runs


def test_cli_run_records_relative_paths(cli_runs, toy_root):
    """So the tests below resolve them from the folder the run was trained in."""
    checkpoint = load_checkpoint(cli_runs["np"])
    assert checkpoint["policy_config"]["base"] == f"{os.path.basename(toy_root)}/base"
    assert checkpoint["cwd"] == os.path.dirname(toy_root)


def tree_hashes(*folders):
    """{path: sha256} of every file under the folders: proof that nothing was written."""
    hashes = {}
    for folder in folders:
        for parent, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(parent, name)
                with open(path, "rb") as f:
                    hashes[path] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def fill(text, paths):
    for name, path in paths.items():
        text = text.replace("{" + name + "}", path)
    return text


NP = ["{np}", "--prompt=describe tea .", "--context={ctx}"]
BAD_INPUTS = {  # id: (arguments, lines of {ctx} or None, message in the one error line)
    "no-run": ([], None, "usage: python steer.py POLICY_RUN --prompt=TEXT [--context=FILE.jsonl]"),
    "two-runs": (["{np}", "{dpo}", "--prompt=describe tea ."], None, "expected one RUN, got 2: {np} {dpo} (usage:"),
    "unknown-key": ([*NP, "--temprature=0.5"], [GOOD_CHOICE], "unknown config key 'temprature'"),
    "prompt-missing": (["{np}", "--context={ctx}"], [GOOD_CHOICE], "config key 'prompt': must not be empty: give the "
                       'text to answer, e.g. --prompt="Tell me about bees."'),
    "prompt-blank": (["{np}", "--prompt=  ", "--context={ctx}"], [GOOD_CHOICE],
                     "config key 'prompt': must not be empty"),
    "samples-zero": ([*NP, "--samples=0"], [GOOD_CHOICE], "config key 'samples': must be at least 1"),
    "samples-not-a-number": ([*NP, "--samples=many"], [GOOD_CHOICE], "config key 'samples': expected int, got 'many'"),
    "temperature-negative": ([*NP, "--temperature=-0.5"], [GOOD_CHOICE],
                             "config key 'temperature': must be 0 (greedy) or a positive number"),
    "temperature-nan": ([*NP, "--temperature=.nan"], [GOOD_CHOICE], "config key 'temperature': must be 0 (greedy)"),
    "max-new-tokens-zero": ([*NP, "--max_new_tokens=0"], [GOOD_CHOICE],
                            "config key 'max_new_tokens': must be at least 1"),
    "device-unknown-before-loading": (["{tmp}/nope", "--prompt=describe tea .", "--device=tpu"], None,
                                      "config key 'device': unknown device 'tpu'"),
    "device-unavailable": ([*NP, "--device=cuda:99"], [GOOD_CHOICE], "config key 'device': 'cuda:99'"),
    "run-missing": (["{tmp}/nope", "--prompt=describe tea ."], None, "{tmp}/nope: no such run folder or checkpoint"),
    "reward-run-missing": (["{tmp}/nope", "--ask=1", "--particles=32"], None, "checkpoint not found: {tmp}/nope"),
    "run-folder-empty": (["{tmp}", "--prompt=describe tea ."], None,
                         "{tmp}: no ckpt_best.pt in this folder (give the out_dir of a train_policy.py run)"),
    "run-without-best": (["{only_last}", "--prompt=describe tea ."], None,
                         "{only_last}: no ckpt_best.pt in this folder (a run writes it at its first validation; "
                         "give {only_last}/ckpt_last.pt for its last step)"),
    "reward-run": (["{reward}", "--prompt=describe tea ."], None, "{reward} is a reward run (made by train_reward.py): "
                   "it writes no responses; give a policy run (train_policy.py)"),
    "checkpoint-corrupt": (["{corrupt}", "--prompt=describe tea ."], None,
                           "{corrupt}/ckpt_best.pt: not a readable checkpoint"),
    "base-moved": (["{moved_base}", "--prompt=describe tea .", "--context={ctx}"], [GOOD_CHOICE],
                   "policy.base = {gone} (recorded in the run) cannot be loaded: no such folder (moved or deleted?)"),
    "np-dpo-without-context": (["{np}", "--prompt=describe tea ."], None, "config key 'context': this policy is "
                               "steered by a user's choices: give --context=FILE.jsonl, their choices between two "
                               "responses (as in examples/context.jsonl)"),
    "context-missing": (["{np}", "--prompt=describe tea .", "--context={tmp}/nope.jsonl"], None,
                        "{tmp}/nope.jsonl: file not found"),
    "context-folder": (["{np}", "--prompt=describe tea .", "--context={tmp}"], None,
                       "{tmp}: cannot read it (Is a directory)"),
    "context-empty": (NP, [], "{ctx}: holds no choices (an empty file); give one user's choices, "
                      "as in examples/context.jsonl"),
    "context-blank-lines": (NP, ["", "  "], "{ctx}: holds no choices (an empty file)"),
    "context-all-null": (NP, [dict(GOOD_CHOICE, choices={"me": None})] * 2,
                         "{ctx}: every choice of 'me' is null: nothing to steer by"),
    "context-two-users": (NP, [GOOD_CHOICE, dict(GOOD_CHOICE, choices={"you": 1})],
                          "{ctx}: holds the choices of 2 users ('me', 'you'); the policy is steered by one user: "
                          "keep one label in the file"),
    "context-wrong-keys": (NP, [{"question": "describe tea .", "answer_a": "tea .", "answer_b": "tea .", "label": 0}],
                           "{ctx}:1: missing field 'prompt': each line is a JSON object with prompt, response_a, "
                           "response_b and choices {label: 0, 1 or null}, as in examples/context.jsonl"),
    "context-malformed": (NP, [GOOD_CHOICE, "{oops", "[1]"], "{ctx}:2: invalid JSON (Expecting property name enclosed "
                          "in double quotes) (and 1 more bad lines): each line is a JSON object"),
    "context-bad-choice": (NP, [dict(GOOD_CHOICE, choices={"me": "a"})],
                           "{ctx}:1: choice for label 'me' is 'a', not 0, 1 or null"),
    "context-not-utf8": (NP, [json.dumps(GOOD_CHOICE).encode()[:-2] + b'\xff"}'], "{ctx}:1: not UTF-8 text"),
    "context-unknown-words": (NP, [dict(GOOD_CHOICE, response_b="Bees help 🐝 zebras.")],
                              "{ctx}: response_b 'Bees help 🐝 zebras.': the model's vocabulary has no '🐝', 'zebras' "
                              "(it knows 41 words: ., ?, about,"),
    "context-too-long": (NP, [dict(GOOD_CHOICE, response_b=" ".join(["bees are nice ."] * 20))],
                         "{ctx}: 1 of 1 pairs are longer than data.max_length = 64 tokens (prompt + response), "
                         "the longest the run was trained on: shorten them"),
    "context-other-embedder": (["{other_embedder}", "--prompt=describe tea .", "--context={ctx}"], [GOOD_CHOICE],
                               "{ctx}: data.embedder = {embedder} embeds it in 16 dimensions, but the policy's "
                               "encoder reads 32 (its features came from another embedder)"),
    "prompt-emoji": (["{np}", "--prompt=Tell me about 🐝", "--context={ctx}"], [GOOD_CHOICE],
                     "--prompt: the model's vocabulary has no '🐝' (it knows 41 words: ., ?, about, are,"),
    "prompt-other-script": (["{np}", "--prompt=Расскажи о пчёлах.", "--context={ctx}"], [GOOD_CHOICE],
                            "--prompt: the model's vocabulary has no 'Расскажи', 'о', 'пчёлах'"),
    "prompt-unknown-words": (["{dpo}", "--prompt=Tell me about zebras!"], None,
                             "--prompt: the model's vocabulary has no 'zebras', '!'"),
    "rerank-policy-run": (NP + ["--rerank={dpo}"], [GOOD_CHOICE], "{dpo} is a policy run; give a reward run"),
    "rerank-no-such-run": (NP + ["--rerank={tmp}/nothing"], [GOOD_CHOICE], "no such run dir"),
    "rerank-other-task": (NP + ["--rerank={reward}"], [GOOD_CHOICE], "options of dimension"),
    "rerank-plain-dpo": (["{dpo}", "--prompt=describe tea .", "--rerank={reward}"], None,
                         "is plain DPO (no context encoder): its draws are the same for every user"),
    "rerank-no-draws": (NP + ["--rerank={reward}", "--rerank_samples=0"], [GOOD_CHOICE], "must be at least 1"),
    "rerank-greedy": (NP + ["--rerank={reward}", "--temperature=0"], [GOOD_CHOICE],
                      "--rerank picks among sampled draws: greedy decoding (0) draws one response"),
    "rerank-latent-typo": (NP + ["--rerank={reward}", "--rerank_latent=particle"], [GOOD_CHOICE],
                           "must be encoder or particles"),
}


def bad_input(cli_runs, tmp_path, case):
    """(argv, message, paths) of a BAD_INPUTS case, its context file written under tmp_path."""
    args, lines, message = BAD_INPUTS[case]
    paths = {**cli_runs, "tmp": str(tmp_path), "ctx": str(tmp_path / "ctx.jsonl")}
    if lines is not None:
        write_context(paths["ctx"], lines)
    return [fill(a, paths) for a in args], fill(message, paths)


def assert_one_error_line(stderr, message):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0] and "Traceback" not in stderr and "skip_bad" not in stderr


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(cli_runs, toy_root, tmp_path, monkeypatch, capsys, case):
    argv, message = bad_input(cli_runs, tmp_path, case)
    before = tree_hashes(cli_runs["root"], toy_root, tmp_path)
    monkeypatch.setattr(sys, "argv", ["steer.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_script(steer.main)
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert tree_hashes(cli_runs["root"], toy_root, tmp_path) == before


def run_cli(*argv, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "steer.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no-run", "context-unknown-words"])
def test_cli_bad_input_in_a_process_of_its_own(cli_runs, toy_root, tmp_path, case):
    """The same contract from the shell (a subprocess costs seconds): before anything loads, and
    after the policy and the embedder have loaded, with text the terminal must print."""
    argv, message = bad_input(cli_runs, tmp_path, case)
    before = tree_hashes(cli_runs["root"], toy_root, tmp_path)
    result = run_cli(*argv)
    assert result.returncode == 2 and result.stdout == ""
    assert_one_error_line(result.stderr, message)
    assert tree_hashes(cli_runs["root"], toy_root, tmp_path) == before


@pytest.mark.slow
def test_cli_runs_from_another_folder_with_the_example_context_and_a_natural_prompt(cli_runs, toy_root, tmp_path):
    """The run's relative paths resolve from where it was trained; capitals and attached punctuation read."""
    before = tree_hashes(cli_runs["root"], toy_root)
    result = run_cli(cli_runs["np"], f"--context={EXAMPLE_CONTEXT}", "--prompt=Tell me about bees.", "--samples=2",
                     "--max_new_tokens=20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"steered by 4 choices of 'me' from {EXAMPLE_CONTEXT}"
    responses = result.stdout.strip().splitlines()
    vocabulary = set(toy.toy_vocabulary())
    assert len(responses) == 2 and all(r.split() and set(r.split()) <= vocabulary for r in responses)
    assert tree_hashes(cli_runs["root"], toy_root) == before and os.listdir(tmp_path) == []


def test_cli_help_prints_the_usage(capsys):
    steer.main(["--help"])
    assert capsys.readouterr().out == steer.POLICY_USAGE + "\n" + steer.REWARD_USAGE + "\n"


def test_cli_plain_dpo_needs_no_context_and_notes_one_given(cli_runs, capsys):
    steer.main([cli_runs["dpo"], "--prompt=What about cats?", "--samples=2", "--max_new_tokens=10"])
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2 and err == ""
    steer.main([cli_runs["dpo"], "--prompt=What about cats?", f"--context={EXAMPLE_CONTEXT}",
                     "--max_new_tokens=5"])
    note = f"note: {cli_runs['dpo']} is plain DPO (no context encoder): --context is ignored\n"
    assert capsys.readouterr().err == note


def sentences(text):
    return len([s for s in text.split(".") if s.strip()])


def test_cli_steers_response_length_toward_the_user(cli_runs, toy_root, tmp_path, capsys):
    """The same 8 context pairs, chosen as a concise user would, then as a detailed one: with the
    same seed, the responses are shorter, then longer (the toy world's two users differ in length)."""
    rows = [r for r in text.read_text_pairs(f"{toy_root}/pairs.jsonl")
            if r["split"] == "train" and r["choices"]["concise"] != r["choices"]["detailed"]][:8]
    lengths = {}
    for user in ("concise", "detailed"):
        path = write_context(tmp_path / f"{user}.jsonl", [dict(r, choices={"me": r["choices"][user]}) for r in rows])
        steer.main([cli_runs["np"], f"--context={path}", "--prompt=Describe tea.", "--samples=16",
                         "--max_new_tokens=40", "--seed=0"])
        responses = capsys.readouterr().out.strip().splitlines()
        assert len(responses) == 16
        lengths[user] = sum(map(sentences, responses)) / len(responses)
    assert lengths["concise"] + 1 < lengths["detailed"], lengths  # sentences per response


INTERRUPT_DURING_GENERATION = """
import faulthandler, signal, sys
faulthandler.register(signal.SIGUSR1)  # the test asks where it hangs, if it does
import common, steer
import policy
generate = policy.SteerablePolicy.generate
def endless(self, *args, **kwargs):  # real generation, over and over, until Ctrl-C
    print("generating", file=sys.stderr, flush=True)
    while True:
        generate(self, *args, **kwargs)
policy.SteerablePolicy.generate = endless
common.run_script(steer.main)
"""


@pytest.mark.slow
def test_cli_ctrl_c_during_generation_exits_130_quietly(cli_runs):
    process = subprocess.Popen([sys.executable, "-c", INTERRUPT_DURING_GENERATION, cli_runs["np"],
                                f"--context={EXAMPLE_CONTEXT}", "--prompt=describe tea .", "--samples=4"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in process.stderr:  # notes, then the marker: generation has begun
            if line.strip() == "generating":
                break
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # seen once (.ci/run on a fresh clone): say where it hangs, then fail
            process.send_signal(signal.SIGUSR1)
            time.sleep(5)
            process.kill()
            pytest.fail("no exit 60 s after Ctrl-C; its stacks:\n" + process.communicate()[1][-4000:])
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and out == ""
    assert err.strip() == "interrupted" and "Traceback" not in err


# -----------------------------------------------------------------------------
# the dialogue: steer.py POLICY_RUN --ask, driven through stdin


@pytest.fixture(scope="module")
def selector(toy_root, tmp_path_factory):
    """A tiny NP-BTL on the toy world's context features: it chooses the policy's questions."""
    out = str(tmp_path_factory.mktemp("selector") / "run")
    train_reward.main([f"--out_dir={out}", f"--data.path={toy_root}/features.npz", "--data.synthetic=null", *TINY])
    return out


def ask_cli(monkeypatch, capsys, answers, *argv):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers))
    steer.main(list(argv))
    return capsys.readouterr()


def test_dialogue_asks_saves_and_resumes(cli_runs, selector, monkeypatch, capsys, tmp_path):
    save = str(tmp_path / "me.jsonl")
    out, err = ask_cli(monkeypatch, capsys, "1\ns\n2\n", cli_runs["np"], "--ask=2", f"--selector={selector}",
                       "--prompt=Tell me about bees.", f"--save={save}", "--max_new_tokens=8", "--pool=50")
    assert out.count("Question 1 of 2") == 1 and out.count("Question 2 of 2") == 2 and err == ""
    assert "  1. " in out and "  2. " in out and "steered by 2 answers" in out
    assert out.strip().splitlines()[-1].split()  # the steered response, last
    rows, label = steer.read_context(save)  # the documented context format
    assert label == "me" and [r["choices"]["me"] for r in rows] == [0, 1]
    out, _ = ask_cli(monkeypatch, capsys, "1\n", cli_runs["np"], "--ask=3", f"--selector={selector}",
                     f"--context={save}", f"--save={save}", "--prompt=Tell me about bees.", "--max_new_tokens=8",
                     "--pool=50")
    assert "starting from 2 answers" in out and out.count("Question 1 of 1") == 1
    assert len(steer.read_context(save)[0]) == 3
    asked = [r["prompt"] + r["response_a"] for r in steer.read_context(save)[0]]
    assert len(set(asked)) == 3  # an answered question is not asked again


def test_policy_questions_refuse_particles_for_the_table(cli_runs, tmp_path):
    """--particles scores a reward run's predictions; a policy has none. Said, not ignored."""
    import evaluate
    from common import ConfigError

    with pytest.raises(ConfigError, match="config key 'particles'.*for reward runs"):
        evaluate.main([cli_runs["np"], "--particles=64", f"--out={tmp_path}/q"])
    assert not os.path.exists(tmp_path / "q")


def test_dialogue_without_a_selector_asks_at_random_and_says_so(cli_runs, monkeypatch, capsys):
    out, err = ask_cli(monkeypatch, capsys, "q\n", cli_runs["np"], "--ask=2", "--prompt=Tell me about bees.",
                       "--max_new_tokens=5")
    assert "random questions" in err and "no answers" in out


@pytest.mark.parametrize("args, message", [
    (["{dpo}", "--ask=2"], "plain DPO (no context encoder): no answer would change its responses"),
    (["{np}", "--save={tmp}/x.jsonl"], "saves the answers to --ask's questions: give --ask=K"),
    (["{np}", "--ask=2", "--save={tmp}/no/x.jsonl"], "no folder"),
    (["{np}", "--ask=2", "--selector={reward}"], "options of dimension"),
    (["{np}", "--ask=2", "--selector={np}"], "is a policy run (made by train_policy.py), not a reward run"),
])
def test_dialogue_mistakes_are_one_line_exit_2(cli_runs, tmp_path, monkeypatch, capsys, args, message):
    paths = {**cli_runs, "tmp": str(tmp_path)}
    monkeypatch.setattr(sys, "argv", ["steer.py", *(a.format(**paths) for a in args), "--prompt=Tell me about bees."])
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n1\n"))
    with pytest.raises(SystemExit) as exit_info:
        run_script(steer.main)
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert os.listdir(tmp_path) == []


def test_cli_rerank_prints_the_best_of_each_responses_draws_by_the_reward_run(cli_runs, selector, monkeypatch, capsys):
    """--rerank=RUN: response i is the draw of i * k .. i * k + k - 1 with the highest reward for this user,
    scored under the context the policy read. With the scores negated (same seed, same draws) the
    lowest are printed instead, and they differ: the choice is the reward's."""
    import policy_eval
    seen, real = [], policy_eval.Reranker.scores
    printed = {}
    for sign in (1, -1):
        def spy(self, prompt, texts, contexts, sign=sign):
            scores = sign * real(self, prompt, texts, contexts)
            seen.append((texts, scores, contexts))
            return scores
        monkeypatch.setattr(policy_eval.Reranker, "scores", spy)
        steer.main([cli_runs["np"], f"--context={EXAMPLE_CONTEXT}", "--prompt=Describe tea.", "--samples=2",
                    f"--rerank={selector}", "--rerank_samples=4", "--max_new_tokens=24", "--seed=0"])
        printed[sign] = capsys.readouterr().out.rstrip("\n").split("\n")
        texts, scores, contexts = seen[-1]
        assert len(texts) == 8 and scores.shape == (1, 8)
        assert contexts.shape[:2] == (1, len(text.read_text_pairs(EXAMPLE_CONTEXT)))  # the user's context, read
        assert printed[sign] == [texts[4 * i + j] for i, j in enumerate(scores.view(2, 4).argmax(1).tolist())]
    assert seen[0][0] == seen[1][0] and printed[1] != printed[-1]


def test_a_new_users_features_and_latent_equal_the_training_ones(cli_runs, toy_root):
    """steer.py embeds a person's pairs as the world's preparation embedded the training pairs
    (text.embed_pairs): the same features for the same pairs, so the same latent z."""
    checkpoint = load_checkpoint(cli_runs["np"])
    rows = [r for r in text.read_text_pairs(f"{toy_root}/pairs.jsonl")[:40] if r["choices"]["concise"] is not None][:6]
    ids = [int(r["id"]) for r in rows]
    here = os.getcwd()
    os.chdir(checkpoint["cwd"])
    try:
        features, _ = steer.context_features(checkpoint, rows, "rows", "cpu")
        policy = steer.policy_from_checkpoint(checkpoint).eval()
        latent = policy.infer_latent(steer.user_context(policy, checkpoint, rows, "concise", "rows", "cpu"))
    finally:
        os.chdir(here)
    stored = data.load_pairs(f"{toy_root}/features.npz")
    assert torch.allclose(features, stored.pairs[ids], atol=1e-5)
    second = torch.tensor([r["choices"]["concise"] == 1 for r in rows])
    context = data.chosen_first(stored.pairs[ids], second)[None]  # (1, n, 2, D): as the sampler orients them
    with torch.no_grad():
        assert torch.allclose(latent, policy.infer_latent(context), atol=1e-5)
        assert not torch.allclose(latent, policy.infer_latent(context.flip(2)), atol=1e-3)  # the choices matter


# -----------------------------------------------------------------------------
# a reward run's dialogue


def reward_cli(monkeypatch, capsys, answers, *argv):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers))
    steer.main(list(argv))
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


@pytest.mark.parametrize("belief", [["--particles=32"], ["--particles=32", "--adaptive"]])
def test_reward_dialogue_under_particles(np_btl_run, monkeypatch, capsys, tmp_path, belief):
    """--particles (fixed, or --adaptive: following the posterior): the training users' particles
    choose the question (one the two types answer differently) and give the predictions: after
    it, the model sides with the type that answered."""
    save, summaries = str(tmp_path / "me.jsonl"), []
    summary = queries.AdaptiveBelief.summary
    monkeypatch.setattr(queries.AdaptiveBelief, "summary", lambda self, *a: summaries.append(1) or summary(self, *a))
    out = reward_cli(monkeypatch, capsys, "1\n", np_btl_run[0], "--ask=1", "--pool=200", *belief, f"--save={save}")
    assert bool(summaries) == ("--adaptive" in belief)  # the particles moved with the posterior, or stayed
    with open(save) as f:
        row = json.loads(f.readline())
    a, b = row["option_a"][0], row["option_b"][0]
    r0 = [y if y < 0.5 else 2 * y for y in (a, b)]  # the paper's two reward functions
    r1 = [y if y < 0.5 else 1 - y for y in (a, b)]
    assert (r0[0] > r0[1]) != (r1[0] > r1[1])
    agree = dict(re.findall(r"(type_\w+|\w+) on (\d+) %", out.split("the model agrees with")[1]))
    answered = "0" if r0[0] > r0[1] else "1"  # option_a chosen: the type that prefers it
    assert int(agree[list(agree)[int(answered)]]) > 95, out


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
    (["--ask=1", "--particles=-1"], "particles"),
    (["--ask=1", "--adaptive"], "config key 'adaptive': moves particles: give --particles=S too"),
    (["--context={tmp}/bad.jsonl"], "bad.jsonl:1: each line is a JSON object"),
    (["--context={tmp}/text.jsonl"], "this looks like a text pair, for a policy run"),
    (["--context={tmp}/wrong_dim.jsonl"], "options of 2 features, the run's have 1"),
    (["--context={tmp}/nan.jsonl"], "must be finite numbers"),
    (["--context={tmp}/bool.jsonl"], "'choice' must be 0 (option_a preferred) or 1, got True"),
    (["--context={tmp}/binary.jsonl"], "not UTF-8 text"),
    (["--score={tmp}/empty.jsonl"], "holds no pairs (an empty file)"),
    (["--ask=1", "--context={tmp}"], "no such file (a folder)"),
])
@pytest.mark.slow
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
    result = subprocess.run([sys.executable, os.path.join(REPO, "steer.py"), np_btl_run[0],
                             *(a.format(tmp=tmp_path) for a in args)], input="1\n", capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert folder_hashes(tmp_path) == before


def test_reward_dialogue_refuses_a_btl(btl_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["steer.py", btl_run[0], "--ask=1"])
    with pytest.raises(SystemExit) as exit_info:
        run_script(steer.main)
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
