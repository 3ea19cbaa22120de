"""``Muon``: one ``torch.optim.Optimizer`` holding Muon groups (hidden matrices) and AdamW groups (the rest).

One optimizer rather than two, so Lightning's automatic optimization, gradient clipping, accumulation and LR
schedulers (which rescale ``group["lr"]``) work unchanged.

A step, for the Muon groups of the whole optimizer together:

1. ``_momentum_update`` (``buf ← lerp(buf, g, 1-μ)``; Nesterov ``u = lerp(g, buf, μ)``) and ``_decay``
   (decoupled weight decay), with ``torch._foreach_*`` over each group's tensors — no per-parameter launches;
   each parameter becomes a ``_Job`` (its ``JobKind`` says how its update travels under torch.distributed);
2. every parameter is cut into matrices (``layout.py``: whole, per head, per fused segment, per slice), and
   the matrices of all groups are bucketed by (oriented shape, ``NSSettings``); ``_orthogonalize_bucket``
   runs each bucket as one batched call (``newton_schulz.py``; Triton symmetric kernels on CUDA);
3. ``_apply_bucket``: ``p ← p − lr·ratio·O``, one ``_foreach_add_`` per (bucket, learning rate, ratio).

AdamW groups take ``torch.optim.adamw.adamw``'s step.

With the defaults, on a list of 2-D tensors, every operation and rounding is the one ``torch.optim.Muon``
performs (``adjust_lr_fn="original"``): a matrix alone in its bucket gets the same bits; in a batch of
same-shape matrices the batched matmul may sum in another order, and a rare bf16 rounding flip then moves
that matrix's update by up to ~1e-2 (relative) — the same size as the bf16 iteration's own error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from parallax_muon import distributed as pdist
from parallax_muon.layout import ADJUST_LR, Layout, adjust_lr_ratio, make_layout
from parallax_muon.newton_schulz import BACKENDS, DEFAULT_EPS, _use_triton, iterate, normalize_, resolve_coefficients


class JobKind(Enum):
    """How a parameter's update travels (see ``distributed.py``)."""

    LOCAL = "local"  # a plain tensor: this process orthogonalizes it (or its share of a split bucket)
    SHARDED = "sharded"  # a row-sharded DTensor: its rows go to an owner rank and come back orthogonalized
    GATHERED = "gathered"  # a DTensor of another placement: gathered whole on every rank
    OWNED = "owned"  # the full matrix of a SHARDED parameter, on its owner rank


class NSSettings(NamedTuple):
    """A group's Newton–Schulz settings; matrices share a bucket only when these agree."""

    per_step: tuple  # (a, b, c) per iteration
    norm_scale: float
    eps: float


class GroupStep(NamedTuple):
    """What a Muon group's parameters share in one step."""

    index: int  # in optimizer.param_groups
    lr: float  # lr·lr_mult, as scheduled this step
    adjust_lr: str
    ns: NSSettings


@dataclass
class _Job:
    """One parameter's trip through Newton–Schulz."""

    param: Tensor  # as the user holds it (maybe a DTensor)
    source: Tensor  # the momentum update, full and in parameter layout
    layout: Layout
    group: GroupStep
    split: bool = False  # its matrices may be shared out across ranks (replicated parameters)
    target: Tensor | None = None  # the parameter tensor updated in place by views (contiguous, full)
    staged: Tensor | None = None  # else: the orthogonalized update lands here (bf16, parameter layout)
    kind: JobKind = JobKind.LOCAL
    index: int = 0  # position among the sharded jobs


class _Piece(NamedTuple):
    """A run of one job's matrices inside a bucket."""

    job: _Job
    segment: int  # index into job.layout.segments
    first: int  # first matrix in the bucket's batch
    count: int
    transposed: bool  # stored as its transpose (tall matrices are orthogonalized wide)


@dataclass
class _Bucket:
    n: int
    m: int
    ns: NSSettings
    split: bool
    device: torch.device
    pieces: list[_Piece] = field(default_factory=list)
    count: int = 0


