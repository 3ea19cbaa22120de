"""Per-layer Parallax diagnostics: the correction ratio, ‖r‖ and stable ranks."""

from __future__ import annotations

import pytest
import torch

from parallax_kernels import affine_linear_attn_reference, parallax_attn_reference
from parallax_lightning.diagnostics import correction_terms, parallax_layer_stats, stable_rank
from parallax_lightning.model import Decoder, DecoderConfig

from .platform_utils import quiet_trainer


def make_model(**overrides) -> Decoder:
    fields = dict(vocab_size=64, max_seq_len=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16)
    return Decoder(DecoderConfig(**{**fields, **overrides}))


def test_stats_are_finite_per_layer():
    model = make_model(init_std=0.1)
    stats = parallax_layer_stats(model, torch.randint(0, 64, (2, 24)))
    assert [s["layer"] for s in stats] == [0, 1, 2]
    keys = {"correction_ratio", "correction_norm", "vbar_norm", "r_norm", "stable_rank_w_q", "stable_rank_w_k"}
    for s in stats:
        assert keys | {"stable_rank_w_r"} <= set(s)
        assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for k, v in s.items() if k != "layer")
        assert s["correction_ratio"] > 0 and s["r_norm"] > 0
        for w in ("q", "k", "r"):
            assert 1.0 <= s[f"stable_rank_w_{w}"] <= 32.0  # at most min(W.shape) = d_model


def test_r_norm_is_the_normed_probe_norm():
    """r passes through RMSNorm with unit weights (at init): ‖r‖ = sqrt(head_dim), RoPE keeps norms."""
    stats = parallax_layer_stats(make_model(), torch.randint(0, 64, (1, 16)))
    for s in stats:
        assert s["r_norm"] == pytest.approx(16**0.5, rel=1e-3)


def test_correction_ratio_is_zero_with_zero_probe():
    model = make_model(r_init="zero")
    for s in parallax_layer_stats(model, torch.randint(0, 64, (2, 16))):
        assert s["correction_ratio"] == 0.0 and s["correction_norm"] == 0.0 and s["r_norm"] == 0.0
        assert s["stable_rank_w_r"] == 0.0
        assert s["vbar_norm"] > 0


@pytest.mark.parametrize("window", [None, 5])
def test_correction_terms_rebuild_the_attention_output(window):
    """v̄ - Cov r is exactly what the Parallax op (and, with uniform weights, affine linear) returns."""
    B, T, H, Hkv, D = 2, 11, 4, 2, 16
    q, r = torch.randn(B, T, H, D, dtype=torch.float64), torch.randn(B, T, H, D, dtype=torch.float64)
    k, v = torch.randn(B, T, Hkv, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64)
    v_bar, corr = correction_terms(q, r, k, v, window)
    expected = parallax_attn_reference(q, r, k, v, window_size=window).transpose(1, 2)
    torch.testing.assert_close(v_bar - corr, expected)
    assert corr.abs().max() > 1e-3
    v_bar, corr = correction_terms(None, r, k, v, window, uniform=True)
    torch.testing.assert_close(v_bar - corr, affine_linear_attn_reference(r, k, v, window_size=window).transpose(1, 2))


def test_correction_ratio_grows_with_the_probe():
    """The correction is linear in r: doubling r (through r_norm's weight, since the norm undoes any
    scaling of W_R) doubles the ratio and leaves v̄ alone."""
    ids = torch.randint(0, 64, (2, 16))
    one_layer = make_model(n_layers=1)
    before = parallax_layer_stats(one_layer, ids)[0]
    with torch.no_grad():
        one_layer.blocks[0].attn.r_norm.weight.mul_(2)
    after = parallax_layer_stats(one_layer, ids)[0]
    assert after["r_norm"] == pytest.approx(2 * before["r_norm"], rel=1e-5)
    assert after["correction_ratio"] == pytest.approx(2 * before["correction_ratio"], rel=1e-5)
    assert after["vbar_norm"] == pytest.approx(before["vbar_norm"], rel=1e-5)


def test_kinds_report_what_they_have():
    ids = torch.randint(0, 64, (1, 12))
    softmax = parallax_layer_stats(make_model(attention="softmax", n_layers=1), ids)[0]
    assert set(softmax) == {"layer", "stable_rank_w_q", "stable_rank_w_k"}
    affine = parallax_layer_stats(make_model(attention="affine_linear", n_layers=1), ids)[0]
    assert "stable_rank_w_q" not in affine and affine["correction_ratio"] > 0
    windowed = parallax_layer_stats(make_model(window_size=4, n_layers=1), ids)[0]
    assert windowed["correction_ratio"] > 0


def test_stats_leave_the_model_as_it_was():
    model = make_model()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parallax_layer_stats(model, torch.randint(0, 64, (1, 8)))
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_stable_rank():
    assert stable_rank(torch.eye(7)) == pytest.approx(7.0)
    u = torch.randn(20, 1)
    assert stable_rank(u @ torch.randn(1, 30)) == pytest.approx(1.0, rel=1e-5)
    w = torch.diag(torch.tensor([3.0, 1.0]))
    assert stable_rank(w) == pytest.approx(10 / 9)


def test_bad_input():
    with pytest.raises(ValueError, match="input_ids"):
        parallax_layer_stats(make_model(), torch.zeros(8, dtype=torch.long))


def test_callback_measures_the_initial_weights_before_the_first_update(tmp_path, corpus):
    """Step 0 is the baseline every diagnostic is reported against: it must be the untrained model's."""
    from parallax_lightning.callbacks import ParallaxDiagnostics
    from parallax_lightning.data import TextDataModule
    from parallax_lightning.lm_module import LanguageModelModule
    from parallax_lightning.optim import OptimizerConfig

    config = DecoderConfig(vocab_size=320, max_seq_len=16, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64)
    module = LanguageModelModule(config, optimizer=OptimizerConfig(name="muon", lr=0.05))
    initial = {name: stable_rank(p.detach().clone()) for name, p in module.model.named_parameters() if p.ndim == 2}
    diagnostics = ParallaxDiagnostics(every_n_steps=2, batch_size=1, seq_len=16, figure=False)
    trainer = quiet_trainer(
        accelerator="cpu", max_steps=2, logger=False, num_sanity_val_steps=0, limit_val_batches=1,
        callbacks=[diagnostics], default_root_dir=tmp_path,
    )  # fmt: skip
    with torch.random.fork_rng():
        trainer.fit(module, TextDataModule(source=str(corpus), seq_len=16, batch_size=2))
    history = diagnostics.history
    assert [s for s, _ in history["diag/layer0/stable_rank_w_r"]] == [0, 2]
    for w in ("q", "k", "r"):
        step0 = history[f"diag/layer0/stable_rank_w_{w}"][0][1]
        assert step0 == pytest.approx(float(initial[f"blocks.0.attn.{w}_proj.weight"]), rel=1e-6), w
    assert history["diag/layer0/stable_rank_w_r"][1][1] != history["diag/layer0/stable_rank_w_r"][0][1]
