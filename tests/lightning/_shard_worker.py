"""Body of the two-process test of shard_decoder (a module of its own so torch.multiprocessing can import it)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers import gloo_group


def pytest_approx(value: float, rel: float):
    import pytest

    return pytest.approx(value, rel=rel)


def run(rank: int, world: int, port: int) -> None:
    with gloo_group(rank, world, port):
        from torch.distributed.device_mesh import init_device_mesh

        from parallax_lightning.model import Decoder
        from parallax_lightning.model_sizes import preset
        from parallax_lightning.optim import OptimizerConfig, build_optimizer
        from parallax_lightning.strategies import shard_decoder

        real_compile = torch.compile
        compiled = []

        def eager_compile(fn, **kwargs):  # dynamo traces the block (graph breaks would show), no C++ compiler
            compiled.append(fn)
            return real_compile(fn, backend="eager", **kwargs)

        torch.compile = eager_compile
        try:
            torch.manual_seed(0)
            ref = Decoder(preset("tiny", vocab_size=64, max_seq_len=16, n_layers=2))
            model = copy.deepcopy(ref)
            start = [p.detach().clone() for p in ref.parameters()]
            shard_decoder(model, init_device_mesh("cpu", (world,)), compile_blocks=True)
        finally:
            torch.compile = real_compile
        assert len(compiled) == 2, f"expected one compiled forward per block, got {len(compiled)}"
        names = [n for n, _ in model.named_parameters()]
        assert names == [n for n, _ in ref.named_parameters()], "sharding renamed parameters"
        opt = build_optimizer(model, OptimizerConfig(lr=0.02, adamw_lr=0.003), verbose=False)
        ref_opt = build_optimizer(ref, OptimizerConfig(lr=0.02, adamw_lr=0.003), verbose=False)
        ref_opt.distributed = False
        gen = torch.Generator().manual_seed(5)
        losses, ref_losses = [], []
        for _ in range(3):
            tokens = torch.randint(0, 64, (2 * world, 9), generator=gen)
            mine = tokens[rank * 2 : (rank + 1) * 2]
            loss = F.cross_entropy(model(mine[:, :-1]).flatten(0, 1), mine[:, 1:].flatten())
            loss.backward()
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            losses.append(global_loss.item() / world)
            opt.step()
            opt.zero_grad()
            ref_loss = F.cross_entropy(ref(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            ref_loss.backward()
            ref_losses.append(ref_loss.item())
            ref_opt.step()
            ref_opt.zero_grad()
        # Muon's Newton-Schulz runs in bf16: gradients summed in another order (two half batches, reduce-scatter)
        # flip roundings that five iterations amplify, up to ~1e-1 of a small matrix's update after three steps
        # and ~2e-4 of the loss; a wrong shard or an unreduced gradient is O(1) in the update.
        assert losses[0] == pytest_approx(ref_losses[0], 1e-6), "the sharded forward differs before any update"
        for step, (got, want) in enumerate(zip(losses, ref_losses)):
            assert abs(got - want) <= 1e-3 * abs(want), f"rank {rank}: step {step} loss {got} vs one process {want}"
        for (name, p), r, p0 in zip(model.named_parameters(), ref.parameters(), start):
            err = ((p.full_tensor() - r).norm() / (r - p0).norm()).item()
            assert err < 0.3, f"rank {rank}: {name}'s update differs from one process's by {err:.2e} (relative)"
