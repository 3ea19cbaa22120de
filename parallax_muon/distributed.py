"""Muon under torch.distributed: each matrix is orthogonalized once, by one rank.

Two situations, both driven from ``Muon.step``:

- Replicated parameters (DDP, or any data-parallel run where every rank holds the full weights and the same
  averaged gradients): each same-shape batch of matrices is split into ``world_size`` contiguous ranges; a
  rank orthogonalizes only its range and an all-gather brings every rank the whole batch. Every rank then
  applies the identical update, so the weights stay replicated.
- Row-sharded DTensor parameters (FSDP2's ``fully_shard``: placement ``Shard(0)`` on a 1-D mesh): every
  parameter gets an owner rank (balanced by Newton–Schulz cost). One all-to-all sends each owner the row
  shards of its parameters' momentum updates, the owner orthogonalizes the full matrices (batched by shape),
  and a second all-to-all returns each rank the rows of the update that it holds.

DTensors with any other placement (tensor parallel, 2-D meshes) are gathered whole on every rank and
orthogonalized redundantly: correct, not fast. The optimizer state (momentum buffers) keeps the parameter's
own type and placement, so distributed checkpoints save and load it like any other state.
"""

from __future__ import annotations

import math
import sys
import zlib

import torch
import torch.distributed as dist
from torch import Tensor


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def dtensor_type():
    """The DTensor class if the program has imported it (no parameter can be a DTensor otherwise)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Tensor) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The rank-local tensor behind a DTensor (shares storage: in-place ops update the DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def replicated_group(distributed: bool | None, process_group=None):
    """The process group plain parameters are replicated over (``distributed``: None = auto), or None when
    their Newton–Schulz work is not to be split (one process, or ``distributed=False``)."""
    if distributed is False or not initialized():
        if distributed:
            raise RuntimeError("distributed=True but torch.distributed is not initialised")
        return None
    if dist.get_world_size(process_group) <= 1:
        return None
    return process_group if process_group is not None else dist.group.WORLD


def is_row_sharded(p: Tensor) -> bool:
    """A DTensor sharded on dim 0 across a 1-D mesh (FSDP2's layout)."""
    from torch.distributed.tensor import Shard

    placements = tuple(p.placements)
    return (
        p.device_mesh.ndim == 1 and len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0
    )


def row_chunks(rows: int, world: int) -> list[int]:
    """Rows per rank under DTensor's Shard(0) (torch.chunk: ceil-sized chunks, trailing ranks may be empty)."""
    c = math.ceil(rows / world)
    return [max(0, min(c, rows - r * c)) for r in range(world)]


def split_range(n: int, world: int, rank: int) -> tuple[int, int, int]:
    """(per_rank, start, stop): rank's contiguous share of n items when n is padded to world·per_rank."""
    per_rank = math.ceil(n / world)
    start = min(n, rank * per_rank)
    return per_rank, start, min(n, start + per_rank)


def check_same_plan(signature: str, group=None) -> None:
    """Every rank must batch the same matrices, or the collectives would pair up wrong buffers and hang.

    A cheap all-reduce of the plan's checksum (min and max) turns that into a clear error.
    """
    h = zlib.crc32(signature.encode())
    device = _collective_device(group)
    t = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    if t[0].item() != h or -t[1].item() != h:
        raise RuntimeError(
            "parallax_muon.Muon: ranks disagree on which Muon parameters have gradients or on their shapes/"
            "groups, so the Newton–Schulz work cannot be split. Give every rank the same parameters and groups, "
            "or pass distributed=False when each rank trains different parameters."
        )


def _collective_device(group=None) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_batch(own: Tensor, out: Tensor, group=None, async_op: bool = False):
    """Gather every rank's (per_rank, n, m) share into ``out`` (world·per_rank, n, m)."""
    # all_gather_single is the newer name (torch >= 2.13) of all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, own.contiguous(), group=group, async_op=async_op)


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Greedy longest-processing-time assignment: same result on every rank (depends only on costs)."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def gather_rows_to_owners(
    shards: list[Tensor], shapes: list[tuple[int, ...]], owners: list[int], group
) -> dict[int, Tensor]:
    """Each rank passes its row shard of every parameter; the owner of parameter i gets it whole.

    One ``all_to_all_single`` with per-rank split sizes. Returns {i: full tensor} for this rank's parameters.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype, device = shards[0].dtype, shards[0].device
    order = sorted(range(len(shards)), key=lambda i: (owners[i], i))  # grouped by destination
    send = torch.cat([shards[i].reshape(-1) for i in order]) if shards else torch.empty(0, dtype=dtype, device=device)
    send_sizes = [0] * world
    for i in order:
        send_sizes[owners[i]] += shards[i].numel()
    mine = [i for i in order if owners[i] == rank]
    recv_sizes = [
        sum(row_chunks(shapes[i][0], world)[src] * _row_numel(shapes[i]) for i in mine) for src in range(world)
    ]
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=group)
    pieces: dict[int, list[Tensor]] = {i: [] for i in mine}
    offset = 0
    for src in range(world):
        for i in mine:
            rows = row_chunks(shapes[i][0], world)[src]
            n = rows * _row_numel(shapes[i])
            pieces[i].append(recv[offset : offset + n].view(rows, *shapes[i][1:]))
            offset += n
    return {i: torch.cat(pieces[i], dim=0) for i in mine}


def scatter_rows_from_owners(
    full: dict[int, Tensor], shapes: list[tuple[int, ...]], owners: list[int], dtype, device, group
) -> list[Tensor]:
    """The inverse of ``gather_rows_to_owners``: every rank gets its rows of every parameter's tensor."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    parts, send_sizes = [], [0] * world
    for dst in range(world):
        for i in sorted(full):
            chunks = row_chunks(shapes[i][0], world)
            start = sum(chunks[:dst])
            part = full[i][start : start + chunks[dst]].reshape(-1)
            parts.append(part)
            send_sizes[dst] += part.numel()
    send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
    order = sorted(range(len(shapes)), key=lambda i: (owners[i], i))  # grouped by source
    recv_sizes = [0] * world
    for i in order:
        recv_sizes[owners[i]] += row_chunks(shapes[i][0], world)[rank] * _row_numel(shapes[i])
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=group)
    out: list[Tensor | None] = [None] * len(shapes)
    offset = 0
    for i in order:
        rows = row_chunks(shapes[i][0], world)[rank]
        n = rows * _row_numel(shapes[i])
        out[i] = recv[offset : offset + n].view(rows, *shapes[i][1:])
        offset += n
    return out  # type: ignore[return-value]


def _row_numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])
