"""The checks the CLI runs before a run is opened (cli.py's `_check_before_run`), and what `--ckpt_path last`
means: the `last.ckpt` of the most recently started run of the config's MLflow experiment that has one
(`find_last_checkpoint`). Each raises ValueError naming the setting and the fix."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from .redaction import redact
from .tracking import ParallaxMLFlowLogger, mlflow_loggers


def check_trainer_settings(trainer: pl.Trainer) -> None:
    """Trainer settings Lightning divides by or loops on, which would otherwise fail only once training runs."""
    interval = trainer.val_check_interval
    if isinstance(interval, int) and not isinstance(interval, bool) and interval < 1:
        raise ValueError(
            f"trainer.val_check_interval={interval}: validation runs every that many training batches, so it "
            "must be a positive integer (to validate never, set trainer.limit_val_batches=0)"
        )
    if trainer.accumulate_grad_batches < 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: must be a positive integer "
            "(1 = an optimizer step after every batch)"
        )
    if trainer.loggers and trainer.log_every_n_steps < 1:
        raise ValueError(
            f"trainer.log_every_n_steps={trainer.log_every_n_steps}: must be a positive integer (to log "
            "nothing, set trainer.logger=false)"
        )


def is_local_file_path(ckpt_path: str) -> bool:
    """Not a name Lightning resolves itself ("best", "last", "hpc", "registry[:...]") nor a remote URL."""
    lowered = ckpt_path.lower()
    named = lowered in ("best", "last", "hpc", "registry") or lowered.startswith("registry:")
    return not named and "://" not in ckpt_path


def find_last_checkpoint(trainer: pl.Trainer, subcommand: str) -> tuple[str, str | None]:
    """(path, MLflow run id) of what `--ckpt_path last` means (see cli.py's docstring); ValueError if none."""
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    name = (checkpoints[0] if checkpoints else ModelCheckpoint).CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
    dirpath = checkpoints[0].dirpath if checkpoints else None
    if dirpath is not None:  # every run of the config writes to this one folder
        path = Path(dirpath) / name
        if path.exists():
            return str(path), None
        raise ValueError(
            f"--ckpt_path last: there is no {path} (checkpoint.dirpath) to continue from; start without --ckpt_path"
        )
    loggers = [lg for lg in mlflow_loggers(trainer) if isinstance(lg, ParallaxMLFlowLogger)]
    if not loggers:
        raise ValueError(
            f"--ckpt_path last finds the latest run's checkpoint through MLflow, which {subcommand} does not use here "
            "(trainer.logger is off or not a ParallaxMLFlowLogger, or the subcommand logs no run): give the checkpoint's path"
        )
    logger = loggers[0]
    uri, experiment = logger.tracking_uri, logger.experiment_name
    root = Path(logger.save_dir or trainer.default_root_dir)
    where = f"MLflow experiment {experiment!r} in {redact(uri)}"
    runs = []
    sqlite_file = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if sqlite_file is None or Path(sqlite_file).is_file():  # an absent SQLite store has no runs: do not create it
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
    for run in runs:
        path = root / run.info.experiment_id / run.info.run_id / "checkpoints" / name
        if path.exists():
            return str(path), run.info.run_id
    raise ValueError(
        f"--ckpt_path last: none of the {len(runs)} run(s) of {where} has a {name} under "
        f"{root}/<experiment id>/<run id>/checkpoints; start without --ckpt_path, or give a checkpoint's path"
    )


def check_same_optimizer(ckpt_path: str, checkpoint: dict, model) -> None:
    """Resuming restores the optimizer's state, which only the optimizer that wrote it can take (another one
    fails inside Lightning with 'a different number of parameter groups')."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("optimizer")
    saved = saved.get("name") if isinstance(saved, dict) else None
    now = getattr(getattr(model, "optimizer_config", None), "name", None)
    if saved and now and saved != now and checkpoint.get("optimizer_states"):
        raise ValueError(
            f"ckpt_path {ckpt_path!r} was trained with model.optimizer.name={saved!r} but the config says {now!r}: "
            f"resuming restores the optimizer's state, which {now!r} cannot take. Resume with "
            f"--model.optimizer.name {saved}"
        )


def check_sharded_checkpoint_strategy(ckpt_path: str, strategy) -> None:
    """A folder written by torch.distributed.checkpoint (FSDP2Strategy / ModelParallelStrategy) loads only under
    that strategy, which re-cuts the shards for any number of processes; another strategy would fail inside
    Lightning trying to read the folder as one file."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    folder = Path(ckpt_path)
    if folder.is_dir() and (folder / ".metadata").is_file() and not isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            f"ckpt_path {ckpt_path!r} is a sharded checkpoint (a torch.distributed.checkpoint folder, written under "
            f"FSDP2), but trainer.strategy is {type(strategy).__name__}: resume it with "
            "trainer.strategy=parallax_lightning.strategies.FSDP2Strategy (any number of devices, one included)"
        )
