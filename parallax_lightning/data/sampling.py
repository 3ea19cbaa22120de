"""Deterministic batches over token arrays.

Training batch i is a pure function of (seed, i): its window offsets come from a random generator seeded
with the pair, so resuming at step s only needs i = s × accumulation (stored in the checkpoint) to continue
the exact stream, with any number of data-loader workers. In data-parallel runs the batch for index i is
drawn for the whole world and each rank takes its slice, so N ranks see what one process with N× the batch
would see. Validation is a fixed, shuffled list of non-overlapping windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


class TokenWindows:
    """All windows of `seq_len + 1` consecutive tokens inside a list of 1-D token arrays.

    A window never crosses from one array to the next (arrays are separate shards or splits).
    """

    def __init__(self, arrays: Sequence[np.ndarray], seq_len: int, what: str = "data"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.arrays = list(arrays)
        self.seq_len = seq_len
        self.span = seq_len + 1
        counts = np.array([max(0, len(a) - self.span + 1) for a in self.arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_windows = int(self.offsets[-1])
        self.num_tokens = int(sum(len(a) for a in self.arrays))
        if self.num_windows == 0:
            longest = max((len(a) for a in self.arrays), default=0)
            raise ValueError(
                f"seq_len={seq_len} is larger than the {what}: it needs {self.span} consecutive tokens "
                f"but the longest piece holds {longest} (total {self.num_tokens}); lower seq_len or add data"
            )

    def gather(self, starts: np.ndarray) -> np.ndarray:
        """Windows starting at the given global start indices, as an (n, seq_len + 1) int64 array."""
        starts = np.asarray(starts, dtype=np.int64)
        which = np.searchsorted(self.offsets, starts, side="right") - 1
        out = np.empty((len(starts), self.span), dtype=np.int64)
        for row, (a, s) in enumerate(zip(which, starts)):
            local = int(s - self.offsets[a])
            out[row] = self.arrays[a][local : local + self.span]
        return out

    def non_overlapping_starts(self) -> np.ndarray:
        """Global start indices of windows at stride seq_len inside each array (each token predicted once)."""
        starts = []
        for a, arr in enumerate(self.arrays):
            n = (len(arr) - 1) // self.seq_len
            starts.append(self.offsets[a] + np.arange(n, dtype=np.int64) * self.seq_len)
        return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


def to_batch(windows: np.ndarray) -> dict[str, torch.Tensor]:
    """(n, T + 1) windows → {"input_ids": (n, T), "labels": (n, T)} with labels the next tokens."""
    t = torch.from_numpy(windows)
    return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}


class IndexedBatchStream(IterableDataset):
    """An endless stream of training batches where batch i is a function of i alone (`batch(index)`, defined by
    subclasses), which is what makes a stream resumable and independent of the DataLoader's workers.

    `start` is the first batch index to yield (the resume point); `stop` (exclusive) bounds the stream
    for tests and tools. Workers of a DataLoader take indices round-robin, which the DataLoader returns
    in order, so the stream is the same with 0 or many workers. In data-parallel runs a batch is drawn for
    the whole world and each rank keeps `rank_slice` of it.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, start: int = 0, stop: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.stop = stop

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def rank_slice(self, per_rank: int) -> slice:
        """This rank's rows of a batch drawn for the whole world (`per_rank` rows each)."""
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start + worker
        while self.stop is None or index < self.stop:
            yield self.batch(index)
            index += num_workers


class RandomBatchStream(IndexedBatchStream):
    """Batches of random windows; batch i depends on (seed, i) only."""

    def __init__(
        self,
        windows: TokenWindows,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        stop: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        super().__init__(rank=rank, world_size=world_size, start=start, stop=stop)
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed

    def starts_for(self, index: int) -> np.ndarray:
        """Window start indices of this rank's part of batch `index`."""
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, self.windows.num_windows, size=self.batch_size * self.world_size)
        return starts[self.rank_slice(self.batch_size)]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        return to_batch(self.windows.gather(self.starts_for(index)))


class EvalBatches(Dataset):
    """Non-overlapping windows in a fixed shuffled order (so a prefix of the batches — e.g. with
    `trainer.limit_val_batches` — still samples the whole split), grouped into batches."""

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int = 0):
        starts = windows.non_overlapping_starts()
        if len(starts) == 0:
            raise ValueError(
                f"the validation split ({windows.num_tokens} tokens) is shorter than seq_len+1={windows.span}"
            )
        self.windows = windows
        self.starts = starts[np.random.default_rng(seed).permutation(len(starts))]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return to_batch(self.windows.gather(self.starts[i * self.batch_size : (i + 1) * self.batch_size]))


class PromptDataset(Dataset):
    """Encoded prompts for `predict` (one prompt per batch; prompts differ in length)."""

    def __init__(self, prompts: Sequence[str], tokenizer):
        if tokenizer is None:
            raise ValueError("predict needs a tokenizer to encode prompts; set data.tokenizer")
        self.prompts = list(prompts)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        ids = self.tokenizer.encode(self.prompts[i])
        if len(ids) == 0:
            raise ValueError(f"predict prompt {i} ({self.prompts[i]!r}) encodes to no tokens")
        return {"input_ids": torch.as_tensor(np.asarray(ids, dtype=np.int64))[None], "prompt_index": i}
