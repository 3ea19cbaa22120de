"""How one parameter is cut into the matrices that Newton–Schulz orthogonalizes, and how each is scaled.

A parameter is first seen as ``S`` stacked matrices of ``R × C``:

- ``per_slice=False`` (default): one matrix ``(shape[0], prod(shape[1:]))`` — a conv kernel as (out, in·kh·kw);
- ``per_slice=True``: ``(prod(shape[:-2]), shape[-2], shape[-1])`` — stacked experts, one matrix per expert.

The ``R`` rows are then cut into consecutive *segments* (``split_sizes``, for fused projections such as
q|r|k|v in one weight) and each segment into equal *heads* (``num_heads``, an int for every segment or one
int per segment). Every (slice, segment, head) block is orthogonalized on its own, and its update is scaled
from the block's own shape, so a per-head update has the same RMS as a whole-matrix one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ADJUST_LR = ("original", "match_rms_adamw", "none")


def adjust_lr_ratio(adjust_lr: str | None, rows: int, cols: int) -> float:
    """The factor the learning rate is multiplied by for an orthogonalized ``rows × cols`` update.

    ``"original"`` (Keller Jordan): √max(1, rows/cols); ``"match_rms_adamw"`` (Moonshot): 0.2·√max(rows, cols),
    which gives the update the RMS of a typical AdamW update; ``"none"``: 1.
    """
    if adjust_lr is None or adjust_lr == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr == "none":
        return 1.0
    raise ValueError(f"unknown adjust_lr {adjust_lr!r}; expected one of {ADJUST_LR}")


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of each R × C matrix, cut into ``heads`` equal blocks."""

    start: int
    stop: int
    heads: int

    @property
    def head_rows(self) -> int:
        return (self.stop - self.start) // self.heads


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]
    slices: int  # S
    rows: int  # R
    cols: int  # C
    per_slice: bool
    segments: tuple[Segment, ...]

    def views(self, T: Tensor, allow_copy: bool = False) -> list[Tensor]:
        """Per segment, a (S, heads, head_rows, C) view of ``T`` (a tensor shaped like the parameter).

        With ``allow_copy`` a tensor that cannot be viewed that way (non-contiguous) is copied first: fine for
        reading, never for a tensor that is to be updated in place.
        """
        shape = (self.slices, self.rows, self.cols)
        T3 = T.reshape(shape) if allow_copy else T.view(shape)
        out = []
        for s in self.segments:
            out.append(T3[:, s.start : s.stop].unflatten(1, (s.heads, s.head_rows)))
        return out

    def row_scale(self, adjust_lr: str | None) -> Tensor | None:
        """Per-row lr ratio as a (R, 1) float32 tensor, or None when every block has the same ratio."""
        ratios = [adjust_lr_ratio(adjust_lr, s.head_rows, self.cols) for s in self.segments]
        if len(set(ratios)) == 1:
            return None
        per_row = torch.empty(self.rows, 1, dtype=torch.float32)
        for s, r in zip(self.segments, ratios):
            per_row[s.start : s.stop] = r
        return per_row


def make_layout(
    shape: tuple[int, ...],
    *,
    per_slice: bool = False,
    num_heads=None,
    split_sizes=None,
    where: str = "parameter",
) -> Layout:
    """Validate the group's cutting options against one parameter shape; errors name the values."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(
            f"{where} has shape {shape}: a Muon group takes only parameters with 2 or more dims; "
            "put 1-D parameters (biases, norms) in an AdamW group (use_muon=False), e.g. via muon_param_groups"
        )
    if any(d == 0 for d in shape):
        raise ValueError(f"{where} has an empty dimension: shape {shape}")
    if per_slice:
        slices, rows, cols = math.prod(shape[:-2]), shape[-2], shape[-1]
    else:
        slices, rows, cols = 1, shape[0], math.prod(shape[1:])
    if split_sizes is None:
        sizes = [rows]
    else:
        sizes = [int(v) for v in split_sizes]
        if any(v <= 0 for v in sizes) or sum(sizes) != rows:
            raise ValueError(
                f"split_sizes={list(split_sizes)} must be positive and sum to the {rows} rows of {where} "
                f"(shape {shape})"
            )
    if num_heads is None:
        heads = [1] * len(sizes)
    elif isinstance(num_heads, int) and not isinstance(num_heads, bool):
        heads = [num_heads] * len(sizes)
    else:
        heads = [int(h) for h in num_heads]
        if len(heads) != len(sizes):
            raise ValueError(
                f"num_heads={list(num_heads)} has {len(heads)} entries but {where} has {len(sizes)} row segments "
                f"(split_sizes={split_sizes})"
            )
    segments = []
    start = 0
    for size, h in zip(sizes, heads):
        if h <= 0 or size % h != 0:
            raise ValueError(
                f"num_heads={h} does not divide the {size} rows of {where} (shape {shape}"
                + (f", segment rows {start}:{start + size}" if len(sizes) > 1 else "")
                + ")"
            )
        segments.append(Segment(start, start + size, h))
        start += size
    return Layout(shape, slices, rows, cols, bool(per_slice), tuple(segments))
