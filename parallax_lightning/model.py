"""The decoder: a Qwen3-style transformer whose attention is one config key.

RMSNorm pre-norm blocks, SwiGLU MLP, RoPE, GQA, per-head RMSNorm on q, k and r, RoPE on q, k and r
(the same cos/sin), no output gate, no biases, optional tied embeddings. ``attention`` picks the
member of the Parallax family (see :mod:`parallax_lightning.attention`); everything else is shared,
so two configs that differ only in ``attention`` are the controlled comparison of the paper.

Pure ``torch.nn``: importing this module does not import lightning, mlflow or omegaconf.

    from parallax_lightning.model import Decoder
    from parallax_lightning.model_sizes import preset     # named sizes, parameter and FLOP counts
    model = Decoder(preset("tiny"))
    logits = model(torch.randint(0, 256, (2, 64)))          # (2, 64, 256)
    out = model.generate(prompt, max_new_tokens=32, temperature=0.0)   # greedy, with a KV cache
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from . import generation
from .attention import (
    ATTENTION_KINDS,
    ATTN_BACKENDS,
    Attention,
    AttentionKind,
    AttnBackend,
    KVCache,
    RMSNorm,
)

RInit = Literal["like_q", "zero"]
R_INITS: tuple[str, ...] = get_args(RInit)


def _default_mlp_hidden(d_model: int) -> int:
    """A multiple of 64 near 8/3 d_model (SwiGLU's three matrices then cost about 8 d_model²)."""
    return max(64, 64 * round(8 * d_model / 3 / 64))


@dataclass
class DecoderConfig:
    """Sizes and choices of :class:`Decoder`; validated on construction (errors name the field)."""

    vocab_size: int = 256
    max_seq_len: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    head_dim: int | None = None  # None = d_model // n_heads
    mlp_hidden: int | None = None  # SwiGLU hidden size; None = a multiple of 64 near 8/3 d_model
    attention: AttentionKind = "parallax"
    window_size: int | None = None  # sliding window (keys incl. the diagonal); None = full causal
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    r_init: RInit = "like_q"  # "zero": Parallax with W_R = 0 equals the softmax model exactly
    lla_ridge: float = 0.1
    init_std: float = 0.02
    attn_backend: AttnBackend = "auto"  # auto: Triton on CUDA, reference on CPU
    # One (q | r | k | v) projection, one norm and one RoPE over the q | r | k heads: fewer, larger
    # kernels, the same function (and the same weights: checkpoints load into either layout).
    fused_qkvr: bool = False

    def __post_init__(self):
        def fail(field: str, why: str):
            raise ValueError(f"DecoderConfig.{field}: {why} (got {getattr(self, field)!r})")

        def positive_int(field: str, optional: bool = False):
            value = getattr(self, field)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(field, "must be a positive integer" + (" or None" if optional else ""))

        for field in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            positive_int(field)
        for field in ("n_kv_heads", "head_dim", "mlp_hidden", "window_size"):
            positive_int(field, optional=True)
        if self.attention not in ATTENTION_KINDS:
            fail("attention", f"must be one of {', '.join(ATTENTION_KINDS)}")
        if self.attn_backend not in ATTN_BACKENDS:
            fail("attn_backend", f"must be one of {', '.join(ATTN_BACKENDS)}")
        if self.r_init not in R_INITS:
            fail("r_init", f"must be one of {', '.join(R_INITS)}")
        if self.n_heads % self.kv_heads != 0:
            fail(
                "n_kv_heads", f"must divide n_heads={self.n_heads} (each key/value head serves a group of query heads)"
            )
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            fail("n_heads", f"must divide d_model={self.d_model} when head_dim is None (or set head_dim)")
        if self.dim_head % 2 != 0:
            fail("head_dim", f"must be even for RoPE; d_model // n_heads = {self.dim_head}")
        for field in ("rope_theta", "norm_eps", "lla_ridge", "init_std"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                fail(field, "must be a finite positive number")
        for field in ("tie_embeddings", "fused_qkvr"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "must be a bool")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def hidden(self) -> int:
        return _default_mlp_hidden(self.d_model) if self.mlp_hidden is None else self.mlp_hidden


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config.d_model, config.hidden)

    def forward(self, x, cos, sin, cache=None, cache_seqlens=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, cache_seqlens)
        return x + self.mlp(self.mlp_norm(x))


def _rng_untouched():
    """A context that restores the CPU RNG (and the default CUDA device's, when modules are built there)."""
    device = torch.get_default_device()
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[torch.cuda.current_device() if device.index is None else device.index])
    return torch.random.fork_rng(devices=[])


