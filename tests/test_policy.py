import copy
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

import data
import policy as policy_lib
import train_policy
import train_reward
from common import ConfigError, load_checkpoint, run_script, save_checkpoint
from conftest import REPO, TINY, small
from policy import (DEFAULTS, SteerablePolicy, add_lora, build_base_model, concatenate_pairs, dpo_loss,
                    dpo_step, load_policy, pair_logprobs, save_policy, sequence_logprob)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21

VOCAB, CONTEXT_DIM, LATENT_DIM = 100, 6, 8
ARCHS = ("gpt2", "llama", "qwen2")


def tiny_config(arch):
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **common)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **common)


def policy_config(latent_dim=LATENT_DIM, **film):
    config = copy.deepcopy(DEFAULTS)
    config["base"] = "<memory>"
    config["lora"].update(r=4, alpha=8, dropout=0.0)
    config["film"].update(latent_dim=latent_dim, hidden=16, **film)
    config["encoder"].update(hidden=16)
    return config


def tiny_base(arch, seed=0):
    torch.manual_seed(seed)
    return build_base_model(tiny_config(arch)).eval()


def make_policy(arch, config=None, context_dim=CONTEXT_DIM, seed=0):
    base = tiny_base(arch, seed)
    return SteerablePolicy(base, config or policy_config(), context_dim).eval()


