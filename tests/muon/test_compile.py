"""torch.compile(opt.step): one graph, no host syncs (no graph break), and the eager step's result."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch._dynamo.utils import counters

from parallax_muon import Muon


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    emb, lin1, _, lin2 = model
    groups = [
        {"params": [lin1.weight, lin2.weight], "weight_decay": 0.01},
        {"params": [emb.weight, lin1.bias, lin2.bias], "use_muon": False, "weight_decay": 0.01},
    ]
    return model, groups


def test_compiled_step_has_no_graph_break_and_takes_the_eager_step():
    torch._dynamo.reset()
    counters.clear()
    model, groups = make()
    twin = copy.deepcopy(model)
    emb, lin1, _, lin2 = twin
    twin_groups = [
        {**groups[0], "params": [lin1.weight, lin2.weight]},
        {**groups[1], "params": [emb.weight, lin1.bias, lin2.bias]},
    ]
    eager, compiled = Muon(groups, track_update_rms=True), Muon(twin_groups, track_update_rms=True)
    step = torch.compile(compiled.step, backend="aot_eager")  # traced by Dynamo, run without codegen
    x = torch.randint(0, 20, (3, 5))
    for _ in range(3):
        for m, opt in ((model, eager), (twin, compiled)):
            opt.zero_grad()
            m(x).square().mean().backward()
        eager.step()
        step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            # capturable AdamW forms its bias corrections in float32 tensors, eager in Python floats
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        for opt in (eager, compiled):  # a scheduled lr: Dynamo recompiles and then traces lr symbolically
            for group in opt.param_groups:
                group["lr"] *= 0.5
    assert dict(counters["graph_break"]) == {}  # .item() (AdamW's step counts), math.isfinite(lr) broke it
    rms_eager, rms_compiled = eager.update_rms(), compiled.update_rms()
    for name in rms_eager:
        torch.testing.assert_close(rms_eager[name], rms_compiled[name], rtol=1e-5, atol=0)
