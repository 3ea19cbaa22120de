"""Muon inside the tools people use it with: Lightning's automatic optimization (accumulation, clipping,
a scheduler) and torch.compile of the Newton–Schulz iteration."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from parallax_muon import Muon, muon_param_groups


def make_model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Embedding(30, 12), nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12), nn.LayerNorm(12))


def batches(n):
    gen = torch.Generator().manual_seed(9)
    return [torch.randint(0, 30, (3, 5), generator=gen) for _ in range(n)]


def loss_of(model, x):
    return model(x).square().mean()


def muon_of(net):
    return Muon(muon_param_groups(net, verbose=False), lr=0.05, adamw_lr=1e-2)


def per_step(opt, sched):
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lightning_module(L, configure_optimizers):
    """A LightningModule training make_model() on loss_of; `configure_optimizers(net)` builds its optimizer."""

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, x, _):
            return loss_of(self.net, x)

        def configure_optimizers(self):
            return configure_optimizers(self.net)

    return Module()


def quiet_trainer(L, **kwargs):
    """A CPU Trainer without checkpoints, progress bar or model summary."""
    return L.Trainer(
        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def test_lightning_automatic_optimization_with_accumulation_clipping_and_scheduler():
    L = pytest.importorskip("lightning.pytorch")

    def configure_optimizers(net):
        opt = muon_of(net)
        return per_step(opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))

    data = batches(8)
    module = lightning_module(L, configure_optimizers)
    trainer = quiet_trainer(L, max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.5, logger=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))

    # The same training written by hand: average two micro-batches, clip, step, schedule.
    ref = make_model()
    opt = muon_of(ref)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i in range(0, 8, 2):
        for x in data[i : i + 2]:
            (loss_of(ref, x) / 2).backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        sched.step()
    assert trainer.global_step == 4
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert lrs["muon"] == 0.05 * 0.5**4 and lrs["adamw_embedding"] == 1e-2 * 0.5**4
    for (name, a), b in zip(module.net.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), f"{name}: Lightning run differs by {(a - b).abs().max():.2e}"


def test_lightning_learning_rate_monitor_logs_momentum_under_one_cycle(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    def configure_optimizers(net):
        opt = muon_of(net)
        return per_step(opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=4))

    module = lightning_module(L, configure_optimizers)
    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True)
    trainer = quiet_trainer(L, max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(3), batch_size=None))
    assert not [w for w in record if "do not have momentum" in str(w.message)]
    groups = trainer.optimizers[0].param_groups
    momenta = dict(monitor.last_momentum_values)
    assert len(momenta) == len(groups) and all(m is not None and 0.85 <= m < 0.95 for m in momenta.values()), momenta


@pytest.mark.slow
def test_compiled_newton_schulz_does_not_recompile_when_lr_changes():
    """~20 s of Inductor compilation on a CPU: the compiled function never sees the learning rate."""
    p = torch.randn(16, 24, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    opt, eager = Muon([p], compile_ns=True), Muon([q])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(3):
            g = torch.randn(16, 24)
            p.grad, q.grad = g.clone(), g.clone()
            for o in (opt, eager):
                o.param_groups[0]["lr"] = 0.01 * (i + 1)
                o.param_groups[0]["weight_decay"] = 0.1 * i
            opt.step()
            eager.step()
    assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_lightning_steps_are_the_float64_oracles_steps():
    """Every optimizer step Lightning takes (accumulation, clipping, a scheduler, per-group lr_mult, per-head
    blocks, weight decay) checked against test_oracle.py's from-scratch float64 Muon and torch's AdamW at
    lr·lr_mult, on the gradients Lightning handed the step: the test above compares Muon with itself.
    A model's gradients are far from well conditioned (singular values over two decades here), which the
    bf16 iteration resolves only to ~10 %: the oracle rounds where bf16 rounds (ns5's bf16=True)."""
    L = pytest.importorskip("lightning.pytorch")
    from tests.muon.test_oracle import BF16_TOL, oracle_step

    class Recording(Muon):
        def step(self, closure=None):
            loss = None
            if closure is not None:  # Lightning's closure: forward, backward, clipping
                with torch.enable_grad():
                    loss = closure()
            self.seen.append([[(p.detach().clone(), p.grad.clone()) for p in g["params"]] for g in self.param_groups])
            self.groups_at_step.append([{k: v for k, v in g.items() if k != "params"} for g in self.param_groups])
            super().step()
            self.after.append([[p.detach().clone() for p in g["params"]] for g in self.param_groups])
            return loss

    def configure_optimizers(net):
        groups = muon_param_groups(
            net,
            verbose=False,
            overrides={r"^1\.": {"num_heads": 3, "lr_mult": 0.5}},
            adamw_options={"lr_mult": 0.3},
        )
        opt = Recording(groups, lr=0.05, adamw_lr=1e-2, weight_decay=0.5, adamw_weight_decay=0.1)
        opt.seen, opt.groups_at_step, opt.after = [], [], []
        return per_step(opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))

    module = lightning_module(L, configure_optimizers)
    trainer = quiet_trainer(
        L, max_steps=3, precision="64-true", accumulate_grad_batches=2, gradient_clip_val=0.5, logger=False
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(6), batch_size=None))
    opt = trainer.optimizers[0]
    assert len(opt.seen) == 3
    bufs, adams = {}, {}
    for step, (seen, groups, after) in enumerate(zip(opt.seen, opt.groups_at_step, opt.after)):
        for gi, (group, pairs, new) in enumerate(zip(groups, seen, after)):
            for pi, ((before, grad), got) in enumerate(zip(pairs, new)):
                assert grad.dtype == torch.float64
                what = f"step {step}, group {group['name']}, param {pi}"
                if group["use_muon"]:
                    want, bufs[gi, pi] = oracle_step(
                        before, grad, bufs.get((gi, pi), torch.zeros_like(grad)), group, bf16=True
                    )
                    decayed = before * (1 - group["lr"] * group["lr_mult"] * group["weight_decay"])
                    err = ((got - want).norm() / (want - decayed).norm()).item()
                    assert err <= BF16_TOL, f"{what}: differs from the oracle by {err:.3f}"
                else:
                    q = adams.get((gi, pi))
                    if q is None:
                        q = torch.nn.Parameter(before.clone())
                        adams[gi, pi] = (q, torch.optim.AdamW([q], betas=group["betas"], eps=group["eps"]))
                    q, ref = adams[gi, pi]
                    q.data.copy_(before)
                    q.grad = grad
                    ref.param_groups[0].update(lr=group["lr"] * group["lr_mult"], weight_decay=group["weight_decay"])
                    ref.step()
                    torch.testing.assert_close(got, q.detach(), rtol=1e-12, atol=1e-14, msg=what)
    lrs = [{g["name"]: g["lr"] for g in gs} for gs in opt.groups_at_step]
    assert [x["muon"] for x in lrs] == pytest.approx([0.05, 0.025, 0.0125])
    assert any(g.get("num_heads") == 3 and g["lr_mult"] == 0.5 for g in opt.param_groups)
