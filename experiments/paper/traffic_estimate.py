"""Rough cost model of one eager training step, for sizing the grid before a GPU is at hand.

    python experiments/paper/traffic_estimate.py                     # small preset, vocab 16384, both attentions

Runs forward + backward of the decoder on the CPU under bf16 autocast with a TorchDispatchMode that adds up
(a) the FLOPs of every matrix multiply and (b) the bytes read and written by every other ATen op, the
memory-bound traffic that an uncompiled model pays per token. The attention op is replaced by a stand-in
(its kernels are costed from benchmarks/bench_train.py instead), and the counts are differenced between two
batch sizes so that per-step costs (weight casts, gradient accumulation) drop out of the per-token figures.

The numbers are an upper bound for CUDA: on the CPU F.rms_norm decomposes into several ops that CUDA runs
as one fused kernel. Divide the bytes by a realistic bandwidth (about 3 TB/s on an H200) and the FLOPs by a
realistic matmul rate (about 550 TFLOP/s) to get the time per token.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import parallax_lightning.attention as attention_module
from parallax_lightning.model import Decoder
from parallax_lightning.model_sizes import preset

MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}
FREE = {  # views and metadata: no memory traffic
    "aten.view.default",
    "aten._unsafe_view.default",
    "aten.t.default",
    "aten.transpose.int",
    "aten.expand.default",
    "aten.detach.default",
    "aten.split.Tensor",
    "aten.slice.Tensor",
    "aten.unsqueeze.default",
    "aten.permute.default",
    "aten.alias.default",
    "aten.select.int",
    "aten.squeeze.dim",
    "aten._reshape_alias.default",
    "aten.as_strided.default",
}


class _StandInAttention(torch.autograd.Function):
    """Output shaped like the attention's, one copy of traffic; gradients of the right shapes."""

    @staticmethod
    def forward(ctx, q, r, k, v):
        ctx.shapes = (k.shape, v.shape)
        ctx.has_r = r is not None
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        # a gradient for r too, so W_R's backward matmuls are counted
        return grad, grad if ctx.has_r else None, grad.new_zeros(ctx.shapes[0]), grad.new_zeros(ctx.shapes[1])


def _stand_in(kind, backend, q, r, k, v, **kwargs):
    return _StandInAttention.apply(q, r, k, v)


class Counter_(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.flops = 0
        self.bytes = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in FREE:
            return out
        if name in MATMULS:
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            return out
        tensors = [
            x for x in (*args, *(out if isinstance(out, (tuple, list)) else (out,))) if isinstance(x, torch.Tensor)
        ]
        tensors += [y for x in args if isinstance(x, (list, tuple)) for y in x if isinstance(y, torch.Tensor)]
        self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def count(attention: str, batch: int, seq_len: int, vocab: int, size: str) -> Counter_:
    config = preset(size, vocab_size=vocab, max_seq_len=seq_len, attention=attention, attn_backend="reference")
    model = Decoder(config)
    x = torch.randint(0, vocab, (batch, seq_len))
    y = torch.randint(0, vocab, (batch, seq_len))
    with Counter_() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1)).backward()
    return counter


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256, help="short: only the per-token costs are wanted")
    p.add_argument("--bandwidth-tbs", type=float, default=3.0)
    p.add_argument("--matmul-tflops", type=float, default=550.0)
    args = p.parse_args(argv)
    original = attention_module.attend
    attention_module.attend = _stand_in
    try:
        for attention in ("softmax", "parallax"):
            one = count(attention, 1, args.seq_len, args.vocab_size, args.preset)
            two = count(attention, 2, args.seq_len, args.vocab_size, args.preset)
            n = args.seq_len
            flops = (two.flops - one.flops) / n
            traffic = (sum(two.bytes.values()) - sum(one.bytes.values())) / n
            us = flops / (args.matmul_tflops * 1e12) * 1e6 + traffic / (args.bandwidth_tbs * 1e12) * 1e6
            print(
                f"{attention:9s} per token: matmuls {flops / 1e9:.3f} GFLOP, other ops {traffic / 1e6:.2f} MB "
                f"-> {us:.2f} us/token before attention and launch overheads (~{1e6 / us:,.0f} tokens/s)"
            )
            top = Counter({k: (two.bytes[k] - one.bytes.get(k, 0)) / n for k in two.bytes}).most_common(6)
            print("          " + ", ".join(f"{k.removeprefix('aten.')} {v / 1e3:.0f} KB" for k, v in top))
    finally:
        attention_module.attend = original


if __name__ == "__main__":
    main()
