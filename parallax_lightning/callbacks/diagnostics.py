"""Callbacks that show what the run looks like: `ParallaxDiagnostics` (per-layer correction ratio, ‖r‖ and
stable ranks, logged every N steps, and their figure) and `LossCurves` (the whole run's loss figure), with
`save_figure` (to the MLflow run, else the trainer's folder), which the long-context evaluations use too."""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from ..tracking import log_figure, metric_history, mlflow_loggers
from .monitors import log_on_rank_zero


class ParallaxDiagnostics(Callback):
    """Per-layer Parallax statistics at step 0 (before the first update: the baseline every later value is
    read against), then every `every_n_steps` optimizer steps (0 turns them off) and at the end, logged as
    diag/layer{i}/{stat}, and a figure of their evolution at the end of training.

    They are computed on a fixed batch (the first validation batch, cut to `batch_size` × `seq_len`),
    on rank 0, with the decoder's own weights (`pl_module.model`). Fully sharded (FSDP, FSDP2) runs skip them.
    """

    def __init__(self, every_n_steps: int = 100, batch_size: int = 2, seq_len: int | None = 256, figure: bool = True):
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.figure = figure
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._inputs: torch.Tensor | None = None
        self._last_step = -1

    def _enabled(self, trainer, pl_module) -> bool:
        if self.every_n_steps == 0 or trainer.global_rank != 0 or not hasattr(pl_module, "model"):
            return False
        # Sharded weights (FSDP, FSDP2) would need every rank in the forward: rank 0 alone would hang.
        return "fsdp" not in type(trainer.strategy).__name__.lower() and not getattr(pl_module, "sharded", False)

    def _fixed_inputs(self, trainer, batch) -> torch.Tensor:
        if self._inputs is None:
            source = batch["input_ids"]
            datamodule = trainer.datamodule
            if datamodule is not None and hasattr(datamodule, "val_dataloader"):
                try:
                    source = next(iter(datamodule.val_dataloader()))["input_ids"]
                except Exception as err:  # fall back to the training batch rather than lose the diagnostics
                    warnings.warn(f"diagnostics use a training batch: no validation batch ({err})", stacklevel=2)
            self._inputs = source[: self.batch_size, : self.seq_len].clone()
        return self._inputs

    def _measure(self, trainer, pl_module, batch) -> None:
        from ..diagnostics import parallax_layer_stats

        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        inputs = self._fixed_inputs(trainer, batch).to(pl_module.device)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            layers = parallax_layer_stats(pl_module.model, inputs)
        metrics = {}
        for entry in layers:
            for key, value in entry.items():
                if key != "layer":
                    name = f"diag/layer{entry['layer']}/{key}"
                    metrics[name] = float(value)
                    self.history[name].append((step, float(value)))
        log_on_rank_zero(trainer, metrics, step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # The initial weights (a resumed run does not pass step 0 again; its history holds the value)
        if trainer.global_step == 0 and self._enabled(trainer, pl_module):
            self._measure(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._enabled(trainer, pl_module) and trainer.global_step % max(self.every_n_steps, 1) == 0:
            self._measure(trainer, pl_module, batch)

    def on_train_end(self, trainer, pl_module):
        if not self._enabled(trainer, pl_module):
            return
        if self._inputs is not None:
            self._measure(trainer, pl_module, {"input_ids": self._inputs})
        if self.figure and self.history:
            save_figure(trainer, self.make_figure(), "figures/parallax_diagnostics.png")

    def make_figure(self):
        from matplotlib.figure import Figure

        stats = sorted({name.split("/", 2)[2] for name in self.history})
        cols = min(4, len(stats))
        rows = -(-len(stats) // cols)
        fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).flatten()
        for ax in axes[len(stats) :]:
            ax.set_visible(False)
        for ax, stat in zip(axes, stats):
            for name in sorted(n for n in self.history if n.endswith("/" + stat)):
                steps, values = zip(*sorted(self.history[name]))
                ax.plot(steps, values, marker="o", markersize=2, label=name.split("/")[1])
            ax.set_title(stat)
            ax.set_xlabel("step")
            if stat == "correction_ratio":
                ax.set_ylabel("‖Cov·r‖ / ‖v̄‖")
        axes[0].legend(fontsize=7)
        fig.suptitle("Parallax per-layer diagnostics")
        return fig

    def state_dict(self) -> dict:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = defaultdict(list, {k: [tuple(p) for p in v] for k, v in state_dict.get("history", {}).items()})


class LossCurves(Callback):
    """At the end of training, a figure of train/loss and val/loss over the whole MLflow run."""

    def __init__(self, keys: tuple[str, ...] = ("train/loss", "val/loss")):
        super().__init__()
        self.keys = tuple(keys)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        loggers = mlflow_loggers(trainer)
        if not loggers:
            return
        from matplotlib.figure import Figure

        logger = loggers[0]
        fig = Figure(figsize=(6.5, 4), layout="constrained")
        ax = fig.subplots()
        plotted = False
        for key in self.keys:
            try:
                points = metric_history(logger, key)
            except Exception as err:  # the store is unavailable: the figure is not worth waiting for
                warnings.warn(f"no loss-curve figure: the run's metrics cannot be read back ({err})", stacklevel=2)
                return
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
                plotted = True
        if not plotted:
            return
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.suptitle(getattr(pl_module, "run_name", lambda: "")())
        log_figure(logger, fig, "figures/loss_curves.png")


def save_figure(trainer: pl.Trainer, fig, artifact_file: str) -> None:
    """To the MLflow run if there is one, else under the trainer's root folder."""
    loggers = mlflow_loggers(trainer)
    if loggers:
        log_figure(loggers[0], fig, artifact_file)
    else:
        path = Path(trainer.default_root_dir) / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
