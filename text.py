"""
Text pairs and what is read from them: the JSONL format, tokens with the exact response
start, the one embedding function, and a policy run's inputs and episode batches.

Text pairs (JSONL), one per line: prompt, response_a, response_b, choices {label: 0 | 1
| null} (0 = response_a preferred), optional split and id. A feature-pair .npz (data.py)
made from them by `embed_pairs` is row-aligned with them.

`embed_pairs` is the only way text becomes context features: in preparation (the
built-in worlds; prepare/embed.py runs its two steps, embedding_sequences then
sequence_embeddings, in resumable chunks), for training, and for a new user's context
at inference (steer.py). A decoder reads prompt + response as the policy does (chat
template included) and is pooled at the last token; an encoder reads the sentence pair
and is mean-pooled.
"""

import contextlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import policy as policy_lib
import world
from common import ConfigError, check
from data import SPLITS, DataError, PreferenceData, file_sha256, load_pairs, select_labels
from dist import is_main, sum_over_ranks


# -----------------------------------------------------------------------------
# text pairs (JSONL)


def text_pair_problem(row):
    """What is wrong with one parsed JSONL line, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for key in ("prompt", "response_a", "response_b", "choices"):
        if key not in row:
            return f"missing field '{key}'"
    for key in ("prompt", "response_a", "response_b"):
        if not isinstance(row[key], str) or not row[key].strip():
            return f"field '{key}' is empty or not a string"
    if not isinstance(row["choices"], dict) or not row["choices"]:
        return "field 'choices' must be a non-empty object from label to 0, 1 or null"
    bad = [k for k, v in row["choices"].items() if v not in (0, 1, None) or isinstance(v, bool)]
    if bad:
        return f"choice for label '{bad[0]}' is {row['choices'][bad[0]]!r}, not 0, 1 or null"
    if "split" in row and row["split"] not in SPLITS:
        return f"split '{row['split']}' is not one of {list(SPLITS)}"
    return None


def report_problems(source, problems, kept, skip_bad, unit, how_to_skip):
    """Stops on bad lines or rows, listing the first ten, unless skip_bad: then says how many were skipped."""
    if problems and not skip_bad:
        shown = "\n".join(problems[:10]) + ("\n..." if len(problems) > 10 else "")
        error = DataError(f"{source}: {len(problems)} bad {unit} ({how_to_skip} to drop them):\n{shown}")
        error.problems = problems  # for a caller that has no skip option and words its own message
        raise error
    if problems:
        print(f"{source}: skipped {len(problems)} bad {unit}, kept {kept}")


def read_text_pairs(path, skip_bad=False, how_to_skip="set data.skip_bad_lines=true"):
    """Rows of a text-pair JSONL file. Bad lines are reported by file and line number;
    the file is refused unless skip_bad, and then the skipped count is printed."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    rows, problems = [], []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                problems.append(f"{path}:{number}: not UTF-8 text")
                continue
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: invalid JSON ({e.msg})")
                continue
            problem = text_pair_problem(row)
            if problem:
                problems.append(f"{path}:{number}: {problem}")
            else:
                rows.append(row)
    report_problems(path, problems, len(rows), skip_bad, "lines", how_to_skip)
    return rows


