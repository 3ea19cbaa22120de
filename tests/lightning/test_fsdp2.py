"""FSDP2 through the platform on two CPU processes (gloo): FSDP2Strategy shards each decoder block, Muon steps
the row-sharded weights, distributed checkpoints resume on the same and on another number of processes, and
the loss curve is the one a single process logs at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .platform_utils import history, mlflow_client, only_run, run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

STRATEGY = {"class_path": "parallax_lightning.strategies.FSDP2Strategy", "init_args": {"mixed_precision": "fp32"}}
STEPS = 4
# fp32 on both sides; only the order of the sums differs (sharded all-gathers/reduce-scatters, two half batches).
LOSS_TOL = 2e-5


def _config(folder, corpus, name, store, data=None, **trainer):
    return tiny_config(
        folder,
        corpus,
        experiment=name,
        store=store,
        trainer={
            "max_steps": STEPS,
            "limit_val_batches": 0,
            "default_root_dir": str(folder / name),
            **trainer,
        },
        model={"model": {"n_layers": 2}, "schedule": {"total_steps": STEPS}},
        data=data or {},
        checkpoint={"every_n_train_steps": 2, "save_top_k": -1},
        diagnostics={"every_n_steps": 0},
    )


def _fit(config, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "parallax_lightning", "fit", "--config", str(config), *extra],
        cwd=config.parent,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _curve(store, name):
    client = mlflow_client(store)
    run = only_run(client, name)
    assert run.info.status == "FINISHED"
    return dict(history(client, run.info.run_id, "train/loss"))


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_resume_on_two_and_one(tmp_path, corpus):
    # One process at the global batch (2 ranks x 2 rows): the curve every sharded run must reproduce.
    run_cli(["fit", "--config", str(_config(tmp_path, corpus, "one", tmp_path, data={"batch_size": 4}))], tmp_path)
    reference = _curve(tmp_path, "one")
    assert sorted(reference) == list(range(STEPS))

    # Two processes, stopped half way (the schedule still spans STEPS), then resumed from the sharded folder.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    config = _config(sharded, corpus, "fsdp2", sharded, strategy=STRATEGY, devices=2, max_steps=2)
    out = _fit(config)
    assert "distributed_backend=gloo" in out.stdout + out.stderr
    [half] = list((sharded / "fsdp2").rglob("epoch=0-step=2.ckpt"))
    assert half.is_dir() and (half / "meta.pt").is_file() and len(list(half.glob("*.distcp"))) == 2
    _fit(config, "--trainer.max_steps", str(STEPS), "--ckpt_path", str(half))
    resumed = _curve(sharded, "fsdp2")  # the same MLflow run, continued from the folder's meta.pt
    assert sorted(resumed) == list(range(STEPS))
    assert [resumed[s] for s in range(STEPS)] == pytest.approx([reference[s] for s in range(STEPS)], rel=LOSS_TOL)

    # The two-process checkpoint resumed by one process at the same global batch: the shards are re-cut on load.
    single = tmp_path / "single"
    single.mkdir()
    config = _config(single, corpus, "regrouped", single, strategy=STRATEGY, devices=1, data={"batch_size": 4})
    _fit(config, "--ckpt_path", str(half))
    regrouped = _curve(single, "regrouped")  # another store: a new run, with the steps after the checkpoint
    assert sorted(regrouped) == [2, 3]
    assert [regrouped[s] for s in (2, 3)] == pytest.approx([reference[s] for s in (2, 3)], rel=LOSS_TOL)


def test_a_sharded_checkpoint_under_another_strategy_is_named_before_a_run_opens(tmp_path, corpus, store):
    folder = tmp_path / "last.ckpt"  # what FSDP2Strategy writes: shards, .metadata, Lightning's meta.pt
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    (folder / "__0_0.distcp").write_bytes(b"")
    config = _config(tmp_path, corpus, "wrong-strategy", store)
    with pytest.raises(ValueError, match=r"is a sharded checkpoint .* trainer.strategy is SingleDeviceStrategy"):
        run_cli(["fit", "--config", str(config), "--ckpt_path", str(folder)], tmp_path)
    assert mlflow_client(store).get_experiment_by_name("wrong-strategy") is None


@pytest.mark.parametrize("preset", ["fsdp2", "ddp"])
def test_multi_gpu_presets_parse(tmp_path, capsys, preset):
    from .test_cli import LM, _print_config

    files = [LM / "base.yaml", LM / "small.yaml", LM / "parallax.yaml", LM / "muon.yaml", LM / f"{preset}.yaml"]
    printed = _print_config(["fit"] + [a for f in files for a in ("--config", str(f))], tmp_path, capsys)
    strategy = printed["trainer"]["strategy"]
    if preset == "fsdp2":
        assert strategy["class_path"] == "parallax_lightning.strategies.FSDP2Strategy"
        assert strategy["init_args"]["mixed_precision"] == "bf16"
        assert printed["trainer"]["precision"] == "32-true"
    else:
        assert strategy == "ddp"


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from parallax_lightning.strategies import FSDP2Strategy

    def write_shards(self, checkpoint, filepath, storage_options=None):  # what Lightning's save does, in place
        folder = Path(filepath)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__0_0.distcp").write_text(checkpoint["step"])
        if checkpoint.get("die"):
            raise KeyboardInterrupt("killed after the first shard")
        (folder / "__1_0.distcp").write_text(checkpoint["step"])

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", write_shards)
    strategy = FSDP2Strategy()  # no process group: broadcast and barrier are no-ops, rank 0
    last = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"step": "2"}, last)
    strategy.save_checkpoint({"step": "4"}, last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint({"step": "6", "die": True}, last)
    assert [(last / f"__{r}_0.distcp").read_text() for r in (0, 1)] == ["4", "4"]
    strategy.save_checkpoint({"step": "8"}, last)  # the torn folder of the dead save is cleared first
    assert [(last / f"__{r}_0.distcp").read_text() for r in (0, 1)] == ["8", "8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_tensor_parallel_meshes_are_refused_by_name():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from parallax_lightning.strategies import FSDP2Strategy, data_parallel_mesh

    class Mesh:  # the 2-D mesh ModelParallelStrategy builds: ("data_parallel", "tensor_parallel")
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __init__(self, dp, tp):
            self.sizes = {"data_parallel": dp, "tensor_parallel": tp}

        def __getitem__(self, name):
            return type("Sub", (), {"size": lambda _, n=self.sizes[name]: n, "name": name})()

    assert data_parallel_mesh(DDPStrategy()) is None
    strategy = ModelParallelStrategy()
    strategy._device_mesh = Mesh(dp=1, tp=2)  # Lightning's "auto" on one node: tensor parallel over the GPUs
    with pytest.raises(ValueError, match="tensor_parallel_size=2, but the decoder is sharded data-parallel only"):
        data_parallel_mesh(strategy)
    strategy._device_mesh = Mesh(dp=2, tp=1)
    assert data_parallel_mesh(strategy).name == "data_parallel"
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        FSDP2Strategy(mixed_precision="fp16")


def test_shard_decoder_compiles_each_block_and_trains_as_one_process():
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    from . import _shard_worker

    mp.spawn(_shard_worker.run, args=(2, free_port()), nprocs=2, join=True)
