"""The NP-DPO training script on a small toy task: it learns, saves only what it
trains, resumes exactly, refuses bad configs; evaluate.py and policy.py use its runs."""

import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

import data
import evaluate
import policy as policy_lib
import policy_eval
import steer
import text
import train_policy
from common import ConfigError, TrainingError, UserError
from conftest import REPO, folder_hashes, prepare_main, run_torchrun, small
from runs import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def np_dpo_run(toy_root, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("np_dpo"))
    metrics = train_policy.main(small(toy_root, f"--out_dir={out_dir}", "--train.steps=150", "--eval.interval=50",
                                      "--eval.episodes=48", "--train.nll_weight=0", "--train.lr=3e-3"))
    return out_dir, metrics


def test_toy_inputs_are_aligned(toy_root):
    rows = text.read_text_pairs(f"{toy_root}/pairs.jsonl")
    features = data.load_pairs(f"{toy_root}/features.npz")
    assert len(rows) == len(features.pairs) == 800 and features.labels == ["concise", "detailed"]
    assert features.pairs.shape[1:] == (2, 32)
    assert [row["split"] for row in rows] == features.split.tolist()


def test_short_np_dpo_run_moves_implicit_reward_accuracy_above_chance(np_dpo_run):
    _, metrics = np_dpo_run
    assert metrics["val/acc@5"] > 0.75  # 48 episodes x 4 targets: chance is 0.5


def test_checkpoint_holds_only_trained_tensors(np_dpo_run, toy_root):
    checkpoint = load_checkpoint(os.path.join(np_dpo_run[0], "ckpt_last.pt"))
    assert set(checkpoint["model"]) == {"lora", "film", "encoder"}
    assert all("lora_" in key for key in checkpoint["model"]["lora"])
    trained = sum(t.numel() for part in checkpoint["model"].values() for t in part.values())
    policy, _ = policy_lib.load_policy(os.path.join(np_dpo_run[0], "ckpt_last.pt"))
    assert trained == sum(p.numel() for p in policy.parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_run(toy_root, tmp_path):
    args = ["--train.steps=3", "--eval.interval=3", "--policy.lora.dropout=0.0"]
    plain = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/a", *args))
    checkpointed = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/b", *args, "--train.gradient_checkpointing"))
    assert checkpointed == pytest.approx(plain, abs=1e-5)


def test_plain_dpo_run_has_no_encoder(toy_root, tmp_path):
    train_policy.main(small(toy_root, f"--out_dir={tmp_path}", "--policy.encoder.latent_dim=0", "--train.steps=4",
                            "--eval.interval=2"))
    assert set(load_checkpoint(os.path.join(tmp_path, "ckpt_best.pt"))["model"]) == {"lora"}


def signal_at_step(monkeypatch, step, sig):
    """Deliver `sig` to this process while the training batch of `step` (1-based) is drawn."""
    sample, calls = data.EpisodeSampler.sample, [0]

    def sample_and_signal(self, batch_size, num_context=None, label_rows=None):
        if num_context is None:  # a training batch; validation fixes num_context
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), sig)
        return sample(self, batch_size, num_context, label_rows)

    monkeypatch.setattr(data.EpisodeSampler, "sample", sample_and_signal)


def test_resume_equals_uninterrupted_training(toy_root, tmp_path, monkeypatch):
    args = ["--train.steps=12", "--eval.interval=5", "--policy.lora.dropout=0.1"]
    straight = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/a", *args))
    with monkeypatch.context() as patch:
        signal_at_step(patch, 7, signal.SIGINT)
        with pytest.raises(SystemExit, match="continue with --resume"):
            train_policy.main(small(toy_root, f"--out_dir={tmp_path}/b", *args))
    assert load_checkpoint(f"{tmp_path}/b/ckpt_last.pt")["step"] == 7
    resumed = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/b", *args, "--resume"))
    assert resumed == straight
    a, b = (load_checkpoint(f"{tmp_path}/{x}/ckpt_last.pt")["model"] for x in "ab")
    for part in a:
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


@pytest.mark.parametrize("override, key", [
    ("--train.beta=0", "train.beta"), ("--train.lr=-1", "train.lr"), ("--train.min_context=11", "train.min_context"),
    ("--train.autocast=fp8", "train.autocast"), ("--train.grad_accum=0", "train.steps")])
def test_bad_config_names_the_key(toy_root, tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}", override))


def test_eval_settings_larger_than_the_val_split_stop_before_training(toy_root, tmp_path, monkeypatch):
    monkeypatch.setattr(policy_lib, "dpo_step", None)  # any training or validation step would fail differently
    with pytest.raises(data.DataError, match=r"in split 'val', fewer than eval.num_targets \+ the largest of "
                                             r"eval.context_sizes = 1005"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}", "--eval.num_targets=1000"))


def test_features_must_align_with_pairs(toy_root, tmp_path):
    rows = text.read_text_pairs(f"{toy_root}/pairs.jsonl")
    text.write_text_pairs(f"{tmp_path}/fewer.jsonl", rows[:-1])
    with pytest.raises(data.DataError, match="row-aligned"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}", f"--data.pairs={tmp_path}/fewer.jsonl",
                                "--data.toy=false"))


