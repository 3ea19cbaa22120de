"""Compile the Parallax training kernels for Hopper (sm90) without a GPU; report registers and spills.
(--arch 80 does the same for the table used on pre-Hopper GPUs.)

    python benchmarks/sm90_spills.py                    # the configs the op uses (the Hopper table)
    python benchmarks/sm90_spills.py --sweep            # also every candidate bench_train.py --sweep times
    python benchmarks/sm90_spills.py --dims 256 --json  # machine-readable, one head dim

Triton compiles for a target GPU without one being present, and its wheel ships ptxas and nvdisasm. The report
gives registers, spilled bytes, spill instructions inside each tile loop (a spill there costs local-memory
traffic on every tile; outside, once per program) and shared memory (a config over the limit fails at launch).
Use it to rule out configs before spending GPU time, not to rank them: on the H200, tiles that spill some
registers were faster than narrower spill-free ones (benchmarks/RESULTS.md); only timing ranks configs.
It reads Triton's compiler API, which is not stable across releases (written against Triton 3.7), and must
run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sm90_spills.py compiles real kernels: run it without TRITON_INTERPRET=1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from parallax_kernels.parallax import triton_train as tt

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
KERNELS = {"fwd": tt._fwd_kernel, "dq": tt._bwd_dq_kernel, "dkv": tt._bwd_dkv_kernel}
POINTERS = ("Q", "R", "K", "V", "O", "VBAR", "DO", "DQ", "DR", "DK", "DV")
STATS = ("LSE", "TBAR", "DELTA_T", "DELTA_B")


@dataclass
class Report:
    kind: str
    head_dim: int
    config: tuple
    registers: int
    spill_stores: int  # bytes a thread, whole kernel
    spill_loads: int
    loop_spills: dict  # tile loop -> (local stores, local loads) instructions inside it
    shared_bytes: int

    @property
    def spills_in_loops(self) -> bool:
        return any(st or ld for st, ld in self.loop_spills.values())

    @property
    def spills_in_full_tiles(self) -> bool:
        """Spills in the loop over full (unmasked) tiles: the one nearly all the time is spent in."""
        st, ld = self.loop_spills.get("full", (1, 1))
        return bool(st or ld)


def _loop_names(kind: str, causal: bool, window: bool) -> list[str]:
    """The tile loops in program order (Triton emits them in source order): see the kernels' phases."""
    if kind == "dkv":
        return (["diagonal"] if causal else []) + ["full", "edge"]
    return (["window edge"] if window else []) + ["full", "diagonal"]


