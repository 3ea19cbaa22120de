"""What people log and clip around Muon: stable rank, per-group update RMS, and MuonClip's QK rescaling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def stable_rank(W: Tensor, *, batched: bool = False) -> Tensor:
    """‖W‖_F² / ‖W‖₂²: how many directions carry the matrix's energy (1 ≤ value ≤ rank).

    A >2-D weight is read as Muon reads it, one ``(shape[0], -1)`` matrix, unless ``batched=True``, in which
    case the leading dims index a batch of ``shape[-2:]`` matrices. Computed in float32 (float64 stays).
    """
    if W.ndim < 2:
        raise ValueError(f"stable_rank needs a matrix, got shape {tuple(W.shape)}")
    X = W if batched or W.ndim == 2 else W.reshape(W.shape[0], -1)
    X = X.double() if X.dtype == torch.float64 else X.float()
    fro2 = torch.linalg.matrix_norm(X, ord="fro").square()
    spec2 = torch.linalg.matrix_norm(X, ord=2).square()
    return fro2 / spec2.clamp_min(torch.finfo(X.dtype).tiny)


def update_rms_metrics(optimizer, prefix: str = "update_rms/") -> dict[str, float]:
    """The optimizer's per-group update RMS (``Muon(track_update_rms=True)``) as floats for a logger.

    Reading the values synchronises with the device once; call it at your logging interval, not every step.
    """
    values = optimizer.update_rms()
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).cpu().tolist()
    return {f"{prefix}{name}": v for name, v in zip(values, stacked)}


@torch.no_grad()
def qk_clip(
    w_q: Tensor,
    w_k: Tensor,
    max_logits: Tensor | Sequence[float],
    threshold: float,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    alpha: float = 0.5,
) -> Tensor:
    """MuonClip's QK-clip (Kimi K2): shrink W_Q and W_K of heads whose attention logits grew past ``threshold``.

    For query head h with recorded max logit S_h > τ, γ_h = τ / S_h; its W_Q rows are scaled by γ_h^α and
    its key head's W_K rows by γ^(1−α), so that head's logits shrink by γ_h (exactly to τ at the recorded
    maximum). Under GQA a key head serves several query heads (query heads g·r … g·r+r−1 share key head g,
    the usual ``repeat_interleave`` layout); it takes the smallest γ among them, so no query head of the
    group ends above τ. Heads at or below τ are left untouched (γ = 1).

    Args:
        w_q: (num_heads·head_dim, d_in) query projection weight (each head's rows contiguous). Updated in place.
        w_k: (num_kv_heads·head_dim, d_in) key projection weight. Updated in place.
        max_logits: (num_heads,) the largest pre-softmax logit (q·k·scale) each query head produced.
        threshold: τ > 0.
        num_heads, num_kv_heads: query and key heads (num_kv_heads defaults to num_heads; must divide it).
        alpha: the share of the shrink applied to W_Q (0.5: split evenly, in log space).

    Returns:
        γ per query head (float32, on w_q's device): 1 where nothing was clipped.

    Do not combine with QK-norm: normalized queries and keys undo the weight scaling.
    """
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if threshold <= 0:
        raise ValueError(f"qk_clip: threshold={threshold} must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"qk_clip: alpha={alpha} must be in [0, 1]")
    if num_heads <= 0 or kv <= 0 or num_heads % kv != 0:
        raise ValueError(f"qk_clip: num_kv_heads={kv} must divide num_heads={num_heads}")
    if w_q.ndim != 2 or w_q.shape[0] % num_heads != 0:
        raise ValueError(
            f"qk_clip: w_q of shape {tuple(w_q.shape)} does not split into num_heads={num_heads} row blocks"
        )
    if w_k.ndim != 2 or w_k.shape[0] % kv != 0:
        raise ValueError(f"qk_clip: w_k of shape {tuple(w_k.shape)} does not split into num_kv_heads={kv} row blocks")
    s = torch.as_tensor(max_logits, dtype=torch.float32, device=w_q.device).reshape(-1)
    if s.numel() != num_heads:
        raise ValueError(f"qk_clip: max_logits has {s.numel()} entries, expected one per query head ({num_heads})")
    gamma = torch.where(s > threshold, threshold / s, torch.ones_like(s))
    q_scale = gamma.pow(alpha)
    k_scale = gamma.view(kv, num_heads // kv).amin(dim=1).pow(1.0 - alpha)
    w_q.view(num_heads, -1).mul_(q_scale.to(w_q.dtype).unsqueeze(1))
    w_k.view(kv, -1).mul_(k_scale.to(device=w_k.device, dtype=w_k.dtype).unsqueeze(1))
    return gamma