def write_text_pairs(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(f"{path}.tmp", path)


def text_pair_ids(rows):
    """Each row's id as the feature file stores it: its 'id' field, else its row number."""
    return [str(row.get("id", i)) for i, row in enumerate(rows)]


def text_pairs_to_data(rows, features, path="<memory>"):
    """PreferenceData from text-pair rows and their option features (N, 2, D); a row's id
    is its 'id' field, or its row number if it has none."""
    labels = sorted({label for row in rows for label in row["choices"]})
    choices = torch.full((len(rows), len(labels)), -1, dtype=torch.int8)
    for i, row in enumerate(rows):
        for j, label in enumerate(labels):
            if row["choices"].get(label) is not None:
                choices[i, j] = row["choices"][label]
    split = np.array([row.get("split", "train") for row in rows], dtype="<U5")
    ids = np.array(text_pair_ids(rows), dtype=str)
    return PreferenceData(features.float(), choices, labels, split, {}, path, ids)

# -----------------------------------------------------------------------------
# tokens


def tokenize_prompt(tokenizer, prompt):
    """Prompt ids, ending exactly where the response begins: the chat template with
    the assistant turn opened when the tokenizer has one, else BOS + prompt."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    ids = tokenizer(prompt)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


def tokenize_response(tokenizer, response):
    """Response ids, tokenized on their own (so the first one is exactly the response's
    first token), closed by EOS."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def unknown_words(tokenizer, text):
    """The pieces of `text` that a fast `tokenizer` maps to its unknown token, once each, in
    order. Byte-level tokenizers have no unknown token and read any text."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [span for i, span in zip(encoded["input_ids"], encoded["offset_mapping"]) if i == unk]
    return list(dict.fromkeys(text[start:end] for start, end in spans))


def check_known_words(tokenizer, text, where):
    """Refuses text with words the model has no token for: it would read (and answer) <unk>."""
    unknown = unknown_words(tokenizer, text)
    if unknown:
        special = set(tokenizer.all_special_tokens)
        known = [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]) if w not in special]
        shown = ", ".join(known[:16]) + (", ..." if len(known) > 16 else "")
        raise DataError(f"{where}: the model's vocabulary has no {', '.join(map(repr, unknown))} "
                        f"(it knows {len(known)} words: {shown})")


def tokenize_pairs(rows, tokenizer, max_length):
    """[(prompt_ids, (ids_a, ids_b)) or None] aligned with `rows`: a pair whose prompt
    plus longer response exceeds max_length is dropped (None) and counted, never truncated.
    Returns the list and the number dropped."""
    token_pairs = []
    for row in rows:
        prompt = tokenize_prompt(tokenizer, row["prompt"])
        responses = tuple(tokenize_response(tokenizer, row[k]) for k in ("response_a", "response_b"))
        fits = len(prompt) + max(map(len, responses)) <= max_length
        token_pairs.append((prompt, responses) if fits else None)
    return token_pairs, sum(p is None for p in token_pairs)


def pad_right(sequences, value):
    """Lists of ids -> (N, T) long tensor padded with `value`, and the (N, T) bool mask of real tokens."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, torch.arange(ids.shape[1])[None] < lengths[:, None]


def prompt_response_batch(prompts, responses, pad_id):
    """input_ids, attention_mask and response_mask (N, T) for prompt + response token lists."""
    ids, mask = pad_right([p + r for p, r in zip(prompts, responses)], pad_id)
    starts = torch.tensor([len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask.long(),
            "response_mask": mask & (torch.arange(ids.shape[1])[None] >= starts[:, None])}


def collate_pairs(token_pairs, pair_idx, flipped, pad_id):
    """Token batch for pairs `pair_idx` (P,) oriented by `flipped` (P,), True where the
    second response was chosen. token_pairs[i] = (prompt_ids, (ids_a, ids_b)).
    Returns {chosen,rejected}_{input_ids,attention_mask,response_mask}, each (P, T)."""
    pairs = [token_pairs[i] for i in pair_idx.tolist()]
    batch = {}
    for name, second in (("chosen", flipped.tolist()), ("rejected", (~flipped).tolist())):
        part = prompt_response_batch([p for p, _ in pairs], [r[int(s)] for (_, r), s in zip(pairs, second)], pad_id)
        batch.update({f"{name}_{k}": v for k, v in part.items()})
    return batch

# -----------------------------------------------------------------------------
# the one embedding function


def last_token(hidden, mask):
    """Hidden state at each row's last real token of a right-padded batch. (b, T, H), (b, T) -> (b, H)"""
    return hidden[torch.arange(len(mask), device=hidden.device), mask.sum(1) - 1]


def mean_pool(hidden, mask):
    """Mean hidden state over each row's real tokens, in float32. (b, T, H), (b, T) -> (b, H)"""
    weights = mask[..., None].float()  # (b, T, 1)
    return (hidden.float() * weights).sum(1) / weights.sum(1)


POOLING = {"last": last_token, "mean": mean_pool}


@torch.no_grad()
def sequence_embeddings(model, sequences, pad_id, batch_size=64, pooling="last"):
    """Final-layer hidden states pooled per sequence ('last' token or 'mean' over tokens),
    (N, H) float32 on the CPU. Batches are sorted by length to waste little padding; the
    sequences are right-padded."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [None] * len(sequences)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_right([sequences[i] for i in chunk], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[-1]
        pooled = POOLING[pooling](hidden, mask).float().cpu()  # (b, H)
        for row, i in enumerate(chunk):
            out[i] = pooled[row]
    return torch.stack(out)


def is_causal_lm(config):
    """Whether a transformers config describes a decoder (embedded at its last token)
    rather than an encoder (mean-pooled): config.is_decoder, else its architectures,
    else whether its model type only has a causal-LM class."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if getattr(config, "is_decoder", False):
        return True
    if config.architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures)
    causal, masked = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return config.model_type in causal and config.model_type not in masked


def load_embedder(name, device, trust_remote_code=False):
    """(tokenizer, model, pooling) for a hub name or local path. The model is loaded
    without its head (AutoModel; AutoModelForCausalLM if the type has no AutoModel
    class), in bf16 on GPU and float32 on CPU."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    if config.is_encoder_decoder:
        raise ConfigError(f"config key 'model': {name} is an encoder-decoder model; give a decoder or an encoder")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModel.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError:  # no AutoModel class for this config
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    return tokenizer, model.to(device).eval(), "last" if is_causal_lm(config) else "mean"


def embedding_sequences(rows, tokenizer, pooling):
    """Token ids of prompt + response for both responses of every row, [a0, b0, a1, ...].
    Decoders: as the policy sees them (tokenize_prompt, with the chat template if any,
    then tokenize_response). Encoders: the tokenizer's sentence pair (prompt, response)."""
    sequences = []
    for row in rows:
        if pooling == "last":
            prompt = tokenize_prompt(tokenizer, row["prompt"])
            sequences += [prompt + tokenize_response(tokenizer, row[k]) for k in ("response_a", "response_b")]
        else:
            sequences += [tokenizer(row["prompt"], row[k])["input_ids"] for k in ("response_a", "response_b")]
    return sequences


def embed_pairs(rows, tokenizer, model, pooling, batch_size=64):
    """Context features of text pairs: both responses of every row embedded by
    `model` (load_embedder), (N, 2, H) float32 on the CPU."""
    return embed_sequences(embedding_sequences(rows, tokenizer, pooling), tokenizer, model, pooling,
                           batch_size).view(len(rows), 2, -1)


def embed_responses(prompt, responses, tokenizer, model, pooling, batch_size=64):
    """(N, H) context features of responses to one prompt, each embedded as embed_pairs embeds an option."""
    rows = [{"prompt": prompt, "response_a": r, "response_b": ""} for r in responses]
    return embed_sequences(embedding_sequences(rows, tokenizer, pooling)[::2], tokenizer, model, pooling, batch_size)


def embed_sequences(sequences, tokenizer, model, pooling, batch_size=64):
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)  # masked anyway
    return sequence_embeddings(model, sequences, pad_id, batch_size, pooling)


