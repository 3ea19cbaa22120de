"""The body of the two-process gloo test (a module of its own so torch.multiprocessing can import it)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from parallax_muon import Muon, muon_param_groups
from tests.helpers import gloo_group

# A batched matmul may order its sums differently from a smaller batch (ranks orthogonalize sub-batches),
# flipping a rare bf16 rounding; after five Newton–Schulz steps that is at most ~1e-2 of a matrix's update
# (see BF16_FLIP_TOL in test_optimizer.py). Updates are compared relatively, weights never drift further.
BF16_FLIP_TOL = 2e-2


def assert_same_update(got, expected, start, what):
    du, dr = (got - start).double(), (expected - start).double()
    err = ((du - dr).norm() / dr.norm()).item()
    assert err <= BF16_FLIP_TOL, f"{what}: update differs from one process by {err:.2e} (relative)"


def grads_for(shapes, step):
    gen = torch.Generator().manual_seed(1000 + step)  # the same gradients on every rank, as after DDP's all-reduce
    return [torch.randn(s, generator=gen) for s in shapes]


def start_params(shapes):
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen) for s in shapes]


def check_replicated(rank, world):
    """Plain tensors, distributed auto-on: each rank orthogonalizes a share, all end with the same weights."""
    shapes = [(32, 16), (16, 32), (32, 16), (24, 24), (24, 24), (24, 24), (40, 8), (12, 20)]
    heads_shape = (24, 10)
    params = [nn.Parameter(t) for t in start_params([*shapes, heads_shape])]
    ref = [nn.Parameter(t.detach().clone()) for t in params]

    def groups(ps):
        return [{"params": ps[:-1]}, {"params": ps[-1:], "num_heads": 3, "ns_coefficients": "polar_express"}]

    opt = Muon(groups(params), weight_decay=0.01)
    ref_opt = Muon(groups(ref), weight_decay=0.01, distributed=False)
    for step in range(3):
        for p, r, g in zip(params, ref, grads_for([*shapes, heads_shape], step)):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for i, (p, r, p0) in enumerate(zip(params, ref, start_params([*shapes, heads_shape]))):
        assert_same_update(p.detach(), r.detach(), p0, f"rank {rank}: replicated param {i}")
    for i, p in enumerate(params):
        others = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(others, p.detach())
        assert all(torch.equal(o, p) for o in others), f"replicated param {i} diverged between ranks"
    total = len(shapes) + 3  # three head blocks
    mine = opt.last_step_info["ns_matrices"]
    done = torch.tensor([mine])
    dist.all_reduce(done)
    assert done.item() == total, f"ranks orthogonalized {done.item()} matrices in all, expected {total} once each"
    assert mine < total and ref_opt.last_step_info["ns_matrices"] == total


def check_dtensor(rank, world):
    """Row-sharded DTensors (uneven rows, heads, fused segments, stacked slices) and two Shard(1) parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    specs = [
        ((33, 16), {}, Shard(0)),  # 17 + 16 rows
        ((16, 40), {}, Shard(0)),
        ((32, 6), {"split_sizes": [24, 8], "num_heads": [2, 1]}, Shard(0)),  # two tall segments, two lr ratios
        ((4, 6, 5), {"per_slice": True}, Shard(0)),
        ((3, 12, 5), {}, Shard(0)),  # 3 rows over 2 ranks, (3, 60) matrix
        ((20, 12), {}, Shard(1)),  # not row-sharded: gathered on every rank
        ((24, 6), {"split_sizes": [18, 6]}, Shard(1)),  # gathered, two lr ratios (per-row scale)
    ]
    shapes = [s for s, _, _ in specs]
    full = start_params(shapes)
    params = [nn.Parameter(distribute_tensor(t.clone(), mesh, [pl])) for t, (_, _, pl) in zip(full, specs)]
    ref = [nn.Parameter(t.clone()) for t in full]
    groups = [{"params": [p], **opts} for p, (_, opts, _) in zip(params, specs)]
    ref_groups = [{"params": [p], **opts} for p, (_, opts, _) in zip(ref, specs)]
    opt = Muon(groups, weight_decay=0.02)
    ref_opt = Muon(ref_groups, weight_decay=0.02, distributed=False)
    for step in range(3):
        for p, r, g, (_, _, pl) in zip(params, ref, grads_for(shapes, step), specs):
            p.grad = distribute_tensor(g.clone(), mesh, [pl])
            r.grad = g.clone()
        opt.step()
        ref_opt.step()
    for i, (p, r) in enumerate(zip(params, ref)):
        got = p.full_tensor()
        if i in (2, 6):  # two lr ratios in one parameter: applied as (Y·ratio)·lr instead of Y·(lr·ratio)
            assert torch.allclose(got, r, rtol=0, atol=1e-6), (
                f"rank {rank}: DTensor param {i} off by {(got - r).abs().max()}"
            )
        else:
            assert torch.equal(got, r), f"rank {rank}: DTensor param {i} differs by {(got - r).abs().max():.3e}"
        buf = opt.state[p]["momentum_buffer"]
        assert type(buf) is type(p) and buf.placements == p.placements, "momentum buffer lost the DTensor layout"
    total = ref_opt.last_step_info["ns_matrices"]
    mine = torch.tensor([opt.last_step_info["ns_matrices"]])
    gathered = 3  # the Shard(1) parameters' matrices (1 + 2 segments) are orthogonalized on every rank
    dist.all_reduce(mine)
    assert mine.item() == total + (world - 1) * gathered, (
        f"sharded matrices done {mine.item()} times, expected once each"
    )


