"""Shared helpers for the platform tests: a tiny corpus, tiny configs, the CLI run in-process."""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "parallax",
    "attention",
    "reads",
    "the",
    "covariance",
    "of",
    "keys",
    "and",
    "values",
    "under",
    "softmax",
    "weights",
    "and",
    "muon",
    "keeps",
    "the",
    "probe",
    "matrix",
    "high",
    "rank",
]


def write_corpus(folder: Path, n_docs: int = 12, words_per_doc: int = 400, seed: int = 0) -> Path:
    """A folder of small English-like text files (deterministic)."""
    rng = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        idx = torch.randint(0, len(WORDS), (words_per_doc,), generator=rng).tolist()
        (folder / f"doc{i:02d}.txt").write_text(" ".join(WORDS[j] for j in idx) + "\n")
    return folder


def tiny_config(
    folder: Path, corpus: Path | str, experiment: str = "tests", store: Path | None = None, **sections
) -> Path:
    """A fit config that trains a one-layer decoder for a few steps on `corpus`; `sections` update it
    (nested dicts merge), e.g. trainer={"max_steps": 6}. The MLflow store is `store`/mlflow.db (default:
    `folder`); sharing one store between tests saves creating its tables each time."""
    store = store or folder
    config = {
        "seed_everything": 11,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "val_check_interval": 3,
            "limit_val_batches": 2,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(folder / "runs"),
            "logger": {
                "class_path": "parallax_lightning.tracking.ParallaxMLFlowLogger",
                "init_args": {"experiment_name": experiment, "tracking_uri": f"sqlite:///{store / 'mlflow.db'}"},
            },
        },
        "model": {
            "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "mlp_hidden": 64, "attention": "parallax"},
            "optimizer": {"name": "muon", "lr": 0.02, "adamw_lr": 0.003},
            "schedule": {"name": "wsd", "warmup_steps": 1, "decay_fraction": 0.5},
        },
        "data": {"source": str(corpus), "seq_len": 16, "batch_size": 2, "val_fraction": 0.2},
        "checkpoint": {"every_n_train_steps": 3},
        "diagnostics": {"every_n_steps": 3, "seq_len": 16},
    }
    config = OmegaConf.to_container(OmegaConf.merge(config, sections))
    path = folder / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def working_dir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def bare_argv():
    """sys.argv without arguments meanwhile: LightningCLI warns when both argv and args carry arguments."""
    argv = sys.argv
    sys.argv = ["parallax_lightning"]
    try:
        yield
    finally:
        sys.argv = argv


def run_cli(args: list[str], cwd: Path):
    """ParallaxCLI in this process (about a second instead of ten for a fresh interpreter)."""
    from parallax_lightning.cli import ParallaxCLI

    with bare_argv(), working_dir(cwd):
        return ParallaxCLI(args=args)


def mlflow_client(folder: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run in {experiment!r}, found {len(runs)}"
    return runs[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: on a shared 2-core machine two threads oversubscribe and run 5-10x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def marker_module(folder: Path, monkeypatch, prefix: str, suffix: str, source):
    """A module `<prefix>_<random hex>` on sys.path, its code `source(marker)`: it writes the file `marker`
    when what the test must prevent happens. Yields (module name, marker); forgets the module afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    marker = folder / f"{name}.{suffix}"
    (folder / f"{name}.py").write_text(source(marker))
    monkeypatch.syspath_prepend(str(folder))
    try:
        yield name, marker
    finally:
        sys.modules.pop(name, None)


def quiet_trainer(**kwargs):
    """A Lightning Trainer that saves no checkpoints and prints no progress bar or model summary."""
    import lightning.pytorch as pl

    return pl.Trainer(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def fit_tiny_decoder(datamodule, seq_len: int, folder: Path, logger, callback, **trainer_kwargs):
    """A one-layer decoder for the datamodule's vocabulary, fit with `callback` and `logger` (no sanity
    validation, checkpoints, progress bar or summary); `trainer_kwargs` set the steps and validation.
    Returns the trained module."""
    from parallax_lightning.lm_module import LanguageModelModule
    from parallax_lightning.model import DecoderConfig

    module = LanguageModelModule(
        model=DecoderConfig(vocab_size=datamodule.vocab_size, max_seq_len=seq_len, d_model=32, n_layers=1, n_heads=2)
    )
    trainer = quiet_trainer(
        num_sanity_val_steps=0, logger=logger, callbacks=[callback], default_root_dir=folder, **trainer_kwargs
    )
    trainer.fit(module, datamodule=datamodule)
    return module
