"""The fused q | r | k | v block (DecoderConfig.fused_qkvr) and the initialisation it shares with the
separate projections: same weights from the same seed, same function, same optimizer steps, checkpoints
that load across layouts, and W_R drawn from a stream of its own so softmax and Parallax models share
every other weight. CPU, tiny shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from parallax_lightning.model import Decoder, DecoderConfig, check_fused_routing, softmax_to_parallax
from parallax_lightning.optim import OptimizerConfig, build_optimizer

V = 64


def config(**overrides) -> DecoderConfig:
    base = dict(
        vocab_size=V, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        attn_backend="reference",
    )  # fmt: skip
    return DecoderConfig(**{**base, **overrides})


def pair(seed=0, **overrides) -> tuple[Decoder, Decoder]:
    """(separate, fused) models built after the same torch.manual_seed."""
    torch.manual_seed(seed)
    separate = Decoder(config(**overrides))
    torch.manual_seed(seed)
    fused = Decoder(config(fused_qkvr=True, **overrides))
    return separate, fused


def assert_same_weights(separate: Decoder, fused: Decoder, **tolerance):
    a, b = separate.state_dict(), fused.separate_state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if tolerance:
            torch.testing.assert_close(b[name], a[name], **tolerance, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", ["parallax", "softmax", "affine_linear"])
def test_fused_model_has_the_separate_models_weights_and_function(kind):
    separate, fused = pair(attention=kind)
    assert "blocks.0.attn.qrkv_proj.weight" in dict(fused.named_parameters())
    assert not any(n.endswith(("q_proj.weight", "k_proj.weight")) for n, _ in fused.named_parameters())
    assert_same_weights(separate, fused)
    ids = torch.randint(0, V, (2, 17))
    a, b = separate(ids), fused(ids)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    a.logsumexp(-1).sum().backward()
    b.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in fused.named_parameters()}
    for name, parts in fused.fused_weights().items():
        expected = torch.cat([dict(separate.named_parameters())[part].grad for part, _ in parts])
        torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-6)


def test_fused_views_through_the_public_op():
    """The strided q, r, k, v views go to the public op (the Triton kernels, interpreted on CPU) as they
    are: logits and the fused weight's gradient match the separate reference model."""
    separate, fused = pair(n_layers=1, n_heads=2, n_kv_heads=1)
    fused = Decoder(dataclasses.replace(fused.config, attn_backend="triton"))
    fused.load_state_dict(separate.state_dict())
    ids = torch.randint(0, V, (1, 16))
    a, b = separate(ids), fused(ids)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    a.logsumexp(-1).sum().backward()
    b.logsumexp(-1).sum().backward()
    attn = separate.blocks[0].attn
    expected = torch.cat([getattr(attn, f"{n}_proj").weight.grad for n in "qrkv"])
    torch.testing.assert_close(fused.blocks[0].attn.qrkv_proj.weight.grad, expected, rtol=1e-3, atol=1e-5)


def test_fused_projections_are_views_not_copies():
    _, fused = pair()
    attn = fused.blocks[0].attn
    x = torch.randn(2, 5, 32)
    cos, sin = fused._rope(torch.arange(5))
    q, r, k, v = attn.project(x, cos[:, None], sin[:, None])
    base = q.untyped_storage().data_ptr()
    assert r.untyped_storage().data_ptr() == base and k.untyped_storage().data_ptr() == base
    assert not q.is_contiguous() and not v.is_contiguous()  # strided head slices of (B, T, H_q+H_q+H_kv, D)
    assert q.shape == r.shape == (2, 5, 4, 16) and k.shape == v.shape == (2, 5, 2, 16)


