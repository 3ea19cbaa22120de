"""How big a decoder is: the named sizes and their matched controls (`preset`), and what a config costs
(`count_params`, `matmul_params`, `flops_per_token`: the counts the presets are matched by and MFU is read
against).

    from parallax_lightning.model import Decoder
    from parallax_lightning.model_sizes import preset
    model = Decoder(preset("small-softmax-param-matched"))
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .attention import PROBE_KINDS, QUERY_KINDS
from .model import DecoderConfig

# --------------------------------------------------------------------------------------- presets

# A table, one size per row.
# fmt: off
_SIZES = {
    # name: fields of DecoderConfig. Head counts are chosen so that both matched variants exist:
    # 1.5 n_heads is a multiple of n_kv_heads, and for small and base (n_heads/2 + n_kv_heads)
    # head_dim / 3, the MLP growth that compute-matching needs, is a whole multiple of 64.
    "tiny": dict(vocab_size=256, max_seq_len=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2),
    "small": dict(vocab_size=256, max_seq_len=1024, d_model=768, n_layers=8, n_heads=6, n_kv_heads=3, head_dim=128, mlp_hidden=2048),
    "base": dict(vocab_size=256, max_seq_len=2048, d_model=1024, n_layers=12, n_heads=8, n_kv_heads=2, head_dim=128, mlp_hidden=2560),
}
# fmt: on

_VARIANTS = ("softmax-param-matched", "parallax-compute-matched")


def _param_matched_softmax(c: DecoderConfig) -> DecoderConfig:
    """Softmax with 1.5x the query heads: Parallax's attention holds (3 H + 2 H_kv) D d weights
    (q, r, o and k, v), softmax with H' heads (2 H' + 2 H_kv) D d, equal at H' = 1.5 H."""
    heads = 3 * c.n_heads // 2
    if (3 * c.n_heads) % 2 or heads % c.kv_heads:
        raise ValueError(
            f"preset: no parameter-matched softmax for n_heads={c.n_heads}, n_kv_heads={c.kv_heads}: "
            "1.5 n_heads must be a whole multiple of n_kv_heads"
        )
    return dataclasses.replace(c, attention="softmax", n_heads=heads, head_dim=c.dim_head)


