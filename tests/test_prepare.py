"""prepare/: UltraFeedback pairs, embedding (resumable), the synthetic CLI, and the path from raw data to an evaluated run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import text
import toy
from common import ConfigError, run_script
from conftest import CHAT_TEMPLATE, GOOD_ROW, REPO, prepare_main, write_lines
from data import DataError, load_pairs
from prepare import embed as embed_script, synthetic as synthetic_script, ultrafeedback as uf


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


def test_prepare_help_prints_the_examples(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prepare/synthetic.py", "--help"])  # common.run_script answers --help
    run_script(synthetic_script.main)
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


@pytest.mark.parametrize("args", [["--test_pairs_per_user=80"], ["--generator=linear", "--test_pairs_per_user=80"],
                                  ["--generator=linear", "--num_users=10", "--test_pairs_per_user=30"]],
                         ids=["not a population", "types, not users", "fewer than the others"])
def test_cli_refuses_more_test_pairs_except_for_a_populations_test_users(tmp_path, args):
    with pytest.raises(ConfigError, match="config key 'test_pairs_per_user': gives a population's test users more"):
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


def test_embed_a_model_that_cannot_be_loaded_is_one_config_error(tmp_path, embed_in):
    with pytest.raises(ConfigError, match=r"^config key 'model': .*no_such_model cannot be loaded \("):
        embed(str(tmp_path / "no_such_model"), embed_in, str(tmp_path / "f.npz"))
    assert not (tmp_path / "f.npz").exists() and not (tmp_path / "f.npz.partial").exists()
