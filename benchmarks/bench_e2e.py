"""End-to-end training throughput: the platform's decoder with Parallax attention vs SDPA softmax, eager, compiled
and replayed from CUDA graphs, beside a bare compiled PyTorch loop of the same sizes, one process.

    python benchmarks/bench_e2e.py                          # small preset, T=1024 and 2048, every mode
    python benchmarks/bench_e2e.py --seq-lens 1024 --optimizer muon --modes eager compile
    python benchmarks/bench_e2e.py --preset tiny --tokens-per-step 2048 --seq-lens 128 --vocab-size 256  # host-bound size
    python benchmarks/bench_e2e.py --device cpu --preset tiny --seq-lens 64 --tokens-per-step 256 --seconds 0.5 --modes eager

One training step = forward under bf16 autocast, fp32 cross-entropy, backward, gradient clipping at 1.0 and
the optimizer step (the platform's `build_optimizer`): what LanguageModelModule does, without Lightning, the
data loader or logging. The batch is random token ids (speed does not depend on the values), `--tokens-per-step`
tokens at every sequence length. Each variant warms up (compiling the Triton kernels), then runs steps for at
least `--seconds`, timed with CUDA events around the whole loop (no synchronisation inside it).

Modes: `eager`; `compile` (torch.compile of the decoder, default mode); `graphs` (torch.compile with
mode="reduce-overhead": forward and backward replayed from CUDA graphs, the optimizer step eager). `bare` is the
ceiling: a minimal Qwen3-like decoder written below in plain PyTorch (SDPA softmax, one fused qkv projection),
compiled, with torch's fused AdamW (and torch.optim.Muon for hidden matrices with --optimizer muon) — what the
hardware gives a loop with no platform around it.

MFU = tokens/s x `flops_per_token(config, T)` (matmuls 6N plus attention counted by hand: Parallax's four
attention matmuls against softmax's two) / the GPU's dense bf16 peak. So the two variants' MFU share one
FLOP count convention.

The full log and bench_e2e.json go to $OUT when it is set; the short table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from _common import RunLog, save_outputs

from parallax_lightning.model import Decoder
from parallax_lightning.model_sizes import count_params, flops_per_token, preset
from parallax_lightning.optim import OptimizerConfig, build_optimizer

log = RunLog()
LOG = log.lines
VARIANTS = ("softmax", "parallax")
MODES = ("eager", "compile", "graphs", "bare")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from parallax_lightning.callbacks import peak_flops_for

    return peak_flops_for(device, "bf16-mixed")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ bare loop
class _BareBlock(torch.nn.Module):
    """Pre-norm block: fused qkv, per-head RMSNorm on q and k, RoPE, SDPA, SwiGLU — the platform's softmax
    decoder's math in the fewest modules."""

    def __init__(self, c):
        super().__init__()
        nn = torch.nn
        self.h, self.hkv, self.hd = c.n_heads, c.kv_heads, c.dim_head
        self.norm1, self.norm2 = nn.RMSNorm(c.d_model, eps=c.norm_eps), nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.qkv = nn.Linear(c.d_model, (self.h + 2 * self.hkv) * self.hd, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(self.hd, eps=c.norm_eps), nn.RMSNorm(self.hd, eps=c.norm_eps)
        self.o = nn.Linear(self.h * self.hd, c.d_model, bias=False)
        self.gate_up = nn.Linear(c.d_model, 2 * c.hidden, bias=False)
        self.down = nn.Linear(c.hidden, c.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, -1, self.hd).split([self.h, self.hkv, self.hkv], dim=2)
        q, k = _rope(self.q_norm(q), cos, sin), _rope(self.k_norm(k), cos, sin)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=self.h != self.hkv
        )
        x = x + self.o(o.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _rope(x, cos, sin):
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(x.dtype)


class BareDecoder(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = torch.nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = torch.nn.ModuleList(_BareBlock(c) for _ in range(c.n_layers))
        self.norm = torch.nn.RMSNorm(c.d_model, eps=c.norm_eps)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.dim_head, 2).float() / c.dim_head))
        angles = torch.outer(torch.arange(c.max_seq_len).float(), inv)[None, :, None, :]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=c.init_std)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.cos[:, :T], self.sin[:, :T])
        return self.norm(x) @ self.embed.weight.T  # tied head


class _Optimizers:
    """Several torch optimizers stepped as one."""

    def __init__(self, *opts):
        self.opts = opts

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def bare_optimizer(model, name: str):
    hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed")]
    rest = [p for n, p in model.named_parameters() if p.dim() != 2 or n.startswith("embed")]
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    return _Optimizers(
        torch.optim.Muon(hidden, lr=1e-3, weight_decay=0.1, adjust_lr_fn="original"),
        torch.optim.AdamW(rest, lr=1e-4, fused=True),
    )


