"""A Muon optimizer's hyper-parameters: each group's checks, a state dict's fit, and the small value helpers.

Every number must be finite: an infinite lr or weight decay turns the parameters into inf/NaN at the first
step, and NaN slips past every range check written as a comparison. Errors name the group, key and value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from parallax_muon.layout import ADJUST_LR
from parallax_muon.newton_schulz import resolve_coefficients


def describe_param(group: dict[str, Any], i: int, p: Tensor) -> str:
    return f"parameter {i} (shape {tuple(p.shape)}) of group {group.get('name')!r}"


def group_lr(group: dict[str, Any]) -> float:
    """The step's learning rate: the (possibly scheduled) ``lr`` times ``lr_mult``."""
    return scalar(group["lr"]) * scalar(group["lr_mult"])


def validate_group(group: dict[str, Any]) -> tuple[tuple, float] | None:
    """Raise on a bad hyper-parameter; for a Muon group, return its resolved Newton–Schulz coefficients
    (``resolve_coefficients``'s (per_step, default scale)), which ``Muon.step`` uses for that step."""
    where = f"group {group['name']!r}"
    real(where, "lr", group["lr"], lambda x: x >= 0.0, ">= 0")
    real(where, "lr_mult", group["lr_mult"], lambda x: x >= 0.0, ">= 0")
    real(where, "weight_decay", group["weight_decay"], lambda x: x >= 0.0, ">= 0")
    if group["use_muon"]:
        real(where, "momentum", group["momentum"], lambda x: 0.0 <= x < 1.0, "in [0, 1)")
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"{where}: nesterov must be a bool, got {group['nesterov']!r}")
        if group["adjust_lr"] not in ADJUST_LR:
            raise ValueError(f"{where}: unknown adjust_lr={group['adjust_lr']!r}; expected one of {ADJUST_LR}")
        real(where, "ns_eps", group["ns_eps"], lambda x: x > 0.0, "> 0")
        if group["ns_norm_scale"] is not None:
            real(where, "ns_norm_scale", group["ns_norm_scale"], lambda x: x > 0.0, "> 0")
        try:
            return resolve_coefficients(group["ns_coefficients"], group["ns_steps"])
        except ValueError as e:  # an unknown preset, bad coefficients or steps: say which group
            raise ValueError(f"{where}: {e}") from None
    else:
        betas = group["betas"]
        if not pair(betas):
            raise ValueError(f"{where}: betas={betas!r} must be two values in [0, 1)")
        for b in betas:
            real(where, "betas", b, lambda x: 0.0 <= x < 1.0, "in [0, 1)", shown=betas)
        real(where, "eps", group["eps"], lambda x: x >= 0.0, ">= 0")
    return None


def check_state_dict(
    state_dict, param_groups: list[dict[str, Any]], check_group: Callable[[dict[str, Any]], None]
) -> None:
    """Raise, naming the group or parameter, on what in ``state_dict`` does not fit ``param_groups``: the count
    and kind of groups, their hyper-parameters (``check_group`` validates a group as the load would install it)
    and the shapes and keys of each parameter's state."""
    op = "Muon.load_state_dict"
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"{op}: expected an optimizer state dict with 'state' and 'param_groups', got {found}")
    saved_groups, state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(param_groups):
        names = [g["name"] for g in param_groups]
        raise ValueError(
            f"{op}: the state dict has {len(saved_groups)} param groups, this optimizer {len(param_groups)} "
            f"({names}): build the groups as they were when it was saved"
        )
    kind = {True: "a Muon", False: "an AdamW"}
    for gi, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        where = f"group {gi} ({group['name']!r})"
        use_muon = saved.get("use_muon", True)
        if use_muon is not group["use_muon"]:
            raise ValueError(
                f"{op}: {where} is {kind[group['use_muon']]} group here but the state dict's group {gi} "
                f"({saved.get('name')!r}) is {kind.get(use_muon, repr(use_muon))} group: build the groups in the "
                "order they were saved in"
            )
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{op}: {where} has {len(group['params'])} parameters here but {len(saved['params'])} in the state dict"
            )
        loaded = {**group, **saved, "params": group["params"], "name": group["name"]}
        try:  # the hyper-parameters (and, for Muon, the matrix layouts) the load would install
            check_group(loaded)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{op}: {e}") from None
        keys = ("momentum_buffer",) if group["use_muon"] else ("step", "exp_avg", "exp_avg_sq")
        for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            entry = state.get(pid)
            if entry is None or (isinstance(entry, dict) and not entry):
                continue  # a parameter that has not been stepped yet
            if not isinstance(entry, dict) or set(entry) != set(keys):
                found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise ValueError(
                    f"{op}: {describe_param(group, i, p)} has state {found} in the state dict; "
                    f"{kind[group['use_muon']]} group keeps {list(keys)}"
                )
            for key in keys:
                value = entry[key]
                if key == "step":
                    fits = isinstance(value, Tensor) and value.numel() == 1
                    want = "a one-element tensor"
                else:
                    fits = isinstance(value, Tensor) and value.shape == p.shape
                    want = f"the parameter's shape {tuple(p.shape)}"
                if not fits:
                    got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(
                        f"{op}: {describe_param(group, i, p)}: its {key} in the state dict has {got}, expected {want}"
                    )


UNSEEN = object()


def pair(betas) -> bool:
    return isinstance(betas, (tuple, list)) and len(betas) == 2


def differs(a, b) -> bool:
    """Two hyper-parameter values differ (tensors by identity: comparing their values would sync the device)."""
    if a is b:
        return False
    if isinstance(a, Tensor) or isinstance(b, Tensor) or a is UNSEEN or b is UNSEEN:
        return True
    return a != b


def scalar(v) -> float:
    return float(v) if isinstance(v, Tensor) else v


def real(where: str, key: str, value, ok: Callable[[float], bool], rule: str, shown=None) -> float:
    """`value` (a number or a one-element tensor) as a float, if finite and `ok`; else an error naming
    `key` and the value (`shown`, when the value is one entry of it)."""
    shown = value if shown is None else shown
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"{where}: {key} must be a real number or a one-element tensor, got {shown!r}")
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {key} must be a real number, got {shown!r}")
    # finite ⇔ value − value == 0 (inf − inf and NaN are NaN): unlike math.isfinite, this traces under
    # torch.compile when the scheduled lr has become a symbolic float
    if not (value - value == 0 and ok(value)):
        raise ValueError(f"{where}: {key}={shown} must be {rule} and finite")
    return float(value)