@pytest.mark.parametrize("kind", ["parallax", "softmax"])
def test_checkpoints_load_across_layouts(kind):
    separate, fused = pair(seed=1, attention=kind)
    _, other_fused = pair(seed=2, attention=kind)
    other_separate, _ = pair(seed=3, attention=kind)
    ids = torch.randint(0, V, (2, 13))
    other_fused.load_state_dict(separate.state_dict())  # separate checkpoint -> fused model (strict)
    assert torch.equal(other_fused(ids), fused(ids))
    other_separate.load_state_dict(fused.state_dict())  # fused checkpoint -> separate model (strict)
    assert torch.equal(other_separate(ids), separate(ids))


def test_softmax_to_fused_parallax():
    torch.manual_seed(0)
    softmax = Decoder(config(attention="softmax", fused_qkvr=True))
    parallax = softmax_to_parallax(softmax)
    assert parallax.config.fused_qkvr
    assert parallax.blocks[0].attn.projection_weights()["r"].abs().max() == 0
    ids = torch.randint(0, V, (2, 11))
    torch.testing.assert_close(parallax(ids), softmax(ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["parallax", "softmax"])
def test_generation_is_the_same_fused_and_separate(kind):
    separate, fused = pair(attention=kind, init_std=0.2)
    separate, fused = separate.double(), fused.double()
    prompt = torch.randint(0, V, (2, 7))
    a = separate.generate(prompt, max_new_tokens=10, temperature=0.0)
    b = fused.generate(prompt, max_new_tokens=10, temperature=0.0)
    assert torch.equal(a, b)
    # the decode path itself (one token against the cache) gives the separate model's logits
    cache_a, cache_b = separate.init_cache(2, 12), fused.init_cache(2, 12)
    separate(prompt, cache_a), fused(prompt, cache_b)
    step = torch.randint(0, V, (2, 1))
    torch.testing.assert_close(fused(step, cache_b), separate(step, cache_a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_fused_and_separate_take_the_same_optimizer_steps(name):
    # float64: one fused matmul rounds its gradient differently from four separate ones (fp32: 1e-7),
    # and Muon's bf16 Newton-Schulz can turn that into a bf16 ulp of difference in the update.
    separate, fused = (m.double() for m in pair(seed=4))
    opt_config = OptimizerConfig(name=name, lr=0.05, adamw_lr=1e-2, weight_decay=0.1, adamw_weight_decay=0.1)
    rng = torch.get_rng_state()
    optimizers = [build_optimizer(m, opt_config, verbose=False) for m in (separate, fused)]
    assert torch.equal(torch.get_rng_state(), rng)  # routing the fused weight draws no random numbers
    if name == "muon":  # each projection is its own Newton-Schulz block inside the fused weight
        weight = fused.blocks[0].attn.qrkv_proj.weight
        group = next(g for g in optimizers[1].param_groups if any(p is weight for p in g["params"]))
        assert group["use_muon"] and group["split_sizes"] == [64, 64, 32, 32] and group["num_heads"] == [1, 1, 1, 1]
    torch.manual_seed(5)
    batches = [torch.randint(0, V, (2, 16)) for _ in range(3)]
    for ids in batches:
        losses = []
        for model, opt in zip((separate, fused), optimizers):
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert_same_weights(separate, fused, rtol=1e-12, atol=1e-14)
    w = fused.blocks[0].attn.projection_weights()["r"]
    assert not torch.equal(w, pair(seed=4)[1].double().blocks[0].attn.projection_weights()["r"])  # it did train


def test_fused_muon_groups_follow_the_parts_per_head_settings():
    """A per-head setting of one projection (here W_R's num_heads) becomes that segment's num_heads."""
    from parallax_muon import muon_param_groups

    _, fused = pair()
    overrides = fused.muon_overrides(
        lambda m: muon_param_groups(m, r_proj_options={"num_heads": 4}, r_proj_lr_mult=1.0, verbose=False)
    )
    (options,) = overrides.values()
    assert options == {"use_muon": True, "split_sizes": [64, 64, 32, 32], "num_heads": [1, 4, 1, 1]}


def test_fused_refuses_an_optimizer_routing_that_splits_its_parts():
    from parallax_muon import muon_param_groups

    _, fused = pair()
    with pytest.raises(ValueError, match=r"fused_qkvr.*r_proj\.weight lr_mult=2\.0.*optimizer\.r_proj_lr_mult"):
        build_optimizer(fused, OptimizerConfig(r_proj_lr_mult=2.0), verbose=False)
    # W_R sent to AdamW while q, k, v stay with Muon (what an optimizer route can do)
    with pytest.raises(ValueError, match=r"fused_qkvr.*r_proj\.weight use_muon=False"):
        fused.muon_overrides(lambda m: muon_param_groups(m, overrides={r"r_proj": {"use_muon": False}}, verbose=False))
    # the check itself, on hand-made groups
    parts = {"a.qrkv_proj.weight": [("a.q_proj.weight", 4), ("a.k_proj.weight", 2)]}
    ok = check_fused_routing(parts, {"a.q_proj.weight": {"use_muon": True}, "a.k_proj.weight": {"use_muon": True}})
    assert ok == {"a.qrkv_proj.weight": {"use_muon": True, "split_sizes": [4, 2], "num_heads": [1, 1]}}
    with pytest.raises(ValueError, match="weight_decay"):
        check_fused_routing(
            parts,
            {"a.q_proj.weight": {"use_muon": True}, "a.k_proj.weight": {"use_muon": True, "weight_decay": 0.1}},
        )
    # separate models need no overrides; the platform's W_R multiplier still works there
    separate, _ = pair()
    assert separate.muon_overrides(lambda m: []) == {}
    build_optimizer(separate, OptimizerConfig(r_proj_lr_mult=2.0), verbose=False)


def test_diagnostics_read_the_fused_weights():
    from parallax_lightning.diagnostics import parallax_layer_stats

    separate, fused = pair(init_std=0.1)
    ids = torch.randint(0, V, (2, 12))
    a, b = parallax_layer_stats(separate, ids), parallax_layer_stats(fused, ids)
    assert a[0].keys() == b[0].keys() and "stable_rank_w_r" in b[0]
    for sa, sb in zip(a, b):
        assert sb == pytest.approx(sa, rel=1e-5)


# ------------------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("fused_qkvr", [False, True])
def test_softmax_and_parallax_from_one_seed_differ_only_in_w_r(fused_qkvr):
    models = {}
    after = {}
    for kind in ("softmax", "parallax"):
        torch.manual_seed(7)
        models[kind] = Decoder(config(attention=kind, fused_qkvr=fused_qkvr)).separate_state_dict()
        after[kind] = torch.rand(3)  # the global RNG is left in the same state by both
    softmax, parallax = models["softmax"], models["parallax"]
    common = softmax.keys() & parallax.keys()
    assert parallax.keys() - common == {f"blocks.{i}.attn.{p}.weight" for i in range(2) for p in ("r_proj", "r_norm")}
    for name in common:
        assert torch.equal(softmax[name], parallax[name]), name
    assert torch.equal(after["softmax"], after["parallax"])


def test_w_r_is_deterministic_under_the_seed_and_drawn_like_w_q():
    torch.manual_seed(3)
    a = Decoder(config(init_std=0.05))
    torch.manual_seed(3)
    b = Decoder(config(init_std=0.05))
    c = Decoder(config(init_std=0.05))  # built next, from the advanced global RNG
    w = [m.blocks[1].attn.r_proj.weight for m in (a, b, c)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    assert not torch.equal(w[0], a.blocks[1].attn.q_proj.weight) and not torch.equal(
        w[0], a.blocks[0].attn.r_proj.weight
    )
    assert abs(w[0].std().item() - 0.05) < 0.01
    torch.manual_seed(11)  # reset_parameters is seeded the same way as construction
    a.reset_parameters()
    torch.manual_seed(11)
    c.reset_parameters()
    for (name, pa), pc in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(pa, pc), name