def check_fsdp2(rank, world):
    """fully_shard on a small model, same batch on every rank: same weights as one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(20, 12), nn.Linear(12, 36), nn.ReLU(), nn.Linear(36, 12), nn.LayerNorm(12))
    ref = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[1], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = Muon(muon_param_groups(model, verbose=False), lr=0.05, adamw_lr=1e-2, weight_decay=0.01)
    ref_opt = Muon(muon_param_groups(ref, verbose=False), lr=0.05, adamw_lr=1e-2, weight_decay=0.01, distributed=False)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        x = torch.randint(0, 20, (4, 6), generator=gen)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (name, p), r, p0 in zip(model.named_parameters(), ref.parameters(), start):
        assert_same_update(p.full_tensor(), r.detach(), p0, f"rank {rank}: FSDP2 {name}")
    sd = opt.state_dict()
    assert any(type(v["momentum_buffer"]).__name__ == "DTensor" for v in sd["state"].values() if "momentum_buffer" in v)


def check_plan_mismatch_is_an_error(rank, world):
    p = nn.Parameter(torch.randn(8, 8 + 8 * rank))  # different shapes per rank: the plan cannot be split
    opt = Muon([p])
    p.grad = torch.randn_like(p)
    try:
        opt.step()
    except RuntimeError as e:
        assert "ranks disagree" in str(e)
    else:
        raise AssertionError("a plan that differs between ranks was not reported")


def check_against_the_float64_oracle(rank, world):
    """Split work (replicated tensors) and row-sharded DTensors against the oracle of test_oracle.py, which
    shares no code with Muon: the comparisons above only show that several processes end where one ends."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from tests.muon.test_oracle import TOL, oracle_step

    mesh = init_device_mesh("cpu", (world,))
    base = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1.0}
    specs = [  # (shape, group options, sharded)
        ((12, 16), {"num_heads": 3, "lr_mult": 0.5}, False),
        ((12, 16), {"num_heads": 3, "lr_mult": 0.5}, False),
        ((24, 6), {"split_sizes": [16, 8], "num_heads": [2, 1]}, False),
        ((17, 8), {"lr_mult": 2.0}, True),
        ((32, 6), {"split_sizes": [24, 8], "num_heads": [2, 1], "lr_mult": 0.5}, True),
    ]
    gen = torch.Generator().manual_seed(21)
    full = [torch.randn(s, generator=gen, dtype=torch.float64) for s, _, _ in specs]
    params = [
        nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)]) if sharded else t.clone())
        for t, (_, _, sharded) in zip(full, specs)
    ]
    groups = [{"params": [p], **base, **opts} for p, (_, opts, _) in zip(params, specs)]
    opt = Muon(groups, lr=base["lr"], momentum=base["momentum"])
    bufs = [torch.zeros_like(t) for t in full]
    for step in range(2):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s, _, _ in specs]
        before = [p.full_tensor().detach() if sh else p.detach().clone() for p, (_, _, sh) in zip(params, specs)]
        for p, g, (_, _, sharded) in zip(params, grads, specs):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]) if sharded else g.clone()
        opt.step()
        for i, (p, g, (_, opts, sharded)) in enumerate(zip(params, grads, specs)):
            group = {**base, **opts}
            want, bufs[i] = oracle_step(before[i], g, bufs[i], group)
            got = p.full_tensor().detach() if sharded else p.detach()
            decayed = before[i] * (1 - group["lr"] * opts.get("lr_mult", 1.0) * group["weight_decay"])
            err = ((got - want).norm() / (want - decayed).norm()).item()
            assert err <= TOL, f"rank {rank}, step {step}: param {i} differs from the float64 oracle by {err:.3f}"


def run(rank: int, world: int, port: int) -> None:
    with gloo_group(rank, world, port):
        check_replicated(rank, world)
        check_dtensor(rank, world)
        check_fsdp2(rank, world)
        check_plan_mismatch_is_an_error(rank, world)
        check_against_the_float64_oracle(rank, world)
