"""The Lightning internals parallax_lightning relies on, and the only module that touches them.

Lightning has no public API for three things `ParallaxCheckpoint` does:
- the fit loop's logging-step counter (`_batches_that_stepped`), which a checkpoint saved at the end of
  training must carry exactly, or a resumed run logs its steps one off;
- the step metrics Lightning is about to log (its logger connector), which must reach MLflow before a
  checkpoint of that step is on disk, or a kill in between loses them;
- ModelCheckpoint's save primitives (a save between two periodic ones that updates the callback's own
  bookkeeping) and its link step (made atomic here);
- ModelParallelStrategy's "auto" data/tensor-parallel sizes, which FSDP2Strategy resolves its own way before
  the strategy builds its device mesh.

They were checked against the Lightning versions in TESTED; another version is refused when the callback is
built (before any run starts), and tests/lightning/test_lightning_compat.py fails when one of them drifts.
"""

from __future__ import annotations

import os
import shutil

import lightning
from lightning.pytorch.callbacks import ModelCheckpoint
from packaging.version import Version

TESTED = ("2.5", "2.7")  # lightning >= TESTED[0], < TESTED[1]


def check_version(version: str | None = None) -> None:
    """Raise a RuntimeError naming the installed and the supported Lightning versions when they differ."""
    installed = Version(version or lightning.__version__)
    low, high = (Version(v) for v in TESTED)
    if not (low <= installed < high):
        raise RuntimeError(
            f"parallax_lightning's checkpoint callback relies on Lightning internals checked with "
            f"lightning>={TESTED[0]},<{TESTED[1]}; lightning {installed} is installed. Install a version in that "
            f"range (pip install 'lightning>={TESTED[0]},<{TESTED[1]}')"
        )


# -- the fit loop --------------------------------------------------------------------------------------------
def logging_step(trainer) -> int:
    """The step Lightning logs the current training step's metrics at."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def set_logging_step(trainer, step: int) -> None:
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def pending_step_metrics(trainer, pl_module) -> tuple[int, dict[str, float]] | None:
    """(step, metrics) Lightning will log at the end of the current training batch, chosen as its
    LoggerConnector chooses them; None when it logs nothing this batch."""
    connector = trainer._logger_connector
    accumulating = trainer.fit_loop._should_accumulate() and pl_module.automatic_optimization
    if accumulating or not (connector.should_update_logs or trainer.fast_dev_run):
        return None
    metrics = dict(connector.metrics["log"])
    step = logging_step(trainer)
    if "step" in metrics:
        step = int(metrics.pop("step"))
    else:
        metrics.setdefault("epoch", trainer.current_epoch)
    return step, metrics


# -- ModelParallelStrategy ----------------------------------------------------------------------------------
def resolve_parallel_sizes(strategy) -> None:
    """FSDP2Strategy's meaning of "auto": every process shards the weights, no tensor parallelism (Lightning's
    own "auto" on one node is the other way round)."""
    if strategy._tensor_parallel_size == "auto":
        strategy._tensor_parallel_size = 1
    if strategy._data_parallel_size == "auto":
        tp = int(strategy._tensor_parallel_size)
        strategy._data_parallel_size = max(1, strategy.num_nodes * strategy.num_processes // tp)


# -- ModelCheckpoint -----------------------------------------------------------------------------------------
class CheckpointInternals(ModelCheckpoint):
    """ModelCheckpoint with its save primitives under public names, and `save_last="link"` made atomic.
    A subclass calls `check_version()` when built (no __init__ here: the CLI reads the subclass's parameters
    through to ModelCheckpoint's)."""

    @property
    def last_saved_step(self) -> int | None:
        """The global step of the newest checkpoint this callback wrote (None: none yet)."""
        step = self._last_global_step_saved
        return step if step >= 0 else None

    def saved_at(self, step: int) -> bool:
        return self._last_global_step_saved == step

    def mark_saved(self, step: int) -> None:
        self._last_global_step_saved = step

    @property
    def newest_file(self) -> str:
        """The newest file this callback wrote."""
        return self._last_checkpoint_saved

    def save_file(self, trainer, path: str) -> None:
        """Save to `path` as a periodic save does (bookkeeping and loggers' after_save_checkpoint included)."""
        self._save_checkpoint(trainer, path)

    def save_last_file(self, trainer) -> str:
        """Write `last` with the current state, as Lightning's save_last does; return its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    def monitor_candidates(self, trainer) -> dict:
        return self._monitor_candidates(trainer)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        """save_last="link": the new link (or copy) replaces the old one in one rename, so `last` never dangles."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            tmp = os.path.join(os.path.dirname(linkpath), f".{os.path.basename(linkpath)}.{os.getpid()}.tmp")
            try:
                if os.path.lexists(tmp):
                    os.remove(tmp)
                try:
                    os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
                except OSError:  # no symbolic links on this filesystem: a copy
                    shutil.copy(filepath, tmp)
                os.replace(tmp, linkpath)
            finally:
                if os.path.lexists(tmp):
                    os.remove(tmp)
        trainer.strategy.barrier()
