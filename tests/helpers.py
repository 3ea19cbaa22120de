"""Assertions shared by the test modules."""

from __future__ import annotations

import contextlib
import os
import socket

import torch

# Where the kernel tests put their tensors: the GPU when there is one, else the CPU (the Triton interpreter).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere gives inf (never passes)."""
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close_rel(actual, expected, tol: float, what: str = "output") -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def needs_triton_kernels():
    """A skipif mark for tests of the Triton kernels: they need CUDA, or TRITON_INTERPRET=1 with triton."""
    import pytest

    from parallax_kernels import backend_for

    return pytest.mark.skipif(
        backend_for(torch.empty(0, device=KERNEL_DEVICE)) != "triton",
        reason="needs CUDA or TRITON_INTERPRET=1 with triton",
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """This process as rank `rank` of a gloo group on 127.0.0.1:`port`, one intra-op thread. After a body
    that succeeded, every rank meets at a barrier before the group is torn down: a rank that destroys its
    group while another still talks to it can abort in gloo's threads."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
