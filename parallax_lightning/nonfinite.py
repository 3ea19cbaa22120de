"""`NonFiniteGuard`: what a NaN/inf training loss or gradient does to a run.

"stop" (the default) saves the state before the step that went bad (`nonfinite-step<N>.ckpt`) and raises
`NonFiniteLossError`, naming the step, the first parameter whose gradient is not finite and the checkpoints;
"skip" drops that optimizer step (the weights and optimizer state stay as they were, `train/nonfinite_skips`
counts the skips) and stops anyway after `max_skips` skipped steps in a row.

LanguageModelModule adds one through `configure_callbacks` from its `nonfinite` / `max_nonfinite_skips`
arguments, so the config keys `model.nonfinite` and `model.max_nonfinite_skips` set it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal, get_args

import torch
from lightning.pytorch.callbacks import Callback

NonFiniteMode = Literal["stop", "skip"]
NONFINITE_MODES: tuple[str, ...] = get_args(NonFiniteMode)
_CHECKPOINT_KEY = "nonfinite_skips"  # top-level checkpoint key: checkpoints written before the guard was a callback


class NonFiniteLossError(RuntimeError):
    """The training loss or a gradient became NaN or infinite; the message names the step, the parameter
    (for a gradient) and the saved checkpoints."""


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one fused reduction
    if get_total_norm is not None:
        return get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


class NonFiniteGuard(Callback):
    """Stop on (or skip) an optimizer step whose loss or gradients are NaN/inf.

    Args:
        mode: "stop" (save the state before the step and raise NonFiniteLossError; the CLI exits with status 3)
            or "skip" (drop that optimizer step and go on).
        max_skips: with "skip", stop anyway after this many consecutive skipped steps (the run is then
            diverging, not hitting a rare bad batch).
    """

    def __init__(self, mode: NonFiniteMode = "stop", max_skips: int = 10):
        super().__init__()
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
        if max_skips < 1:
            raise ValueError(f"max_nonfinite_skips must be >= 1, got {max_skips}")
        self.mode = mode
        self.max_skips = max_skips
        self.skips_total = 0
        self._skips_in_a_row = 0
        self._nonfinite_loss: str | None = None  # this optimizer step's loss was not finite (message)
        self._batch_idx: int | None = None

    # -- checks ----------------------------------------------------------------------------------
    @staticmethod
    def _all_finite(trainer, loss: torch.Tensor) -> bool:
        finite = bool(torch.isfinite(loss.detach()).item())
        if trainer.world_size > 1:  # every rank must take the same branch, or the next collective hangs
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        return finite

    @staticmethod
    def _nonfinite_gradients(trainer, pl_module) -> list[str]:
        """Names of the parameters whose gradient holds NaN/inf, in model order (empty when all are finite).
        One fused norm per step; the per-parameter scan only runs when that norm is not finite."""
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return []
        finite = bool(torch.isfinite(_total_norm([g for _, g in named])).item())
        bad = [] if finite else [n for n, g in named if not bool(torch.isfinite(g).all())]
        if trainer.world_size > 1:  # sharded gradients (FSDP) differ between ranks: agree on skipping
            if trainer.strategy.reduce_boolean_decision(not bad, all=True):
                return []
            return bad or ["<a parameter shard on another rank>"]
        return bad

    def _stop(self, trainer, what: str, batch_idx: int | None = None) -> None:
        step = trainer.global_step
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
        path = folder / f"nonfinite-step{step}.ckpt"
        last = getattr(callback, "last_model_path", "") if callback is not None else ""
        saved_step = getattr(callback, "last_saved_step", None)  # ParallaxCheckpoint says which step it holds
        if last and saved_step is not None:
            last = f"{last} (step {saved_step})"
        # This step's update has not happened yet: the weights are the last good state.
        trainer.save_checkpoint(path)
        where = f"step {step}" + (f" (batch {batch_idx})" if batch_idx is not None else "")
        raise NonFiniteLossError(
            f"{what} at {where}; training stopped. The state before this step is saved at {path}"
            + (f"; the last good periodic checkpoint is {last}" if last else "")
            + ". Resume with --ckpt_path after lowering the learning rate or raising warmup, "
            "or set model.nonfinite=skip to drop such steps."
        )

    # -- hooks -----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer, pl_module, loss):
        if self._all_finite(trainer, loss):
            return
        what = f"training loss is {loss.item()}"
        if self.mode == "stop":
            self._stop(trainer, what, self._batch_idx)
        # skip: backward still runs (every rank alike), the optimizer step is dropped before it happens
        self._nonfinite_loss = what

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Under fp16 loss scaling an inf gradient is routine: GradScaler skips that step and lowers the scale.
        bad = [] if scaler is not None else self._nonfinite_gradients(trainer, pl_module)
        what = self._nonfinite_loss
        self._nonfinite_loss = None
        if bad:
            layer = re.search(r"blocks\.(\d+)\.", bad[0])
            what = (
                f"gradient of {bad[0]}"
                + (f" (layer {layer.group(1)})" if layer else "")
                + " is not finite"
                + (f" ({len(bad) - 1} more parameters too)" if len(bad) > 1 else "")
                + (f"; {what}" if what else "")
            )
        if what is None:
            self._skips_in_a_row = 0
            return
        if self.mode == "stop":
            self._stop(trainer, what)
        self._skips_in_a_row += 1
        self.skips_total += 1
        if self._skips_in_a_row > self.max_skips:
            self._stop(trainer, f"{what}, the {self._skips_in_a_row}th step in a row (max_nonfinite_skips)")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # optimizers leave parameters without a gradient untouched: the step is skipped
        if trainer.is_global_zero:
            warnings.warn(f"skipping step {trainer.global_step}: {what}", stacklevel=2)
        pl_module.log("train/nonfinite_skips", float(self.skips_total), on_step=True, on_epoch=False)

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[_CHECKPOINT_KEY] = self.skips_total

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self.skips_total = int(checkpoint.get(_CHECKPOINT_KEY, 0))
