"""Two CPU processes (gloo): replicated, DTensor-sharded and FSDP2 parameters end where one process ends,
with each matrix orthogonalized by one rank only. The checks themselves live in _dist_worker.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_two_gloo_processes_match_one_process():
    from tests.muon import _dist_worker

    mp.spawn(_dist_worker.run, args=(2, free_port()), nprocs=2, join=True)
    assert torch.distributed.is_initialized() is False
