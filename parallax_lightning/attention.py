"""The attention layer of the decoder: one module that reaches every member of the Parallax family,
and the KV cache used for generation.

Members (``DecoderConfig.attention``) and the projections each one owns:

=================  ======================  =============================================================
kind               projections             op (parallax_kernels)
=================  ======================  =============================================================
``parallax``       q, r, k, v, o           ``parallax_attn``: softmax weights, learned probe r = W_R x
``softmax``        q, k, v, o              ``softmax_attn`` (SDPA): r = 0
``lla``            q, k, v, o              ``lla_attn_reference``: the probe solved per query (ridge)
``affine_linear``  r, k, v, o              ``affine_linear_attn_reference``: uniform weights, learned r;
                                           uniform weights need no query, so the only query-side
                                           projection is the probe, named ``r_proj``
``linear``         q, k, v, o              ``linear_attn_reference``: uniform weights, no intercept
=================  ======================  =============================================================

Tensors stay in the ops' layout (batch, seq, heads, head_dim) from projection to output, so no
transposes are made here. Backends (``DecoderConfig.attn_backend``): ``"auto"`` runs the public ops
(Triton kernels) on CUDA tensors and the pure-PyTorch references on CPU tensors, because the
Triton interpreter that the public ops use on CPU under ``TRITON_INTERPRET=1`` is far too slow to
train with; ``"reference"`` always runs the references (exact oracles, fp32 math);
``"triton"`` always runs the public ops (on CPU: the interpreter, for testing the kernels inside
the model). The LLA and linear members have only references, which every backend runs.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from parallax_kernels import (
    affine_linear_attn_reference,
    linear_attn_reference,
    lla_attn_reference,
    parallax_attn,
    parallax_attn_reference,
    parallax_decode,
    parallax_decode_reference,
    softmax_attn,
    softmax_attn_reference,
    softmax_decode,
)

# Literal types: the CLI (jsonargparse) rejects any other value when it parses, listing these.
AttentionKind = Literal["parallax", "softmax", "lla", "affine_linear", "linear"]
AttnBackend = Literal["auto", "reference", "triton"]
ATTENTION_KINDS: tuple[str, ...] = get_args(AttentionKind)
ATTN_BACKENDS: tuple[str, ...] = get_args(AttnBackend)
#: kinds with a learned probe r = W_R x (an ``r_proj`` and ``r_norm``)
PROBE_KINDS = ("parallax", "affine_linear")
#: kinds that use the query projection (``q_proj`` and ``q_norm``)
QUERY_KINDS = ("parallax", "softmax", "lla", "linear")


def use_reference(backend: str, t: torch.Tensor) -> bool:
    """Whether `backend` means the pure-PyTorch reference for a tensor on t's device."""
    return backend == "reference" or (backend == "auto" and not t.is_cuda)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in at least fp32 and returned in the input's dtype: under autocast the
    per-head norms receive bf16 projections, which the fused kernel would refuse (fp32 weight) and
    whose mean square is better taken in fp32 anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        return F.rms_norm(x.to(dtype), self.normalized_shape, weight, self.eps).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, half-split convention: x (B, T, H, D); cos, sin broadcastable to (B, T, 1, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attend(kind: str, backend: str, q, r, k, v, *, window_size=None, lla_ridge: float = 0.1):
    """Causal attention of the family member `kind`; (B, T_q, H_q, D) out. With T_q < T_k the
    queries are the last T_q positions of the keys (every op aligns them to the end)."""
    ref = use_reference(backend, k)
    if kind == "parallax":
        op = parallax_attn_reference if ref else parallax_attn
        return op(q, r, k, v, causal=True, window_size=window_size)
    if kind == "softmax":
        # SDPA is already fast on CPU; "auto" keeps it there, "reference" asks for the oracle.
        op = softmax_attn_reference if backend == "reference" else softmax_attn
        return op(q, k, v, causal=True, window_size=window_size)
    if kind == "lla":
        return lla_attn_reference(q, k, v, causal=True, ridge=lla_ridge, window_size=window_size)
    if kind == "affine_linear":
        return affine_linear_attn_reference(r, k, v, causal=True, window_size=window_size)
    if kind == "linear":
        return linear_attn_reference(q, k, v, causal=True, window_size=window_size)
    raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {kind!r}")


class KVCache:
    """Preallocated keys and values of every layer, (B, L_max, H_kv, D) each, with per-sequence
    lengths. Only k and v are cached: the probe r, like q, is computed from the current token.

    ``seqlens`` (int32, device) and ``lengths`` (the same numbers on the host, so that no step has to
    synchronise with the device to know them) count the tokens already written. A forward pass with
    a cache writes its tokens' k and v after those rows, attends over the cache, and then advances
    the lengths (``Decoder.forward`` calls :meth:`advance`).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, device, dtype):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache: batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.lengths = [0] * batch_size

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def uniform_length(self) -> int | None:
        """The common length when every sequence has the same one, else None."""
        first = self.lengths[0]
        return first if all(n == first for n in self.lengths) else None

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"KVCache: the cache holds {self.batch_size} sequences but the input has {batch_size}")
        longest = max(self.lengths)
        if longest + new_tokens > self.max_len:
            raise ValueError(
                f"KVCache: {new_tokens} new tokens after {longest} cached ones exceed the cache's max_len "
                f"{self.max_len}; build it with a larger max_len"
            )

    def positions(self, new_tokens: int) -> torch.Tensor:
        """(B, T) absolute positions of the next `new_tokens` tokens of each sequence."""
        steps = torch.arange(new_tokens, device=self.seqlens.device, dtype=torch.long)
        return self.seqlens.long().unsqueeze(1) + steps

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, T, H_kv, D) of `layer` after each sequence's cached rows."""
        T = k.shape[1]
        start = self.uniform_length()
        if start is not None:
            self.k[layer][:, start : start + T] = k
            self.v[layer][:, start : start + T] = v
        else:
            rows = torch.arange(self.batch_size, device=k.device).unsqueeze(1)
            pos = self.positions(T)
            self.k[layer][rows, pos] = k.to(self.dtype)
            self.v[layer][rows, pos] = v.to(self.dtype)

    def advance(self, new_tokens: int) -> None:
        self.seqlens += new_tokens
        self.lengths = [n + new_tokens for n in self.lengths]

    def truncate(self, lengths: list[int]) -> None:
        """Roll sequence b back to its first lengths[b] tokens (the rows after it are overwritten by
        the next writes): re-use a shared prefix, drop rejected draft tokens, or give the sequences
        of a batch different lengths."""
        if len(lengths) != self.batch_size or any(not 0 <= n <= m for n, m in zip(lengths, self.lengths)):
            raise ValueError(
                f"KVCache.truncate: need {self.batch_size} lengths, each between 0 and the current one "
                f"{self.lengths}; got {lengths}"
            )
        self.lengths = [int(n) for n in lengths]
        self.seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32))

    def reset(self) -> None:
        self.truncate([0] * self.batch_size)