def _compute_matched_parallax(c: DecoderConfig) -> DecoderConfig:
    """Parallax with half the head dim and a larger MLP, matching softmax's FLOPs: four matmuls at
    D/2 cost the two of softmax at D, and the projections shrink from (2 H + 2 H_kv) D d to
    (3 H + 2 H_kv) (D/2) d, a saving of (H/2 + H_kv) D d that goes to the MLP as
    (H/2 + H_kv) D / 3 more hidden units (rounded to a whole number)."""
    if c.dim_head % 4:
        raise ValueError(f"preset: compute-matched Parallax halves head_dim={c.dim_head}; it must stay even for RoPE")
    extra = round((c.n_heads / 2 + c.kv_heads) * c.dim_head / 3)
    return dataclasses.replace(c, attention="parallax", head_dim=c.dim_head // 2, mlp_hidden=c.hidden + extra)


def preset(name: str, **overrides) -> DecoderConfig:
    """A named DecoderConfig; `overrides` replace fields (validated like any config).

    Sizes (parameter counts as :func:`count_params` reports them: every weight except the token
    embedding and the output head, norms included; the embedding adds vocab_size x d_model, twice
    when untied):

    - ``tiny``: d 128, 2 layers, 4 query / 2 kv heads of 32, MLP 320. For CPU tests and the
      quickstart. Parallax 0.38M, softmax 0.34M (+ 33k embedding at vocab 256).
    - ``small``: d 768, 8 layers, 6 query / 3 kv heads of 128, MLP 2048. Parallax 56.6M,
      softmax 51.9M (+ 0.2M embedding at vocab 256, 38.6M at vocab 50304).
    - ``base``: d 1024, 12 layers, 8 query / 2 kv heads of 128, MLP 2560. Parallax 138.4M,
      softmax 125.9M (+ 51.5M embedding at vocab 50304).

    Each size has two matched controls (the paper's), named ``<size>-<variant>``:

    - ``<size>-softmax-param-matched``: softmax with 1.5x the query heads, so its attention
      holds exactly Parallax's weights (the extra q and o columns pay for W_R). tiny 0.38M,
      small 56.6M, base 138.4M: equal to the Parallax model of that size up to the per-head norms
      (Parallax's r_norm, head_dim weights per layer).
    - ``<size>-parallax-compute-matched``: Parallax with half the head dim and a larger MLP, so that
      both its matmul FLOPs and its attention FLOPs equal the softmax model's (see
      :func:`flops_per_token`). small 51.9M and base 125.9M, FLOPs equal to softmax's; tiny
      0.35M, where the MLP growth 42.7 is rounded to 43 and the FLOPs differ by 0.04%.

    The plain size is Parallax; ``preset("small", attention="softmax")`` is its softmax baseline.
    For a matched variant the overrides apply to the size's config before the matching is derived,
    so the control stays matched (overriding ``attention`` there is an error).
    """
    size, _, variant = name.partition("-")
    if size not in _SIZES or (variant and variant not in _VARIANTS):
        names = [*_SIZES, *(f"{s}-{v}" for s in _SIZES for v in _VARIANTS)]
        raise ValueError(f"preset: unknown name {name!r}; known: {', '.join(names)}")
    if variant and "attention" in overrides:
        raise ValueError(f"preset: {name!r} fixes the attention kind; do not override attention there")
    config = DecoderConfig(**{**_SIZES[size], **overrides})
    if variant == "softmax-param-matched":
        config = _param_matched_softmax(config)
    elif variant == "parallax-compute-matched":
        config = _compute_matched_parallax(config)
    return config


# ------------------------------------------------------------------------------ counting, FLOPs


def count_params(model: nn.Module, exclude_embeddings: bool = True) -> int:
    """Trainable parameters (a tied weight once). exclude_embeddings drops the token embedding and
    the output head, the usual "non-embedding" count of scaling laws; norms stay in."""
    skip = set()
    if exclude_embeddings:
        for name in ("embed", "lm_head"):
            module = getattr(model, name, None)
            if module is not None:
                skip.update(id(p) for p in module.parameters())
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip or not p.requires_grad:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def matmul_params(config: DecoderConfig) -> int:
    """Weights that a token multiplies by in the forward: the projections of every layer and the
    output head (tied or not); not the embedding lookup, not the norms."""
    c = config
    D, H, Hkv, d = c.dim_head, c.n_heads, c.kv_heads, c.d_model
    q_side = (c.attention in QUERY_KINDS) + (c.attention in PROBE_KINDS)  # q and/or r
    attn = (q_side * H + 2 * Hkv) * D * d + H * D * d
    mlp = 3 * d * c.hidden
    return c.n_layers * (attn + mlp) + d * c.vocab_size


def mean_visible_keys(seq_len: int, window_size: int | None) -> float:
    """Average number of keys a query sees in a causal sequence of seq_len (the causal halving),
    capped by the window."""
    T = seq_len
    if window_size is None or window_size >= T:
        return (T + 1) / 2
    W = window_size
    # rows 0..W-1 see i+1 keys, the remaining T-W rows see W
    return (W * (W + 1) / 2 + (T - W) * W) / T


def attention_flops_forward(config: DecoderConfig, seq_len: int) -> float:
    """Forward attention FLOPs per token and layer (the score/mix matmuls; 2 FLOPs per MAC).

    With n keys visible on average: softmax runs QKᵀ and PV, 2 matmuls, 2·2·n·D per head;
    Parallax runs QKᵀ, RKᵀ, PV and (P∘T)V, 4 matmuls; affine linear runs RKᵀ, UV and (U∘T)V, 3;
    linear runs QKᵀ and (U∘S)V, 2 (the masked quadratic form its reference computes). LLA counts its
    reference: QKᵀ, the means P K and P V, two weighted second moments (2·2·n·D² MACs·FLOPs) and a
    D x D solve per query (2/3 D³ + 4 D²).
    """
    c = config
    D, H = c.dim_head, c.n_heads
    n = mean_visible_keys(seq_len, c.window_size)
    matmuls = {"softmax": 2, "parallax": 4, "affine_linear": 3, "linear": 2}
    if c.attention in matmuls:
        return H * matmuls[c.attention] * 2 * n * D
    # lla
    return H * (3 * 2 * n * D + 2 * 2 * n * D * D + (2 / 3) * D**3 + 4 * D * D)


def flops_per_token(config: DecoderConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for MFU.

    6 N for the matmul weights N (:func:`matmul_params`: 2 per weight forward, 4 backward), plus the
    attention matmuls counted by hand (a FLOP counter cannot see custom ops): 3x the forward count of
    :func:`attention_flops_forward` (backward = 2x forward, recomputation not counted, as in PaLM's
    MFU), causal halving and windows included. Parallax's attention term is twice softmax's.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len must be a positive integer, got {seq_len!r}")
    return 6 * matmul_params(config) + 3 * config.n_layers * attention_flops_forward(config, seq_len)
