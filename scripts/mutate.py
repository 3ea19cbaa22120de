"""Mutation run over the core: apply one small wrong change at a time, run the tests meant to notice it, and
report which mutants the suite kills. Not part of the default test run.

    PYTHONPATH=$PWD:$PWD/.shim .venv/bin/python scripts/mutate.py            # every mutant
    PYTHONPATH=$PWD:$PWD/.shim .venv/bin/python scripts/mutate.py -k muon    # names containing "muon"
    PYTHONPATH=$PWD:$PWD/.shim .venv/bin/python scripts/mutate.py --list     # names only
    ... scripts/mutate.py -k muon/wd --tests tests/muon/test_optimizer.py     # another test selection

Each mutant is (name, file, original snippet, mutated snippet, pytest selection). The original must occur
exactly once in the file. The file is rewritten in place and ALWAYS restored from the bytes read before the
change (in a `finally`; an interrupted run can also be undone with `git checkout -- <file>`). A mutant is
killed when its selection fails (or runs past --timeout), survived when it passes. The selections are small
(seconds to about a minute on a CPU under the Triton interpreter); tests/MUTATION.md holds the last run's
table and argues the equivalent survivors. The exit status is the number of survivors not marked equivalent.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REF = "kernels/parallax/reference.py"
TRAIN = "kernels/parallax/triton_train.py"
DEC = "kernels/parallax/triton_decode.py"
NS = "parallax_muon/newton_schulz.py"
OPT = "parallax_muon/optimizer.py"
STEP = "parallax_muon/step.py"
LAYOUT = "parallax_muon/layout.py"
SAMPLING = "parallax_lightning/data/sampling.py"
TDM = "parallax_lightning/data/token_datamodule.py"
CB = "parallax_lightning/callbacks/checkpointing.py"

T_REF = [
    "tests/kernels/test_reference.py",
    "tests/kernels/test_extreme_values.py::test_parallax_attn_packed_length_one_sequences",
]
T_TRAIN = [
    "tests/kernels/test_parallax_train.py::test_matches_reference",
    "tests/kernels/test_extreme_values.py::test_parallax_attn_is_finite_and_exact_at_extremes",
]
T_DEC = [
    "tests/kernels/test_parallax_decode.py::test_matches_reference",
    "tests/kernels/test_extreme_values.py::test_parallax_decode_is_finite_and_exact_at_extremes",
]
T_NS = ["tests/muon/test_newton_schulz.py", "tests/muon/test_triton_ns.py", "tests/muon/test_oracle.py"]
T_OPT = ["tests/muon/test_optimizer.py", "tests/muon/test_oracle.py"]
T_DATA = ["tests/lightning/test_data.py", "tests/lightning/test_resume_accumulation.py"]

# (name, file, original, mutated, selection, equivalent?) — equivalent mutants are explained in tests/MUTATION.md
MUTANTS = [
    # ---- the Parallax reference (the oracle of every kernel test)
    ("ref/cov-sign", REF, "return v_bar * (1 + t_bar) - pt @ vf", "return v_bar * (1 + t_bar) + pt @ vf", T_REF),
    ("ref/tbar-sign", REF, "return v_bar * (1 + t_bar) - pt @ vf", "return v_bar * (1 - t_bar) - pt @ vf", T_REF),
    ("ref/drop-one", REF, "return v_bar * (1 + t_bar) - pt @ vf", "return v_bar * t_bar - pt @ vf", T_REF),
    ("ref/t-scaled", REF, "t = rf @ kf.transpose(-1, -2)", "t = scale * rf @ kf.transpose(-1, -2)", T_REF),
    ("ref/q-for-r", REF, "t = rf @ kf.transpose(-1, -2)", "t = qf @ kf.transpose(-1, -2)", T_REF),
    (
        "ref/decode-window-off-by-one",
        REF,
        "keep = keep & (j > pos - window_size)",
        "keep = keep & (j >= pos - window_size)",
        T_REF,
    ),
    ("ref/decode-causal-strict", REF, "keep = j <= pos", "keep = j < pos", T_REF),
    ("ref/decode-past-inclusive", REF, "past = j >= n[:, None]", "past = j > n[:, None]", T_REF),
    (
        "ref/packed-offsets",
        REF,
        "for a, b in itertools.pairwise(offsets)",
        "for a, b in itertools.pairwise(offsets[::-1])",
        T_REF,
    ),
    # ---- dispatch: float64 must take the reference
    (
        "dispatch/float64-to-kernel",
        "kernels/parallax/op.py",
        'if backend_for(q) != "triton" or q.dtype == torch.float64:',
        'if backend_for(q) != "triton":',
        [
            "tests/kernels/test_parallax_train.py::test_float64_goes_to_the_reference",
            "tests/test_properties.py::test_float64_takes_the_reference_and_float32_the_kernel",
        ],
    ),
    # ---- the Triton training kernels (a handful: each costs interpreter minutes)
    (
        "train/fwd-cov-sign",
        TRAIN,
        "o = vbar * (1.0 + tbar)[:, None] - o2 * inv[:, None]",
        "o = vbar * (1.0 + tbar)[:, None] + o2 * inv[:, None]",
        T_TRAIN,
    ),
    (
        "train/visible-window-off-by-one",
        TRAIN,
        "keep = keep & (cols[None, :] > rows_pos[:, None] - window)",
        "keep = keep & (cols[None, :] >= rows_pos[:, None] - window)",
        T_TRAIN,
    ),
    (
        "train/visible-causal-strict",
        TRAIN,
        "keep = keep & (cols[None, :] <= rows_pos[:, None])",
        "keep = keep & (cols[None, :] < rows_pos[:, None])",
        T_TRAIN,
    ),
    (
        "train/bwd-dq-ds-sign",
        TRAIN,
        "ds = p * (b_minus_t[:, None] - (tbar1[:, None] - t) * e)",
        "ds = p * (b_minus_t[:, None] + (tbar1[:, None] - t) * e)",
        T_TRAIN,
    ),
    ("train/bwd-dr-dt-sign", TRAIN, "        dt = p * e\n", "        dt = -p * e\n", T_TRAIN),
    (
        "train/bwd-dk-dt-term-sign",
        TRAIN,
        "dk = tl.dot((p_t * e_t).to(r.dtype), r, acc=dk, input_precision=DOT_PREC)",
        "dk = tl.dot((-p_t * e_t).to(r.dtype), r, acc=dk, input_precision=DOT_PREC)",
        T_TRAIN,
    ),
    (
        "train/bwd-dv-w-sign",
        TRAIN,
        "pw_t = p_t * ((1.0 + tbar)[None, :] - t_t)",
        "pw_t = p_t * ((1.0 - tbar)[None, :] + t_t)",
        T_TRAIN,
    ),
    # ---- the decode kernel
    (
        "decode/single-cov-sign",
        DEC,
        "out = o1 * (inv * (1.0 + d2 * inv))[:, None] - o2 * inv[:, None]",
        "out = o1 * (inv * (1.0 + d2 * inv))[:, None] + o2 * inv[:, None]",
        T_DEC,
    ),
    (
        "decode/single-vec-cov-sign",
        DEC,
        'out = o1 * (inv * (1.0 + d2 * inv)) - o2 * inv\n        out = tl.where(d1 > 0, out, float("nan"))',
        'out = o1 * (inv * (1.0 + d2 * inv)) + o2 * inv\n        out = tl.where(d1 > 0, out, float("nan"))',
        T_DEC,
    ),
    (
        "decode/merge-cov-sign",
        DEC,
        "out = o1_sum * (inv * (1.0 + d2_sum * inv)) - o2_sum * inv",
        "out = o1_sum * (inv * (1.0 + d2_sum * inv)) + o2_sum * inv",
        T_DEC,
    ),
    (
        "decode/merge-weights",
        DEC,
        "w = tl.where(s_ok, tl.exp2(m - tl.max(m, 0)), 0.0)",
        "w = tl.where(s_ok, 1.0, 0.0)",
        T_DEC,
    ),
    ("decode/window-lo-off-by-one", DEC, "lo = tl.maximum(n - window, 0)", "lo = tl.maximum(n - window - 1, 0)", T_DEC),
    (
        "decode/length-check",
        DEC,
        "n = tl.where((n >= 1) & (n <= L_max), n, 0)",
        "n = tl.where((n >= 1) & (n <= L_max), n - 1, 0)",
        T_DEC,
    ),
    # ---- Newton–Schulz
    (
        "ns/coefficient-a",
        NS,
        "JORDAN: Coefficients = (3.4445, -4.7750, 2.0315)",
        "JORDAN: Coefficients = (3.4445, -4.7750, 2.315)",
        T_NS,
    ),
    ("ns/tall-not-transposed", NS, "    tall = G.size(-2) > G.size(-1)\n", "    tall = False\n", T_NS),
    ("ns/norm-scale-ignored", NS, "    if scale != 1.0:\n        norms = norms * scale\n", "", T_NS),
    (
        "ns/2d-beta-swap",
        NS,
        "B = torch.addmm(A, A, A, beta=b, alpha=c)",
        "B = torch.addmm(A, A, A, beta=c, alpha=b)",
        T_NS,
    ),
    (
        "ns/batched-beta-swap",
        NS,
        "torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)",
        "torch.baddbmm(A, A, A, beta=c, alpha=b, out=B)",
        T_NS,
    ),
    (
        "ns/short-list-not-repeated",
        NS,
        "per_step = tuple(base[min(i, len(base) - 1)] for i in range(steps))",
        "per_step = tuple(base[:steps])",
        T_NS,
    ),
    ("ns/eps-clamp", NS, "return X.div_(norms.clamp_(min=eps))", "return X.div_(norms)", T_NS),
    # ---- the Muon step
    (
        "muon/wd-ignores-lr-mult",
        OPT,
        'decay(lp, lr, group["weight_decay"])',
        'decay(lp, group["lr"], group["weight_decay"])',
        T_OPT,
    ),
    (
        "muon/lr-mult-ignored",
        OPT,
        "        lr = group_lr(group)\n        decay(",
        '        lr = group["lr"]\n        decay(',
        T_OPT,
    ),
    (
        "muon/nesterov-inverted",
        STEP,
        "return torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs",
        "return bufs if nesterov else torch._foreach_lerp(grads, bufs, momentum)",
        T_OPT,
    ),
    (
        "muon/momentum-lerp-weight",
        STEP,
        "torch._foreach_lerp_(bufs, grads, 1 - momentum)",
        "torch._foreach_lerp_(bufs, grads, momentum)",
        T_OPT,
    ),
    (
        "muon/wd-sign",
        STEP,
        "torch._foreach_mul_(params, 1 - lr * weight_decay)",
        "torch._foreach_mul_(params, 1 + lr * weight_decay)",
        T_OPT,
    ),
    ("muon/update-sign", STEP, "direct[-job.group.lr * ratio]", "direct[job.group.lr * ratio]", T_OPT),
    ("muon/ratio-not-applied-direct", STEP, "direct[-job.group.lr * ratio]", "direct[-job.group.lr]", T_OPT),
    (
        "muon/tall-orientation",
        STEP,
        "            transposed = r > c\n",
        "            transposed = r < c\n",
        T_OPT,
    ),
    (
        "muon/staged-row-scale-offset",
        STEP,
        "scale = scale[row_offset : row_offset + Y.shape[0]]",
        "scale = scale[: Y.shape[0]]",
        [*T_OPT, "tests/muon/test_distributed.py"],
    ),
    (
        "muon/adamw-wd-ignores-lr-mult",
        OPT,
        'weight_decay=group["weight_decay"],',
        'weight_decay=group["weight_decay"] / group["lr_mult"],',
        T_OPT,
    ),
    (
        "muon/adamw-lr-mult-ignored",
        OPT,
        "        lr = group_lr(group)\n        # torch.optim.AdamW",
        '        lr = group["lr"]\n        # torch.optim.AdamW',
        T_OPT,
    ),
    (
        "layout/ratio-inverted",
        LAYOUT,
        "return math.sqrt(max(1, rows / cols))",
        "return math.sqrt(max(1, cols / rows))",
        T_OPT,
    ),
    (
        "layout/match-rms-min",
        LAYOUT,
        "return 0.2 * math.sqrt(max(rows, cols))",
        "return 0.2 * math.sqrt(min(rows, cols))",
        T_OPT,
    ),
    ("layout/heads-ignored-per-segment", LAYOUT, "heads = [num_heads] * len(sizes)", "heads = [1] * len(sizes)", T_OPT),
    (
        "layout/per-slice-cols",
        LAYOUT,
        "slices, rows, cols = math.prod(shape[:-2]), shape[-2], shape[-1]",
        "slices, rows, cols = 1, math.prod(shape[:-1]), shape[-1]",
        T_OPT,
    ),
    # ---- data position and resume
    (
        "data/position-ignores-accumulation",
        TDM,
        "return trainer.global_step * trainer.accumulate_grad_batches",
        "return trainer.global_step",
        T_DATA,
    ),
    (
        "data/resume-batch-ignored",
        TDM,
        "start = self._resume_batch if self._resume_batch is not None else self._micro_batches_done()",
        "start = self._micro_batches_done()",
        T_DATA,
    ),
    ("data/resume-batch-kept", TDM, "            self._resume_batch = None\n", "", T_DATA),
    (
        "data/batch-seed-ignores-index",
        SAMPLING,
        "rng = np.random.default_rng([self.seed, index])",
        "rng = np.random.default_rng([self.seed, 0])",
        T_DATA,
    ),
    (
        "data/rank-slice",
        SAMPLING,
        "return slice(self.rank * per_rank, (self.rank + 1) * per_rank)",
        "return slice(0, per_rank)",
        T_DATA,
    ),
    (
        "data/stream-start-ignored",
        SAMPLING,
        "        index = self.start + worker\n",
        "        index = worker\n",
        T_DATA,
    ),
    (
        "data/window-crosses-arrays",
        SAMPLING,
        "counts = np.array([max(0, len(a) - self.span + 1) for a in self.arrays], dtype=np.int64)",
        "counts = np.array([max(0, len(a) - self.span + 2) for a in self.arrays], dtype=np.int64)",
        T_DATA,
    ),
    (
        "data/labels-not-shifted",
        SAMPLING,
        'return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}',
        'return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, :-1].contiguous()}',
        T_DATA,
    ),
    (
        "callbacks/final-save-step-counter",
        CB,
        "            compat.set_logging_step(trainer, counter - 1)\n",
        "",
        [
            "tests/lightning/test_cli.py::test_resume_reproduces_the_uninterrupted_run_in_the_same_mlflow_run",
            "tests/lightning/test_resume_accumulation.py",
        ],
    ),
]

# Mutants argued equivalent (or out of reach of a bound fp32 can honour) in tests/MUTATION.md.
EQUIVALENT: set[str] = set()


def run_one(name, path, original, mutated, selection, timeout):
    file = ROOT / path
    before = file.read_bytes()
    text = before.decode()
    count = text.count(original)
    if count != 1:
        return "not-found" if count == 0 else f"ambiguous ({count})", 0.0
    env = {**os.environ, "PARALLAX_TEST_SEED": os.environ.get("PARALLAX_TEST_SEED", "1")}
    start = time.monotonic()
    try:
        file.write_text(text.replace(original, mutated))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
            status = "survived" if proc.returncode == 0 else "killed"
            if proc.returncode not in (0, 1):  # collection or import error: still killed, but say so
                status = f"killed (rc {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = "killed (timeout)"
    finally:
        file.write_bytes(before)
    return status, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="run only mutants whose name contains this")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--tests", nargs="+", help="run this selection instead of each mutant's own (e.g. the old tests)"
    )
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.k in m[0]]
    if args.list:
        print("\n".join(m[0] for m in chosen))
        return 0
    survivors = 0
    for name, path, original, mutated, selection in chosen:
        status, seconds = run_one(name, path, original, mutated, args.tests or selection, args.timeout)
        if status == "survived" and name in EQUIVALENT:
            status = "survived (equivalent)"
        elif status != "killed" and not status.startswith("killed"):
            survivors += 1
        print(f"{name:42s} {status:24s} {seconds:6.0f}s", flush=True)
    return survivors


if __name__ == "__main__":
    sys.exit(main())