class Attention(nn.Module):
    """Qwen3-style attention: projections straight to (B, T, H, D), per-head RMSNorm on q, k and r,
    RoPE on q, k and r (the same cos/sin), no output gate, no biases.

    With ``fused_qkvr`` the projections are one ``qrkv_proj`` (rows q | r | k | v, those the kind has),
    normed and rotated in one pass each; :meth:`projection_weights` gives each projection's rows either way."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.kind = c.attention
        self.backend = c.attn_backend
        self.window_size = c.window_size
        self.lla_ridge = c.lla_ridge
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.dim_head
        q_width = self.n_heads * self.head_dim
        self.fused = bool(getattr(c, "fused_qkvr", False))
        # (name, heads) of each projection in the fused row order q | r | k | v
        self.segments = (
            (("q", self.n_heads),) * (self.kind in QUERY_KINDS)
            + (("r", self.n_heads),) * (self.kind in PROBE_KINDS)
            + (("k", self.n_kv_heads), ("v", self.n_kv_heads))
        )
        if self.fused:
            rows = sum(h for _, h in self.segments) * self.head_dim
            self.qrkv_proj = nn.Linear(c.d_model, rows, bias=False)
        else:
            for name, heads in self.segments:
                setattr(self, f"{name}_proj", nn.Linear(c.d_model, heads * self.head_dim, bias=False))
        # The per-head norms keep their own modules (and checkpoint names) in both layouts.
        if self.kind in QUERY_KINDS:
            self.q_norm = RMSNorm(self.head_dim, eps=c.norm_eps)
        if self.kind in PROBE_KINDS:
            self.r_norm = RMSNorm(self.head_dim, eps=c.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=c.norm_eps)
        self.o_proj = nn.Linear(q_width, c.d_model, bias=False)
        self.register_load_state_dict_pre_hook(_convert_projection_layout)

    def projection_weights(self) -> dict[str, torch.Tensor]:
        """{"q", "r", "k", "v"} -> the (out, d_model) weight of that projection (a row slice of the fused
        weight when fused; writing into it writes the parameter). Only the kind's projections."""
        if not self.fused:
            return {name: getattr(self, f"{name}_proj").weight for name, _ in self.segments}
        out, start = {}, 0
        for name, heads in self.segments:
            stop = start + heads * self.head_dim
            out[name] = self.qrkv_proj.weight[start:stop]
            start = stop
        return out

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, r, k, v in (B, T, H, D), normed and rotated (q or r is None where the kind has none).

        All four come out in v's dtype (the matmul dtype under autocast), which the ops require.
        """
        B, T, _ = x.shape
        if self.fused:
            return self._project_fused(x, cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        k = rotate(self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)), cos, sin).to(v.dtype)
        q = r = None
        if self.kind in QUERY_KINDS:
            q = rotate(self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)), cos, sin).to(v.dtype)
        if self.kind in PROBE_KINDS:
            r = rotate(self.r_norm(self.r_proj(x).view(B, T, self.n_heads, self.head_dim)), cos, sin).to(v.dtype)
        return q, r, k, v

    def _project_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """One matmul for q | r | k | v, one per-head RMSNorm and one RoPE over the q | r | k heads;
        q, r, k, v are strided views of those two tensors (no copies). The same math as the separate
        projections: RMSNorm normalises each head on its own, so a norm over all heads followed by
        each head's own gain is the three norms."""
        B, T, _ = x.shape
        D = self.head_dim
        y = self.qrkv_proj(x).view(B, T, -1, D)
        n_qrk = y.shape[2] - self.n_kv_heads
        qrk, v = y[:, :, :n_qrk], y[:, :, n_qrk:]
        norms = {"q": getattr(self, "q_norm", None), "r": getattr(self, "r_norm", None), "k": self.k_norm}
        dtype = torch.promote_types(qrk.dtype, torch.float32)
        gain = torch.cat([norms[name].weight.to(dtype).expand(heads, D) for name, heads in self.segments[:-1]])
        normed = (F.rms_norm(qrk.to(dtype), (D,), None, self.k_norm.eps) * gain).to(qrk.dtype)
        qrk = rotate(normed, cos, sin).to(v.dtype)
        views, start = {}, 0
        for name, heads in self.segments[:-1]:
            views[name] = qrk[:, :, start : start + heads]
            start += heads
        return views.get("q"), views.get("r"), views["k"], v

    def forward(self, x, cos, sin, cache: KVCache | None = None, cache_seqlens: torch.Tensor | None = None):
        """x (B, T, d_model); cos, sin broadcastable to (B, T, 1, D/2). With a cache, this layer's
        k, v are written into it and the queries attend over every cached row; `cache_seqlens` are
        the lengths after this step (computed once per forward by the decoder)."""
        B, T, _ = x.shape
        q, r, k, v = self.project(x, cos, sin)
        if cache is None:
            o = self._attend(q, r, k, v)
        else:
            o = self._attend_cached(q, r, k, v, cache, cache_seqlens)
        return self.o_proj(o.reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q, r, k, v):
        return attend(self.kind, self.backend, q, r, k, v, window_size=self.window_size, lla_ridge=self.lla_ridge)

    def _attend_cached(self, q, r, k, v, cache: KVCache, cache_seqlens):
        cache.write(self.layer_idx, k, v)
        kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
        out_dtype = v.dtype
        q = None if q is None else q.to(cache.dtype)
        r = None if r is None else r.to(cache.dtype)
        T = k.shape[1]
        if T == 1 and self.kind in ("parallax", "softmax"):
            # One token per sequence: the decode ops read the cache in place, per-sequence lengths.
            # The cache keeps its lengths on the host and check_room bounded them before this step, so the ops
            # need not read them back (a host sync per layer per token).
            ref = use_reference(self.backend, kc)
            if self.kind == "parallax":
                op = parallax_decode_reference if ref else parallax_decode
                o = op(q, r, kc, vc, cache_seqlens, window_size=self.window_size, check_lengths=False)
            else:
                o = softmax_decode(q, kc, vc, cache_seqlens, window_size=self.window_size, check_lengths=False)
            return o.to(out_dtype)
        # Chunks (prefill) and the kinds without a decode op: the training op over the valid rows,
        # queries aligned to the end of the keys.
        start = cache.uniform_length()
        if start is not None:
            n = start + T
            return self._attend(q, r, kc[:, :n], vc[:, :n]).to(out_dtype)
        outs = []
        for b, length in enumerate(cache.lengths):
            sl, n = slice(b, b + 1), length + T
            outs.append(
                self._attend(None if q is None else q[sl], None if r is None else r[sl], kc[sl, :n], vc[sl, :n])
            )
        return torch.cat(outs, dim=0).to(out_dtype)