class Muon(torch.optim.Optimizer):
    r"""Muon for matrices, AdamW for everything else, in one optimizer.

    Args:
        params: tensors or param groups. A group is a Muon group unless it says ``use_muon=False``.
            ``muon_param_groups(model)`` builds the usual split (hidden matrices → Muon; embeddings, output
            head, norms, biases → AdamW).
        lr, momentum, nesterov, weight_decay: Muon groups' defaults. Weight decay is decoupled:
            ``p ← p·(1 − lr·wd)``.
        ns_steps, ns_coefficients: Newton–Schulz steps and ``"jordan"``, ``"polar_express"`` or a list of (a, b, c).
        adjust_lr: ``"original"`` (√max(1, rows/cols)), ``"match_rms_adamw"`` (0.2·√max(rows, cols)) or ``"none"``.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: AdamW groups' defaults.
        ns_eps: lower clamp on the Frobenius norm before Newton–Schulz (torch.optim.Muon's ``eps``).
        backend: ``"auto"`` (on CUDA, per bucket shape, whichever of the Triton symmetric kernels and the batched
            matmuls measured faster at its first step; batched matmuls elsewhere), ``"torch"``, ``"triton"``.
        compile_ns: run the torch Newton–Schulz path through ``torch.compile`` (compiled once per bucket shape;
            learning rates and other hyper-parameters never enter the compiled function, so changing them
            does not recompile).
        distributed: ``None`` (auto: on when torch.distributed is initialised with more than one rank),
            ``True`` or ``False``. When on, plain (replicated) parameters have their Newton–Schulz work split
            across the ranks of ``process_group``; DTensor parameters are always handled by their own mesh.
        process_group: the group the replicated parameters are shared over (default: the world).
        track_update_rms: record, per group, the RMS of the update direction (before the learning rate);
            read it with ``update_rms()``.

    Group keys (all optional; every constructor default can be overridden per group):
        Muon groups: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``ns_steps``, ``ns_coefficients``,
        ``ns_norm_scale``, ``ns_eps``, ``adjust_lr``, ``num_heads`` (orthogonalize each head's rows on their
        own: an int, or one per ``split_sizes`` segment), ``split_sizes`` (row sizes of a fused projection,
        e.g. q|k|v), ``per_slice`` (a >2-D parameter is a stack of ``shape[-2:]`` matrices instead of one
        ``(shape[0], -1)`` matrix), ``lr_mult``, ``name``.
        AdamW groups (``use_muon=False``): ``lr``, ``betas``, ``eps``, ``weight_decay``, ``lr_mult``, ``name``, and
        ``momentum``, which is β1 again: ``defaults`` names ``momentum`` so that torch's momentum-cycling schedulers
        (OneCycleLR, CyclicLR) and monitors work; a change to either key reaches the other at the next step.
        ``lr_mult`` multiplies the group's (possibly scheduled) ``lr``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients="jordan",
        adjust_lr: str = "original",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        *,
        ns_eps: float = DEFAULT_EPS,
        ns_norm_scale: float | None = None,
        backend: str = "auto",
        compile_ns: bool = False,
        distributed: bool | None = None,
        process_group=None,
        track_update_rms: bool = False,
    ) -> None:
        self._muon_defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
            "ns_coefficients": ns_coefficients,
            "ns_norm_scale": ns_norm_scale,
            "ns_eps": ns_eps,
            "adjust_lr": adjust_lr,
            "num_heads": None,
            "split_sizes": None,
            "per_slice": False,
            "lr_mult": 1.0,
        }
        self._adamw_defaults = {
            "lr": adamw_lr,
            "betas": tuple(adamw_betas) if isinstance(adamw_betas, (tuple, list)) else adamw_betas,  # checked later
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
            "lr_mult": 1.0,
        }
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None (auto), True or False, got {distributed!r}")
        self.backend = backend
        self.compile_ns = bool(compile_ns)
        self.distributed = distributed
        self.process_group = process_group
        self.track_update_rms = bool(track_update_rms)
        self._compiled_ns: Callable | None = None
        self._layouts: dict[tuple, Layout] = {}
        self._update_rms: dict[str, Tensor] = {}
        self.last_step_info: dict[str, Any] = {}
        self._beta1_seen: dict[int, Any] = {}
        # `defaults` holds the keys both kinds of group share (the Muon values): torch's schedulers and
        # monitors look there for "momentum" (or "betas") before they cycle or log it. "betas" stays out, or
        # they would write betas into Muon groups; an AdamW group carries its β1 as "momentum" too (see
        # _sync_beta1). Each group's own defaults come from its kind (add_param_group).
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "lr_mult": 1.0})

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        use_muon = param_group.setdefault("use_muon", True)
        if not isinstance(use_muon, bool):
            raise ValueError(f"use_muon must be a bool, got {use_muon!r}")
        default_betas = self._adamw_defaults["betas"]
        if not use_muon and "momentum" in param_group and "betas" not in param_group and _pair(default_betas):
            param_group["betas"] = (param_group["momentum"], default_betas[1])  # momentum given alone is β1
        for key, value in (self._muon_defaults if use_muon else self._adamw_defaults).items():
            param_group.setdefault(key, value)
        if not use_muon and _pair(param_group["betas"]):
            param_group.setdefault("momentum", param_group["betas"][0])  # before torch fills in the Muon default
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        group.setdefault("name", f"{'muon' if use_muon else 'adamw'}_{index}")
        if not use_muon:
            self._sync_beta1(index, group)
        self._validate_group(group)
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"{self._where(group, i, p)} is complex ({p.dtype}); Muon supports real parameters only"
                )
            if use_muon:
                self._layout(group, p, i)  # raises on 1-D parameters, bad num_heads / split_sizes

    def _validate_group(self, group: dict[str, Any]) -> tuple[tuple, float] | None:
        """Raise on a bad hyper-parameter; for a Muon group, return its resolved Newton–Schulz coefficients
        (``resolve_coefficients``'s (per_step, default scale)), which ``step`` hands to ``_muon_prologue``.

        Every number must be finite: an infinite lr or weight decay turns the parameters into inf/NaN at
        the first step, and NaN slips past every range check written as a comparison."""
        where = f"group {group['name']!r}"
        _real(where, "lr", group["lr"], lambda x: x >= 0.0, ">= 0")
        _real(where, "lr_mult", group["lr_mult"], lambda x: x >= 0.0, ">= 0")
        _real(where, "weight_decay", group["weight_decay"], lambda x: x >= 0.0, ">= 0")
        if group["use_muon"]:
            _real(where, "momentum", group["momentum"], lambda x: 0.0 <= x < 1.0, "in [0, 1)")
            if not isinstance(group["nesterov"], bool):
                raise TypeError(f"{where}: nesterov must be a bool, got {group['nesterov']!r}")
            if group["adjust_lr"] not in ADJUST_LR:
                raise ValueError(f"{where}: unknown adjust_lr={group['adjust_lr']!r}; expected one of {ADJUST_LR}")
            _real(where, "ns_eps", group["ns_eps"], lambda x: x > 0.0, "> 0")
            if group["ns_norm_scale"] is not None:
                _real(where, "ns_norm_scale", group["ns_norm_scale"], lambda x: x > 0.0, "> 0")
            try:
                return resolve_coefficients(group["ns_coefficients"], group["ns_steps"])
            except ValueError as e:  # an unknown preset, bad coefficients or steps: say which group
                raise ValueError(f"{where}: {e}") from None
        else:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"{where}: betas={betas!r} must be two values in [0, 1)")
            for b in betas:
                _real(where, "betas", b, lambda x: 0.0 <= x < 1.0, "in [0, 1)", shown=betas)
            _real(where, "eps", group["eps"], lambda x: x >= 0.0, ">= 0")
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, after checks that name what does not fit this optimizer (torch's own load would
        take it silently: a group's kind, its hyper-parameters and state tensors of another shape all come
        from the file, and fail at a later step, if at all, without saying which group or parameter)."""
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        self._beta1_seen = {}
        for index, group in enumerate(self.param_groups):
            if not group["use_muon"]:
                self._sync_beta1(index, group)  # a state dict saved before AdamW groups had "momentum" gets it

    def _sync_beta1(self, index: int, group: dict[str, Any]) -> None:
        """An AdamW group's β1 is both ``betas[0]`` (AdamW's key) and ``momentum`` (the key torch's schedulers
        and Lightning's LearningRateMonitor use for every group, as ``defaults`` names it). Whichever of the two
        changed since the last step (or construction) is copied to the other; both changed differently is an
        error, not a silent choice."""
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            return  # _validate_group names the bad value
        beta1 = betas[0]
        momentum = group.setdefault("momentum", beta1)
        if _differs(momentum, beta1):
            seen = self._beta1_seen.get(index, _UNSEEN)
            if not _differs(beta1, seen):  # momentum was changed (e.g. by OneCycleLR)
                group["betas"] = (momentum, betas[1])
            elif not _differs(momentum, seen):  # betas was changed
                group["momentum"] = beta1
            else:
                raise ValueError(
                    f"group {group['name']!r}: momentum={momentum!r} and betas[0]={beta1!r} are both this AdamW "
                    "group's β1 and disagree; set one of them"
                )
        self._beta1_seen[index] = group["momentum"]

    def _check_loadable(self, state_dict) -> None:
        op = "Muon.load_state_dict"
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"{op}: expected an optimizer state dict with 'state' and 'param_groups', got {found}")
        saved_groups, state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            names = [g["name"] for g in self.param_groups]
            raise ValueError(
                f"{op}: the state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)} "
                f"({names}): build the groups as they were when it was saved"
            )
        kind = {True: "a Muon", False: "an AdamW"}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
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
                    f"{op}: {where} has {len(group['params'])} parameters here but {len(saved['params'])} in "
                    "the state dict"
                )
            loaded = {**group, **saved, "params": group["params"], "name": group["name"]}
            try:  # the hyper-parameters (and, for Muon, the matrix layouts) the load would install
                self._validate_group(loaded)
                if group["use_muon"]:
                    for i, p in enumerate(group["params"]):
                        self._layout(loaded, p, i)
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
                        f"{op}: {self._where(group, i, p)} has state {found} in the state dict; "
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
                            f"{op}: {self._where(group, i, p)}: its {key} in the state dict has {got}, expected {want}"
                        )

    @staticmethod
    def _where(group, i, p) -> str:
        return f"parameter {i} (shape {tuple(p.shape)}) of group {group.get('name')!r}"

    def _layout(self, group, p: Tensor, i: int) -> Layout:
        heads = group["num_heads"]
        splits = group["split_sizes"]
        key = (
            tuple(p.shape),
            bool(group["per_slice"]),
            tuple(heads) if isinstance(heads, (list, tuple)) else heads,
            tuple(splits) if splits is not None else None,
        )
        layout = self._layouts.get(key)
        if layout is None:
            layout = make_layout(
                p.shape,
                per_slice=group["per_slice"],
                num_heads=heads,
                split_sizes=splits,
                where=self._where(group, i, p),
            )
            self._layouts[key] = layout
        return layout

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_layouts", {})
        self.__dict__.setdefault("_update_rms", {})
        self.__dict__.setdefault("_compiled_ns", None)
        self.__dict__.setdefault("last_step_info", {})
        self.__dict__.setdefault("_beta1_seen", {})

    def update_rms(self) -> dict[str, Tensor]:
        """Per group name, the RMS of the last step's update direction (``track_update_rms=True``).

        Muon groups: ratio·O, the orthogonalized update times its shape ratio (``p`` moves by lr times this).
        AdamW groups: m̂ / (√v̂ + ε). Values are 0-d tensors on the parameters' device (no host sync here).
        """
        return dict(self._update_rms)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.track_update_rms:
            self._update_rms.clear()  # in place: under torch.compile a rebound attribute was lost
        jobs: list[_Job] = []
        for gi, group in enumerate(self.param_groups):
            if not group["use_muon"]:
                self._sync_beta1(gi, group)
            coefficients = self._validate_group(group)  # hyper-parameters may have been edited since construction
            if group["use_muon"]:
                self._muon_prologue(gi, group, jobs, coefficients)
            else:
                self._adamw_step(group)
        if jobs:
            self._muon_orthogonalize_and_update(jobs)
        return loss

    def _grads(self, group) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{self._where(group, i, p)} has a sparse gradient; Muon needs dense gradients")
            if g.is_complex():
                raise RuntimeError(f"{self._where(group, i, p)} has a complex gradient ({g.dtype}); not supported")
            params.append(p)
            grads.append(g)
        return params, grads

    def _muon_prologue(self, gi: int, group, jobs: list[_Job], coefficients: tuple[tuple, float]) -> None:
        params, grads = self._grads(group)
        if not params:
            return
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        lp = [pdist.local(t) for t in params]
        lg = [pdist.local(t) for t in grads]
        lb = [pdist.local(t) for t in bufs]
        updates = _momentum_update(lb, lg, group["momentum"], group["nesterov"])
        lr = _scalar(group["lr"]) * _scalar(group["lr_mult"])
        _decay(lp, lr, group["weight_decay"])
        per_step, default_scale = coefficients  # resolved (and checked) by _validate_group this step
        scale = default_scale if group["ns_norm_scale"] is None else float(group["ns_norm_scale"])
        ns = NSSettings(per_step, scale, float(group["ns_eps"]))
        settings = GroupStep(gi, lr, group["adjust_lr"], ns)
        index_of = {id(p): i for i, p in enumerate(group["params"])}
        for p, u, l_p in zip(params, updates, lp):
            layout = self._layout(group, p, index_of[id(p)])
            jobs.append(_Job(p, u, layout, settings, target=l_p))

    def _replicated_group(self):
        """The process group plain parameters are replicated over, or None when not splitting work."""
        if self.distributed is False or not pdist.initialized():
            if self.distributed:
                raise RuntimeError("distributed=True but torch.distributed is not initialised")
            return None
        group = self.process_group
        if torch.distributed.get_world_size(group) <= 1:
            return None
        return group if group is not None else torch.distributed.group.WORLD

    def _muon_orthogonalize_and_update(self, jobs: list[_Job]) -> None:
        replicated = self._replicated_group()
        sharded: list[_Job] = []
        for job in jobs:
            if pdist.is_dtensor(job.param):
                job.kind = JobKind.SHARDED if pdist.is_row_sharded(job.param) else JobKind.GATHERED
                job.target = None
                if job.kind is JobKind.SHARDED:
                    job.index = len(sharded)
                    sharded.append(job)
                else:
                    job.source = _full_tensor(job.param, job.source)
                    job.staged = torch.empty(job.param.shape, dtype=torch.bfloat16, device=job.source.device)
            else:
                job.split = replicated is not None
                if not _viewable(job.target, job.layout):
                    job.target = None
                    job.staged = torch.empty(job.param.shape, dtype=torch.bfloat16, device=job.param.device)

        work = [j for j in jobs if j.kind is not JobKind.SHARDED]
        owned: list[_Job] = []
        if sharded:
            owned, owners, mesh_group = self._gather_sharded(sharded)
            work += owned

        buckets = self._buckets(work)
        if replicated is not None:
            pdist.check_same_plan(_plan_signature(buckets), replicated)
        rms_acc: dict[int, list] = defaultdict(lambda: [0, 0])
        rms = rms_acc if self.track_update_rms else None
        pending = None
        ns_matrices = 0
        for bucket in buckets:
            Y, handle, computed = _orthogonalize_bucket(bucket, replicated, self._iterate)
            ns_matrices += computed
            if pending is not None:
                _apply_bucket(*pending, rms)
            pending = (bucket, Y, handle)
        if pending is not None:
            _apply_bucket(*pending, rms)

        for job in jobs:
            if job.kind is JobKind.LOCAL and job.staged is not None:
                _apply_staged(pdist.local(job.param), job.staged, job.group.lr, job.layout, job.group.adjust_lr, 0)
            elif job.kind is JobKind.GATHERED:
                _apply_gathered(job)
        if sharded:
            self._scatter_sharded(sharded, owned, owners, mesh_group)

        self.last_step_info = {"ns_matrices": ns_matrices, "buckets": len(buckets)}
        if self.track_update_rms:
            for gi, (sumsq, numel) in rms_acc.items():
                self._update_rms[self.param_groups[gi]["name"]] = (sumsq / max(numel, 1)).sqrt()

    # ---- FSDP2 / Shard(0) parameters
    def _gather_sharded(self, sharded: list[_Job]):
        mesh_groups = {id(j.param.device_mesh): j.param.device_mesh for j in sharded}
        if len(mesh_groups) != 1:
            raise NotImplementedError("parallax_muon.Muon: row-sharded parameters must all live on one device mesh")
        mesh = next(iter(mesh_groups.values()))
        group = mesh.get_group()
        world = torch.distributed.get_world_size(group)
        rank = torch.distributed.get_rank(group)
        shapes = [tuple(j.param.shape) for j in sharded]
        for j, shape in zip(sharded, shapes):
            expected = pdist.row_chunks(shape[0], world)[rank]
            if j.source.shape[0] != expected:
                raise NotImplementedError(
                    f"parallax_muon.Muon: a Shard(0) parameter of shape {shape} holds {j.source.shape[0]} rows on rank "
                    f"{rank}, expected torch.chunk's {expected}"
                )
        costs = [_ns_cost(j.layout) for j in sharded]
        owners = pdist.assign_owners(costs, world)
        shards = [j.source.to(torch.bfloat16) for j in sharded]
        full = pdist.gather_rows_to_owners(shards, shapes, owners, group)
        owned = []
        for i, f in full.items():
            j = sharded[i]
            owned.append(
                _Job(
                    j.param,
                    f,
                    j.layout,
                    j.group,
                    kind=JobKind.OWNED,
                    index=i,
                    staged=torch.empty(shapes[i], dtype=torch.bfloat16, device=f.device),
                )
            )
        return owned, owners, group

    def _scatter_sharded(self, sharded: list[_Job], owned: list[_Job], owners: list[int], group) -> None:
        shapes = [tuple(j.param.shape) for j in sharded]
        full = {j.index: j.staged for j in owned}
        device = sharded[0].source.device
        local_rows = pdist.scatter_rows_from_owners(full, shapes, owners, torch.bfloat16, device, group)
        world = torch.distributed.get_world_size(group)
        rank = torch.distributed.get_rank(group)
        for j, y in zip(sharded, local_rows):
            offset = sum(pdist.row_chunks(j.param.shape[0], world)[:rank])
            _apply_staged(pdist.local(j.param), y, j.group.lr, j.layout, j.group.adjust_lr, offset)

    # ---- batching by shape
    def _buckets(self, jobs: list[_Job]) -> list[_Bucket]:
        buckets: dict[tuple, _Bucket] = {}
        for job in jobs:
            for si, seg in enumerate(job.layout.segments):
                r, c = seg.head_rows, job.layout.cols
                transposed = r > c
                n, m = (c, r) if transposed else (r, c)
                key = (n, m, job.group.ns, job.split, job.source.device)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = _Bucket(n, m, job.group.ns, job.split, job.source.device)
                count = job.layout.slices * seg.heads
                b.pieces.append(_Piece(job, si, b.count, count, transposed))
                b.count += count
        # Largest first: overlaps the biggest all-gathers with the most remaining compute.
        return sorted(buckets.values(), key=lambda b: -(b.count * b.n * b.n * b.m))

    def _iterate(self, X: Tensor, per_step) -> Tensor:
        if self.compile_ns and not _use_triton(X, self.backend, per_step):
            if self._compiled_ns is None:
                self._compiled_ns = torch.compile(_iterate_for_compile, dynamic=False)
            return self._compiled_ns(X, per_step)
        return iterate(X, per_step, backend=self.backend)

    # ------------------------------------------------------------------ AdamW groups
    def _adamw_step(self, group) -> None:
        params, grads = self._grads(group)
        if not params:
            return
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        lp = [pdist.local(t) for t in params]
        lg = [pdist.local(t) for t in grads]
        lm = [pdist.local(t) for t in exp_avgs]
        lv = [pdist.local(t) for t in exp_avg_sqs]
        beta1, beta2 = group["betas"]
        lr = _scalar(group["lr"]) * _scalar(group["lr_mult"])
        # torch.optim.AdamW's own step through its public functional form: foreach and, in eager mode, not
        # capturable (the same bits as torch.optim.AdamW). Compiled, it is capturable, as torch.compile makes
        # torch's own optimizers: the step counts are then read on the device, with no host sync, and so
        # must live there.
        capturable = torch.compiler.is_compiling()
        if capturable:
            for i, (p, t) in enumerate(zip(params, steps)):
                if t.device != lp[i].device:
                    steps[i] = self.state[p]["step"] = t.to(lp[i].device)
        adamw(
            lp,
            lg,
            lm,
            lv,
            [],
            steps,
            foreach=True,
            capturable=capturable,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        if self.track_update_rms:  # m̂ / (√v̂ + ε), from the tensors: no host sync
            sumsq, numel = 0, 0
            for m, v, t in zip(lm, lv, steps):
                t = t.to(m.device)
                direction = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                sumsq = sumsq + direction.float().square().sum()
                numel += direction.numel()
            self._update_rms[group["name"]] = (sumsq / max(numel, 1)).sqrt()


# ---------------------------------------------------------------------- the Muon step's pieces
def _momentum_update(bufs: list[Tensor], grads: list[Tensor], momentum: float, nesterov: bool) -> list[Tensor]:
    """buf ← lerp(buf, g, 1−μ) in place; the update is lerp(g, buf, μ) with Nesterov, else buf itself."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    return torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs


def _decay(params: list[Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled weight decay: p ← p·(1 − lr·wd)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)


def _orthogonalize_bucket(bucket: _Bucket, replicated, iterate_fn: Callable[[Tensor, tuple], Tensor]):
    """Copy the bucket's matrices (this rank's share of them when split) into one bf16 batch, normalize and
    iterate it; (the whole batch, the pending all-gather or None, how many matrices this rank computed)."""
    N, n, m = bucket.count, bucket.n, bucket.m
    if bucket.split and replicated is not None:
        world = torch.distributed.get_world_size(replicated)
        rank = torch.distributed.get_rank(replicated)
        per_rank, start, stop = pdist.split_range(N, world, rank)
    else:
        world, per_rank, start, stop = 1, N, 0, N
    X = torch.empty(N, n, m, dtype=torch.bfloat16, device=bucket.device)
    dsts, srcs = [], []
    for job, si, first, count, transposed in bucket.pieces:
        if first + count <= start or first >= stop:
            continue  # none of this piece's matrices are ours to orthogonalize
        src = job.layout.views(job.source, allow_copy=True)[si]
        dsts.append(X[first : first + count].view(src.shape[0], src.shape[1], n, m))
        srcs.append(src.mT if transposed else src)
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    own = X[start:stop]
    if own.shape[0] > 0:
        normalize_(own, bucket.ns.norm_scale, bucket.ns.eps)
        own = iterate_fn(own, bucket.ns.per_step)
    if world == 1:
        return own, None, stop - start
    padded = own if own.shape[0] == per_rank else torch.cat([own, own.new_zeros(per_rank - own.shape[0], n, m)])
    Y = X.new_empty(per_rank * world, n, m)
    handle = pdist.all_gather_batch(padded, Y, replicated, async_op=True)
    return Y, handle, stop - start


def _apply_bucket(bucket: _Bucket, Y: Tensor, handle, rms_acc: dict | None) -> None:
    """p ← p − lr·ratio·O for the bucket's parameters held whole (one ``_foreach_add_`` per step size), else
    into their staging buffers; adds each group's squared update norm to ``rms_acc`` when given."""
    if handle is not None:
        handle.wait()
    n, m = bucket.n, bucket.m
    direct: dict[float, tuple[list, list]] = defaultdict(lambda: ([], []))
    staged_dst, staged_src = [], []
    weights = [] if rms_acc is not None else None
    for job, si, first, count, transposed in bucket.pieces:
        seg = job.layout.segments[si]
        ratio = adjust_lr_ratio(job.group.adjust_lr, seg.head_rows, job.layout.cols)
        S = job.layout.slices
        y = Y[first : first + count].view(S, seg.heads, n, m)
        y = y.mT if transposed else y
        if job.target is not None:
            tgt, src = direct[-job.group.lr * ratio]
            tgt.append(job.layout.views(job.target)[si])
            src.append(y)
        else:
            staged_dst.append(job.layout.views(job.staged)[si])
            staged_src.append(y)
        if weights is not None:
            weights.append((job.group.index, first, count, ratio, count * n * m))
    for alpha, (tgt, src) in direct.items():
        torch._foreach_add_(tgt, src, alpha=alpha)
    if staged_dst:
        torch._foreach_copy_(staged_dst, staged_src)
    if weights:
        sq = Y[: bucket.count].float().square().sum(dim=(-2, -1))
        for gi, first, count, ratio, numel in weights:
            acc = rms_acc[gi]
            acc[0] = acc[0] + sq[first : first + count].sum() * (ratio * ratio)
            acc[1] += numel


