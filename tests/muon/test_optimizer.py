"""Muon: the same step as torch.optim.Muon / torch.optim.AdamW, per-head and fused-projection blocks,
>2-D parameters, resume, closures, schedulers, diagnostics, and errors that name the bad value."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from parallax_muon import Muon, newton_schulz
from parallax_muon.layout import adjust_lr_ratio


def clones(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def momentum_update(g: torch.Tensor, momentum: float = 0.95) -> torch.Tensor:
    """The Nesterov momentum update of a first step (zero buffer), with torch.optim.Muon's operations."""
    buf = torch.zeros_like(g).lerp_(g, 1 - momentum)
    return g.lerp(buf, momentum)


# Distinct oriented shapes: every bucket holds one matrix, which Muon orthogonalizes with exactly the calls
# torch.optim.Muon makes (mm/addmm on the same bf16 data), so the results are equal bit for bit.
DISTINCT = [(48, 24), (24, 40), (32, 32), (64, 20), (20, 56), (17, 33), (20, 12)]
# Repeated shapes: batched products. A batched matmul may order its fp32 sums differently from the
# single-matrix one; about 1 product entry in 10⁴–10⁵ then rounds to the neighbouring bf16 value (2⁻⁸
# relative), and the five Newton–Schulz steps carry such a flip to at most ~1e-2 of that matrix's update
# (measured worst 8e-3 over 1200 16×16 matrices). Muon's momentum does not depend on the weights, so
# flips never accumulate across steps.
BATCHED = [(48, 24), (24, 48), (48, 24), (32, 32), (32, 32), (64, 20), (20, 64), (17, 33), (33, 17)]
BF16_FLIP_TOL = 2e-2


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_against_torch(shapes, steps=3, adjust="original", **kwargs):
    """Yield (step, i, ours, theirs, our update, their update) after each step of both optimizers."""
    params = [torch.randn(s) for s in shapes]
    ours, theirs = clones(params), clones(params)
    opt = Muon(ours, adjust_lr=adjust, **kwargs)
    ref = torch.optim.Muon(theirs, adjust_lr_fn=adjust, **{"nesterov": True, **kwargs})
    for step in range(steps):
        grads = [torch.randn(s) for s in shapes]
        set_grads(ours, grads)
        set_grads(theirs, grads)
        before = [p.detach().clone() for p in ours]
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
            yield step, i, a.detach(), b.detach(), a.detach() - before[i], b.detach() - before[i]
    assert opt.last_step_info["ns_matrices"] == len(shapes)


CONFIGS = [
    {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95},
    {"lr": 0.05, "weight_decay": 0.0, "momentum": 0.9, "adjust": "match_rms_adamw"},
    {"lr": 0.03, "weight_decay": 0.0, "momentum": 0.95, "nesterov": False},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_same_parameters_as_torch_muon(kwargs):
    """Same bf16 casts, norm, once-rounded products, momentum lerps and update: equal bits."""
    for step, i, a, b, _, _ in run_against_torch(DISTINCT, **dict(kwargs)):
        assert torch.equal(a, b), f"step {step}, param {i} {DISTINCT[i]}: max diff {(a - b).abs().max():.3e}"
        # Carrying the previous step's weights forward keeps the comparison exact from step to step.
        b.copy_(a)


@pytest.mark.parametrize("kwargs", CONFIGS[:2])
def test_batched_buckets_take_torch_muons_step(kwargs):
    total = 0
    for step, i, a, b, da, db in run_against_torch(BATCHED, **dict(kwargs)):
        err = rel_diff(da, db)
        assert err <= BF16_FLIP_TOL, f"step {step}, param {i} {BATCHED[i]}: update differs by {err:.2e} (relative)"
        total += 1
        b.copy_(a)
    assert total == 3 * len(BATCHED)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_groups_are_torch_adamw(foreach, weight_decay):
    shapes = [(10,), (7, 5), (3,), (1,)]
    params = [torch.randn(s) for s in shapes]
    ours, theirs = clones(params), clones(params)
    opt = Muon(
        [{"params": ours, "use_muon": False}],
        adamw_lr=3e-3,
        adamw_betas=(0.8, 0.99),
        adamw_eps=1e-7,
        adamw_weight_decay=weight_decay,
    )
    ref = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay, foreach=foreach)
    for step in range(6):
        grads = [torch.randn(s) for s in shapes]
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), f"AdamW step {step}: max diff {(a - b).abs().max():.3e}"
    sa, sb = opt.state[ours[1]], ref.state[theirs[1]]
    assert set(sa) == {"step", "exp_avg", "exp_avg_sq"} and torch.equal(sa["step"], sb["step"])


