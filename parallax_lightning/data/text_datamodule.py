"""TextDataModule: language modelling on raw text — local files, folders or globs, a Hugging Face dataset
by name, or (the default, always present offline) the Python standard library's own sources.

Documents are split into train / validation by a hash of their index (`val_fraction`), tokenized, and
joined with the end-of-document token. Tokenizers: "byte" (default), "bpe" (a byte-level BPE trained on the
training documents with `tokenizers`, saved in `cache_dir` and reused by the next run with the same data),
or a path to a Hugging Face tokenizer.json.

Binary files: a local file whose first 8 KB hold a NUL byte or are more than 30% undecodable as UTF-8 is
not text. By default (`binary_files="warn"`) it is still read as text (undecodable bytes replaced) and one
warning names it; `"skip"` leaves such files out, `"error"` refuses the source. It warns rather than refuses
by default because the test is a heuristic (a text file in a legacy encoding can trip it); the warning names
the files and how to narrow the source.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from .files import atomic_path
from .sources import STDLIB, BinaryFiles, TextSource, is_validation_document
from .token_datamodule import TokenDataModule
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, train_byte_bpe

DEFAULT_CACHE = ".parallax_cache"


class TextDataModule(TokenDataModule):
    """Text corpus → token stream.

    Args:
        source: path(s), folder(s), glob(s), or "stdlib" (the standard library's sources, tests excluded).
        suffixes: keep only files with these suffixes when a folder is given (e.g. [".md", ".txt"]).
        hf_dataset: a Hugging Face dataset name (needs the `datasets` package); used instead of `source`.
        hf_config / hf_split / text_field: which configuration, split and column of that dataset.
        max_documents / max_bytes: cap the corpus (stable order, so the cap is reproducible).
        binary_files: what a file that looks binary does: "warn" (read it as text, with a warning naming it),
            "skip" (leave it out) or "error" (refuse). See the module docstring.
        tokenizer: "byte", "bpe" (train a byte-level BPE of `bpe_vocab_size`), or a tokenizer.json path.
        cache_dir: where a trained BPE and token caches are kept. Default: a `.parallax_cache` folder
            beside the data (inside a source folder, or next to a source file), else in the working folder.
        **kwargs: the loader settings of TokenDataModule (seq_len, batch_size, vocab_size, val_fraction, ...).
    """

    def __init__(
        self,
        source: str | list[str] = STDLIB,
        suffixes: list[str] | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        text_field: str = "text",
        max_documents: int | None = None,
        max_bytes: int | None = None,
        binary_files: BinaryFiles = "warn",
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
        cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters(logger=False)
        self.source = TextSource(
            paths=source,
            suffixes=suffixes,
            hf_dataset=hf_dataset,
            hf_config=hf_config,
            hf_split=hf_split,
            text_field=text_field,
            max_documents=max_documents,
            max_bytes=max_bytes,
            binary_files=binary_files,
        )
        # Missing paths, empty corpora and a missing `datasets` package fail here, before any work.
        self.source.check()
        self.tokenizer_spec = tokenizer
        self.bpe_vocab_size = bpe_vocab_size
        self.cache_dir = Path(cache_dir) if cache_dir else self._default_cache_dir()
        if tokenizer not in ("byte", "bpe"):
            self.tokenizer = load_tokenizer(tokenizer)  # a path: checked now
        elif tokenizer == "byte":
            self.tokenizer = ByteTokenizer()
        self._documents: list[str] | None = None

    def _default_cache_dir(self) -> Path:
        if not self.source.is_hf:
            paths = [self.source.paths] if isinstance(self.source.paths, str) else list(self.source.paths)
            first = paths[0]
            if first != STDLIB and Path(first).exists():
                base = Path(first) if Path(first).is_dir() else Path(first).parent
                if os.access(base, os.W_OK):
                    return base / DEFAULT_CACHE
        return Path.cwd() / DEFAULT_CACHE

    # -- documents and tokenizer -----------------------------------------------------------------
    def documents(self) -> list[str]:
        if self._documents is None:
            self._documents = list(self.source.documents())
            if not self._documents or not any(d.strip() for d in self._documents):
                raise ValueError(f"data source {self.source.describe()} is empty: no text in any document")
        return self._documents

    def _split_documents(self) -> tuple[list[str], list[str]]:
        docs = self.documents()
        val_mask = [is_validation_document(i, self.val_fraction) for i in range(len(docs))]
        train = [d for d, v in zip(docs, val_mask) if not v]
        val = [d for d, v in zip(docs, val_mask) if v]
        return train, val

    def _data_key(self) -> str:
        if self.source.is_hf:
            return hashlib.blake2b(self.source.describe().encode(), digest_size=8).hexdigest()
        return self.source.fingerprint()

    def get_tokenizer(self):
        if self.tokenizer is None:  # "bpe": reuse a saved one for this data, else train and save it
            path = self.cache_dir / f"bpe{self.bpe_vocab_size}-{self._data_key()}.json"
            if path.is_file():
                self.tokenizer = HFTokenizer.from_file(path)
            else:
                train_docs, _ = self._split_documents()
                self.tokenizer = train_byte_bpe(train_docs or self.documents(), self.bpe_vocab_size, path)
        return self.tokenizer

    def _tokenizer_vocab_size(self) -> int:
        return self.get_tokenizer().vocab_size

    def _fingerprint(self) -> str:
        return f"{self.source.describe()}|{self._data_key()}|{self.tokenizer_spec}|{self.val_fraction}"

    # -- tokens -------------------------------------------------------------------------------------
    def _encode(self, docs: list[str]) -> np.ndarray:
        tok = self.get_tokenizer()
        eos = tok.eos_id
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        pieces = []
        for ids in tok.encode_batch(docs):
            pieces.append(np.asarray(ids, dtype=dtype))
            if eos is not None:
                pieces.append(np.array([eos], dtype=dtype))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)

    def _load_splits(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        tok = self.get_tokenizer()
        cache = None
        if not isinstance(tok, ByteTokenizer):  # bytes are instant; a BPE pass over 10 MB is not
            tok_key = hashlib.blake2b(Path(tok.path).read_bytes(), digest_size=8).hexdigest() if tok.path else "x"
            cache = self.cache_dir / f"tokens-{self._data_key()}-{tok_key}-{self.val_fraction}.npz"
            if cache.is_file():
                with np.load(cache) as z:
                    return [z["train"]], [z["val"]]
        train_docs, val_docs = self._split_documents()
        if not train_docs or not val_docs:
            # Too few documents for a per-document split: hold out the tail of the token stream instead.
            tokens = self._encode(self.documents())
            n_val = int(len(tokens) * self.val_fraction) if self.val_fraction > 0 else 0
            if self.val_fraction > 0:
                n_val = max(n_val, min(len(tokens) // 2, self.seq_len + 1))
            train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
        else:
            train, val = self._encode(train_docs), self._encode(val_docs)
        if len(val) == 0:
            warnings.warn("val_fraction=0: validating on the training data", stacklevel=2)
            val = train
        if cache is not None:
            self._save_cache(cache, train, val)
        return [train], [val]

    @staticmethod
    def _save_cache(path: Path, train: np.ndarray, val: np.ndarray) -> None:
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, train=train, val=val)
        except OSError as err:  # a read-only cache folder costs time, not correctness
            warnings.warn(f"could not cache tokens in {path}: {err}", stacklevel=2)
