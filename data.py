"""
Preference data: synthetic generators, the on-disk format every trainer reads,
and the episode sampler for meta-training.

    python data.py synthetic --out=data/paper_synthetic.npz        # the paper's task
    python data.py synthetic --generator=linear --dim=8 --num_types=4 --temperature=0.1 --out=data/linear.npz
    python data.py synthetic --generator=linear --num_users=2000 --pairs_per_user=40 --out=data/users.npz

On-disk format (`.npz`), one row per pair of options:
    pairs    float32 [N, 2, D]  features of the two options
    choices  int8    [N, L]     per label: 0 = first preferred, 1 = second, -1 = unknown or tie
    labels   str     [L]        names of the user types / annotators
    split    str     [N]        'train', 'val' or 'test'
    meta     str     []         optional JSON: the generator, for Bayes-optimal accuracy

Departures from the paper's code:
1. Context and target pairs of an episode are drawn disjoint, and only targets are
   scored. The paper's code draws the context out of the targets and scores target
   positions n..N as unseen, although about half of them are context pairs.
2. A label (user) may answer pairs in one split only, so test users can be users the
   model never saw; a label answering in several splits must answer in all of them.
"""

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from common import REQUIRED, load_config

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


class DataError(ValueError):
    """A bad data file; the message names the file and the problem."""


@dataclass
class PreferenceData:
    pairs: torch.Tensor  # (N, 2, D) float32
    choices: torch.Tensor  # (N, L) int8, -1 = unknown
    labels: list  # L names
    split: np.ndarray  # (N,) str
    meta: dict  # generator description, {} if unknown
    path: str = "<memory>"

    @property
    def dim(self):
        return self.pairs.shape[-1]


# -----------------------------------------------------------------------------
# synthetic generators


def paper_rewards(options):
    """The paper's two user types on options y in [0, 1]. (...,) -> (..., 2)"""
    r0 = torch.where(options < 0.5, options, 2 * options)
    r1 = torch.where(options < 0.5, options, 1 - options)
    return torch.stack([r0, r1], dim=-1)


def linear_rewards(options, weights):
    """r_k(x) = w_k . x.  options (..., D), weights (K, D) -> (..., K)"""
    return options @ weights.T


def true_rewards(meta, options):
    """Rewards of every user type under the generator in `meta`; None if not known."""
    if meta.get("generator") == "paper":
        return paper_rewards(options[..., 0])
    if meta.get("generator") == "linear" and "weights" in meta:
        return linear_rewards(options, torch.tensor(meta["weights"], dtype=options.dtype))
    return None


def type_likelihood(meta, pairs):
    """P(first option chosen | user type k) for (chosen, rejected) pairs (..., 2, D) under
    the generator in `meta`: (..., K), or None when the generator is not known."""
    rewards = true_rewards(meta, pairs)  # (..., 2, K)
    if rewards is None:
        return None
    margin = rewards[..., 0, :] - rewards[..., 1, :]
    if meta.get("temperature", 0.0) == 0:
        return (margin > 0).double() + 0.5 * (margin == 0).double()
    return torch.sigmoid(margin.double() / meta["temperature"])


def bayes_log_prob_chosen(meta, batch):
    """The Bayes-optimal predictor for an episode batch: the posterior over the
    generator's user types given the context (uniform prior, as labels are balanced),
    then the posterior predictive for each target. Returns (B, T) log P(chosen), or None."""
    context_lik = type_likelihood(meta, batch["context"])  # (B, n, K)
    if context_lik is None:
        return None
    context_lik = torch.where(batch["context_mask"][..., None], context_lik, torch.ones_like(context_lik))
    posterior = context_lik.prod(1)  # (B, K), unnormalised
    posterior = posterior / posterior.sum(-1, keepdim=True)
    target_lik = type_likelihood(meta, batch["targets"])  # (B, T, K)
    return (target_lik * posterior[:, None]).sum(-1).log()


def choose(rewards, temperature, gen):
    """Choices from rewards (N, 2, L): deterministic argmax (temperature 0, ties -> -1)
    or Bradley-Terry sampling with P(second) = sigmoid((r1 - r0) / temperature)."""
    margin = rewards[:, 1] - rewards[:, 0]  # (N, L)
    if temperature == 0:
        choices = (margin > 0).to(torch.int8)
        choices[margin == 0] = -1
        return choices
    prob_second = torch.sigmoid(margin / temperature)
    return (torch.rand(prob_second.shape, generator=gen) < prob_second).to(torch.int8)


def random_split(num_items, gen):
    """80/10/10 assignment of items to SPLITS, as an array of names."""
    order = torch.randperm(num_items, generator=gen).numpy()
    bounds = np.cumsum([round(f * num_items) for f in SPLIT_FRACTIONS])[:-1]
    split = np.empty(num_items, dtype="<U5")
    for name, part in zip(SPLITS, np.split(order, bounds)):
        split[part] = name
    return split


