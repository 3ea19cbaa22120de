"""Muon's step as pure functions over typed records, for the Muon groups of a whole optimizer together.

1. ``momentum_update`` (``buf ← lerp(buf, g, 1-μ)``; Nesterov ``u = lerp(g, buf, μ)``) and ``decay``
   (decoupled weight decay), with ``torch._foreach_*`` over each group's tensors — no per-parameter launches;
   each parameter becomes a ``Job`` (its ``JobKind`` says how its update travels under torch.distributed);
2. ``make_buckets`` cuts every parameter into matrices (``layout.py``: whole, per head, per fused segment, per
   slice) and buckets the matrices of all groups by (oriented shape, ``NSSettings``); ``orthogonalize_bucket``
   runs each bucket as one batched call (``newton_schulz.py``; Triton symmetric kernels on CUDA), this rank's
   share of it when the bucket is split across replicated ranks;
3. ``apply_bucket``: ``p ← p − lr·ratio·O``, one ``_foreach_add_`` per (bucket, learning rate, ratio), or into
   a staging buffer that ``apply_staged`` (or ``dtensor.py``) applies afterwards.

``Muon.step`` (``optimizer.py``) drives these; ``dtensor.py`` handles DTensor parameters' trips.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from parallax_muon import distributed as pdist
from parallax_muon.layout import Layout, adjust_lr_ratio
from parallax_muon.newton_schulz import normalize_


class JobKind(Enum):
    """How a parameter's update travels (see ``distributed.py`` and ``dtensor.py``)."""

    LOCAL = "local"  # a plain tensor: this process orthogonalizes it (or its share of a split bucket)
    SHARDED = "sharded"  # a row-sharded DTensor: its rows go to an owner rank and come back orthogonalized
    GATHERED = "gathered"  # a DTensor of another placement: gathered whole on every rank
    OWNED = "owned"  # the full matrix of a SHARDED parameter, on its owner rank


class NSSettings(NamedTuple):
    """A group's Newton–Schulz settings; matrices share a bucket only when these agree."""

    per_step: tuple  # (a, b, c) per iteration
    norm_scale: float
    eps: float


class GroupStep(NamedTuple):
    """What a Muon group's parameters share in one step."""

    index: int  # in optimizer.param_groups
    lr: float  # lr·lr_mult, as scheduled this step
    adjust_lr: str
    ns: NSSettings


@dataclass
class Job:
    """One parameter's trip through Newton–Schulz."""

    param: Tensor  # as the user holds it (maybe a DTensor)
    source: Tensor  # the momentum update, full and in parameter layout
    layout: Layout
    group: GroupStep
    split: bool = False  # its matrices may be shared out across ranks (replicated parameters)
    target: Tensor | None = None  # the parameter tensor updated in place by views (contiguous, full)
    staged: Tensor | None = None  # else: the orthogonalized update lands here (bf16, parameter layout)
    kind: JobKind = JobKind.LOCAL
    index: int = 0  # position among the sharded jobs


class Piece(NamedTuple):
    """A run of one job's matrices inside a bucket."""

    job: Job
    segment: int  # index into job.layout.segments
    first: int  # first matrix in the bucket's batch
    count: int
    transposed: bool  # stored as its transpose (tall matrices are orthogonalized wide)


@dataclass
class Bucket:
    """Same-shape matrices (``count`` of ``n × m``, n ≤ m) with the same Newton–Schulz settings: one batch."""

    n: int
    m: int
    ns: NSSettings
    split: bool
    device: torch.device
    pieces: list[Piece] = field(default_factory=list)
    count: int = 0


def momentum_update(bufs: list[Tensor], grads: list[Tensor], momentum: float, nesterov: bool) -> list[Tensor]:
    """buf ← lerp(buf, g, 1−μ) in place; the update is lerp(g, buf, μ) with Nesterov, else buf itself."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    return torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs


def decay(params: list[Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled weight decay: p ← p·(1 − lr·wd)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)


def make_buckets(jobs: list[Job]) -> list[Bucket]:
    """The jobs' matrices batched by (oriented shape, settings, split, device), largest bucket first."""
    buckets: dict[tuple, Bucket] = {}
    for job in jobs:
        for si, seg in enumerate(job.layout.segments):
            r, c = seg.head_rows, job.layout.cols
            transposed = r > c
            n, m = (c, r) if transposed else (r, c)
            key = (n, m, job.group.ns, job.split, job.source.device)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(n, m, job.group.ns, job.split, job.source.device)
            count = job.layout.slices * seg.heads
            b.pieces.append(Piece(job, si, b.count, count, transposed))
            b.count += count
    # Largest first: overlaps the biggest all-gathers with the most remaining compute.
    return sorted(buckets.values(), key=lambda b: -(b.count * b.n * b.n * b.m))


def plan_signature(buckets: list[Bucket]) -> str:
    """What every rank must agree on before the split buckets' collectives (``distributed.check_same_plan``)."""
    # Only the buckets shared out across ranks must agree; owned (FSDP) buckets differ by design.
    return ";".join(f"{b.n}x{b.m}x{b.count}:{len(b.ns.per_step)}" for b in buckets if b.split)


