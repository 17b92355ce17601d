import copy
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

import text
from common import ConfigError
from policy import (DEFAULTS, SteerablePolicy, add_lora, build_base_model, concatenate_pairs, dpo_loss, dpo_step,
                    load_policy, pair_logprobs, save_policy, sequence_logprob)
from runs import save_checkpoint

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
    config["film"].update(hidden=16, **film)
    config["encoder"].update(hidden=16, latent_dim=latent_dim)
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


def saved_base_policy(arch, folder):
    """A perturbed policy on a base saved in folder/base, its config, a batch and its log-probs."""
    tiny_base(arch).save_pretrained(folder / "base")
    config = dict(policy_config(), base=str(folder / "base"))
    policy = SteerablePolicy(build_base_model(config["base"]), config, CONTEXT_DIM).eval()
    perturb(policy)
    batch, _ = pair_batch()
    with torch.no_grad():
        expected = pair_logprobs(policy, batch, latents(2))
    return policy, config, batch, expected


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_load_reproduces_logprobs_and_saves_only_trained(arch, tmp_path):
    policy, config, batch, expected = saved_base_policy(arch, tmp_path)
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


def test_a_run_saved_with_latent_dim_under_film_still_loads(tmp_path):
    """Runs saved before latent_dim moved from policy.film to policy.encoder (the reward
    model's layout) load as they were: the same log-probs."""
    policy, config, batch, expected = saved_base_policy("gpt2", tmp_path)
    save_policy(tmp_path / "ckpt.pt", policy, config={"policy": config})
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for old in (checkpoint["policy_config"], checkpoint["config"]["policy"]):
        old["film"]["latent_dim"] = old["encoder"].pop("latent_dim")
    save_checkpoint(str(tmp_path / "old.pt"), checkpoint)
    loaded, loaded_checkpoint = load_policy(tmp_path / "old.pt")
    assert loaded_checkpoint["config"]["policy"]["encoder"]["latent_dim"] == LATENT_DIM
    with torch.no_grad():
        got = pair_logprobs(loaded.eval(), batch, latents(2))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


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
    for load in (lambda: build_base_model(str(folder)), lambda: text.load_embedder(str(folder), "cpu")):
        with pytest.raises(ValueError, match="contains custom code"):
            load()
    assert not marker.exists()
    with pytest.raises(Exception):  # the payload is live: with trust it runs (then fails, having no model)
        build_base_model(str(folder), trust_remote_code=True)
    assert marker.exists()
