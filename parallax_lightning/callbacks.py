"""Callbacks the CLI registers (each configurable under its own key, or listed in `trainer.callbacks`):

- `SpeedMonitor`: tokens/s, step time and MFU (model FLOPs utilisation: FLOPs per token counted by hand,
  attention included, over the device's dense peak from Lightning's table, a small addition, or a configured
  peak), computed with Lightning's `Throughput`.
- `TrainingMetrics`: gradient norm, tokens trained on so far, and the optimizer's per-group update RMS.
- `LRMonitor`: Lightning's LearningRateMonitor (learning rate, momentum, weight decay per parameter group),
  logged when the optimizer steps.
- `ParallaxDiagnostics`: every N steps, per layer, the correction-to-output ratio ‖Cov·r‖/‖v̄‖, mean ‖r‖ and
  the stable ranks of W_R, W_Q, W_K (the paper's evidence for the Muon codesign), plus a figure at the end.
- `LossCurves`: a figure of the train / validation loss of the whole run (resumed sessions included).
- `ParallaxCheckpoint`: ModelCheckpoint whose `last` checkpoint is also written when training ends between
  two periodic saves, so a run stopped by max_steps continues from exactly where it stopped; on SIGTERM or
  SIGINT it finishes the current step, saves `last`, ends the MLflow run as KILLED and exits with status
  128 + the signal number (`TrainingInterrupted`). The files themselves are written atomically by
  `checkpoint_io.AtomicCheckpointIO`, and a `save_last="link"` link is replaced atomically too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only

from . import _lightning_compat as compat
from .tracking import ParallaxMLFlowLogger, log_figure, metric_history, mlflow_loggers

# Lightning's peak table (`get_available_flops`) misses the name torch reports for the H200 ("NVIDIA H200",
# "NVIDIA H200 NVL") and lists the H200's sparse peaks where it has one; MFU here is against the dense 16-bit
# peak, from the datasheet.
DENSE_16BIT_PEAKS_LIGHTNING_LACKS = (("h200 nvl", 835e12), ("h200", 989e12))
_16BIT = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16}
_16BIT.update({"16-mixed": torch.float16, "16-true": torch.float16, "16": torch.float16})


def peak_flops_for(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one `device` computing in `precision` (a Trainer precision string), or None when
    unknown (CPU; a GPU neither Lightning nor the table above knows)."""
    device = torch.device(device)
    dtype = _16BIT.get(str(precision), torch.float32)
    if device.type == "cuda" and dtype != torch.float32:
        name = torch.cuda.get_device_name(device).lower()
        for key, flops in DENSE_16BIT_PEAKS_LIGHTNING_LACKS:
            if key in name:
                return flops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FLOPs not found": the caller says what to configure instead
        flops = get_available_flops(device, dtype)
    return float(flops) if flops else None


def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    if trainer.global_rank == 0:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _is_logging_step(trainer: pl.Trainer, step: int, every: int | None = None) -> bool:
    """Whether optimizer step `step` (0-based: the steps taken before it) is one Lightning logs train/loss at."""
    every = every or trainer.log_every_n_steps
    return every > 0 and ((step + 1) % every == 0 or trainer.should_stop)


