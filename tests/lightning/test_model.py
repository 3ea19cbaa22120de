"""The decoder: shapes, causality, the r_init="zero" equivalence, GQA, windows, tied embeddings,
config validation, presets and FLOP counting. CPU, tiny shapes (head_dim >= 16, T <= 32)."""

from __future__ import annotations

import sys

import pytest
import torch

from parallax_kernels import backend_for
from parallax_lightning.attention import ATTENTION_KINDS
from parallax_lightning.model import Decoder, DecoderConfig, softmax_to_parallax
from parallax_lightning.model_sizes import (
    attention_flops_forward,
    count_params,
    flops_per_token,
    matmul_params,
    mean_visible_keys,
    preset,
)


def small_config(**overrides) -> DecoderConfig:
    base = dict(vocab_size=64, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, head_dim=16, attn_backend="reference")
    return DecoderConfig(**{**base, **overrides})


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_forward_shape_and_finite(kind):
    model = Decoder(small_config(attention=kind))
    ids = torch.randint(0, 64, (3, 17))
    logits = model(ids)
    assert logits.shape == (3, 17, 64)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_backward_reaches_every_parameter(kind):
    model = Decoder(small_config(attention=kind, n_kv_heads=1))
    model(torch.randint(0, 64, (2, 12))).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("window", [None, 5])
def test_causal_future_token_does_not_change_past_logits(kind, window):
    model = Decoder(small_config(attention=kind, window_size=window)).double()
    ids = torch.randint(0, 64, (2, 20))
    changed = ids.clone()
    t = 11
    changed[:, t] = (ids[:, t] + 1) % 64
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-6, "the changed token must influence its own and later logits"


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_window_limits_what_a_position_sees(kind):
    """With a window of W, position i depends on tokens i-W+1..i through attention only; after two
    layers the receptive field is 2(W-1) back, so a token further back changes nothing."""
    W = 4
    model = Decoder(small_config(attention=kind, window_size=W)).double()
    ids = torch.randint(0, 64, (1, 24))
    changed = ids.clone()
    changed[:, 3] = (ids[:, 3] + 1) % 64
    a, b = model(ids), model(changed)
    reach = 3 + 2 * (W - 1)  # last position that may still see token 3
    torch.testing.assert_close(a[:, reach + 1 :], b[:, reach + 1 :], rtol=0, atol=0)
    assert (a[:, 3 : reach + 1] - b[:, 3 : reach + 1]).abs().max() > 1e-6


