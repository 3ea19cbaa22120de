"""Read the paper grid's MLflow runs and write experiments/paper/RESULTS.md with its figures.

    python experiments/paper/report.py --tracking-uri sqlite:///path/to/mlflow.db              # RESULTS.md + PNGs
    python experiments/paper/report.py --tracking-uri sqlite:///... --screenshot              # + MLflow UI capture
    python experiments/paper/report.py --tracking-uri sqlite:///... --print-only              # table to stdout

The runs are those that experiments/paper/run_grid.py tagged with one grid id (`paper.grid_id`; the newest grid
in the experiment unless --grid-id names one), one per cell (`paper.cell`, e.g. parallax-muon). Everything in
the report is computed from the store: final validation loss and perplexity, tokens seen (last step x batch x
sequence length), median tokens/s and MFU over the logged windows, the Parallax diagnostics at the last step
(correction-to-output ratio ‖Cov·r‖/‖v̄‖ and stable ranks by layer), whether Lightning's max_time stopped the
run before max_steps, and the claims of the paper checked against those numbers. --bench-json adds the
end-to-end throughput of benchmarks/bench_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRID_CELLS = ("softmax-muon", "parallax-muon", "softmax-adamw", "parallax-adamw")
# What the paper reports for the 0.6B model (parallax-math.md), quoted beside our numbers, never used in them.
PAPER = {
    "correction_ratio": "> 8 in deep layers under Muon, < 4 under AdamW",
    "wr_stable_rank": "about 134 under Muon, about 9 under AdamW",
}
FIGURES = ("val_loss.png", "correction_ratio.png", "wr_stable_rank.png")
SCREENSHOT = "mlflow_compare.png"
TRAINING_KEYS = ("train/", "val/", "perf/", "diag/")
LIGHTNING_LOGGED = ("train/", "val/")


@dataclass
class Run:
    run_id: str
    cell: str
    name: str
    status: str
    attention: str
    optimizer: str
    params_non_embedding: int | None
    batch_size: int
    seq_len: int
    devices: int
    max_steps: int | None
    final_step: int
    val: list[tuple[int, float]]
    val_ppl: list[tuple[int, float]]
    train: list[tuple[int, float]]
    tokens_per_s: list[float]
    mfu: list[float]
    diag: dict[str, list[tuple[int, float]]]  # "layer{i}/{stat}" -> history
    tags: dict[str, str] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)  # the model.model.* params
    start_time: int = 0
    end_time: int | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.devices

    @property
    def tokens_seen(self) -> int:
        return self.final_step * self.tokens_per_step

    @property
    def final_val(self) -> float | None:
        return self.val[-1][1] if self.val else None

    @property
    def final_val_step(self) -> int | None:
        return self.val[-1][0] if self.val else None

    @property
    def final_ppl(self) -> float | None:
        if self.val_ppl:
            return self.val_ppl[-1][1]
        return math.exp(self.final_val) if self.final_val is not None else None

    @property
    def median_tokens_per_s(self) -> float | None:
        return statistics.median(self.tokens_per_s) if self.tokens_per_s else None

    @property
    def median_mfu(self) -> float | None:
        return statistics.median(self.mfu) if self.mfu else None

    @property
    def cut(self) -> bool:
        """Stopped before max_steps (by max_time, a failure or a kill): fewer tokens than the others."""
        return self.max_steps is not None and self.final_step < self.max_steps

    @property
    def stop_reason(self) -> str:
        if not self.cut:
            return "no"
        if self.tags.get("paper.stopped_by_max_time") == "true":
            return f"yes: max_time at step {self.final_step}/{self.max_steps}"
        if self.status != "FINISHED" or self.tags.get("paper.exit_code", "0") != "0":
            return f"yes: run {self.status.lower()} at step {self.final_step}/{self.max_steps}"
        return f"yes: stopped at step {self.final_step}/{self.max_steps}"

    @property
    def wr_shape(self) -> str:
        d, h, hd = (_int(self.model.get(k)) for k in ("d_model", "n_heads", "head_dim"))
        return f"{h * hd}x{d}" if d and h and hd else "?"

    @property
    def wr_rank_bound(self) -> str:
        d, h, hd = (_int(self.model.get(k)) for k in ("d_model", "n_heads", "head_dim"))
        return str(min(d, h * hd)) if d and h and hd else "?"

    def layers(self, stat: str) -> list[float]:
        """The diagnostic `stat` of every layer at its last measurement, by layer index."""
        found = {}
        for key, history in self.diag.items():
            layer, _, name = key.partition("/")
            if name == stat and history:
                found[int(layer.removeprefix("layer"))] = history[-1][1]
        return [found[i] for i in sorted(found)]

    def layer_mean_history(self, stat: str) -> list[tuple[int, float]]:
        """(step, mean over layers) of a diagnostic, at the steps where every layer has a value."""
        per_step: dict[int, list[float]] = {}
        n_layers = 0
        for key, history in self.diag.items():
            if key.partition("/")[2] != stat:
                continue
            n_layers += 1
            for step, value in history:
                per_step.setdefault(step, []).append(value)
        return [(s, sum(v) / len(v)) for s, v in sorted(per_step.items()) if len(v) == n_layers]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _int(value, default=None):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def load_runs(tracking_uri: str, experiment: str, grid_id: str | None = None) -> tuple[str, list[Run]]:
    """(grid id, runs of that grid); the newest grid of the experiment when grid_id is None."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise SystemExit(f"report: no experiment {experiment!r} in {tracking_uri} (found: {names})")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    tagged = [r for r in runs if "paper.grid_id" in r.data.tags]
    if not tagged:
        raise SystemExit(f"report: no run of {experiment!r} carries a paper.grid_id tag (made by run_grid.py)")
    if grid_id is None:
        grid_id = max(tagged, key=lambda r: r.info.start_time).data.tags["paper.grid_id"]
    chosen = [r for r in tagged if r.data.tags["paper.grid_id"] == grid_id]
    if not chosen:
        raise SystemExit(f"report: no run with paper.grid_id={grid_id!r} in {experiment!r}")
    by_cell: dict[str, object] = {}
    for r in sorted(chosen, key=lambda r: r.info.start_time):  # a repeated cell: the newest run wins
        by_cell[r.data.tags.get("paper.cell", r.info.run_name)] = r
    out = []
    for cell, r in by_cell.items():
        params, tags, rid = r.data.params, r.data.tags, r.info.run_id
        histories = {key: _history(client, rid, key) for key in r.data.metrics}
        # Lightning logs what the LightningModule logs (train/, val/) at its count of finished steps minus one
        # (validation after N optimizer steps is logged at step N-1); the platform's callbacks (perf/, diag/)
        # log at trainer.global_step. Shift the former so every history is keyed by optimizer steps done.
        for key in list(histories):
            if key.startswith(LIGHTNING_LOGGED):
                histories[key] = [(s + 1, v) for s, v in histories[key]]
        # The training step reached: MLflow's system metrics count their own samples, so only training keys.
        steps = [s for k, h in histories.items() if k.startswith(TRAINING_KEYS) for s, _ in h]
        diag = {k.removeprefix("diag/"): h for k, h in histories.items() if k.startswith("diag/")}
        devices = _int(params.get("trainer.devices"), 1) or 1
        out.append(
            Run(
                run_id=rid,
                cell=cell,
                name=r.info.run_name,
                status=r.info.status,
                attention=params.get("model.model.attention", "?"),
                optimizer=params.get("model.optimizer.name", "?"),
                params_non_embedding=_int(params.get("model.params_non_embedding")),
                batch_size=_int(params.get("data.batch_size"), 0),
                seq_len=_int(params.get("data.seq_len"), 0),
                devices=devices,
                max_steps=_int(params.get("trainer.max_steps")),
                final_step=max(steps, default=0),
                val=histories.get("val/loss", []),
                val_ppl=histories.get("val/ppl", []),
                train=histories.get("train/loss", []),
                tokens_per_s=[v for _, v in histories.get("perf/tokens_per_s", [])],
                mfu=[v for _, v in histories.get("perf/mfu", [])],
                diag=diag,
                tags=dict(tags),
                model={k.removeprefix("model.model."): v for k, v in params.items() if k.startswith("model.model.")},
                start_time=r.info.start_time,
                end_time=r.info.end_time,
            )
        )
    order = {c: i for i, c in enumerate(GRID_CELLS)}
    out.sort(key=lambda run: (order.get(run.cell, len(order)), run.cell))
    return grid_id, out


