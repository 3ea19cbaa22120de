"""Optimizers and schedules chosen in config: Muon (with AdamW for embeddings, head, norms) or AdamW;
cosine or warmup–stable–decay (WSD) learning rates, with the paper's weight-decay annealing
λ(t) = λ·(1 − t)^γ over the decay phase.

Everything here is plain torch (no lightning), so these pieces can be reused outside the platform.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

# Literal types: the CLI (jsonargparse) rejects any other value when it parses, listing these; the
# dataclasses check them again for Python callers.
OptimizerName = Literal["muon", "adamw"]
ScheduleName = Literal["cosine", "wsd", "constant"]
DecayShape = Literal["linear", "cosine", "sqrt"]
# What parallax_muon.Muon accepts by name (its presets and learning-rate adjustments).
NSCoefficients = Literal["jordan", "polar_express"]
AdjustLR = Literal["original", "match_rms_adamw", "none"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
ROUTES = OPTIMIZERS
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
DECAY_SHAPES: tuple[str, ...] = get_args(DecayShape)
NS_COEFFICIENTS: tuple[str, ...] = get_args(NSCoefficients)
ADJUST_LR: tuple[str, ...] = get_args(AdjustLR)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class OptimizerConfig:
    """Which optimizer and its hyper-parameters.

    name: "muon" — `parallax_muon.Muon` over `muon_param_groups(model)`: hidden matrices get Muon
        (`lr`, `momentum`, `nesterov`, `weight_decay`, `ns_*`, `adjust_lr`), embeddings, head, norms get
        AdamW (`adamw_*`); "adamw" — torch AdamW on everything with `adamw_lr`, `adamw_betas`,
        `adamw_eps`, `adamw_weight_decay` (decay on matrices only, never on norms and biases).
        Under both, `adamw_weight_decay` applies to the weights of linear and embedding layers only.
    route: {regex: "muon" | "adamw"} — send the parameters whose names match (`re.search`; later entries win)
        to that optimizer whatever `name` says, e.g. `{"r_proj": "adamw"}` under Muon, or
        `{"r_proj": "muon"}` under AdamW (then the optimizer is Muon holding AdamW groups for every other
        parameter, at the AdamW settings above). Routed parameters take the settings of the optimizer they go to.
        Every regex must match at least one parameter; only matrices can go to Muon.
    """

    name: OptimizerName = "muon"
    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.0
    ns_steps: int = 5
    ns_coefficients: NSCoefficients = "jordan"
    adjust_lr: AdjustLR = "original"
    adamw_lr: float = 3e-4
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.0
    r_proj_lr_mult: float = 1.0  # Muon: learning-rate multiplier of Parallax's W_R group
    fused: bool | None = None  # AdamW's fused CUDA implementation (None: torch decides)
    route: dict[str, OptimizerName] | None = None  # parameter-name regex -> optimizer (see the docstring)

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name must be one of {OPTIMIZERS}, got {self.name!r}")
        for field in ("lr", "adamw_lr"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"OptimizerConfig.{field} must be a finite positive number, got {value!r}")
        for field in ("weight_decay", "adamw_weight_decay", "adamw_eps", "r_proj_lr_mult"):
            value = getattr(self, field)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"OptimizerConfig.{field} must be a finite number >= 0, got {value!r}")
        # Muon checks its hyper-parameters only when it is built, inside the trainer; checked here, a bad
        # value fails before any run starts.
        if not (_is_number(self.momentum) and 0.0 <= self.momentum < 1.0):
            raise ValueError(f"OptimizerConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"OptimizerConfig.nesterov must be true or false, got {self.nesterov!r}")
        if not (isinstance(self.ns_steps, int) and not isinstance(self.ns_steps, bool) and self.ns_steps >= 1):
            raise ValueError(f"OptimizerConfig.ns_steps must be an integer >= 1, got {self.ns_steps!r}")
        if self.ns_coefficients not in NS_COEFFICIENTS:
            raise ValueError(
                f"OptimizerConfig.ns_coefficients must be one of {NS_COEFFICIENTS}, got {self.ns_coefficients!r}"
            )
        if self.adjust_lr not in ADJUST_LR:
            raise ValueError(f"OptimizerConfig.adjust_lr must be one of {ADJUST_LR}, got {self.adjust_lr!r}")
        betas = tuple(self.adamw_betas)
        if len(betas) != 2 or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"OptimizerConfig.adamw_betas must be two numbers in [0, 1), got {self.adamw_betas!r}")
        self.adamw_betas = betas
        if self.route is not None:
            if not isinstance(self.route, dict):
                raise ValueError(f"OptimizerConfig.route must map regexes to 'muon'/'adamw', got {self.route!r}")
            for pattern, target in self.route.items():
                if target not in ROUTES:
                    raise ValueError(f"OptimizerConfig.route[{pattern!r}] must be one of {ROUTES}, got {target!r}")
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    raise ValueError(f"OptimizerConfig.route: {pattern!r} is not a valid regex ({err})") from err


@dataclass
class ScheduleConfig:
    """Learning-rate (and weight-decay) schedule, stepped once per optimizer step.

    name: "cosine" (warmup, then cosine from 1 to min_lr_ratio), "wsd" (warmup, constant, then decay over the
        last `decay_fraction` of training with `decay_shape`), or "constant" (warmup, then 1).
    warmup_steps: linear warmup from 0 (an int), or a fraction of training when < 1.
    total_steps: length of training; None = trainer.max_steps.
    wd_anneal_gamma: if set, every group's weight decay follows λ·(1 − t)^γ during the decay phase, t going
        0 → 1 (WSD: the final decay; cosine: everything after warmup). The paper's fix for WSD decay.
    """

    name: ScheduleName = "cosine"
    warmup_steps: float = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    decay_fraction: float = 0.2
    decay_shape: DecayShape = "linear"
    wd_anneal_gamma: float | None = None

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"ScheduleConfig.name must be one of {SCHEDULES}, got {self.name!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"ScheduleConfig.decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"ScheduleConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"ScheduleConfig.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0:
            raise ValueError(f"ScheduleConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.wd_anneal_gamma is not None and self.wd_anneal_gamma < 0:
            raise ValueError(f"ScheduleConfig.wd_anneal_gamma must be >= 0, got {self.wd_anneal_gamma}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"ScheduleConfig.total_steps must be positive, got {self.total_steps}")


class Schedule:
    """Multipliers at optimizer step s (0-based): `lr_factor(s)` and `wd_factor(s)`.

    Holds plain numbers only, so schedulers built on it save into weights-only checkpoints.
    """

    def __init__(self, config: ScheduleConfig, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"the schedule needs a positive number of steps, got total_steps={total_steps}")
        self.name = config.name
        self.total = int(total_steps)
        w = config.warmup_steps
        self.warmup = round(w * total_steps) if 0 < w < 1 else int(w)
        if self.warmup >= self.total and self.name != "constant":
            raise ValueError(f"warmup_steps={self.warmup} must be shorter than training ({self.total} steps)")
        self.min_lr_ratio = config.min_lr_ratio
        self.decay_shape = config.decay_shape
        self.gamma = config.wd_anneal_gamma
        if self.name == "wsd":
            decay = round(config.decay_fraction * self.total)
            self.decay_start = max(self.warmup, self.total - decay)
        elif self.name == "cosine":
            self.decay_start = self.warmup
        else:
            self.decay_start = self.total

    def decay_progress(self, step: int) -> float | None:
        """t in [0, 1] inside the decay phase, None before it."""
        if step < self.decay_start or self.decay_start >= self.total:
            return None
        return min(1.0, (step - self.decay_start) / max(1, self.total - self.decay_start))

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = self.decay_progress(step)
        if t is None:
            return 1.0
        if self.name == "cosine" or self.decay_shape == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * t))
        elif self.decay_shape == "sqrt":
            shape = 1 - math.sqrt(t)
        else:
            shape = 1 - t
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape

    def wd_factor(self, step: int) -> float:
        t = self.decay_progress(step)
        if self.gamma is None or t is None:
            return 1.0
        return (1 - t) ** self.gamma

    def __call__(self, step: int) -> float:  # the LambdaLR protocol
        return self.lr_factor(step)


class ScheduledLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose step also anneals each group's `weight_decay` from its initial value."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1):
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group.get("weight_decay", 0.0))
        self.schedule = schedule
        super().__init__(optimizer, schedule, last_epoch=last_epoch)

    def step(self, epoch=None):
        super().step() if epoch is None else super().step(epoch)
        factor = self.schedule.wd_factor(self.last_epoch)
        for group in self.optimizer.param_groups:
            if "weight_decay" in group:
                group["weight_decay"] = group["initial_weight_decay"] * factor

    def state_dict(self):
        # Only the counters belong in the checkpoint: the schedule is rebuilt from the config on resume
        # (so extending max_steps extends the schedule), and plain numbers keep checkpoints weights-only.
        state = super().state_dict()
        state.pop("schedule", None)
        state.pop("lr_lambdas", None)
        return state

    def load_state_dict(self, state_dict):
        state_dict = {k: v for k, v in state_dict.items() if k not in ("schedule", "lr_lambdas")}
        self.__dict__.update(state_dict)


def _decayed_ids(model: nn.Module) -> set[int]:
    """The weights of linear and embedding layers: the parameters weight decay applies to."""
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight is not None}


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on the weights of linear and embedding layers (as in GPT-2), never on norms or biases.

    Decided by module type, not by `p.ndim`: FSDP flattens parameters to 1-D shards before the
    optimizer is built, and a shape test would then silently turn weight decay off.
    """
    matrices = _decayed_ids(model)
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if id(p) in matrices else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _separate_names(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters by name; a fused q | r | k | v weight is listed under its parts' names (what routes
    are written against), each part standing in with the fused tensor's dimensionality."""
    names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fused = model.fused_weights() if callable(getattr(model, "fused_weights", None)) else {}
    if not fused:
        return names
    params = dict(names)
    out = [(n, p) for n, p in names if n not in fused]
    for fused_name, parts in fused.items():
        out += [(part, params[fused_name]) for part, _ in parts]
    return out


