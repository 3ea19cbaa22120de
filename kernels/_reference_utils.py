"""Helpers shared by the pure-PyTorch reference ops: upcasting, GQA expansion, the mask band.

The references materialize the T_q x T_k score matrix: they are oracles for tests and the
CPU fallback for small models, not fast paths.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_bhtd(x: torch.Tensor, dtype: torch.dtype, heads: int | None = None) -> torch.Tensor:
    """(B, T, H, D) -> (B, H, T, D) in `dtype`, repeating kv heads up to `heads` for GQA."""
    x = x.to(dtype).transpose(1, 2)
    if heads is not None and x.shape[1] != heads:
        x = x.repeat_interleave(heads // x.shape[1], dim=1)
    return x


def band_mask(seq_q: int, seq_k: int, causal: bool, window_size: int | None, device) -> torch.Tensor | None:
    """Boolean (T_q, T_k) mask, True where query i may attend key j; None when all may.

    Queries are aligned to the end of the keys: row i sits at absolute position T_k - T_q + i.
    A window of W keeps j > i_abs - W (W keys, the diagonal included). See docs/parallax-math.md#masking.
    """
    if not causal:
        return None
    pos = torch.arange(seq_q, device=device).unsqueeze(1) + (seq_k - seq_q)
    j = torch.arange(seq_k, device=device).unsqueeze(0)
    keep = j <= pos
    if window_size is not None:
        keep = keep & (j > pos - window_size)
    return keep


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim; rows with no visible key get all-zero weights. Only those rows: a NaN
    score stays NaN (an oracle must not turn a NaN input into a finite output)."""
    if mask is None:
        return torch.softmax(scores, dim=-1)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return p.masked_fill(~mask.any(-1, keepdim=True), 0.0)


def uniform_weights(seq_q: int, seq_k: int, causal: bool, window_size, device, dtype) -> torch.Tensor:
    """(T_q, T_k) weights 1/n_i over the visible keys of each row (the 'uniform' family members)."""
    mask = band_mask(seq_q, seq_k, causal, window_size, device)
    if mask is None:
        return torch.full((seq_q, seq_k), 1.0 / seq_k, device=device, dtype=dtype)
    w = mask.to(dtype)
    return w / w.sum(-1, keepdim=True).clamp_min(1.0)


def from_bhtd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.transpose(1, 2).to(dtype)
