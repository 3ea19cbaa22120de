"""Muon with torch's LR schedulers and momentum monitors: `defaults` names "momentum", every group carries it,
and an AdamW group's β1 follows whichever of `momentum` / `betas[0]` was changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parallax_muon import Muon


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def groups_for(model):
    emb, lin1, _, lin2 = model
    return [
        {"params": [lin1.weight, lin2.weight]},
        {"params": [emb.weight, lin1.bias, lin2.bias], "use_muon": False},
    ]


def train(model, opt, sched, steps=4):
    x = torch.randint(0, 20, (3, 5))
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()


def monitored_momentum(opt):
    """What Lightning's LearningRateMonitor(log_momentum=True) reads from each group."""
    use_betas = "betas" in opt.defaults
    return [g["betas"][0] if use_betas else g.get("momentum", 0) for g in opt.param_groups]


def test_defaults_name_lr_and_momentum_for_schedulers():
    opt = Muon(groups_for(make_model()), lr=0.02, momentum=0.9, adamw_betas=(0.8, 0.99))
    assert opt.defaults["lr"] == 0.02 and opt.defaults["momentum"] == 0.9 and "betas" not in opt.defaults
    assert monitored_momentum(opt) == [0.9, 0.8]  # the AdamW group's β1, not a 0 placeholder
    assert "nesterov" not in opt.param_groups[1]  # Muon-only keys stay out of AdamW groups


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 1e-3], total_steps=10),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=[0.001, 1e-4], max_lr=[0.02, 1e-3], step_size_up=3),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
def test_momentum_cycling_schedulers_drive_both_kinds_of_group(make_sched):
    model = make_model()
    opt = Muon(groups_for(model))
    sched = make_sched(opt)  # raised "optimizer must support momentum or beta1" while defaults was empty
    train(model, opt, sched)
    muon_group, adamw_group = opt.param_groups
    assert muon_group["momentum"] < 0.95  # cycled down from max_momentum while the lr rose
    assert adamw_group["momentum"] == muon_group["momentum"]
    opt.step()  # the next step reads the cycled β1 into the AdamW group's betas
    assert adamw_group["betas"][0] == adamw_group["momentum"]
    assert monitored_momentum(opt) == [muon_group["momentum"]] * 2


def test_adamw_group_beta1_follows_momentum_or_betas_whichever_changed():
    shapes = [(10,), (7, 5)]
    params = [torch.randn(s) for s in shapes]
    ours = [p.clone().requires_grad_(True) for p in params]
    theirs = [p.clone().requires_grad_(True) for p in params]
    opt = Muon([{"params": ours, "use_muon": False}], adamw_lr=1e-2, adamw_betas=(0.9, 0.99))
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    for step, (key, value) in enumerate([("momentum", 0.7), ("betas", (0.5, 0.99)), ("momentum", 0.8)]):
        opt.param_groups[0][key] = value
        ref.param_groups[0]["betas"] = (value, 0.99) if key == "momentum" else value
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), f"step {step} ({key}={value})"
        assert opt.param_groups[0]["momentum"] == opt.param_groups[0]["betas"][0] == ref.param_groups[0]["betas"][0]


def test_adamw_group_with_contradicting_momentum_and_betas_is_named():
    with pytest.raises(ValueError, match=r"momentum=0\.5 and betas\[0\]=0\.9"):
        Muon(
            [{"params": [torch.zeros(3, requires_grad=True)], "use_muon": False, "momentum": 0.5, "betas": (0.9, 0.9)}]
        )
    opt = Muon([{"params": [torch.zeros(3, requires_grad=True)], "use_muon": False, "momentum": 0.5}])
    assert opt.param_groups[0]["betas"] == (0.5, 0.95)


def test_state_dict_without_adamw_momentum_loads_and_resumes():
    model = make_model()
    opt = Muon(groups_for(model), adamw_betas=(0.85, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    train(model, opt, sched, steps=1)
    saved = opt.state_dict()
    del saved["param_groups"][1]["momentum"]  # as saved before AdamW groups carried it
    opt2 = Muon(groups_for(model), adamw_betas=(0.85, 0.99))
    opt2.load_state_dict(saved)
    assert opt2.param_groups[1]["momentum"] == 0.85
