"""
UltraFeedback as text pairs: every two rated completions of a prompt, one label per
annotation aspect (a user). Pairs where a label ties or says N/A are dropped, and
`conflict_fraction` of the rest (1.0, as in the paper: all) are pairs the labels rank
oppositely. Pairs are split 80/10/10 by prompt, so no prompt is in two splits (the
paper's code splits by pair).

    python prepare/ultrafeedback.py --out=data/uf_hh                    # HH text pairs (hub)
    python prepare/ultrafeedback.py --source=uf.jsonl --labels=[helpfulness,honesty,truthfulness] --out=data/uf_hht

The source is a hub dataset name or a local .json/.jsonl/.parquet file or folder
(parquet needs pyarrow). A source row has 'instruction' and 'completions'; each
completion has 'response' and 'annotations' {label: {'Rating': '1'..'5' or 'N/A', ...}}.
Then embed the pairs: prepare/embed.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import glob
import itertools
import json
import math
import re

import torch

from common import REQUIRED, check, load_options, run_script
from data import SPLITS, DataError, random_split
from runs import check_not_there, check_out_path
from text import report_problems, write_text_pairs

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


UF_DEFAULTS = {
    "source": "openbmb/UltraFeedback",  # hub dataset name, or a local .json/.jsonl/.parquet file or folder
    "out": REQUIRED,  # folder: pairs.jsonl goes there
    "overwrite": False,  # replace an existing OUT/pairs.jsonl
    "labels": ["helpfulness", "honesty"],  # the users (HH); add truthfulness for HHT
    "conflict_fraction": 1.0,  # share of the pairs the labels rank oppositely (the paper: 1.0)
    "seed": 0,  # subsampling and the split by prompt
    "skip_bad_rows": False,  # drop malformed source rows instead of stopping
}


def main(argv):
    config = load_options(UF_DEFAULTS, argv)
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


if __name__ == "__main__":
    run_script(main)
