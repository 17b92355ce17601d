"""
The built-in worlds' inputs, built when a policy config asks for them and they are
missing: the text pairs (and, for the steering world, each user's true preference),
a tiny Llama-style base model fine-tuned on the world's responses (the reference
policy), and the pairs' context features from text.embed_pairs. train_policy.py calls
build_missing before it reads its inputs.

Also the two-type toy text world (configs/steer_text*.yaml): prompts ask about a topic;
a response is 1-5 short sentences, each about the prompt's topic (relevant) or another
one. Two user types share a taste for relevance and conflict on length: 'concise'
loses LENGTH_WEIGHT per sentence, 'detailed' gains it. Gold rewards are computed from
the words alone, so generated text can be scored the same way.
"""

import json
import os
import shutil

import numpy as np
import torch
from tqdm import tqdm

import world
from common import check, lr_at
from data import DataError, random_split, save_pairs
from dist import barrier, is_main
from policy import build_base_model, sequence_logprob
from text import (embed_pairs, load_embedder, prompt_response_batch, read_text_pairs, text_pairs_to_data,
                  tokenize_pairs, tokenize_prompt, tokenize_response, write_text_pairs)

TOY_MODEL_DEFAULTS = {  # the tiny Llama-style base of a built-in world, fine-tuned before DPO
    "hidden_size": 64,  # model width
    "layers": 2,  # decoder layers
    "heads": 4,  # attention heads
    "intermediate_size": 128,  # MLP width
    "sft_steps": 800,  # fine-tuning steps on the mixed responses
    "sft_batch_size": 64,  # sequences per fine-tuning step
    "sft_lr": 3e-3,  # fine-tuning learning rate
}


# -----------------------------------------------------------------------------
# the two-type toy text world

TOPICS = "cats dogs rain music bread stars trees boats tea snow bees maps".split()
PROMPT_TEMPLATES = ["tell me about {} .", "what about {} ?", "describe {} .", "say something on {} .",
                    "i want to hear about {} ."]
PREDICATES = "are nice|can be loud|look old|feel warm|seem small|are everywhere|help people|are blue".split("|")
TOY_LABELS = ("concise", "detailed")
LENGTH_WEIGHT = 0.5  # gold reward per sentence: - for concise, + for detailed
MAX_SENTENCES = 5


def toy_vocabulary():
    words = {w for t in PROMPT_TEMPLATES for w in t.split()} | set(TOPICS)
    words |= {w for p in PREDICATES for w in p.split()} | {"."}
    return ["<pad>", "<unk>", "<bos>", "<eos>"] + sorted(words - {"{}"})


def toy_tokenizer():
    """The two-type toy world's word-level tokenizer."""
    return world.word_tokenizer(toy_vocabulary())


def prompt_topic(prompt):
    return next(w for w in prompt.split() if w in TOPICS)


def toy_gold_reward(prompt, response, label):
    """Reward of `response` for user type `label`: 2 * (fraction of sentences about the
    prompt's topic) -/+ LENGTH_WEIGHT * (number of sentences). Text in, float out."""
    topic = prompt_topic(prompt)
    sentences = [s for s in response.split(".") if s.strip()]
    relevance = sum(topic in s.split() for s in sentences) / max(1, len(sentences))
    sign = {"concise": -1.0, "detailed": 1.0}[label]
    return 2.0 * relevance + sign * LENGTH_WEIGHT * len(sentences)


def toy_response(topic, rng, relevant_prob=0.7):
    """The mixed response distribution the base model is fine-tuned on."""
    sentences = []
    for _ in range(int(rng.integers(1, MAX_SENTENCES + 1))):
        subject = topic if rng.random() < relevant_prob else rng.choice([t for t in TOPICS if t != topic])
        sentences.append(f"{subject} {rng.choice(PREDICATES)} .")
    return " ".join(sentences)


def toy_prompts():
    return [t.format(topic) for t in PROMPT_TEMPLATES for topic in TOPICS]


