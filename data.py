"""
Preference data: synthetic generators, the on-disk format every trainer reads,
and the episode sampler for meta-training.

    python data.py synthetic --out=data/paper_synthetic.npz        # the paper's task
    python data.py synthetic --generator=linear --dim=8 --num_types=4 --temperature=0.1 --out=data/linear.npz
    python data.py synthetic --generator=linear --num_users=2000 --pairs_per_user=40 --out=data/users.npz
    python data.py synthetic --generator=waves --num_types=3 --out=data/three_types.npz   # the benchmarks: README
    python data.py ultrafeedback --out=data/uf_hh                    # UltraFeedback HH text pairs (hub)
    python data.py ultrafeedback --source=uf.jsonl --labels=[helpfulness,honesty,truthfulness] --out=data/uf_hht
    python data.py embed --model=meta-llama/Meta-Llama-3-8B --in=data/uf_hh/pairs.jsonl --out=data/uf_hh/features.npz

`ultrafeedback` writes OUT/pairs.jsonl, text pairs (format below) of every two
completions of a prompt, one label per annotation aspect (`labels`): pairs where a
label ties or says N/A are dropped, and `conflict_fraction` of the rest (1.0, as in the
paper: all) are pairs the labels rank oppositely. The source is a hub dataset name or
a local .json/.jsonl/.parquet file or folder (parquet needs pyarrow).

`embed` writes the feature-pair .npz of a text-pair JSONL, row-aligned with it:
per response, the final hidden layer at the last token of prompt + response for a
decoder (chat template included, as the policy sees it), or its mean over the tokens
for an encoder. Interrupted, it continues from OUT.partial/ when run again.

On-disk format (`.npz`), one row per pair of options:
    pairs    float32 [N, 2, D]  features of the two options
    choices  int8    [N, L]     per label: 0 = first preferred, 1 = second, -1 = unknown or tie
    labels   str     [L]        names of the user types / annotators
    split    str     [N]        'train', 'val' or 'test'
    meta     str     []         optional JSON: the generator (for Bayes-optimal accuracy) or the embedder
    ids      str     [N]        optional: the text pair each row came from (its JSONL 'id', else its row number)

Text pairs (JSONL), one per line: prompt, response_a, response_b, choices {label: 0 | 1
| null} (0 = response_a preferred), optional split and id.

Departures from the paper's code:
1. Context and target pairs of an episode are drawn disjoint, and only targets are
   scored. The paper's code draws the context out of the targets and scores target
   positions n..N as unseen, although about half of them are context pairs.
2. A label (user) may answer pairs in one split only, so test users can be users the
   model never saw; a label answering in several splits must answer in all of them.
3. UltraFeedback pairs are split 80/10/10 by prompt, so no prompt is in two splits; the
   paper's code splits by pair, which puts the same prompts in train and test.
4. `embed` refuses a pair longer than max_length (with a count and the first row)
   instead of truncating it or dropping it: a truncated pair has no response end to
   embed, and a dropped one would break the row alignment train_policy.py relies on.
"""

import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import REQUIRED, ConfigError, UserError, check, check_positive, load_config, pick_device, print_config, run_script

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


class DataError(UserError, ValueError):
    """A bad data file; the message names the file and the problem."""


@dataclass
class PreferenceData:
    pairs: torch.Tensor  # (N, 2, D) float32
    choices: torch.Tensor  # (N, L) int8, -1 = unknown; None when `answers` holds them
    labels: list  # L names
    split: np.ndarray  # (N,) str
    meta: dict  # generator description, {} if unknown
    path: str = "<memory>"
    ids: np.ndarray = None  # (N,) str row ids of the text pairs the features came from, or None
    # (rows, labels, choices) of the answered cells only, each (A,), sorted by label then row:
    # a population of many users who each answer their own pairs, where (N, L) would not fit
    answers: tuple = None

    @property
    def dim(self):
        return self.pairs.shape[-1]

    def answered(self):
        """(row, label, choice) of every answered cell, each (A,), sorted by label then row."""
        if self.answers is not None:
            return self.answers
        labels, rows = torch.nonzero((self.choices >= 0).T, as_tuple=True)
        return rows, labels, self.choices[rows, labels]


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


def wave_rewards(options, amplitudes, phases):
    """K smooth 1-D rewards r_k(y) = sum_j a_kj sin(pi j y + phi_kj). options (...,) -> (..., K)"""
    j = torch.arange(1, amplitudes.shape[1] + 1, dtype=options.dtype)  # (J,)
    waves = torch.sin(math.pi * j * options[..., None, None] + phases)  # (..., K, J)
    return (amplitudes * waves).sum(-1)


def true_rewards(meta, options):
    """Rewards of every user type under the generator in `meta`; None if not known."""
    if meta.get("generator") == "paper":
        return paper_rewards(options[..., 0])
    if meta.get("generator") == "linear" and "weights" in meta:
        return linear_rewards(options, torch.tensor(meta["weights"], dtype=options.dtype))
    if meta.get("generator") == "waves":
        return wave_rewards(options[..., 0], *(torch.tensor(meta[k], dtype=options.dtype)
                                              for k in ("amplitudes", "phases")))
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


