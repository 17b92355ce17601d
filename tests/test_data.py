"""data.py: the synthetic generators, the .npz format and its validation, the episode sampler."""

import os

import numpy as np
import pytest
import torch

import data
from common import ConfigError
from conftest import prepare_main
from data import DataError, EpisodeSampler, load_pairs, make_linear_synthetic, paper_rewards, save_pairs


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


def test_a_populations_test_users_can_answer_more_and_the_rest_stay_the_same(population):
    """test_pairs_per_user: a larger question pool for test users; train and val rows are unchanged."""
    more = make_linear_synthetic(num_users=50, pairs_per_user=40, dim=3, seed=0, test_pairs_per_user=55)
    n = len(population.pairs)
    assert torch.equal(more.pairs[:n], population.pairs) and list(more.split[:n]) == list(population.split)
    rows, labels, values = more.answered()
    old = rows < n
    assert all(torch.equal(a[old], b) for a, b in zip((rows, labels, values), population.answered()))
    counts = torch.bincount(labels, minlength=50)
    tested = torch.tensor([more.split[rows[labels == u][0]] == "test" for u in range(50)])
    assert tested.any() and (counts[tested] == 55).all() and (counts[~tested] == 40).all()
    assert set(more.split[n:]) == {"test"} and (more.pairs[n:] != more.pairs[:len(more.pairs) - n]).any()
    # every answer, the extra ones too, is its own user's (temperature 0: the larger w . x; the users'
    # weights are the generator's first draws)
    rows, labels, values = more.answered()
    w = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    rewards = (more.pairs[rows] * w[labels, None]).sum(-1)  # (A, 2)
    assert torch.equal(values.long(), (rewards[:, 1] > rewards[:, 0]).long())


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


def test_a_share_of_episodes_reads_the_chosen_questions_in_order(paper):
    """train.active_selector: with sampler.active set, a share of episodes has as its context the
    given positions of the user's pairs, in their order; the targets stay random and disjoint."""
    sampler = EpisodeSampler(paper, "train", num_targets=6, max_context=4, seed=2)
    gen = torch.Generator().manual_seed(0)
    sampler.active = torch.stack([torch.randperm(int(c), generator=gen)[:4] for c in sampler.counts])
    sampler.active_fraction = 1.0
    batch = sampler.sample(64)
    asked = sampler.table[batch["label_rows"][:, None], sampler.active[batch["label_rows"]]]
    assert torch.equal(batch["pair_idx"][:, :4], asked)
    assert all(len(set(row.tolist())) == 10 for row in batch["pair_idx"])
    assert len({tuple(r) for r in batch["pair_idx"][:, 4:].tolist()}) > 2  # random targets
    sampler.active_fraction = 0.5
    share = (sampler.sample(2000)["pair_idx"][:, :4] == asked[:1]).all(1).float().mean()
    assert 0.2 < share < 0.3  # the first episode's label in half the episodes, the chosen ones in half of those
    sampler.active_fraction = 1.0
    fixed = sampler.sample(400, num_context=2)  # the 2 first questions; the other 2 chosen are not favoured as targets
    asked = sampler.table[fixed["label_rows"][:, None], sampler.active[fixed["label_rows"]]]
    assert torch.equal(fixed["pair_idx"][:, :2], asked[:, :2])
    later = (fixed["pair_idx"][:, 2:, None] == asked[:, None, 2:]).any(1).float().mean()
    assert later < 0.5  # targets are random pairs: they rarely hit the two later chosen ones


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
