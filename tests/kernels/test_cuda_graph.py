"""The Parallax training op under CUDA-graph capture: a captured forward+backward replays to what eager computes.

Capture is how a training step sheds its host cost (torch.compile's "reduce-overhead" mode captures too), so the op
must launch nothing that capture forbids (host synchronisation, pageable copies) and must read its inputs only
through the addresses the graph recorded. GPU only: skipped on CPU machines, run on the GPU with
``pytest -m gpu tests/kernels/test_cuda_graph.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_rel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")]


def _capture(fn, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Warm fn up on a side stream (Triton compiles and allocates there), then capture one call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("T", "Hq", "Hkv", "D", "window"), [(200, 4, 2, 64, None), (130, 2, 2, 128, 48)])
def test_captured_op_replays_like_eager(dtype, T, Hq, Hkv, D, window):
    from parallax_kernels import parallax_attn

    B = 2
    shapes = [(B, T, Hq, D), (B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D)]
    static = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes]
    static_do = torch.randn(B, T, Hq, D, device="cuda", dtype=dtype)
    out = {}

    def step():
        o = parallax_attn(*static, window_size=window)
        out["o"] = o
        out["grads"] = torch.autograd.grad(o, static, static_do)

    graph = _capture(step)
    for _ in range(2):  # new values in the captured buffers, then replay
        with torch.no_grad():
            for x in static:
                x.copy_(torch.randn_like(x))
            static_do.copy_(torch.randn_like(static_do))
        graph.replay()
        torch.cuda.synchronize()
        leaves = [x.detach().clone().requires_grad_() for x in static]
        want = parallax_attn(*leaves, window_size=window)
        want_grads = torch.autograd.grad(want, leaves, static_do)
        assert torch.equal(out["o"], want), "replayed output differs from eager"
        for name, g, w in zip(("dq", "dr", "dk", "dv"), out["grads"], want_grads):
            assert torch.equal(g, w), f"replayed {name} differs from eager"


def test_captured_decoder_step_replays_like_eager():
    """A small Parallax decoder's forward and backward through torch.cuda.make_graphed_callables: logits and
    every parameter gradient of a replay equal an eager step on the same weights and tokens."""
    from parallax_lightning.model import Decoder, DecoderConfig

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=128, max_seq_len=96, d_model=128, n_layers=2, n_heads=2, attn_backend="triton")
    eager = Decoder(config).cuda()
    graphed = Decoder(config).cuda()
    graphed.load_state_dict(eager.state_dict())
    x = torch.randint(0, 128, (3, 96), device="cuda")
    graphed_fwd = torch.cuda.make_graphed_callables(graphed, (x,))
    for _ in range(2):
        x = torch.randint(0, 128, (3, 96), device="cuda")
        for model, fn in ((eager, eager), (graphed, graphed_fwd)):
            model.zero_grad(set_to_none=True)
            logits = fn(x)
            logits.float().square().mean().backward()
            if model is eager:
                want, want_grads = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        assert_close_rel(logits.detach(), want, 1e-6, "logits")
        for name, p in graphed.named_parameters():
            assert_close_rel(p.grad, want_grads[name], 1e-5, f"grad of {name}")


def test_capture_refuses_host_reads_with_a_named_error():
    """Packed batches without max_seqlen read the offsets on the host, which capture forbids: the op must
    say so rather than fail inside CUDA."""
    from parallax_kernels import parallax_attn

    q, r, k, v = (torch.randn(1, 64, 2, 64, device="cuda", requires_grad=True) for _ in range(4))
    cu = torch.tensor([0, 30, 64], dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="max_seqlen"), torch.cuda.graph(graph):
        parallax_attn(q, r, k, v, cu_seqlens=cu)
