"""toy.py: the two-type toy text world (gold rewards, pairs, tokenizer)."""


import pytest

import data
import text
import toy
from data import DataError


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
