"""``Muon``: one ``torch.optim.Optimizer`` holding Muon groups (hidden matrices) and AdamW groups (the rest).

One optimizer rather than two, so Lightning's automatic optimization, gradient clipping, accumulation and LR
schedulers (which rescale ``group["lr"]``) work unchanged. This file is the optimizer's state and the order
of a step; the step's pieces live by responsibility:

- ``step.py``: the Muon step as pure functions (momentum and decay, bucketing, orthogonalizing a bucket,
  applying the update) over typed records (``JobKind``, ``NSSettings``, ``GroupStep``, ``Job``, ``Bucket``);
- ``distributed.py``: the collectives (replicated work split across ranks, rows to owners and back);
- ``dtensor.py``: DTensor parameters' trips (FSDP2 row shards to an owner rank; other placements gathered);
- ``hyperparams.py``: each group's checks and a state dict's fit; ``layout.py``: parameters cut into matrices.

AdamW groups take ``torch.optim.adamw.adamw``'s step.

With the defaults, on a list of 2-D tensors, every operation and rounding is the one ``torch.optim.Muon``
performs (``adjust_lr_fn="original"``): a matrix alone in its bucket gets the same bits; in a batch of
same-shape matrices the batched matmul may sum in another order, and a rare bf16 rounding flip then moves
that matrix's update by up to ~1e-2 (relative) — the same size as the bf16 iteration's own error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from parallax_muon import distributed as pdist
from parallax_muon import dtensor
from parallax_muon.hyperparams import (
    UNSEEN,
    check_state_dict,
    describe_param,
    differs,
    group_lr,
    pair,
    validate_group,
)
from parallax_muon.layout import Layout, make_layout
from parallax_muon.newton_schulz import BACKENDS, DEFAULT_EPS, _use_triton, iterate
from parallax_muon.step import (
    GroupStep,
    Job,
    JobKind,
    NSSettings,
    apply_bucket,
    apply_staged,
    decay,
    make_buckets,
    momentum_update,
    orthogonalize_bucket,
    plan_signature,
    viewable,
)


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
        if not use_muon and "momentum" in param_group and "betas" not in param_group and pair(default_betas):
            param_group["betas"] = (param_group["momentum"], default_betas[1])  # momentum given alone is β1
        for key, value in (self._muon_defaults if use_muon else self._adamw_defaults).items():
            param_group.setdefault(key, value)
        if not use_muon and pair(param_group["betas"]):
            param_group.setdefault("momentum", param_group["betas"][0])  # before torch fills in the Muon default
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        group.setdefault("name", f"{'muon' if use_muon else 'adamw'}_{index}")
        if not use_muon:
            self._sync_beta1(index, group)
        validate_group(group)
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"{describe_param(group, i, p)} is complex ({p.dtype}); Muon supports real parameters only"
                )
            if use_muon:
                self._layout(group, p, i)  # raises on 1-D parameters, bad num_heads / split_sizes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, after checks that name what does not fit this optimizer (torch's own load would
        take it silently: a group's kind, its hyper-parameters and state tensors of another shape all come
        from the file, and fail at a later step, if at all, without saying which group or parameter)."""
        check_state_dict(state_dict, self.param_groups, self._check_group)
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
        if not pair(betas):
            return  # validate_group names the bad value
        beta1 = betas[0]
        momentum = group.setdefault("momentum", beta1)
        if differs(momentum, beta1):
            seen = self._beta1_seen.get(index, UNSEEN)
            if not differs(beta1, seen):  # momentum was changed (e.g. by OneCycleLR)
                group["betas"] = (momentum, betas[1])
            elif not differs(momentum, seen):  # betas was changed
                group["momentum"] = beta1
            else:
                raise ValueError(
                    f"group {group['name']!r}: momentum={momentum!r} and betas[0]={beta1!r} are both this AdamW "
                    "group's β1 and disagree; set one of them"
                )
        self._beta1_seen[index] = group["momentum"]

    def _check_group(self, group: dict[str, Any]) -> None:
        """A group as a load would install it: its hyper-parameters and, for Muon, its parameters' layouts."""
        validate_group(group)
        if group["use_muon"]:
            for i, p in enumerate(group["params"]):
                self._layout(group, p, i)

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
                where=describe_param(group, i, p),
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
        jobs: list[Job] = []
        for gi, group in enumerate(self.param_groups):
            if not group["use_muon"]:
                self._sync_beta1(gi, group)
            coefficients = validate_group(group)  # hyper-parameters may have been edited since construction
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
                raise RuntimeError(f"{describe_param(group, i, p)} has a sparse gradient; Muon needs dense gradients")
            if g.is_complex():
                raise RuntimeError(f"{describe_param(group, i, p)} has a complex gradient ({g.dtype}); not supported")
            params.append(p)
            grads.append(g)
        return params, grads

    def _muon_prologue(self, gi: int, group, jobs: list[Job], coefficients: tuple[tuple, float]) -> None:
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
        updates = momentum_update(lb, lg, group["momentum"], group["nesterov"])
        lr = group_lr(group)
        decay(lp, lr, group["weight_decay"])
        per_step, default_scale = coefficients  # resolved (and checked) by validate_group this step
        scale = default_scale if group["ns_norm_scale"] is None else float(group["ns_norm_scale"])
        ns = NSSettings(per_step, scale, float(group["ns_eps"]))
        settings = GroupStep(gi, lr, group["adjust_lr"], ns)
        index_of = {id(p): i for i, p in enumerate(group["params"])}
        for p, u, l_p in zip(params, updates, lp):
            layout = self._layout(group, p, index_of[id(p)])
            jobs.append(Job(p, u, layout, settings, target=l_p))

    def _muon_orthogonalize_and_update(self, jobs: list[Job]) -> None:
        replicated = pdist.replicated_group(self.distributed, self.process_group)
        sharded: list[Job] = []
        for job in jobs:
            if pdist.is_dtensor(job.param):
                dtensor.classify(job)
                if job.kind is JobKind.SHARDED:
                    job.index = len(sharded)
                    sharded.append(job)
            else:
                job.split = replicated is not None
                if not viewable(job.target, job.layout):
                    job.target = None
                    job.staged = torch.empty(job.param.shape, dtype=torch.bfloat16, device=job.param.device)

        work = [j for j in jobs if j.kind is not JobKind.SHARDED]
        owned: list[Job] = []
        if sharded:
            owned, owners, mesh_group = dtensor.gather_sharded(sharded)
            work += owned

        buckets = make_buckets(work)
        if replicated is not None:
            pdist.check_same_plan(plan_signature(buckets), replicated)
        rms_acc: dict[int, list] = defaultdict(lambda: [0, 0])
        rms = rms_acc if self.track_update_rms else None
        pending = None
        ns_matrices = 0
        for bucket in buckets:
            Y, handle, computed = orthogonalize_bucket(bucket, replicated, self._iterate)
            ns_matrices += computed
            if pending is not None:
                apply_bucket(*pending, rms)
            pending = (bucket, Y, handle)
        if pending is not None:
            apply_bucket(*pending, rms)

        for job in jobs:
            if job.kind is JobKind.LOCAL and job.staged is not None:
                apply_staged(pdist.local(job.param), job.staged, job.group.lr, job.layout, job.group.adjust_lr, 0)
            elif job.kind is JobKind.GATHERED:
                dtensor.apply_gathered(job)
        if sharded:
            dtensor.scatter_sharded(sharded, owned, owners, mesh_group)

        self.last_step_info = {"ns_matrices": ns_matrices, "buckets": len(buckets)}
        if self.track_update_rms:
            for gi, (sumsq, numel) in rms_acc.items():
                self._update_rms[self.param_groups[gi]["name"]] = (sumsq / max(numel, 1)).sqrt()

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
        lr = group_lr(group)
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


def _iterate_for_compile(X: Tensor, per_step) -> Tensor:
    return iterate(X, per_step, backend="torch")
