"""Tokenizers: UTF-8 bytes (the default, needs no files), a byte-level BPE trained on the corpus with the
`tokenizers` library and saved for reuse, or any Hugging Face `tokenizer.json` by path.

All three share one small interface: `name`, `vocab_size`, `eos_id`, `encode`, `encode_batch`, `decode`.
`tokenizer.json` files are plain JSON: loading one runs no code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .files import atomic_path

EOS = "<|endoftext|>"


class ByteTokenizer:
    """Token i < 256 is byte i of the UTF-8 text; 256 is the end-of-document token."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` (a trained BPE or any tokenizer.json)."""

    def __init__(self, tokenizer, path: str | os.PathLike | None = None, name: str | None = None):
        self.tokenizer = tokenizer
        self.path = Path(path) if path is not None else None
        self.name = name or (f"hf:{self.path}" if self.path else "hf")
        # get_vocab_size(with_added_tokens=True) counts special tokens: the model must have a row for each.
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = tokenizer.token_to_id(EOS)
        self._check_ids()

    def _check_ids(self) -> None:
        """Every id the tokenizer can emit must be below its vocabulary size: the model gets that many
        embedding rows, and a larger id would only fail deep inside training (an IndexError in the embedding)."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        bad = sorted(((i, t) for t, i in vocab.items() if not 0 <= i < self.vocab_size), reverse=True)
        if bad:
            top, token = bad[0]
            where = f"tokenizer file {str(self.path)!r}" if self.path else f"tokenizer {self.name!r}"
            raise ValueError(
                f"{where} maps token {token!r} to id {top}, outside its vocabulary of {self.vocab_size} ids "
                f"(0..{self.vocab_size - 1}; {len(bad)} token(s) out of range), so the model would have no "
                "embedding row for it. The file is inconsistent: renumber its vocab and added_tokens from 0 "
                "without gaps"
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {str(path)!r} does not exist (a tokenizer is 'byte', or the path of a Hugging Face "
                "tokenizer.json or of a folder holding one)"
            )
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception on malformed JSON
            raise ValueError(f"tokenizer file {str(path)!r} is not a valid tokenizer.json: {err}") from err
        return cls(tok, path)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def train_byte_bpe(texts: Iterable[str], vocab_size: int, save_to: str | os.PathLike) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) and save it atomically to `save_to`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"bpe vocab_size must exceed the 256 byte tokens plus {EOS}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    with atomic_path(save_to) as tmp:
        tok.save(tmp)
    return HFTokenizer(tok, save_to, name=f"bpe{vocab_size}")


def load_tokenizer(spec: str = "byte") -> ByteTokenizer | HFTokenizer:
    """'byte' or a path to a tokenizer.json (or a folder holding one). Training is `train_byte_bpe`."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer.from_file(spec)