def make_toy_text_pairs(num_pairs=6000, conflict_fraction=0.8, seed=0):
    """Text pairs in the JSONL schema (prompt, response_a, response_b, choices, split, id).
    Prompts are split 80/10/10, so no prompt is in two splits. `conflict_fraction` of
    the pairs are ones the two types rank oppositely; the rest they rank alike; ties
    are dropped."""
    rng = np.random.default_rng(seed)
    prompts = toy_prompts()
    prompt_split = dict(zip(prompts, random_split(len(prompts), torch.Generator().manual_seed(seed))))
    rows, wanted = [], {True: round(num_pairs * conflict_fraction), False: num_pairs - round(num_pairs * conflict_fraction)}
    while wanted[True] + wanted[False] > 0:
        prompt = prompts[rng.integers(len(prompts))]
        a, b = (toy_response(prompt_topic(prompt), rng) for _ in range(2))
        margins = [toy_gold_reward(prompt, b, l) - toy_gold_reward(prompt, a, l) for l in TOY_LABELS]
        if 0 in margins or wanted[(margins[0] > 0) != (margins[1] > 0)] == 0:
            continue
        wanted[(margins[0] > 0) != (margins[1] > 0)] -= 1
        rows.append({"prompt": prompt, "response_a": a, "response_b": b, "id": len(rows),
                     "choices": {l: int(m > 0) for l, m in zip(TOY_LABELS, margins)}, "split": str(prompt_split[prompt])})
    return rows


# -----------------------------------------------------------------------------
# building a world's inputs


def build_missing(config, rank=0):
    """Builds whichever of the built-in world's inputs are missing (config data.toy);
    under torchrun rank 0 builds them while the others wait."""
    if config["data"]["toy"] and is_main(rank) and toy_inputs_to_build(config):
        build_toy_inputs(config)
    barrier()


def toy_base_config(m, vocab_size):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=m["hidden_size"], num_hidden_layers=m["layers"],
                       num_attention_heads=m["heads"], num_key_value_heads=m["heads"],
                       intermediate_size=m["intermediate_size"], max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)


def finetune_base(model, sequences, m, seed):
    """Supervised fine-tuning on (prompt ids, response ids) texts: mean negative
    log-likelihood of the response tokens."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=m["sft_lr"])
    model.train()
    for step in tqdm(range(m["sft_steps"]), desc="fine-tune base", mininterval=1.0):
        rows = torch.randint(len(sequences), (m["sft_batch_size"],), generator=gen).tolist()
        batch = prompt_response_batch([sequences[i][0] for i in rows], [sequences[i][1] for i in rows], pad_id=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logprob(logits, batch["input_ids"], batch["response_mask"])  # (b,)
        loss = -logps.sum() / batch["response_mask"].sum()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, {"lr": m["sft_lr"], "min_lr": 0.0, "warmup_steps": 50, "steps": m["sft_steps"]})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"fine-tuned base: last response NLL per token {loss.item():.3f}")
    return model.eval()


WORLD_PATHS = {  # where each built-in world's inputs are built without --data.generate
    "continuum": {"data.pairs": "data/steer_world/pairs.jsonl", "data.features": "data/steer_world/features.npz",
                  "data.preferences": "data/steer_world/users.json", "policy.base": "runs/steer_world_base"},
    "two_types": {"data.pairs": "data/steer_text/pairs.jsonl", "data.features": "data/steer_text/features.npz",
                  "policy.base": "runs/steer_text_base"},
}


def toy_inputs_to_build(config):
    """The toy inputs that are missing and may be built: those at their world's default
    paths, or any with data.generate. A missing input at another path is a mistyped path."""
    d, p = config["data"], config["policy"]
    wanted = {"data.pairs": (d["pairs"], d["pairs"]), "data.features": (d["features"], d["features"]),
              "policy.base": (p["base"], os.path.join(p["base"], "config.json"))}
    if d["world"] == "continuum":
        wanted["data.preferences"] = (d["preferences"], d["preferences"])
    defaults = WORLD_PATHS[d["world"]]
    missing = [key for key, (_, marker) in wanted.items() if not os.path.exists(marker)]
    for key in missing:
        path = wanted[key][0]
        if os.path.normpath(path) != defaults[key] and not d["generate"]:
            hint = " (a hub model goes with your own data and --data.toy=false)" if key == "policy.base" else ""
            raise DataError(f"{key}: {path} not found (to build the toy task's {key.split('.')[1]} there, "
                            f"add --data.generate){hint}")
    for where, settings in toy_settings(config).items():
        check_toy_settings(where, settings)
    return missing


def toy_settings(config):
    """{record file: the settings an existing toy input was built with}: the pairs' and the
    base model's. The seed is left out: a second training seed reuses the same toy inputs."""
    d = config["data"]
    keys = (("world_users", "world_pairs_per_user", "world_answers_per_pair") if d["world"] == "continuum"
            else ("toy_pairs", "toy_conflict_fraction"))
    pairs = {"data.world": d["world"], **{f"data.{k}": d[k] for k in keys}}
    base = {f"toy_model.{k}": v for k, v in config["toy_model"].items()}
    if d["world"] == "continuum":
        base.update({"data.world": d["world"], "data.world_corpus": d["world_corpus"]})
    return {os.path.join(os.path.dirname(d["pairs"]) or ".", "toy_settings.json"): pairs,
            os.path.join(config["policy"]["base"], "toy_settings.json"): base}


