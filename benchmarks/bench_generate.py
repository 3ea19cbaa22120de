"""Generation speed: tokens/s of Decoder.generate (prefill + KV-cache decode steps), Parallax against softmax.

    python benchmarks/bench_generate.py --out gen.json                       # small preset, batch 1 and 32, bf16
    python benchmarks/bench_generate.py --preset tiny --device cpu --new_tokens 16 --out /tmp/g.json   # smoke

For each attention kind and batch size: a decoder of the preset with random weights (speed does not depend
on them), a random prompt of --prompt_len tokens, greedy decoding of --new_tokens tokens (no end-of-text
token, so every sequence runs the whole length). One untimed run first (Triton compiles there), then the
median of --repeats timed runs. Reported per run: the total time, the prefill alone (generate with one new
token), and decode tokens/s = batch × (new_tokens − 1) / (total − prefill). Ratios are Parallax / softmax
(above 1: Parallax faster). The softmax rows use the same preset with attention=softmax, and with
--param_matched also the parameter-matched softmax control (1.5× query heads).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from parallax_lightning.model import Decoder
from parallax_lightning.model_sizes import preset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(model: Decoder, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Median seconds of model.generate(prompt, new_tokens) (greedy, KV cache)."""
    device = prompt.device
    model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0)  # warm-up: compilation, allocator
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(kind_name: str, config, batch: int, args, device, dtype) -> dict:
    torch.manual_seed(0)
    model = Decoder(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (batch, args.prompt_len), device=device)
    total = time_generate(model, prompt, args.new_tokens, args.repeats)
    prefill = time_generate(model, prompt, 1, args.repeats)
    decode = max(total - prefill, 1e-9)
    row = {
        "model": kind_name,
        "attention": config.attention,
        "batch": batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "total_s": total,
        "prefill_s": prefill,
        "tokens_per_s": batch * args.new_tokens / total,
        "decode_tokens_per_s": batch * (args.new_tokens - 1) / decode,
        "decode_ms_per_step": 1e3 * decode / max(args.new_tokens - 1, 1),
    }
    print(
        f"{kind_name:28s} B{batch:<3d} total {total * 1e3:9.1f} ms  prefill {prefill * 1e3:8.1f} ms  "
        f"{row['tokens_per_s']:10.1f} tok/s  decode {row['decode_tokens_per_s']:10.1f} tok/s "
        f"({row['decode_ms_per_step']:.3f} ms/step)",
        flush=True,
    )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="a preset size: tiny, small, base")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--param_matched", action="store_true", help="also the parameter-matched softmax control")
    parser.add_argument("--out", required=True, help="write the rows and ratios as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # the CPU reference path is meant for fp32
    if args.new_tokens < 2:
        parser.error("--new_tokens must be at least 2 (one prefill token, then decode steps)")
    models = {
        f"{args.preset}-parallax": preset(args.preset, max_seq_len=args.prompt_len + args.new_tokens),
        f"{args.preset}-softmax": preset(
            args.preset, attention="softmax", max_seq_len=args.prompt_len + args.new_tokens
        ),
    }
    if args.param_matched:
        models[f"{args.preset}-softmax-param-matched"] = preset(
            f"{args.preset}-softmax-param-matched", max_seq_len=args.prompt_len + args.new_tokens
        )
    rows = [bench(name, config, b, args, device, dtype) for b in args.batches for name, config in models.items()]
    ratios = {}
    for b in args.batches:
        by = {r["model"]: r for r in rows if r["batch"] == b}
        par = by[f"{args.preset}-parallax"]
        for name, r in by.items():
            if r["attention"] == "softmax":
                key = f"B{b}:parallax/{name.removeprefix(args.preset + '-')}"
                ratios[key] = {
                    "tokens_per_s": par["tokens_per_s"] / r["tokens_per_s"],
                    "decode_tokens_per_s": par["decode_tokens_per_s"] / r["decode_tokens_per_s"],
                }
                print(
                    f"{key}: tokens/s ratio {ratios[key]['tokens_per_s']:.3f}, "
                    f"decode tokens/s ratio {ratios[key]['decode_tokens_per_s']:.3f}"
                )
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
    }
    Path(args.out).write_text(json.dumps({"env": env, "args": vars(args), "rows": rows, "ratios": ratios}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
