"""``muon_param_groups``: route a model's parameters to Muon or AdamW groups.

Muon is for the hidden weight matrices. Everything whose rows are not a linear map between hidden states
goes to AdamW: token and position embeddings (rows are lookups), the input layer (a first Linear or conv stem
that reads the raw input), the output head (tied to the embedding or not, of any output size), and every 1-D
or scalar parameter (norm gains, biases, gates). Parallax's correction-branch projection
W_R (``…r_proj…``) is a Muon matrix but gets a group of its own, so its learning rate can be set apart.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("parallax_muon")

DEFAULT_EMBEDDING_PATTERNS: tuple[str, ...] = (
    r"(^|\.)(wte|wpe|tok_embeddings|embed_tokens|embed_positions|embedding|embeddings|token_embedding|pos_embedding)(\.|$)",
)
DEFAULT_HEAD_PATTERNS: tuple[str, ...] = (r"(^|\.)(lm_head|head|output|output_layer|classifier|fc)(\.|$)",)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUMMARY_NAMES = 4  # name patterns shown per group in the routing summary before "…"
DEFAULT_R_PROJ_PATTERN = r"(^|\.)r_proj(\.|$)"


def muon_param_groups(
    model: nn.Module,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    embedding_patterns: Sequence[str] = DEFAULT_EMBEDDING_PATTERNS,
    head_patterns: Sequence[str] = DEFAULT_HEAD_PATTERNS,
    r_proj_pattern: str | None = DEFAULT_R_PROJ_PATTERN,
    r_proj_lr_mult: float = 1.0,
    r_proj_options: Mapping[str, Any] | None = None,
    muon_options: Mapping[str, Any] | None = None,
    adamw_options: Mapping[str, Any] | None = None,
    input_layer: bool = True,
    output_layer: bool = True,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Param groups for ``Muon``: hidden ≥2-D weights → Muon; embeddings, head, norms, biases → AdamW.

    Args:
        model: the module; only parameters with ``requires_grad`` are routed (each tensor once, so a head
            tied to the embedding is counted with the embedding).
        overrides: ``{regex: options}`` matched (``re.search``) against parameter names, in order, later
            matches winning; options are group keys (``use_muon``, ``lr_mult``, ``num_heads``,
            ``split_sizes``, ``per_slice``, ``weight_decay``, ...). Parameters with the same options share a
            group named after the patterns that matched. ``use_muon`` here overrides the automatic routing.
        embedding_patterns, head_patterns: name regexes for embeddings and the output head (on top of
            ``nn.Embedding`` modules and of the layers ``input_layer`` / ``output_layer`` find).
        input_layer: route the input layer to AdamW (group ``adamw_input``): in a model without an
            ``nn.Embedding`` registered before it, the first ``nn.Linear``/``nn.Conv*d`` in registration order
            (a classifier's first layer, a CNN's conv stem, a ViT's patch projection).
        output_layer: route the output head to AdamW (``adamw_head``): in a model without an embedding, the last
            ``nn.Linear``/``nn.Conv*d`` in registration order, whatever its size (a 10-class classifier too); in
            one with an embedding, the last ``nn.Linear`` when its out_features equal an embedding's vocabulary
            (else an MLP's last layer of a tied-embedding model would be taken for the head). Modules registered
            out of forward order: name the layer in ``overrides`` (``{"use_muon": True}`` or ``False``).
        r_proj_pattern: regex for Parallax's W_R projection (``blocks.3.attn.r_proj.weight``); ``None`` keeps
            those weights in the main Muon group.
        r_proj_lr_mult: learning-rate multiplier of the W_R group (``lr_mult`` group key; LR schedulers keep it).
        r_proj_options: further group keys for the W_R group (e.g. ``{"num_heads": 16}``).
        muon_options, adamw_options: group keys added to every Muon / AdamW group.
        verbose: print the one-line routing summary (it is always logged at INFO on ``parallax_muon``).
    """
    embedding_ids: set[int] = set()
    vocab_sizes: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            embedding_ids.add(id(module.weight))
            vocab_sizes.add(module.num_embeddings)
    # The head: Linear layers named like one, and the model's last layer (see output_layer).
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    heads = [m for name, m in linears if _matches(head_patterns, name + ".weight")]
    layers, embedding_seen = [], False
    input_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            embedding_seen = True
        elif isinstance(module, _LAYERS):
            if not layers and not embedding_seen and input_layer:
                input_ids.add(id(module.weight))
            layers.append(module)
    if output_layer and layers:
        if not vocab_sizes:
            heads.append(layers[-1])
        elif linears and linears[-1][1].out_features in vocab_sizes:
            heads.append(linears[-1][1])
    head_ids: set[int] = set()
    tied = False
    for module in heads:
        if id(module.weight) in embedding_ids:
            tied = True
        else:
            head_ids.add(id(module.weight))

    compiled = [(pattern, re.compile(pattern), dict(opts)) for pattern, opts in (overrides or {}).items()]
    r_proj_re = re.compile(r_proj_pattern) if r_proj_pattern else None
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids or _matches(embedding_patterns, name):
            base = "adamw_embedding"
        elif p.ndim < 2:
            base = "adamw_other"
        elif id(p) in head_ids or _matches(head_patterns, name):
            base = "adamw_head"
        elif id(p) in input_ids:
            base = "adamw_input"
        elif r_proj_re is not None and r_proj_re.search(name):
            base = "muon_r_proj"
        else:
            base = "muon"
        options: dict[str, Any] = {}
        matched = []
        for pattern, regex, opts in compiled:
            if regex.search(name):
                options.update(opts)
                matched.append(pattern)
        use_muon = options.pop("use_muon", base.startswith("muon"))
        if use_muon != base.startswith("muon"):
            base = "muon" if use_muon else "adamw_other"
        label = base + (f"[{'|'.join(matched)}]" if matched else "")
        key = (label, _freeze(options))
        group = groups.get(key)
        if group is None:
            group = {"params": [], "use_muon": use_muon, "name": label}
            group.update((muon_options or {}) if use_muon else (adamw_options or {}))
            if base == "muon_r_proj":
                group["lr_mult"] = r_proj_lr_mult
                group.update(r_proj_options or {})
            group.update(options)
            groups[key] = group
        group["params"].append(p)

    out = list(groups.values())
    summary = routing_summary(out, tied_head=tied, names={id(p): n for n, p in model.named_parameters()})
    logger.info(summary)
    if verbose:
        print(summary)
    return out