# -----------------------------------------------------------------------------
# a policy run's inputs and episode batches


def load_inputs(config):
    """Text pairs, their context features (labels, splits, choices) and tokens, as a
    policy run's config names them (toy.build_missing builds a built-in world's first)."""
    from transformers import AutoTokenizer

    d, p = config["data"], config["policy"]
    for key, path in (("data.pairs", d["pairs"]), ("data.features", d["features"])):
        if not os.path.exists(path):
            raise DataError(f"{key}: {path} not found")
    rows = read_text_pairs(d["pairs"], d["skip_bad_lines"])
    data = load_pairs(d["features"])
    data.meta["sha256"] = file_sha256(d["pairs"]) + file_sha256(d["features"])  # a resumed run checks its data
    if len(rows) != len(data.pairs) or (data.ids is not None and data.ids.tolist() != text_pair_ids(rows)):
        raise DataError(f"{d['features']}: its {len(data.pairs)} rows are not row-aligned with the {len(rows)} pairs "
                        f"of {d['pairs']} (embed them again)")
    tokenizer = AutoTokenizer.from_pretrained(p["base"], trust_remote_code=p["trust_remote_code"])
    token_pairs, dropped = tokenize_pairs(rows, tokenizer, d["max_length"])
    if dropped:
        print(f"dropped {dropped} of {len(rows)} pairs longer than data.max_length = {d['max_length']} tokens")
        data.choices[torch.tensor([t is None for t in token_pairs])] = -1
    if d["labels"]:
        data = select_labels(data, d["labels"])
    if d["preferences"] and os.path.exists(d["preferences"]):
        with open(d["preferences"]) as f:
            data.meta["preferences"] = json.load(f)
    return data, token_pairs, tokenizer


