"""Rebuild the paper campaign's results (RESULTS.md and figures) from every committed run record.

    python experiments/paper/report.py                                   # runs/*.json -> RESULTS.md + PNGs here
    python experiments/paper/report.py --print-only                      # the tables to stdout, nothing written
    python experiments/paper/report.py --next-runs                       # the runs the protocol still needs

The records are experiments/paper/runs/<run_name>.json, written by export_runs.py. Everything follows
PROTOCOL.md: the LR sweep at seed 0 picks each cell's learning rate (lowest final validation loss; an optimum at an
edge of the grid is flagged and the next point named); at that LR, each cell's final loss as mean ± sample std
over seeds; the gaps Parallax − softmax per optimizer, the interaction gap_Muon − gap_AdamW, the controls and the
probe-optimizer swaps as differences paired by seed, each with a t-based 95% interval (no SciPy: the Student-t
quantile is computed here); the diagnostics as their value at step 0, at the end and the change, with W_Q as the
control for W_R. Only runs with status "ok" (complete schedule) enter a statistic; the others are listed.

Why one long file: it is the one script that turns the records into RESULTS.md (statistics, record selection,
tables, figures, rendering, in banner-marked sections), run as a file and loaded by path in the tests, with no
package of its own to import a sibling module from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAIN_CELLS = ("softmax-muon", "parallax-muon", "softmax-adamw", "parallax-adamw")
LR_GRID = {"muon": (0.01, 0.02, 0.04), "adamw": (1e-3, 2e-3, 4e-3)}
SEEDS_MIN, SEEDS_FULL = 3, 5
FIGURES = ("val_loss.png", "lr_sweep.png", "diagnostics_change.png")
# (name, a, b, what): the paired comparisons, a − b
COMPARISONS = (
    ("gap_Muon", "parallax-muon", "softmax-muon", "Parallax − softmax under Muon (C1)"),
    ("gap_AdamW", "parallax-adamw", "softmax-adamw", "Parallax − softmax under AdamW"),
    ("gap_param_matched", "parallax-muon", "softmax_pm-muon", "Parallax − parameter-matched softmax, Muon (C1b)"),
    ("gap_compute_matched", "parallax_cm-muon", "softmax-muon", "compute-matched Parallax − softmax, Muon (C1b)"),
    ("swap_wr_adamw", "swap_wr_adamw", "parallax-muon", "W_R on AdamW − W_R on Muon, rest Muon (C5)"),
    ("swap_wr_muon", "swap_wr_muon", "parallax-adamw", "W_R on Muon − W_R on AdamW, rest AdamW (C5)"),
)
DIAG_STATS = ("stable_rank_w_r", "stable_rank_w_q", "stable_rank_w_k", "correction_ratio")


# ------------------------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on the CDF; p in (0, 1))."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class Summary:
    n: int
    mean: float
    sd: float | None  # sample std (n − 1); None for n < 2
    lo: float | None  # t-based 95% interval of the mean; None for n < 2
    hi: float | None

    @property
    def verdict(self) -> str:
        """Where the interval lies relative to 0."""
        if self.lo is None:
            return "one seed: no interval"
        if self.hi < 0:
            return "below 0"
        if self.lo > 0:
            return "above 0"
        return "contains 0: inconclusive"


def summarize(values: list[float], level: float = 0.95) -> Summary | None:
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


# ---------------------------------------------------------------------------------------------- records


def load_records(runs_dir: Path) -> list[dict]:
    records = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        record = json.loads(path.read_text())
        for key in ("run_name", "cell", "status", "seed"):
            if key not in record:
                raise SystemExit(f"report: {path} has no {key!r} (not an export_runs.py record)")
        records.append(record)
    return records


def ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and r.get("final_val_loss") is not None]


def _lr(record: dict) -> float | None:
    return record.get("lr")


def chosen_lr(records: list[dict], cell: str) -> tuple[float | None, str]:
    """(the cell's LR, why): main cells by the seed-0 sweep; other cells the LR holding most seeds."""
    runs = [r for r in ok(records) if r["cell"] == cell and _lr(r) is not None]
    if not runs:
        return None, "no complete run"
    if cell in MAIN_CELLS:
        sweep = {_lr(r): r["final_val_loss"] for r in runs if r["seed"] == 0}
        if not sweep:
            return None, "no complete seed-0 run"
        best = min(sweep, key=sweep.get)
        grid = sorted(sweep)
        edge = len(grid) > 1 and best in (grid[0], grid[-1])
        return best, f"lowest of {len(grid)} seed-0 point(s)" + (" — AT THE GRID'S EDGE" if edge else "")
    counts: dict[float, int] = {}
    for r in runs:
        counts[_lr(r)] = counts.get(_lr(r), 0) + 1
    best = max(sorted(counts), key=lambda lr: counts[lr])
    return best, f"{counts[best]} seed(s)"


def cell_runs(records: list[dict], cell: str, lr: float | None, min_seed: int = 0) -> dict[int, dict]:
    """seed -> the complete run of `cell` at `lr` (the newest if repeated)."""
    out = {}
    for r in sorted(ok(records), key=lambda r: r.get("start_time_ms") or 0):
        if r["cell"] == cell and lr is not None and _close(_lr(r), lr) and r["seed"] >= min_seed:
            out[r["seed"]] = r
    return out


def _close(a, b) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)