def test_mixed_groups_route_by_use_muon_and_override_per_group():
    w1, w2, b = torch.randn(16, 24), torch.randn(24, 16), torch.randn(16)
    ours = clones([w1, w2, b])
    opt = Muon(
        [
            {"params": [ours[0]]},
            {"params": [ours[1]], "lr": 0.05, "momentum": 0.8, "ns_coefficients": "polar_express"},
            {"params": [ours[2]], "use_muon": False, "lr": 1e-2},
        ],
        lr=0.02,
        adamw_lr=3e-4,
    )
    g = [torch.randn_like(t) for t in ours]
    set_grads(ours, g)
    opt.step()
    groups = opt.param_groups
    assert groups[0]["lr"] == 0.02 and groups[1]["lr"] == 0.05 and groups[2]["lr"] == 1e-2
    assert groups[2]["momentum"] == 0.9 and groups[2]["betas"] == (0.9, 0.95)  # an AdamW group's β1, both keys
    assert "nesterov" not in groups[2] and "betas" not in groups[0]
    expect1 = (
        w2
        - 0.05
        * adjust_lr_ratio("original", 24, 16)
        * newton_schulz(momentum_update(g[1], 0.8), 5, "polar_express").float()
    )
    assert torch.allclose(ours[1], expect1, atol=1e-6, rtol=0)
    expect0 = w1 - 0.02 * newton_schulz(momentum_update(g[0]), 5, "jordan").float()
    assert torch.allclose(ours[0], expect0, atol=1e-6, rtol=0)


def _first_step(shape, group_opts, lr=0.1):
    """A first Muon step on one parameter: (parameter after, parameter before, momentum update used)."""
    p = torch.randn(shape, requires_grad=True)
    start = p.detach().clone()
    opt = Muon([{"params": [p], **group_opts}], lr=lr)
    p.grad = torch.randn(shape)
    u = momentum_update(p.grad)
    opt.step()
    return p.detach(), start, u


def test_per_head_blocks_are_each_orthogonalized():
    heads, head_rows, cols = 4, 8, 24
    after, start, u = _first_step((heads * head_rows, cols), {"num_heads": heads})
    blocks = newton_schulz(u.view(heads, head_rows, cols))  # batched: each head on its own
    assert torch.equal(after, start.add(blocks.reshape(heads * head_rows, cols), alpha=-0.1))
    for h in range(heads):
        sv = torch.linalg.svdvals(blocks[h].double())
        assert sv.min() > 0.6 and sv.max() < 1.25, f"head {h}: singular values {sv.min():.3f}..{sv.max():.3f}"
    # Orthogonalizing the whole matrix would give a different update.
    whole = start.add(newton_schulz(u), alpha=-0.1 * adjust_lr_ratio("original", heads * head_rows, cols))
    assert (after - whole).abs().max() > 1e-3


def test_fused_projection_split_sizes_with_heads_and_tall_segments():
    # q|k|v fused: q has 4 heads of 6 rows; k and v are one tall 40×16 block each (lr ratio √(40/16)).
    sizes, heads, cols = [24, 40, 40], [4, 1, 1], 16
    after, start, u = _first_step((sum(sizes), cols), {"split_sizes": sizes, "num_heads": heads})
    q = newton_schulz(u[:24].view(4, 6, cols)).reshape(24, cols)
    kv = newton_schulz(torch.stack([u[24:64], u[64:104]]))  # the two same-shape blocks share one batch
    expected = start.clone()
    expected[:24].add_(q, alpha=-0.1)
    expected[24:].add_(kv.reshape(80, cols), alpha=-0.1 * math.sqrt(40 / 16))
    assert torch.equal(after, expected)
    assert adjust_lr_ratio("original", 40, 16) == math.sqrt(40 / 16)