def check_toy_settings(record, settings):
    """Toy inputs built with other settings are never silently reused under new ones."""
    if not os.path.isfile(record):
        return
    with open(record) as f:
        built = json.load(f)
    changed = [f"{k} = {settings[k]} (built with {built[k]})" for k in settings if k in built and built[k] != settings[k]]
    if changed:
        raise DataError(f"the toy inputs in {os.path.dirname(record)} were built with other settings: "
                        f"{'; '.join(changed)}. Give new paths with --data.generate, or delete them to rebuild")


def write_toy_settings(record, settings):
    with open(record, "w") as f:
        json.dump(settings, f, indent=1)


def build_toy_inputs(config):
    """Writes whichever of the world's pairs (and users' preferences), base model and features is missing."""
    d, base_dir, continuum = config["data"], config["policy"]["base"], config["data"]["world"] == "continuum"
    (pairs_record, pairs_settings), (base_record, base_settings) = toy_settings(config).items()
    if not os.path.exists(d["pairs"]):
        if continuum:
            rows, preferences = world.make_pairs(d["world_users"], d["world_pairs_per_user"],
                                                 d["world_answers_per_pair"], seed=config["seed"])
            write_json_atomic(d["preferences"], preferences)
        else:
            rows = make_toy_text_pairs(d["toy_pairs"], d["toy_conflict_fraction"], config["seed"])
        write_text_pairs(d["pairs"], rows)
        write_toy_settings(pairs_record, pairs_settings)
        print(f"wrote the toy text pairs to {d['pairs']}")
    rows = read_text_pairs(d["pairs"])
    tokenizer = world.tokenizer() if continuum else toy_tokenizer()
    token_pairs, dropped = tokenize_pairs(rows, tokenizer, d["max_length"])
    check(dropped == 0, "data.max_length", f"{dropped} toy pairs are longer; raise it")
    if not os.path.exists(os.path.join(base_dir, "config.json")):
        if continuum:  # the base knows every topic, as a pretrained model would
            texts = [(tokenize_prompt(tokenizer, q), tokenize_response(tokenizer, r))
                     for q, r in world.corpus(d["world_corpus"], seed=config["seed"])]
        else:  # both responses of every training pair (the mixed distribution)
            texts = [(q, r) for pair, row in zip(token_pairs, rows) if row["split"] == "train" for q, rs in [pair] for r in rs]
        torch.manual_seed(config["seed"])
        base = build_base_model(toy_base_config(config["toy_model"], len(tokenizer)))
        finetune_base(base, texts, config["toy_model"], config["seed"])
        tmp = f"{base_dir}.tmp{os.getpid()}"  # then renamed: an interrupted build leaves no half a model
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_toy_settings(os.path.join(tmp, "toy_settings.json"), base_settings)
        shutil.rmtree(base_dir, ignore_errors=True)  # a folder without config.json: a build that was cut short
        os.replace(tmp, base_dir)
        print(f"wrote the fine-tuned base model to {base_dir}")
    if not os.path.exists(d["features"]):
        base_tokenizer, embedder, pooling = load_embedder(base_dir, torch.device("cpu"))
        features = embed_pairs(rows, base_tokenizer, embedder, pooling)  # (N, 2, H)
        save_pairs(d["features"], text_pairs_to_data(rows, features, d["features"]))
        print(f"wrote context embeddings {tuple(features.shape)} to {d['features']}")


def write_json_atomic(path, value):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)