def test_evaluate_policy_mode(np_dpo_run, tmp_path):
    rows = evaluate.main([np_dpo_run[0], "--num-context=[0,3]", "--policy_eval.episodes=16",
                          "--policy_eval.contexts_per_prompt=2", "--policy_eval.samples_per_context=2",
                          f"--out={tmp_path}"])
    accuracy = [r for r in rows if "accuracy" in r]
    steering = [r for r in rows if "gold_reward" in r]
    assert {r["label"] for r in accuracy} == {"concise", "detailed", "all"}
    assert {(r["label"], r["num_context"]) for r in steering} == {(l, n) for l in ("concise", "detailed") for n in (0, 3)}
    assert all(r["samples"] > 0 and r["sem"] >= 0 for r in steering)
    assert json.load(open(tmp_path / "eval.json")) == rows


def test_policy_cli_steers_from_a_context_file(np_dpo_run, tmp_path, capsys):
    rows = [{"prompt": "tell me about cats .", "response_a": "cats are nice .",
             "response_b": "cats are nice . cats look old .", "choices": {"me": 0}}]
    text.write_text_pairs(f"{tmp_path}/me.jsonl", rows)
    steer.main([np_dpo_run[0], f"--context={tmp_path}/me.jsonl", "--prompt=describe tea .", "--samples=2",
                "--max_new_tokens=12"])
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert len(lines) == 2 and all(lines)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(toy_root, tmp_path, monkeypatch):
    dpo_step, calls = policy_lib.dpo_step, [0]

    def dpo_step_turning_nan(policy, batch, beta, nll_weight=0.0):
        loss, metrics = dpo_step(policy, batch, beta, nll_weight)
        calls[0] += policy.training  # validation runs in eval mode
        return (loss * math.nan if calls[0] == 5 else loss), metrics

    monkeypatch.setattr(policy_lib, "dpo_step", dpo_step_turning_nan)
    with pytest.raises(TrainingError, match="non-finite loss .* at step 5: stopped"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}", "--train.steps=8", "--eval.interval=2"))
    last = load_checkpoint(f"{tmp_path}/ckpt_last.pt")
    assert last["step"] == 4
    assert all(torch.isfinite(t).all() for part in last["model"].values() for t in part.values())


# -----------------------------------------------------------------------------
# reference log-probs computed once per pair


def test_precomputed_reference_logps_equal_the_reference(toy_root):
    config, _ = train_policy.load_config(train_policy.DEFAULTS, small(toy_root))
    features, token_pairs, tokenizer = text.load_inputs(config)
    base = policy_lib.build_base_model(config["policy"]["base"])
    policy = policy_lib.SteerablePolicy(base, config["policy"], features.dim)
    table = text.reference_logprobs(policy, features, token_pairs, config, tokenizer.pad_token_id,
                                            torch.device("cpu"))
    test_rows = torch.from_numpy(features.split == "test")
    assert table[test_rows].isnan().all() and not table[~test_rows].isnan().any()
    with torch.no_grad():
        for row in torch.nonzero(~test_rows).squeeze(1)[:: 97].tolist():  # one pair at a time: no padding
            prompt, (a, b) = token_pairs[row]
            for response, expected in ((a, table[row, 0]), (b, table[row, 1])):
                ids = torch.tensor([prompt + response])
                mask = torch.arange(ids.shape[1])[None] >= len(prompt)
                logp = policy_lib.sequence_logprob(base(input_ids=ids).logits, ids, mask)  # base = reference here
                assert logp.item() == pytest.approx(expected.item(), abs=1e-4)


def test_precomputed_reference_runs_the_reference_once_and_changes_nothing(toy_root, tmp_path, monkeypatch):
    args = ["--train.steps=6", "--eval.interval=3", "--train.grad_accum=2", "--policy.lora.dropout=0.0"]
    on_the_fly = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/a", *args))
    reference_mode, entered = policy_lib.SteerablePolicy.reference_mode, [0]

    def counted(self):
        entered[0] += 1
        return reference_mode(self)

    monkeypatch.setattr(policy_lib.SteerablePolicy, "reference_mode", counted)
    precomputed = train_policy.main(small(toy_root, f"--out_dir={tmp_path}/b", *args, "--train.precompute_ref_logps"))
    assert entered[0] == 1  # one pass over the pairs before training; none in training or validation
    assert precomputed == pytest.approx(on_the_fly, abs=1e-5)
    a, b = (load_checkpoint(f"{tmp_path}/{x}/ckpt_last.pt")["model"] for x in "ab")
    assert all(torch.allclose(a[part][k], b[part][k], atol=1e-6) for part in a for k in a[part])


# -----------------------------------------------------------------------------
# data-parallel (torchrun)