def test_public_op_backend_matches_reference():
    """attn_backend="triton" runs parallax_attn (the Triton kernels; interpreted on CPU) inside the
    model: logits and every parameter gradient match the reference model. Tiny: interpreted."""
    assert backend_for(torch.empty(1)) == "triton", "tests run CPU tensors through the interpreted kernels"
    ids = torch.randint(0, 64, (1, 16))
    models = {b: Decoder(small_config(n_layers=1, n_kv_heads=1, attn_backend=b)) for b in ("triton", "reference")}
    models["triton"].load_state_dict(models["reference"].state_dict())
    grads = {}
    for backend, model in models.items():
        logits = model(ids)
        logits.logsumexp(-1).sum().backward()
        grads[backend] = (logits, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], rtol=1e-4, atol=1e-5)
    for name, g in grads["reference"][1].items():
        torch.testing.assert_close(
            grads["triton"][1][name], g, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_zero_r_parallax_equals_softmax_exactly():
    """W_R = 0 gives r = 0 and Parallax = softmax: a Parallax model built from a softmax model's
    weights (the continued-training recipe) produces the same logits, bit for bit on the reference."""
    softmax = Decoder(small_config(attention="softmax", n_kv_heads=1))
    parallax = Decoder(small_config(attention="parallax", n_kv_heads=1, r_init="zero"))
    missing, unexpected = parallax.load_state_dict(softmax.state_dict(), strict=False)
    assert not unexpected
    assert all(".r_proj." in k or ".r_norm." in k for k in missing) and missing
    for block in parallax.blocks:
        assert block.attn.r_proj.weight.abs().max() == 0
    ids = torch.randint(0, 64, (2, 19))
    assert torch.equal(parallax(ids), softmax(ids))


def test_softmax_to_parallax():
    softmax = Decoder(small_config(attention="softmax", window_size=9)).double()
    parallax = softmax_to_parallax(softmax)
    assert parallax.config.attention == "parallax" and parallax.config.window_size == 9
    assert parallax.embed.weight.dtype == torch.float64
    assert parallax.embed.weight.data_ptr() != softmax.embed.weight.data_ptr()  # a copy, not shared
    ids = torch.randint(0, 64, (2, 19))
    assert torch.equal(parallax(ids), softmax(ids))
    parallax(ids).logsumexp(-1).sum().backward()
    assert parallax.blocks[0].attn.r_proj.weight.grad.abs().max() > 0  # W_R trains from zero
    with pytest.raises(ValueError, match="not 'softmax'"):
        softmax_to_parallax(parallax)


def test_zero_r_parallax_equals_softmax_on_default_backend():
    """On the default backend softmax runs SDPA and Parallax its own op: equal to rounding."""
    softmax = Decoder(small_config(attention="softmax", attn_backend="auto"))
    parallax = Decoder(small_config(attention="parallax", r_init="zero", attn_backend="auto"))
    parallax.load_state_dict(softmax.state_dict(), strict=False)
    ids = torch.randint(0, 64, (2, 19))
    torch.testing.assert_close(parallax(ids), softmax(ids), rtol=1e-5, atol=1e-5)


def test_r_init_like_q_draws_w_r_like_w_q():
    model = Decoder(small_config(d_model=64, n_heads=4, head_dim=16, init_std=0.05))
    w_q, w_r = model.blocks[0].attn.q_proj.weight, model.blocks[0].attn.r_proj.weight
    assert w_r.shape == w_q.shape
    assert not torch.equal(w_q, w_r)
    assert abs(w_r.std().item() - 0.05) < 0.01 and abs(w_q.std().item() - 0.05) < 0.01


def test_gqa_shares_key_value_heads():
    """With n_kv_heads=1 the model equals the same model with every kv head a copy of that one."""
    gqa = Decoder(small_config(n_heads=4, n_kv_heads=1, d_model=64)).double()
    full = Decoder(small_config(n_heads=4, n_kv_heads=4, d_model=64)).double()
    state = gqa.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = tensor.repeat(4, 1)  # (1*D, d) -> (4*D, d): head h reads copy h
    full.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 15))
    torch.testing.assert_close(gqa(ids), full(ids), rtol=1e-10, atol=1e-12)
    attn = gqa.blocks[0].attn
    assert attn.k_proj.weight.shape == (16, 64) and attn.q_proj.weight.shape == (64, 64)


def test_tied_embeddings():
    tied = Decoder(small_config(tie_embeddings=True))
    untied = Decoder(small_config(tie_embeddings=False))
    assert tied.lm_head is None
    assert isinstance(untied.lm_head, torch.nn.Linear)
    emb = 64 * 32
    assert count_params(tied, exclude_embeddings=False) == count_params(tied) + emb
    assert count_params(untied, exclude_embeddings=False) == count_params(untied) + 2 * emb
    assert count_params(tied) == count_params(untied)
    # the output projection is the embedding: its gradient arrives through both uses
    tied(torch.randint(0, 64, (1, 8))).sum().backward()
    assert tied.embed.weight.grad is not None and tied.embed.weight.grad.abs().sum() > 0


