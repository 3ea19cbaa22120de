"""DTensor parameters in a Muon step: which trip each takes, and the trips themselves.

- Row-sharded (FSDP2's ``Shard(0)`` on a 1-D mesh, ``JobKind.SHARDED``): ``gather_sharded`` sends every
  parameter's momentum rows to one owner rank (balanced by Newton–Schulz cost), where it becomes an
  ``OWNED`` job holding the full matrix; after the step's buckets ran, ``scatter_sharded`` returns each rank
  its rows of the orthogonalized update and applies them.
- Any other placement (``JobKind.GATHERED``): the update is gathered whole on every rank and orthogonalized
  redundantly; ``apply_gathered`` keeps this rank's part.

The collectives themselves are in ``distributed.py``; the records in ``step.py``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from parallax_muon import distributed as pdist
from parallax_muon.layout import Layout
from parallax_muon.step import Job, JobKind, apply_staged, scaled_update


def classify(job: Job) -> None:
    """Mark a DTensor parameter's job SHARDED or GATHERED; a GATHERED one gets its full update and a staging buffer."""
    job.kind = JobKind.SHARDED if pdist.is_row_sharded(job.param) else JobKind.GATHERED
    job.target = None
    if job.kind is JobKind.GATHERED:
        job.source = _full_tensor(job.param, job.source)
        job.staged = torch.empty(job.param.shape, dtype=torch.bfloat16, device=job.source.device)


def gather_sharded(sharded: list[Job]):
    """The full matrices this rank owns, as OWNED jobs; (those jobs, every parameter's owner, the mesh's group)."""
    mesh_groups = {id(j.param.device_mesh): j.param.device_mesh for j in sharded}
    if len(mesh_groups) != 1:
        raise NotImplementedError("parallax_muon.Muon: row-sharded parameters must all live on one device mesh")
    mesh = next(iter(mesh_groups.values()))
    group = mesh.get_group()
    world = torch.distributed.get_world_size(group)
    rank = torch.distributed.get_rank(group)
    shapes = [tuple(j.param.shape) for j in sharded]
    for j, shape in zip(sharded, shapes):
        expected = pdist.row_chunks(shape[0], world)[rank]
        if j.source.shape[0] != expected:
            raise NotImplementedError(
                f"parallax_muon.Muon: a Shard(0) parameter of shape {shape} holds {j.source.shape[0]} rows on rank "
                f"{rank}, expected torch.chunk's {expected}"
            )
    owners = pdist.assign_owners([ns_cost(j.layout) for j in sharded], world)
    shards = [j.source.to(torch.bfloat16) for j in sharded]
    full = pdist.gather_rows_to_owners(shards, shapes, owners, group)
    owned = [
        dataclasses.replace(
            sharded[i],
            source=f,
            kind=JobKind.OWNED,
            index=i,
            target=None,
            split=False,
            staged=torch.empty(shapes[i], dtype=torch.bfloat16, device=f.device),
        )
        for i, f in full.items()
    ]
    return owned, owners, group


def scatter_sharded(sharded: list[Job], owned: list[Job], owners: list[int], group) -> None:
    """Every rank gets its rows of each owner's orthogonalized update and applies them to its shard."""
    shapes = [tuple(j.param.shape) for j in sharded]
    full = {j.index: j.staged for j in owned}
    device = sharded[0].source.device
    local_rows = pdist.scatter_rows_from_owners(full, shapes, owners, torch.bfloat16, device, group)
    world = torch.distributed.get_world_size(group)
    rank = torch.distributed.get_rank(group)
    for j, y in zip(sharded, local_rows):
        offset = sum(pdist.row_chunks(j.param.shape[0], world)[:rank])
        apply_staged(pdist.local(j.param), y, j.group.lr, j.layout, j.group.adjust_lr, offset)


def apply_gathered(job: Job) -> None:
    """A DTensor with a placement other than Shard(0): every rank computed the whole update; keep its part."""
    from torch.distributed.tensor import distribute_tensor

    update, alpha = scaled_update(job.staged, job.group.lr, job.layout, job.group.adjust_lr)
    part = distribute_tensor(update, job.param.device_mesh, job.param.placements, src_data_rank=None).to_local()
    pdist.local(job.param).add_(part, alpha=alpha)


def ns_cost(layout: Layout) -> float:
    """Newton–Schulz flops of one parameter's matrices, up to a constant (balances the owners' work)."""
    total = 0.0
    for s in layout.segments:
        n, m = sorted((s.head_rows, layout.cols))
        total += layout.slices * s.heads * (2 * n * n * m + n**3)
    return total


def _full_tensor(param, local_update: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    d = DTensor.from_local(local_update, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return d.full_tensor()
