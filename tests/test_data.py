import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import text
import toy
from common import ConfigError
from conftest import REPO, prepare_main
from data import (DataError, EpisodeSampler, load_pairs, make_linear_synthetic, make_paper_synthetic, paper_rewards,
                  save_pairs)
from bayes import bayes_log_prob_chosen, population_log_prob_chosen
from prepare import embed as embed_script
from prepare import ultrafeedback as uf
from data import choice_correct


@pytest.fixture(scope="module")
def paper():
    return make_paper_synthetic(num_pairs=2000, seed=0)


@pytest.fixture(scope="module")
def population():
    return make_linear_synthetic(num_users=50, pairs_per_user=40, dim=3, seed=0)


def assert_oriented_chosen_first(dataset, batch, label_idx):
    """Every pair of every episode is answered by its label (label_idx (B,) into dataset.labels)
    and comes as (chosen, rejected)."""
    pair_idx = batch["pair_idx"]  # (B, n + T)
    choices = dataset.choices if dataset.choices is not None else dense_copy(dataset).choices
    choice = choices[pair_idx, label_idx[:, None]].long()  # (B, n + T)
    assert (choice >= 0).all()
    stored = dataset.pairs[pair_idx]  # (B, n + T, 2, D)
    expected = torch.where(choice.bool()[..., None, None], stored.flip(2), stored)
    assert torch.equal(torch.cat([batch["context"], batch["targets"]], 1), expected)
    assert torch.equal(batch["flipped"], choice.bool())


# -----------------------------------------------------------------------------
# generators


def test_paper_synthetic_choices_follow_the_paper_rewards(paper):
    rewards = paper_rewards(paper.pairs[..., 0])  # (N, 2, K)
    assert torch.equal(paper.choices.long(), (rewards[:, 1] > rewards[:, 0]).long())
    assert paper.labels == ["type0", "type1"] and paper.dim == 1
    assert [int((paper.split == s).sum()) for s in data.SPLITS] == [1600, 200, 200]


def test_paper_rewards_by_hand():
    y = torch.tensor([0.1, 0.49, 0.5, 0.8])
    assert torch.allclose(paper_rewards(y), torch.tensor([[0.1, 0.1], [0.49, 0.49], [1.0, 0.5], [1.6, 0.2]]))


def test_linear_types_follow_their_weights():
    d = make_linear_synthetic(num_pairs=500, dim=4, num_types=3, seed=1)
    weights = torch.tensor(d.meta["weights"])  # (K, D)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(3))
    rewards = d.pairs @ weights.T  # (N, 2, K)
    assert torch.equal(d.choices.long(), (rewards[:, 1] > rewards[:, 0]).long())


def test_population_users_stay_in_one_split(population):
    assert population.choices is None  # only the answered cells: no (pairs x users) matrix
    rows, labels, _ = population.answered()
    assert torch.equal(torch.bincount(rows), torch.ones(len(population.pairs), dtype=torch.long))  # one user a pair
    assert (torch.bincount(labels) == 40).all()
    for label in range(len(population.labels)):
        assert len(set(population.split[rows[labels == label].numpy()])) == 1


def dense_copy(data):
    """The same data with its choices as an (N, L) matrix."""
    rows, labels, values = data.answered()
    choices = torch.full((len(data.pairs), len(data.labels)), -1, dtype=torch.int8)
    choices[rows, labels] = values
    return type(data)(data.pairs, choices, data.labels, data.split, data.meta)


def test_a_population_samples_and_saves_as_its_dense_twin(tmp_path, population):
    dense = dense_copy(population)
    for twin in (dense, population):
        rows, labels, values = twin.answered()
        assert torch.equal(rows, population.answers[0]) and torch.equal(values, population.answers[2])
    batches = [EpisodeSampler(d, "train", 20, 10, seed=3).sample(64) for d in (dense, population)]
    assert all(torch.equal(batches[0][k], batches[1][k]) for k in batches[0])
    path = str(tmp_path / "pop.npz")
    save_pairs(path, population)
    with np.load(path) as f:
        assert "choices" not in f.files and len(f["answer_rows"]) == len(population.pairs)
    loaded = load_pairs(path)
    assert loaded.choices is None and all(torch.equal(a, b) for a, b in zip(loaded.answers, population.answers))
    assert loaded.labels == population.labels and (loaded.split == population.split).all()
    only = data.select_labels(loaded, ["user7", "user3"])
    assert only.labels == ["user7", "user3"] and torch.equal(torch.unique(only.answers[1]), torch.tensor([0, 1]))
    assert torch.equal(only.answers[0][only.answers[1] == 0], population.answers[0][population.answers[1] == 7])