@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_effective_batch(toy_root, tmp_path):
    """grad_accum = 2 micro-batches per step: one process runs both, or each of two runs one."""
    args = small(toy_root, "--train.steps=6", "--eval.interval=3", "--train.grad_accum=2", "--policy.lora.dropout=0.0")
    one = train_policy.main([*args, f"--out_dir={tmp_path}/one"])
    result = run_torchrun("train_policy.py", [*args, "--train.precompute_ref_logps"],  # ranks share that pass too
                          tmp_path / "two", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]  # also: the ranks' final weights agree exactly
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        a, b = (load_checkpoint(f"{tmp_path}/{run}/{name}") for run in ("one", "two"))
        assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
        assert all(torch.allclose(a["model"][p][k], b["model"][p][k], atol=1e-5) for p in a["model"]
                   for k in a["model"][p])
    logs = [[json.loads(line) for line in open(f"{tmp_path}/{run}/log.jsonl")] for run in ("one", "two")]
    assert [row["step"] for row in logs[1]] == [row["step"] for row in logs[0]] == [3, 6]  # rank 0 alone logs
    assert all(b[k] == pytest.approx(a[k], abs=1e-4) for a, b in zip(*logs) for k in a)
    assert one == pytest.approx({k: v for k, v in logs[1][-1].items() if k.startswith("val/")}, abs=1e-4)


def test_grad_accum_must_divide_among_processes():
    config, _ = train_policy.load_config(train_policy.DEFAULTS, ["--policy.base=x", "--train.grad_accum=4"])
    train_policy.validate_config(config, world_size=2)
    with pytest.raises(ConfigError, match="config key 'train.grad_accum': must be divisible by the number of "
                                          r"processes \(3\)"):
        train_policy.validate_config(config, world_size=3)


