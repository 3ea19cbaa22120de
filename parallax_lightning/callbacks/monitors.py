"""Callbacks that log how training runs: `SpeedMonitor` (tokens/s, step time, MFU), `TrainingMetrics`
(gradient norm, tokens so far, per-group update RMS) and `LRMonitor` (learning rate, momentum, weight decay
when the optimizer steps), with the step convention they share (`is_logging_step`)."""

from __future__ import annotations

import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback, LearningRateMonitor

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


def log_on_rank_zero(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    if trainer.global_rank == 0:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def is_logging_step(trainer: pl.Trainer, step: int, every: int | None = None) -> bool:
    """Whether optimizer step `step` (0-based: the steps taken before it) is one Lightning logs train/loss at."""
    every = every or trainer.log_every_n_steps
    return every > 0 and ((step + 1) % every == 0 or trainer.should_stop)


class SpeedMonitor(Callback):
    """Logs perf/tokens_per_s (all devices), perf/step_time_s and perf/mfu every `log_every_n_steps`, over the
    steps since the previous log, with Lightning's `Throughput` (the windowed rates behind its
    ThroughputMonitor) and its peak-FLOPs table. Every metric goes to the step train/loss of the same optimizer
    step is logged at (see `is_logging_step`).

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
                log_on_rank_zero(trainer, {"perf/compile_s": self._t0 - self._first_t0}, self._step)
            return
        input_ids = batch["input_ids"]
        self._counts[1] += input_ids.shape[0]
        self._counts[2] += input_ids.numel()
        if hasattr(pl_module, "flops_per_token"):
            self._flops += input_ids.numel() * pl_module.flops_per_token(input_ids.shape[1])
        if not stepped:  # inside gradient accumulation
            return
        self._counts[0] += trainer.global_step - self._step
        if not is_logging_step(trainer, self._step, self.log_every_n_steps):
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
        log_on_rank_zero(trainer, metrics, self._step)

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
                    optimizer.track_update_rms = is_logging_step(trainer, self._step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grad_norm or not is_logging_step(trainer, self._step):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            # Sharded (FSDP2) gradients give a sharded norm: every rank takes part in making it whole.
            self._pending["train/grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.tokens += batch["input_ids"].numel() * trainer.world_size
        if trainer.global_step == self._step or not is_logging_step(trainer, self._step):
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
        log_on_rank_zero(trainer, metrics, self._step)

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
