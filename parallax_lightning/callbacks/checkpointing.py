"""`ParallaxCheckpoint`: ModelCheckpoint whose `last` checkpoint is also written when training ends between
two periodic saves, so a run stopped by max_steps continues from exactly where it stopped; on SIGTERM or
SIGINT it finishes the current step, saves `last`, ends the MLflow run as KILLED and exits with status
128 + the signal number (`TrainingInterrupted`). The files themselves are written atomically by
`checkpoint_io.AtomicCheckpointIO`, and a `save_last="link"` link is replaced atomically too."""

from __future__ import annotations

import os
import signal
import sys
import threading

from .. import _lightning_compat as compat
from ..tracking import ParallaxMLFlowLogger, mlflow_loggers


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