# ------------------------------------------------------------------------------------------ formatting


def fmt(value, spec: str = ".3f", missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def fmt_tokens(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def deep_half(values: list[float]) -> list[float]:
    return values[len(values) // 2 :]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main_table(runs: list[Run]) -> str:
    header = [
        "run",
        "attention",
        "optimizer",
        "non-emb. params",
        "steps",
        "tokens seen",
        "final val loss",
        "val ppl",
        "tokens/s (median)",
        "MFU (median)",
        "corr. ratio, deep-half mean",
        "W_R stable rank, mean",
        "cut by max_time",
    ]
    rows = []
    for r in runs:
        ratio = mean(deep_half(r.layers("correction_ratio")))
        srank = mean(r.layers("stable_rank_w_r"))
        rows.append(
            [
                r.cell,
                r.attention,
                r.optimizer,
                fmt(r.params_non_embedding / 1e6, ".1f") + "M" if r.params_non_embedding else "—",
                f"{r.final_step}/{r.max_steps}",
                fmt_tokens(r.tokens_seen),
                fmt(r.final_val, ".4f"),
                fmt(r.final_ppl, ".2f"),
                fmt(r.median_tokens_per_s, ",.0f"),
                fmt(100 * r.median_mfu, ".1f") + "%" if r.median_mfu is not None else "—",
                fmt(ratio, ".2f"),
                fmt(srank, ".1f"),
                r.stop_reason,
            ]
        )
    return md_table(header, rows)


def layer_table(runs: list[Run], stat: str) -> str | None:
    rows = [(r, r.layers(stat)) for r in runs]
    rows = [(r, v) for r, v in rows if v]
    if not rows:
        return None
    n = max(len(v) for _, v in rows)
    spec = ".2f" if "ratio" in stat else ".1f"
    return md_table(["run", *[f"L{i}" for i in range(n)]], [[r.cell, *[fmt(x, spec) for x in v]] for r, v in rows])


# ---------------------------------------------------------------------------------------------- claims


def _times(a: float, b: float) -> str:
    return f"×{a / b:.2f}" if b > 0 else "AdamW's is zero"


def equal_token_step(runs: list[Run]) -> tuple[int, dict[str, float]] | None:
    """The last validation step that every run logged, with each run's val loss there."""
    steps = [set(step for step, _ in r.val) for r in runs if r.val]
    if len(steps) != len(runs) or not steps:
        return None
    shared = set.intersection(*steps)
    if not shared:
        return None
    step = max(shared)
    return step, {r.cell: dict(r.val)[step] for r in runs}


def claims(runs: list[Run], min_gap: float, bench: dict | None = None) -> list[str]:
    """Each of the paper's claims, checked against this grid's numbers (nothing here is a constant result)."""
    cells = {r.cell: r for r in runs}
    lines: list[str] = []

    def val(cell):
        r = cells.get(cell)
        return None if r is None else r.final_val

    def missing(*names):
        gone = [n for n in names if val(n) is None]
        return f"not measured: no final validation loss for {', '.join(gone)}" if gone else None

    cut = [r for r in runs if r.cut]
    tokens = {r.cell: r.tokens_seen for r in runs}
    if cut:
        lines.append(
            "**Unequal token counts.** "
            + "; ".join(f"{r.cell}: {r.stop_reason} ({fmt_tokens(r.tokens_seen)} tokens)" for r in cut)
            + ". Loss comparisons involving these runs favour the runs that trained longer."
        )

    # 1 and 2: the loss gap Parallax − softmax under each optimizer (negative = Parallax better)
    gaps = {}
    for opt in ("muon", "adamw"):
        a, b = f"parallax-{opt}", f"softmax-{opt}"
        if val(a) is not None and val(b) is not None:
            gaps[opt] = val(a) - val(b)
    why = missing("parallax-muon", "softmax-muon")
    if why:
        lines.append(f"1. *Parallax beats softmax under Muon* — {why}.")
    else:
        g = gaps["muon"]
        verdict = "holds" if g < -min_gap else ("does not hold" if g > min_gap else "inconclusive")
        lines.append(
            f"1. *Parallax beats softmax under Muon* (same width, depth and tokens) — **{verdict}**: "
            f"val loss {val('parallax-muon'):.4f} vs {val('softmax-muon'):.4f}, gap Parallax − softmax = {g:+.4f} nats "
            f"(perplexity ×{math.exp(g):.3f}; |gap| ≤ {min_gap} is called inconclusive)."
        )
    why = missing("parallax-adamw", "softmax-adamw")
    if why or "muon" not in gaps:
        lines.append(
            f"2. *The advantage mostly disappears under AdamW* — {why or 'not measured: the Muon gap is missing'}."
        )
    else:
        gm, ga = gaps["muon"], gaps["adamw"]
        adv_m, adv_a = -gm, -ga
        if adv_m <= min_gap:
            verdict = "not testable (no Muon advantage to lose)"
        elif adv_a < 0.5 * adv_m:
            verdict = "holds"
        else:
            verdict = "does not hold"
        lines.append(
            f"2. *The advantage mostly disappears under AdamW* — **{verdict}**: gap Parallax − softmax under AdamW "
            f"{ga:+.4f} nats vs {gm:+.4f} under Muon (the rule: the AdamW advantage is under half the Muon "
            f"advantage, which must exceed {min_gap})."
        )

    # 1 and 2 again at equal tokens: when max_time cut some runs, compare at the last validation step every grid
    # cell reached (same tokens, same position in the schedule), which removes the bias named above.
    common = equal_token_step([cells[c] for c in GRID_CELLS if c in cells]) if cut else None
    if common is not None:
        step, at = common
        eq_gaps = {
            opt: at[f"parallax-{opt}"] - at[f"softmax-{opt}"]
            for opt in ("muon", "adamw")
            if f"parallax-{opt}" in at and f"softmax-{opt}" in at
        }
        if "muon" in eq_gaps:
            gm = eq_gaps["muon"]
            v1 = "holds" if gm < -min_gap else ("does not hold" if gm > min_gap else "inconclusive")
            text = (
                f"1′. *At equal tokens* (validation after step {step}, {fmt_tokens(step * runs[0].tokens_per_step)} "
                f"tokens each, the last one all cells reached): Parallax − softmax under Muon {gm:+.4f} nats "
                f"({at['parallax-muon']:.4f} vs {at['softmax-muon']:.4f}) — claim 1 **{v1}** at equal tokens"
            )
            if "adamw" in eq_gaps:
                ga = eq_gaps["adamw"]
                if -gm <= min_gap:
                    v2 = "not testable (no Muon advantage to lose)"
                else:
                    v2 = "holds" if -ga < 0.5 * -gm else "does not hold"
                text += (
                    f"; under AdamW {ga:+.4f} nats ({at['parallax-adamw']:.4f} vs {at['softmax-adamw']:.4f}) — "
                    f"claim 2 **{v2}** at equal tokens"
                )
            lines.append(text + ".")

    # 1b: the matched controls, when they ran (param-matched softmax, compute-matched Parallax; both Muon)
    for control, other, what in (
        ("softmax_pm-muon", "parallax-muon", "Parallax vs softmax with as many parameters (1.5x query heads)"),
        ("parallax_cm-muon", "softmax-muon", "compute-matched Parallax (half head dim, larger MLP) vs softmax"),
    ):
        if control not in cells:
            continue
        if val(control) is None or val(other) is None:
            lines.append(f"1b. *{what}* — {missing(control, other)}.")
            continue
        parallax_side, softmax_side = (other, control) if control.startswith("softmax") else (control, other)
        g = val(parallax_side) - val(softmax_side)
        verdict = "Parallax better" if g < -min_gap else ("softmax better" if g > min_gap else "inconclusive")
        lines.append(
            f"1b. *{what}, under Muon* — **{verdict}**: {parallax_side} {val(parallax_side):.4f} vs {softmax_side} "
            f"{val(softmax_side):.4f}, gap {g:+.4f} nats."
        )

    # 3 and 4: the codesign evidence from the diagnostics of the two Parallax runs
    pm, pa = cells.get("parallax-muon"), cells.get("parallax-adamw")
    if pm is None or pa is None or not pm.layers("correction_ratio") or not pa.layers("correction_ratio"):
        lines.append(
            "3. *Muon keeps the correction branch large* — not measured: a Parallax run or its diagnostics is missing."
        )
    else:
        rm, ra = pm.layers("correction_ratio"), pa.layers("correction_ratio")
        dm, da = mean(deep_half(rm)), mean(deep_half(ra))
        verdict = "holds" if dm > da else "does not hold"
        lines.append(
            f"3. *Muon keeps the correction branch large* — **{verdict}**: correction-to-output ratio ‖Cov·r‖/‖v̄‖ "
            f"in the deep half of the layers {dm:.2f} under Muon vs {da:.2f} under AdamW ({_times(dm, da)}); "
            f"by layer, Muon {', '.join(f'{x:.2f}' for x in rm)}; AdamW {', '.join(f'{x:.2f}' for x in ra)}. "
            f"The paper (0.6B): {PAPER['correction_ratio']}."
        )
    if pm is None or pa is None or not pm.layers("stable_rank_w_r") or not pa.layers("stable_rank_w_r"):
        lines.append("4. *Muon keeps W_R high-rank* — not measured: a Parallax run or its diagnostics is missing.")
    else:
        sm, sa = mean(pm.layers("stable_rank_w_r")), mean(pa.layers("stable_rank_w_r"))
        verdict = "holds" if sm > sa else "does not hold"
        lines.append(
            f"4. *Muon keeps W_R high-rank* — **{verdict}**: mean stable rank of W_R {sm:.1f} under Muon vs "
            f"{sa:.1f} under AdamW ({_times(sm, sa)}; at most {pm.wr_rank_bound} for its {pm.wr_shape} shape). "
            f"The paper (0.6B): {PAPER['wr_stable_rank']}."
        )

    # 5: end-to-end throughput, from the grid runs themselves and from bench_e2e when given
    parts = []
    for opt in ("muon", "adamw"):
        a, b = cells.get(f"parallax-{opt}"), cells.get(f"softmax-{opt}")
        if a and b and a.median_tokens_per_s and b.median_tokens_per_s:
            ratio = a.median_tokens_per_s / b.median_tokens_per_s
            parts.append(
                f"{opt}: {a.median_tokens_per_s:,.0f} / {b.median_tokens_per_s:,.0f} tokens/s = {ratio:.2f}× "
                f"({'meets' if ratio >= 0.8 else 'misses'} the 0.8× target)"
            )
    if bench:
        for row in bench.get("ratios", []):
            parts.append(
                f"bench_e2e at T={row['seq_len']}: {row['parallax_tokens_per_s']:,.0f} / "
                f"{row['softmax_tokens_per_s']:,.0f} tokens/s = {row['ratio']:.2f}× "
                f"({'meets' if row['ratio'] >= 0.8 else 'misses'} the 0.8× target)"
            )
    if parts:
        lines.append("5. *End-to-end throughput, Parallax / softmax (same call)* — " + "; ".join(parts) + ".")
    else:
        lines.append("5. *End-to-end throughput* — not measured: no tokens/s for a Parallax/softmax pair.")
    if not cut and len(set(tokens.values())) > 1:
        lines.append(f"Note: token counts differ although no run was cut: {tokens}.")
    return lines


# --------------------------------------------------------------------------------------------- figures


def make_figures(runs: list[Run], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    written = []
    colors = {"softmax-muon": "C0", "parallax-muon": "C3", "softmax-adamw": "C9", "parallax-adamw": "C1"}
    styles = {"muon": "-", "adamw": "--"}

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for r in runs:
        if not r.val:
            continue
        x = [s * r.tokens_per_step / 1e6 for s, _ in r.val]
        ax.plot(
            x,
            [v for _, v in r.val],
            styles.get(r.optimizer, ":"),
            marker="o",
            markersize=3,
            color=colors.get(r.cell),
            label=r.cell + (" (cut)" if r.cut else ""),
        )
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out_dir / "val_loss.png", dpi=120)
    written.append("val_loss.png")

    for stat, name, ylabel, title in (
        ("correction_ratio", "correction_ratio.png", "‖Cov·r‖ / ‖v̄‖", "Correction-to-output ratio"),
        ("stable_rank_w_r", "wr_stable_rank.png", "stable rank ‖W‖²_F / ‖W‖²_2", "Stable rank of W_R"),
    ):
        fig = Figure(figsize=(10, 4), layout="constrained")
        left, right = fig.subplots(1, 2)
        for r in runs:
            values = r.layers(stat)
            if not values:
                continue
            style = dict(color=colors.get(r.cell), linestyle=styles.get(r.optimizer, ":"), marker="o", markersize=3)
            left.plot(range(len(values)), values, label=r.cell, **style)
            history = r.layer_mean_history(stat)
            right.plot(
                [s * r.tokens_per_step / 1e6 for s, _ in history], [v for _, v in history], label=r.cell, **style
            )
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.set_xlabel("layer")
        left.set_ylabel(ylabel)
        left.set_title(f"{title} by layer, end of training")
        right.set_xlabel("training tokens (M)")
        right.set_ylabel(f"mean over layers of {ylabel}")
        right.set_title(f"{title} during training")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.savefig(out_dir / name, dpi=120)
        written.append(name)
    return written


# ---------------------------------------------------------------------------------------------- report


def settings_line(runs: list[Run]) -> str:
    r = runs[0]
    gpus = sorted({x.tags.get("parallax.gpu", "?") for x in runs})
    commits = sorted({x.tags.get("parallax.git_commit", "unknown")[:10] for x in runs})
    return (
        f"Per run: {r.max_steps} steps x {r.batch_size} x {r.seq_len} tokens = {fmt_tokens((r.max_steps or 0) * r.tokens_per_step)} "
        f"planned; device {', '.join(gpus)}; torch {r.tags.get('parallax.torch_version', '?')}, "
        f"triton {r.tags.get('parallax.triton_version', '?')}; code commit {', '.join(commits)}."
        + (f" max_steps: {r.tags['paper.steps_rule']}." if "paper.steps_rule" in r.tags else "")
    )


def render(
    grid_id: str, runs: list[Run], experiment: str, tracking_uri: str, min_gap: float, bench, figures, shot
) -> str:
    synthetic = any(r.tags.get("synthetic") == "true" for r in runs)
    lines = ["# Paper grid: Parallax vs softmax under Muon and AdamW", ""]
    if synthetic:
        lines += ["**SYNTHETIC TEST DATA — these numbers were logged by a test, not measured by training.**", ""]
    lines += [
        f"Generated by `experiments/paper/report.py` on {time.strftime('%Y-%m-%d %H:%M')} from MLflow experiment "
        f"`{experiment}`, grid `{grid_id}` ({len(runs)} runs; store `{tracking_uri}`). Command that made the runs: "
        f"`bash experiments/paper/run_grid.sh` (see experiments/paper/README.md).",
        "",
        settings_line(runs),
        "",
        "## Results",
        "",
        main_table(runs),
        "",
        "Final val loss: the whole fixed validation split at the last validation step. Tokens/s and MFU: medians of "
        "the windows SpeedMonitor logged (validation excluded; MFU counts attention FLOPs by hand against the "
        "GPU's dense bf16 peak). Correction ratio and stable ranks: the ParallaxDiagnostics callback at the last step.",
        "",
    ]
    missing = [c for c in GRID_CELLS if c not in {r.cell for r in runs}]
    if missing:
        lines += [f"Missing cells: {', '.join(missing)}.", ""]
    for stat, title in (
        ("correction_ratio", "Correction-to-output ratio ‖Cov·r‖/‖v̄‖ by layer"),
        ("stable_rank_w_r", "Stable rank of W_R by layer"),
        ("stable_rank_w_q", "Stable rank of W_Q by layer"),
    ):
        table = layer_table(runs, stat)
        if table:
            lines += [f"### {title}", "", table, ""]
    lines += ["## The paper's claims at this scale", ""]
    lines += claims(runs, min_gap, bench)
    lines += [
        "",
        f"One seed per cell; gaps within ±{min_gap} nats are called inconclusive (an assumed seed-to-seed spread, "
        "not a measured one).",
        "",
    ]
    if bench:
        lines += ["## End-to-end throughput (benchmarks/bench_e2e.py, same device call)", ""]
        rows = [
            [
                b["name"],
                str(b["seq_len"]),
                f"{b['tokens_per_s']:,.0f}",
                f"{100 * b['mfu']:.1f}%" if b.get("mfu") is not None else "—",
                f"{b['step_ms']:.1f}",
            ]
            for b in bench.get("results", [])
        ]
        lines += [md_table(["variant", "seq len", "tokens/s", "MFU", "step ms"], rows), ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{name}]({name})" for name in figures]
        lines += [""]
    if shot:
        lines += ["## The runs side by side in the MLflow UI", "", f"![MLflow compare view]({shot})", ""]
    return "\n".join(lines)


def _screenshot_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_screenshot", HERE / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="the MLflow store (sqlite:///...)")
    p.add_argument("--experiment", default="paper-grid")
    p.add_argument("--grid-id", default=None, help="which invocation of run_grid (default: the newest)")
    p.add_argument("--out-dir", default=str(HERE), help="where RESULTS.md and the figures go")
    p.add_argument("--min-gap", type=float, default=0.01, help="loss gaps within ±this many nats are inconclusive")
    p.add_argument("--bench-json", default=None, help="benchmarks/bench_e2e.py's JSON, for the throughput section")
    p.add_argument("--print-only", action="store_true", help="print the table and claims; write nothing")
    p.add_argument("--screenshot", action="store_true", help="also capture the MLflow compare view (needs chromium)")
    args = p.parse_args(argv)

    grid_id, runs = load_runs(args.tracking_uri, args.experiment, args.grid_id)
    bench = json.loads(Path(args.bench_json).read_text()) if args.bench_json else None
    if args.print_only:
        print(f"paper grid {grid_id} ({args.experiment})")
        print(main_table(runs))
        print()
        print("\n".join(claims(runs, args.min_gap, bench)))
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = make_figures(runs, out_dir)
    shot = None
    if args.screenshot:  # only a capture of these runs made now: a stale one would show other runs
        capture_compare_view = _screenshot_module().capture_compare_view
        capture_compare_view(args.tracking_uri, args.experiment, [r.run_id for r in runs], out_dir / SCREENSHOT)
        shot = SCREENSHOT
    text = render(grid_id, runs, args.experiment, args.tracking_uri, args.min_gap, bench, figures, shot)
    (out_dir / "RESULTS.md").write_text(text)
    print(f"report: wrote {out_dir / 'RESULTS.md'} and {', '.join(figures)}" + (f", {shot}" if shot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