def torchrun(args, log):
    """A 2-process train_policy.py run; its output goes to the file `log` (a pipe could fill and block it)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_policy.py",
               *args]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigterm_to_torchrun_then_resume_ends_like_an_uninterrupted_run(toy_root, tmp_path):
    """torchrun forwards SIGTERM to both ranks; they stop after the same step, rank 0 saves,
    and a resumed 2-process run ends bit for bit where an uninterrupted one does."""
    args = small(toy_root, "--train.steps=100", "--eval.interval=20", "--eval.episodes=8", "--train.grad_accum=2")
    straight = torchrun([*args, f"--out_dir={tmp_path}/a"], tmp_path / "a.log")
    assert straight.wait(timeout=120) == 0, (tmp_path / "a.log").read_text()[-3000:]
    interrupted, last = torchrun([*args, f"--out_dir={tmp_path}/b"], tmp_path / "b.log"), tmp_path / "b/ckpt_last.pt"
    deadline = time.time() + 60
    while not last.exists() and time.time() < deadline and interrupted.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    interrupted.send_signal(signal.SIGTERM)
    assert interrupted.wait(timeout=60) != 0
    stopped_at = load_checkpoint(str(last))["step"]
    assert 0 < stopped_at < 100, "the run was not interrupted; make it longer"
    resumed = torchrun([*args, f"--out_dir={tmp_path}/b", "--resume"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=120) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    a, b = (load_checkpoint(f"{tmp_path}/{x}/ckpt_last.pt") for x in "ab")
    assert a["step"] == b["step"] == 100 and a["metrics"] == b["metrics"]
    assert all(torch.equal(a["model"][p][k], b["model"][p][k]) for p in a["model"] for k in a["model"][p])


# -----------------------------------------------------------------------------
# a run folder is never lost to an ordinary mistake; user errors write nothing


@pytest.fixture(scope="module")
def short_run(toy_root, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("short") / "run")
    train_policy.main(small(toy_root, f"--out_dir={out_dir}", "--train.steps=4", "--eval.interval=2"))
    return out_dir


@pytest.mark.parametrize("args, message", [
    ([], "already holds a run .*: continue it with --resume, or replace it with --overwrite"),
    (["--resume", "--policy.lora.r=8"], r"policy.lora.r = 4 \(given 8\): these shape the model"),
    (["--resume", "--policy.encoder.latent_dim=0"], r"policy.encoder.latent_dim = 8 \(given 0\)"),
    (["--resume", "--train.steps=3"], "is at step 4 and train.steps = 3: raise train.steps"),
    (["--data.pairs=typo.jsonl", "--overwrite"], "data.pairs: typo.jsonl not found"),
])
def test_mistakes_leave_a_finished_policy_run_untouched(toy_root, short_run, args, message):
    before = folder_hashes(short_run)
    overrides = small(toy_root, f"--out_dir={short_run}", "--train.steps=4", *args)
    if "--data.pairs=typo.jsonl" in args:
        overrides.remove("--data.generate")  # as a user would type it: no explicit flag
    with pytest.raises(UserError, match=message):
        train_policy.main(overrides)
    assert folder_hashes(short_run) == before and not os.path.exists("typo.jsonl")


def test_a_mistyped_toy_input_path_is_not_built(toy_root, tmp_path):
    for key in ("data.features", "policy.base"):
        with pytest.raises(UserError, match=f"{key}: {tmp_path}/typo not found .*add --data.generate"):
            args = [a for a in small(toy_root, f"--out_dir={tmp_path}/run", f"--{key}={tmp_path}/typo")
                    if a != "--data.generate"]
            train_policy.main(args)
    assert os.listdir(tmp_path) == []


def test_a_reward_config_or_run_folder_is_refused(toy_root, tmp_path):
    with pytest.raises(ConfigError, match=r"configs/synthetic.yaml is a config for train_reward.py \(stage: reward\)"):
        train_policy.main([os.path.join(REPO, "configs/synthetic.yaml"), f"--out_dir={tmp_path}/new"])
    os.makedirs(tmp_path / "reward_run")
    (tmp_path / "reward_run" / "config.yaml").write_text("stage: reward\nout_dir: x\n")
    with pytest.raises(ConfigError, match="holds a reward run .*: train_policy.py will not write there"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}/reward_run", "--overwrite"))
    assert os.listdir(tmp_path) == ["reward_run"] and os.listdir(tmp_path / "reward_run") == ["config.yaml"]


def test_the_best_weights_open_with_peft_and_match_the_project_loader(toy_root, short_run):
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = os.path.join(short_run, "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "steering.safetensors"} <= set(os.listdir(folder))
    policy, checkpoint = policy_lib.load_policy(short_run)
    peft_model = PeftModel.from_pretrained(policy_lib.build_base_model(f"{toy_root}/base"), folder).eval()
    tokens = torch.tensor([[2, 5, 9, 7, 3, 11, 4], [2, 6, 8, 10, 12, 3, 1]])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 3:] = True
    with torch.no_grad():
        ours = policy_lib.sequence_logprob(policy.eval()(tokens), tokens, mask)  # latent off: LoRA alone
        theirs = policy_lib.sequence_logprob(peft_model(input_ids=tokens).logits, tokens, mask)
        base = policy_lib.sequence_logprob(policy_lib.build_base_model(f"{toy_root}/base")(tokens).logits, tokens, mask)
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(ours, base, atol=1e-3)
    steering = load_file(os.path.join(folder, "steering.safetensors"))
    for name in ("film", "encoder"):
        for key, value in getattr(policy, name).state_dict().items():
            assert torch.equal(steering[f"{name}.{key}"], value)
    assert checkpoint["step"] == load_checkpoint(os.path.join(short_run, "ckpt_best.pt"))["step"]


def test_a_lora_rank_of_zero_is_refused(toy_root, tmp_path):
    with pytest.raises(ConfigError, match="config key 'policy.lora.r': must be a positive number, got 0"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}/run", "--policy.lora.r=0"))


def test_toy_inputs_built_with_other_settings_are_not_reused_silently(toy_root, tmp_path):
    with pytest.raises(UserError, match=r"built with other settings: data.toy_pairs = 900 \(built with 800\)"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}/run", "--data.toy_pairs=900"))
    with pytest.raises(UserError, match=r"toy_model.hidden_size = 64 \(built with 32\)"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}/run", "--toy_model.hidden_size=64"))
    train_policy.main(small(toy_root, f"--out_dir={tmp_path}/run", "--seed=1", "--train.steps=2"))  # a new seed reuses them


# -----------------------------------------------------------------------------
# the steering world (train_policy.py's default): built small, the known-preference
# policy, the encoder warm-up, and evaluate.py's world metrics end to end


def world_args(root, *overrides):
    """A seconds-long run on a tiny steering world under `root`."""
    return [f"--data.pairs={root}/pairs.jsonl", f"--data.features={root}/features.npz",
            f"--data.preferences={root}/users.json", f"--policy.base={root}/base", "--data.generate",
            "--data.world_users=[40,6,6]", "--data.world_pairs_per_user=16", "--data.world_corpus=400",
            "--toy_model.hidden_size=32", "--toy_model.intermediate_size=64", "--toy_model.sft_steps=30",
            "--toy_model.sft_batch_size=32", "--policy.lora.r=4", "--policy.film.hidden=32",
            "--policy.encoder.hidden=32", "--train.steps=4", "--train.warmup_steps=1", "--train.batch_size=4",
            "--train.encoder_warmup_steps=0", "--eval.interval=2", "--eval.episodes=4", "--eval.context_sizes=[0,3]",
            *overrides]


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    runs = {name: os.path.join(root, name) for name in ("np", "dpo", "known")}
    train_policy.main(world_args(root, f"--out_dir={runs['np']}", "--policy.encoder.latent_dim=4"))
    train_policy.main(world_args(root, f"--out_dir={runs['dpo']}", "--policy.encoder.latent_dim=0"))
    train_policy.main(world_args(root, f"--out_dir={runs['known']}", "--policy.encoder.latent_dim=2",
                                 "--train.condition_on=preferences"))
    return root, runs


def test_world_inputs_hold_users_on_disjoint_topics(world_runs):
    import world
    root, _ = world_runs
    rows = text.read_text_pairs(f"{root}/pairs.jsonl")
    preferences = json.load(open(f"{root}/users.json"))
    answered = {}
    for row in rows:
        assert world.prompt_topic(row["prompt"]) in world.TOPICS[row["split"]]
        for user in row["choices"]:
            answered.setdefault(user, set()).add(row["split"])
            answered.setdefault(f"count {user}", []).append(1)
    users = [u for u in preferences]
    assert len(users) == 52 and all(answered[u] == {u.rstrip("0123456789")} for u in users)
    assert {len(answered[f"count {u}"]) for u in users} == {16}


def test_known_preference_policy_reads_the_true_preferences(world_runs):
    checkpoint = load_checkpoint(os.path.join(world_runs[1]["known"], "ckpt_last.pt"))
    assert "film" in checkpoint["model"] and "encoder" not in checkpoint["model"]
    assert checkpoint["policy_config"]["context_dim"] == 0
    policy, _ = policy_lib.load_policy(world_runs[1]["known"])
    assert policy_eval.policy_role(policy, checkpoint["config"]) == "known"


def test_known_preferences_must_match_the_latent_size(world_runs, tmp_path):
    root, _ = world_runs
    with pytest.raises(ConfigError, match="policy.encoder.latent_dim"):
        train_policy.main(world_args(root, f"--out_dir={tmp_path}/x", "--train.condition_on=preferences"))
    assert not os.path.exists(f"{tmp_path}/x")


def test_condition_on_preferences_needs_a_preference_file(toy_root, tmp_path):
    with pytest.raises(data.DataError, match="data.preferences"):
        train_policy.main(small(toy_root, f"--out_dir={tmp_path}/x", "--train.condition_on=preferences",
                                "--policy.encoder.latent_dim=2"))


def test_encoder_warm_up_trains_the_encoder_only_on_a_fresh_run(world_runs, tmp_path, monkeypatch):
    root, _ = world_runs
    calls = []
    real = train_policy.warm_up_encoder
    monkeypatch.setattr(train_policy, "warm_up_encoder", lambda *a: calls.append(1) or real(*a))
    args = ["--policy.encoder.latent_dim=4", "--train.steps=2", "--eval.interval=1"]
    train_policy.main(world_args(root, f"--out_dir={tmp_path}/cold", *args))
    train_policy.main(world_args(root, f"--out_dir={tmp_path}/warm", *args, "--train.encoder_warmup_steps=30"))
    cold, warm = (load_checkpoint(f"{tmp_path}/{n}/ckpt_last.pt")["model"]["encoder"] for n in ("cold", "warm"))
    assert calls == [1]
    assert any(not torch.equal(cold[k], warm[k]) for k in cold)
    train_policy.main(world_args(root, f"--out_dir={tmp_path}/warm", *args, "--train.encoder_warmup_steps=30",
                                 "--train.steps=3", "--resume"))
    assert calls == [1]  # a resumed run continues its own encoder


def test_evaluate_scores_the_world_for_every_policy(world_runs, tmp_path, capsys):
    _, runs = world_runs
    rows = evaluate.main([runs["np"], runs["dpo"], runs["known"], "--num-context=[0,3]", "--policy_eval.prompts=2",
                          "--policy_eval.samples=1", "--policy_eval.reference_samples=4",
                          "--policy_eval.interpolation_samples=1", "--policy_eval.repeats=1",
                          "--policy_eval.max_new_tokens=12", "--policy_eval.temperature=0.5", f"--out={tmp_path}"])
    by_model = {r["model"]: r for r in rows}
    out = capsys.readouterr().out
    assert by_model["reference"]["temperature"] == 0.5 and "sampled at temperature 0.5;" in out
    limit = [by_model["reference"][f"bayes_limit@{n}"] for n in (0, 3)]  # the Bayes limit of the n pairs
    assert all(len(v) == 2 and math.isfinite(v[0]) for v in limit) and "| Bayes limit: the response with" in out
    assert set(by_model) == {"reference", "np", "dpo", "known", "gold", "bayes"}
    assert {k for k in by_model["np"] if k.startswith("normalised@")} == {"normalised@0", "normalised@3"}
    assert "normalised@None" in by_model["dpo"] and "interpolation_length" in by_model["known"]
    assert {k for k in by_model["known"] if k.startswith("posterior_normalised@")} == {  # the few-shot ceiling
        "posterior_normalised@0", "posterior_normalised@3"}
    assert "implicit_conflict@3" in by_model["gold"] and "implicit_agree@0" in by_model["bayes"]
    assert json.load(open(tmp_path / "eval.json")) == json.loads(json.dumps(rows))


def test_evaluate_reranks_npdpo_by_a_reward_run_and_refuses_mistakes(world_runs, tmp_path, capsys, monkeypatch):
    """--rerank=RUN: each NP-DPO response is the best of rerank_samples draws by an NP-BTL on the same
    features (the known-preference policy is not reranked), the reference at reference_temperature.
    A policy run, a missing run, a BTL, --queries, a reward run to score, or a bad temperature is refused."""
    import train_reward
    from conftest import TINY
    root, runs = world_runs
    sel, btl = str(tmp_path / "sel"), str(tmp_path / "btl")
    for out, kind in ((sel, "np_btl"), (btl, "btl")):
        train_reward.main([f"--out_dir={out}", f"--data.path={root}/features.npz", "--data.synthetic=null", *TINY,
                           f"--model.kind={kind}", "--train.num_targets=4", "--eval.num_targets=4", "--train.steps=10"])
    common = ["--num-context=[0,2]", "--policy_eval.prompts=1", "--policy_eval.samples=1",
              "--policy_eval.reference_samples=2", "--policy_eval.interpolation_samples=1", "--policy_eval.repeats=1",
              "--policy_eval.max_new_tokens=8"]
    drawn, real = [], policy_eval.Reranker.scores
    monkeypatch.setattr(policy_eval.Reranker, "scores", lambda self, q, texts, contexts: drawn.append(
        (len(texts), len(contexts))) or real(self, q, texts, contexts))
    capsys.readouterr()
    rows = evaluate.main([runs["np"], runs["known"], f"--rerank={sel}", "--rerank_samples=3",
                          "--policy_eval.reference_temperature=0.1", *common, f"--out={tmp_path}/r"])
    out = capsys.readouterr().out
    assert "NP-DPO's response the best of 3 draws by" in out and "the reference sampled at temperature 0.1" in out
    ref = {r["model"]: r for r in rows}["reference"]
    assert ref["rerank"] == {"run": sel, "samples": 3, "latent": "encoder"} and ref["reference_temperature"] == 0.1
    assert drawn == [(6 * 3, 6)] * 2  # n = 0 and 2, one prompt, six test users: NP-DPO only
    for args, message in (([f"--rerank={runs['known']}"], "is a policy run; give a reward run"),
                          ([f"--rerank={tmp_path}/nothing"], "no such run dir"),
                          ([f"--rerank={btl}"], "reads no context"),
                          ([f"--rerank={sel}", "--queries=random"], "not --queries"),
                          ([f"--rerank={sel}", "--rerank_samples=0"], "must be a positive number"),
                          ([f"--rerank={sel}", "--rerank_latent=bayes"], "must be encoder or particles"),
                          (["--rerank_latent=particles"], "give --rerank=RUN"),
                          (["--policy_eval.reference_temperature=-1"], "must be positive, or 0 for the sampling")):
        with pytest.raises(UserError, match=message):
            evaluate.main([runs["np"], *args, *common, f"--out={tmp_path}/bad"])
    with pytest.raises(ConfigError, match="is for steering-world policy runs"):
        evaluate.main([sel, f"--rerank={sel}", f"--out={tmp_path}/bad"])
    assert not os.path.exists(tmp_path / "bad")


def test_rerank_refuses_a_reward_run_or_base_of_another_feature_space(world_runs, tmp_path, monkeypatch):
    """The draws are scored in the NP-BTL's feature space only if it was trained on the world's own features
    and the policies' base embeds the world's pairs as those features; either mismatch is a ConfigError.
    A stochastic NP-BTL (configs/steer_world_reranker.yaml) reranks, at its particles' posterior mean."""
    import numpy as np
    import train_reward
    from conftest import TINY
    root, runs = world_runs
    arrays = dict(np.load(f"{root}/features.npz"))
    arrays["pairs"] = np.where((arrays["split"] == "train")[:, None, None], -arrays["pairs"], arrays["pairs"])
    np.savez(tmp_path / "other.npz", **arrays)  # the same dimension, another space
    runs_of = {}
    for name, path in (("same", f"{root}/features.npz"), ("other", str(tmp_path / "other.npz"))):
        runs_of[name] = str(tmp_path / name)
        train_reward.main([f"--out_dir={runs_of[name]}", f"--data.path={path}", "--data.synthetic=null", *TINY,
                           "--train.num_targets=4", "--eval.num_targets=4", "--train.steps=5",
                           "--model.encoder.stochastic=true"])  # the reranker's config: q(z | context), at its mean
    common = ["--num-context=[0]", "--policy_eval.prompts=1", "--policy_eval.samples=1", "--rerank_samples=2",
              "--policy_eval.reference_samples=2", "--policy_eval.interpolation_samples=1", "--policy_eval.repeats=1",
              "--policy_eval.max_new_tokens=4"]
    with pytest.raises(ConfigError, match="whose train and val features are not those of"):
        evaluate.main([runs["np"], f"--rerank={runs_of['other']}", *common, f"--out={tmp_path}/bad"])
    real = text.embed_pairs
    monkeypatch.setattr(text, "embed_pairs", lambda *args, **kw: -real(*args, **kw))
    with pytest.raises(ConfigError, match="does not embed the world's pairs"):
        evaluate.main([runs["np"], f"--rerank={runs_of['same']}", *common, f"--out={tmp_path}/bad"])
    monkeypatch.setattr(text, "embed_pairs", real)
    import particles
    calls, real_posterior = [], particles.posterior_latent
    monkeypatch.setattr(particles, "posterior_latent", lambda model, contexts, latents, *a: calls.append(
        latents.shape) or real_posterior(model, contexts, latents, *a))
    evaluate.main([runs["np"], f"--rerank={runs_of['same']}", "--rerank_latent=particles", "--particle_latents=64",
                   *common, f"--out={tmp_path}/good"])
    assert calls and all(shape[0] == 64 for shape in calls)  # each user's latent: 64 training users' posterior
    assert not os.path.exists(tmp_path / "bad")
    with open(tmp_path / "good" / "eval.json") as f:
        ref = {r["model"]: r for r in json.load(f)}["reference"]
    assert ref["rerank"] == {"run": runs_of["same"], "samples": 2, "latent": "particles"}