def test_module_names_of_the_interface():
    model = Decoder(small_config(tie_embeddings=False))
    names = {n for n, _ in model.named_modules()}
    for part in ("q_proj", "r_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "r_norm"):
        assert f"blocks.1.attn.{part}" in names
    for part in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "attn_norm", "mlp_norm"):
        assert f"blocks.0.{part}" in names
    assert {"embed", "norm", "lm_head"} <= names
    softmax = {n for n, _ in Decoder(small_config(attention="softmax")).named_modules()}
    assert "blocks.0.attn.r_proj" not in softmax and "blocks.0.attn.r_norm" not in softmax
    affine = {n for n, _ in Decoder(small_config(attention="affine_linear")).named_modules()}
    assert "blocks.0.attn.r_proj" in affine and "blocks.0.attn.q_proj" not in affine


def test_rope_applies_to_r():
    """r is rotated like q and k: for one token repeated at every position, r_i . k_j depends on
    i - j only (relative positions), and r itself changes with the position."""
    model = Decoder(small_config()).double()
    attn = model.blocks[0].attn
    x = torch.randn(1, 1, 32, dtype=torch.float64).expand(1, 6, 32)
    cos, sin = model._rope(torch.arange(6))
    _, r, k, _ = attn.project(x, cos[:, None], sin[:, None])
    assert not torch.allclose(r[0, 0], r[0, 5])
    t = torch.einsum("bihd,bjhd->bhij", r, k)
    torch.testing.assert_close(t[..., 3, 1], t[..., 4, 2])
    torch.testing.assert_close(t[..., 3, 1], t[..., 5, 3])
    assert not torch.allclose(t[..., 3, 1], t[..., 3, 2])


def test_importing_model_does_not_import_the_platform_stack():
    import subprocess

    code = (
        "import sys, parallax_lightning.model, parallax_lightning.diagnostics, parallax_lightning.generation;"
        "bad = [m for m in ('lightning', 'mlflow', 'omegaconf', 'pytorch_lightning') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ----------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"attention": "flash"}, "attention"),
        ({"n_heads": 3, "n_kv_heads": 2, "head_dim": 16}, "n_kv_heads"),
        ({"n_heads": 3, "head_dim": None}, "n_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"window_size": 0}, "window_size"),
        ({"r_init": "random"}, "r_init"),
        ({"attn_backend": "cuda"}, "attn_backend"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"d_model": 32.0}, "d_model"),
        ({"lla_ridge": 0.0}, "lla_ridge"),
        ({"init_std": float("nan")}, "init_std"),
        ({"n_layers": True}, "n_layers"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"DecoderConfig\.{field}\b"):
        small_config(**overrides)


def test_forward_rejects_bad_input():
    model = Decoder(small_config())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="DecoderConfig"):
        Decoder({"d_model": 32})


# -------------------------------------------------------------------------------------- presets


def _meta_model(config: DecoderConfig) -> Decoder:
    with torch.device("meta"):  # counts without allocating 100M+ parameters
        return Decoder(config)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("tiny", 0.2e6, 0.6e6),
        ("small", 45e6, 60e6),
        ("base", 115e6, 145e6),
    ],
)
def test_preset_sizes(name, low, high):
    parallax = count_params(_meta_model(preset(name)))
    softmax = count_params(_meta_model(preset(name, attention="softmax")))
    assert low <= parallax <= high and low <= softmax <= high, (parallax, softmax)
    c = preset(name)
    assert parallax - softmax == c.n_layers * (c.n_heads * c.dim_head * c.d_model + c.dim_head)  # W_R + r_norm


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_matched_presets(size):
    parallax, softmax = preset(size), preset(size, attention="softmax")
    pm = preset(f"{size}-softmax-param-matched")
    cm = preset(f"{size}-parallax-compute-matched")
    assert pm.attention == "softmax" and pm.n_heads == 3 * parallax.n_heads // 2
    assert cm.attention == "parallax" and cm.dim_head == parallax.dim_head // 2
    # parameter-matched: the same matmul weights as Parallax
    assert matmul_params(pm) == matmul_params(parallax)
    # compute-matched: attention FLOPs equal, total FLOPs equal (to MLP rounding on tiny)
    T = 512
    assert attention_flops_forward(cm, T) == attention_flops_forward(softmax, T)
    ratio = flops_per_token(cm, T) / flops_per_token(softmax, T)
    assert abs(ratio - 1) < (1e-3 if size == "tiny" else 1e-12), ratio


