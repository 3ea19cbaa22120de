"""Optimizers and schedules chosen in config: Muon (with AdamW for embeddings, head, norms) or AdamW;
cosine or warmup–stable–decay (WSD) learning rates, with the paper's weight-decay annealing
λ(t) = λ·(1 − t)^γ over the decay phase.

Everything here is plain torch (no lightning), so these pieces can be reused outside the platform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

OPTIMIZERS = ("muon", "adamw")
SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "sqrt")
# What parallax_muon.Muon accepts by name (its presets and learning-rate adjustments).
NS_COEFFICIENTS = ("jordan", "polar_express")
ADJUST_LR = ("original", "match_rms_adamw", "none")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class OptimizerConfig:
    """Which optimizer and its hyper-parameters.

    name: "muon" — `parallax_muon.Muon` over `muon_param_groups(model)`: hidden matrices get Muon
        (`lr`, `momentum`, `nesterov`, `weight_decay`, `ns_*`, `adjust_lr`), embeddings, head, norms get
        AdamW (`adamw_*`); "adamw" — torch AdamW on everything with `adamw_lr`, `adamw_betas`,
        `adamw_eps`, `adamw_weight_decay` (decay on matrices only, never on norms and biases).
    """

    name: str = "muon"
    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.0
    ns_steps: int = 5
    ns_coefficients: str = "jordan"
    adjust_lr: str = "original"
    adamw_lr: float = 3e-4
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.0
    r_proj_lr_mult: float = 1.0  # Muon: learning-rate multiplier of Parallax's W_R group
    fused: bool | None = None  # AdamW's fused CUDA implementation (None: torch decides)

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

    name: str = "cosine"
    warmup_steps: float = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
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


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on the weights of linear and embedding layers (as in GPT-2), never on norms or biases.

    Decided by module type, not by `p.ndim`: FSDP flattens parameters to 1-D shards before the
    optimizer is built, and a shape test would then silently turn weight decay off.
    """
    matrices = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight is not None
    }
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


def build_optimizer(model: nn.Module, config: OptimizerConfig, verbose: bool = True) -> torch.optim.Optimizer:
    """The configured optimizer over `model`'s parameters (`verbose`: print Muon's routing summary)."""
    if config.name == "adamw":
        return torch.optim.AdamW(
            adamw_param_groups(model, config.adamw_weight_decay),
            lr=config.adamw_lr,
            betas=config.adamw_betas,
            eps=config.adamw_eps,
            fused=config.fused,
        )
    try:
        from parallax_muon import Muon, muon_param_groups
    except ImportError as err:
        raise ImportError(f"optimizer.name='muon' needs parallax_muon.Muon and muon_param_groups: {err}") from err
    return Muon(
        muon_param_groups(model, r_proj_lr_mult=config.r_proj_lr_mult, verbose=verbose),
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