def perturb(policy, scale=0.2, seed=1):
    """Every trained tensor (LoRA, FiLM, encoder) set away from its identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=generator))


def token_batch(rows=3, length=7, seed=2):
    return torch.randint(2, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def latents(rows, seed=3):
    return torch.randn(rows, LATENT_DIM, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# parity with the base model


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_init_equals_base(arch):
    base, input_ids = tiny_base(arch), token_batch()
    with torch.no_grad():
        expected = base(input_ids=input_ids).logits
        policy = SteerablePolicy(base, policy_config(), CONTEXT_DIM).eval()
        got = policy(input_ids, latent=latents(3))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_mode_equals_base_after_training(arch):
    base, input_ids = tiny_base(arch), token_batch()
    with torch.no_grad():
        expected = base(input_ids=input_ids).logits
        policy = SteerablePolicy(base, policy_config(), CONTEXT_DIM).train()
        perturb(policy)
        assert not torch.allclose(policy(input_ids, latent=latents(3)), expected, atol=1e-3)
        with policy.conditioned(latents(3)):  # an outer latent must not leak into the reference
            with policy.reference_mode():
                reference = policy(input_ids)
    assert torch.equal(reference, expected)
    assert policy.training and policy.lm.training  # reference_mode restores the mode


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_of_one_row_changes_only_that_row(arch):
    policy, input_ids, z = make_policy(arch), token_batch(), latents(3)
    perturb(policy)
    z_changed = z.clone()
    z_changed[1] += 1.0
    with torch.no_grad():
        before, after = policy(input_ids, latent=z), policy(input_ids, latent=z_changed)
    assert torch.allclose(before[[0, 2]], after[[0, 2]], atol=1e-6)
    assert (before[1] - after[1]).abs().max() > 1e-3


def test_conditioned_context_equals_latent_argument_and_clears():
    policy, input_ids, z = make_policy("llama"), token_batch(), latents(3)
    perturb(policy)
    with torch.no_grad():
        with policy.conditioned(z):
            inside = policy(input_ids)
        assert torch.equal(inside, policy(input_ids, latent=z))
        assert policy._film_state is None
        with policy.reference_mode():
            reference = policy(input_ids)
        assert not torch.allclose(policy(input_ids), reference, atol=1e-4)  # LoRA on outside reference_mode
        with pytest.raises(KeyError):
            with policy.conditioned(z):
                raise KeyError("boom")
    assert policy._film_state is None


# -----------------------------------------------------------------------------
# log-probabilities and the DPO loss


def test_sequence_logprob_matches_hand_loop():
    torch.manual_seed(0)
    B, T, V = 3, 8, 11
    logits, labels = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    prompt_lengths, total_lengths = [1, 2, 4], [5, 8, 6]  # right padding after total_lengths
    response_mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        response_mask[b, prompt_lengths[b]:total_lengths[b]] = True
        labels[b, total_lengths[b]:] = -100  # padding ids out of the vocabulary are fine
    expected = torch.zeros(B)
    for b in range(B):
        for t in range(prompt_lengths[b], total_lengths[b]):
            expected[b] += torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
    assert torch.allclose(sequence_logprob(logits, labels, response_mask), expected, atol=1e-5)


def test_sequence_logprob_rejects_response_at_position_zero():
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprob(torch.randn(1, 4, 5), torch.zeros(1, 4, dtype=torch.long), mask)


def pair_batch(prompt_lengths=(2, 4), chosen_lengths=(3, 1), rejected_lengths=(5, 2), seed=4):
    """Right-padded chosen/rejected rows with different prompt and response lengths."""
    generator = torch.Generator().manual_seed(seed)
    batch, episodes = {}, []
    for side, lengths in (("chosen", chosen_lengths), ("rejected", rejected_lengths)):
        T = max(p + r for p, r in zip(prompt_lengths, lengths)) + 1  # one extra pad column
        ids = torch.zeros(len(lengths), T, dtype=torch.long)
        attention, response = torch.zeros_like(ids), torch.zeros(len(lengths), T, dtype=torch.bool)
        for b, (p, r) in enumerate(zip(prompt_lengths, lengths)):
            ids[b, :p + r] = torch.randint(2, VOCAB, (p + r,), generator=generator)
            attention[b, :p + r], response[b, p:p + r] = 1, True
            episodes.append((side, b, ids[b, :p + r], p))
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_response_mask": response})
    return batch, episodes


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_pair_logprobs_equal_unpadded_episodes(arch):
    policy, (batch, episodes), z = make_policy(arch), pair_batch(), latents(2)
    perturb(policy)
    with torch.no_grad():
        chosen, rejected = pair_logprobs(policy, batch, z)
        for side, b, ids, prompt_length in episodes:
            mask = torch.arange(len(ids)) >= prompt_length
            logits = policy(ids[None], latent=z[b:b + 1])
            alone = sequence_logprob(logits, ids[None], mask[None])[0]
            assert torch.allclose({"chosen": chosen, "rejected": rejected}[side][b], alone, atol=1e-5)


def test_concatenate_pairs_pads_to_common_length():
    batch, _ = pair_batch()
    input_ids, attention_mask, response_mask = concatenate_pairs(batch)
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    assert input_ids.shape == attention_mask.shape == response_mask.shape == (4, T)
    assert response_mask.sum() == batch["chosen_response_mask"].sum() + batch["rejected_response_mask"].sum()


def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.5, -2.0])
    rc, rr = torch.tensor([-3.5, -5.0, -1.0]), torch.tensor([-3.0, -4.0, -1.5])
    beta = 0.1
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta)
    margins = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item() for i in range(3)]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item())
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item())
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / 3)
    assert metrics["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert metrics["logps/chosen"] == pytest.approx(pc.mean().item())
    assert metrics["logps/rejected"] == pytest.approx(pr.mean().item())


def test_dpo_step_starts_at_log2_and_trains_every_part():
    policy, (batch, _) = make_policy("qwen2"), pair_batch()
    batch["context"] = torch.randn(2, 3, 2, CONTEXT_DIM)
    batch["context_mask"] = torch.tensor([[True, True, False], [False, False, False]])  # n = 2 and n = 0
    loss, metrics = dpo_step(policy, batch, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at init
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    perturb(policy)
    loss, _ = dpo_step(policy, batch, beta=0.1)
    loss.backward()
    for part in (policy.encoder, policy.film):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    lora = [p for n, p in policy.lm.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert all(p.grad is None for p in policy.parameters() if not p.requires_grad)


def test_plain_dpo_has_no_film_and_takes_no_latent():
    policy, (batch, _) = make_policy("gpt2", policy_config(latent_dim=0)), pair_batch()
    assert policy.film is None and policy.encoder is None
    loss, _ = dpo_step(policy, batch, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="no FiLM"):
        policy(token_batch(), latent=latents(3))
    with pytest.raises(ValueError, match="no context encoder"):
        policy.infer_latent(torch.randn(1, 2, 2, CONTEXT_DIM))


# -----------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("arch", ARCHS)
def test_conditioned_greedy_generation_cache_equals_no_cache(arch):
    policy, prompts, z = make_policy(arch), token_batch(rows=2, length=5), latents(2)
    perturb(policy, scale=0.3)
    attention_mask = torch.ones_like(prompts)
    prompts[0, :2], attention_mask[0, :2] = 0, 0  # row 0 is a 3-token prompt, left-padded
    greedy = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    cached = policy.generate(prompts, attention_mask, latent=z, use_cache=True, **greedy)
    uncached = policy.generate(prompts, attention_mask, latent=z, use_cache=False, **greedy)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)
    for row, start in ((0, 2), (1, 0)):  # each row alone, unpadded, with its own latent
        alone = policy.generate(prompts[row:row + 1, start:], latent=z[row:row + 1], **greedy)
        assert torch.equal(alone[0, -8:], cached[row, -8:])


def test_generation_repeats_latents_for_return_sequences():
    policy, prompts, z = make_policy("llama"), token_batch(rows=2, length=5), latents(2)
    perturb(policy, scale=0.3)
    common = dict(attention_mask=torch.ones_like(prompts), latent=z, max_new_tokens=6, min_new_tokens=6)
    greedy = policy.generate(prompts, do_sample=False, **common)
    torch.manual_seed(0)
    sampled = policy.generate(prompts, do_sample=True, num_return_sequences=2, **common)
    assert sampled.shape == (4, 11)
    top1 = policy.generate(prompts, do_sample=True, top_k=1, num_return_sequences=2, **common)
    assert torch.equal(top1, greedy.repeat_interleave(2, dim=0))  # copies of prompt b used latent b


def test_latent_batch_mismatch_is_an_error():
    policy = make_policy("gpt2")
    with pytest.raises(ValueError, match="latent has 2 rows but the model runs a batch of 3"):
        policy(token_batch(rows=3), latent=latents(2))
    with pytest.raises(ValueError, match=r"generate\(\) got 1 latent rows for 3 prompts"):
        policy.generate(token_batch(rows=3), latent=latents(1), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"latent must be \(batch, 8\)"):
        policy(token_batch(rows=3), latent=torch.zeros(3, 5))
    assert policy._film_state is None


def test_conditioned_inside_reference_mode_is_an_error():
    policy = make_policy("gpt2")
    with policy.reference_mode(), pytest.raises(RuntimeError, match="inside reference_mode"):
        policy(token_batch(), latent=latents(3))


# -----------------------------------------------------------------------------
# memory, checkpoints, configuration


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_holds_one_copy_of_the_base_weights(arch):
    policy, fresh_base = make_policy(arch), tiny_base(arch)
    lora = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    r = policy.config["lora"]["r"]
    adapted = [m for m in policy.lm.modules() if hasattr(m, "lora_A")]  # peft's LoRA layers
    expected_lora = sum(r * (m.in_features + m.out_features) for m in adapted)
    assert sum(p.numel() for p in lora.values()) == expected_lora > 0
    assert parameter_count(policy) == (parameter_count(fresh_base) + expected_lora
                                       + parameter_count(policy.film) + parameter_count(policy.encoder))
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    assert frozen == parameter_count(fresh_base)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_load_reproduces_logprobs_and_saves_only_trained(arch, tmp_path):
    tiny_base(arch).save_pretrained(tmp_path / "base")
    config = policy_config()
    config["base"] = str(tmp_path / "base")
    policy = SteerablePolicy(build_base_model(config["base"]), config, CONTEXT_DIM).eval()
    perturb(policy)
    batch, _ = pair_batch()
    with torch.no_grad():
        expected = pair_logprobs(policy, batch, latents(2))
    save_policy(tmp_path / "ckpt.pt", policy, step=7)

    loaded, checkpoint = load_policy(tmp_path / "ckpt.pt")
    with torch.no_grad():
        got = pair_logprobs(loaded.eval(), batch, latents(2))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert checkpoint["step"] == 7

    saved = [t for part in checkpoint["model"].values() for t in part.values()]
    trained = [p for p in policy.parameters() if p.requires_grad]
    assert len(saved) == len(trained)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes == sum(p.numel() * p.element_size() for p in trained)
    assert (tmp_path / "ckpt.pt").stat().st_size < saved_bytes + 64_000  # tensors plus pickle overhead
    assert all("lora_" in key for key in checkpoint["model"]["lora"])


def test_load_policy_rejects_other_checkpoints(tmp_path):
    save_checkpoint(str(tmp_path / "reward.pt"), {"model": {}, "config": {}, "step": 0})
    with pytest.raises(RuntimeError, match="not a policy checkpoint"):
        load_policy(str(tmp_path / "reward.pt"))


def test_unknown_architecture_needs_lora_targets():
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)
    with pytest.raises(ConfigError, match="policy.lora.targets"):
        add_lora(build_base_model(config), policy_config()["lora"])
    lora = dict(policy_config()["lora"], targets=["query_key_value"])
    policy_config_neox = policy_config()
    policy_config_neox["lora"] = lora
    policy = SteerablePolicy(build_base_model(config), policy_config_neox, CONTEXT_DIM)
    assert policy(token_batch(), latent=latents(3)).shape == (3, 7, VOCAB)


def test_film_layer_selection():
    policy = make_policy("llama", policy_config(layers=[-1]))
    assert policy.film.num_layers == 1
    with pytest.raises(ConfigError, match="policy.film.layers"):
        make_policy("llama", policy_config(layers=[0, 2]))


def test_stochastic_encoder_gives_the_posterior_mean():
    config = policy_config()
    config["encoder"]["stochastic"] = True
    policy = make_policy("gpt2", config)
    context = torch.randn(2, 3, 2, CONTEXT_DIM)
    mean, _ = policy.encoder(context)
    assert torch.equal(policy.infer_latent(context), mean) and mean.shape == (2, LATENT_DIM)


def test_gradient_checkpointing_gives_the_same_gradients():
    policy, (batch, _), z = make_policy("llama"), pair_batch(), latents(2)
    perturb(policy)
    policy.train()

    def gradients():
        policy.zero_grad()
        chosen, rejected = pair_logprobs(policy, batch, z)  # the conditioned block closes here
        (chosen - rejected).sum().backward()
        return [p.grad.clone() for p in [*policy.lm.parameters(), *policy.film.parameters()] if p.requires_grad]

    expected = gradients()
    calls = []
    contexts = policy._checkpoint_contexts
    policy._checkpoint_contexts = lambda: calls.append(1) or contexts()
    policy.enable_gradient_checkpointing()
    got = gradients()
    assert len(calls) == 2  # each of the 2 decoder layers was checkpointed
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))


def test_model_code_shipped_with_a_checkpoint_runs_only_when_the_config_allows_it(tmp_path):
    """A model folder whose config maps to its own Python files: loading it for the policy or
    for embedding refuses, and its code never runs, unless trust_remote_code is set."""
    import data

    marker = tmp_path / "code_ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
              "class SneakyConfig(PretrainedConfig):\n    model_type = 'sneaky'\n"
    folder = tmp_path / "sneaky_model"
    folder.mkdir()
    (folder / "configuration_sneaky.py").write_text(payload)
    (folder / "modeling_sneaky.py").write_text(payload)
    auto_map = {"AutoConfig": "configuration_sneaky.SneakyConfig", "AutoModel": "modeling_sneaky.SneakyModel",
                "AutoModelForCausalLM": "modeling_sneaky.SneakyModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "sneaky", "auto_map": auto_map}))
    for load in (lambda: build_base_model(str(folder)), lambda: data.load_embedder(str(folder), "cpu")):
        with pytest.raises(ValueError, match="contains custom code"):
            load()
    assert not marker.exists()
    with pytest.raises(Exception):  # the payload is live: with trust it runs (then fails, having no model)
        build_base_model(str(folder), trust_remote_code=True)
    assert marker.exists()


# -----------------------------------------------------------------------------
# the steering CLI

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
    tokenizer = data.toy_tokenizer()
    build_base_model(train_policy.toy_base_config(m, len(tokenizer))).save_pretrained(folder)
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
    train_policy.main([*small(toy_root, "--policy.film.latent_dim=0", "--train.steps=10", "--eval.interval=10"),
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
    "no-run": ([], None, "usage: python policy.py RUN --prompt=TEXT [--context=FILE.jsonl]"),
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
    "run-folder-empty": (["{tmp}", "--prompt=describe tea ."], None,
                         "{tmp}: no ckpt_best.pt in this folder (give the out_dir of a train_policy.py run)"),
    "run-without-best": (["{only_last}", "--prompt=describe tea ."], None,
                         "{only_last}: no ckpt_best.pt in this folder (a run writes it at its first validation; "
                         "give {only_last}/ckpt_last.pt for its last step)"),
    "reward-run": (["{reward}", "--prompt=describe tea ."], None, "{reward} is a reward run, not a policy run "
                   "(made by train_reward.py; policy.py steers the runs of train_policy.py)"),
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
    monkeypatch.setattr(sys, "argv", ["policy.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_script(policy_lib.main)
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert tree_hashes(cli_runs["root"], toy_root, tmp_path) == before


def run_cli(*argv, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "policy.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


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


def test_cli_runs_from_another_folder_with_the_example_context_and_a_natural_prompt(cli_runs, toy_root, tmp_path):
    """The run's relative paths resolve from where it was trained; capitals and attached punctuation read."""
    before = tree_hashes(cli_runs["root"], toy_root)
    result = run_cli(cli_runs["np"], f"--context={EXAMPLE_CONTEXT}", "--prompt=Tell me about bees.", "--samples=2",
                     "--max_new_tokens=20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"steered by 4 choices of 'me' from {EXAMPLE_CONTEXT}"
    responses = result.stdout.strip().splitlines()
    vocabulary = set(data.toy_vocabulary())
    assert len(responses) == 2 and all(r.split() and set(r.split()) <= vocabulary for r in responses)
    assert tree_hashes(cli_runs["root"], toy_root) == before and os.listdir(tmp_path) == []


def test_cli_help_prints_the_usage(capsys):
    policy_lib.main(["--help"])
    assert capsys.readouterr().out == policy_lib.USAGE + "\n"


def test_cli_plain_dpo_needs_no_context_and_notes_one_given(cli_runs, capsys):
    policy_lib.main([cli_runs["dpo"], "--prompt=What about cats?", "--samples=2", "--max_new_tokens=10"])
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2 and err == ""
    policy_lib.main([cli_runs["dpo"], "--prompt=What about cats?", f"--context={EXAMPLE_CONTEXT}",
                     "--max_new_tokens=5"])
    note = f"note: {cli_runs['dpo']} is plain DPO (no context encoder): --context is ignored\n"
    assert capsys.readouterr().err == note


def sentences(text):
    return len([s for s in text.split(".") if s.strip()])


def test_cli_steers_response_length_toward_the_user(cli_runs, toy_root, tmp_path, capsys):
    """The same 8 context pairs, chosen as a concise user would, then as a detailed one: with the
    same seed, the responses are shorter, then longer (the toy world's two users differ in length)."""
    rows = [r for r in data.read_text_pairs(f"{toy_root}/pairs.jsonl")
            if r["split"] == "train" and r["choices"]["concise"] != r["choices"]["detailed"]][:8]
    lengths = {}
    for user in ("concise", "detailed"):
        path = write_context(tmp_path / f"{user}.jsonl", [dict(r, choices={"me": r["choices"][user]}) for r in rows])
        policy_lib.main([cli_runs["np"], f"--context={path}", "--prompt=Describe tea.", "--samples=16",
                         "--max_new_tokens=40", "--seed=0"])
        responses = capsys.readouterr().out.strip().splitlines()
        assert len(responses) == 16
        lengths[user] = sum(map(sentences, responses)) / len(responses)
    assert lengths["concise"] + 1 < lengths["detailed"], lengths  # sentences per response


INTERRUPT_DURING_GENERATION = """
import sys
import common, policy
generate = policy.SteerablePolicy.generate
def endless(self, *args, **kwargs):  # real generation, over and over, until Ctrl-C
    print("generating", file=sys.stderr, flush=True)
    while True:
        generate(self, *args, **kwargs)
policy.SteerablePolicy.generate = endless
common.run_script(policy.main)
"""


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
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and out == ""
    assert err.strip() == "interrupted" and "Traceback" not in err


# -----------------------------------------------------------------------------
# the dialogue: policy.py --ask, driven through stdin


@pytest.fixture(scope="module")
def selector(toy_root, tmp_path_factory):
    """A tiny NP-BTL on the toy world's context features: it chooses the policy's questions."""
    out = str(tmp_path_factory.mktemp("selector") / "run")
    train_reward.main([f"--out_dir={out}", f"--data.path={toy_root}/features.npz", "--data.synthetic=null", *TINY])
    return out


def ask_cli(monkeypatch, capsys, answers, *argv):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers))
    policy_lib.main(list(argv))
    return capsys.readouterr()