@pytest.mark.parametrize("per_slice", [False, True])
def test_more_than_two_dims(per_slice):
    shape = (6, 4, 3, 5)  # conv-like (out, in, kh, kw), or 24 stacked 3×5 matrices (experts)
    after, start, u = _first_step(shape, {"per_slice": per_slice})
    if per_slice:
        update, ratio = newton_schulz(u.reshape(-1, 3, 5)), adjust_lr_ratio("original", 3, 5)
    else:
        update, ratio = newton_schulz(u.reshape(6, -1)), adjust_lr_ratio("original", 6, 60)
    assert torch.equal(after, start.add(update.reshape(shape), alpha=-0.1 * ratio))


def test_non_contiguous_parameter_is_updated_through_a_staging_buffer():
    base = torch.randn(24, 16)
    p = nn.Parameter(base.T.contiguous().T)  # a (24, 16) parameter stored transposed
    assert not p.is_contiguous()
    ref = torch.randn(24, 16, requires_grad=True)
    with torch.no_grad():
        ref.copy_(p)
    opt, ref_opt = Muon([p]), torch.optim.Muon([ref], lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    for _ in range(2):
        g = torch.randn(24, 16)
        p.grad, ref.grad = g.T.contiguous().T, g.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(p.detach(), ref.detach())


def make_model():
    torch.manual_seed(1234)
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16))


def run_steps(model, opt, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 50, (4, 7), generator=gen)

        def closure(x=x):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss

        opt.step(closure)


def groups_for(model):
    emb, lin1, _, lin2, norm = model
    return [
        {"params": [lin1.weight, lin2.weight]},
        {"params": [emb.weight, lin1.bias, lin2.bias, norm.weight, norm.bias], "use_muon": False, "weight_decay": 0.01},
    ]


