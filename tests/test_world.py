"""world.py: the steering world's gold reward read from text, its users and pairs, by hand."""

import math

import numpy as np
import pytest

import world


def test_attributes_read_text_as_people_write_it():
    a = world.attributes("Tell me about OWLS!", "Owls are lovely. owls exist . kites feel cold. owls blue .")
    # 4 sentences: two well formed on topic, one off topic, one malformed ("owls blue")
    assert a == {"length": 4.0, "tone": (1 + 0 - 1 + 0) / 4, "relevance": 0.5}
    assert world.attributes("describe owls .", "") == {"length": 0.0, "tone": 0.0, "relevance": 0.0}


def test_gold_reward_by_hand():
    # relevance 1, 2 sentences, tone (1 + 0) / 2; user (length 3, tone 0.5)
    assert world.gold_reward("Describe owls.", "owls are lovely . owls exist .", (3.0, 0.5)) == pytest.approx(4 - 0.3)
    assert world.gold_reward("Describe owls.", "", (3.0, 0.5)) == pytest.approx(-0.3 * 9 - 2 * 0.25)


def test_best_reward_by_hand():
    # length 3 needs tone 1/3 or 2/3 (miss 1/6); lengths 2 and 4 hit tone 0.5 but miss length by 1
    assert world.best_reward((3.0, 0.5)) == pytest.approx(4 - 2 / 36)
    assert world.best_reward((6.0, -1.0)) == pytest.approx(4.0)


def test_pair_kind():
    q = "Describe owls."
    assert world.pair_kind(q, "owls exist .", "kites exist .") == "agree"  # relevance alone decides
    assert world.pair_kind(q, "owls exist .", "owls exist . owls exist . owls exist .") == "conflict"
    assert world.pair_kind(q, "owls are lovely .", "owls are dull .") == "conflict"
    assert world.pair_kind(q, "owls exist .", "owls exist .") == "conflict"  # a tie is not an agreement


def test_test_users_and_topics_are_never_seen_in_training():
    rows, preferences = world.make_pairs(users=(5, 2, 3), pairs_per_user=4, seed=1)
    users_of = {split: {u for r in rows if r["split"] == split for u in r["choices"]} for split in ("train", "test")}
    assert len(users_of["test"]) == 3 and not users_of["train"] & users_of["test"]
    for r in rows:
        assert world.prompt_topic(r["prompt"]) in world.TOPICS[r["split"]]
    assert not set(world.TOPICS["train"]) & set(world.TOPICS["test"])
    assert set(preferences) == {u for r in rows for u in r["choices"]}


def test_choices_are_bradley_terry_on_the_gold_reward():
    rows, preferences = world.make_pairs(users=(200, 0, 0), pairs_per_user=10, seed=0)
    agree, expected = [], []
    for r in rows:
        assert len(r["choices"]) == 4  # each pair is answered by four users
        for user, choice in r["choices"].items():
            margin = (world.gold_reward(r["prompt"], r["response_b"], preferences[user])
                      - world.gold_reward(r["prompt"], r["response_a"], preferences[user]))
            agree.append((margin > 0) == (choice == 1))
            expected.append(1 / (1 + math.exp(-abs(margin))))
    assert abs(np.mean(agree) - np.mean(expected)) < 0.02  # 2,000 choices: SE about 0.008
    assert np.mean(agree) < 0.95  # no single pair reveals a user
