"""The DataModule base every token source shares: vocabulary and sequence length for the CLI links,
deterministic resumable training batches, a fixed validation set, prompts for `predict`.

A subclass says where tokens come from by implementing three methods:
  `_tokenizer_vocab_size()`  the smallest vocabulary the model may have (checked against `vocab_size`),
  `_load_splits()`           (train arrays, validation arrays) of 1-D token arrays,
  `_fingerprint()`           a short string that changes when the data does (recorded in checkpoints),
and may set `self.tokenizer` (used by `predict` and for decoding).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from .sampling import EvalBatches, PromptDataset, RandomBatchStream, TokenWindows


def pad_vocab(n: int, multiple: int) -> int:
    """Round up to a multiple (64 keeps the embedding and head matmuls on fast tile sizes)."""
    return -(-n // multiple) * multiple if multiple > 1 else n


class TokenDataModule(pl.LightningDataModule):
    """Base class. Attributes read by the CLI: `vocab_size` (model vocabulary) and `seq_len`.

    The arguments below are declared here only: subclasses take their own and pass the rest on with
    `**kwargs` (jsonargparse follows them there, so `--data.help` lists these with their docs), restating
    one only to change its default.

    Args:
        seq_len: tokens per training sequence (the model's `max_seq_len` is linked to it).
        batch_size: sequences per batch on each device.
        vocab_size: model vocabulary; None = the tokenizer's, rounded up to `pad_vocab_multiple`.
            A value smaller than the tokenizer's vocabulary is an error.
        pad_vocab_multiple: rounding for the default vocabulary size.
        val_fraction: share of the data held out for validation (where the subclass splits itself).
        seed: the data seed; training batch i is a pure function of (seed, i).
        num_workers: DataLoader worker processes (the batch stream is the same for any number).
        predict_prompts: texts that `predict` continues.
    """

    def __init__(
        self,
        seq_len: int = 256,
        batch_size: int = 16,
        vocab_size: int | None = None,
        pad_vocab_multiple: int = 64,
        val_fraction: float = 0.05,
        seed: int = 1234,
        num_workers: int = 0,
        predict_prompts: list[str] | None = None,
    ):
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.save_hyperparameters(logger=False)  # subclasses add theirs: checkpoints record every setting
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.requested_vocab_size = vocab_size
        self.pad_vocab_multiple = pad_vocab_multiple
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.predict_prompts = predict_prompts
        self.tokenizer = None
        self._train: TokenWindows | None = None
        self._val: TokenWindows | None = None
        self._resume_batch: int | None = None

    # -- for subclasses -------------------------------------------------------------------------
    def _tokenizer_vocab_size(self) -> int:
        raise NotImplementedError

    def _load_splits(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        raise NotImplementedError

    def _fingerprint(self) -> str:
        return ""

    def get_tokenizer(self):
        """The tokenizer (for predict prompts and decoding), or None where the data came pre-tokenized."""
        return self.tokenizer

    # -- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        need = self._tokenizer_vocab_size()
        if self.requested_vocab_size is None:
            return pad_vocab(need, self.pad_vocab_multiple)
        if self.requested_vocab_size < need:
            raise ValueError(
                f"data.vocab_size={self.requested_vocab_size} is smaller than the tokenizer's vocabulary ({need}); "
                f"use at least {need} or leave vocab_size unset"
            )
        return self.requested_vocab_size

    # -- splits ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        _ = self.vocab_size  # a vocabulary smaller than the tokenizer's fails here, before loading
        train, val = self._load_splits()
        self._train = TokenWindows(train, self.seq_len, what="training data")
        self._val = TokenWindows(val, self.seq_len, what="validation data")

    @property
    def train_windows(self) -> TokenWindows:
        self.setup()
        return self._train

    @property
    def val_windows(self) -> TokenWindows:
        self.setup()
        return self._val

    # -- loaders --------------------------------------------------------------------------------
    def _micro_batches_done(self) -> int:
        """Training batches consumed so far: optimizer steps × accumulation (checkpoints fall on steps)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _stream_start(self, start: int | None) -> int:
        """The first training batch index of a new stream: `start` if given; else the position restored from
        a checkpoint, once; later reloads follow the trainer."""
        if start is None:
            start = self._resume_batch if self._resume_batch is not None else self._micro_batches_done()
            self._resume_batch = None
        return start

    def train_stream(self, start: int | None = None) -> RandomBatchStream:
        rank, world = self._rank_world()
        return RandomBatchStream(
            self.train_windows, self.batch_size, self.seed, rank=rank, world_size=world, start=self._stream_start(start)
        )

    def _loader(self, dataset) -> DataLoader:
        # batch_size=None: the datasets already yield whole batches (that is what makes them resumable).
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream())

    def val_dataloader(self) -> DataLoader:
        return self._loader(EvalBatches(self.val_windows, self.batch_size, seed=0))

    def test_dataloader(self) -> DataLoader:
        # There is no separate test split: `test` evaluates on the held-out validation windows.
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_prompts:
            raise ValueError("predict needs prompts: set data.predict_prompts (a list of strings)")
        return DataLoader(PromptDataset(self.predict_prompts, self.get_tokenizer()), batch_size=None)

    # -- resumable state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "next_batch": self._micro_batches_done(),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        changed = [
            f"{k}: {state[k]!r} -> {now!r}"
            for k, now in (
                ("seed", self.seed),
                ("batch_size", self.batch_size),
                ("seq_len", self.seq_len),
                ("fingerprint", self._fingerprint()),
            )
            if k in state and state[k] != now
        ]
        if changed:
            warnings.warn(
                "resuming with different data settings than the checkpoint was trained with "
                f"({'; '.join(changed)}): the batch stream will not continue the original one",
                stacklevel=2,
            )
        self._resume_batch = int(state.get("next_batch", 0))
