"""parallax_lightning._lightning_compat, the one module that touches Lightning internals: these tests fail when
a Lightning release moves or changes one of them (then the adapter, and its TESTED range, get updated)."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from parallax_lightning import _lightning_compat as compat

from .platform_utils import quiet_trainer


def test_the_installed_lightning_is_a_tested_one_and_others_are_refused_by_name():
    compat.check_version()
    for other in ("2.4.0", "2.7.0", "3.0"):
        with pytest.raises(RuntimeError, match=rf"lightning {other} is installed.*lightning>=2\.5,<2\.7"):
            compat.check_version(other)


class _Recorder(Logger):
    name, version = "recorder", "0"

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(16, 2), batch_size=2)


class _Probe(pl.Callback):
    def __init__(self):
        self.pending: list[tuple[int, dict] | None] = []
        self.steps: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pending.append(compat.pending_step_metrics(trainer, pl_module))
        step = compat.logging_step(trainer)
        compat.set_logging_step(trainer, step + 5)
        assert compat.logging_step(trainer) == step + 5
        compat.set_logging_step(trainer, step)
        self.steps.append((trainer.global_step, step))


def test_the_fit_loop_internals_say_what_lightning_then_logs(tmp_path):
    """pending_step_metrics at on_train_batch_end is what Lightning logs right after, at that step; the logging
    step counter is the one Lightning saves and logs with."""
    recorder, probe = _Recorder(), _Probe()
    trainer = quiet_trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        accumulate_grad_batches=2,
        log_every_n_steps=2,
        logger=recorder,
        callbacks=[probe],
    )
    trainer.fit(_Tiny())
    pending = [p for p in probe.pending if p is not None]
    logged = [(step, m) for step, m in recorder.logged if "loss" in m]
    assert len(pending) == 3 and len(probe.pending) == 12  # accumulation and log_every_n_steps both respected
    assert [(step, {k: float(v) for k, v in m.items()}) for step, m in pending] == logged
    assert [logging for _, logging in probe.steps[1::2]] == [0, 1, 2, 3, 4, 5]  # one less than global_step
    assert compat.logging_step(trainer) == trainer.global_step == 6
    trainer.save_checkpoint(tmp_path / "m.ckpt")  # the counter a checkpoint carries, as the adapter sets it
    loops = torch.load(tmp_path / "m.ckpt", weights_only=True)["loops"]
    assert loops["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] == 6


def test_model_checkpoint_internals_are_where_the_adapter_uses_them(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path)
    assert callback._last_global_step_saved is not None and callback._last_checkpoint_saved == ""
    for name in ("_save_checkpoint", "_save_last_checkpoint", "_monitor_candidates"):
        assert callable(getattr(ModelCheckpoint, name)), name
    assert list(inspect.signature(ModelCheckpoint._save_checkpoint).parameters) == ["self", "trainer", "filepath"]
    assert list(inspect.signature(ModelCheckpoint._save_last_checkpoint).parameters) == [
        "self",
        "trainer",
        "monitor_candidates",
    ]
    # the override keeps the signature Lightning calls it with
    ours, theirs = (inspect.signature(c._link_checkpoint) for c in (compat.CheckpointInternals, ModelCheckpoint))
    assert list(ours.parameters) == list(theirs.parameters) == ["trainer", "filepath", "linkpath"]
    assert isinstance(inspect.getattr_static(ModelCheckpoint, "_link_checkpoint"), staticmethod)


def test_model_parallel_sizes_are_where_the_adapter_resolves_them():
    strategy = ModelParallelStrategy()
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == ("auto", "auto")
    strategy._tensor_parallel_size = 1  # what resolve_parallel_sizes writes must be what setup_environment reads
    source = inspect.getsource(ModelParallelStrategy.setup_environment)
    assert "_data_parallel_size" in source and "_tensor_parallel_size" in source
