"""benchmarks/ab_train_kernels.py on the CPU: it loads another version of triton_train.py as an independent
sibling module (relative imports resolved) and lists each version's table entry first, then the candidates with
and without TMA. The timing itself needs a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the training kernels need triton (the kernels extra)")

from parallax_kernels import backend_for
from parallax_kernels.parallax import triton_train

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.skipif(
    backend_for(torch.empty(0)) != "triton", reason="needs TRITON_INTERPRET=1 with triton on a CPU machine"
)


@pytest.fixture
def ab(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import ab_train_kernels

    yield ab_train_kernels
    sys.modules.pop("parallax_kernels.parallax._ab_baseline", None)


def test_baseline_is_an_independent_copy_that_computes_the_same(ab, tmp_path):
    old = tmp_path / "old_triton_train.py"
    old.write_text(Path(triton_train.__file__).read_text())
    base = ab.load_baseline(str(old))
    assert base is not triton_train and base._fwd_kernel is not triton_train._fwd_kernel
    q, r, k, v, do = (torch.randn(1, 37, 2, 32) for _ in range(5))
    got = base.parallax_fwd_triton(q, r, k, v, True, 0.2, None)
    want = triton_train.parallax_fwd_triton(q, r, k, v, True, 0.2, None)
    assert torch.equal(got[0], want[0])
    for a, b in zip(base.parallax_bwd_triton(q, r, k, v, *got, do, True, 0.2, None),
                    triton_train.parallax_bwd_triton(q, r, k, v, *want, do, True, 0.2, None)):  # fmt: skip
        assert torch.equal(a, b)


def test_configs_put_the_table_first_then_each_candidate_with_and_without_tma(ab, monkeypatch):
    table = triton_train._HOPPER[128]
    monkeypatch.setattr(triton_train, "default_configs", lambda *a: table)
    cfgs = ab.configs(triton_train, "dkv", 128)
    assert cfgs[0] == table.dkv
    assert len(cfgs) == len(set(cfgs))
    for c in ab.CANDIDATES[128]["dkv"]:
        assert triton_train.KernelConfig(*c, tma=True) in cfgs and triton_train.KernelConfig(*c, tma=False) in cfgs