def bayes_log_prob_chosen(meta, batch, num_samples=16000, seed=0):
    """The Bayes-optimal predictor for an episode batch: the posterior over the
    generator's user types given the context (uniform prior, as labels are balanced),
    then the posterior predictive for each target. Returns (B, T) log P(chosen), or None.
    A continuous population has no finite set of types: population_log_prob_chosen."""
    if meta.get("generator") == "linear_population":
        return population_log_prob_chosen(meta, batch, num_samples, seed=seed)[0]
    context_lik = type_likelihood(meta, batch["context"])  # (B, n, K)
    if context_lik is None:
        return None
    context_lik = torch.where(batch["context_mask"][..., None], context_lik, torch.ones_like(context_lik))
    posterior = context_lik.prod(1)  # (B, K), unnormalised
    posterior = posterior / posterior.sum(-1, keepdim=True)
    target_lik = type_likelihood(meta, batch["targets"])  # (B, T, K)
    return (target_lik * posterior[:, None]).sum(-1).log()


def sphere_samples(num, dim, gen):
    """Points uniform on the unit sphere: the linear population's prior over users' w."""
    w = torch.randn(num, dim, generator=gen, dtype=torch.float64)
    return w / w.norm(dim=-1, keepdim=True)


def pair_log_lik(pairs, weights, temperature):
    """log P(first option chosen) of (chosen, rejected) pairs (B, m, 2, D) for each of S
    linear users (S, D): (B, m, S). Temperature 0: 0 or -inf (a tie: log 0.5)."""
    margin = (pairs[..., 0, :] - pairs[..., 1, :]).to(weights.dtype) @ weights.T  # (B, m, S)
    if temperature == 0:
        return torch.where(margin > 0, 0.0, torch.where(margin == 0, math.log(0.5), -math.inf)).to(margin.dtype)
    return F.logsigmoid(margin / temperature)


