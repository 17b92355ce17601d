"""
Context features of text pairs: the feature-pair .npz (data.py's format), row-aligned
with the JSONL, computed as text.embed_pairs computes them (its two steps,
text.embedding_sequences then text.sequence_embeddings, run in resumable chunks; the
built-in worlds and steer.py call embed_pairs itself). Per response, a decoder's final hidden layer at the last token of prompt +
response (chat template included, as the policy sees it), or an encoder's mean over
the tokens. Interrupted, it continues from OUT.partial/ when run again.

    python prepare/embed.py --model=meta-llama/Meta-Llama-3-8B --in=data/uf_hh/pairs.jsonl --out=data/uf_hh/features.npz

A pair longer than max_length is refused (with a count and the first row), never
truncated or dropped: a truncated pair has no response end to embed, and a dropped one
would break the row alignment train_policy.py relies on.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import json
import shutil

import numpy as np
import torch
from tqdm import tqdm

from common import REQUIRED, ConfigError, check, load_options, pick_device, run_script
from data import DataError, describe, file_sha256, save_pairs
from runs import check_not_there, check_out_path
from text import embedding_sequences, load_embedder, read_text_pairs, sequence_embeddings, text_pairs_to_data


def check_lengths(path, sequences, max_length):
    """Refuse pairs longer than max_length: embed never truncates and never drops a pair."""
    long_rows = [i // 2 for i in range(0, len(sequences), 2) if max(map(len, sequences[i:i + 2])) > max_length]
    if long_rows:
        raise DataError(f"{path}: {len(long_rows)} of {len(sequences) // 2} pairs are longer than max_length = "
                        f"{max_length} tokens (prompt + response; first at row {long_rows[0]}). Raise --max_length "
                        "or remove them from the JSONL: the features must stay row-aligned with it")


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
    rows = read_text_pairs(in_path, how_to_skip="fix or remove them in the file; then embed again")
    if not rows:
        raise DataError(f"{in_path}: no pairs")
    device = pick_device(device)
    try:
        tokenizer, model, pooling = load_embedder(model_name, device, trust_remote_code)
    except OSError as e:  # no such folder, or a hub name that cannot be fetched
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config key 'model': {model_name} cannot be loaded ({reason})") from None
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


def main(argv):
    config = load_options(EMBED_DEFAULTS, argv)
    check(config["batch_size"] > 0, "batch_size", "must be positive")
    check(config["save_every"] > 0, "save_every", "must be positive")
    check(config["max_length"] > 0, "max_length", "must be positive")
    check_out_path("out", config["out"])
    check_not_there(config["out"], config["overwrite"])
    data = embed_text_pairs(config["model"], config["in"], config["out"], config["batch_size"], config["max_length"],
                            config["device"], config["save_every"], config["trust_remote_code"])
    print(f"wrote {config['out']} ({data.meta['pooling']} pooling): {describe(data)}")
    return data


if __name__ == "__main__":
    run_script(main)
