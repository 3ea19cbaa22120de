"""Loss at each position of long documents, at and beyond the training length.

A model trained on T-token windows is evaluated on the first L tokens of held-out documents for L = T, 2T,
4T (any list): the mean next-token loss at every position, averaged over documents. Within T the curve
falls as context accumulates; beyond T it shows whether the model keeps using the longer context, stays
flat, or breaks down (positions it never saw in training).

- `document_windows`: the first L + 1 tokens of each document at least that long (documents are separated
  by the end-of-document token, as the platform's TextDataModule and llm.c shards store them), or plain
  consecutive windows when the data has no separator.
- `per_position_loss`: the (L,) curve for a decoder and an (N, L + 1) array of tokens.
- `PerPositionLoss`: a callback that computes the curves from the validation split of whatever data module
  the run uses (text files, stdlib, HF datasets, token shards) at the end of `fit` and in `validate`, and
  logs each as an MLflow metric `pos_loss/len{L}` whose step is the position (the start of a bucket of
  positions), so the curves of several runs overlay in the MLflow UI, plus a figure.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from ..data.sampling import TokenWindows
from .length_guard import beyond_max_seq_len, check_lengths, is_length

Align = Literal["auto", "document", "stream"]
ALIGNS: tuple[str, ...] = get_args(Align)


def document_windows(
    arrays: Sequence[np.ndarray],
    length: int,
    eos_id: int | None = None,
    max_windows: int | None = None,
    align: Align = "auto",
) -> np.ndarray:
    """(n, length + 1) int64 token windows for a per-position evaluation at `length`.

    align="document": each window is the start of one document (the array start or the token after an
    `eos_id`) with no separator inside it; documents shorter than length + 1 are skipped. align="stream":
    non-overlapping windows of consecutive tokens. align="auto": documents when `eos_id` is known, else stream.
    """
    if not is_length(length):
        raise ValueError(f"per-position loss: length must be a positive integer, got {length!r}")
    if align not in ALIGNS:
        raise ValueError(f"per-position loss: align must be one of {ALIGNS}, got {align!r}")
    if align == "document" and eos_id is None:
        raise ValueError("per-position loss: align='document' needs the end-of-document token id (eos_id)")
    span = length + 1
    use_docs = align == "document" or (align == "auto" and eos_id is not None)
    rows = []
    for arr in arrays:
        arr = np.asarray(arr)
        if use_docs:
            ends = np.flatnonzero(arr == eos_id)
            starts = np.concatenate([[0], ends + 1])
            stops = np.concatenate([ends, [len(arr)]])
            for s, e in zip(starts, stops):
                if e - s >= span:
                    rows.append(arr[s : s + span])
                    if max_windows is not None and len(rows) >= max_windows:
                        break
        else:
            for s in range(0, len(arr) - span + 1, span):
                rows.append(arr[s : s + span])
                if max_windows is not None and len(rows) >= max_windows:
                    break
        if max_windows is not None and len(rows) >= max_windows:
            break
    if not rows:
        total = sum(len(a) for a in arrays)
        what = "no document holds" if use_docs else "the data does not hold"
        raise ValueError(
            f"per-position loss at length {length}: {what} {span} consecutive tokens ({total} tokens in all); "
            "use shorter lengths, more data, or align='stream'"
        )
    return np.stack(rows).astype(np.int64)


@torch.no_grad()
def per_position_loss(model, tokens, batch_size: int = 8, context=None) -> torch.Tensor:
    """Mean next-token loss at each position, shape (L,), for tokens (N, L + 1): position t is the loss of
    predicting token t + 1 from tokens 0..t. `model` is a Decoder or holds one as `.model`; sequences
    longer than its max_seq_len are allowed (see length_guard). fp32 on the CPU."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.is_floating_point():
        raise ValueError(
            f"per_position_loss: tokens must be an integer array (N, L + 1) with L >= 1, got {tuple(tokens.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"per_position_loss: batch_size must be a positive integer, got {batch_size!r}")
    decoder = getattr(model, "model", model)
    device = next(decoder.parameters()).device
    L = tokens.shape[1] - 1
    total = torch.zeros(L, dtype=torch.float64)
    with beyond_max_seq_len(decoder, L) as dec:
        for i in range(0, tokens.shape[0], batch_size):
            chunk = tokens[i : i + batch_size].to(device)
            with context() if context is not None else contextlib.nullcontext():
                # forward, not __call__: eager even in a compiled decoder, which would recompile for each
                # evaluation length and for the config that beyond_max_seq_len swaps in
                logits = dec.forward(chunk[:, :-1])
            loss = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # (B, L)
            total += loss.double().sum(0).cpu()
    return (total / tokens.shape[0]).float()


def bucketize(curve: torch.Tensor, bucket_size: int) -> tuple[list[int], list[float]]:
    """(first position of each bucket, mean loss over it)."""
    starts = list(range(0, len(curve), bucket_size))
    return starts, [float(curve[s : s + bucket_size].mean()) for s in starts]


class PerPositionLoss(Callback):
    """Per-position loss curves at the end of `fit` and in `validate` (see the module docstring).

    Args:
        factors: evaluation lengths as multiples of the data's `seq_len` (the training length), e.g. [1, 2, 4].
        lengths: explicit lengths in tokens instead of factors.
        bucket_size: positions per logged point; None = training length / 32 (at least 1).
        max_documents: documents evaluated per length (the first ones long enough in the validation split).
        batch_size: documents per forward pass.
        align: "auto" | "document" | "stream", see `document_windows`.
        eos_id: the document separator; None = the data module's tokenizer's.
    """

    def __init__(
        self,
        factors: list[float] = (1, 2, 4),
        lengths: list[int] | None = None,
        bucket_size: int | None = None,
        max_documents: int = 64,
        batch_size: int = 8,
        align: Align = "auto",
        eos_id: int | None = None,
    ):
        super().__init__()
        if align not in ALIGNS:
            raise ValueError(f"PerPositionLoss.align must be one of {ALIGNS}, got {align!r}")
        if lengths is None and (not factors or any(f <= 0 for f in factors)):
            raise ValueError(f"PerPositionLoss.factors must be positive numbers, got {factors!r}")
        check_lengths(lengths, "PerPositionLoss")
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"PerPositionLoss.bucket_size must be >= 1, got {bucket_size}")
        self.factors = list(factors)
        self.lengths = list(lengths) if lengths is not None else None
        self.bucket_size = bucket_size
        self.max_documents = max_documents
        self.batch_size = batch_size
        self.align = align
        self.eos_id = eos_id
        self.curves: dict[int, torch.Tensor] = {}

    def on_train_end(self, trainer, pl_module):
        self.evaluate(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module)

    def _source(self, trainer):
        dm = trainer.datamodule
        if not isinstance(getattr(dm, "val_windows", None), TokenWindows):  # MQAR and passkey have none
            raise ValueError(
                "PerPositionLoss reads the validation split of a token data module (TextDataModule, "
                f"TokenShardDataModule); the run's data module is {type(dm).__name__}"
            )
        eos = self.eos_id
        if eos is None:
            tokenizer = dm.get_tokenizer() if hasattr(dm, "get_tokenizer") else None
            eos = getattr(tokenizer, "eos_id", None)
        return dm.val_windows.arrays, eos, int(dm.seq_len)

    def evaluate(self, trainer, pl_module) -> dict[int, torch.Tensor] | None:
        if trainer.global_rank != 0:
            return None
        arrays, eos, train_len = self._source(trainer)
        lengths = self.lengths or [max(1, round(f * train_len)) for f in self.factors]
        bucket = self.bucket_size or max(1, train_len // 32)
        was_training = pl_module.training
        pl_module.eval()
        self.curves = {}
        try:
            for L in lengths:
                try:
                    windows = document_windows(arrays, L, eos, self.max_documents, self.align)
                except ValueError as err:
                    warnings.warn(f"{err}: skipped", stacklevel=2)
                    continue
                curve = per_position_loss(
                    pl_module, windows, self.batch_size, context=trainer.precision_plugin.forward_context
                )
                self.curves[L] = curve
                self._log_curve(trainer, L, curve, bucket, train_len, len(windows))
        finally:
            pl_module.train(was_training)
        if self.curves:
            from ..callbacks import save_figure

            save_figure(trainer, self.make_figure(bucket, train_len), "figures/per_position_loss.png")
        return self.curves

    def _log_curve(self, trainer, L: int, curve: torch.Tensor, bucket: int, train_len: int, n_docs: int) -> None:
        starts, values = bucketize(curve, bucket)
        summary = {f"pos_loss/len{L}/mean": float(curve.mean()), f"pos_loss/len{L}/documents": float(n_docs)}
        if train_len < L:
            summary[f"pos_loss/len{L}/within_train_len"] = float(curve[:train_len].mean())
            summary[f"pos_loss/len{L}/beyond_train_len"] = float(curve[train_len:].mean())
        from ..tracking import mlflow_loggers

        loggers = mlflow_loggers(trainer)
        if loggers:
            from mlflow.entities import Metric

            client, run_id = loggers[0].experiment, loggers[0].run_id
            now = int(time.time() * 1000)
            points = [Metric(f"pos_loss/len{L}", v, now, s) for s, v in zip(starts, values) if math.isfinite(v)]
            for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
                client.log_batch(run_id, metrics=points[i : i + 1000])
        else:
            for logger in trainer.loggers:
                for s, v in zip(starts, values):
                    logger.log_metrics({f"pos_loss/len{L}": v}, step=s)
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=trainer.global_step)

    def make_figure(self, bucket: int, train_len: int):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        for L in sorted(self.curves, reverse=True):
            starts, values = bucketize(self.curves[L], bucket)
            ax.plot(starts, values, label=f"evaluated at {L}")
        ax.axvline(train_len, color="gray", linestyle="--", label=f"training length {train_len}")
        ax.set_xlabel(f"position (buckets of {bucket})")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("per-position loss on held-out documents")
        return fig