def test_state_dict_round_trip_resumes_bit_identically():
    model = make_model()
    opt = Muon(groups_for(model), weight_decay=0.05, ns_coefficients="polar_express")
    run_steps(model, opt, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run_steps(model, opt, 3, seed=2)

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = Muon(groups_for(resumed), weight_decay=0.05, ns_coefficients="polar_express")
    opt2.load_state_dict(ckpt["opt"])
    run_steps(resumed, opt2, 3, seed=2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert opt2.param_groups[0]["ns_coefficients"] == "polar_express"


def test_closure_returns_the_loss_and_a_scheduler_drives_lr():
    model = make_model()
    opt = Muon(groups_for(model), lr=0.04, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    x = torch.randint(0, 50, (4, 7))

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[1]["lr"] == 5e-4
    # The step uses the scheduled lr: same update as a fresh optimizer built with lr=0.02 from this state.
    twin = copy.deepcopy(model)
    twin_opt = Muon(groups_for(twin), lr=0.02, adamw_lr=5e-4)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares, not copies, loaded tensors
    opt.step(closure)

    def twin_closure():
        twin_opt.zero_grad()
        loss = twin(x).square().mean()
        loss.backward()
        return loss

    twin_opt.step(twin_closure)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_lr_mult_scales_the_group_lr():
    after, start, u = _first_step((8, 12), {"lr_mult": 0.25}, lr=0.2)
    assert torch.equal(after, start.add(newton_schulz(u), alpha=-0.2 * 0.25))


def test_params_without_grad_are_skipped_and_update_rms_is_reported():
    a, b = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    c = torch.randn(5, requires_grad=True)
    opt = Muon(
        [{"params": [a, b], "name": "hidden"}, {"params": [c], "use_muon": False, "name": "vec"}],
        track_update_rms=True,
    )
    b_before = b.detach().clone()
    a.grad, c.grad = torch.randn(16, 32), torch.randn(5)
    opt.step()
    assert torch.equal(b, b_before) and b not in opt.state
    rms = opt.update_rms()
    # One 16×32 block: rows orthonormal-ish, so RMS ≈ mean singular value² / √cols-ish; check against a recompute.
    o = newton_schulz(momentum_update(a.grad)).float()
    assert math.isclose(rms["hidden"].item(), o.square().mean().sqrt().item(), rel_tol=1e-5)
    assert 0 < rms["vec"].item() <= 1.0 + 1e-6  # a first Adam step has |m̂/√v̂| = 1 elementwise (minus ε)
    from parallax_muon.diagnostics import update_rms_metrics

    assert set(update_rms_metrics(opt)) == {"update_rms/hidden", "update_rms/vec"}


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Muon([torch.randn(8, 8, requires_grad=True)], lr=-0.1), r"lr=-0\.1 must be >= 0"),
        (lambda: Muon([{"params": [torch.randn(8, 8)], "lr": -1.0}]), r"lr=-1\.0 must be >= 0"),
        (
            lambda: Muon([torch.randn(8, 8)], ns_coefficients="cubic"),
            "unknown Newton–Schulz coefficient preset 'cubic'",
        ),
        (lambda: Muon([torch.randn(8)]), r"shape \(8,\): a Muon group takes only parameters with 2 or more dims"),
        (lambda: Muon([{"params": [torch.randn(12, 8)], "num_heads": 5}]), "num_heads=5 does not divide the 12 rows"),
        (
            lambda: Muon([{"params": [torch.randn(12, 8)], "split_sizes": [4, 4]}]),
            r"split_sizes=\[4, 4\] must be positive and sum to the 12 rows",
        ),
        (lambda: Muon([torch.randn(8, 8)], adjust_lr="rms"), "unknown adjust_lr='rms'"),
        (lambda: Muon([torch.randn(8, 8)], momentum=1.0), r"momentum=1\.0 must be in \[0, 1\)"),
        (lambda: Muon([torch.randn(8, 8, dtype=torch.complex64)]), "is complex"),
        (lambda: Muon([torch.randn(8, 8)], backend="cuda"), "unknown backend 'cuda'"),
        (lambda: Muon([{"params": [torch.randn(3)], "use_muon": False, "betas": (0.9, 1.5)}]), "betas="),
    ],
)
def test_bad_configuration_is_named_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_gradients_are_named_at_the_first_step():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Muon([{"params": [emb.weight], "name": "emb"}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="parameter 0 \\(shape \\(10, 4\\)\\) of group 'emb' has a sparse gradient"):
        opt.step()


def test_complex_gradient_is_named_at_the_first_step():
    w = torch.randn(4, 4, requires_grad=True)
    opt = Muon([w])
    try:
        w.grad_dtype = None  # torch >= 2.10 refuses a grad of another dtype unless told to allow it
        w.grad = torch.randn(4, 4, dtype=torch.complex64)
    except (AttributeError, RuntimeError):
        pytest.skip("this torch cannot attach a complex gradient to a real parameter")
    with pytest.raises(RuntimeError, match="complex gradient"):
        opt.step()


def test_negative_lr_set_later_is_caught_at_step():
    w = torch.randn(4, 4, requires_grad=True)
    opt = Muon([w])
    opt.param_groups[0]["lr"] = -0.5
    w.grad = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"lr=-0\.5 must be >= 0"):
        opt.step()


def test_tensor_learning_rate_is_accepted():
    after, start, u = _first_step((8, 12), {"lr": torch.tensor(0.05)})
    assert torch.equal(after, start.add(newton_schulz(u), alpha=-0.05))