class SpeedMonitor(Callback):
    """Logs perf/tokens_per_s (all devices), perf/step_time_s and perf/mfu every `log_every_n_steps`, over the
    steps since the previous log, with Lightning's `Throughput` (the windowed rates behind its
    ThroughputMonitor) and its peak-FLOPs table. Every metric goes to the step train/loss of the same optimizer
    step is logged at (see `_is_logging_step`).

    Time spent in validation is excluded; the first step (compilation, warm-up) starts the clock. When the
    module compiled its model (`pl_module.compiled`), that first step's wall time, compilation included, is
    logged once as perf/compile_s. FLOPs per token come from the module's `flops_per_token(seq_len)` (counted
    by hand, attention included).

    ThroughputMonitor itself is not used: it cannot take a configured peak, misses the H200, synchronises the
    GPU after every batch and logs under its own names.

    Args:
        peak_flops: peak FLOP/s of ONE device. None = what `peak_flops_for` knows for the device and precision;
            on CPU MFU is logged only when this is given.
        log_every_n_steps: None = the trainer's log_every_n_steps.
    """

    def __init__(self, peak_flops: float | None = None, log_every_n_steps: int | None = None):
        super().__init__()
        self.peak_flops = peak_flops
        self.log_every_n_steps = log_every_n_steps
        self._peak: float | None = None
        self._reset()

    def _reset(self):
        self._throughput: Throughput | None = None
        self._t0: float | None = None
        self._counts = [0, 0, 0]  # optimizer steps, sequences, tokens since the clock started (this rank)
        self._flops = 0.0  # since the last update
        self._paused = 0.0
        self._val_t0: float | None = None
        self._first_t0: float | None = None
        self._step = 0

    def on_train_start(self, trainer, pl_module):
        self._reset()
        self._peak = self.peak_flops or peak_flops_for(trainer.strategy.root_device, trainer.precision)
        if self._peak is None and trainer.strategy.root_device.type == "cuda":
            warnings.warn(
                f"no peak FLOP/s known for {torch.cuda.get_device_name(trainer.strategy.root_device)} in "
                f"{trainer.precision} precision: set speed.peak_flops to log MFU",
                stacklevel=2,
            )

    def _sync(self, trainer):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        if self._t0 is None and self._first_t0 is None:
            self._first_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stepped = trainer.global_step > self._step
        if self._t0 is None:  # the first step compiles and warms up: start the clock after it
            if not stepped:
                return
            self._sync(trainer)
            self._t0 = time.perf_counter()
            self._throughput = Throughput(available_flops=self._peak, world_size=trainer.world_size, window_size=2)
            self._throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)
            if getattr(pl_module, "compiled", False) and self._first_t0 is not None:
                _log(trainer, {"perf/compile_s": self._t0 - self._first_t0}, self._step)
            return
        input_ids = batch["input_ids"]
        self._counts[1] += input_ids.shape[0]
        self._counts[2] += input_ids.numel()
        if hasattr(pl_module, "flops_per_token"):
            self._flops += input_ids.numel() * pl_module.flops_per_token(input_ids.shape[1])
        if not stepped:  # inside gradient accumulation
            return
        self._counts[0] += trainer.global_step - self._step
        if not _is_logging_step(trainer, self._step, self.log_every_n_steps):
            return
        self._sync(trainer)
        elapsed = time.perf_counter() - self._t0 - self._paused
        steps, samples, tokens = self._counts
        self._throughput.update(time=elapsed, batches=steps, samples=samples, lengths=tokens, flops=self._flops)
        self._flops = 0.0
        rates = self._throughput.compute()
        metrics = {
            "perf/tokens_per_s": rates["device/items_per_sec"] * trainer.world_size,
            "perf/step_time_s": 1.0 / rates["device/batches_per_sec"],
        }
        if "device/mfu" in rates:
            metrics["perf/mfu"] = rates["device/mfu"]
        _log(trainer, metrics, self._step)

    def on_validation_start(self, trainer, pl_module):
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._val_t0 is not None and self._t0 is not None:
            self._paused += time.perf_counter() - self._val_t0
        self._val_t0 = None


