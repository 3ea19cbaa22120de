"""End-to-end training throughput: the same decoder with Parallax attention vs SDPA softmax, one process.

    python benchmarks/bench_e2e.py                          # small preset, T=1024 and 2048, AdamW (~30 s on an H200)
    python benchmarks/bench_e2e.py --seq-lens 1024 --optimizer muon
    python benchmarks/bench_e2e.py --device cpu --preset tiny --seq-lens 64 --tokens-per-step 256 --seconds 0.5

One training step = forward under bf16 autocast, fp32 cross-entropy, backward, gradient clipping at 1.0 and
the optimizer step (the platform's `build_optimizer`): what LanguageModelModule does, without Lightning, the
data loader or logging. The batch is random token ids (speed does not depend on the values), `--tokens-per-step`
tokens at every sequence length. Each variant warms up (compiling the Triton kernels), then runs steps for at
least `--seconds`, timed with CUDA events around the whole loop (no synchronisation inside it).

MFU = tokens/s x `flops_per_token(config, T)` (matmuls 6N plus attention counted by hand: Parallax's four
attention matmuls against softmax's two) / the GPU's dense bf16 peak. So the two variants' MFU share one
FLOP count convention, and the tokens/s ratio is the end-to-end cost of Parallax (target: >= 0.8).

The full log and bench_e2e.json go to $OUT when it is set; the short table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from parallax_lightning.model import Decoder, count_params, flops_per_token, preset
from parallax_lightning.optim import OptimizerConfig, build_optimizer

LOG: list[str] = []
T0 = time.time()
VARIANTS = ("softmax", "parallax")


def log(msg: str = "") -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}" if msg else ""
    print(line, flush=True)
    LOG.append(line)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from parallax_lightning.callbacks import peak_flops_for

    return peak_flops_for(torch.cuda.get_device_name(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, attention: str, seq_len: int, device: torch.device) -> dict:
    """Build the model, warm up, time steps; returns one result row."""
    config = preset(args.preset, vocab_size=args.vocab_size, max_seq_len=seq_len, attention=attention)
    torch.manual_seed(0)
    model = Decoder(config).to(device)
    if args.compile:
        model.compile()
    optimizer = build_optimizer(
        model, OptimizerConfig(name=args.optimizer, adamw_lr=1e-4, lr=1e-3, weight_decay=0.1), verbose=False
    )
    batch = max(1, args.tokens_per_step // seq_len)
    x = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    amp = device.type == "cuda" or args.amp_on_cpu

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    _sync(device)
    warm_s = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"{attention} T={seq_len}: non-finite loss {loss.item()} during warm-up")
    # How many steps fill --seconds, from one timed step (the warm-up steps included compilation).
    one = time.perf_counter()
    step()
    _sync(device)
    per_step = time.perf_counter() - one
    steps = max(args.min_steps, int(args.seconds / max(per_step, 1e-6)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - t
    tokens = steps * batch * seq_len
    tps = tokens / elapsed
    peak = peak_flops(device)
    fpt = flops_per_token(config, seq_len)
    row = {
        "name": attention,
        "seq_len": seq_len,
        "batch": batch,
        "steps": steps,
        "tokens_per_s": tps,
        "step_ms": 1000 * elapsed / steps,
        "flops_per_token": fpt,
        "mfu": tps * fpt / peak if peak else None,
        "warmup_s": warm_s,
        "params_non_embedding": count_params(model),
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": float(loss.item()),
        "config": dataclasses.asdict(config),
    }
    return row  # the model, optimizer and batch go with this frame; the caller empties the CUDA cache


def table(rows: list[dict], ratios: list[dict]) -> list[str]:
    lines = [f"{'variant':<10}{'T':>6}{'batch':>7}{'tokens/s':>13}{'MFU':>8}{'step ms':>10}{'peak GB':>9}"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "—"
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "—"
        lines.append(
            f"{r['name']:<10}{r['seq_len']:>6}{r['batch']:>7}{r['tokens_per_s']:>13,.0f}{mfu:>8}{r['step_ms']:>10.1f}{mem:>9}"
        )
    for q in ratios:
        verdict = "meets" if q["ratio"] >= 0.8 else "misses"
        lines.append(f"parallax / softmax tokens/s at T={q['seq_len']}: {q['ratio']:.3f} ({verdict} the 0.8 target)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="parallax_lightning.model.preset size (small, base, tiny)")
    p.add_argument("--vocab-size", type=int, default=16384, help="the paper grid's BPE vocabulary")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--tokens-per-step", type=int, default=32768, help="batch x seq_len (the paper grid's 32 x 1024)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--compile", action="store_true", help="torch.compile both decoders (adds compile time)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per variant (at least --min-steps)")
    p.add_argument("--min-steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=45.0, help="skip what is left once this much time has passed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp-on-cpu", action="store_true", help="bf16 autocast on CPU too (off: CPU runs fp32)")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    log(
        f"bench_e2e: {args.preset} preset, vocab {args.vocab_size}, {args.tokens_per_step} tokens/step, {args.optimizer}"
    )
    log(
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}; "
        f"torch {torch.__version__}; python {platform.python_version()}"
    )
    rows, errors = [], []
    for seq_len in args.seq_lens:
        for attention in VARIANTS:
            if time.time() - T0 > args.budget_s:
                log(f"{attention} T={seq_len}: skipped, the {args.budget_s:.0f} s budget is spent")
                continue
            try:
                row = measure(args, attention, seq_len, device)
            except Exception as e:  # one failing variant must not hide the others' numbers
                errors.append(f"{attention} T={seq_len}: {type(e).__name__}: {e}")
                log(f"{attention} T={seq_len}: FAILED {type(e).__name__}: {e}")
                log(traceback.format_exc())
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
            log(
                f"{attention} T={seq_len} B={row['batch']}: {row['tokens_per_s']:,.0f} tokens/s{mfu}, "
                f"{row['step_ms']:.1f} ms/step over {row['steps']} steps (warm-up {row['warmup_s']:.1f} s, "
                f"loss {row['final_loss']:.3f})"
            )
    ratios = []
    for seq_len in args.seq_lens:
        got = {r["name"]: r for r in rows if r["seq_len"] == seq_len}
        if "softmax" in got and "parallax" in got:
            ratios.append(
                {
                    "seq_len": seq_len,
                    "parallax_tokens_per_s": got["parallax"]["tokens_per_s"],
                    "softmax_tokens_per_s": got["softmax"]["tokens_per_s"],
                    "ratio": got["parallax"]["tokens_per_s"] / got["softmax"]["tokens_per_s"],
                }
            )
    log()
    for line in table(rows, ratios):
        log(line)
    for e in errors:
        log(f"error: {e}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        result = {
            "args": vars(args),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "results": rows,
            "ratios": ratios,
            "errors": errors,
        }
        with open(os.path.join(out_dir, "bench_e2e.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out_dir, "bench_e2e.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")
    return 1 if errors or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