# ---------------------------------------------------------------------- helpers
def _iterate_for_compile(X: Tensor, per_step) -> Tensor:
    return iterate(X, per_step, backend="torch")


_UNSEEN = object()


def _pair(betas) -> bool:
    return isinstance(betas, (tuple, list)) and len(betas) == 2


def _differs(a, b) -> bool:
    """Two hyper-parameter values differ (tensors by identity: comparing their values would sync the device)."""
    if a is b:
        return False
    if isinstance(a, Tensor) or isinstance(b, Tensor) or a is _UNSEEN or b is _UNSEEN:
        return True
    return a != b


def _scalar(v) -> float:
    return float(v) if isinstance(v, Tensor) else v


def _real(where: str, key: str, value, ok: Callable[[float], bool], rule: str, shown=None) -> float:
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


def _viewable(t: Tensor, layout: Layout) -> bool:
    try:
        t.view(layout.slices, layout.rows, layout.cols)
    except RuntimeError:
        return False
    return True


def _ns_cost(layout: Layout) -> float:
    total = 0.0
    for s in layout.segments:
        n, m = sorted((s.head_rows, layout.cols))
        total += layout.slices * s.heads * (2 * n * n * m + n**3)
    return total


def _plan_signature(buckets: list[_Bucket]) -> str:
    # Only the buckets shared out across ranks must agree; owned (FSDP) buckets differ by design.
    return ";".join(f"{b.n}x{b.m}x{b.count}:{len(b.ns.per_step)}" for b in buckets if b.split)