# ------------------------------------------------------------------------------------------------ measure
def measure(args, attention: str, seq_len: int, device: torch.device, mode: str = "eager") -> dict:
    """Build the model, warm up, time steps; returns one result row."""
    config = preset(args.preset, vocab_size=args.vocab_size, max_seq_len=seq_len, attention=attention)
    torch.manual_seed(0)
    if mode == "bare":
        model = BareDecoder(config).to(device)
        optimizer = bare_optimizer(model, args.optimizer)
        model = torch.compile(model)
    else:
        model = Decoder(config).to(device)
        optimizer = build_optimizer(
            model, OptimizerConfig(name=args.optimizer, adamw_lr=1e-4, lr=1e-3, weight_decay=0.1), verbose=False
        )
        if mode == "compile":
            model.compile()
        elif mode == "graphs":
            model.compile(mode="reduce-overhead")
    batch = max(1, args.tokens_per_step // seq_len)
    x = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    amp = device.type == "cuda" or args.amp_on_cpu

    def step():
        if mode == "graphs":
            torch.compiler.cudagraph_mark_step_begin()
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
        "name": attention if mode != "bare" else "bare-softmax",
        "mode": mode,
        "seq_len": seq_len,
        "batch": batch,
        "steps": steps,
        "tokens_per_s": tps,
        "step_ms": 1000 * elapsed / steps,
        "flops_per_token": fpt,
        "mfu": tps * fpt / peak if peak else None,
        "warmup_s": warm_s,
        "params_non_embedding": count_params(getattr(model, "_orig_mod", model)),
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": float(loss.item()),
        "config": dataclasses.asdict(config),
    }
    return row  # the model, optimizer and batch go with this frame; the caller empties the CUDA cache


def table(rows: list[dict], ratios: list[dict]) -> list[str]:
    lines = [f"{'variant':<14}{'mode':<9}{'T':>6}{'batch':>7}{'tokens/s':>13}{'MFU':>8}{'step ms':>10}{'peak GB':>9}"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "—"
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "—"
        lines.append(
            f"{r['name']:<14}{r['mode']:<9}{r['seq_len']:>6}{r['batch']:>7}{r['tokens_per_s']:>13,.0f}{mfu:>8}"
            f"{r['step_ms']:>10.1f}{mem:>9}"
        )
    for q in ratios:
        lines.append(f"T={q['seq_len']} {q['what']}: {q['ratio']:.3f}")
    return lines


def ratio_rows(rows: list[dict], seq_lens) -> list[dict]:
    """Parallax/softmax tokens/s and MFU per mode, each mode against eager, and the platform against the bare loop."""
    out = []
    for T in seq_lens:
        got = {(r["name"], r["mode"]): r for r in rows if r["seq_len"] == T}

        def add(what, a, b, key="tokens_per_s", got=got, T=T):
            if a in got and b in got and got[a][key] and got[b][key]:
                out.append({"seq_len": T, "what": what, "ratio": got[a][key] / got[b][key]})

        for mode in MODES[:3]:
            add(f"{mode}: parallax/softmax tokens/s", ("parallax", mode), ("softmax", mode))
            add(f"{mode}: parallax/softmax MFU", ("parallax", mode), ("softmax", mode), key="mfu")
        for attention in VARIANTS:
            for mode in MODES[1:3]:
                add(f"{attention}: {mode}/eager tokens/s", (attention, mode), (attention, "eager"))
            for mode in MODES[:3]:
                add(f"{attention} {mode} / bare loop tokens/s", (attention, mode), ("bare-softmax", "bare"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="parallax_lightning.model_sizes.preset size (small, base, tiny)")
    p.add_argument("--vocab-size", type=int, default=16384, help="the paper grid's BPE vocabulary")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--tokens-per-step", type=int, default=32768, help="batch x seq_len (the paper grid's 32 x 1024)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="see the module docstring")
    p.add_argument("--compile", action="store_true", help="the same as --modes compile (kept for old commands)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per variant (at least --min-steps)")
    p.add_argument("--min-steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=300.0, help="skip what is left once this much time has passed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp-on-cpu", action="store_true", help="bf16 autocast on CPU too (off: CPU runs fp32)")
    args = p.parse_args(argv)
    if args.compile:
        args.modes = ["compile"]
    device = torch.device(args.device)

    log(
        f"bench_e2e: {args.preset} preset, vocab {args.vocab_size}, {args.tokens_per_step} tokens/step, {args.optimizer}"
    )
    log(
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}; "
        f"torch {torch.__version__}; python {platform.python_version()}"
    )
    rows, errors = [], []
    runs = [(T, m, a) for T in args.seq_lens for m in args.modes for a in (VARIANTS if m != "bare" else ("softmax",))]
    for seq_len, mode, attention in runs:
        what = f"{attention} {mode} T={seq_len}"
        if log.elapsed() > args.budget_s:
            log(f"{what}: skipped, the {args.budget_s:.0f} s budget is spent")
            continue
        try:
            row = measure(args, attention, seq_len, device, mode)
        except Exception as e:  # one failing variant must not hide the others' numbers
            errors.append(f"{what}: {type(e).__name__}: {e}")
            log(f"{what}: FAILED {type(e).__name__}: {e}")
            log(traceback.format_exc())
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
        log(
            f"{what} B={row['batch']}: {row['tokens_per_s']:,.0f} tokens/s{mfu}, "
            f"{row['step_ms']:.1f} ms/step over {row['steps']} steps (warm-up {row['warmup_s']:.1f} s, "
            f"loss {row['final_loss']:.3f})"
        )
    ratios = ratio_rows(rows, args.seq_lens)
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
        save_outputs(out_dir, "bench_e2e", result, LOG)
    return 1 if errors or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