class TrainingMetrics(Callback):
    """What each optimizer step did, at the trainer's logging steps (the steps train/loss is logged at):

    - train/grad_norm: the global L2 norm of the gradients the optimizer receives (after un-scaling, before
      clipping), computed on the logging steps only;
    - train/tokens: input tokens trained on so far, all devices, kept in checkpoints so a resumed run continues
      the count;
    - train/update_rms/<group>: per parameter group, the RMS of the update direction before the learning rate
      (Muon's `update_rms()`, recorded on the device without a host sync; read once per logging step).
    """

    def __init__(self, grad_norm: bool = True, update_rms: bool = True):
        super().__init__()
        self.grad_norm = grad_norm
        self.update_rms = update_rms
        self.tokens = 0
        self._step = 0
        self._pending: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        if self.update_rms:  # recorded on the steps that are logged only: the other steps pay nothing for it
            for optimizer in trainer.optimizers:
                if hasattr(optimizer, "track_update_rms"):
                    optimizer.track_update_rms = _is_logging_step(trainer, self._step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grad_norm or not _is_logging_step(trainer, self._step):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            # Sharded (FSDP2) gradients give a sharded norm: every rank takes part in making it whole.
            self._pending["train/grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.tokens += batch["input_ids"].numel() * trainer.world_size
        if trainer.global_step == self._step or not _is_logging_step(trainer, self._step):
            return
        metrics = {"train/tokens": float(self.tokens)}
        if self._pending:
            values = torch.stack([v.detach().float().reshape(()) for v in self._pending.values()]).tolist()
            metrics.update(zip(self._pending, values))
            self._pending = {}
        if self.update_rms:
            for optimizer in trainer.optimizers:
                if hasattr(optimizer, "update_rms"):
                    from parallax_muon.diagnostics import update_rms_metrics

                    metrics.update(update_rms_metrics(optimizer, prefix="train/update_rms/"))
        _log(trainer, metrics, self._step)

    def state_dict(self) -> dict:
        return {"tokens": self.tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens = int(state_dict.get("tokens", 0))


class LRMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, logging when the optimizer steps rather than when a batch starts: once
    per optimizer step under gradient accumulation (not once per micro-batch), and after every callback's
    `on_train_batch_start` has run, so a resumed run's first value gets the step the other metrics get
    (ParallaxCheckpoint settles Lightning's logging-step counter there)."""

    def on_train_batch_start(self, trainer, *args, **kwargs):
        pass

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_train_batch_start(trainer)


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
        from .diagnostics import parallax_layer_stats

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
        _log(trainer, metrics, step)

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


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving a resumable checkpoint. A SystemExit whose code is 128 + the
    signal number (130 for SIGINT, 143 for SIGTERM), as shells and schedulers expect."""

    def __init__(self, signum: int, step: int, path: str):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        self.message = (
            f"received {name}: training stopped after step {step}; the state is saved at {path}. "
            f"Resume with --ckpt_path {path} (the MLflow run continues; it is marked KILLED until then)."
        )
        super().__init__(128 + signum)

    def __str__(self) -> str:
        return self.message


_FINAL_LOGGING_STEP = "parallax_final_logging_step"


class ParallaxCheckpoint(compat.CheckpointInternals):
    """ModelCheckpoint that writes `last` at the end of training when the final step was not saved yet
    (Lightning's writes it only if no `last` exists at all), so `--ckpt_path .../last.ckpt` with a larger
    max_steps continues from the final step instead of replaying the steps since the previous save.

    With `handle_signals` (default), SIGTERM and SIGINT during training do not kill the process mid-step: the
    current step (and a validation already running) completes and its metrics are logged, the checkpoint is
    saved as at a periodic save (`last`, or `interrupted-step<N>.ckpt` without save_last), the MLflow run ends
    as KILLED and `TrainingInterrupted` exits with 128 + the signal number. A second signal stops at once.
    """

    def __init__(self, *args, handle_signals: bool = True, **kwargs):
        compat.check_version()  # before any run starts
        super().__init__(*args, **kwargs)
        self.handle_signals = handle_signals
        self._signal: int | None = None
        self._interruption: TrainingInterrupted | None = None
        self._previous_handlers: dict[int, object] = {}
        self._trainer = None
        self._in_batch_end = False
        self._presubmitted_step: int | None = None
        self._final_logging_step: int | None = None  # written by the save at the end of training
        self._resume_logging_step: int | None = None  # read back from such a checkpoint

    # -- signals ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._signal, self._interruption, self._trainer = None, None, trainer
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        # The run is marked KILLED where training actually stops (`_stop_on_signal`, or here on a second signal):
        # a first signal that comes after the last step lets training finish, and the run is FINISHED.
        if self._signal is not None:  # the second one: stop now, as an unhandled Ctrl+C would
            if self._trainer is not None:
                for logger in mlflow_loggers(self._trainer):
                    if hasattr(logger, "mark_interrupted"):
                        logger.mark_interrupted(f"{signal.Signals(signum).name} at step {self._trainer.global_step}")
            self._restore_signals()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self._signal = signum
        print(
            f"parallax_lightning: received {signal.Signals(signum).name}: finishing the current step, saving a "
            "checkpoint and stopping (send it again to stop at once, without a checkpoint)",
            file=sys.stderr,
            flush=True,
        )

    def _stop_requested(self, trainer) -> bool:
        requested = self._signal is not None
        if trainer.world_size > 1:  # every rank must stop at the same step, whichever got the signal
            requested = bool(trainer.strategy.reduce_boolean_decision(requested, all=False))
        return requested

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._in_batch_end = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self._stop_on_signal(trainer)
        finally:
            self._in_batch_end = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        """Lightning logs a step's metrics after on_train_batch_end, i.e. after a save made there is on disk:
        a process killed in between would resume after a step whose loss never reached MLflow. So the step's
        metrics go to the MLflow logger now, before the file is written (its outbox's write-ahead spool keeps
        them through a kill); the logger skips Lightning's own logging of the same values a moment later."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._final_logging_step is not None:
            checkpoint[_FINAL_LOGGING_STEP] = self._final_logging_step
        step = compat.logging_step(trainer)
        loggers = [logger for logger in trainer.loggers if isinstance(logger, ParallaxMLFlowLogger)]
        if not self._in_batch_end or not loggers or self._presubmitted_step == step or trainer.global_rank != 0:
            return
        pending = compat.pending_step_metrics(trainer, pl_module)
        if pending is None:
            return  # Lightning will not log this step either
        log_step, metrics = pending
        if metrics:
            for logger in loggers:
                logger.log_metrics(metrics, step=log_step)
        self._presubmitted_step = step

    def _stop_on_signal(self, trainer) -> None:
        if self._interruption is not None or not self.handle_signals or not self._stop_requested(trainer):
            return
        step = trainer.global_step
        signum = self._signal if self._signal is not None else signal.SIGTERM  # another rank got it
        if not self.saved_at(step):
            # Saved here, like a periodic save, so resuming replays nothing and skips nothing.
            if self.save_last:
                path = self._save_last_now(trainer)
            else:
                path = os.path.join(self.dirpath, f"interrupted-step{step}.ckpt")
                self.save_file(trainer, path)
            self.mark_saved(step)
        else:
            path = self.last_model_path if self.save_last else self.newest_file
        for logger in mlflow_loggers(trainer):
            if hasattr(logger, "mark_interrupted"):
                logger.mark_interrupted(f"{signal.Signals(signum).name} at step {step}")
        # Raised at the start of the next batch: this step's metrics are logged first.
        self._interruption = TrainingInterrupted(signum, step, str(path))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._interruption is not None:
            self._restore_signals()
            raise self._interruption
        if self._resume_logging_step is not None:
            # Lightning re-derives its logging-step counter on restart from where in an accumulation cycle the
            # save happened, which a save at the end of training does not fit; the counter it had then is
            # exact, so it is set here, after Lightning's own restart arithmetic ran.
            compat.set_logging_step(trainer, self._resume_logging_step)
            self._resume_logging_step = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._resume_logging_step = checkpoint.get(_FINAL_LOGGING_STEP)

    def on_exception(self, trainer, pl_module, exception):
        self._restore_signals()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer, pl_module, stage):
        self._restore_signals()
        self._trainer = None
        super().teardown(trainer, pl_module, stage)

    def _save_last_now(self, trainer) -> str:
        """Write `last` with the state after the current step (a save between two periodic ones: on a signal,
        at the end of training) and return its path. Lightning's save_last would, with save_last="link", only
        point `last` at the newest periodic file, an older step; here `last` becomes a file, which the next
        periodic save turns back into a link (in one rename)."""
        if self.save_last == "link":
            monitor = self.monitor_candidates(trainer)
            self.last_model_path = self.format_checkpoint_name(monitor, self.CHECKPOINT_NAME_LAST)  # in the state
            self.save_file(trainer, self.last_model_path)
            return self.last_model_path
        return self.save_last_file(trainer)

    # -- end of training -------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module):
        self._restore_signals()
        if self.save_last and not self.saved_at(trainer.global_step) and not trainer.fast_dev_run:
            # Lightning expects saves inside on_train_batch_end, before its logging-step counter moves, and
            # adds one on restart; by now the counter has moved, so undo that here (as its fit loop does for
            # epoch-end logging), or a resumed run would log its steps one too high.
            counter = compat.logging_step(trainer)
            self._final_logging_step = counter  # restored exactly on resume
            compat.set_logging_step(trainer, counter - 1)
            try:
                self._save_last_now(trainer)
            finally:
                compat.set_logging_step(trainer, counter)
                self._final_logging_step = None
            self.mark_saved(trainer.global_step)
        else:
            super().on_train_end(trainer, pl_module)