def paired(records: list[dict], a: str, b: str, min_seed: int = 0) -> tuple[list[int], list[float]]:
    """Seeds both cells have at their chosen LRs, and the per-seed differences L_a − L_b."""
    ra = cell_runs(records, a, chosen_lr(records, a)[0], min_seed)
    rb = cell_runs(records, b, chosen_lr(records, b)[0], min_seed)
    seeds = sorted(set(ra) & set(rb))
    return seeds, [ra[s]["final_val_loss"] - rb[s]["final_val_loss"] for s in seeds]


def interaction(records: list[dict], min_seed: int = 0) -> tuple[list[int], list[float]]:
    sm, gm = paired(records, "parallax-muon", "softmax-muon", min_seed)
    sa, ga = paired(records, "parallax-adamw", "softmax-adamw", min_seed)
    muon, adamw = dict(zip(sm, gm)), dict(zip(sa, ga))
    seeds = sorted(set(muon) & set(adamw))
    return seeds, [muon[s] - adamw[s] for s in seeds]


def pooled_sd(records: list[dict]) -> tuple[float | None, int]:
    """Pooled within-cell seed-to-seed std of the final loss (over every cell at its LR), and its df."""
    ss, df = 0.0, 0
    for cell in sorted({r["cell"] for r in ok(records)}):
        values = [r["final_val_loss"] for r in cell_runs(records, cell, chosen_lr(records, cell)[0]).values()]
        if len(values) > 1:
            m = sum(values) / len(values)
            ss += sum((v - m) ** 2 for v in values)
            df += len(values) - 1
    return (math.sqrt(ss / df) if df else None), df


# ------------------------------------------------------------------------------------------- next runs


def spec(cell: str, lr: float, seed: int, muon_lr: float | None = None) -> str:
    return f"{cell}:{lr:g}:{seed}" + (f":{muon_lr:g}" if muon_lr is not None else "")


def next_runs(records: list[dict], seeds: int = SEEDS_MIN) -> list[str]:
    """The run specs (for run_grid.py --runs) that the protocol still needs, in its order: the sweep (and an
    extension past an edge optimum), then seeds at the chosen LRs, controls, swaps."""
    done = {(r["cell"], round(_lr(r) or 0, 12), r["seed"]) for r in records if r["status"] == "ok"}
    todo: list[str] = []

    def want(cell, lr, seed, muon_lr=None):
        if (cell, round(lr, 12), seed) not in done:
            todo.append(spec(cell, lr, seed, muon_lr))

    chosen: dict[str, float | None] = {}
    for cell in MAIN_CELLS:
        grid = LR_GRID[cell.split("-")[1]]
        for lr in grid:
            want(cell, lr, 0)
        sweep = {_lr(r): r["final_val_loss"] for r in ok(records) if r["cell"] == cell and r["seed"] == 0}
        if not all(any(_close(lr, x) for x in sweep) for lr in grid):
            chosen[cell] = None
            continue
        points = sorted(sweep)
        best = min(sweep, key=sweep.get)
        if best == points[0]:
            want(cell, best / 2, 0)
            chosen[cell] = None
        elif best == points[-1]:
            want(cell, best * 2, 0)
            chosen[cell] = None
        else:
            chosen[cell] = best
    for cell in MAIN_CELLS:
        if chosen[cell] is not None:
            for seed in range(1, seeds):
                want(cell, chosen[cell], seed)
    mu_s, mu_p, ad_p = chosen["softmax-muon"], chosen["parallax-muon"], chosen["parallax-adamw"]
    for seed in range(seeds):
        if mu_s is not None:
            want("softmax_pm-muon", mu_s, seed)
        if mu_p is not None:
            want("parallax_cm-muon", mu_p, seed)
            want("swap_wr_adamw", mu_p, seed)
        if ad_p is not None and mu_p is not None:
            want("swap_wr_muon", ad_p, seed, mu_p)
    return todo