def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Argument types, and the 16-divisibility the JIT infers for aligned pointers and strides."""
    params = list(inspect.signature(kernel.fn).parameters)
    sig, aligned = {}, {}
    for i, p in enumerate(params):
        if p in constexprs:
            sig[p] = "constexpr"
        elif p in POINTERS:
            sig[p] = "*" + dtype
        elif p in STATS:
            sig[p] = "*fp32"
        elif p == "CU_SEQLENS":
            sig[p] = "*i32"
        elif p in ("qk_scale2", "scale"):
            sig[p] = "fp32"
        else:
            sig[p] = "i32"
        if p in POINTERS or p in STATS or re.fullmatch(r"s[a-z]+_[bth]", p):
            aligned[(i,)] = [["tt.divisibility", 16]]
    return sig, aligned


def compile_report(
    kind, config: tt.KernelConfig, head_dim: int, dtype="bf16", causal=True, window=False, target=TARGET
):
    kernel = KERNELS[kind]
    params = list(inspect.signature(kernel.fn).parameters)
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=tt._block_d(head_dim), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=causal, WINDOW=window, VARLEN=False, DOT_PREC="ieee" if dtype == "fp32" else "tf32",
    )  # fmt: skip
    if kind == "fwd":
        constexprs.update(SAVE_STATS=True, LAZY_RESCALE=config.lazy_rescale)
    constexprs["TMA"] = config.tma
    for p in params:  # the JIT specializes unit strides (contiguous head dim)
        if re.fullmatch(r"s[a-z]+_d", p):
            constexprs[p] = 1
    sig, aligned = _signature(kernel, dtype, constexprs)
    if config.tma:  # the tensors the tile loop reads arrive as TMA descriptors of (1, rows, 1, BLOCK_D) blocks
        names, rows = (("Q", "R", "DO"), config.block_m) if kind == "dkv" else (("K", "V"), config.block_n)
        for p in names:
            sig[p] = f"tensordesc<{dtype}[1,{rows},1,{constexprs['BLOCK_D']}]>"
            aligned.pop((params.index(p),), None)
    compiled = triton.compile(
        ASTSource(kernel, sig, constexprs, aligned),
        target=target,
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    arch = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"  # wgmma needs the 90a variant
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        ptxas = subprocess.run(
            [os.path.join(BIN, "ptxas"), "-v", f"-arch={arch}", ptx, "-o", os.path.join(tmp, "x")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        sass = subprocess.run(
            [os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True
        ).stdout
    regs = int(re.search(r"Used (\d+) registers", ptxas).group(1))
    st, ld = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas).groups())
    loops = _loop_spills(sass)
    names = _loop_names(kind, causal, window)
    if len(loops) != len(names):  # the compiler merged or split loops: keep them, unnamed
        names = [f"loop {i}" for i in range(len(loops))]
    return Report(kind, head_dim, tuple(asdict(config).values()), regs, st, ld, dict(zip(names, loops)),
                  compiled.metadata.shared)  # fmt: skip


def _loop_spills(sass: str) -> list:
    """(STL, LDL) counts inside each innermost loop (a backward branch enclosing no other loop)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > 20:  # skip trap self-loops
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a < c and d < b for c, d in loops)]
    count = lambda a, b, op: sum(bool(re.search(rf"\b{op}\b", line)) for line in lines[a : b + 1])  # noqa: E731
    return [(count(a, b, "STL"), count(a, b, "LDL")) for a, b in inner]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="64,128,256", help="head dims (comma separated)")
    ap.add_argument("--kinds", default="fwd,dq,dkv")
    ap.add_argument("--sweep", action="store_true", help="also the candidates of bench_train.py --sweep")
    ap.add_argument("--json", action="store_true", help="one JSON object a line")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 (Hopper table) or 80 (others)")
    args = ap.parse_args()
    candidates = {}
    if args.sweep:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_train

        candidates = {"fwd": bench_train.FWD_CANDIDATES, "dq": bench_train.DQ_CANDIDATES,
                      "dkv": bench_train.DKV_CANDIDATES}  # fmt: skip
    for d in (int(x) for x in args.dims.split(",")):
        table = (tt._HOPPER if args.arch >= 90 else tt._OTHER)[tt._dim_class(d)]
        for kind in args.kinds.split(","):
            configs = [getattr(table, kind)]
            configs += [tt.KernelConfig(*c) for c in candidates.get(kind, {}).get(tt._dim_class(d), [])]
            for i, cfg in enumerate(dict.fromkeys(configs)):
                try:
                    rep = compile_report(kind, cfg, d, target=GPUTarget("cuda", args.arch, 32))
                except Exception as e:  # report and go on: one config failing to compile is a finding
                    print(f"{kind:3s} D{d:<3d} {cfg}: COMPILE FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                if args.json:
                    flags = dict(spills_in_loops=rep.spills_in_loops, spills_in_full_tiles=rep.spills_in_full_tiles)
                    print(json.dumps(dict(asdict(rep), table=i == 0, **flags)))
                else:
                    tag = "table" if i == 0 else "     "
                    print(f"{tag} {kind:3s} D{d:<3d} {rep.config!s:28s} regs {rep.registers:3d}  spill "
                          f"{rep.spill_stores}/{rep.spill_loads} B  in tile loops (STL, LDL) {rep.loop_spills}  "
                          f"smem {rep.shared_bytes // 1024} KiB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
