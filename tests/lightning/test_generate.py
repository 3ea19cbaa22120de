"""KV cache and generation: prefill + token steps equal one full forward, greedy generation with the
cache equals generation that recomputes the full forward, for every attention kind."""

from __future__ import annotations

import pytest
import torch

from parallax_lightning.attention import ATTENTION_KINDS
from parallax_lightning.generation import sample_next
from parallax_lightning.model import Decoder, DecoderConfig

V = 64


def make_model(kind="parallax", backend="reference", dtype=torch.float64, **overrides) -> Decoder:
    fields = dict(
        vocab_size=V, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, attention=kind
    )
    fields.update(attn_backend=backend, **overrides)
    # a larger init spreads the logits, so greedy choices are not near-ties that rounding could flip
    return Decoder(DecoderConfig(init_std=0.2, **fields)).to(dtype)


def stepwise_logits(model, ids, prefill: int, chunk: int = 1):
    """Logits for every position of ids, computed as a prefill of `prefill` tokens and then chunks."""
    cache = model.init_cache(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prefill], cache)]
    for start in range(prefill, ids.shape[1], chunk):
        out.append(model(ids[:, start : start + chunk], cache))
    assert cache.lengths == [ids.shape[1]] * ids.shape[0]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("window", [None, 6])
def test_prefill_then_steps_equal_full_forward(kind, window):
    model = make_model(kind, window_size=window)
    ids = torch.randint(0, V, (2, 20))
    full = model(ids)
    torch.testing.assert_close(stepwise_logits(model, ids, prefill=7), full, rtol=1e-9, atol=1e-9)
    # chunked prefill: several tokens at a time against an already filled cache (T_q < T_k)
    torch.testing.assert_close(stepwise_logits(model, ids, prefill=5, chunk=4), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["parallax", "softmax"])
def test_steps_on_default_backend_match_full_forward(kind):
    """The default backend: decode ops (parallax_decode / softmax_decode) in float32."""
    model = make_model(kind, backend="auto", dtype=torch.float32)
    ids = torch.randint(0, V, (3, 16))
    torch.testing.assert_close(stepwise_logits(model, ids, prefill=4), model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_greedy_generation_with_cache_equals_recomputation(kind):
    model = make_model(kind)
    prompt = torch.randint(0, V, (2, 9))
    cached = model.generate(prompt, max_new_tokens=12, temperature=0.0)
    recomputed = model.generate(prompt, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 21)
    assert torch.equal(cached[:, :9], prompt)
    assert torch.equal(cached, recomputed)
    # and each generated token is the argmax of the full forward over everything before it
    logits = model(cached[:, :-1])
    assert torch.equal(logits[:, 8:].argmax(-1), cached[:, 9:])


def test_greedy_generation_on_default_backend_float32():
    model = make_model("parallax", backend="auto", dtype=torch.float32, window_size=8)
    prompt = torch.randint(0, V, (3, 5))
    assert torch.equal(
        model.generate(prompt, 10, temperature=0.0), model.generate(prompt, 10, temperature=0.0, use_cache=False)
    )


def test_generation_through_the_public_ops():
    """attn_backend="triton" sends prefill and steps through parallax_attn / parallax_decode (the
    Triton kernels under the interpreter on CPU): tiny, fp32."""
    model = make_model("parallax", backend="triton", dtype=torch.float32, n_layers=1)
    ref = make_model("parallax", backend="reference", dtype=torch.float32, n_layers=1)
    ref.load_state_dict(model.state_dict())
    prompt = torch.randint(0, V, (2, 6))
    out = model.generate(prompt, 4, temperature=0.0)
    assert torch.equal(out, ref.generate(prompt, 4, temperature=0.0, use_cache=False))


def test_gqa_cache_holds_kv_heads_only():
    model = make_model("parallax")
    cache = model.init_cache(2, 10)
    assert len(cache.k) == 2 and cache.k[0].shape == (2, 10, 2, 16) and cache.v[1].shape == (2, 10, 2, 16)
    assert cache.dtype == torch.float64


@pytest.mark.parametrize("kind", ["parallax", "softmax", "lla"])
def test_sequences_of_different_lengths_in_one_cache(kind):
    """After truncate() the sequences of a batch have different lengths; steps (decode ops with
    per-sequence lengths) and chunks (one op call per sequence) continue each one correctly."""
    model = make_model(kind)
    ids = torch.randint(0, V, (2, 14))
    cache = model.init_cache(2, 20)
    model(ids[:, :10], cache)
    cache.truncate([10, 6])
    assert cache.seqlens.tolist() == [10, 6]
    nxt = torch.randint(0, V, (2, 3))
    step = model(nxt[:, :1], cache)
    chunk = model(nxt[:, 1:], cache)
    assert cache.lengths == [13, 9]
    for b, n in enumerate([10, 6]):
        seq = torch.cat([ids[b, :n], nxt[b]]).unsqueeze(0)
        full = model(seq)
        torch.testing.assert_close(step[b], full[0, n : n + 1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(chunk[b], full[0, n + 1 :], rtol=1e-9, atol=1e-9)


def test_eos_stops_and_pads():
    model = make_model("softmax")
    prompt = torch.randint(0, V, (2, 4))
    free = model.generate(prompt, 8, temperature=0.0)
    eos = int(free[0, 6])  # the third generated token of sequence 0
    out = model.generate(prompt, 8, temperature=0.0, eos_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0].item()
    assert torch.equal(out[0, : 4 + first + 1], free[0, : 4 + first + 1])
    assert (out[0, 4 + first :] == eos).all()  # padded with eos after it
    # sequence 1 runs on until it too emits eos or the budget ends
    seq1 = out[1, 4:]
    hits = (seq1 == eos).nonzero()
    if len(hits):
        assert (seq1[hits[0].item() :] == eos).all()
    assert out.shape[1] <= 12


def test_sampling_is_reproducible_and_respects_top_k():
    model = make_model("parallax", dtype=torch.float32)
    prompt = torch.randint(0, V, (2, 4))
    a = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 6, temperature=1.0, top_k=1), model.generate(prompt, 6, temperature=0.0))
    logits = torch.randn(4, V)
    allowed = logits.topk(3, dim=-1).indices
    for _ in range(5):
        token = sample_next(logits, 0.7, 3)
        assert (allowed == token[:, None]).any(-1).all()


def test_one_dimensional_prompt_and_zero_new_tokens():
    model = make_model("softmax")
    prompt = torch.randint(0, V, (5,))
    out = model.generate(prompt, 3, temperature=0.0)
    assert out.shape == (8,) and torch.equal(out[:5], prompt)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_cache_dtype_follows_autocast():
    model = make_model("parallax", backend="auto", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.init_cache(1, 8)
        assert cache.dtype == torch.bfloat16
        out = model.generate(torch.randint(0, V, (1, 4)), 4, temperature=0.0)
    assert out.shape == (1, 8)


def test_generation_errors_name_the_problem():
    model = make_model("parallax")
    prompt = torch.randint(0, V, (1, 30))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt[:, :4], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt[:, :4], 2, top_k=0)
    with pytest.raises(ValueError, match="prompt token ids"):
        model.generate(torch.tensor([[1, V]]), 2)
    with pytest.raises(ValueError, match="eos_id"):
        model.generate(prompt[:, :4], 2, eos_id=V)
    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(1, 33)
    cache = model.init_cache(1, 6)
    model(prompt[:, :5], cache)
    with pytest.raises(ValueError, match="exceed the cache's max_len 6"):
        model(prompt[:, :2], cache)
    with pytest.raises(ValueError, match="holds 1 sequences but the input has 2"):
        model(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate([7])