def _apply_staged(p: Tensor, Y: Tensor, lr: float, layout: Layout, adjust_lr: str, row_offset: int) -> None:
    """p ← p − lr·ratio·Y for a parameter (or its rows [row_offset, …) when sharded) from a staged update."""
    scale = layout.row_scale(adjust_lr)
    if scale is None:
        seg = layout.segments[0]
        p.add_(Y, alpha=-lr * adjust_lr_ratio(adjust_lr, seg.head_rows, layout.cols))
        return
    scale = scale.to(p.device)
    rows_on_dim0 = not layout.per_slice or len(layout.shape) == 2
    if rows_on_dim0:
        scale = scale[row_offset : row_offset + p.shape[0]].view(p.shape[0], *([1] * (p.ndim - 1)))
    p.add_(Y * scale, alpha=-lr)


def _full_tensor(param, local_update: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    d = DTensor.from_local(local_update, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return d.full_tensor()


def _apply_gathered(job: _Job) -> None:
    """A DTensor with a placement other than Shard(0): every rank computed the whole update; keep its part."""
    from torch.distributed.tensor import distribute_tensor

    scale = job.layout.row_scale(job.group.adjust_lr)
    mesh, placements = job.param.device_mesh, job.param.placements
    if scale is None:  # one ratio: the same `add_(Y, alpha=-lr·ratio)` as a single process performs
        seg = job.layout.segments[0]
        part = distribute_tensor(job.staged, mesh, placements, src_data_rank=None).to_local()
        pdist.local(job.param).add_(
            part, alpha=-job.group.lr * adjust_lr_ratio(job.group.adjust_lr, seg.head_rows, job.layout.cols)
        )
        return
    shape = (job.layout.slices, job.layout.rows, job.layout.cols)
    update = (job.staged.float().view(shape) * scale.to(job.staged.device)).view(job.param.shape)
    part = distribute_tensor(update, mesh, placements, src_data_rank=None).to_local()
    pdist.local(job.param).add_(part, alpha=-job.group.lr)
