"""stable_rank and qk_clip (MuonClip)."""

from __future__ import annotations

import math

import pytest
import torch

from parallax_muon import qk_clip, stable_rank


def test_stable_rank_of_known_spectra():
    U, _ = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(12, 6, dtype=torch.float64))
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    W = (U * s) @ V.T
    assert math.isclose(stable_rank(W).item(), (s.square().sum() / 9.0).item(), rel_tol=1e-10)
    assert math.isclose(stable_rank(torch.eye(7)).item(), 7.0, rel_tol=1e-6)
    assert math.isclose(stable_rank(torch.ones(5, 3)).item(), 1.0, rel_tol=1e-6)
    # >2-D: one (out, -1) matrix by default, or a batch of trailing matrices.
    conv = torch.randn(4, 3, 2, 2)
    assert torch.allclose(stable_rank(conv), stable_rank(conv.reshape(4, -1)))
    assert stable_rank(conv, batched=True).shape == (4, 3)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        stable_rank(torch.randn(5))


def test_qk_clip_rescales_only_heads_over_threshold_and_caps_their_logits():
    torch.manual_seed(0)
    heads, kv_heads, head_dim, d = 4, 2, 3, 8
    w_q, w_k = torch.randn(heads * head_dim, d), torch.randn(kv_heads * head_dim, d)
    x = torch.randn(5, d)

    def max_logits(wq, wk):
        q = (x @ wq.T).view(5, heads, head_dim)
        k = (x @ wk.T).view(5, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=1)
        return torch.einsum("thd,shd->hts", q, k).amax(dim=(1, 2))

    s = max_logits(w_q, w_k)
    tau = s.sort().values[1].item()  # two heads at or under the threshold, two above
    q0, k0 = w_q.clone(), w_k.clone()
    gamma = qk_clip(w_q, w_k, s, tau, num_heads=heads, num_kv_heads=kv_heads)
    over = s > tau
    assert torch.allclose(gamma[over], tau / s[over]) and (gamma[~over] == 1).all()
    s_after = max_logits(w_q, w_k)
    assert (s_after <= tau * (1 + 1e-5)).all(), f"logits {s_after} still above τ={tau}"
    for h in range(heads):
        blk = slice(h * head_dim, (h + 1) * head_dim)
        assert torch.allclose(w_q[blk], q0[blk] * gamma[h].sqrt())
    for g in range(kv_heads):
        blk = slice(g * head_dim, (g + 1) * head_dim)
        k_gamma = gamma[g * 2 : g * 2 + 2].min()
        assert torch.allclose(w_k[blk], k0[blk] * k_gamma.sqrt())


def test_qk_clip_errors_name_the_values():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="num_kv_heads=4 must divide num_heads=6"):
        qk_clip(w, w, torch.ones(6), 1.0, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="max_logits has 2 entries"):
        qk_clip(w, w, torch.ones(2), 1.0, num_heads=3)
    with pytest.raises(ValueError, match="threshold=0"):
        qk_clip(w, w, torch.ones(3), 0, num_heads=3)
    with pytest.raises(ValueError, match=r"w_q of shape \(6, 4\) does not split into num_heads=4"):
        qk_clip(w, torch.randn(8, 4), torch.ones(4), 1.0, num_heads=4)