def test_embedded_responses_are_the_options_features_of_embed_pairs(world_runs):
    """The reranker embeds a draw exactly as the context features embed a pair's option."""
    root, _ = world_runs
    tokenizer, model, pooling = text.load_embedder(f"{root}/base", "cpu")
    responses = ["owls exist .", "owls exist . owls are kind ."]
    pairs = text.embed_pairs([{"prompt": "Describe owls.", "response_a": r, "response_b": "x"} for r in responses],
                             tokenizer, model, pooling)
    assert torch.allclose(text.embed_responses("Describe owls.", responses, tokenizer, model, pooling), pairs[:, 0],
                          atol=1e-5)


def test_evaluate_queries_on_the_world_scores_npdpo_and_the_ceiling(world_runs, tmp_path, capsys):
    """evaluate.py --queries on world policies: NP-DPO and the known-preference policy at the
    posterior mean of the same answers, per run, and a mean ± sd table over training seeds."""
    root, runs = world_runs
    seed1 = str(tmp_path / "np_s1")
    train_policy.main(world_args(root, f"--out_dir={seed1}", "--policy.encoder.latent_dim=4", "--seed=1"))
    capsys.readouterr()
    rows = evaluate.main([runs["np"], seed1, runs["known"], "--queries=random", "--num-context=[0,2]",
                          "--policy_eval.prompts=1", "--policy_eval.samples=1", "--policy_eval.reference_samples=2",
                          "--policy_eval.max_new_tokens=8", f"--out={tmp_path}/q"])
    assert {(r["model"], r["questions"]) for r in rows} == {
        (m, n) for m in ("np", "np_s1", "known@posterior", "Bayes limit") for n in (0, 2)}
    for r in rows:  # each test user's score is kept, so paired gaps can be recomputed from queries.json
        assert len(r["normalised_users"]) == 6 and statistics.mean(r["normalised_users"]) == pytest.approx(
            r["normalised"])
    out = capsys.readouterr().out
    assert "| Bayes limit (the best decision given the answers) | random |" in out
    assert "mean ± sd over training seeds" in out
    assert "sampled at temperature 1\n" in out and {r["temperature"] for r in rows} == {1.0}
    per_seed = {n: [100 * r["normalised"] for r in rows if r["model"] in ("np", "np_s1") and r["questions"] == n]
                for n in (0, 2)}
    expected = " | ".join(f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" for v in per_seed.values())
    assert f"| np | random | {expected} |" in out  # the two seeds pooled
    assert "| known (few-shot ceiling: z = posterior mean) | random |" not in out  # one seed: no sd


def test_evaluate_queries_on_the_world_from_a_pool_of_the_split(world_runs, tmp_path, capsys):
    """--query.world_pool=N: questions from N pairs of the split, answered by the simulated user;
    a pool smaller than the largest n, or one on reward-style keys, is one error line."""
    root, runs = world_runs
    common = ["--num-context=[0,2]", "--policy_eval.prompts=1", "--policy_eval.samples=1",
              "--policy_eval.reference_samples=2", "--policy_eval.max_new_tokens=8"]
    rows = evaluate.main([runs["np"], runs["known"], "--queries=random", "--query.world_pool=12", *common,
                          f"--out={tmp_path}/q"])
    assert {(r["model"], r["questions"]) for r in rows} == {
        (m, n) for m in ("np", "known@posterior", "Bayes limit") for n in (0, 2)}
    with pytest.raises(ConfigError, match="steered by answers"):  # plain DPO reads no answers
        evaluate.main([runs["dpo"], "--queries=random", *common, f"--out={tmp_path}/bad"])
    for args, message in ((["--queries=random", "--query.world_pool=1"], "at least the largest num_context, 2"),
                          (["--query.world_pool=12"], "is for --queries on steering-world policies"),
                          (["--queries=random", "--query.world_pool=100000"], "world_pool = 100000, but split")):
        with pytest.raises(ConfigError, match=message):
            evaluate.main([runs["np"], *args, *common, f"--out={tmp_path}/bad"])
    assert not os.path.exists(tmp_path / "bad")


def test_evaluate_on_more_test_users_of_the_same_world_refuses_another(world_runs, tmp_path, capsys):
    """prepare/steer_world.py builds a run's world again with more test users, and evaluate.py
    --world_data scores them (its users, not the runs' own); another world (other training
    pairs) or a folder without its files is one error line, and nothing is written."""
    import shutil
    root, runs = world_runs
    build = ["steer_world", f"--run={runs['np']}", "--test_users=9"]
    prepare_main([*build, f"--out={tmp_path}/more"])
    built = folder_hashes(tmp_path / "more")
    for args, error, message in (([f"--out={tmp_path}/more"], ConfigError, "exists"),
                                 ([f"--out={tmp_path}/other", "--seed=1"], data.DataError, "--seed=1 builds another"),
                                 ([f"--out={runs['np']}", "--overwrite"], ConfigError, "holds other files"),
                                 ([f"--out={root}", "--overwrite"], ConfigError, "is the world")):
        with pytest.raises(error, match=message):
            prepare_main([*build, *args])
    assert folder_hashes(tmp_path / "more") == built and os.listdir(tmp_path) == ["more"]  # no half-built folder
    assert os.path.isfile(os.path.join(runs["np"], "ckpt_best.pt")) and os.path.isfile(f"{root}/pairs.jsonl")
    shutil.copytree(tmp_path / "more", tmp_path / "other")  # another world: one training answer differs
    rows = text.read_text_pairs(f"{tmp_path}/other/pairs.jsonl")
    train = next(r for r in rows if r["split"] == "train")
    user = next(iter(train["choices"]))
    train["choices"][user] = 1 - train["choices"][user]
    text.write_text_pairs(f"{tmp_path}/other/pairs.jsonl", rows)
    common = ["--queries=random", "--num-context=[0,2]", "--policy_eval.prompts=1", "--policy_eval.samples=1",
              "--policy_eval.reference_samples=2", "--policy_eval.max_new_tokens=8"]
    capsys.readouterr()
    rows = evaluate.main([runs["np"], f"--world_data={tmp_path}/more", *common, f"--out={tmp_path}/q"])
    assert "split 'test', 9 users" in capsys.readouterr().out
    assert sorted((r["model"], r["questions"]) for r in rows) == [("Bayes limit", 0), ("Bayes limit", 2), ("np", 0), ("np", 2)]
    evaluate.main([runs["np"], *common, f"--out={tmp_path}/q0"])
    assert "split 'test', 6 users" in capsys.readouterr().out
    for folder, message in (("other", "are not those of"), ("missing", "missing/pairs.jsonl not found"),
                            ("more/pairs.jsonl", "is a file: give the folder")):
        with pytest.raises(data.DataError, match=message):
            evaluate.main([runs["np"], f"--world_data={tmp_path}/{folder}", *common, f"--out={tmp_path}/bad"])
    assert not os.path.exists(tmp_path / "bad")


def test_policy_questions_under_the_selectors_particles(world_runs, tmp_path, monkeypatch):
    """--query.belief=adaptive on policies: the selector's belief is built with adaptive particles of
    the training users of the policies' features (run_belief's arguments), and it chooses."""
    import queries
    root, runs = world_runs
    made, asked = [], []

    class Chooser:
        def infogain(self, context, mask, cand, targets):
            asked.append(cand.shape)
            return torch.zeros(cand.shape[:2])

    monkeypatch.setattr(policy_eval, "check_runs", lambda paths: None)
    monkeypatch.setattr(queries, "run_belief", lambda *a, **k: made.append(k) or Chooser())
    evaluate.main([runs["np"], "--queries=infogain", "--query.selector=sel", "--query.belief=adaptive",
                   "--query.particles=8", "--particle_latents=256", "--num-context=[0,1]", "--policy_eval.prompts=1", "--policy_eval.samples=1",
                   "--policy_eval.reference_samples=2", "--policy_eval.max_new_tokens=8", f"--out={tmp_path}/q"])
    assert made[0]["adaptive"] is True and made[0]["particles"] == 8 and made[0]["data"].dim > 0
    assert made[0]["latents"] == 256  # --particle_latents, not ignored
    assert len(asked) > 0


def test_active_contexts_come_from_the_selectors_questions_and_mistakes_are_refused(world_runs, tmp_path, monkeypatch, capsys):
    """train.active_selector: a reward run on the same features chooses each training user's first
    questions (queries.active_positions), and the share of episodes it is given reads them, in the
    warm-up and in DPO; a missing selector or a policy that reads no context is refused up front."""
    import queries
    import train_reward
    from conftest import TINY
    root, _ = world_runs
    sel = str(tmp_path / "sel")
    train_reward.main([f"--out_dir={sel}", f"--data.path={root}/features.npz", "--data.synthetic=null", *TINY,
                       "--train.num_targets=4", "--eval.num_targets=4"])
    samplers, drawn = [], []
    real_positions, real_sample = queries.active_positions, data.EpisodeSampler.sample
    monkeypatch.setattr(queries, "active_positions", lambda b, s, *a, **k: samplers.append(s) or real_positions(
        b, s, *a, **k))
    monkeypatch.setattr(data.EpisodeSampler, "sample", lambda self, *a, **k: drawn.append(
        (self, real_sample(self, *a, **k))) or drawn[-1][1])
    args = ["--policy.encoder.latent_dim=4", "--train.encoder_warmup_steps=3", f"--train.active_selector={sel}",
            "--train.active_fraction=1.0"]
    train_policy.main(world_args(root, f"--out_dir={tmp_path}/np", *args))
    assert "active contexts: 10 questions to each of 40 train users" in capsys.readouterr().out
    sampler = samplers[0]
    train = [b for s, b in drawn if s is sampler]
    assert len(train) == 3 + 4  # warm-up and DPO steps
    for batch in train:  # every episode's context is the user's first questions, in order
        n = batch["context_mask"].shape[1]
        assert torch.equal(batch["pair_idx"][:, :n], sampler.table[batch["label_rows"][:, None],
                                                                   sampler.active[batch["label_rows"]]][:, :n])
    for bad, message in (([f"--train.active_selector={tmp_path}/nope"], "no such run dir"),
                         ([f"--train.active_selector={sel}", "--policy.encoder.latent_dim=0"], "reads none"),
                         ([f"--train.active_selector={sel}", "--train.active_fraction=0"], "active_fraction")):
        with pytest.raises(UserError, match=message):
            train_policy.main(world_args(root, f"--out_dir={tmp_path}/bad", *bad))
    assert not os.path.exists(f"{tmp_path}/bad")