def test_preset_overrides_and_errors():
    c = preset("tiny", attention="softmax", window_size=16, vocab_size=300)
    assert (c.attention, c.window_size, c.vocab_size) == ("softmax", 16, 300)
    assert preset("small-softmax-param-matched", vocab_size=1000).vocab_size == 1000
    with pytest.raises(ValueError, match="unknown name 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="attention"):
        preset("tiny-parallax-compute-matched", attention="softmax")
    with pytest.raises(ValueError, match=r"DecoderConfig\.n_heads"):
        preset("tiny", n_heads=0)


# ---------------------------------------------------------------------------------------- FLOPs


def test_mean_visible_keys():
    assert mean_visible_keys(4, None) == 2.5  # (1 + 2 + 3 + 4) / 4
    assert mean_visible_keys(4, 2) == (1 + 2 + 2 + 2) / 4
    assert mean_visible_keys(4, 10) == 2.5


def test_flops_per_token_counts_attention_by_hand():
    T = 256
    par, soft = preset("tiny"), preset("tiny", attention="softmax")
    H, D, L = par.n_heads, par.dim_head, par.n_layers
    n = (T + 1) / 2
    # 6 N + 3 (fwd + bwd) x layers x heads x matmuls x 2 n D
    assert flops_per_token(soft, T) == 6 * matmul_params(soft) + 3 * L * H * 2 * 2 * n * D
    assert flops_per_token(par, T) == 6 * matmul_params(par) + 3 * L * H * 4 * 2 * n * D
    attn_gap = flops_per_token(par, T) - flops_per_token(soft, T) - 6 * (matmul_params(par) - matmul_params(soft))
    assert attn_gap == pytest.approx(3 * L * attention_flops_forward(soft, T))  # Parallax adds one softmax's worth
    assert flops_per_token(par, 2 * T) > flops_per_token(par, T)
    assert flops_per_token(preset("tiny", window_size=16), 2 * T) < flops_per_token(par, 2 * T)
    assert flops_per_token(preset("tiny", attention="lla"), T) > flops_per_token(par, T)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(par, 0)


def test_count_params_matches_matmul_params_plus_norms():
    c = small_config()
    model = Decoder(c)
    norms = c.n_layers * (2 * c.d_model + 3 * c.dim_head) + c.d_model  # block norms, q/k/r norms, final norm
    assert count_params(model) == matmul_params(c) - c.d_model * c.vocab_size + norms


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention": "softmax", "fused_qkvr": True},
        {"fused_qkvr": True},
        # the custom ops (interpreted Triton on CPU) with the fused block's strided views: the CUDA path
        {"fused_qkvr": True, "attn_backend": "triton", "n_layers": 1},
    ],
    ids=str,
)
def test_compiles_into_one_graph(overrides):
    """torch.compile traces the training forward and backward without graph breaks (fullgraph), the
    fused block's strided views included; aot_eager checks the capture without paying for code generation."""
    model = Decoder(small_config(n_kv_heads=1, window_size=7, **overrides))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 16))
    out = compiled(ids)
    out.logsumexp(-1).sum().backward()
    torch.testing.assert_close(out, model(ids))
    assert all(p.grad is not None for p in model.parameters())


def test_compiled_model_generates_eagerly_with_the_cache():
    """Generation with the KV cache runs outside the compiled graph (the cache's lengths change every
    token): a model compiled in place generates what the eager model generates, compiling its entry at
    most twice (the prefill's and the one-token steps' input shapes), not once per token."""
    model = Decoder(small_config(init_std=0.2, fused_qkvr=True))
    prompt = torch.randint(0, 64, (2, 5))
    expected = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    model.compile(backend="aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0.0), expected)
