import json
import os

import numpy as np
import pytest
import torch

import data
from common import ConfigError
from data import (DataError, EpisodeSampler, bayes_log_prob_chosen, load_pairs, make_linear_synthetic,
                  make_paper_synthetic, paper_rewards, save_pairs)
from reward import choice_correct


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
    choice = dataset.choices[pair_idx, label_idx[:, None]].long()  # (B, n + T)
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
    answered = population.choices >= 0  # (N, L)
    assert (answered.sum(1) == 1).all() and (answered.sum(0) == 40).all()
    for label in range(len(population.labels)):
        assert len(set(population.split[answered[:, label].numpy()])) == 1


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
    data.main(["synthetic", "--generator=linear", "--num_pairs=300", "--dim=3", f"--out={path}"])
    assert load_pairs(path).pairs.shape == (300, 2, 3)


def test_cli_requires_out():
    with pytest.raises(ConfigError, match="config key 'out': a value is required"):
        data.main(["synthetic"])


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
    assert bayes_log_prob_chosen(population.meta, batch) is None


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
    assert message in data.text_pair_problem(row)


def test_read_text_pairs_reports_bad_lines(tmp_path, capsys):
    path = str(tmp_path / "pairs.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(GOOD_ROW) + "\n{oops\n\n" + json.dumps(dict(GOOD_ROW, split="dev")) + "\n")
    with pytest.raises(DataError, match=f"{path}: 2 bad lines") as error:
        data.read_text_pairs(path)
    assert f"{path}:2: invalid JSON" in str(error.value) and f"{path}:4: split 'dev'" in str(error.value)
    assert data.read_text_pairs(path, skip_bad=True) == [GOOD_ROW]
    assert "skipped 2 bad lines, kept 1" in capsys.readouterr().out


def test_text_pairs_round_trip_to_data(tmp_path):
    rows = [GOOD_ROW, dict(GOOD_ROW, choices={"u2": 1}, split="val")]
    path = str(tmp_path / "pairs.jsonl")
    data.write_text_pairs(path, rows)
    d = data.text_pairs_to_data(data.read_text_pairs(path), torch.zeros(2, 2, 3))
    assert d.labels == ["u1", "u2"] and list(d.split) == ["train", "val"]
    assert d.choices.tolist() == [[0, -1], [-1, 1]]