def _convert_projection_layout(module: Attention, state_dict, prefix, local_metadata, strict, missing_keys, *_):
    """Load either checkpoint layout into either model: separate q_proj / r_proj / k_proj / v_proj
    weights are concatenated into a fused model's ``qrkv_proj`` and a fused weight is split for a
    separate model, so checkpoints move freely between ``fused_qkvr`` settings. Loading a subset
    of the parts into a fused model (a softmax checkpoint into Parallax) keeps the rows of the
    absent parts and reports those parts as missing, as the separate layout would."""
    fused_key = prefix + "qrkv_proj.weight"
    part_keys = {name: f"{prefix}{name}_proj.weight" for name, _ in module.segments}
    if module.fused and fused_key not in state_dict and any(k in state_dict for k in part_keys.values()):
        current = module.projection_weights()
        loaded = next(state_dict[k] for k in part_keys.values() if k in state_dict)
        parts = []
        for name, key in part_keys.items():
            if key in state_dict:
                parts.append(state_dict.pop(key))
            else:
                parts.append(current[name].detach())
                missing_keys.append(key)
        state_dict[fused_key] = torch.cat([p.to(device=loaded.device, dtype=loaded.dtype) for p in parts])
    elif not module.fused and fused_key in state_dict:
        fused = state_dict.pop(fused_key)
        sizes = [heads * module.head_dim for _, heads in module.segments]
        if fused.shape[0] != sum(sizes):
            state_dict[fused_key] = fused  # reported as unexpected; the size mismatch is the message
            return
        for (name, _), part in zip(module.segments, fused.split(sizes)):
            state_dict[part_keys[name]] = part