def _check_route(model: nn.Module, route: dict[str, str]) -> None:
    """Every regex matches a parameter; nothing 1-D goes to Muon (it orthogonalizes matrices)."""
    names = _separate_names(model)
    for pattern in route:
        hits = [(n, p) for n, p in names if re.search(pattern, n)]
        if not hits:
            shown = ", ".join(n for n, _ in names[:6])
            raise ValueError(
                f"optimizer.route: {pattern!r} matches no parameter of the model (names look like: {shown}, ...)"
            )
    final = {}
    for n, p in names:
        for pattern, target in route.items():
            if re.search(pattern, n):
                final[n] = (pattern, target, p)
    for n, (pattern, target, p) in final.items():
        if target == "muon" and p.ndim < 2:
            raise ValueError(
                f"optimizer.route: {pattern!r} sends {n} (shape {tuple(p.shape)}) to Muon, which updates matrices "
                "only; narrow the regex (e.g. end it with 'weight$')"
            )


def _route_overrides(config: OptimizerConfig) -> dict[str, dict]:
    overrides: dict[str, dict] = {}
    if config.name == "adamw":
        overrides[r"^"] = {"use_muon": False}  # everything on AdamW unless a route says Muon
    for pattern, target in (config.route or {}).items():
        overrides[pattern] = {"use_muon": target == "muon"}
    return overrides


