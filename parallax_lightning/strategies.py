"""Past one GPU: FSDP2 (`fully_shard`) per decoder block, with Muon on the sharded weights.

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` with data-parallel defaults: every process holds a
1/N row shard of each weight (DTensor, `Shard(0)`), no tensor parallelism, and a mixed-precision policy
(parameters all-gathered and computed in bf16, gradients reduced and kept in fp32). The sharding itself is
`shard_decoder`, which `LanguageModelModule.configure_model` applies under any `ModelParallelStrategy`:
one `fully_shard` unit per decoder block (optionally compiled per block), the embedding, final norm and
head in the root unit. Muon (parallax_muon) sees the weights as row-sharded DTensors and orthogonalizes
each matrix once, on one owner rank; its AdamW groups step the shards in place.

Checkpoints are folders written by torch.distributed.checkpoint (one shard file per rank plus Lightning's
`meta.pt`); a run resumes from one with `--ckpt_path runs/.../last.ckpt` (the folder) on the same or another
number of processes (the shards are re-cut on load).

    python -m parallax_lightning fit --config experiments/lm/fsdp2.yaml --trainer.devices 4
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal, get_args

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from . import _lightning_compat as compat
from .checkpoint_io import fsync_dir

MixedPrecision = Literal["bf16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(MixedPrecision)


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy for pure data-parallel sharding (FSDP2) of a LanguageModelModule.

    Args:
        mixed_precision: "bf16" (parameters gathered and used in bf16, gradients reduced in fp32; the default)
            or "fp32" (everything in fp32: the same numbers as one process, up to summation order).
        reshard_after_forward: free each block's gathered weights after its forward (less memory, one more
            all-gather in backward). The root unit (embedding, head) always stays gathered.
        data_parallel_size / tensor_parallel_size: "auto" = every process shards the weights, no tensor
            parallelism (Lightning's own default on one node is the other way round).
        save_distributed_checkpoint, process_group_backend, timeout: as in ModelParallelStrategy.
    """

    def __init__(
        self,
        mixed_precision: MixedPrecision = "bf16",
        reshard_after_forward: bool = True,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int | str = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs,
    ):
        if mixed_precision not in PRECISIONS:
            raise ValueError(f"FSDP2Strategy: mixed_precision must be one of {PRECISIONS}, got {mixed_precision!r}")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = bool(reshard_after_forward)
        self.distributed_checkpoint = save_distributed_checkpoint

    def setup_environment(self) -> None:
        compat.resolve_parallel_sizes(self)
        super().setup_environment()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """Every rank writes its shard into a fresh sibling folder; rank 0 then swaps it in by renames. A crash
        or kill mid-save leaves the previous checkpoint under its name whole (Lightning writes the shards over
        it in place), and after a crash between the two renames it is under `.<name>.old`."""
        if not self.distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
        if self.global_rank == 0:
            _remove(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()  # every shard written before the folder is published
        if self.global_rank == 0:
            _remove(old)
            if os.path.lexists(path):
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            _remove(old)
        self.barrier()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def data_parallel_mesh(strategy):
    """The 1-D mesh the weights are sharded over under a ModelParallelStrategy, else None.

    Raises ValueError when the mesh asks for tensor parallelism, which the decoder does not implement."""
    if not isinstance(strategy, ModelParallelStrategy):
        return None
    mesh = strategy.device_mesh
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"trainer.strategy: the device mesh has tensor_parallel_size={mesh['tensor_parallel'].size()}, but the "
            "decoder is sharded data-parallel only (FSDP2). Use parallax_lightning.strategies.FSDP2Strategy, or "
            "set ModelParallelStrategy's data_parallel_size to the number of processes and tensor_parallel_size: 1"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def mixed_precision_policy(strategy, device: torch.device):
    """bf16 compute with fp32 gradient reduction, unless the strategy says fp32. A plain ModelParallelStrategy
    gets bf16 on CUDA and fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    choice = getattr(strategy, "mixed_precision", None) or ("bf16" if device.type == "cuda" else "fp32")
    if choice == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_decoder(
    decoder: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True, compile_blocks: bool = False
) -> None:
    """`fully_shard` each block of `decoder.blocks`, then the decoder itself (embedding, final norm, head).

    With `compile_blocks`, each block's forward is compiled on its own (the FSDP hooks stay outside the
    graphs): a graph per block compiles once for all blocks of one shape and keeps the all-gathers overlapped
    with the previous block's compute. Parameter names do not change, so checkpoints and optimizer routes
    are the same as unsharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    blocks = list(decoder.blocks)
    for i, block in enumerate(blocks):
        if compile_blocks:
            block.forward = torch.compile(block.forward)
        # The last block's weights are needed again at once by the backward: keeping them saves an all-gather.
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(decoder, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