def known_latents(data, config):
    """The users' true preferences scaled to [-1, 1], (L, d) in data.labels' order, when the
    policy is conditioned on them (train.condition_on = preferences); else None."""
    if config["train"]["condition_on"] != "preferences" or config["policy"]["encoder"]["latent_dim"] == 0:
        return None
    preferences = data.meta.get("preferences")
    if preferences is None:
        raise DataError(f"train.condition_on = preferences needs the users' preferences: data.preferences = "
                        f"{config['data']['preferences']} not found")
    missing = [label for label in data.labels if label not in preferences]
    if missing:
        raise DataError(f"{config['data']['preferences']}: no preference for user {missing[0]!r} "
                        f"(and {len(missing) - 1} more)")
    latents = world.user_latents(data.labels, preferences)
    check(config["policy"]["encoder"]["latent_dim"] == latents.shape[1], "policy.encoder.latent_dim",
          f"must be {latents.shape[1]}, the size of a user's preference vector, with train.condition_on = preferences")
    return latents


def make_batch(sampler, token_pairs, batch_size, pad_id, device, num_context=None, ref_logps=None, latents=None):
    return episode_batch(sampler.sample(batch_size, num_context=num_context), token_pairs, pad_id, device, ref_logps,
                         latents)


def episode_batch(episodes, token_pairs, pad_id, device, ref_logps=None, latents=None):
    """Episodes -> the context (B, n, 2, D) with its mask and the target pairs' tokens (B * T rows).
    With ref_logps (N, 2), the reference log-probs of each pair's two responses, the batch
    carries the targets' ref_{chosen,rejected}_logps (B * T,) too. With latents (L, d), one
    row per label of the data (the users' known preferences), it carries each episode's
    latent (B, d) for a policy conditioned on it."""
    n = episodes["context"].shape[1]
    targets, flipped = episodes["pair_idx"][:, n:].reshape(-1), episodes["flipped"][:, n:].reshape(-1)  # (B * T,)
    batch = collate_pairs(token_pairs, targets, flipped, pad_id)
    batch.update(context=episodes["context"], context_mask=episodes["context_mask"])
    if ref_logps is not None:
        batch.update(ref_chosen_logps=ref_logps[targets, flipped.long()],
                     ref_rejected_logps=ref_logps[targets, (~flipped).long()])
    if latents is not None:
        batch["latent"] = latents[episodes["label_ids"]]
    return {k: v.to(device) for k, v in batch.items()}


def micro_batches(episodes, count):
    """A global batch of episodes -> `count` equal micro-batches of consecutive episodes."""
    size = len(episodes["label_rows"]) // count
    return [{k: v[i * size:(i + 1) * size] for k, v in episodes.items()} for i in range(count)]


def autocast(device, kind):
    if device.type != "cuda" or kind == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if kind == "bf16" else torch.float16)


@torch.no_grad()
def reference_logprobs(policy, data, token_pairs, config, pad_id, device, rank=0, world_size=1):
    """The reference's log-probs of both responses of every train and val pair: (N, 2),
    NaN for pairs no episode can draw. Ranks share the work, then exchange results."""
    t = config["train"]
    usable = torch.tensor([pair is not None for pair in token_pairs])
    usable &= torch.from_numpy(data.split != "test") & (data.choices >= 0).any(1)
    rows = torch.nonzero(usable).squeeze(1)
    lengths = torch.tensor([len(token_pairs[i][0]) + max(map(len, token_pairs[i][1])) for i in rows.tolist()])
    rows = rows[lengths.argsort(stable=True)][rank::world_size]  # similar lengths batch together
    table = torch.zeros(len(token_pairs), 2, device=device)
    chunk = t["batch_size"] * t["num_targets"]  # pairs per forward, as in a training step
    with policy.reference_mode():
        for start in tqdm(range(0, len(rows), chunk), desc="reference log-probs", disable=not is_main(rank)):
            idx = rows[start:start + chunk]
            as_given = torch.zeros_like(idx, dtype=torch.bool)  # "chosen" = response a, "rejected" = response b
            batch = {k: v.to(device) for k, v in collate_pairs(token_pairs, idx, as_given, pad_id).items()}
            with autocast(device, t["autocast"]):
                logps_a, logps_b = policy_lib.pair_logprobs(policy, batch)  # (b,) each
            table[idx.to(device)] = torch.stack([logps_a, logps_b], 1).float()
    table = sum_over_ranks(table).cpu()  # each row was computed by exactly one rank
    table[~usable] = float("nan")
    return table