def population_log_prob_chosen(meta, batch, num_samples=16000, groups=4, seed=0, chunk=2000):
    """Bayes-optimal posterior predictive for a continuous linear population, by importance
    sampling: w from the prior (uniform on the sphere), weighted by the context likelihood,
    then E_w[P(target | w)]. The samples are split into `groups` independent sets.
    Samples come in antithetic pairs (w, -w), as the prior is symmetric. By that symmetry
    an episode with no context has the predictive 1/2 for every pair: it is set exactly, so
    the reference ties there (float error would otherwise pick a side at random).

    Returns (log P(chosen) (B, T) from all samples, per-group log P(chosen) (groups, B, T)):
    the spread of the groups' accuracies estimates the Monte Carlo error."""
    gen = torch.Generator().manual_seed(seed)
    dim, temperature = batch["context"].shape[-1], meta["temperature"]
    B, T = batch["targets"].shape[:2]
    per_group = []
    for _ in range(groups):
        top = torch.full((B, 1), -math.inf, dtype=torch.float64)  # running max of the log weights
        total, weighted = torch.zeros(B, 1, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
        for start in range(0, num_samples // groups, chunk):
            half = sphere_samples(max(1, min(chunk, num_samples // groups - start) // 2), dim, gen)
            w = torch.cat([half, -half])  # (S, D) antithetic pairs
            context = pair_log_lik(batch["context"], w, temperature)  # (B, n, S)
            log_w = torch.where(batch["context_mask"][..., None], context, 0.0).sum(1)  # (B, S)
            new_top = torch.maximum(top, log_w.max(-1, keepdim=True).values)
            rescale = torch.exp(top - new_top).nan_to_num(0.0)  # -inf - -inf: nothing accumulated yet
            weights = torch.exp(log_w - new_top)  # (B, S)
            target_prob = pair_log_lik(batch["targets"], w.float(), temperature).exp()  # (B, T, S)
            total = total * rescale + weights.sum(-1, keepdim=True)
            weighted = weighted * rescale + torch.einsum("bs,bts->bt", weights.float(), target_prob).double()
            top = new_top
        # no sample agreed with every context choice (deterministic users, long contexts): say 0.5
        per_group.append(torch.where(total > 0, weighted / total, 0.5).log())  # (B, T)
    groups_log_prob = torch.stack(per_group)  # (groups, B, T)
    groups_log_prob[:, ~batch["context_mask"].any(1)] = math.log(0.5)
    combined = groups_log_prob.logsumexp(0) - math.log(groups)  # equal-size groups: the mean of predictives
    return combined.float(), groups_log_prob.float()


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


def make_waves_synthetic(num_pairs=20000, num_types=3, temperature=0.0, waves=2, seed=0):
    """K user types on options y ~ U[0,1], each with a random smooth reward
    r_k(y) = sum_j a_kj sin(pi j y + phi_kj) (a ~ N(0, 1), phi ~ U[0, 2 pi]); every type
    answers every pair. Their majority preference need not be a ranking at all."""
    gen = torch.Generator().manual_seed(seed)
    amplitudes = torch.randn(num_types, waves, generator=gen)
    phases = 2 * math.pi * torch.rand(num_types, waves, generator=gen)
    options = torch.rand(num_pairs, 2, generator=gen)  # (N, 2)
    choices = choose(wave_rewards(options, amplitudes, phases), temperature, gen)
    meta = {"generator": "waves", "amplitudes": amplitudes.tolist(), "phases": phases.tolist(),
            "temperature": temperature}
    return PreferenceData(options[..., None], choices, [f"type{k}" for k in range(num_types)],
                          random_split(num_pairs, gen), meta)


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
    rows = torch.arange(num_users * pairs_per_user)  # user u answers rows u*P .. u*P + P - 1
    answers = (rows, rows // pairs_per_user, own.reshape(-1))  # one answer per pair: no (N, U) matrix
    user_split = random_split(num_users, gen)
    meta = {"generator": "linear_population", "temperature": temperature}
    return PreferenceData(options.reshape(-1, 2, dim), None, [f"user{u}" for u in range(num_users)],
                          np.repeat(user_split, pairs_per_user), meta, answers=answers)


# -----------------------------------------------------------------------------
# on-disk format


def save_pairs(path, data):
    """Choices as an (N, L) matrix, or, for data that holds only its answered cells, as
    answer_rows / answer_labels / answer_choices (A,) arrays."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    if data.choices is None:
        rows, labels, values = data.answers
        choices = dict(answer_rows=rows.numpy().astype(np.int64), answer_labels=labels.numpy().astype(np.int64),
                       answer_choices=values.numpy().astype(np.int8))
    else:
        choices = dict(choices=data.choices.numpy().astype(np.int8))
    np.savez(tmp, pairs=data.pairs.numpy().astype(np.float32), **choices,
             labels=np.array(data.labels, dtype=str), split=np.asarray(data.split, dtype=str),
             meta=np.array(json.dumps(data.meta)),
             **({} if data.ids is None else {"ids": np.asarray(data.ids, dtype=str)}))
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
    answer_keys = {"answer_rows", "answer_labels", "answer_choices"}
    missing = {"pairs", "labels", "split"} - arrays.keys()
    if "choices" not in arrays and not answer_keys & arrays.keys():
        missing.add("choices")
    elif "choices" not in arrays:
        missing |= answer_keys - arrays.keys()
    if missing:
        raise DataError(f"{path}: missing arrays {sorted(missing)}")
    validate_pairs(path, arrays["pairs"])
    if "choices" in arrays:
        validate_arrays(path, arrays["pairs"], arrays["choices"], arrays["labels"], arrays["split"])
        choices, answers = torch.from_numpy(arrays["choices"].astype(np.int8)), None
    else:
        choices, answers = None, validate_answers(path, arrays, arrays["answer_rows"], arrays["answer_labels"],
                                                  arrays["answer_choices"])
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    ids = arrays.get("ids")
    if ids is not None and ids.shape != (len(arrays["pairs"]),):
        raise DataError(f"{path}: 'ids' must have shape [N] with N = {len(arrays['pairs'])}, got {list(ids.shape)}")
    return PreferenceData(torch.from_numpy(arrays["pairs"].astype(np.float32)), choices,
                          [str(x) for x in arrays["labels"]], arrays["split"].astype(str), meta, path,
                          None if ids is None else ids.astype(str), answers)


def validate_pairs(path, pairs):
    def fail(problem):
        raise DataError(f"{path}: {problem}")

    if pairs.ndim != 3 or pairs.shape[1] != 2:
        fail(f"'pairs' must have shape [N, 2, D], got {list(pairs.shape)}")
    if pairs.shape[0] == 0:
        fail("no pairs (N = 0)")
    if not np.issubdtype(pairs.dtype, np.number) or not np.isfinite(pairs).all():
        fail("'pairs' holds non-numeric or non-finite (nan/inf) values")


def validate_arrays(path, pairs, choices, labels, split):
    """Checks an (N, L) choices matrix and the arrays beside it (pairs already checked)."""
    if choices.ndim != 2 or choices.shape[0] != pairs.shape[0]:
        raise DataError(f"{path}: 'choices' must have shape [N, L] with N = {pairs.shape[0]}, "
                        f"got {list(choices.shape)}")
    if not np.isin(choices, (-1, 0, 1)).all():
        raise DataError(f"{path}: 'choices' holds values other than -1, 0, 1")
    label_ids, rows = np.nonzero(choices.T >= 0)
    validate_common(path, pairs, labels, split, choices.shape[1], rows, label_ids)


def validate_answers(path, arrays, rows, labels_of, choices_of):
    """Checks answer_rows / answer_labels / answer_choices (pairs already checked) ->
    (rows, labels, choices) tensors sorted by label then row."""
    def fail(problem):
        raise DataError(f"{path}: {problem}")

    n, num_labels = len(arrays["pairs"]), len(arrays["labels"])
    if not (rows.ndim == labels_of.ndim == choices_of.ndim == 1 and len(rows) == len(labels_of) == len(choices_of)):
        fail("'answer_rows', 'answer_labels' and 'answer_choices' must be 1-D arrays of one length")
    if not all(np.issubdtype(a.dtype, np.integer) for a in (rows, labels_of, choices_of)):
        fail("'answer_rows', 'answer_labels' and 'answer_choices' must hold integers")
    if len(rows) and not (0 <= rows.min() and rows.max() < n):
        fail(f"'answer_rows' must lie in [0, N = {n})")
    if len(rows) and not (0 <= labels_of.min() and labels_of.max() < num_labels):
        fail(f"'answer_labels' must lie in [0, L = {num_labels})")
    if not np.isin(choices_of, (0, 1)).all():
        fail("'answer_choices' holds values other than 0, 1")
    order = np.lexsort((rows, labels_of))  # by label, then row
    rows, labels_of, choices_of = rows[order], labels_of[order], choices_of[order]
    if len(rows) > 1 and ((np.diff(rows) == 0) & (np.diff(labels_of) == 0)).any():
        fail("a (row, label) cell is answered twice")
    validate_common(path, arrays["pairs"], arrays["labels"], arrays["split"], num_labels, rows, labels_of)
    return (torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(labels_of.astype(np.int64)),
            torch.from_numpy(choices_of.astype(np.int8)))


def validate_common(path, pairs, labels, split, num_labels, rows, label_ids):
    """Checks labels and split, and that each label answers in one split or in all, given
    the answered cells (rows, label_ids)."""
    def fail(problem):
        raise DataError(f"{path}: {problem}")

    if labels.shape != (num_labels,):
        fail(f"'labels' must have shape [L] with L = {num_labels}, got {list(labels.shape)}")
    if len(set(labels.tolist())) != len(labels):
        fail("'labels' has duplicate names")
    if split.shape != (pairs.shape[0],):
        fail(f"'split' must have shape [N] with N = {pairs.shape[0]}, got {list(split.shape)}")
    unknown = set(split.astype(str).tolist()) - set(SPLITS)
    if unknown:
        fail(f"unknown split names {sorted(unknown)} (expected {list(SPLITS)})")
    present = [s for s in SPLITS if (split == s).any()]
    per_split = np.zeros((len(present), num_labels), dtype=bool)  # (S, L): label answers in split
    for i, s in enumerate(present):
        per_split[i, label_ids[split[rows] == s]] = True
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
    if data.choices is not None:
        return PreferenceData(data.pairs, data.choices[:, columns], list(labels), data.split, data.meta, data.path,
                              data.ids)
    rows, label_ids, values = data.answers
    new_id = torch.full((len(data.labels),), -1, dtype=torch.long)
    new_id[columns] = torch.arange(len(columns))
    keep = new_id[label_ids] >= 0
    rows, label_ids, values = rows[keep], new_id[label_ids[keep]], values[keep]
    order = torch.argsort(label_ids * len(data.pairs) + rows)  # by label, then row
    return PreferenceData(data.pairs, None, list(labels), data.split, data.meta, data.path, data.ids,
                          (rows[order], label_ids[order], values[order]))


# -----------------------------------------------------------------------------
# episodes


class EpisodeSampler:
    """Draws episodes of one label each: a context of n pairs and `num_targets` target
    pairs, all answered by that label and disjoint. Pairs come oriented as
    (chosen, rejected). Vectorised; all randomness from one torch.Generator.
    """

    def __init__(self, data, split, num_targets, max_context, min_context=0, seed=0,
                 size_keys="num_targets + max_context"):  # how the error message names the two settings
        rows, label_ids, values = data.answered()  # sorted by label, then row
        keep = torch.from_numpy(data.split == split)[rows]
        rows, label_ids, values = rows[keep], label_ids[keep], values[keep]
        counts = torch.bincount(label_ids, minlength=len(data.labels))
        self.label_ids = torch.nonzero(counts).squeeze(1)  # labels present in this split
        if len(self.label_ids) == 0:
            raise DataError(f"{data.path}: no answered pairs in split '{split}'")
        needed = num_targets + max_context
        short = [(data.labels[i], int(counts[i])) for i in self.label_ids if counts[i] < needed]
        if short:
            raise DataError(f"{data.path}: label '{short[0][0]}' has {short[0][1]} answered pairs in split "
                            f"'{split}', fewer than {size_keys} = {needed}")
        self.data, self.split = data, split
        self.num_targets, self.min_context, self.max_context = num_targets, min_context, max_context
        self.counts = counts[self.label_ids]  # (L_split,)
        table_row = torch.repeat_interleave(torch.arange(len(self.label_ids)), self.counts)  # (A,)
        position = torch.arange(len(rows)) - (torch.cumsum(self.counts, 0) - self.counts)[table_row]
        shape = (len(self.label_ids), int(self.counts.max()))
        self.table = torch.zeros(shape, dtype=torch.long).index_put_((table_row, position), rows)  # pair indices
        self.choice_table = torch.zeros(shape, dtype=torch.int8).index_put_((table_row, position), values)
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
        choice = self.choice_table[label_rows[:, None], positions].long()  # (B, n_max + T)
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
            "label_ids": self.label_ids[label_rows],  # (B,) columns of data.labels
            "pair_idx": pair_idx,  # (B, n_max + T) rows of the data
            "flipped": choice.bool(),  # (B, n_max + T) True where the second option was chosen
        }

    def _distinct_positions(self, label_rows, k):
        """k distinct positions < counts[label] per row, uniformly without replacement."""
        counts = self.counts[label_rows]  # (B,)
        keys = torch.rand(len(label_rows), self.table.shape[1], generator=self.gen)
        keys[torch.arange(self.table.shape[1])[None] >= counts[:, None]] = 2.0
        return keys.topk(k, dim=1, largest=False).indices  # (B, k)


def train_val_samplers(data, config):
    """The train and val samplers of a training script's config (its train and eval
    sections). Built before any work, so a split too small for its settings stops the
    run with a message naming them."""
    t, e = config["train"], config["eval"]
    train = EpisodeSampler(data, "train", t["num_targets"], t["max_context"], t["min_context"], seed=config["seed"],
                           size_keys="train.num_targets + train.max_context")
    val = EpisodeSampler(data, "val", e["num_targets"], max(e["context_sizes"]), seed=config["seed"] + 1,
                         size_keys="eval.num_targets + the largest of eval.context_sizes")
    return train, val


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


def report_problems(source, problems, kept, skip_bad, unit, how_to_skip):
    """Stops on bad lines or rows, listing the first ten, unless skip_bad: then says how many were skipped."""
    if problems and not skip_bad:
        shown = "\n".join(problems[:10]) + ("\n..." if len(problems) > 10 else "")
        error = DataError(f"{source}: {len(problems)} bad {unit} ({how_to_skip} to drop them):\n{shown}")
        error.problems = problems  # for a caller that has no skip option and words its own message
        raise error
    if problems:
        print(f"{source}: skipped {len(problems)} bad {unit}, kept {kept}")


def read_text_pairs(path, skip_bad=False):
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
    report_problems(path, problems, len(rows), skip_bad, "lines", "pass skip_bad")
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


def last_token_embeddings(model, sequences, pad_id, batch_size=64):
    """Final-layer hidden state at each sequence's last token, (N, H)."""
    return sequence_embeddings(model, sequences, pad_id, batch_size, "last")


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


def toy_tokenizer(vocabulary=None):
    """A word-level Hugging Face tokenizer over a word list (default: the two-type toy
    vocabulary), built in code."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary or toy_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # people type "Tell me about bees." for "tell me about bees ."; the toy texts tokenize as before
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
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
# UltraFeedback: pairs of a prompt's rated completions, as text pairs
#
# A source row has 'instruction' and 'completions'; each completion has 'response' and
# 'annotations' {label: {'Rating': '1'..'5' or 'N/A', ...}}. Every label is a user.

UF_LABELS = ("helpfulness", "honesty", "truthfulness", "instruction_following")
UF_FORMATS = (".jsonl", ".parquet", ".json")  # in this order of preference inside a folder


def download_dataset(name):
    """A local snapshot of the hub dataset `name`, data files only."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, repo_type="dataset", allow_patterns=[f"*{ext}" for ext in UF_FORMATS])
    except Exception as e:  # offline, no such repo, no access
        raise DataError(f"{name}: not a local file or folder, and downloading it from the Hugging Face hub "
                        f"failed ({type(e).__name__}: {e})") from e


def source_files(source):
    """The data files of `source`: a file, a folder (its files of the first format in
    UF_FORMATS found), or else a hub dataset name ('owner/name'), downloaded."""
    if not os.path.exists(source):
        if source.endswith(UF_FORMATS) or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            raise DataError(f"{source}: file not found (give a .json, .jsonl or .parquet file, a folder, "
                            "or a hub dataset name such as openbmb/UltraFeedback)")
        source = download_dataset(source)
    if os.path.isfile(source):
        if not source.endswith(UF_FORMATS):
            raise DataError(f"{source}: unknown format (expected .json, .jsonl or .parquet)")
        return [source]
    for ext in UF_FORMATS:
        files = sorted(glob.glob(os.path.join(source, "**", f"*{ext}"), recursive=True))
        if files:
            return files
    raise DataError(f"{source}: no .jsonl, .parquet or .json files in this folder")


def json_records(path):
    """(where, object, problem) for each record of a JSON-lines file, streamed, or of a
    JSON list (a .json file may be either)."""
    with open(path, "rb") as f:
        is_list = path.endswith(".json") and f.read(4096).lstrip()[:1] == b"["
        f.seek(0)
        if is_list:
            try:
                items = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}: not a valid JSON file ({e})") from e
            yield from ((f"item {i}", item, None) for i, item in enumerate(items))
            return
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line.decode("utf-8")), None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield f"line {number}", None, f"invalid JSON ({getattr(e, 'msg', 'not UTF-8 text')})"


def parquet_records(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                        "or give a .json/.jsonl copy") from None
    try:
        table = pq.read_table(path, columns=["instruction", "completions"])
    except Exception as e:
        raise DataError(f"{path}: not a readable UltraFeedback parquet file ({type(e).__name__}: {e})") from e
    yield from ((f"row {i}", row, None) for i, row in enumerate(table.to_pylist()))


def parse_rating(value):
    """A Rating ('4', '4.5', 4, 'N/A') as a float, None for N/A; ValueError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().upper() == "N/A"):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not math.isfinite(float(value)):
        raise ValueError(value)
    return float(value)


def ultrafeedback_row(row, labels):
    """(instruction, [(response, ratings)]) of one source row, ratings a tuple over
    `labels` with None for N/A. A missing or malformed field raises ValueError naming it."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
        raise ValueError("field 'instruction' is missing, empty or not a string")
    if not isinstance(row.get("completions"), list):
        raise ValueError("field 'completions' is missing or not a list")
    completions = []
    for k, completion in enumerate(row["completions"]):
        if not isinstance(completion, dict) or not isinstance(completion.get("response"), str):
            raise ValueError(f"completions[{k}]: field 'response' is missing or not a string")
        annotations = completion.get("annotations")
        if not isinstance(annotations, dict):
            raise ValueError(f"completions[{k}]: field 'annotations' is missing or not an object")
        ratings = []
        for label in labels:
            if not isinstance(annotations.get(label), dict) or "Rating" not in annotations[label]:
                raise ValueError(f"completions[{k}]: no annotations['{label}']['Rating']")
            try:
                ratings.append(parse_rating(annotations[label]["Rating"]))
            except ValueError:
                raise ValueError(f"completions[{k}]: {label} Rating {annotations[label]['Rating']!r} "
                                 "is neither a number nor 'N/A'") from None
        completions.append((completion["response"], tuple(ratings)))
    return row["instruction"], completions


def read_ultrafeedback(source, labels, skip_bad=False):
    """[(row number, instruction, [(response, ratings)])] for the rows of `source`, numbered
    across its files. Bad rows are reported by file and place; they stop the run unless skip_bad."""
    rows, problems = [], []
    for path in source_files(source):
        records = parquet_records(path) if path.endswith(".parquet") else json_records(path)
        for where, record, problem in records:
            if problem is None:
                try:
                    rows.append((len(rows) + len(problems), *ultrafeedback_row(record, labels)))
                except ValueError as e:
                    problem = str(e)
            if problem is not None:
                problems.append(f"{path}: {where}: {problem}")
    report_problems(source, problems, len(rows), skip_bad, "rows", "set skip_bad_rows")
    return rows


def rating_pair_kind(ratings_a, ratings_b):
    """'n/a' if a label did not rate both, 'tie' if a label rates them alike, else
    'conflict' when the labels disagree on which is better and 'agree' when they don't."""
    if None in ratings_a or None in ratings_b:
        return "n/a"
    if any(a == b for a, b in zip(ratings_a, ratings_b)):
        return "tie"
    return "conflict" if len({a > b for a, b in zip(ratings_a, ratings_b)}) > 1 else "agree"


def ultrafeedback_candidates(records, labels):
    """Every pair i < j of each prompt's completions that is 'conflict' or 'agree', as
    (kind, text-pair row without split, id 'row-i-j') in source order, and the count of each kind."""
    candidates, counts = [], dict.fromkeys(("conflict", "agree", "tie", "n/a", "empty response"), 0)
    for r, prompt, completions in records:
        for i, j in itertools.combinations(range(len(completions)), 2):
            (text_a, ratings_a), (text_b, ratings_b) = completions[i], completions[j]
            kind = rating_pair_kind(ratings_a, ratings_b)
            if kind in ("conflict", "agree") and not (text_a.strip() and text_b.strip()):
                kind = "empty response"
            counts[kind] += 1
            if kind in ("conflict", "agree"):
                choices = {l: int(a < b) for l, a, b in zip(labels, ratings_a, ratings_b)}  # 0: a rated higher
                candidates.append((kind, {"prompt": prompt, "response_a": text_a, "response_b": text_b,
                                          "choices": choices, "id": f"{r}-{i}-{j}"}))
    return candidates, counts


def conflict_mix(num_conflicting, num_agreeing, fraction):
    """(conflicting, agreeing) pair counts, as many pairs as there are, of which
    conflicting ones make up `fraction`."""
    if fraction == 1:
        return num_conflicting, 0
    if fraction == 0:
        return 0, num_agreeing
    total = min(num_conflicting / fraction, num_agreeing / (1 - fraction))
    return min(num_conflicting, round(total * fraction)), min(num_agreeing, round(total * (1 - fraction)))


def subsample(items, k, gen):
    return [items[i] for i in torch.randperm(len(items), generator=gen)[:k].tolist()]


def make_ultrafeedback_pairs(records, labels, conflict_fraction=1.0, seed=0):
    """Text-pair rows (with split and id) from UltraFeedback records: pairs with a tie or
    N/A in any label are dropped; conflicting pairs make up `conflict_fraction` of the
    rest, subsampled with `seed`; prompts are split 80/10/10. Returns (rows, counts)."""
    candidates, counts = ultrafeedback_candidates(records, labels)
    gen = torch.Generator().manual_seed(seed)
    conflicting, agreeing = ([n for n, (kind, _) in enumerate(candidates) if kind == k] for k in ("conflict", "agree"))
    num_conflicting, num_agreeing = conflict_mix(len(conflicting), len(agreeing), conflict_fraction)
    keep = subsample(conflicting, num_conflicting, gen) + subsample(agreeing, num_agreeing, gen)
    rows = [candidates[n][1] for n in sorted(keep)]  # source order
    prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    prompt_split = dict(zip(prompts, random_split(len(prompts), gen)))
    rows = [dict(row, split=str(prompt_split[row["prompt"]])) for row in rows]
    return rows, dict(counts, kept_conflict=num_conflicting, kept_agree=num_agreeing)


def describe_text_pairs(rows, labels):
    """Pairs and prompts per split, and per label how many pairs it answers with a or b."""
    lines = []
    for name in SPLITS + ("all",):
        part = [row for row in rows if name in ("all", row.get("split", "train"))]
        votes = ", ".join(f"{l} {sum(r['choices'].get(l) == 0 for r in part)} a / "
                          f"{sum(r['choices'].get(l) == 1 for r in part)} b" for l in labels)
        lines.append(f"  {name:5s}: {len(part)} pairs, {len({r['prompt'] for r in part})} prompts; {votes}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# embed: features of text pairs from any transformers model, resumable


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


def check_lengths(path, sequences, max_length):
    """Refuse pairs longer than max_length: embed never truncates and never drops a pair."""
    long_rows = [i // 2 for i in range(0, len(sequences), 2) if max(map(len, sequences[i:i + 2])) > max_length]
    if long_rows:
        raise DataError(f"{path}: {len(long_rows)} of {len(sequences) // 2} pairs are longer than max_length = "
                        f"{max_length} tokens (prompt + response; first at row {long_rows[0]}). Raise --max_length "
                        "or remove them from the JSONL: the features must stay row-aligned with it")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path, write):
    """write(file object) to a temp file, then rename it over `path`."""
    with open(f"{path}.tmp", "wb") as f:
        write(f)
    os.replace(f"{path}.tmp", path)


def load_partial(folder, fingerprint):
    """The finished chunks (arrays) of an earlier run with the same fingerprint, in
    order; [] (and the folder reset) if there are none or they came from another run."""
    path = os.path.join(folder, "fingerprint.json")
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == json.dumps(fingerprint):
                chunks = []
                while os.path.exists(chunk := os.path.join(folder, f"chunk{len(chunks):06d}.npy")):
                    chunks.append(np.load(chunk))
                return chunks
        print(f"{folder}: progress of another model, input or setting; starting over")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    write_atomic(path, lambda f: f.write(json.dumps(fingerprint).encode()))
    return []


def resumable_embeddings(model, sequences, pad_id, pooling, batch_size, save_every, folder, fingerprint):
    """sequence_embeddings (N, H) computed a chunk of save_every batches at a time, in
    length order; each finished chunk is saved in `folder`, so a rerun after an
    interruption continues where it stopped, with the same batches and results."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    size = batch_size * save_every
    chunks = load_partial(folder, fingerprint)
    progress = tqdm(total=len(order), initial=min(len(order), len(chunks) * size), desc="embed", unit="seq")
    for start in range(len(chunks) * size, len(order), size):
        rows = order[start:start + size]
        chunk = sequence_embeddings(model, [sequences[i] for i in rows], pad_id, batch_size, pooling).numpy()
        write_atomic(os.path.join(folder, f"chunk{len(chunks):06d}.npy"), lambda f: np.save(f, chunk))
        chunks.append(chunk)
        progress.update(len(rows))
    progress.close()
    embeddings = torch.empty(len(order), chunks[0].shape[1])
    embeddings[torch.tensor(order)] = torch.from_numpy(np.concatenate(chunks))
    return embeddings


def embed_text_pairs(model_name, in_path, out_path, batch_size=16, max_length=1024, device="auto",
                     save_every=20, trust_remote_code=False):
    """Writes the feature-pair .npz of a text-pair JSONL, row-aligned with it (ids from
    its 'id' fields); progress lives in OUT.partial/ until the file is written."""
    rows = read_text_pairs(in_path)
    if not rows:
        raise DataError(f"{in_path}: no pairs")
    device = pick_device(device)
    tokenizer, model, pooling = load_embedder(model_name, device, trust_remote_code)
    sequences = embedding_sequences(rows, tokenizer, pooling)
    check_lengths(in_path, sequences, max_length)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)  # masked anyway
    fingerprint = {"model": model_name, "input_sha256": file_sha256(in_path), "pooling": pooling,
                   "dtype": str(next(model.parameters()).dtype), "device": device.type,
                   "batch_size": batch_size, "save_every": save_every, "num_sequences": len(sequences)}
    folder = f"{out_path}.partial"
    features = resumable_embeddings(model, sequences, pad_id, pooling, batch_size, save_every, folder, fingerprint)
    data = text_pairs_to_data(rows, features.view(len(rows), 2, -1), out_path)  # (N, 2, H)
    data.meta = {"embedder": model_name, "pooling": pooling}
    save_pairs(out_path, data)
    shutil.rmtree(folder)
    return data


# -----------------------------------------------------------------------------
# command line

DEFAULTS = {
    "out": REQUIRED,  # where to write the .npz
    "generator": "paper",  # paper | waves | linear
    "num_pairs": 20000,  # pairs (paper, waves, linear with user types)
    "seed": 0,  # generator seed
    "dim": 8,  # option features (linear)
    "num_types": 2,  # user types answering every pair (waves, linear)
    "waves": 2,  # sine harmonics in each type's 1-D reward (waves)
    "num_users": 0,  # > 0: a continuous population of users instead of types (linear)
    "pairs_per_user": 40,  # pairs each user answers (linear, num_users > 0)
    "temperature": 0.0,  # 0: deterministic choices; > 0: Bradley-Terry sampling (waves, linear)
    "overwrite": False,  # replace an existing --out (runs may have been trained on it)
}


def describe(data):
    lines = [f"{len(data.pairs)} pairs of dimension {data.dim}, {len(data.labels)} labels"]
    rows = data.answered()[0]
    for s in SPLITS:
        in_split = torch.from_numpy(data.split == s)
        answered = int(in_split[rows].sum())
        lines.append(f"  {s:5s}: {int(in_split.sum())} pairs, {answered} answered (pair, label) cells")
    return "\n".join(lines)


UF_DEFAULTS = {
    "source": "openbmb/UltraFeedback",  # hub dataset name, or a local .json/.jsonl/.parquet file or folder
    "out": REQUIRED,  # folder: pairs.jsonl goes there
    "overwrite": False,  # replace an existing OUT/pairs.jsonl
    "labels": ["helpfulness", "honesty"],  # the users (HH); add truthfulness for HHT
    "conflict_fraction": 1.0,  # share of the pairs the labels rank oppositely (the paper: 1.0)
    "seed": 0,  # subsampling and the split by prompt
    "skip_bad_rows": False,  # drop malformed source rows instead of stopping
}

EMBED_DEFAULTS = {
    "model": REQUIRED,  # hub name or local path of a transformers decoder or encoder
    "in": REQUIRED,  # text pairs (JSONL)
    "out": REQUIRED,  # the feature-pair .npz to write
    "overwrite": False,  # replace an existing --out
    "batch_size": 16,  # sequences per forward
    "max_length": 1024,  # most tokens of prompt + response; a longer pair is an error
    "device": "auto",  # auto = cuda if available, else cpu (bf16 on GPU)
    "save_every": 20,  # batches between saves of the progress to OUT.partial/
    "trust_remote_code": False,  # let transformers run code from the model's repo
}


def check_out_path(key, path, folder=False):
    """Before any work: `path` (a file to write, or a folder with folder=True) is not the
    other kind of thing, and it can be created and written. ConfigError naming `key`."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"config key '{key}': {path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise ConfigError(f"config key '{key}': {path} is a folder: give the file to write in it")
    parent = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"config key '{key}': cannot create {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"config key '{key}': cannot write to {path} (no permission in {parent})")


def check_not_there(path, overwrite):
    """A dataset is never replaced by accident: runs may have been trained on it."""
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"config key 'out': {path} exists (a run may have been trained on it): "
                          "replace it with --overwrite, or write elsewhere")


def synthetic_command(config):
    check(config["generator"] in ("paper", "waves", "linear"), "generator",
          f"unknown generator '{config['generator']}' (paper | waves | linear)")
    check_positive(config, "num_pairs", "dim", "num_types", "waves", "pairs_per_user")
    check(config["num_users"] >= 0 and config["temperature"] >= 0, "num_users",
          "num_users and temperature must be non-negative")
    check_out_path("out", config["out"])
    check_not_there(config["out"], config["overwrite"])
    if config["generator"] == "paper":
        data = make_paper_synthetic(config["num_pairs"], config["seed"])
    elif config["generator"] == "waves":
        keys = ("num_pairs", "num_types", "temperature", "waves", "seed")
        data = make_waves_synthetic(**{k: config[k] for k in keys})
    else:
        keys = ("num_pairs", "dim", "num_types", "temperature", "num_users", "pairs_per_user", "seed")
        data = make_linear_synthetic(**{k: config[k] for k in keys})
    save_pairs(config["out"], data)
    print(f"wrote {config['out']}: {describe(data)}")


def ultrafeedback_command(config):
    labels, fraction = config["labels"], config["conflict_fraction"]
    for label in labels:
        check(label in UF_LABELS, "labels", f"unknown label '{label}' (known: {', '.join(UF_LABELS)})")
    check(len(set(labels)) == len(labels) >= 2, "labels", "must name at least two distinct labels")
    check(0 <= fraction <= 1, "conflict_fraction", "must lie in [0, 1]")
    check_out_path("out", config["out"], folder=True)
    check_not_there(os.path.join(config["out"], "pairs.jsonl"), config["overwrite"])
    records = read_ultrafeedback(config["source"], labels, config["skip_bad_rows"])
    rows, counts = make_ultrafeedback_pairs(records, labels, fraction, config["seed"])
    if not rows:
        raise DataError(f"{config['source']}: no pairs left ({counts})")
    path = os.path.join(config["out"], "pairs.jsonl")
    write_text_pairs(path, rows)
    print(f"{len(records)} prompts: {sum(counts[k] for k in ('conflict', 'agree', 'tie', 'n/a', 'empty response'))} "
          f"pairs of completions; dropped {counts['tie']} with a tie, {counts['n/a']} with N/A, "
          f"{counts['empty response']} with an empty response; kept {counts['kept_conflict']} of "
          f"{counts['conflict']} conflicting and {counts['kept_agree']} of {counts['agree']} agreeing")
    print(f"wrote {path}: {len(rows)} pairs, labels {', '.join(labels)}\n{describe_text_pairs(rows, labels)}")
    return rows


def embed_command(config):
    check(config["batch_size"] > 0, "batch_size", "must be positive")
    check(config["save_every"] > 0, "save_every", "must be positive")
    check(config["max_length"] > 0, "max_length", "must be positive")
    check_out_path("out", config["out"])
    check_not_there(config["out"], config["overwrite"])
    data = embed_text_pairs(config["model"], config["in"], config["out"], config["batch_size"], config["max_length"],
                            config["device"], config["save_every"], config["trust_remote_code"])
    print(f"wrote {config['out']} ({data.meta['pooling']} pooling): {describe(data)}")
    return data


COMMANDS = {"synthetic": (DEFAULTS, synthetic_command), "ultrafeedback": (UF_DEFAULTS, ultrafeedback_command),
            "embed": (EMBED_DEFAULTS, embed_command)}


USAGE = "usage: python data.py synthetic|ultrafeedback|embed [--key=value ...] (python data.py --help for examples)"


def main(argv):
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(USAGE + (f"; unknown command '{argv[0]}'" if argv else ""))
    defaults, command = COMMANDS[argv[0]]
    config, rest = load_config(defaults, argv[1:])
    if rest:
        raise ConfigError(f"unexpected arguments {rest} (give --key=value overrides)")
    print_config(config)
    return command(config)


if __name__ == "__main__":
    run_script(main)
