"""muon_param_groups on a small Parallax-style decoder: who goes to Muon, who to AdamW, and W_R's own group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parallax_muon import Muon, muon_param_groups, routing_summary


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.r_proj = nn.Linear(d, d, bias=False)  # Parallax's probe W_R: one row block per query head
        self.o_proj = nn.Linear(d, d, bias=True)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(d)
        self.attn = Attention(d, heads)
        self.norm2 = nn.RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class TinyDecoder(nn.Module):
    def __init__(self, vocab=64, d=16, heads=2, layers=2, tie=True):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))  # a scalar
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx):
        x = self.embed_tokens(idx)
        for b in self.blocks:
            a = b.attn
            h = b.norm1(x)
            x = x + a.o_proj(a.q_proj(h) * a.k_proj(h).sigmoid() + a.v_proj(h) * a.r_proj(h).tanh())
            x = x + b.mlp(b.norm2(x))
        return self.lm_head(self.norm(x)) * (1 + self.gate)


def by_name(groups):
    return {g["name"]: g for g in groups}


def names_in(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


@pytest.mark.parametrize("tie", [True, False])
def test_routing_of_a_decoder(tie, capsys):
    model = TinyDecoder(tie=tie)
    groups = muon_param_groups(model, r_proj_lr_mult=0.5)
    g = by_name(groups)
    muon = names_in(model, g["muon"])
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n in muon)
    assert {n.split(".")[-2] for n in muon} == {"q_proj", "k_proj", "v_proj", "o_proj", "0", "2"}
    assert names_in(model, g["muon_r_proj"]) == ["blocks.0.attn.r_proj.weight", "blocks.1.attn.r_proj.weight"]
    assert g["muon_r_proj"]["lr_mult"] == 0.5 and g["muon_r_proj"]["use_muon"] is True
    assert names_in(model, g["adamw_embedding"]) == ["embed_tokens.weight"]
    if tie:
        assert "adamw_head" not in g  # the tied head is the embedding, counted once
    else:
        assert names_in(model, g["adamw_head"]) == ["lm_head.weight"]
    other = names_in(model, g["adamw_other"])
    assert "gate" in other and "norm.weight" in other and "blocks.0.attn.o_proj.bias" in other
    assert all(model.get_parameter(n).ndim < 2 for n in other)
    # Every trainable tensor lands in exactly one group.
    routed = [id(p) for grp in groups for p in grp["params"]]
    assert sorted(routed) == sorted(id(p) for p in model.parameters())

    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and line.startswith("parallax_muon routing: Muon ")
    assert "muon_r_proj 2 lr×0.5" in line and ("head tied to embedding" in line) == tie

    # The groups drive a working optimizer step.
    opt = Muon(groups, lr=0.02, adamw_lr=1e-3)
    loss = model(torch.randint(0, 64, (2, 5))).square().mean()
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n != "gate")


def test_overrides_patterns_and_options():
    model = TinyDecoder(tie=False)
    groups = muon_param_groups(
        model,
        overrides={
            r"attn\.(q|k)_proj": {"num_heads": 2},
            r"mlp\.2\.weight": {"use_muon": False, "lr_mult": 0.1},
            r"lm_head": {"use_muon": True},
        },
        r_proj_options={"num_heads": 2},
        muon_options={"weight_decay": 0.01},
        adamw_options={"weight_decay": 0.0},
        verbose=False,
    )
    g = by_name(groups)
    qk = g[r"muon[attn\.(q|k)_proj]"]
    assert qk["num_heads"] == 2 and qk["weight_decay"] == 0.01
    assert len(qk["params"]) == 4
    down = g[r"adamw_other[mlp\.2\.weight]"]
    assert down["use_muon"] is False and down["lr_mult"] == 0.1 and len(down["params"]) == 2
    assert names_in(model, g["muon[lm_head]"]) == ["lm_head.weight"]
    assert g["muon_r_proj"]["num_heads"] == 2
    Muon(groups)  # the options are valid group keys


def test_custom_r_proj_pattern_and_disabled():
    model = TinyDecoder()
    groups = muon_param_groups(model, r_proj_pattern=r"v_proj", verbose=False)
    assert len(by_name(groups)["muon_r_proj"]["params"]) == 2
    groups = muon_param_groups(model, r_proj_pattern=None, verbose=False)
    assert "muon_r_proj" not in by_name(groups)


def test_frozen_parameters_are_left_out_and_summary_of_hand_made_groups():
    model = TinyDecoder()
    model.blocks[0].requires_grad_(False)
    groups = muon_param_groups(model, verbose=False)
    routed = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in routed for p in model.blocks[0].parameters())
    line = routing_summary(
        [{"params": [torch.zeros(3, 4)], "name": "mats"}, {"params": [torch.zeros(5)], "use_muon": False}]
    )
    assert line == "parallax_muon routing: Muon 1 tensors / 12 params [mats 1] | AdamW 1 tensors / 5 params [? 1]"


class Classifier(nn.Module):
    """An MLP classifier: no embedding; its first layer reads the raw features, its last gives 10 classes."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.hidden = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))
        self.out = nn.Linear(64, 10)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.body(self.stem(x))).flatten(1))