def make_paper_synthetic(num_pairs=20000, seed=0):
    """The paper's task: y ~ U[0,1], two user types, every type answers every pair."""
    gen = torch.Generator().manual_seed(seed)
    options = torch.rand(num_pairs, 2, generator=gen)  # (N, 2)
    choices = choose(paper_rewards(options), 0.0, gen)
    return PreferenceData(options[..., None], choices, ["type0", "type1"],
                          random_split(num_pairs, gen), {"generator": "paper", "temperature": 0.0})


def make_linear_synthetic(num_pairs=20000, dim=8, num_types=2, temperature=0.0,
                          num_users=0, pairs_per_user=40, seed=0):
    """Linear rewards r(x) = w . x on options x ~ U[0,1]^D, with unit-norm weights w.

    num_users == 0: `num_types` user types answer every pair; pairs split 80/10/10.
    num_users > 0: a continuous population, each user with its own w ~ N(0, I), answers
    `pairs_per_user` pairs of its own; whole users are split 80/10/10.
    """
    gen = torch.Generator().manual_seed(seed)
    num_labels = num_users or num_types
    weights = torch.randn(num_labels, dim, generator=gen)
    weights = weights / weights.norm(dim=-1, keepdim=True)  # (L, D)
    if num_users == 0:
        options = torch.rand(num_pairs, 2, dim, generator=gen)
        choices = choose(linear_rewards(options, weights), temperature, gen)
        meta = {"generator": "linear", "weights": weights.tolist(), "temperature": temperature}
        return PreferenceData(options, choices, [f"type{k}" for k in range(num_types)],
                              random_split(num_pairs, gen), meta)
    options = torch.rand(num_users, pairs_per_user, 2, dim, generator=gen)
    rewards = (options * weights[:, None, None, :]).sum(-1)  # (U, P, 2)
    own = choose(rewards.reshape(-1, 2, 1), temperature, gen).reshape(num_users, pairs_per_user)
    choices = torch.full((num_users * pairs_per_user, num_users), -1, dtype=torch.int8)
    rows = torch.arange(num_users * pairs_per_user)
    choices[rows, rows // pairs_per_user] = own.reshape(-1)
    user_split = random_split(num_users, gen)
    meta = {"generator": "linear_population", "temperature": temperature}
    return PreferenceData(options.reshape(-1, 2, dim), choices, [f"user{u}" for u in range(num_users)],
                          np.repeat(user_split, pairs_per_user), meta)


# -----------------------------------------------------------------------------
# on-disk format


def save_pairs(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, pairs=data.pairs.numpy().astype(np.float32), choices=data.choices.numpy().astype(np.int8),
             labels=np.array(data.labels, dtype=str), split=np.asarray(data.split, dtype=str),
             meta=np.array(json.dumps(data.meta)))
    os.replace(tmp, path)


def load_pairs(path):
    """Load and validate a feature-pair file; any problem raises DataError naming the file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    missing = {"pairs", "choices", "labels", "split"} - arrays.keys()
    if missing:
        raise DataError(f"{path}: missing arrays {sorted(missing)}")
    validate_arrays(path, arrays["pairs"], arrays["choices"], arrays["labels"], arrays["split"])
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    return PreferenceData(torch.from_numpy(arrays["pairs"].astype(np.float32)),
                          torch.from_numpy(arrays["choices"].astype(np.int8)),
                          [str(x) for x in arrays["labels"]], arrays["split"].astype(str), meta, path)


def validate_arrays(path, pairs, choices, labels, split):
    def fail(problem):
        raise DataError(f"{path}: {problem}")

    if pairs.ndim != 3 or pairs.shape[1] != 2:
        fail(f"'pairs' must have shape [N, 2, D], got {list(pairs.shape)}")
    if pairs.shape[0] == 0:
        fail("no pairs (N = 0)")
    if not np.issubdtype(pairs.dtype, np.number) or not np.isfinite(pairs).all():
        fail("'pairs' holds non-numeric or non-finite (nan/inf) values")
    if choices.ndim != 2 or choices.shape[0] != pairs.shape[0]:
        fail(f"'choices' must have shape [N, L] with N = {pairs.shape[0]}, got {list(choices.shape)}")
    if not np.isin(choices, (-1, 0, 1)).all():
        fail("'choices' holds values other than -1, 0, 1")
    if labels.shape != (choices.shape[1],):
        fail(f"'labels' must have shape [L] with L = {choices.shape[1]}, got {list(labels.shape)}")
    if len(set(labels.tolist())) != len(labels):
        fail("'labels' has duplicate names")
    if split.shape != (pairs.shape[0],):
        fail(f"'split' must have shape [N] with N = {pairs.shape[0]}, got {list(split.shape)}")
    unknown = set(split.astype(str).tolist()) - set(SPLITS)
    if unknown:
        fail(f"unknown split names {sorted(unknown)} (expected {list(SPLITS)})")
    answered = choices >= 0  # (N, L)
    present = [s for s in SPLITS if (split == s).any()]
    per_split = np.stack([answered[split == s].any(0) for s in present])  # (S, L)
    for label, spans in zip(labels, per_split.T):
        if not spans.any():
            fail(f"label '{label}' has no answered pair")
        if 1 < spans.sum() < len(present):
            missing_split = present[int(np.argmin(spans))]
            fail(f"label '{label}' has no answered pair in split '{missing_split}'")


def select_labels(data, labels):
    """The same pairs with only the named labels' choices (e.g. a label-specific oracle)."""
    unknown = [l for l in labels if l not in data.labels]
    if unknown:
        raise DataError(f"{data.path}: no label '{unknown[0]}' (labels: {', '.join(data.labels)})")
    columns = [data.labels.index(l) for l in labels]
    return PreferenceData(data.pairs, data.choices[:, columns], list(labels), data.split, data.meta, data.path)


# -----------------------------------------------------------------------------
# episodes


class EpisodeSampler:
    """Draws episodes of one label each: a context of n pairs and `num_targets` target
    pairs, all answered by that label and disjoint. Pairs come oriented as
    (chosen, rejected). Vectorised; all randomness from one torch.Generator.
    """

    def __init__(self, data, split, num_targets, max_context, min_context=0, seed=0):
        in_split = torch.from_numpy(data.split == split)
        answered = (data.choices >= 0) & in_split[:, None]  # (N, L)
        counts = answered.sum(0)
        self.label_ids = torch.nonzero(counts).squeeze(1)  # labels present in this split
        if len(self.label_ids) == 0:
            raise DataError(f"{data.path}: no answered pairs in split '{split}'")
        needed = num_targets + max_context
        short = [(data.labels[i], int(counts[i])) for i in self.label_ids if counts[i] < needed]
        if short:
            raise DataError(f"{data.path}: label '{short[0][0]}' has {short[0][1]} answered pairs in split "
                            f"'{split}', fewer than num_targets + max_context = {needed}")
        self.data, self.split = data, split
        self.num_targets, self.min_context, self.max_context = num_targets, min_context, max_context
        self.counts = counts[self.label_ids]  # (L_split,)
        table = torch.zeros(len(self.label_ids), int(self.counts.max()), dtype=torch.long)
        for row, label in enumerate(self.label_ids):  # once, at construction
            rows = torch.nonzero(answered[:, label]).squeeze(1)
            table[row, : len(rows)] = rows
        self.table = table  # (L_split, M) pair indices, padded
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def labels(self):
        return [self.data.labels[i] for i in self.label_ids]

    def sample(self, batch_size, num_context=None, label_rows=None):
        """label_rows: rows into self.labels (default: uniform); num_context: fixed n
        (default: uniform in [min_context, max_context] per episode)."""
        if num_context is not None and not 0 <= num_context <= self.max_context:
            raise ValueError(f"num_context = {num_context} must lie in [0, max_context = {self.max_context}]")
        if label_rows is None:
            label_rows = torch.randint(len(self.label_ids), (batch_size,), generator=self.gen)
        n_max = self.max_context if num_context is None else num_context
        positions = self._distinct_positions(label_rows, n_max + self.num_targets)
        pair_idx = self.table[label_rows[:, None], positions]  # (B, n_max + T)
        label_idx = self.label_ids[label_rows]
        choice = self.data.choices[pair_idx, label_idx[:, None]].long()  # (B, n_max + T)
        pairs = self.data.pairs[pair_idx]  # (B, n_max + T, 2, D)
        flip = choice.bool()[..., None, None]
        oriented = torch.where(flip, pairs.flip(2), pairs)  # (B, n_max + T, 2, D) chosen first
        if num_context is None:
            n = torch.randint(self.min_context, self.max_context + 1, (batch_size,), generator=self.gen)
        else:
            n = torch.full((batch_size,), num_context)
        return {
            "context": oriented[:, :n_max],  # (B, n_max, 2, D)
            "context_mask": torch.arange(n_max)[None] < n[:, None],  # (B, n_max)
            "targets": oriented[:, n_max:],  # (B, T, 2, D)
            "label_rows": label_rows,
            "pair_idx": pair_idx,  # (B, n_max + T) rows of the data
            "flipped": choice.bool(),  # (B, n_max + T) True where the second option was chosen
        }

    def _distinct_positions(self, label_rows, k):
        """k distinct positions < counts[label] per row, uniformly without replacement."""
        counts = self.counts[label_rows]  # (B,)
        keys = torch.rand(len(label_rows), self.table.shape[1], generator=self.gen)
        keys[torch.arange(self.table.shape[1])[None] >= counts[:, None]] = 2.0
        return keys.topk(k, dim=1, largest=False).indices  # (B, k)


# -----------------------------------------------------------------------------
# text pairs (JSONL): prompt, response_a, response_b, choices {label: 0 | 1 | null},
# optional split and id


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


def read_text_pairs(path, skip_bad=False):
    """Rows of a text-pair JSONL file. Bad lines are reported by file and line number;
    the file is refused unless skip_bad, and then the skipped count is printed."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    rows, problems = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: invalid JSON ({e.msg})")
                continue
            problem = text_pair_problem(row)
            if problem:
                problems.append(f"{path}:{number}: {problem}")
            else:
                rows.append(row)
    if problems and not skip_bad:
        shown = "\n".join(problems[:10]) + ("\n..." if len(problems) > 10 else "")
        raise DataError(f"{path}: {len(problems)} bad lines (pass skip_bad to drop them):\n{shown}")
    if problems:
        print(f"{path}: skipped {len(problems)} bad lines, kept {len(rows)}")
    return rows


def write_text_pairs(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(f"{path}.tmp", path)


def text_pairs_to_data(rows, features, path="<memory>"):
    """PreferenceData from text-pair rows and their option features (N, 2, D)."""
    labels = sorted({label for row in rows for label in row["choices"]})
    choices = torch.full((len(rows), len(labels)), -1, dtype=torch.int8)
    for i, row in enumerate(rows):
        for j, label in enumerate(labels):
            if row["choices"].get(label) is not None:
                choices[i, j] = row["choices"][label]
    split = np.array([row.get("split", "train") for row in rows], dtype="<U5")
    return PreferenceData(features.float(), choices, labels, split, {}, path)


# -----------------------------------------------------------------------------
# tokens and embeddings for text pairs


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


@torch.no_grad()
def last_token_embeddings(model, sequences, pad_id, batch_size=64):
    """Final-layer hidden state at each sequence's last token, (N, H). Batches are
    sorted by length to waste little padding; the sequences are right-padded."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [None] * len(sequences)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_right([sequences[i] for i in chunk], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[-1]
        last = hidden[torch.arange(len(chunk), device=device), mask.sum(1) - 1]  # (b, H)
        for row, i in enumerate(chunk):
            out[i] = last[row].float().cpu()
    return torch.stack(out)


# -----------------------------------------------------------------------------
# the toy steerable text task (the policy's CPU-sized default)
#
# Prompts ask about a topic; a response is 1-5 short sentences, each about the
# prompt's topic (relevant) or another one. Two user types share a taste for
# relevance and conflict on length: 'concise' loses LENGTH_WEIGHT per sentence,
# 'detailed' gains it. Gold rewards are computed from the words alone, so generated
# text can be scored the same way.

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
    """A word-level Hugging Face tokenizer over the toy vocabulary, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(toy_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


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
# command line

DEFAULTS = {
    "out": REQUIRED,  # where to write the .npz
    "generator": "paper",  # paper | linear
    "num_pairs": 20000,  # pairs (paper, linear with user types)
    "seed": 0,  # generator seed
    "dim": 8,  # option features (linear)
    "num_types": 2,  # user types answering every pair (linear)
    "num_users": 0,  # > 0: a continuous population of users instead of types (linear)
    "pairs_per_user": 40,  # pairs each user answers (linear, num_users > 0)
    "temperature": 0.0,  # 0: deterministic choices; > 0: Bradley-Terry sampling (linear)
}


def describe(data):
    lines = [f"{len(data.pairs)} pairs of dimension {data.dim}, {len(data.labels)} labels"]
    for s in SPLITS:
        in_split = torch.from_numpy(data.split == s)
        answered = (data.choices[in_split] >= 0).sum().item()
        lines.append(f"  {s:5s}: {int(in_split.sum())} pairs, {answered} answered (pair, label) cells")
    return "\n".join(lines)


def main(argv):
    if not argv or argv[0] != "synthetic":
        sys.exit(__doc__)
    config, _ = load_config(DEFAULTS, argv[1:])
    if config["generator"] == "paper":
        data = make_paper_synthetic(config["num_pairs"], config["seed"])
    elif config["generator"] == "linear":
        keys = ("num_pairs", "dim", "num_types", "temperature", "num_users", "pairs_per_user", "seed")
        data = make_linear_synthetic(**{k: config[k] for k in keys})
    else:
        sys.exit(f"config key 'generator': unknown generator '{config['generator']}' (paper | linear)")
    save_pairs(config["out"], data)
    print(f"wrote {config['out']}: {describe(data)}")


if __name__ == "__main__":
    main(sys.argv[1:])
