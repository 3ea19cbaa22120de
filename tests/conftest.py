"""Test-wide set-up: the Triton interpreter on CPU-only machines, a fresh-but-reproducible seed,
and helpers for NaN-poisoned outputs and relative-error checks."""

from __future__ import annotations

import os
import random

# Must happen before anything imports triton or parallax_kernels: Triton reads it at import time.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Fresh random inputs every session; PARALLAX_TEST_SEED=N reproduces a failing one.
SESSION_SEED = int(os.environ.get("PARALLAX_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"parallax test seed: {SESSION_SEED} (rerun with PARALLAX_TEST_SEED={SESSION_SEED})"


@pytest.fixture(autouse=True)
def _seed(request):
    """Each test gets its own seed derived from the session seed and its name."""
    seed = (SESSION_SEED + sum(map(ord, request.node.nodeid))) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield


@pytest.fixture
def poison():
    """Within the test, kernel outputs start NaN-filled, so unwritten elements fail comparisons."""
    from parallax_kernels import poison_outputs

    with poison_outputs(True):
        yield