class Decoder(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"Decoder: config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        # The layers' default initialisations are overwritten below; they must not consume the RNG either,
        # or the draws of reset_parameters would depend on which layers exist (the attention kind).
        with _rng_untouched():
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
            self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
            self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
            self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embeddings and projections; the residual-stream writers (o_proj,
        down_proj) scaled by 1/sqrt(2 n_layers) (GPT-2) so the stream's variance does not grow with
        depth; W_R drawn like W_Q (the paper), or zero with r_init="zero"; norms at one.

        Every weight but W_R is drawn from the global RNG in a fixed order (embedding; per layer
        W_Q, W_K, W_V, W_O, the MLP; the head) that does not depend on the attention kind or on
        fused_qkvr, so a softmax and a Parallax model built after the same torch.manual_seed share
        them all. W_R then comes from a stream of its own, seeded by one draw from the global RNG
        that every kind makes: the only difference between the two models is W_R, and the RNG is
        left in the same state by both."""
        c = self.config
        std, out_std = c.init_std, c.init_std / math.sqrt(2 * c.n_layers)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        for block in self.blocks:
            projections = block.attn.projection_weights()
            for name in ("q", "k", "v"):
                if name in projections:
                    nn.init.normal_(projections[name], mean=0.0, std=std)
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=out_std)
            nn.init.normal_(block.mlp.gate_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.up_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=out_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        r_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        r_stream = torch.Generator(device="cpu").manual_seed(r_seed)
        for block in self.blocks:
            w_r = block.attn.projection_weights().get("r")
            if w_r is None:
                continue
            if c.r_init == "zero":
                w_r.zero_()
            elif w_r.device.type != "meta":
                # drawn on the CPU in fp32, so W_R is the same whatever device or dtype the model is built on
                draw = torch.empty(w_r.shape, dtype=torch.float32).normal_(0.0, std, generator=r_stream)
                w_r.copy_(draw)

    def fused_weights(self) -> dict[str, list[tuple[str, int]]]:
        """{name of a fused q | r | k | v weight: [(the name its part has in the separate layout,
        rows), ...] in row order}; empty unless fused_qkvr."""
        out = {}
        for i, block in enumerate(self.blocks):
            attn = block.attn
            if attn.fused:
                prefix = f"blocks.{i}.attn."
                out[prefix + "qrkv_proj.weight"] = [
                    (f"{prefix}{name}_proj.weight", heads * attn.head_dim) for name, heads in attn.segments
                ]
        return out

    def separate_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the separate-projection layout (q_proj, r_proj, k_proj, v_proj weights,
        views of the fused ones), whatever fused_qkvr is: the layout every checkpoint loads from."""
        state = self.state_dict()
        for fused_name, parts in self.fused_weights().items():
            weight = state.pop(fused_name)
            for (name, _), part in zip(parts, weight.split([rows for _, rows in parts])):
                state[name] = part
        return state

    def muon_overrides(self, build_groups) -> dict[str, dict]:
        """`muon_param_groups` overrides that optimize each fused weight exactly as its separate parts
        would be: `build_groups(module)` (the optimizer's own routing, e.g. muon_param_groups with the
        configured options) is applied to this model's separate-layout twin (on the meta device), and
        each fused weight gets its parts' common group options plus ``split_sizes`` (one Newton-Schulz
        block per projection) and per-segment ``num_heads``. Raises ValueError when the parts are
        routed differently (see :func:`check_fused_routing`). Empty unless fused_qkvr."""
        fused = self.fused_weights()
        if not fused:
            return {}
        with torch.device("meta"), torch.random.fork_rng(devices=[]):  # building the twin draws no numbers
            twin = Decoder(dataclasses.replace(self.config, fused_qkvr=False))
        names = {id(p): n for n, p in twin.named_parameters()}
        options_of = {}
        for group in build_groups(twin):
            for p in group["params"]:
                options_of[names[id(p)]] = {k: v for k, v in group.items() if k != "params"}
        per_weight = check_fused_routing(fused, options_of)
        # One pattern for all layers when they agree (one group, as the separate layout would have).
        distinct = {repr(sorted(o.items())): o for o in per_weight.values()}
        if len(distinct) == 1:
            return {r"(^|\.)attn\.qrkv_proj\.weight$": next(iter(distinct.values()))}
        return {"(^|\\.)" + re.escape(name) + "$": opts for name, opts in per_weight.items()}

    def _rope(self, positions: torch.Tensor):
        """cos, sin of shape positions.shape + (D/2,), computed afresh in fp32 (fp64 for an fp64
        model): cached tables would be rounded by a model.to(bfloat16)."""
        c = self.config
        dtype = torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32
        exponents = torch.arange(0, c.dim_head, 2, device=positions.device, dtype=dtype) / c.dim_head
        inv_freq = 1.0 / (c.rope_theta**exponents)
        angles = positions.to(dtype).unsqueeze(-1) * inv_freq
        return angles.cos(), angles.sin()

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size). With a cache, the tokens continue each cached sequence."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = (
                f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
                if isinstance(input_ids, torch.Tensor)
                else type(input_ids).__name__
            )
            raise ValueError(f"Decoder: input_ids must be an integer tensor of shape (batch, seq), got {got}")
        if cache is not None:
            return self._forward_cached(input_ids, cache)
        n_tokens = input_ids.shape[1]
        if n_tokens > self.config.max_seq_len:
            raise ValueError(f"Decoder: sequence length {n_tokens} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self._rope(torch.arange(n_tokens, device=input_ids.device))
        cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2) against (B, T, H, D/2)
        return self._layers(input_ids, cos, sin)

    @torch.compiler.disable
    def _forward_cached(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # Eager even in a compiled model: the cache's host-side lengths change every step and would
        # make torch.compile recompile per token; training (no cache) stays one graph.
        batch, n_tokens = input_ids.shape
        cache.check_room(batch, n_tokens)
        cos, sin = self._rope(cache.positions(n_tokens))
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2)
        cache_seqlens = (cache.seqlens + n_tokens).to(torch.int32)
        logits = self._layers(input_ids, cos, sin, cache, cache_seqlens)
        cache.advance(n_tokens)
        return logits

    def _layers(self, input_ids, cos, sin, cache=None, cache_seqlens=None) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, cache, cache_seqlens)
        x = self.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed.weight)
        return self.lm_head(x)

    def init_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens.

        dtype defaults to the autocast dtype when autocast is on for the device, else the
        parameters' dtype (the dtype the layers' k and v come out in)."""
        c = self.config
        if max_len > c.max_seq_len:
            raise ValueError(f"init_cache: max_len={max_len} exceeds the model's max_seq_len={c.max_seq_len}")
        weight = self.embed.weight
        device = weight.device if device is None else torch.device(device)
        if dtype is None:
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        return KVCache(c.n_layers, batch_size, max_len, c.kv_heads, c.dim_head, device, dtype)

    # model.generate(prompt_ids, max_new_tokens, ...): the function itself, so its signature is written once.
    generate = generation.generate


# Group keys that describe how a part is cut for Newton-Schulz (they become per-segment settings of the
# fused weight) or that only label the group; every other key must agree between the parts.
_PER_SEGMENT_KEYS = ("num_heads", "split_sizes")
_LABEL_KEYS = ("name",)


def check_fused_routing(fused: dict[str, list[tuple[str, int]]], options_of: dict[str, dict]) -> dict[str, dict]:
    """Group options for each fused weight from the options its parts get in the separate layout.

    `fused`: :meth:`Decoder.fused_weights`; `options_of`: {separate-layout parameter name: its
    optimizer group's keys, "params" excluded}. A fused weight is one tensor in one optimizer group,
    so its parts must agree on the optimizer, the learning-rate multiplier, weight decay and every
    other key; ``num_heads`` may differ (it becomes per segment) and ``split_sizes`` must be unset.
    Raises ValueError naming the parameters, the option and both settings otherwise."""
    out = {}
    for fused_name, parts in fused.items():
        common = None
        first = None
        heads = []
        for part, _ in parts:
            if part not in options_of:
                raise ValueError(
                    f"model.model.fused_qkvr=true: {part} (rows of {fused_name}) is in no optimizer group while other "
                    "parts of that weight are; set model.model.fused_qkvr=false to optimize the projections apart"
                )
            opts = dict(options_of[part])
            if opts.get("split_sizes") is not None:
                raise ValueError(
                    f"model.model.fused_qkvr=true: the optimizer settings give {part} split_sizes={opts['split_sizes']}, "
                    "which cannot be nested inside the fused weight's segments; set model.model.fused_qkvr=false"
                )
            n_heads = opts.get("num_heads")
            if n_heads is not None and not isinstance(n_heads, int):
                raise ValueError(
                    f"model.model.fused_qkvr=true: the optimizer settings give {part} num_heads={n_heads}; a fused "
                    "segment takes one head count; set model.model.fused_qkvr=false"
                )
            heads.append(1 if n_heads is None else n_heads)
            opts.setdefault("lr_mult", 1.0)
            kept = {k: v for k, v in opts.items() if k not in _PER_SEGMENT_KEYS + _LABEL_KEYS}
            if common is None:
                common, first = kept, part
                continue
            for key in sorted(set(common) | set(kept)):
                if common.get(key) != kept.get(key):
                    raise ValueError(
                        f"model.model.fused_qkvr=true puts W_Q, W_R, W_K, W_V of a layer in one weight ({fused_name}), "
                        f"which one optimizer group updates, but the optimizer settings give {part} "
                        f"{key}={kept.get(key)!r} and {first} {key}={common.get(key)!r} (W_R's own settings: "
                        "model.optimizer.r_proj_lr_mult, model.optimizer.route). Set model.model.fused_qkvr=false, or route and "
                        "scale W_R like W_Q, W_K and W_V"
                    )
        options = dict(common)
        if options["lr_mult"] == 1.0:
            del options["lr_mult"]  # as the separate q, k, v groups have it: Muon's default
        if options.get("use_muon", True):
            options["split_sizes"] = [rows for _, rows in parts]
            options["num_heads"] = heads
        out[fused_name] = options
    return out


def softmax_to_parallax(model: Decoder) -> Decoder:
    """A Parallax model that computes exactly what the softmax `model` computes (W_R = 0, so r = 0),
    holding copies of its weights: the paper's recipe for continued training of a softmax model
    with the correction branch switched on. The gradient reaching W_R is not zero, so training moves
    it away from zero at once."""
    if model.config.attention != "softmax":
        raise ValueError(f"softmax_to_parallax: the model's attention is {model.config.attention!r}, not 'softmax'")
    weight = model.embed.weight
    parallax = Decoder(dataclasses.replace(model.config, attention="parallax", r_init="zero"))
    parallax.to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = parallax.load_state_dict(model.separate_state_dict(), strict=False)
    assert not unexpected and all(".r_proj." in k or ".r_norm." in k for k in missing), (missing, unexpected)
    return parallax
