"""OptimizerConfig.route: any named parameter can be sent to Muon or AdamW (the paper's probe-optimizer swap).

Under name="adamw" with W_R routed to Muon the optimizer is Muon holding AdamW groups, and those groups must
update every other parameter exactly as torch's AdamW would; under name="muon" with W_R routed to AdamW, W_R
gets the AdamW settings. Bad routes fail when the optimizer is built, naming the regex."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from parallax_lightning.lm_module import LanguageModelModule
from parallax_lightning.model import DecoderConfig
from parallax_lightning.optim import OptimizerConfig, adamw_param_groups, build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")
PAPER = Path(__file__).resolve().parents[2] / "experiments" / "paper"
WR = r"\.r_proj\.weight$"


def _model(seed=0):
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=64, max_seq_len=8, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64)
    return LanguageModelModule(config).model


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    logits = model(ids)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))


def _groups_of(optimizer):
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def test_adamw_with_wr_on_muon_steps_every_other_parameter_exactly_like_torch_adamw():
    from parallax_muon import Muon

    a = _model()
    b = copy.deepcopy(a)
    config = OptimizerConfig(name="adamw", adamw_lr=3e-3, adamw_weight_decay=0.1, lr=0.02, weight_decay=0.05)
    routed = build_optimizer(a, OptimizerConfig(**{**config.__dict__, "route": {WR: "muon"}}), verbose=False)
    reference = torch.optim.AdamW(
        adamw_param_groups(b, 0.1), lr=3e-3, betas=config.adamw_betas, eps=config.adamw_eps, foreach=True
    )
    assert isinstance(routed, Muon)
    groups = _groups_of(routed)
    for name, p in a.named_parameters():
        group = groups[id(p)]
        if "r_proj" in name:
            assert group["use_muon"] and group["lr"] == 0.02 and group["weight_decay"] == 0.05, name
        else:
            assert not group["use_muon"] and group["lr"] == 3e-3, name
            assert group["weight_decay"] == (0.1 if p.ndim == 2 else 0.0), name  # norms never decayed
    # one real step (after it W_R differs, so the losses and gradients of later steps part)
    for model, opt in ((a, routed), (b, reference)):
        opt.zero_grad()
        _loss(model, 7).backward()
        opt.step()
    moved = 0
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if "r_proj" in name:
            assert not torch.equal(pa, pb), name  # Muon's update is not AdamW's
        else:
            assert torch.equal(pa, pb), name
            moved += 1
    assert moved > 10


def test_adamw_groups_inside_muon_match_torch_adamw_over_several_steps():
    """With identical gradients fed to both (W_R's path frozen out), several steps stay bit-identical: the moment
    estimates, bias corrections and decoupled decay are AdamW's."""
    a = _model()
    b = copy.deepcopy(a)
    cfg = OptimizerConfig(name="adamw", adamw_lr=2e-3, adamw_weight_decay=0.5, route={WR: "muon"})
    routed = build_optimizer(a, cfg, verbose=False)
    reference = torch.optim.AdamW(adamw_param_groups(b, 0.5), lr=2e-3, betas=cfg.adamw_betas, foreach=True)
    pa = dict(a.named_parameters())
    pb = dict(b.named_parameters())
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for name in pa:
            grad = torch.randn(pa[name].shape, generator=g)
            pa[name].grad = grad.clone()
            pb[name].grad = grad.clone()
        routed.step()
        reference.step()
    for name in pa:
        if "r_proj" not in name:
            assert torch.equal(pa[name], pb[name]), name


def test_muon_with_wr_on_adamw_gives_wr_the_adamw_settings():
    model = _model()
    cfg = OptimizerConfig(name="muon", lr=0.02, weight_decay=0.05, adamw_lr=2e-3, adamw_weight_decay=0.5)
    plain = _groups_of(build_optimizer(model, cfg, verbose=False))
    swapped = _groups_of(build_optimizer(model, OptimizerConfig(**{**cfg.__dict__, "route": {WR: "adamw"}}), False))
    for name, p in model.named_parameters():
        if "r_proj" in name:
            assert plain[id(p)]["use_muon"] and not swapped[id(p)]["use_muon"]
            assert (swapped[id(p)]["lr"], swapped[id(p)]["weight_decay"]) == (2e-3, 0.5)
        else:
            assert plain[id(p)]["use_muon"] == swapped[id(p)]["use_muon"], name
        if not plain[id(p)]["use_muon"]:  # embeddings decayed, norms not: the same rule as name="adamw"
            assert plain[id(p)]["weight_decay"] == (0.5 if name == "embed.weight" else 0.0), name


def test_bad_routes_are_refused_by_name():
    with pytest.raises(ValueError, match=r"route\['r_proj'\] must be one of"):
        OptimizerConfig(route={"r_proj": "sgd"})
    with pytest.raises(ValueError, match=r"'\(r_proj' is not a valid regex"):
        OptimizerConfig(route={"(r_proj": "muon"})
    with pytest.raises(ValueError, match=r"OptimizerConfig\.name must be one of"):
        OptimizerConfig(name="lion", route={"r_proj": "muon"})
    model = _model()
    with pytest.raises(ValueError, match=r"'w_r_proj' matches no parameter"):
        build_optimizer(model, OptimizerConfig(route={"w_r_proj": "adamw"}), verbose=False)
    with pytest.raises(ValueError, match=r"'r_' sends blocks\.0\.attn\.r_norm\.weight .* to Muon"):
        build_optimizer(model, OptimizerConfig(name="adamw", route={"r_": "muon"}), verbose=False)


@pytest.mark.parametrize(
    "config, expect_muon_wr",
    [("swap_wr_adamw.yaml", False), ("swap_wr_muon.yaml", True)],
)
def test_swap_configs_route_only_wr(config, expect_muon_wr):
    from parallax_muon import Muon

    opt = yaml.safe_load((PAPER / config).read_text())["model"]["init_args"]["optimizer"]
    cfg = OptimizerConfig(**opt)
    model = _model()
    optimizer = build_optimizer(model, cfg, verbose=False)
    assert isinstance(optimizer, Muon)
    groups = _groups_of(optimizer)
    for name, p in model.named_parameters():
        if name.endswith("r_proj.weight"):
            assert groups[id(p)]["use_muon"] is expect_muon_wr, name
        elif p.ndim == 2 and name != "embed.weight":  # the other hidden matrices follow the run's optimizer
            assert groups[id(p)]["use_muon"] is (cfg.name == "muon"), name