def test_dialogue_asks_saves_and_resumes(cli_runs, selector, monkeypatch, capsys, tmp_path):
    save = str(tmp_path / "me.jsonl")
    out, err = ask_cli(monkeypatch, capsys, "1\ns\n2\n", cli_runs["np"], "--ask=2", f"--selector={selector}",
                       "--prompt=Tell me about bees.", f"--save={save}", "--max_new_tokens=8", "--pool=50")
    assert out.count("Question 1 of 2") == 1 and out.count("Question 2 of 2") == 2 and err == ""
    assert "  1. " in out and "  2. " in out and "steered by 2 answers" in out
    assert out.strip().splitlines()[-1].split()  # the steered response, last
    rows, label = policy_lib.read_context(save)  # the documented context format
    assert label == "me" and [r["choices"]["me"] for r in rows] == [0, 1]
    out, _ = ask_cli(monkeypatch, capsys, "1\n", cli_runs["np"], "--ask=3", f"--selector={selector}",
                     f"--context={save}", f"--save={save}", "--prompt=Tell me about bees.", "--max_new_tokens=8",
                     "--pool=50")
    assert "starting from 2 answers" in out and out.count("Question 1 of 1") == 1
    assert len(policy_lib.read_context(save)[0]) == 3
    asked = [r["prompt"] + r["response_a"] for r in policy_lib.read_context(save)[0]]
    assert len(set(asked)) == 3  # an answered question is not asked again


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
    monkeypatch.setattr(sys, "argv", ["policy.py", *(a.format(**paths) for a in args), "--prompt=Tell me about bees."])
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n1\n"))
    with pytest.raises(SystemExit) as exit_info:
        run_script(policy_lib.main)
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert os.listdir(tmp_path) == []


def test_a_new_users_features_equal_the_training_features(cli_runs, toy_root):
    """The CLI embeds a person's pairs as preparation embedded the training pairs: the same
    features for the same pairs, so the same latent."""
    checkpoint = load_checkpoint(cli_runs["np"])
    rows = data.read_text_pairs(f"{toy_root}/pairs.jsonl")[:5]
    here = os.getcwd()
    os.chdir(checkpoint["cwd"])
    try:
        features, _ = policy_lib.context_features(checkpoint, rows, "rows", "cpu")
    finally:
        os.chdir(here)
    stored = data.load_pairs(f"{toy_root}/features.npz").pairs[:5]
    assert torch.allclose(features, stored, atol=1e-5)
