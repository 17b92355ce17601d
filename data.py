"""
Preference data: the on-disk format every trainer reads, the episode sampler for
meta-training, the synthetic generators and their Bayes-optimal references.

On-disk format (`.npz`), one row per pair of options:
    pairs    float32 [N, 2, D]  features of the two options
    choices  int8    [N, L]     per label: 0 = first preferred, 1 = second, -1 = unknown or tie
    labels   str     [L]        names of the user types / annotators
    split    str     [N]        'train', 'val' or 'test'
    meta     str     []         optional JSON: the generator (for Bayes-optimal accuracy) or the embedder
    ids      str     [N]        optional: the text pair each row came from (its JSONL 'id', else its row number)

Write one with prepare/synthetic.py, or from text pairs with prepare/embed.py (text.py).

Departures from the paper's code:
1. Context and target pairs of an episode are drawn disjoint, and only targets are
   scored. The paper's code draws the context out of the targets and scores target
   positions n..N as unseen, although about half of them are context pairs.
2. A label (user) may answer pairs in one split only, so test users can be users the
   model never saw; a label answering in several splits must answer in all of them.
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from common import UserError
from runs import resolve_path

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
                          num_users=0, pairs_per_user=40, seed=0, test_pairs_per_user=0):
    """Linear rewards r(x) = w . x on options x ~ U[0,1]^D, with unit-norm weights w.

    num_users == 0: `num_types` user types answer every pair; pairs split 80/10/10.
    num_users > 0: a continuous population, each user with its own w ~ N(0, I), answers
    `pairs_per_user` pairs of its own; whole users are split 80/10/10. Test users answer
    `test_pairs_per_user` if larger (a pool to choose questions from): the extra pairs
    come after the others from a second stream, so every other row is as without them.
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
    options, split = options.reshape(-1, 2, dim), np.repeat(user_split, pairs_per_user)
    testers = torch.from_numpy(np.flatnonzero(user_split == "test")).repeat_interleave(
        max(0, test_pairs_per_user - pairs_per_user))
    if len(testers):
        extra_gen = torch.Generator().manual_seed(seed + 1)
        extra = torch.rand(len(testers), 2, dim, generator=extra_gen)
        extra_own = choose((extra * weights[testers, None, :]).sum(-1)[..., None], temperature, extra_gen)[:, 0]
        rows = torch.arange(len(options), len(options) + len(testers))
        answers = tuple(torch.cat(pair) for pair in zip(answers, (rows, testers, extra_own)))
        options, split = torch.cat([options, extra]), np.concatenate([split, np.full(len(testers), "test")])
    meta = {"generator": "linear_population", "temperature": temperature}
    return PreferenceData(options, None, [f"user{u}" for u in range(num_users)], split, meta, answers=answers)


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
        self.active, self.active_fraction = None, 0.0  # set by train_policy.py's train.active_selector

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
        positions = self._distinct_positions(label_rows, n_max + self.num_targets, n_max)
        pair_idx = self.table[label_rows[:, None], positions]  # (B, n_max + T)
        choice = self.choice_table[label_rows[:, None], positions].long()  # (B, n_max + T)
        oriented = chosen_first(self.data.pairs[pair_idx], choice.bool())  # (B, n_max + T, 2, D)
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

    def _distinct_positions(self, label_rows, k, n_max):
        """k distinct positions < counts[label] per row, uniformly without replacement (in a share of
        rows with self.active set, the first n_max are the chosen ones, in order)."""
        counts = self.counts[label_rows]  # (B,)
        keys = torch.rand(len(label_rows), self.table.shape[1], generator=self.gen)
        keys[torch.arange(self.table.shape[1])[None] >= counts[:, None]] = 2.0
        if self.active is not None:  # in a share of episodes the context is the questions asked first, in order
            first = torch.rand(len(label_rows), generator=self.gen) < self.active_fraction
            chosen = self.active[label_rows[first], :n_max]  # the rest stay random: never targets by being chosen
            keys[first] = keys[first].scatter(1, chosen, torch.linspace(-2.0, -1.0, n_max).expand_as(chosen))
        return keys.topk(k, dim=1, largest=False).indices  # (B, k)


def choice_correct(log_prob):
    """The one correctness rule, from a predicted log P(chosen option) (any shape): 1 where the
    chosen option is predicted, 0 where the rejected one is, 0.5 at a tie."""
    half = torch.log(torch.tensor(0.5, dtype=log_prob.dtype))
    return (log_prob > half).float() + 0.5 * (log_prob == half).float()


def chosen_first(pairs, second):
    """Pairs (..., 2, D) with the chosen option first: `second` (...) is True where the
    second option was chosen. The one place an answer orients a pair."""
    second = torch.as_tensor(second, device=pairs.device)
    return torch.where(second[..., None, None], pairs.flip(-2), pairs)


def to_device(batch, device):
    """An episode batch (a dict of tensors) on `device`."""
    return {k: v.to(device) for k, v in batch.items()}


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
# summaries and file fingerprints


def describe(data):
    """Pairs, dimension, labels and answered cells per split, for a summary line."""
    lines = [f"{len(data.pairs)} pairs of dimension {data.dim}, {len(data.labels)} labels"]
    rows = data.answered()[0]
    for s in SPLITS:
        in_split = torch.from_numpy(data.split == s)
        answered = int(in_split[rows].sum())
        lines.append(f"  {s:5s}: {int(in_split.sum())} pairs, {answered} answered (pair, label) cells")
    return "\n".join(lines)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# a reward run's data

GENERATED_PATHS = {"paper": "data/paper_synthetic.npz", "linear": "data/linear_synthetic.npz"}


def load_training_data(data_config, checkpoint=None):
    """Load data.path. A missing file is generated only at its generator's default path
    (or with data.generate): a mistyped path is an error, never a new dataset. A resumed
    run never generates: it finds its data from here or from where it was trained."""
    path, generator = data_config["path"], data_config["synthetic"]
    if checkpoint is not None:
        path, generator = resolve_path(path, checkpoint), None
    if not os.path.exists(path) and generator is not None:
        if os.path.normpath(path) != GENERATED_PATHS[generator] and not data_config["generate"]:
            raise DataError(f"data.path: {path} not found (to generate the '{generator}' task there, "
                            "add --data.generate)")
        print(f"{path} not found: generating the '{generator}' synthetic task there")
        save_pairs(path, make_paper_synthetic() if generator == "paper" else make_linear_synthetic())
    data = load_pairs(path)
    data.meta["sha256"] = file_sha256(path)  # a resumed run checks that its data did not change
    return select_labels(data, data_config["labels"]) if data_config["labels"] else data