@pytest.mark.parametrize("change, message", [
    (dict(answer_choices=np.full(2000, 2, np.int8)), "'answer_choices' holds values other than 0, 1"),
    (dict(answer_rows=np.arange(2000) + 1), r"'answer_rows' must lie in \[0, N = 2000\)"),
    (dict(answer_labels=np.full(2000, 50)), r"'answer_labels' must lie in \[0, L = 50\)"),
    (dict(answer_rows=np.zeros(2000, np.int64)), "a \\(row, label\\) cell is answered twice"),
    (dict(answer_rows=np.arange(1999)), "must be 1-D arrays of one length"),
    (dict(answer_rows=None), r"missing arrays \['answer_rows'\]"),
    (dict(answer_labels=np.maximum(np.arange(2000) // 40, 1)), "label 'user0' has no answered pair$"),
])
def test_bad_answer_arrays_name_the_problem(tmp_path, population, change, message):
    path = str(tmp_path / "pop.npz")
    save_pairs(path, population)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_pairs(path)


# -----------------------------------------------------------------------------
# on-disk format


def test_save_load_round_trip(tmp_path, paper):
    path = str(tmp_path / "sub" / "paper.npz")
    save_pairs(path, paper)
    assert os.listdir(tmp_path / "sub") == ["paper.npz"]  # no temp file left
    loaded = load_pairs(path)
    assert torch.equal(loaded.pairs, paper.pairs) and torch.equal(loaded.choices, paper.choices)
    assert loaded.labels == paper.labels and (loaded.split == paper.split).all()
    assert loaded.meta == paper.meta and loaded.path == path


def test_cli_writes_a_loadable_file(tmp_path):
    path = str(tmp_path / "lin.npz")
    prepare_main(["synthetic", "--generator=linear", "--num_pairs=300", "--dim=3", f"--out={path}"])
    assert load_pairs(path).pairs.shape == (300, 2, 3)


def test_cli_requires_out():
    with pytest.raises(ConfigError, match="config key 'out': a value is required"):
        prepare_main(["synthetic"])


def valid_arrays():
    return {"pairs": np.random.rand(6, 2, 1).astype(np.float32), "choices": np.zeros((6, 2), np.int8),
            "labels": np.array(["a", "b"]), "split": np.array(["train", "train", "val", "val", "test", "test"])}


def write_npz(tmp_path, **changes):
    """A valid file with some arrays replaced (None drops one)."""
    arrays = {k: v for k, v in dict(valid_arrays(), **changes).items() if v is not None}
    path = str(tmp_path / "pairs.npz")
    np.savez(path, **arrays)
    return path


def assert_data_error(path, message):
    with pytest.raises(DataError) as error:
        load_pairs(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def choices_with(rows, column, value=-1):
    choices = np.zeros((6, 2), np.int8)
    choices[rows, column] = value
    return choices


def test_valid_file_loads(tmp_path):
    d = load_pairs(write_npz(tmp_path))
    assert d.pairs.shape == (6, 2, 1) and d.labels == ["a", "b"] and d.meta == {}


def test_label_answering_in_one_split_only_is_accepted(tmp_path):
    load_pairs(write_npz(tmp_path, choices=choices_with(slice(2, 6), 1)))


def test_missing_file(tmp_path):
    assert_data_error(str(tmp_path / "nope.npz"), "file not found")


def test_not_an_npz(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("pairs,choices\n1,2\n")
    assert_data_error(str(path), "not a readable .npz file")


def test_missing_array(tmp_path):
    assert_data_error(write_npz(tmp_path, choices=None), "missing arrays ['choices']")


def test_wrong_pairs_shape(tmp_path):
    assert_data_error(write_npz(tmp_path, pairs=np.zeros((6, 3, 1))), "'pairs' must have shape [N, 2, D], got [6, 3, 1]")


def test_non_finite_pairs(tmp_path):
    pairs = valid_arrays()["pairs"]
    pairs[3, 1, 0] = np.nan
    assert_data_error(write_npz(tmp_path, pairs=pairs), "non-finite")


def test_choices_rows_mismatch(tmp_path):
    assert_data_error(write_npz(tmp_path, choices=np.zeros((5, 2), np.int8)), "'choices' must have shape [N, L] with N = 6")


def test_bad_choice_values(tmp_path):
    assert_data_error(write_npz(tmp_path, choices=choices_with(0, 0, 2)), "'choices' holds values other than -1, 0, 1")


def test_labels_length_mismatch(tmp_path):
    assert_data_error(write_npz(tmp_path, labels=np.array(["a", "b", "c"])), "'labels' must have shape [L] with L = 2")


def test_duplicate_labels(tmp_path):
    assert_data_error(write_npz(tmp_path, labels=np.array(["a", "a"])), "'labels' has duplicate names")


def test_split_length_mismatch(tmp_path):
    assert_data_error(write_npz(tmp_path, split=np.array(["train"] * 5)), "'split' must have shape [N] with N = 6")


def test_unknown_split_name(tmp_path):
    split = np.array(["train", "train", "dev", "val", "test", "test"])
    assert_data_error(write_npz(tmp_path, split=split), "unknown split names ['dev']")


def test_label_with_no_answered_pair(tmp_path):
    assert_data_error(write_npz(tmp_path, choices=choices_with(slice(None), 1)), "label 'b' has no answered pair")


def test_label_missing_from_one_split_it_should_answer_in(tmp_path):
    path = write_npz(tmp_path, choices=choices_with(slice(4, 6), 1))  # b answers in train and val, not test
    assert_data_error(path, "label 'b' has no answered pair in split 'test'")


def test_empty_file(tmp_path):
    path = write_npz(tmp_path, pairs=np.zeros((0, 2, 1), np.float32), choices=np.zeros((0, 2), np.int8),
                     split=np.array([], dtype=str))
    assert_data_error(path, "no pairs (N = 0)")


def test_select_labels(paper):
    only = data.select_labels(paper, ["type1"])
    assert only.labels == ["type1"] and torch.equal(only.choices[:, 0], paper.choices[:, 1])
    with pytest.raises(DataError, match="no label 'type7'"):
        data.select_labels(paper, ["type7"])


# -----------------------------------------------------------------------------
# episodes


def test_one_label_per_episode_oriented_by_the_paper_rewards(paper):
    sampler = EpisodeSampler(paper, "train", num_targets=8, max_context=5, seed=0)
    batch = sampler.sample(64)
    pairs = torch.cat([batch["context"], batch["targets"]], 1)[..., 0]  # (B, n + T, 2)
    rewards = paper_rewards(pairs)  # (B, n + T, 2, K)
    label = batch["label_rows"]  # both types are present, so rows are label ids
    own = rewards[torch.arange(64), :, :, label]  # (B, n + T, 2)
    assert (own[..., 0] > own[..., 1]).all()
    assert set(label.tolist()) == {0, 1}
    assert_oriented_chosen_first(paper, batch, label)


def test_context_and_targets_are_disjoint(paper):
    batch = EpisodeSampler(paper, "val", num_targets=20, max_context=10).sample(32)
    assert batch["pair_idx"].shape == (32, 30)
    assert all(len(set(row.tolist())) == 30 for row in batch["pair_idx"])
    assert (paper.split[batch["pair_idx"].numpy()] == "val").all()


def test_context_mask_matches_n(paper):
    sampler = EpisodeSampler(paper, "train", num_targets=4, max_context=6, min_context=2, seed=1)
    batch = sampler.sample(200)
    n = batch["context_mask"].sum(1)
    assert n.min() == 2 and n.max() == 6
    assert torch.equal(batch["context_mask"], torch.arange(6)[None] < n[:, None])  # real pairs first
    fixed = sampler.sample(5, num_context=3)
    assert fixed["context"].shape == (5, 3, 2, 1) and fixed["context_mask"].all()
    assert sampler.sample(5, num_context=0)["context"].shape == (5, 0, 2, 1)


def test_sampler_is_seeded(paper):
    def batches(seed):
        sampler = EpisodeSampler(paper, "train", num_targets=4, max_context=3, seed=seed)
        return [sampler.sample(8), sampler.sample(8)]

    for a, b in zip(batches(5), batches(5)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(batches(5)[0]["pair_idx"], batches(6)[0]["pair_idx"])


def test_label_rows_are_honoured(paper):
    sampler = EpisodeSampler(paper, "test", num_targets=5, max_context=3)
    rows = torch.tensor([1, 1, 0, 1])
    batch = sampler.sample(4, num_context=2, label_rows=rows)
    assert torch.equal(batch["label_rows"], rows)
    assert_oriented_chosen_first(paper, batch, rows)


def test_population_test_users_never_appear_in_train(population):
    train = EpisodeSampler(population, "train", num_targets=10, max_context=10)
    test = EpisodeSampler(population, "test", num_targets=10, max_context=10)
    assert len(train.labels) == 40 and len(test.labels) == 5
    assert not set(train.labels) & set(test.labels)
    batch = test.sample(50)
    users = test.label_ids[batch["label_rows"]]  # (B,) label ids
    assert (batch["pair_idx"] // 40 == users[:, None]).all()  # each user's own pairs
    assert_oriented_chosen_first(population, batch, users)


def test_too_few_pairs_names_the_label(population):
    with pytest.raises(DataError, match=r"label 'user\d+' has 40 answered pairs in split 'train', fewer than "
                                        r"num_targets \+ max_context = 41"):
        EpisodeSampler(population, "train", num_targets=21, max_context=20)


def test_split_without_answered_pairs(paper):
    only_train = data.PreferenceData(paper.pairs, paper.choices, paper.labels, np.full(len(paper.pairs), "train"), {})
    with pytest.raises(DataError, match="no answered pairs in split 'val'"):
        EpisodeSampler(only_train, "val", num_targets=1, max_context=1)


def test_num_context_above_max_context_is_refused():
    choices = torch.zeros(100, 2, dtype=torch.int8)
    choices[35:, 1] = -1  # label b answers 35 pairs, enough for max_context + num_targets = 15
    d = data.PreferenceData(torch.rand(100, 2, 1), choices, ["a", "b"], np.full(100, "train"), {})
    sampler = EpisodeSampler(d, "train", num_targets=10, max_context=5)
    with pytest.raises(ValueError, match="num_context"):
        sampler.sample(4, num_context=30, label_rows=torch.tensor([1, 1, 1, 1]))


# -----------------------------------------------------------------------------
# Bayes-optimal predictor


def test_bayes_optimal_on_the_paper_task_is_one_minus_half_to_the_n_plus_2():
    d = make_paper_synthetic(num_pairs=10000, seed=1)
    sampler = EpisodeSampler(d, "train", num_targets=20, max_context=5, seed=0)  # 8000 pairs per label
    for n in (0, 1, 2, 3, 5):
        batch = sampler.sample(1000, num_context=n)  # standard error about 0.002 at n = 0
        accuracy = choice_correct(bayes_log_prob_chosen(d.meta, batch)).mean().item()
        assert accuracy == pytest.approx(1 - 0.5 ** (n + 2), abs=0.01), n


def test_bayes_posterior_is_certain_after_a_conflicting_pair():
    meta = {"generator": "paper", "temperature": 0.0}
    conflict = torch.tensor([[0.9], [0.6]])  # type0 prefers 0.9, type1 prefers 0.6
    agree = torch.tensor([[0.3], [0.1]])  # both prefer 0.3
    batch = {"context": torch.stack([conflict, agree])[None], "context_mask": torch.tensor([[True, True]]),
             "targets": torch.stack([torch.tensor([[0.7], [0.8]]), agree])[None]}
    # the context says type0, who prefers 0.8 to 0.7: the chosen-first target (0.7, 0.8) has probability 0
    log_prob = bayes_log_prob_chosen(meta, batch)
    assert torch.equal(log_prob.exp(), torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    masked = bayes_log_prob_chosen(meta, dict(batch, context_mask=torch.tensor([[False, True]])))
    assert torch.allclose(masked.exp(), torch.tensor([[0.5, 1.0]], dtype=torch.float64))


def test_bayes_is_none_for_an_unknown_generator(population):
    batch = EpisodeSampler(population, "train", num_targets=2, max_context=2).sample(3)
    assert bayes_log_prob_chosen({"generator": "embedder"}, batch) is None


def one_dim_episode(context_pairs, target_pairs):
    """A batch of one episode on 1-D options: a population of users w = +1 or -1 (the unit sphere in 1-D)."""
    context = torch.tensor(context_pairs, dtype=torch.float32).view(1, -1, 2, 1)
    return {"context": context, "context_mask": torch.ones(context.shape[:2], dtype=torch.bool),
            "targets": torch.tensor(target_pairs, dtype=torch.float32).view(1, -1, 2, 1)}


def test_population_bayes_by_hand_deterministic_users():
    batch = one_dim_episode([[0.9, 0.2]], [[0.7, 0.3], [0.3, 0.7]])  # chose the larger: w = +1
    meta = {"generator": "linear_population", "temperature": 0.0}
    assert torch.allclose(bayes_log_prob_chosen(meta, batch).exp(), torch.tensor([[1.0, 0.0]]))
    no_context = dict(batch, context_mask=torch.zeros(1, 1, dtype=torch.bool))
    assert torch.allclose(bayes_log_prob_chosen(meta, no_context).exp(), torch.tensor([[0.5, 0.5]]), atol=0.02)


def test_population_bayes_without_context_is_exactly_one_half(population):
    """A symmetric prior gives P = 1/2 for every pair at n = 0: no Monte Carlo noise, in 3-D and at T > 0."""
    batch = EpisodeSampler(population, "test", num_targets=10, max_context=5, seed=0).sample(32, num_context=0)
    for temperature in (0.0, 0.1):
        log_prob, groups = population_log_prob_chosen({"temperature": temperature}, batch, num_samples=400)
        assert (choice_correct(log_prob) == 0.5).all() and (choice_correct(groups) == 0.5).all()  # exact ties


def test_population_bayes_by_hand_bradley_terry_users():
    """Posterior over w = +1 / -1 after choosing 0.6 over 0.5 at temperature 0.1, then the predictive."""
    batch = one_dim_episode([[0.6, 0.5]], [[0.8, 0.2]])
    meta = {"generator": "linear_population", "temperature": 0.1}
    sig = lambda x: 1 / (1 + math.exp(-x))
    plus = sig(1.0) / (sig(1.0) + sig(-1.0))  # P(w = +1 | context)
    exact = plus * sig(6.0) + (1 - plus) * sig(-6.0)
    log_prob, groups = population_log_prob_chosen(meta, batch, num_samples=20000)
    assert log_prob.exp().item() == pytest.approx(exact, abs=0.01)
    assert groups.shape == (4, 1, 1) and torch.allclose(groups.exp(), log_prob.exp(), atol=0.02)


# -----------------------------------------------------------------------------
# text pairs (JSONL)

GOOD_ROW = {"prompt": "p", "response_a": "a", "response_b": "b", "choices": {"u1": 0, "u2": None}}


@pytest.mark.parametrize("row, message", [
    ([1], "not a JSON object"),
    ({k: v for k, v in GOOD_ROW.items() if k != "response_b"}, "missing field 'response_b'"),
    (dict(GOOD_ROW, prompt="  "), "field 'prompt' is empty or not a string"),
    (dict(GOOD_ROW, choices={}), "field 'choices' must be a non-empty object"),
    (dict(GOOD_ROW, choices={"u1": 2}), "choice for label 'u1' is 2, not 0, 1 or null"),
    (dict(GOOD_ROW, choices={"u1": True}), "choice for label 'u1' is True"),
    (dict(GOOD_ROW, split="dev"), "split 'dev' is not one of"),
])
def test_text_pair_problems(row, message):
    assert message in text.text_pair_problem(row)


def test_read_text_pairs_reports_bad_lines(tmp_path, capsys):
    path = str(tmp_path / "pairs.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(GOOD_ROW) + "\n{oops\n\n" + json.dumps(dict(GOOD_ROW, split="dev")) + "\n")
    with pytest.raises(DataError, match=f"{path}: 2 bad lines") as error:
        text.read_text_pairs(path)
    assert f"{path}:2: invalid JSON" in str(error.value) and f"{path}:4: split 'dev'" in str(error.value)
    assert text.read_text_pairs(path, skip_bad=True) == [GOOD_ROW]
    assert "skipped 2 bad lines, kept 1" in capsys.readouterr().out


def test_text_pairs_round_trip_to_data(tmp_path):
    rows = [GOOD_ROW, dict(GOOD_ROW, choices={"u2": 1}, split="val")]
    path = str(tmp_path / "pairs.jsonl")
    text.write_text_pairs(path, rows)
    d = text.text_pairs_to_data(text.read_text_pairs(path), torch.zeros(2, 2, 3))
    assert d.labels == ["u1", "u2"] and list(d.split) == ["train", "val"]
    assert d.choices.tolist() == [[0, -1], [-1, 1]]


# -----------------------------------------------------------------------------
# text pairs: every malformed line, file:line messages, skip_bad


def write_lines(path, lines):
    """A JSONL file of raw lines (dicts are dumped, strings written as they are)."""
    with open(path, "w") as f:
        f.write("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def without(key):
    return {k: v for k, v in GOOD_ROW.items() if k != key}


BAD_LINES = [
    ("{oops", "invalid JSON (Expecting property name enclosed in double quotes)"),
    ('{"prompt": "p",', "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    ("null", "not a JSON object"),
    (without("prompt"), "missing field 'prompt'"),
    (without("response_a"), "missing field 'response_a'"),
    (without("response_b"), "missing field 'response_b'"),
    (without("choices"), "missing field 'choices'"),
    (dict(GOOD_ROW, prompt=""), "field 'prompt' is empty or not a string"),
    (dict(GOOD_ROW, response_a=" \t"), "field 'response_a' is empty or not a string"),
    (dict(GOOD_ROW, response_b=""), "field 'response_b' is empty or not a string"),
    (dict(GOOD_ROW, response_b=5), "field 'response_b' is empty or not a string"),
    (dict(GOOD_ROW, choices={"u1": 2}), "choice for label 'u1' is 2, not 0, 1 or null"),
    (dict(GOOD_ROW, choices={"u1": 0, "u2": "1"}), "choice for label 'u2' is '1', not 0, 1 or null"),
    (dict(GOOD_ROW, choices={"u1": True}), "choice for label 'u1' is True, not 0, 1 or null"),
    (dict(GOOD_ROW, choices={"u1": False}), "choice for label 'u1' is False, not 0, 1 or null"),
    (dict(GOOD_ROW, choices={"u1": -1}), "choice for label 'u1' is -1, not 0, 1 or null"),
    (dict(GOOD_ROW, choices=[0, 1]), "field 'choices' must be a non-empty object from label to 0, 1 or null"),
    (dict(GOOD_ROW, choices="u1"), "field 'choices' must be a non-empty object"),
    (dict(GOOD_ROW, choices={}), "field 'choices' must be a non-empty object"),
    (dict(GOOD_ROW, split="dev"), "split 'dev' is not one of ['train', 'val', 'test']"),
    (dict(GOOD_ROW, split="Train"), "split 'Train' is not one of"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_read_text_pairs_names_file_line_and_problem(tmp_path, capsys, line, message):
    path = write_lines(str(tmp_path / "pairs.jsonl"), [GOOD_ROW, line, dict(GOOD_ROW, prompt="q")])
    with pytest.raises(DataError) as error:
        text.read_text_pairs(path)
    assert str(error.value).startswith(f"{path}: 1 bad lines (pass skip_bad to drop them):\n")
    assert f"{path}:2: {message}" in str(error.value)
    assert text.read_text_pairs(path, skip_bad=True) == [GOOD_ROW, dict(GOOD_ROW, prompt="q")]
    assert capsys.readouterr().out == f"{path}: skipped 1 bad lines, kept 2\n"


def test_read_text_pairs_valid_file_round_trips(tmp_path, capsys):
    rows = [GOOD_ROW, dict(GOOD_ROW, prompt="q ü \"x\"\nnew line", split="test", id=7),
            dict(GOOD_ROW, choices={"u1": 1, "u2": 0}, split="val")]
    path = str(tmp_path / "sub" / "pairs.jsonl")
    text.write_text_pairs(path, rows)
    assert os.listdir(tmp_path / "sub") == ["pairs.jsonl"]  # no temp file left
    assert text.read_text_pairs(path) == rows
    assert capsys.readouterr().out == ""  # nothing skipped, nothing said


def test_read_text_pairs_skips_blank_lines_but_counts_them_in_line_numbers(tmp_path):
    path = write_lines(str(tmp_path / "pairs.jsonl"), [GOOD_ROW, "", "   ", without("prompt")])
    with pytest.raises(DataError, match=f"{path}:4: missing field 'prompt'"):
        text.read_text_pairs(path)


def test_read_text_pairs_lists_at_most_ten_bad_lines(tmp_path, capsys):
    path = write_lines(str(tmp_path / "pairs.jsonl"), [GOOD_ROW] + ["{oops"] * 12)
    with pytest.raises(DataError) as error:
        text.read_text_pairs(path)
    message = str(error.value)
    assert message.startswith(f"{path}: 12 bad lines") and message.endswith("\n...")
    assert f"{path}:11: invalid JSON" in message and f"{path}:12:" not in message
    assert text.read_text_pairs(path, skip_bad=True) == [GOOD_ROW]
    assert "skipped 12 bad lines, kept 1" in capsys.readouterr().out


def test_read_text_pairs_reports_a_line_that_is_not_utf8(tmp_path, capsys):
    path = str(tmp_path / "pairs.jsonl")
    with open(path, "wb") as f:
        f.write(json.dumps(GOOD_ROW).encode() + b"\n" + json.dumps(GOOD_ROW).encode()[:-1] + b'\xff"}\n')
    with pytest.raises(DataError, match=f"{path}:2: "):
        text.read_text_pairs(path)
    assert text.read_text_pairs(path, skip_bad=True) == [GOOD_ROW]


def test_read_text_pairs_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"^{path}: file not found$"):
        text.read_text_pairs(path)


def test_text_pairs_to_data_sorts_labels_and_keeps_split_and_features():
    rows = [{"prompt": "p", "response_a": "a", "response_b": "b", "choices": {"zed": 1, "amy": None}, "split": "test"},
            {"prompt": "p", "response_a": "a", "response_b": "b", "choices": {"bob": 0, "zed": 0}},
            {"prompt": "p", "response_a": "a", "response_b": "b", "choices": {"amy": 1}, "split": "val"}]
    features = torch.randn(3, 2, 5, dtype=torch.float64)
    d = text.text_pairs_to_data(rows, features, path="x.jsonl")
    assert d.labels == ["amy", "bob", "zed"]
    assert d.choices.dtype == torch.int8
    assert d.choices.tolist() == [[-1, -1, 1], [-1, 0, 0], [1, -1, -1]]
    assert list(d.split) == ["test", "train", "val"]
    assert d.pairs.dtype == torch.float32 and torch.equal(d.pairs, features.float()) and d.dim == 5
    assert d.path == "x.jsonl" and d.meta == {}


# -----------------------------------------------------------------------------
# the toy steerable text task


@pytest.mark.parametrize("response, concise, detailed", [
    ("cats are nice .", 2.0 - 0.5, 2.0 + 0.5),  # one relevant sentence
    ("dogs are nice .", -0.5, 0.5),  # one sentence, off topic
    ("cats are nice . dogs are nice .", 1.0 - 1.0, 1.0 + 1.0),  # half relevant, two sentences
    ("cats are nice . cats look old . tea are blue .", 4 / 3 - 1.5, 4 / 3 + 1.5),
    ("cats are nice . . .", 2.0 - 0.5, 2.0 + 0.5),  # empty sentences do not count
    ("cats are nice", 2.0 - 0.5, 2.0 + 0.5),  # a last sentence without its '.' counts
    ("", 0.0, 0.0),  # no sentences: no relevance, no length
    ("the cat is nice .", -0.5, 0.5),  # whole words only: 'cat' is not 'cats'
])
def test_toy_gold_reward_by_hand(response, concise, detailed):
    prompt = "tell me about cats ."
    assert toy.toy_gold_reward(prompt, response, "concise") == pytest.approx(concise)
    assert toy.toy_gold_reward(prompt, response, "detailed") == pytest.approx(detailed)


def test_toy_gold_reward_uses_the_prompts_topic():
    response = "bees help people . bees are nice ."
    assert toy.toy_gold_reward("what about bees ?", response, "concise") == pytest.approx(2.0 - 1.0)
    assert toy.toy_gold_reward("what about tea ?", response, "concise") == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def toy_rows():
    return toy.make_toy_text_pairs(num_pairs=600, conflict_fraction=0.75, seed=0)


def toy_margins(row):
    """Gold reward of response_b minus response_a, per toy label."""
    return [toy.toy_gold_reward(row["prompt"], row["response_b"], l)
            - toy.toy_gold_reward(row["prompt"], row["response_a"], l) for l in toy.TOY_LABELS]


def test_toy_pairs_follow_the_schema(toy_rows):
    assert len(toy_rows) == 600 and [r["id"] for r in toy_rows] == list(range(600))
    assert all(text.text_pair_problem(r) is None for r in toy_rows)
    assert all(set(r["choices"]) == set(toy.TOY_LABELS) for r in toy_rows)


@pytest.mark.parametrize("num_pairs, conflict_fraction", [(600, 0.75), (101, 0.3), (50, 0.0), (50, 1.0)])
def test_toy_pairs_have_the_exact_conflict_fraction(num_pairs, conflict_fraction):
    rows = toy.make_toy_text_pairs(num_pairs=num_pairs, conflict_fraction=conflict_fraction, seed=1)
    conflicts = sum(r["choices"]["concise"] != r["choices"]["detailed"] for r in rows)
    assert len(rows) == num_pairs and conflicts == round(num_pairs * conflict_fraction)


def test_toy_pairs_choices_follow_gold_rewards_without_ties(toy_rows):
    for row in toy_rows:
        margins = toy_margins(row)
        assert 0.0 not in margins, row  # ties are dropped
        assert [row["choices"][l] for l in toy.TOY_LABELS] == [int(m > 0) for m in margins], row


def test_toy_prompts_are_each_in_one_split(toy_rows):
    splits = {}
    for row in toy_rows:
        splits.setdefault(row["prompt"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert {s for (s,) in splits.values()} == set(data.SPLITS)
    assert len(toy.toy_prompts()) == len(set(toy.toy_prompts())) == 60


def test_toy_pairs_are_seeded():
    assert toy.make_toy_text_pairs(num_pairs=50, seed=3) == toy.make_toy_text_pairs(num_pairs=50, seed=3)
    assert toy.make_toy_text_pairs(num_pairs=50, seed=3) != toy.make_toy_text_pairs(num_pairs=50, seed=4)


def test_toy_tokenizer_round_trips_and_knows_every_word(toy_rows):
    tok = toy.toy_tokenizer()
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert len(tok) == len(toy.toy_vocabulary())
    texts = [t for r in toy_rows[:100] for t in (r["prompt"], r["response_a"], r["response_b"])]
    texts += toy.toy_prompts() + ["what about cats ?", "cats are nice . dogs can be loud ."]
    for sentence in texts:
        ids = tok.encode(sentence)
        assert tok.unk_token_id not in ids and len(ids) == len(sentence.split()), sentence
        assert tok.decode(ids) == sentence
    vocabulary = set(toy.toy_vocabulary())
    assert all(w in vocabulary for r in toy_rows for k in ("prompt", "response_a", "response_b") for w in r[k].split())
    assert tok.encode("zebras are nice") == [tok.unk_token_id] + tok.encode("are nice")


def test_toy_tokenizer_reads_natural_text_and_keeps_every_toy_id(toy_rows):
    """Capitals and punctuation attached to words read as the toy world writes them, and every
    toy text keeps the ids of a lookup of its space-separated words (the tokenizer before)."""
    tok = toy.toy_tokenizer()
    vocab = tok.get_vocab()
    texts = {t for r in toy_rows for t in (r["prompt"], r["response_a"], r["response_b"])} | set(toy.toy_prompts())
    assert all(tok.encode(text) == [vocab[w] for w in text.split()] for text in texts)
    assert tok.encode("Tell me about BEES.") == tok.encode("tell me about bees .")
    assert tok.encode("What about cats?") == tok.encode("what about cats ?")
    assert tok.encode("Cats are nice.Dogs look old.") == tok.encode("cats are nice . dogs look old .")


@pytest.mark.parametrize("sentence, unknown", [
    ("Tell me about bees.", []),
    ("tell me about zebras .", ["zebras"]),
    ("tell me about 🐝!", ["🐝", "!"]),
    ("расскажи о пчёлах", ["расскажи", "о", "пчёлах"]),
    ("Zebras, zebras and Zebras", ["Zebras", ",", "zebras", "and"]),
], ids=["known", "word", "emoji", "other-script", "each-once"])
def test_unknown_words_are_the_pieces_read_as_unk(sentence, unknown):
    assert text.unknown_words(toy.toy_tokenizer(), sentence) == unknown


def test_text_with_unknown_words_is_refused_naming_them():
    tok = toy.toy_tokenizer()
    text.check_known_words(tok, "Tell me about bees.", "--prompt")
    with pytest.raises(DataError, match=r"^--prompt: the model's vocabulary has no '🐝', 'zebras' "
                                        r"\(it knows 41 words: \., \?, about, are, be, bees, .*, \.\.\.\)$"):
        text.check_known_words(tok, "tell me about 🐝 zebras", "--prompt")


# -----------------------------------------------------------------------------
# tokens for text pairs: where the response begins

CHAT_TEMPLATE = ("{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}tell {% endif %}")


@pytest.fixture(scope="module")
def toy_tok():
    return toy.toy_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tok = toy.toy_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def response_positions(batch):
    """Per row, the positions where response_mask is True."""
    return [torch.nonzero(row).squeeze(1).tolist() for row in batch["response_mask"]]


def test_plain_prompt_starts_with_bos_and_prompt_plus_response_is_the_text(toy_tok):
    prompt = text.tokenize_prompt(toy_tok, "tell me about cats .")
    response = text.tokenize_response(toy_tok, "cats are nice .")
    assert prompt == [toy_tok.bos_token_id] + toy_tok.encode("tell me about cats .")
    assert response == toy_tok.encode("cats are nice .") + [toy_tok.eos_token_id]
    assert prompt + response == toy_tok.encode("<bos> tell me about cats . cats are nice . <eos>")


def test_bos_is_not_doubled_when_the_tokenizer_adds_it():
    from tokenizers.processors import TemplateProcessing

    tok = toy.toy_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    assert tok("cats")["input_ids"] == [2, tok.convert_tokens_to_ids("cats")]  # the tokenizer adds BOS
    assert text.tokenize_prompt(tok, "what about cats ?") == [2] + tok.encode("what about cats ?", add_special_tokens=False)
    assert text.tokenize_response(tok, "cats are nice .")[0] == tok.convert_tokens_to_ids("cats")  # no BOS


def test_response_mask_covers_the_first_response_token_and_eos(toy_tok):
    prompts = [text.tokenize_prompt(toy_tok, p) for p in ("what about cats ?", "i want to hear about tea .")]
    responses = [text.tokenize_response(toy_tok, r) for r in ("dogs are nice . cats look old .", "tea .")]
    batch = text.prompt_response_batch(prompts, responses, toy_tok.pad_token_id)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert response_positions(batch) == [list(range(len(p), len(p) + len(r))) for p, r in zip(prompts, responses)]
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids = batch["input_ids"][row]
        assert ids[len(p)].item() == r[0] and ids[len(p) + len(r) - 1].item() == toy_tok.eos_token_id
        assert (ids[len(p) + len(r):] == toy_tok.pad_token_id).all()  # right padding, not in any mask
    assert batch["attention_mask"].tolist() == [[1] * n + [0] * (max(lengths) - n) for n in lengths]


def test_chat_template_prompt_ends_with_the_generation_prompt(chat_tok):
    prompt = text.tokenize_prompt(chat_tok, "tell me about cats .")
    assert chat_tok.convert_ids_to_tokens(prompt) == ["<bos>", "tell", "me", "about", "cats", ".", "tell"]
    rendered = chat_tok.apply_chat_template([{"role": "user", "content": "tell me about cats ."}],
                                            add_generation_prompt=True, tokenize=False)
    assert prompt == chat_tok.encode(rendered)


def test_chat_template_response_starts_right_after_the_generation_prompt(chat_tok):
    """The paper's code starts the response mask about two tokens late; here the first
    masked token is the response's first word, right after the generation prompt."""
    prompt = text.tokenize_prompt(chat_tok, "what about bees ?")
    response = text.tokenize_response(chat_tok, "bees are nice .")
    batch = text.prompt_response_batch([prompt], [response], chat_tok.pad_token_id)
    positions = response_positions(batch)[0]
    assert positions == list(range(len(prompt), len(prompt) + 5))  # 4 words and EOS
    tokens = chat_tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens[positions[0] - 1] == "tell" and tokens[positions[0]] == "bees"
    assert [tokens[i] for i in positions] == ["bees", "are", "nice", ".", "<eos>"]
    assert batch["input_ids"][0].tolist() == chat_tok.encode("<bos> what about bees ? tell bees are nice . <eos>")


def test_tokenize_pairs_drops_and_counts_long_pairs_without_truncating(toy_tok):
    rows = [dict(GOOD_ROW, prompt="what about cats ?", response_a="cats are nice .", response_b="cats ."),  # 5 + 5
            dict(GOOD_ROW, prompt="what about cats ?", response_a="cats .", response_b="cats are nice . dogs ."),
            dict(GOOD_ROW, prompt="tell me about cats .", response_a="cats .", response_b="cats are nice ."),  # 6 + 5
            dict(GOOD_ROW, prompt="describe tea .", response_a="tea .", response_b="tea are nice .")]
    token_pairs, dropped = text.tokenize_pairs(rows, toy_tok, max_length=10)
    assert dropped == 2 and [p is None for p in token_pairs] == [False, True, True, False]
    for row, pair in zip(rows, token_pairs):
        if pair is not None:  # kept pairs are whole
            assert pair == (text.tokenize_prompt(toy_tok, row["prompt"]),
                            (text.tokenize_response(toy_tok, row["response_a"]),
                             text.tokenize_response(toy_tok, row["response_b"])))
    assert text.tokenize_pairs(rows, toy_tok, max_length=11)[1] == 1
    assert text.tokenize_pairs(rows, toy_tok, max_length=4) == ([None] * 4, 4)


def test_collate_pairs_orients_pads_and_masks(toy_tok):
    rows = [dict(GOOD_ROW, prompt="what about cats ?", response_a="cats are nice .", response_b="dogs ."),
            dict(GOOD_ROW, prompt="i want to hear about tea .", response_a="tea .", response_b="tea look old . bees .")]
    token_pairs, _ = text.tokenize_pairs(rows, toy_tok, max_length=100)
    pad = toy_tok.pad_token_id
    batch = text.collate_pairs(token_pairs, torch.tensor([1, 0, 1]), torch.tensor([False, True, True]), pad)
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected")
                          for k in ("input_ids", "attention_mask", "response_mask")}
    expected = {"chosen": [(1, 0), (0, 1), (1, 1)], "rejected": [(1, 1), (0, 0), (1, 0)]}  # (pair, response)
    for side, picks in expected.items():
        sequences = [(token_pairs[i][0], token_pairs[i][1][r]) for i, r in picks]
        width = max(len(p) + len(r) for p, r in sequences)
        assert batch[f"{side}_input_ids"].shape == (3, width)
        for row, (p, r) in enumerate(sequences):
            n = len(p) + len(r)
            assert batch[f"{side}_input_ids"][row].tolist() == p + r + [pad] * (width - n)
            assert batch[f"{side}_attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert batch[f"{side}_response_mask"][row].tolist() == [False] * len(p) + [True] * len(r) + [False] * (width - n)


# -----------------------------------------------------------------------------
# last-token embeddings


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(toy.toy_vocabulary()), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return AutoModelForCausalLM.from_config(config).eval()


def test_last_token_embeddings_match_each_sequence_alone(tiny_llama):
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12, 3, 3, 9, 5]  # unsorted, so sorting by length reorders them
    sequences = [torch.randint(4, tiny_llama.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    with torch.no_grad():
        alone = torch.stack([tiny_llama(input_ids=torch.tensor([s]), output_hidden_states=True)
                             .hidden_states[-1][0, -1] for s in sequences])  # (N, H)
    for batch_size in (1, 3, 64):
        embeddings = text.sequence_embeddings(tiny_llama, sequences, pad_id=0, batch_size=batch_size, pooling="last")
        assert embeddings.shape == (len(sequences), 16) and embeddings.dtype == torch.float32
        torch.testing.assert_close(embeddings, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(alone[3], alone[4])  # distinct sequences, distinct embeddings


# -----------------------------------------------------------------------------
# 'flipped' from the sampler, through select_labels


def test_flipped_is_true_exactly_where_the_label_chose_the_second_response(toy_rows):
    d = text.text_pairs_to_data(toy_rows, torch.randn(len(toy_rows), 2, 3))
    for labels in (["detailed"], ["concise"], ["detailed", "concise"]):
        selected = data.select_labels(d, labels)
        assert selected.labels == labels
        sampler = EpisodeSampler(selected, "train", num_targets=6, max_context=4, seed=0)
        batch = sampler.sample(32)
        label_idx = sampler.label_ids[batch["label_rows"]]  # (B,) into selected.labels
        choice = selected.choices[batch["pair_idx"], label_idx[:, None]]  # (B, n + T)
        assert torch.equal(batch["flipped"], choice == 1)
        original = d.choices[batch["pair_idx"], torch.tensor([d.labels.index(labels[i]) for i in label_idx])[:, None]]
        assert torch.equal(batch["flipped"], original == 1)
        assert batch["flipped"].any() and not batch["flipped"].all()


# -----------------------------------------------------------------------------
# UltraFeedback: every pair of a prompt's rated completions, ties and N/A dropped

UF_ASPECTS = ("helpfulness", "honesty", "truthfulness", "instruction_following")


def uf_completion(response, *ratings):
    """A completion rated (helpfulness, honesty, truthfulness, instruction_following), '3' for those not given."""
    ratings = [str(r) for r in ratings] + ["3"] * (4 - len(ratings))
    return {"response": response, "model": "m", "annotations": {
        aspect: {"Rating": rating, "Rationale": "because"} for aspect, rating in zip(UF_ASPECTS, ratings)}}


# Two prompts, (helpfulness, honesty, truthfulness) per completion. With HH (ids are row-i-j):
# cats: 0-1, 0-2 and 1-2 conflict, every pair with c3 has N/A helpfulness.
# tea: 0-1 agree (both prefer b), 1-2 tie on helpfulness, 0-2, 0-3, 1-3 and 2-3 conflict.
UF_HAND = [
    {"instruction": "tell me about cats .", "completions": [
        uf_completion("cats are nice .", 5, 3, 4), uf_completion("cats look old .", 3, 5, 2),
        uf_completion("cats are blue .", 4, 4, 4), uf_completion("dogs are nice .", "N/A", 2, 1)]},
    {"instruction": "what about tea ?", "completions": [
        uf_completion("tea are nice .", 2, 2, "N/A"), uf_completion("tea look old .", 3, 3, 3),
        uf_completion("tea seem small .", 3, 1, 5), uf_completion("bees are blue .", 1, 4, 3)]},
]
HH_CONFLICTS = {"0-0-1": [0, 1], "0-0-2": [0, 1], "0-1-2": [1, 0], "1-0-2": [1, 0], "1-0-3": [0, 1],
                "1-1-3": [0, 1], "1-2-3": [0, 1]}  # id: (helpfulness, honesty) choice, 0 = response_a
HHT_CONFLICTS = {"0-0-1": [0, 1, 0], "0-1-2": [1, 0, 1], "1-2-3": [0, 1, 0]}  # truthfulness ties 0-0-2 and 1-1-3


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def prepare_uf(source, out, *overrides):
    """data.py ultrafeedback; returns the rows it wrote."""
    prepare_main(["ultrafeedback", f"--source={source}", f"--out={out}", *overrides])
    return text.read_text_pairs(os.path.join(out, "pairs.jsonl"))


def by_id(rows, labels=("helpfulness", "honesty")):
    return {r["id"]: [r["choices"][l] for l in labels] for r in rows}


@pytest.fixture(scope="module")
def uf_hand_path(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("uf") / "hand.jsonl", UF_HAND)


def test_uf_hand_example_keeps_exactly_the_conflicting_pairs(uf_hand_path, tmp_path):
    rows = prepare_uf(uf_hand_path, tmp_path)
    assert by_id(rows) == HH_CONFLICTS
    completions = [[c["response"] for c in r["completions"]] for r in UF_HAND]
    for row in rows:
        record, i, j = map(int, row["id"].split("-"))
        assert (row["prompt"], row["response_a"], row["response_b"]) == (
            UF_HAND[record]["instruction"], completions[record][i], completions[record][j])
        assert text.text_pair_problem(row) is None


def test_uf_hht_adds_truthfulness_and_its_ties(uf_hand_path, tmp_path):
    labels = ("helpfulness", "honesty", "truthfulness")
    rows = prepare_uf(uf_hand_path, tmp_path, "--labels=[helpfulness,honesty,truthfulness]")
    assert by_id(rows, labels) == HHT_CONFLICTS


@pytest.mark.parametrize("fraction, expected", [
    (0.875, {**HH_CONFLICTS, "1-0-1": [1, 1]}),  # 7 conflicting and the 1 agreeing pair
    (0.0, {"1-0-1": [1, 1]}),
])
def test_uf_conflict_fraction_adds_agreeing_pairs(uf_hand_path, tmp_path, fraction, expected):
    assert by_id(prepare_uf(uf_hand_path, tmp_path, f"--conflict_fraction={fraction}")) == expected


def test_uf_conflict_fraction_subsamples_conflicts_by_seed(uf_hand_path, tmp_path):
    """With one agreeing pair, half conflicting means one of the seven conflicting pairs."""
    picked = set()
    for seed in range(6):
        rows = prepare_uf(uf_hand_path, tmp_path / str(seed), "--conflict_fraction=0.5", f"--seed={seed}")
        conflicting = [r["id"] for r in rows if r["id"] != "1-0-1"]
        assert len(rows) == 2 and "1-0-1" in by_id(rows) and conflicting[0] in HH_CONFLICTS
        assert rows == prepare_uf(uf_hand_path, tmp_path / f"again{seed}", "--conflict_fraction=0.5", f"--seed={seed}")
        picked.add(conflicting[0])
    assert len(picked) > 1


@pytest.mark.parametrize("conflicting, agreeing, fraction, expected", [
    (7, 1, 1.0, (7, 0)), (7, 1, 0.875, (7, 1)), (7, 1, 0.5, (1, 1)), (10, 100, 0.8, (10, 2)),  # 10 / 12.5 * 0.2
    (98, 88, 0.5, (88, 88)), (5, 3, 0.0, (0, 3)),
])
def test_conflict_mix_by_hand(conflicting, agreeing, fraction, expected):
    assert uf.conflict_mix(conflicting, agreeing, fraction) == expected


def test_uf_prints_counts(uf_hand_path, tmp_path, capsys):
    prepare_uf(uf_hand_path, tmp_path)
    printed = capsys.readouterr().out
    assert ("2 prompts: 12 pairs of completions; dropped 1 with a tie, 3 with N/A, 0 with an empty response; "
            "kept 7 of 7 conflicting and 0 of 1 agreeing") in printed
    assert "all  : 7 pairs, 2 prompts; helpfulness 5 a / 2 b, honesty 2 a / 5 b" in printed


def random_uf_records(num_prompts=60, seed=0):
    """Toy prompts with four completions each, ratings uniform in 1..5 (so with ties), 5% N/A."""
    rng = np.random.default_rng(seed)
    records = []
    for prompt in toy.toy_prompts()[:num_prompts]:
        completions = [uf_completion(toy.toy_response(toy.prompt_topic(prompt), rng),
                                     *["N/A" if rng.random() < 0.05 else int(rng.integers(1, 6)) for _ in UF_ASPECTS])
                       for _ in range(4)]
        records.append({"instruction": prompt, "completions": completions, "source": "toy"})
    return records


def brute_force_pairs(records, labels):
    """{id: (conflicting, choices)} of the pairs without N/A or ties, straight from the ratings."""
    import itertools

    pairs = {}
    for r, record in enumerate(records):
        for i, j in itertools.combinations(range(len(record["completions"])), 2):
            ratings = [[record["completions"][k]["annotations"][l]["Rating"] for l in labels] for k in (i, j)]
            if "N/A" in ratings[0] + ratings[1] or any(a == b for a, b in zip(*ratings)):
                continue
            choices = [int(int(a) < int(b)) for a, b in zip(*ratings)]
            pairs[f"{r}-{i}-{j}"] = (len(set(choices)) > 1, choices)
    return pairs


@pytest.fixture(scope="module")
def uf_random(tmp_path_factory):
    """(records, JSONL path, JSON-list path) of the random fixture."""
    folder = tmp_path_factory.mktemp("uf_random")
    records = random_uf_records()
    with open(folder / "list.json", "w") as f:
        json.dump(records, f)
    return records, write_jsonl(folder / "lines.jsonl", records), str(folder / "list.json")


def test_uf_random_fixture_matches_brute_force_from_jsonl_and_json_list(uf_random, tmp_path):
    records, jsonl, json_list = uf_random
    rows = prepare_uf(jsonl, tmp_path / "a")
    expected = {k: choices for k, (conflicting, choices) in brute_force_pairs(records, UF_ASPECTS[:2]).items()
                if conflicting}
    assert by_id(rows) == expected and len(expected) > 50
    assert prepare_uf(json_list, tmp_path / "b") == rows
    assert prepare_uf(os.path.dirname(jsonl), tmp_path / "c") == rows  # a folder: its .jsonl files


def test_uf_random_fixture_mixes_to_the_conflict_fraction(uf_random, tmp_path):
    records, jsonl, _ = uf_random
    pairs = brute_force_pairs(records, UF_ASPECTS[:2])
    rows = prepare_uf(jsonl, tmp_path, "--conflict_fraction=0.6")
    assert all(pairs[r["id"]][1] == [r["choices"]["helpfulness"], r["choices"]["honesty"]] for r in rows)
    conflicting = sum(pairs[r["id"]][0] for r in rows)
    assert conflicting / len(rows) == pytest.approx(0.6, abs=0.01)
    assert conflicting == sum(c for c, _ in pairs.values())  # agreeing pairs are plenty: every conflicting one is kept


def test_uf_prompts_are_split_80_10_10_and_never_in_two_splits(uf_random, tmp_path, capsys):
    _, jsonl, _ = uf_random
    rows = prepare_uf(jsonl, tmp_path, "--conflict_fraction=0.5")
    prompts = {s: {r["prompt"] for r in rows if r["split"] == s} for s in data.SPLITS}
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"] or prompts["val"] & prompts["test"])
    total = sum(map(len, prompts.values()))
    assert [len(prompts[s]) for s in data.SPLITS] == [round(0.8 * total), round(0.1 * total),
                                                      total - round(0.8 * total) - round(0.1 * total)]
    printed = capsys.readouterr().out
    for s in data.SPLITS:
        part = [r for r in rows if r["split"] == s]
        votes = [sum(r["choices"][l] == v for r in part) for l in UF_ASPECTS[:2] for v in (0, 1)]
        assert (f"{s:5s}: {len(part)} pairs, {len(prompts[s])} prompts; helpfulness {votes[0]} a / {votes[1]} b, "
                f"honesty {votes[2]} a / {votes[3]} b") in printed


# -----------------------------------------------------------------------------
# UltraFeedback: bad sources and settings


def uf_error(source, tmp_path, *overrides):
    with pytest.raises(DataError) as error:
        prepare_uf(source, tmp_path / "out", *overrides)
    return str(error.value)


def test_uf_missing_source_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    assert uf_error(path, tmp_path).startswith(f"{path}: file not found")


def test_uf_unknown_format_and_empty_folder(tmp_path):
    (tmp_path / "uf.csv").write_text("instruction,completions\n")
    assert "unknown format (expected .json, .jsonl or .parquet)" in uf_error(str(tmp_path / "uf.csv"), tmp_path)
    (tmp_path / "empty").mkdir()
    assert "no .jsonl, .parquet or .json files in this folder" in uf_error(str(tmp_path / "empty"), tmp_path)


def with_completion(**changes):
    """The first hand record with its first completion changed (None removes a key)."""
    completion = {k: v for k, v in dict(UF_HAND[0]["completions"][0], **changes).items() if v is not None}
    return dict(UF_HAND[0], completions=[completion] + UF_HAND[0]["completions"][1:])


def with_rating(aspect, rating):
    annotations = dict(UF_HAND[0]["completions"][0]["annotations"], **{aspect: rating})
    return with_completion(annotations=annotations)


@pytest.mark.parametrize("record, message", [
    ([1, 2], "not a JSON object"),
    ({"completions": []}, "field 'instruction' is missing, empty or not a string"),
    (dict(UF_HAND[0], instruction=" "), "field 'instruction' is missing, empty or not a string"),
    ({"instruction": "hi"}, "field 'completions' is missing or not a list"),
    (dict(UF_HAND[0], completions={"a": 1}), "field 'completions' is missing or not a list"),
    (with_completion(response=None), "completions[0]: field 'response' is missing or not a string"),
    (with_completion(annotations=None), "completions[0]: field 'annotations' is missing or not an object"),
    (with_rating("honesty", None), "completions[0]: no annotations['honesty']['Rating']"),
    (with_rating("helpfulness", {"Rationale": "no rating"}), "completions[0]: no annotations['helpfulness']['Rating']"),
    (with_rating("honesty", {"Rating": "great"}),
     "completions[0]: honesty Rating 'great' is neither a number nor 'N/A'"),
    (with_rating("honesty", {"Rating": "nan"}), "completions[0]: honesty Rating 'nan' is neither a number nor 'N/A'"),
    ("{oops", "invalid JSON (Expecting property name enclosed in double quotes)"),
])
def test_uf_bad_rows_name_file_line_and_problem(tmp_path, capsys, record, message):
    path = str(tmp_path / "uf.jsonl")
    with open(path, "w") as f:
        f.write((record if isinstance(record, str) else json.dumps(record)) + "\n" + json.dumps(UF_HAND[1]) + "\n")
    error = uf_error(path, tmp_path)
    assert error.startswith(f"{path}: 1 bad rows (set skip_bad_rows to drop them):\n{path}: line 1: {message}")
    rows = prepare_uf(path, tmp_path / "skipped", "--skip_bad_rows=true")
    assert by_id(rows) == {k: v for k, v in HH_CONFLICTS.items() if k.startswith("1-")}  # tea keeps row number 1
    assert f"{path}: skipped 1 bad rows, kept 1" in capsys.readouterr().out


def test_uf_bad_json_list_file(tmp_path):
    path = tmp_path / "uf.json"
    path.write_text("[{\"instruction\": ")
    assert uf_error(str(path), tmp_path).startswith(f"{path}: not a valid JSON file")
    path.write_text(json.dumps([UF_HAND[0], "text"]))
    assert f"{path}: item 1: not a JSON object" in uf_error(str(path), tmp_path)


def test_uf_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "uf.parquet"
    path.write_bytes(b"PAR1")
    assert uf_error(str(path), tmp_path) == (f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                                             "or give a .json/.jsonl copy")


def test_uf_hub_is_asked_only_for_a_name_that_is_not_a_path(uf_hand_path, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    def fake_download(name, **kwargs):
        calls.append((name, kwargs["repo_type"]))
        return os.path.dirname(uf_hand_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert by_id(prepare_uf("openbmb/UltraFeedback", tmp_path / "hub")) == HH_CONFLICTS
    assert calls == [("openbmb/UltraFeedback", "dataset")]
    prepare_uf(uf_hand_path, tmp_path / "local")
    uf_error(str(tmp_path / "missing" / "uf.jsonl"), tmp_path)
    assert len(calls) == 1

    def offline(name, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert "not a local file or folder, and downloading it from the Hugging Face hub failed (OSError: no network)" in \
        uf_error("someone/data", tmp_path)


def test_uf_nothing_left_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "ties.jsonl", [{"instruction": "hi", "completions": [
        uf_completion("a", 3, 3), uf_completion("b", 3, 4), uf_completion("c", "N/A", 1)]}])
    assert "no pairs left" in uf_error(path, tmp_path)


def test_uf_numeric_ratings_count_and_empty_responses_are_dropped(tmp_path, capsys):
    numeric = uf_completion("cats are nice .")
    numeric["annotations"]["helpfulness"]["Rating"], numeric["annotations"]["honesty"]["Rating"] = 5, 1.0
    path = write_jsonl(tmp_path / "uf.jsonl", [{"instruction": "hi", "completions": [
        numeric, uf_completion(" ", 1, 5), uf_completion("cats .", 1, 5)]}])
    assert by_id(prepare_uf(path, tmp_path / "out")) == {"0-0-2": [0, 1]}  # 0-1 has an empty response, 1-2 ties
    assert "dropped 1 with a tie, 0 with N/A, 1 with an empty response" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("--labels=[helpfulness,harmlessness]", "config key 'labels': unknown label 'harmlessness' (known: helpfulness, "
                                             "honesty, truthfulness, instruction_following)"),
    ("--labels=[honesty]", "config key 'labels': must name at least two distinct labels"),
    ("--labels=[honesty,honesty]", "config key 'labels': must name at least two distinct labels"),
    ("--conflict_fraction=1.5", "config key 'conflict_fraction': must lie in [0, 1]"),
])
def test_uf_bad_settings_name_the_key(uf_hand_path, tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        prepare_uf(uf_hand_path, tmp_path, override)
    assert str(error.value) == message


# -----------------------------------------------------------------------------
# embed: features of text pairs from a decoder (last token) or an encoder (mean)

EMBED_ROWS = [  # ids: given for some rows; the others get their row number
    {"prompt": "tell me about cats .", "response_a": "cats are nice .", "response_b": "dogs .", "id": "x7"},
    {"prompt": "what about tea ?", "response_a": "tea look old . tea are nice . bees .", "response_b": "tea ."},
    {"prompt": "describe rain .", "response_a": "rain .", "response_b": "rain feel warm . rain are blue .", "id": 3},
    {"prompt": "i want to hear about stars .", "response_a": "stars are blue .", "response_b": "snow ."},
    {"prompt": "say something on maps .", "response_a": "maps help people . maps .", "response_b": "maps look old ."},
]


@pytest.fixture(scope="module")
def embed_in(tmp_path_factory):
    """A text-pair JSONL: EMBED_ROWS with choices and splits."""
    rows = [dict(row, choices={"u1": i % 2, "u2": None if i == 2 else 1 - i % 2}, split="train")
            for i, row in enumerate(EMBED_ROWS)]
    path = str(tmp_path_factory.mktemp("embed") / "pairs.jsonl")
    text.write_text_pairs(path, rows)
    return path


def save_model(folder, model, padding_side="right", chat_template=None):
    tok = toy.toy_tokenizer()
    tok.padding_side, tok.chat_template = padding_side, chat_template
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    """Tiny random models saved with the toy tokenizer: a Llama decoder (with a chat
    template; its tokenizer padding on the left, or on the right) and a BERT encoder."""
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

    torch.manual_seed(0)
    vocab = len(toy.toy_vocabulary())
    llama = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    bert = AutoModel.from_config(BertConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=64, pad_token_id=0))
    root = tmp_path_factory.mktemp("embedders")
    return {"llama_left": save_model(root / "llama_left", llama, "left", CHAT_TEMPLATE),
            "llama_right": save_model(root / "llama_right", llama, "right", CHAT_TEMPLATE),
            "bert": save_model(root / "bert", bert)}


def embed(model, in_path, out_path, *overrides):
    return prepare_main(["embed", f"--model={model}", f"--in={in_path}", f"--out={out_path}", *overrides])


@torch.no_grad()
def alone(model, ids, pool):
    """The final hidden layer of one unpadded sequence: at its last token, or its mean."""
    hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # (T, H)
    return hidden[-1] if pool == "last" else hidden.mean(0)


def test_embed_decoder_is_each_sequence_alone_at_its_last_token_whatever_the_padding_side(embedders, embed_in,
                                                                                          tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedders["llama_left"]).eval()  # as the policy loads it
    tok = toy.toy_tokenizer()
    texts = [f"<bos> {r['prompt']} tell {r[k]} <eos>" for r in EMBED_ROWS for k in ("response_a", "response_b")]
    expected = torch.stack([alone(model, tok.encode(t), "last") for t in texts]).view(len(EMBED_ROWS), 2, -1)
    for side in ("left", "right"):
        d = embed(embedders[f"llama_{side}"], embed_in, tmp_path / f"{side}.npz", "--batch_size=2")
        assert d.meta == {"embedder": embedders[f"llama_{side}"], "pooling": "last"}
        torch.testing.assert_close(d.pairs, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected[:, 0], expected[:, 1])


def test_embed_encoder_is_the_mean_over_each_sequence_alone(embedders, embed_in, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(embedders["bert"]).eval()
    tok = toy.toy_tokenizer()
    texts = [f"{r['prompt']} {r[k]}" for r in EMBED_ROWS for k in ("response_a", "response_b")]  # no special tokens
    expected = torch.stack([alone(model, tok.encode(t), "mean") for t in texts]).view(len(EMBED_ROWS), 2, -1)
    d = embed(embedders["bert"], embed_in, tmp_path / "bert.npz", "--batch_size=3")
    assert d.meta["pooling"] == "mean"
    torch.testing.assert_close(d.pairs, expected, atol=1e-5, rtol=0)


def test_mean_pool_and_last_token_by_hand():
    hidden = torch.arange(12.0).view(2, 3, 2)  # (b=2, T=3, H=2)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert text.mean_pool(hidden, mask).tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert text.last_token(hidden, mask).tolist() == [[2.0, 3.0], [10.0, 11.0]]


def test_is_causal_lm():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    assert text.is_causal_lm(LlamaConfig()) and text.is_causal_lm(GPT2Config())  # by model type
    assert not text.is_causal_lm(BertConfig())
    assert text.is_causal_lm(BertConfig(is_decoder=True))
    assert text.is_causal_lm(BertConfig(architectures=["BertLMHeadModel"]))
    assert not text.is_causal_lm(LlamaConfig(architectures=["LlamaForSequenceClassification"]))


def test_embed_writes_row_aligned_ids_choices_and_splits(embedders, embed_in, tmp_path):
    embed(embedders["llama_right"], embed_in, tmp_path / "f.npz")
    d = load_pairs(str(tmp_path / "f.npz"))
    assert d.ids.tolist() == ["x7", "1", "3", "3", "4"]  # 'id' fields, else the row number
    assert d.labels == ["u1", "u2"] and d.choices.tolist() == [[0, 1], [1, 0], [0, -1], [1, 0], [0, 1]]
    assert os.listdir(tmp_path) == ["f.npz"]  # the progress folder is gone


def interrupt_after_chunks(monkeypatch, count):
    """Make embed_script.write_atomic raise KeyboardInterrupt once `count` chunks are written."""
    real, written = embed_script.write_atomic, []
    def write_then_maybe_stop(path, write):
        real(path, write)
        written.append(path)
        if path.endswith(".npy") and sum(p.endswith(".npy") for p in written) == count:
            raise KeyboardInterrupt
    monkeypatch.setattr(embed_script, "write_atomic", write_then_maybe_stop)


def test_embed_resumes_after_an_interruption_with_identical_arrays(embedders, embed_in, tmp_path, monkeypatch):
    settings = ["--batch_size=2", "--save_every=2"]  # 10 sequences: chunks of 4, 4 and 2
    whole = embed(embedders["llama_right"], embed_in, tmp_path / "whole.npz", *settings)
    out = tmp_path / "resumed.npz"
    with monkeypatch.context() as m:
        interrupt_after_chunks(m, 1)
        with pytest.raises(KeyboardInterrupt):
            embed(embedders["llama_right"], embed_in, out, *settings)
    assert sorted(os.listdir(f"{out}.partial")) == ["chunk000000.npy", "fingerprint.json"] and not out.exists()
    computed = []
    real = embed_script.sequence_embeddings
    def counted(model, sequences, *args):
        computed.append(len(sequences))
        return real(model, sequences, *args)
    monkeypatch.setattr(embed_script, "sequence_embeddings", counted)
    embed(embedders["llama_right"], embed_in, out, *settings)
    assert computed == [4, 2]  # the first chunk came from disk
    resumed = load_pairs(str(out))
    for name in ("pairs", "choices"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name))
    assert (resumed.ids == whole.ids).all() and (resumed.split == whole.split).all() and resumed.meta == whole.meta
    assert not os.path.exists(f"{out}.partial")


def test_embed_starts_over_when_the_progress_is_from_other_settings(embedders, embed_in, tmp_path, monkeypatch, capsys):
    out = tmp_path / "f.npz"
    with monkeypatch.context() as m:
        interrupt_after_chunks(m, 1)
        with pytest.raises(KeyboardInterrupt):
            embed(embedders["llama_right"], embed_in, out, "--batch_size=2", "--save_every=1")
    d = embed(embedders["llama_right"], embed_in, out, "--batch_size=4")
    assert "progress of another model, input or setting; starting over" in capsys.readouterr().out
    whole = embed(embedders["llama_right"], embed_in, tmp_path / "whole.npz", "--batch_size=4")
    assert torch.equal(d.pairs, whole.pairs)


def test_embed_refuses_pairs_longer_than_max_length(embedders, embed_in, tmp_path):
    """Row 1 is the longest: <bos>, 4 prompt words, 'tell', 10 response words and <eos>
    (17 tokens); the others have 14."""
    with pytest.raises(DataError) as error:
        embed(embedders["llama_right"], embed_in, tmp_path / "f.npz", "--max_length=16")
    assert str(error.value).startswith(f"{embed_in}: 1 of 5 pairs are longer than max_length = 16 tokens "
                                       "(prompt + response; first at row 1). Raise --max_length or remove them")
    with pytest.raises(DataError, match="4 of 5 pairs are longer than max_length = 13 tokens"):
        embed(embedders["llama_right"], embed_in, tmp_path / "f.npz", "--max_length=13")
    assert not (tmp_path / "f.npz").exists()
    assert embed(embedders["llama_right"], embed_in, tmp_path / "f.npz", "--max_length=17").pairs.shape[0] == 5


def test_embed_bad_input_lines_and_missing_input(embedders, tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD_ROW, "{oops", dict(GOOD_ROW, choices={"u1": 2})])
    with pytest.raises(DataError) as error:
        embed(embedders["llama_right"], path, tmp_path / "f.npz")
    assert str(error.value).startswith(f"{path}: 2 bad lines")
    assert f"{path}:2: invalid JSON" in str(error.value) and f"{path}:3: choice for label 'u1' is 2" in str(error.value)
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        embed(embedders["llama_right"], tmp_path / "nope.jsonl", tmp_path / "f.npz")
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty.jsonl: no pairs"):
        embed(embedders["llama_right"], empty, tmp_path / "f.npz")


def test_ids_are_optional_and_checked(tmp_path, paper):
    assert paper.ids is None
    path = str(tmp_path / "no_ids.npz")
    save_pairs(path, paper)
    assert load_pairs(path).ids is None and "ids" not in np.load(path).files  # the old format, unchanged
    with_ids = data.PreferenceData(paper.pairs, paper.choices, paper.labels, paper.split, paper.meta,
                                   ids=np.array([f"r{i}" for i in range(len(paper.pairs))]))
    save_pairs(path, with_ids)
    assert (load_pairs(path).ids == with_ids.ids).all()
    assert (data.select_labels(load_pairs(path), ["type1"]).ids == with_ids.ids).all()
    assert_data_error(write_npz(tmp_path, ids=np.array(["a", "b"])), "'ids' must have shape [N] with N = 6, got [2]")


# -----------------------------------------------------------------------------
# end to end: UltraFeedback-shaped data -> pairs -> features -> reward model -> evaluation


def test_ultrafeedback_to_embed_to_train_reward_to_evaluate(uf_random, embedders, tmp_path):
    import evaluate
    import train_reward

    rows = prepare_uf(uf_random[1], tmp_path / "uf", "--conflict_fraction=0.5")
    features = str(tmp_path / "uf" / "features.npz")
    embed(embedders["llama_right"], tmp_path / "uf" / "pairs.jsonl", features)
    d = load_pairs(features)
    assert d.ids.tolist() == [r["id"] for r in rows] and d.pairs.shape == (len(rows), 2, 16)
    run = str(tmp_path / "run")
    metrics = train_reward.main([f"--out_dir={run}", f"--data.path={features}", "--data.synthetic=null",
                                 "--model.hidden=16", "--model.encoder.hidden=16", "--model.encoder.latent_dim=4",
                                 "--train.steps=20", "--train.warmup_steps=5", "--train.batch_size=8",
                                 "--train.num_targets=4", "--train.max_context=4", "--eval.interval=10",
                                 "--eval.episodes=8", "--eval.num_targets=4", "--eval.context_sizes=[0,2]"])
    assert {"val/loss", "val/acc@0", "val/acc@2"} <= metrics.keys()
    results = evaluate.main([run, "--num_targets=2", "--num-context=[0,1]", "--chunk=20", "--episodes=40",
                             f"--out={tmp_path / 'eval'}"])
    assert {r["label"] for r in results} == {"helpfulness", "honesty", "all"}
    assert {r["num_context"] for r in results} == {0, 1} and {r["model"] for r in results} == {"run"}


# -----------------------------------------------------------------------------
# the command line: every user error is one line, exit 2, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("script", ["synthetic", "ultrafeedback", "embed"])
def test_a_prepare_script_without_its_required_out_is_one_line_exit_2(tmp_path, script):
    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare", f"{script}.py")], cwd=tmp_path,
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: config key") and "required" in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_a_prepare_script_refuses_a_stray_argument(tmp_path):
    with pytest.raises(ConfigError, match=r"^unexpected arguments \['synthtic'\]"):
        prepare_main(["synthetic", "synthtic", "--out=x.npz"])
    assert os.listdir(tmp_path) == []


def test_prepare_help_prints_the_examples(capsys):
    prepare_main(["synthetic", "--help"])
    assert "python prepare/synthetic.py --out=data/paper_synthetic.npz" in capsys.readouterr().out


def test_cli_unknown_generator_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'generator': unknown generator 'gauss' \(paper \| waves \| linear\)"):
        prepare_main(["synthetic", "--generator=gauss", "--out=x.npz"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command, out, message", [
    (["synthetic"], "folder", "folder is a folder: give the file to write in it"),
    (["synthetic"], "file/x.npz", "cannot create file/x.npz: .*file is a file"),
    (["embed", "--model=none", "--in=none.jsonl"], "folder", "folder is a folder: give the file to write in it"),
    (["ultrafeedback", "--source=uf.jsonl"], "file", "file is a file, not a folder")],
    ids=["synthetic into a folder", "synthetic under a file", "embed into a folder", "ultrafeedback into a file"])
def test_cli_bad_out_is_refused_before_any_work(tmp_path, command, out, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "uf.jsonl").write_text("")  # a local source: nothing is looked up on the hub
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match=f"config key 'out': {message}"):
        prepare_main([*command, f"--out={out}"])
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "folder") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_cli_out_without_permission_is_refused(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="config key 'out': cannot write to locked/x.npz"):
        prepare_main(["synthetic", "--out=locked/x.npz"])


@pytest.mark.parametrize("args, key", [(["--num_pairs=-5"], "num_pairs"), (["--num_pairs=0"], "num_pairs"),
                                       (["--generator=linear", "--dim=0"], "dim"), (["--waves=0"], "waves")])
def test_cli_sizes_must_be_positive(tmp_path, args, key):
    with pytest.raises(ConfigError, match=f"config key '{key}': must be a positive number"):
        prepare_main(["synthetic", "--out=x.npz", *args])
    assert os.listdir(tmp_path) == []


def test_cli_never_replaces_a_dataset_by_accident(tmp_path):
    prepare_main(["synthetic", "--out=x.npz", "--num_pairs=100"])
    before = open("x.npz", "rb").read()
    with pytest.raises(ConfigError, match="config key 'out': x.npz exists .*replace it with --overwrite"):
        prepare_main(["synthetic", "--out=x.npz", "--num_pairs=100", "--seed=7"])
    assert open("x.npz", "rb").read() == before
    prepare_main(["synthetic", "--out=x.npz", "--num_pairs=100", "--seed=7", "--overwrite"])
    assert open("x.npz", "rb").read() != before


def test_cli_writes_the_benchmarks_as_the_readme_says(tmp_path):
    prepare_main(["synthetic", "--generator=waves", "--num_types=3", "--num_pairs=300", "--out=w.npz"])
    generated = data.load_pairs("w.npz")
    assert generated.labels == ["type0", "type1", "type2"] and generated.meta["generator"] == "waves"
    assert torch.equal(generated.pairs, data.make_waves_synthetic(num_pairs=300, num_types=3).pairs)
