"""TokenShardDataModule: language modelling on llm.c / modded-nanogpt token shards (memory-mapped).

Every shard's header is checked when the module is built, so a corrupt or truncated file is named before
training. The vocabulary comes from `vocab_size`, else from the `meta.json` that
`experiments/prepare_shards.py` writes beside its shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .shards import open_shard, read_header
from .sources import expand_paths
from .token_datamodule import TokenDataModule
from .tokenizers import load_tokenizer

META = "meta.json"


class TokenShardDataModule(TokenDataModule):
    """Token shards → token stream.

    Args:
        train_files: shard path(s), folder(s) or glob(s) for training (e.g. "data/fineweb/*_train_*.bin").
        val_files: shards for validation; None holds out the last `val_fraction` of the last training shard.
        tokenizer: "byte" or a tokenizer.json path, for `predict` and decoding; None = the one named in
            meta.json beside the shards, if any.
        check_token_range: scan the shards once and fail if a token id is outside the vocabulary
            (an out-of-range id would otherwise crash deep inside the embedding on the GPU).
        seq_len: tokens per training sequence (default 1024 here).
        **kwargs: the loader settings of TokenDataModule (batch_size, vocab_size, val_fraction, seed, ...).
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        tokenizer: str | None = None,
        check_token_range: bool = True,
        seq_len: int = 1024,
        **kwargs,
    ):
        super().__init__(seq_len=seq_len, **kwargs)
        self.save_hyperparameters(logger=False)
        self.train_files = expand_paths(train_files)
        self.val_files = expand_paths(val_files) if val_files is not None else []
        # Header checks for every shard now: corrupt files are named before anything else happens.
        self.headers = {str(p): read_header(p) for p in [*self.train_files, *self.val_files]}
        self.check_token_range = check_token_range
        self.meta = self._read_meta()
        spec = tokenizer if tokenizer is not None else self.meta.get("tokenizer")
        self.tokenizer = load_tokenizer(self._resolve_tokenizer(spec)) if spec else None
        if self.requested_vocab_size is None and "vocab_size" not in self.meta and self.tokenizer is None:
            raise ValueError(
                f"cannot tell the vocabulary of shards {[str(p) for p in self.train_files[:2]]}: set data.vocab_size "
                f"(e.g. 50257 for GPT-2 shards) or data.tokenizer, or keep the {META} that prepare_shards.py writes"
            )

    def _read_meta(self) -> dict:
        path = self.train_files[0].parent / META
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from err
        return {}

    def _resolve_tokenizer(self, spec: str) -> str:
        # meta.json names tokenizer files relative to itself.
        if spec != "byte" and not Path(spec).is_absolute():
            beside = self.train_files[0].parent / spec
            if beside.exists():
                return str(beside)
        return spec

    def _tokenizer_vocab_size(self) -> int:
        if self.tokenizer is not None:
            return self.tokenizer.vocab_size
        if "vocab_size" in self.meta:
            return int(self.meta["vocab_size"])
        return self.requested_vocab_size

    def _fingerprint(self) -> str:
        return ";".join(f"{Path(p).name}:{count}" for p, (_, count) in self.headers.items())

    def _load_splits(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        train = [open_shard(p) for p in self.train_files]
        val = [open_shard(p) for p in self.val_files]
        if self.check_token_range:
            vocab = self.vocab_size
            for path, arr in zip([*self.train_files, *self.val_files], [*train, *val]):
                top = int(arr.max()) if len(arr) else -1
                if top >= vocab:
                    raise ValueError(f"token shard {str(path)!r} holds token id {top}, outside vocab_size={vocab}")
        if not val:
            last = train[-1]
            n_val = max(int(len(last) * self.val_fraction), min(len(last) // 2, self.seq_len + 1))
            train[-1], val = last[: len(last) - n_val], [last[len(last) - n_val :]]
        return train, val