def muon_groups(model: nn.Module, config: OptimizerConfig, verbose: bool = False) -> list[dict]:
    """`muon_param_groups` as configured, routes applied. A fused q | r | k | v weight (DecoderConfig.fused_qkvr)
    is routed as its separate parts would be, one Newton-Schulz block per part; a routing that the parts do not
    share raises ValueError (call this before a run starts to fail early)."""
    from parallax_muon import muon_param_groups

    routes = _route_overrides(config)

    def groups_for(module: nn.Module, extra_overrides=None, verbose: bool = False) -> list[dict]:
        overrides = {**routes, **(extra_overrides or {})}  # later patterns win: the fused weight's own last
        return muon_param_groups(
            module, overrides=overrides or None, r_proj_lr_mult=config.r_proj_lr_mult, verbose=verbose
        )

    muon_overrides = getattr(model, "muon_overrides", None)
    fused = muon_overrides(groups_for) if callable(muon_overrides) else {}
    return groups_for(model, fused or None, verbose)


def _routed_groups(model: nn.Module, config: OptimizerConfig, verbose: bool) -> list[dict]:
    """Muon's param groups with config.route applied, AdamW groups split so that decay follows the layer type
    exactly as under name="adamw" (linear and embedding weights at adamw_weight_decay, the rest at 0)."""
    decayed = _decayed_ids(model)
    out = []
    for group in muon_groups(model, config, verbose):
        if group["use_muon"]:
            out.append(group)
            continue
        for suffix, wd, keep in (("", config.adamw_weight_decay, True), ("/no_decay", 0.0, False)):
            params = [p for p in group["params"] if (id(p) in decayed) == keep]
            if params:
                out.append({**group, "params": params, "weight_decay": wd, "name": group["name"] + suffix})
    return out


def build_optimizer(model: nn.Module, config: OptimizerConfig, verbose: bool = True) -> torch.optim.Optimizer:
    """The configured optimizer over `model`'s parameters (`verbose`: print Muon's routing summary)."""
    route = config.route or {}
    _check_route(model, route)
    if config.name == "adamw" and "muon" not in route.values():
        return torch.optim.AdamW(
            adamw_param_groups(model, config.adamw_weight_decay),
            lr=config.adamw_lr,
            betas=config.adamw_betas,
            eps=config.adamw_eps,
            fused=config.fused,
        )
    try:
        from parallax_muon import Muon
    except ImportError as err:
        raise ImportError(f"Muon (optimizer.name='muon' or a route to it) needs parallax_muon: {err}") from err
    return Muon(
        _routed_groups(model, config, verbose),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        ns_steps=config.ns_steps,
        ns_coefficients=config.ns_coefficients,
        adjust_lr=config.adjust_lr,
        adamw_lr=config.adamw_lr,
        adamw_betas=config.adamw_betas,
        adamw_eps=config.adamw_eps,
        adamw_weight_decay=config.adamw_weight_decay,
    )