def test_classifier_input_layer_and_small_head_stay_off_muon(capsys):
    model = Classifier()
    g = by_name(muon_param_groups(model))
    assert names_in(model, g["muon"]) == ["hidden.0.weight", "hidden.1.weight"]
    assert names_in(model, g["adamw_input"]) == ["inp.weight"]
    assert names_in(model, g["adamw_head"]) == ["out.weight"]  # a 10×64 head, no vocabulary to match
    line = capsys.readouterr().out
    assert "muon 2 (hidden.*.weight ×2)" in line and "adamw_input 1 (inp.weight)" in line
    assert "adamw_head 1 (out.weight)" in line


def test_conv_stem_and_fc_head_of_a_cnn_stay_off_muon():
    model = TinyCNN()
    groups = muon_param_groups(model, verbose=False)
    g = by_name(groups)
    assert names_in(model, g["muon"]) == ["body.0.weight", "body.2.weight"]
    assert names_in(model, g["adamw_input"]) == ["stem.weight"]
    assert names_in(model, g["adamw_head"]) == ["fc.weight"]
    opt = Muon(groups)
    model(torch.randn(2, 3, 12, 12)).square().mean().backward()
    opt.step()


def test_input_and_output_layers_can_be_put_back_on_muon():
    model = Classifier()
    g = by_name(muon_param_groups(model, input_layer=False, output_layer=False, head_patterns=(), verbose=False))
    assert len(g["muon"]["params"]) == 4 and "adamw_input" not in g and "adamw_head" not in g
    g = by_name(muon_param_groups(model, overrides={r"^inp\.weight$": {"use_muon": True}}, verbose=False))
    assert names_in(model, g[r"muon[^inp\.weight$]"]) == ["inp.weight"]


def test_decoder_layers_after_the_embedding_stay_on_muon():
    # The embedding is the decoder's input layer; with a tied head the last Linear is an MLP layer (not a head).
    model = TinyDecoder(tie=True)
    g = by_name(muon_param_groups(model, verbose=False))
    assert "adamw_input" not in g and "adamw_head" not in g
    assert "blocks.0.attn.q_proj.weight" in names_in(model, g["muon"])
    assert "blocks.1.mlp.2.weight" in names_in(model, g["muon"])


def test_summary_names_are_folded_and_cut():
    groups = [{"params": [torch.zeros(2, 2) for _ in range(7)], "name": "muon"}]
    names = {id(p): f"layer{i}.w" for i, p in enumerate(groups[0]["params"])}
    line = routing_summary(groups, names=names)
    assert "muon 7 (layer0.w, layer1.w, layer2.w, layer3.w, … 3 more)" in line