# ------------------------------------------------------------------------------------------- formatting


def fmt(value, spec: str = ".4f", missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def fmt_summary(s: Summary | None, spec: str = "+.4f") -> str:
    if s is None:
        return "—"
    if s.lo is None:
        return f"{s.mean:{spec}} (n=1)"
    sd_spec = spec.lstrip("+")
    return f"{s.mean:{spec}} ± {s.sd:{sd_spec}} (n={s.n}); 95% CI [{s.lo:{spec}}, {s.hi:{spec}}]"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(records: list[dict]) -> str:
    rows = []
    for r in sorted(records, key=lambda r: (r["cell"], _lr(r) or 0, r["seed"])):
        rows.append(
            [
                r["run_name"],
                r["cell"],
                fmt(_lr(r), "g"),
                str(r["seed"]),
                r["status"],
                f"{r.get('final_step')}/{r.get('max_steps')}",
                fmt((r.get("tokens") or 0) / 1e6, ".2f") + "M",
                fmt(r.get("final_val_loss")),
                fmt(r.get("tokens_per_s_median"), ",.0f"),
                fmt(r.get("wall_s"), ".0f"),
                (r.get("git_commit") or "?")[:10],
            ]
        )
    header = [
        "run",
        "cell",
        "lr",
        "seed",
        "status",
        "steps",
        "tokens",
        "final val loss",
        "tokens/s",
        "wall s",
        "commit",
    ]
    return md_table(header, rows)


def sweep_table(records: list[dict]) -> str:
    rows = []
    for cell in sorted({r["cell"] for r in records}, key=lambda c: (c not in MAIN_CELLS, c)):
        points = sorted((_lr(r), r["final_val_loss"]) for r in ok(records) if r["cell"] == cell and r["seed"] == 0)
        if not points:
            continue
        lr, why = chosen_lr(records, cell)
        rows.append([cell, ", ".join(f"{x:g}: {v:.4f}" for x, v in points), fmt(lr, "g"), why])
    return md_table(["cell", "seed 0: lr → final val loss", "chosen lr", "why"], rows)


def cells_table(records: list[dict]) -> str:
    rows = []
    for cell in sorted({r["cell"] for r in records}, key=lambda c: (c not in MAIN_CELLS, c)):
        lr, _ = chosen_lr(records, cell)
        runs = cell_runs(records, cell, lr)
        s = summarize([r["final_val_loss"] for r in runs.values()])
        if s is None:
            continue
        rows.append([cell, fmt(lr, "g"), str(s.n), ", ".join(str(k) for k in sorted(runs)), f"{s.mean:.4f}", fmt(s.sd)])
    return md_table(["cell", "lr", "n", "seeds", "final val loss, mean", "std (seeds)"], rows)


def comparisons(records: list[dict], min_seed: int = 0) -> list[list[str]]:
    rows = []
    for name, a, b, what in COMPARISONS:
        seeds, diffs = paired(records, a, b, min_seed)
        s = summarize(diffs)
        if s is not None:
            rows.append([name, what, ", ".join(map(str, seeds)), fmt_summary(s), s.verdict])
    seeds, diffs = interaction(records, min_seed)
    s = summarize(diffs)
    if s is not None:
        rows.append(["interaction", "gap_Muon − gap_AdamW (C2)", ", ".join(map(str, seeds)), fmt_summary(s), s.verdict])
    return rows


def diag_values(record: dict, stat: str, when: str) -> float | None:
    """Mean over layers (correction ratio: over the deep half) of a diagnostic at step 0 or at the end."""
    values = (record.get("diagnostics") or {}).get(when, {}).get(stat)
    if not values:
        return None
    if stat == "correction_ratio":
        values = values[len(values) // 2 :]
    return sum(values) / len(values)


def diagnostics_table(records: list[dict]) -> str | None:
    rows = []
    for cell in sorted({r["cell"] for r in records}, key=lambda c: (c not in MAIN_CELLS, c)):
        runs = cell_runs(records, cell, chosen_lr(records, cell)[0]).values()
        for stat in DIAG_STATS:
            start = [diag_values(r, stat, "step0") for r in runs]
            end = [diag_values(r, stat, "final") for r in runs]
            pairs = [(a, b) for a, b in zip(start, end) if a is not None and b is not None]
            if not pairs:
                continue
            s0 = summarize([a for a, _ in pairs])
            s1 = summarize([b for _, b in pairs])
            change = summarize([b - a for a, b in pairs])
            rows.append(
                [
                    cell,
                    stat,
                    str(len(pairs)),
                    f"{s0.mean:.2f}",
                    f"{s1.mean:.2f}",
                    fmt_summary(change, "+.2f"),
                ]
            )
    if not rows:
        return None
    return md_table(["cell", "diagnostic (layer mean)", "n", "step 0", "end", "change end − step 0"], rows)


def wr_vs_wq(records: list[dict]) -> list[str]:
    """C4's control: within each Parallax run, W_R's change in stable rank minus W_Q's."""
    lines = []
    for cell in sorted({r["cell"] for r in records if r.get("attention") == "parallax"}):
        diffs = []
        for r in cell_runs(records, cell, chosen_lr(records, cell)[0]).values():
            vals = [diag_values(r, s, w) for s in ("stable_rank_w_r", "stable_rank_w_q") for w in ("step0", "final")]
            if None not in vals:
                r0, r1, q0, q1 = vals
                diffs.append((r1 - r0) - (q1 - q0))
        s = summarize(diffs)
        if s is not None:
            lines.append(
                f"- {cell}: (ΔW_R − ΔW_Q) stable rank {fmt_summary(s, '+.2f')} — {s.verdict}"
                + (" (W_R moves like W_Q)" if s.lo is not None and s.lo <= 0 <= s.hi else "")
            )
    return lines


# --------------------------------------------------------------------------------------------- figures


def make_figures(records: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    written = []
    cells = sorted({r["cell"] for r in ok(records)}, key=lambda c: (c not in MAIN_CELLS, c))
    colors = {c: f"C{i}" for i, c in enumerate(cells)}

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for cell in cells:
        runs = list(cell_runs(records, cell, chosen_lr(records, cell)[0]).values())
        for i, r in enumerate(runs):
            x = [s * r["tokens_per_step"] / 1e6 for s, _ in r["val_loss"]]
            label = f"{cell} ({len(runs)} seeds)" if i == 0 else None
            ax.plot(
                x, [v for _, v in r["val_loss"]], color=colors[cell], alpha=0.7, marker="o", markersize=2, label=label
            )
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Validation loss at each cell's chosen LR, every seed")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(out_dir / "val_loss.png", dpi=120)
    written.append("val_loss.png")

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = dict(zip(("muon", "adamw"), fig.subplots(1, 2)))
    for cell in cells:
        points = sorted((_lr(r), r["final_val_loss"]) for r in ok(records) if r["cell"] == cell and r["seed"] == 0)
        opt = "adamw" if cell.endswith("adamw") or cell == "swap_wr_muon" else "muon"
        if points:
            axes[opt].plot(*zip(*points), marker="o", color=colors[cell], label=cell)
    for opt, ax in axes.items():
        ax.set_xscale("log")
        ax.set_xlabel(f"{'Muon' if opt == 'muon' else 'AdamW'} learning rate")
        ax.set_ylabel("final held-out loss, seed 0")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Learning-rate sweep")
    fig.savefig(out_dir / "lr_sweep.png", dpi=120)
    written.append("lr_sweep.png")

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, len(DIAG_STATS))
    for ax, stat in zip(axes, DIAG_STATS):
        labels, starts, ends = [], [], []
        for cell in cells:
            runs = cell_runs(records, cell, chosen_lr(records, cell)[0]).values()
            pairs = [(diag_values(r, stat, "step0"), diag_values(r, stat, "final")) for r in runs]
            pairs = [p for p in pairs if None not in p]
            if pairs:
                labels.append(cell)
                starts.append(sum(a for a, _ in pairs) / len(pairs))
                ends.append(sum(b for _, b in pairs) / len(pairs))
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], starts, width=0.4, label="step 0", color="0.7")
        ax.bar([i + 0.2 for i in x], ends, width=0.4, label="end", color="C3")
        ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(stat, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Diagnostics at step 0 and at the end (layer means; correction ratio: deep half)")
    fig.savefig(out_dir / "diagnostics_change.png", dpi=120)
    written.append("diagnostics_change.png")
    return written


# ---------------------------------------------------------------------------------------------- report


def render(records: list[dict], runs_dir: Path, figures: list[str]) -> str:
    synthetic = any(r.get("tags", {}).get("synthetic") == "true" for r in records)
    lines = ["# Paper campaign: Parallax vs softmax under Muon and AdamW", ""]
    if synthetic:
        lines += ["**SYNTHETIC TEST DATA — these numbers were written by a test, not measured by training.**", ""]
    complete = ok(records)
    try:
        shown = Path(runs_dir).resolve().relative_to(HERE.parent.parent)
    except ValueError:
        shown = runs_dir
    lines += [
        f"Generated by `experiments/paper/report.py` on {time.strftime('%Y-%m-%d %H:%M')} from {len(records)} run "
        f"record(s) in `{shown}` ({len(complete)} complete). Protocol: [PROTOCOL.md](PROTOCOL.md). The "
        "2026-11-28 grid is a pilot ([PILOT.md](PILOT.md)) and is not part of these numbers.",
        "",
    ]
    if not records:
        lines += ["No run has been recorded yet.", ""]
        return "\n".join(lines)
    lines += ["## Runs", "", runs_table(records), ""]
    lines += ["## Learning-rate sweep (seed 0)", "", sweep_table(records), ""]
    lines += ["## Final held-out loss per cell at its chosen LR", "", cells_table(records), ""]
    sd, df = pooled_sd(records)
    lines += [
        f"Seed-to-seed noise, measured: pooled within-cell std of the final loss {fmt(sd)} nats ({df} degrees of "
        "freedom). A comparison is inconclusive when its 95% interval contains 0.",
        "",
    ]
    header = ["comparison", "what", "seeds", "paired difference, mean ± std; 95% t-interval", "interval"]
    rows = comparisons(records)
    lines += ["## Paired comparisons (by model seed)", ""]
    lines += [md_table(header, rows) if rows else "No comparison has two cells with a common seed yet.", ""]
    rows = comparisons(records, min_seed=1)
    if rows:
        lines += [
            "Sensitivity, seeds ≥ 1 only (seed 0 chose the learning rate on the same held-out split):",
            "",
            md_table(header, rows),
            "",
        ]
    table = diagnostics_table(records)
    if table:
        lines += ["## Diagnostics: step 0, end, change (mean over seeds at the chosen LR)", "", table, ""]
        control = wr_vs_wq(records)
        if control:
            lines += ["W_Q as the control for W_R (C4), per run then over seeds:", "", *control, ""]
    pending = next_runs(records)
    lines += ["## Runs the protocol still needs", ""]
    lines += [("`" + " ".join(pending) + "`") if pending else "None (n = 3 per cell reached).", ""]
    if figures:
        lines += ["## Figures", "", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", default=str(HERE / "runs"), help="the export_runs.py records")
    p.add_argument("--out-dir", default=str(HERE), help="where RESULTS.md and the figures go")
    p.add_argument("--print-only", action="store_true", help="print the report; write nothing")
    p.add_argument("--next-runs", action="store_true", help="print the run specs the protocol still needs")
    p.add_argument("--seeds", type=int, default=SEEDS_MIN, help=f"seeds per cell for --next-runs (up to {SEEDS_FULL})")
    args = p.parse_args(argv)
    records = load_records(Path(args.runs_dir))
    if args.next_runs:
        print(" ".join(next_runs(records, args.seeds)))
        return 0
    if args.print_only:
        print(render(records, Path(args.runs_dir), []))
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = make_figures(records, out_dir) if ok(records) else []
    (out_dir / "RESULTS.md").write_text(render(records, Path(args.runs_dir), figures))
    print(f"report: wrote {out_dir / 'RESULTS.md'}" + (f" and {', '.join(figures)}" if figures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