_INF, _NAN = float("inf"), float("nan")
_W = lambda: torch.randn(8, 8)  # noqa: E731
_V = lambda: torch.randn(3)  # noqa: E731


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: Muon([_W()], lr=_INF), ValueError, r"group 'muon_0': lr=inf must be >= 0 and finite"),
        (lambda: Muon([_W()], lr=_NAN), ValueError, r"lr=nan must be >= 0 and finite"),
        (lambda: Muon([_W()], lr=torch.tensor(_INF)), ValueError, r"lr=(inf|tensor\(inf\)) must be >= 0"),
        (lambda: Muon([_W()], lr="0.02"), TypeError, r"lr must be a real number, got '0.02'"),
        (lambda: Muon([_W()], weight_decay=_INF), ValueError, r"weight_decay=inf must be >= 0 and finite"),
        (lambda: Muon([_W()], weight_decay=_NAN), ValueError, r"weight_decay=nan"),
        (lambda: Muon([_W()], weight_decay=-0.1), ValueError, r"weight_decay=-0\.1 must be >= 0"),
        (lambda: Muon([_W()], momentum=_NAN), ValueError, r"momentum=nan must be in \[0, 1\)"),
        (lambda: Muon([_W()], momentum=-0.5), ValueError, r"momentum=-0\.5 must be in \[0, 1\)"),
        (lambda: Muon([_W()], nesterov="yes"), TypeError, r"nesterov must be a bool, got 'yes'"),
        (lambda: Muon([_W()], ns_eps=_INF), ValueError, r"ns_eps=inf must be > 0"),
        (lambda: Muon([_W()], ns_norm_scale=0.0), ValueError, r"ns_norm_scale=0\.0 must be > 0"),
        (lambda: Muon([{"params": [_W()], "lr_mult": _INF}]), ValueError, r"lr_mult=inf must be >= 0"),
        (
            lambda: Muon([{"params": [_W()], "ns_steps": 0, "name": "mlp"}]),
            ValueError,
            r"group 'mlp': ns_steps must be a positive int, got 0",
        ),
        (
            lambda: Muon([{"params": [_W()], "ns_coefficients": [(3.0, _INF, 2.0)], "name": "mlp"}]),
            ValueError,
            r"group 'mlp': Newton–Schulz coefficients must be finite",
        ),
        (lambda: Muon([{"params": [_W()], "lr": -2.0, "name": "attn"}]), ValueError, r"group 'attn': lr=-2\.0"),
        (lambda: Muon([{"params": [_V()], "use_muon": False}], adamw_lr=_INF), ValueError, r"lr=inf must be >= 0"),
        (lambda: Muon([{"params": [_V()], "use_muon": False}], adamw_lr=-1e-3), ValueError, r"lr=-0\.001"),
        (lambda: Muon([{"params": [_V()], "use_muon": False}], adamw_eps=_NAN), ValueError, r"eps=nan must be >= 0"),
        (lambda: Muon([{"params": [_V()], "use_muon": False}], adamw_eps=-1.0), ValueError, r"eps=-1\.0 must be"),
        (
            lambda: Muon([{"params": [_V()], "use_muon": False}], adamw_betas=(_NAN, 0.9)),
            ValueError,
            r"betas=\(nan, 0\.9\) must be in \[0, 1\)",
        ),
        (
            lambda: Muon([{"params": [_V()], "use_muon": False}], adamw_betas=(0.9, -0.1)),
            ValueError,
            r"betas=\(0\.9, -0\.1\)",
        ),
        (lambda: Muon([{"params": [_V()], "use_muon": False}], adamw_betas=0.9), ValueError, r"betas=0\.9 must be two"),
        (
            lambda: Muon([{"params": [_V()], "use_muon": False, "weight_decay": _INF, "name": "norms"}]),
            ValueError,
            r"group 'norms': weight_decay=inf",
        ),
    ],
)
def test_non_finite_and_out_of_range_hyper_parameters_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_infinite_lr_set_later_is_caught_at_step():
    w = torch.randn(4, 4, requires_grad=True)
    opt = Muon([w])
    opt.param_groups[0]["lr"] = _INF  # e.g. a scheduler gone wrong
    w.grad = torch.randn(4, 4)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"lr=inf must be >= 0 and finite"):
        opt.step()
    assert torch.equal(w, before)


