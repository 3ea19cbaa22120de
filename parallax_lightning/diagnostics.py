"""Per-layer Parallax diagnostics: the paper's evidence for codesigning Parallax with Muon.

The paper reports that under Muon W_R stays high-rank and the correction branch stays large
(correction-to-output norm ratio > 8 in deep layers) while AdamW lets both collapse. For each layer
:func:`parallax_layer_stats` measures

- ``correction_ratio``: ‖Cov_p(v, k) r‖ / ‖v̄‖, per token and head, averaged. v̄ = Σ_j p_ij v_j is
  the softmax (Nadaraya-Watson) output and Cov_p(v, k) r_i = Σ_j p_ij t_ij v_j - v̄_i t̄_i the
  correction that Parallax subtracts from it (o = v̄ - Cov r). Zero when W_R = 0.
- ``correction_norm``, ``vbar_norm``: the two norms' means, so a reader can tell which one moved.
- ``r_norm``: mean ‖r_i‖ per token and head (r after its RMSNorm and RoPE, as the op sees it).
- ``stable_rank_w_q``, ``stable_rank_w_k``, ``stable_rank_w_r``: ‖W‖_F² / ‖W‖_2² of the whole
  projection matrix.

The numbers come from the pure-PyTorch pieces (materialised weights p and t), so they work on CPU and
on any device; use a small batch. Models without a learned probe report only what they have:
softmax, LLA and linear layers carry the stable ranks of W_Q and W_K; affine linear layers carry the
probe statistics with uniform weights in place of p and no W_Q.
"""

from __future__ import annotations

import torch

from parallax_kernels import parallax_weights
from parallax_muon import stable_rank

from .attention import PROBE_KINDS


def _stable_rank(weight: torch.Tensor) -> float:
    # parallax_muon's stable_rank clamps the spectral norm, so W_R = 0 (r_init="zero") gives 0, not 0/0
    return float(stable_rank(weight))


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H_kv, D) -> (B, H, T, D) in fp32 (fp64 stays), each kv head repeated for its group."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype).transpose(1, 2)
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def correction_terms(q, r, k, v, window_size=None, uniform: bool = False):
    """(v̄, Cov r), each (B, H, T, D), of causal Parallax (softmax weights from q) or, with
    uniform=True, of affine linear attention (weight 1/n over the visible keys; q unused).
    The layer's attention output is v̄ - Cov r."""
    H = r.shape[2]
    vf = _expand_heads(v, H)
    if uniform:
        rf, kf = _expand_heads(r, H), _expand_heads(k, H)
        T_q, T_k = r.shape[1], k.shape[1]
        pos = torch.arange(T_q, device=r.device).unsqueeze(1) + (T_k - T_q)
        j = torch.arange(T_k, device=r.device).unsqueeze(0)
        keep = j <= pos
        if window_size is not None:
            keep &= j > pos - window_size
        p = keep.to(vf.dtype)
        p = p / p.sum(-1, keepdim=True)
        t = rf @ kf.transpose(-1, -2)
    else:
        p, t = parallax_weights(q, r, k, causal=True, window_size=window_size)
        p, t = p.to(vf.dtype), t.to(vf.dtype)
    pt = p * t
    v_bar = p @ vf
    correction = pt @ vf - v_bar * pt.sum(-1, keepdim=True)
    return v_bar, correction


def _capture_layer_inputs(model, input_ids):
    """Run the model once; return each attention layer's (x, cos, sin) as it received them."""
    captured = {}
    hooks = []
    for i, block in enumerate(model.blocks):

        def hook(module, args, i=i):
            captured[i] = args[:3]

        hooks.append(block.attn.register_forward_pre_hook(hook))
    try:
        # forward, not __call__: eager even when the decoder is compiled in place (the hooks would recompile it)
        model.forward(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return [captured[i] for i in range(len(model.blocks))]


@torch.no_grad()
def parallax_layer_stats(model, input_ids: torch.Tensor) -> list[dict]:
    """One dict per layer (see the module docstring for the keys); plain Python floats.

    input_ids (B, T): a small batch (the weights p and t are materialised, T x T per head).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("parallax_layer_stats: input_ids must be an integer tensor of shape (batch, seq)")
    was_training = model.training
    model.eval()
    try:
        inputs = _capture_layer_inputs(model, input_ids.to(model.embed.weight.device))
    finally:
        model.train(was_training)
    stats = []
    for i, (block, (x, cos, sin)) in enumerate(zip(model.blocks, inputs)):
        attn = block.attn
        entry: dict = {"layer": i}
        weights = attn.projection_weights()  # the rows of the fused weight when fused_qkvr
        for name in ("q", "k", "r"):
            if name in weights:
                entry[f"stable_rank_w_{name}"] = _stable_rank(weights[name])
        if attn.kind in PROBE_KINDS:
            q, r, k, v = attn.project(x, cos, sin)
            v_bar, corr = correction_terms(q, r, k, v, attn.window_size, uniform=attn.kind == "affine_linear")
            corr_norm, vbar_norm = corr.norm(dim=-1), v_bar.norm(dim=-1)
            ratio = corr_norm / vbar_norm.clamp_min(torch.finfo(vbar_norm.dtype).tiny)
            entry.update(
                correction_ratio=ratio.mean().item(),
                correction_norm=corr_norm.mean().item(),
                vbar_norm=vbar_norm.mean().item(),
                r_norm=r.float().norm(dim=-1).mean().item(),
            )
        stats.append(entry)
    return stats
