"""Turn any text source into llm.c / modded-nanogpt token shards for `TokenShardDataModule`.

    python experiments/prepare_shards.py --source data/paper_corpus --out data/shards --tokenizer bpe --vocab-size 16384
    python experiments/prepare_shards.py --source stdlib --out data/stdlib_bytes               # byte-level
    python experiments/prepare_shards.py --hf-dataset wikitext --hf-config wikitext-103-raw-v1 --out data/wt103 \\
        --tokenizer path/to/tokenizer.json

Writes <out>/<name>_val_000000.bin, <out>/<name>_train_000000.bin, ... (256-int32 header: magic 20240520,
version 1 for uint16 tokens / 2 for uint32, token count; then the tokens), plus `meta.json` (vocabulary size,
tokenizer, counts) and, for a trained BPE, `tokenizer.json` — all that `TokenShardDataModule` needs:

    data:
      class_path: parallax_lightning.data.TokenShardDataModule
      init_args: {train_files: data/shards/*_train_*.bin, val_files: data/shards/*_val_*.bin}

Documents go to validation by a hash of their index (`--val-fraction`), the same rule TextDataModule uses,
or, with `--val-source`, validation is exactly that source's documents and training exactly --source's (a trained
BPE then sees the training documents only). Each document is followed by the end-of-document token. Output
folders are never overwritten.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from parallax_lightning.data.shards import write_shard
from parallax_lightning.data.sources import TextSource, is_validation_document
from parallax_lightning.data.tokenizers import ByteTokenizer, load_tokenizer, train_byte_bpe


class ShardWriter:
    """Accumulates tokens and writes a shard every `shard_tokens` tokens."""

    def __init__(self, out: Path, name: str, split: str, shard_tokens: int, dtype):
        self.out, self.name, self.split = out, name, split
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.filled = 0
        self.index = 0
        self.total = 0
        self.paths: list[Path] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        path = self.out / f"{self.name}_{self.split}_{self.index:06d}.bin"
        write_shard(path, self.buffer[: self.filled])
        self.paths.append(path)
        self.total += self.filled
        self.index += 1
        self.filled = 0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", nargs="+", default=["stdlib"], help="files, folders, globs, or 'stdlib'")
    ap.add_argument("--suffixes", nargs="*", default=None, help="keep only these file suffixes in folders")
    ap.add_argument("--hf-dataset", default=None, help="a Hugging Face dataset name (needs `datasets`)")
    ap.add_argument("--hf-config", default=None)
    ap.add_argument("--hf-split", default="train")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes of text")
    ap.add_argument("--tokenizer", default="byte", help="'byte', 'bpe' (train one), or a tokenizer.json path")
    ap.add_argument("--vocab-size", type=int, default=16384, help="vocabulary of a trained BPE")
    ap.add_argument("--bpe-train-bytes", type=int, default=200_000_000, help="train the BPE on at most this much text")
    ap.add_argument("--out", type=Path, required=True, help="output folder (must not exist, or be empty)")
    ap.add_argument("--name", default="data", help="shard file prefix")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    ap.add_argument(
        "--val-fraction", type=float, default=None, help="share of documents held out for validation (default 0.01)"
    )
    ap.add_argument(
        "--val-source", nargs="+", default=None, help="validation text kept apart from --source (files, folders, globs)"
    )
    args = ap.parse_args(argv)
    if args.val_source is not None and args.val_fraction is not None:
        sys.exit(
            "prepare_shards: give --val-source or --val-fraction, not both (--val-source is the whole validation split)"
        )
    if args.val_source is not None and args.hf_dataset:
        sys.exit("prepare_shards: --val-source needs file sources, not --hf-dataset")
    val_fraction = 0.01 if args.val_fraction is None else args.val_fraction

    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"prepare_shards: {args.out} exists and is not empty; choose a new folder (nothing was overwritten)")
    if args.shard_tokens < 1:
        sys.exit(f"prepare_shards: --shard-tokens must be positive, got {args.shard_tokens}")
    source = TextSource(
        paths=args.source,
        suffixes=args.suffixes,
        hf_dataset=args.hf_dataset,
        hf_config=args.hf_config,
        hf_split=args.hf_split,
        text_field=args.text_field,
        max_bytes=args.max_bytes,
    )
    source.check()  # missing paths and empty corpora fail before any work
    val_source = None
    if args.val_source is not None:
        val_source = TextSource(paths=args.val_source, suffixes=args.suffixes)
        val_source.check()
        val_fraction = 0.0  # every --source document trains
    args.out.mkdir(parents=True, exist_ok=True)

    if args.tokenizer == "bpe":
        train_docs = (
            d
            for i, d in enumerate(_capped(source.documents(), args.bpe_train_bytes))
            if not is_validation_document(i, val_fraction)
        )
        print(f"prepare_shards: training a byte-level BPE of {args.vocab_size} on {source.describe()} ...")
        tokenizer = train_byte_bpe(train_docs, args.vocab_size, args.out / "tokenizer.json")
        tokenizer_spec = "tokenizer.json"
    elif args.tokenizer == "byte":
        tokenizer, tokenizer_spec = ByteTokenizer(), "byte"
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        shutil.copyfile(tokenizer.path, args.out / "tokenizer.json")
        tokenizer_spec = "tokenizer.json"

    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    writers = {split: ShardWriter(args.out, args.name, split, args.shard_tokens, dtype) for split in ("train", "val")}
    eos = tokenizer.eos_id
    n_docs = 0
    with tqdm(desc="tokenizing", unit=" docs") as progress:
        # Batches of documents: the `tokenizers` library encodes a batch on all cores.
        for start, docs, held_out in _labelled_batches(source, val_source, 256):
            for i, ids in enumerate(tokenizer.encode_batch(docs), start=start):
                split = "val" if held_out or is_validation_document(i, val_fraction) else "train"
                writers[split].add(np.asarray(ids, dtype=dtype))
                if eos is not None:
                    writers[split].add(np.array([eos], dtype=dtype))
            n_docs += len(docs)
            progress.update(len(docs))
            progress.set_postfix(train_tokens=writers["train"].total + writers["train"].filled)
    for w in writers.values():
        w.flush()
    if writers["train"].total == 0:
        sys.exit("prepare_shards: no training tokens were written (is the source empty, or --val-fraction 1?)")

    meta = {
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer_spec,
        "eos_id": eos,
        "source": source.describe(),
        "documents": n_docs,
        "val_fraction": None if val_source is not None else val_fraction,
        "val_source": val_source.describe() if val_source is not None else None,
        "train_tokens": writers["train"].total,
        "val_tokens": writers["val"].total,
        "train_shards": [p.name for p in writers["train"].paths],
        "val_shards": [p.name for p in writers["val"].paths],
    }
    if writers["val"].total < 100_000:
        print(
            f"prepare_shards: note: only {writers['val'].total:,} validation tokens; raise --val-fraction for a "
            "steadier validation loss"
        )
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"prepare_shards: {n_docs} documents -> {meta['train_tokens']:,} train tokens in {len(meta['train_shards'])} "
        f"shard(s), {meta['val_tokens']:,} val tokens in {len(meta['val_shards'])}; vocab {meta['vocab_size']} -> {args.out}"
    )
    return meta


def _batched(documents, size: int):
    batch, start = [], 0
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield start, batch
            start += size
            batch = []
    if batch:
        yield start, batch


def _labelled_batches(source, val_source, size: int):
    """(start index, documents, held out?) batches: --source's documents, then --val-source's (all held out)."""
    for start, docs in _batched(source.documents(), size):
        yield start, docs, False
    if val_source is not None:
        for start, docs in _batched(val_source.documents(), size):
            yield start, docs, True


def _capped(documents, max_bytes: int):
    used = 0
    for doc in documents:
        if used >= max_bytes:
            return
        used += len(doc)
        yield doc


if __name__ == "__main__":
    main()