# ---------------------------------------------------------------------------- load_state_dict checks
def _trained():
    """A Muon over groups_for(make_model()) after one step (so every parameter has state), and its state dict."""
    model = make_model()
    opt = Muon(groups_for(model))
    run_steps(model, opt, 1, seed=3)
    return opt, copy.deepcopy(opt.state_dict())


def _fresh(groups=None):
    model = make_model()
    return Muon(groups_for(model) if groups is None else groups(model))


def _edit(edit):
    _, sd = _trained()
    edit(sd)
    return sd


def _swap_groups(model):
    return groups_for(model)[::-1]


def _one_group(model):
    return groups_for(model)[:1]


def _dropped_param(model):
    groups = groups_for(model)
    groups[1]["params"] = groups[1]["params"][:-1]
    return groups


_BAD_STATE = [
    ("group count", None, _one_group, r"the state dict has 2 param groups, this optimizer 1 \(\['muon_0'\]\)"),
    (
        "AdamW group loaded as Muon",
        None,
        _swap_groups,
        r"group 0 \('adamw_0'\) is an AdamW group here but the state dict's group 0 \('muon_0'\) is a Muon group",
    ),
    ("param count", None, _dropped_param, r"group 1 \('adamw_1'\) has 4 parameters here but 5 in the state dict"),
    (
        "momentum buffer of another shape",
        lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(32, 8)),
        None,
        r"parameter 0 \(shape \(32, 16\)\) of group 'muon_0': its momentum_buffer in the state dict has shape "
        r"\(32, 8\), expected the parameter's shape \(32, 16\)",
    ),
    (
        "exp_avg of another shape",
        lambda sd: sd["state"][3].update(exp_avg=torch.zeros(5)),
        None,
        r"parameter 1 \(shape \(32,\)\) of group 'adamw_1': its exp_avg in the state dict has shape \(5,\)",
    ),
    (
        "exp_avg_sq not a tensor",
        lambda sd: sd["state"][3].update(exp_avg_sq=[0.0] * 32),
        None,
        r"its exp_avg_sq in the state dict has list",
    ),
    (
        "step of several elements",
        lambda sd: sd["state"][2].update(step=torch.zeros(3)),
        None,
        r"its step in the state dict has shape \(3,\), expected a one-element tensor",
    ),
    (
        "AdamW state in a Muon group",
        lambda sd: sd["state"].update({0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(32, 16)}}),
        None,
        r"parameter 0 \(shape \(32, 16\)\) of group 'muon_0' has state \['exp_avg', 'step'\] in the state dict; "
        r"a Muon group keeps \['momentum_buffer'\]",
    ),
    (
        "infinite lr",
        lambda sd: sd["param_groups"][0].update(lr=_INF),
        None,
        r"Muon.load_state_dict: group 'muon_0': lr=inf must be >= 0 and finite",
    ),
    (
        "bad saved betas",
        lambda sd: sd["param_groups"][1].update(betas=(0.9, 1.0)),
        None,
        r"group 'adamw_1': betas=\(0\.9, 1\.0\) must be in \[0, 1\)",
    ),
    (
        "saved num_heads that do not divide the rows",
        lambda sd: sd["param_groups"][0].update(num_heads=5),
        None,
        r"num_heads=5 does not divide the 32 rows",
    ),
    ("not a state dict", lambda sd: sd.pop("state"), None, r"expected an optimizer state dict with 'state'"),
]


@pytest.mark.parametrize("edit, groups, match", [c[1:] for c in _BAD_STATE], ids=[c[0] for c in _BAD_STATE])
def test_load_state_dict_names_what_does_not_fit(edit, groups, match):
    """Each of these loaded silently (or failed later with an unnamed size error); now the load refuses it,
    names the group and parameter, and leaves the optimizer as it was."""
    sd = _edit(edit or (lambda sd: None))
    opt = _fresh(groups)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and not after["state"]


def test_load_state_dict_still_loads_a_matching_state():
    opt, sd = _trained()
    fresh = _fresh()
    fresh.load_state_dict(sd)
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert set(fresh.state_dict()["state"]) == set(sd["state"])