def routing_summary(
    groups: Sequence[Mapping[str, Any]], tied_head: bool = False, names: Mapping[int, str] | None = None
) -> str:
    """One line: per optimizer kind, tensors and parameters, then each group's share and, given ``names``
    ({id(parameter): name}), its parameters' names, layer indices folded into ``*`` (``blocks.*.attn.q_proj.weight
    ×12``) and cut with "…" after ``SUMMARY_NAMES`` patterns."""

    def part(kind_is_muon: bool) -> str:
        chosen = [g for g in groups if g.get("use_muon", True) == kind_is_muon]
        tensors = sum(len(g["params"]) for g in chosen)
        numel = sum(p.numel() for g in chosen for p in g["params"])
        details = []
        for g in chosen:
            extra = f" lr×{g['lr_mult']:g}" if g.get("lr_mult", 1.0) != 1.0 else ""
            listed = f" ({_compact([names.get(id(p), '?') for p in g['params']])})" if names else ""
            details.append(f"{g.get('name', '?')} {len(g['params'])}{extra}{listed}")
        if not kind_is_muon and tied_head:
            details.append("head tied to embedding")
        return (
            f"{'Muon' if kind_is_muon else 'AdamW'} {tensors} tensors / {_count(numel)} params [{', '.join(details)}]"
        )

    return f"parallax_muon routing: {part(True)} | {part(False)}"


def _compact(names: Sequence[str]) -> str:
    folded: dict[str, list[str]] = {}
    for name in names:
        folded.setdefault(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name), []).append(name)
    counts = {(group[0] if len(group) == 1 else p): len(group) for p, group in folded.items()}
    shown = [p if n == 1 else f"{p} ×{n}" for p, n in list(counts.items())[:SUMMARY_NAMES]]
    if len(counts) > SUMMARY_NAMES:
        shown.append(f"… {len(counts) - SUMMARY_NAMES} more")
    return ", ".join(shown)


def _matches(patterns: Sequence[str], name: str) -> bool:
    return any(re.search(p, name) for p in patterns)


def _freeze(options: Mapping[str, Any]) -> tuple:
    def freeze(v):
        if isinstance(v, (list, tuple)):
            return tuple(freeze(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, freeze(x)) for k, x in v.items()))
        if isinstance(v, torch.Tensor):
            return ("tensor", id(v))
        return v

    return tuple(sorted((k, freeze(v)) for k, v in options.items()))


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)