def orthogonalize_bucket(bucket: Bucket, replicated, iterate_fn: Callable[[Tensor, tuple], Tensor]):
    """Copy the bucket's matrices (this rank's share of them when split) into one bf16 batch, normalize and
    iterate it; (the whole batch, the pending all-gather or None, how many matrices this rank computed)."""
    N, n, m = bucket.count, bucket.n, bucket.m
    if bucket.split and replicated is not None:
        world = torch.distributed.get_world_size(replicated)
        rank = torch.distributed.get_rank(replicated)
        per_rank, start, stop = pdist.split_range(N, world, rank)
    else:
        world, per_rank, start, stop = 1, N, 0, N
    X = torch.empty(N, n, m, dtype=torch.bfloat16, device=bucket.device)
    dsts, srcs = [], []
    for job, si, first, count, transposed in bucket.pieces:
        if first + count <= start or first >= stop:
            continue  # none of this piece's matrices are ours to orthogonalize
        src = job.layout.views(job.source, allow_copy=True)[si]
        dsts.append(X[first : first + count].view(src.shape[0], src.shape[1], n, m))
        srcs.append(src.mT if transposed else src)
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    own = X[start:stop]
    if own.shape[0] > 0:
        normalize_(own, bucket.ns.norm_scale, bucket.ns.eps)
        own = iterate_fn(own, bucket.ns.per_step)
    if world == 1:
        return own, None, stop - start
    padded = own if own.shape[0] == per_rank else torch.cat([own, own.new_zeros(per_rank - own.shape[0], n, m)])
    Y = X.new_empty(per_rank * world, n, m)
    handle = pdist.all_gather_batch(padded, Y, replicated, async_op=True)
    return Y, handle, stop - start


def apply_bucket(bucket: Bucket, Y: Tensor, handle, rms_acc: dict | None) -> None:
    """p ← p − lr·ratio·O for the bucket's parameters held whole (one ``_foreach_add_`` per step size), else
    into their staging buffers; adds each group's squared update norm to ``rms_acc`` when given."""
    if handle is not None:
        handle.wait()
    n, m = bucket.n, bucket.m
    direct: dict[float, tuple[list, list]] = defaultdict(lambda: ([], []))
    staged_dst, staged_src = [], []
    weights = [] if rms_acc is not None else None
    for job, si, first, count, transposed in bucket.pieces:
        seg = job.layout.segments[si]
        ratio = adjust_lr_ratio(job.group.adjust_lr, seg.head_rows, job.layout.cols)
        S = job.layout.slices
        y = Y[first : first + count].view(S, seg.heads, n, m)
        y = y.mT if transposed else y
        if job.target is not None:
            tgt, src = direct[-job.group.lr * ratio]
            tgt.append(job.layout.views(job.target)[si])
            src.append(y)
        else:
            staged_dst.append(job.layout.views(job.staged)[si])
            staged_src.append(y)
        if weights is not None:
            weights.append((job.group.index, first, count, ratio, count * n * m))
    for alpha, (tgt, src) in direct.items():
        torch._foreach_add_(tgt, src, alpha=alpha)
    if staged_dst:
        torch._foreach_copy_(staged_dst, staged_src)
    if weights:
        sq = Y[: bucket.count].float().square().sum(dim=(-2, -1))
        for gi, first, count, ratio, numel in weights:
            acc = rms_acc[gi]
            acc[0] = acc[0] + sq[first : first + count].sum() * (ratio * ratio)
            acc[1] += numel


def scaled_update(Y: Tensor, lr: float, layout: Layout, adjust_lr: str, row_offset: int = 0) -> tuple[Tensor, float]:
    """``(U, alpha)`` with ``p.add_(U, alpha=alpha)`` ≡ ``p ← p − lr·ratio·Y`` for a staged update ``Y`` shaped
    like the parameter (or like its rows [row_offset, …) when sharded). One ratio for the whole layout: ``Y``
    itself and ``alpha = −lr·ratio`` (the single-process bits); per-row ratios: ``Y·ratio`` and ``−lr``."""
    scale = layout.row_scale(adjust_lr)
    if scale is None:
        seg = layout.segments[0]
        return Y, -lr * adjust_lr_ratio(adjust_lr, seg.head_rows, layout.cols)
    scale = scale.to(Y.device)
    rows_on_dim0 = not layout.per_slice or len(layout.shape) == 2
    if rows_on_dim0:
        scale = scale[row_offset : row_offset + Y.shape[0]].view(Y.shape[0], *([1] * (Y.ndim - 1)))
    return Y * scale, -lr


def apply_staged(p: Tensor, Y: Tensor, lr: float, layout: Layout, adjust_lr: str, row_offset: int = 0) -> None:
    """p ← p − lr·ratio·Y for a parameter (or its rows [row_offset, …) when sharded) from a staged update."""
    U, alpha = scaled_update(Y, lr, layout, adjust_lr, row_offset)
    p.add_(U, alpha=alpha)


def viewable(t: Tensor, layout: Layout) -> bool:
    """``t`` can be viewed (not copied) as the layout's matrices, so the update can land in it in place."""
    try:
        t.view(layout.slices, layout.rows, layout.cols)
    except RuntimeError:
        return False
    return True
