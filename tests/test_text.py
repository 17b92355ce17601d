"""text.py: JSONL text pairs (every malformed line named), tokens with the exact response start, embeddings."""

import json
import os

import pytest
import torch

import data
import text
import toy
from conftest import CHAT_TEMPLATE, GOOD_ROW, write_lines
from data import DataError, EpisodeSampler


# -----------------------------------------------------------------------------
# text pairs (JSONL)

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
    assert str(error.value).startswith(f"{path}: 1 bad lines (set data.skip_bad_lines=true to drop them):\n")
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
# tokens for text pairs: where the response begins

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
