"""The CLI: --help and --print_config, unknown keys named, ${...} interpolation, the data→model links,
the shipped configs, fit end to end into MLflow, exact resume into the same run, bad input named before
training, validate/test/predict, and DDP over two CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .platform_utils import (
    bare_argv,
    history,
    mlflow_client,
    only_run,
    run_cli,
    tiny_config,
    working_dir,
)

REPO = Path(__file__).resolve().parents[2]
LM = REPO / "experiments" / "lm"


pytestmark = pytest.mark.usefixtures("one_thread")


def _subprocess_env() -> dict:
    # One intra-op thread per process: the machines running CI share two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_help_lists_subcommands_and_keys():
    out = subprocess.run(
        [sys.executable, "-m", "parallax_lightning", "fit", "--help"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    for key in ("--config", "--print_config", "--model.help", "--data.help", "--trainer.max_steps", "--ckpt_path"):
        assert key in out.stdout


def _print_config(args, tmp_path, capsys) -> dict:
    with pytest.raises(SystemExit) as info:
        run_cli([*args, "--print_config"], tmp_path)
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_resolves_interpolation(tmp_path, corpus, capsys):
    config = tiny_config(tmp_path, corpus)
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  seq_len: 24\ndiagnostics:\n  seq_len: ${data.seq_len}\n")
    printed = _print_config(["fit", "--config", str(config), "--config", str(extra)], tmp_path, capsys)
    assert printed["data"]["init_args"]["seq_len"] == 24
    assert printed["diagnostics"]["seq_len"] == 24
    assert printed["trainer"]["logger"]["class_path"] == "parallax_lightning.tracking.ParallaxMLFlowLogger"


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("model.model", "d_modle"),
        ("model.optimizer", "learning_rate"),
        ("trainer", "max_stepz"),
        ("data", "seq_length"),
    ],
)
def test_unknown_keys_are_named(tmp_path, corpus, capsys, where, key):
    section, *rest = where.split(".")
    nested = {key: 1}
    for part in reversed(rest):
        nested = {part: nested}
    config = tiny_config(tmp_path, corpus, **{section: nested})
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", str(config)], tmp_path)
    assert info.value.code != 0
    assert key in capsys.readouterr().err


TYPOS = {
    "--model.model.attention": ("sofmax", "'parallax', 'softmax', 'lla', 'affine_linear', 'linear'"),
    "--model.model.attn_backend": ("trtion", "'auto', 'reference', 'triton'"),
    "--model.optimizer.name": ("adam", "'muon', 'adamw'"),
    "--model.schedule.name": ("cosin", "'cosine', 'wsd', 'constant'"),
    "--model.schedule.decay_shape": ("square", "'linear', 'cosine', 'sqrt'"),
    "--model.nonfinite": ("ignore", "'stop', 'skip'"),
    "--data.binary_files": ("keep", "'warn', 'skip', 'error'"),
}


@pytest.mark.parametrize("key", list(TYPOS))
def test_a_misspelt_choice_is_refused_when_parsing_with_the_choices_listed(tmp_path, corpus, capsys, key):
    # --print_config only parses: a value outside the choices must fail there, before any store or run exists.
    value, choices = TYPOS[key]
    config = tiny_config(tmp_path, corpus, experiment="typo")
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", str(config), key, value, "--print_config"], tmp_path)
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert choices in err and f"Got value: {value}" in err, err[-2000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_vocab_size_and_seq_len_are_linked_from_the_data(tmp_path, corpus):
    config = tiny_config(tmp_path, corpus, data={"vocab_size": 384, "seq_len": 24})
    from parallax_lightning.cli import ParallaxCLI

    with bare_argv():
        cli = ParallaxCLI(args=["--config", str(config)], run=False)
    assert cli.model.model_config.vocab_size == 384
    assert cli.model.model_config.max_seq_len == 24
    assert cli.model.model.embed.num_embeddings == 384


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("attention", ["parallax", "softmax"])
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_grid_configs_parse(tmp_path, capsys, size, attention, optimizer):
    files = [LM / "base.yaml", LM / f"{size}.yaml", LM / f"{attention}.yaml", LM / f"{optimizer}.yaml"]
    args = ["fit"] + [a for f in files for a in ("--config", str(f))]
    printed = _print_config(args, tmp_path, capsys)
    init = printed["model"]["init_args"]
    assert init["model"]["attention"] == attention
    assert init["optimizer"]["name"] == optimizer
    assert printed["trainer"]["accelerator"] == ("cpu" if size == "tiny" else "gpu")


def test_stdlib_bpe_override_swaps_the_data_source(tmp_path, capsys):
    files = [LM / "base.yaml", LM / "small.yaml", LM / "parallax.yaml", LM / "muon.yaml", LM / "stdlib_bpe.yaml"]
    printed = _print_config(["fit"] + [a for f in files for a in ("--config", str(f))], tmp_path, capsys)
    data = printed["data"]
    assert data["class_path"].endswith("TextDataModule")
    assert data["init_args"]["tokenizer"] == "bpe" and data["init_args"]["seq_len"] == 1024


def test_quickstart_config_trains_briefly(tmp_path):
    """The front door, shortened: the shipped quickstart.yaml with fewer steps and a smaller corpus slice."""
    args = [
        "fit",
        "--config",
        str(REPO / "experiments" / "quickstart.yaml"),
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--data.max_bytes=300000",
        "--diagnostics.every_n_steps=2",
        "--model.schedule.warmup_steps=1",
    ]
    run_cli(args, tmp_path)
    client = mlflow_client(tmp_path)
    run = only_run(client, "quickstart")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "parallax-muon-d64x2"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == [0, 1, 2, 3]
    assert history(client, run.info.run_id, "val/loss")
    assert history(client, run.info.run_id, "diag/layer1/correction_ratio")


def test_fit_logs_a_complete_mlflow_run(tmp_path, corpus, store):
    config = tiny_config(tmp_path, corpus, experiment="complete", store=store, trainer={"gradient_clip_val": 5.0})
    run_cli(["fit", "--config", str(config)], tmp_path)
    client = mlflow_client(store)
    run = only_run(client, "complete")
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "parallax-muon-d32x1"
    params = run.data.params
    assert params["model.model.attention"] == "parallax"
    assert params["model.model.vocab_size"] == "320"  # the linked value, as the model was built
    assert params["data.seq_len"] == "16" and params["trainer.max_steps"] == "6"
    assert int(params["model.params_total"]) > 0
    # Parameters are what differs from the defaults (config.yaml below keeps every key).
    assert params["trainer.gradient_clip_val"] == "5.0"
    for default in ("trainer.accumulate_grad_batches", "trainer.precision", "model.optimizer.momentum"):
        assert default not in params, default
    tags = run.data.tags
    for tag in ("git_commit", "git_dirty", "torch_version", "triton_version", "lightning_version", "gpu"):
        assert tags[f"parallax.{tag}"]
    artifacts = {a.path for a in client.list_artifacts(rid)} | {a.path for a in client.list_artifacts(rid, "figures")}
    assert {"config.yaml", "figures/loss_curves.png", "figures/parallax_diagnostics.png"} <= artifacts
    config_text = Path(client.download_artifacts(rid, "config.yaml", str(tmp_path / "dl"))).read_text()
    saved = yaml.safe_load(config_text)
    assert saved["model"]["init_args"]["model"]["d_model"] == 32
    assert saved["trainer"]["accumulate_grad_batches"] == 1 and saved["model"]["init_args"]["optimizer"]["momentum"]
    losses = history(client, rid, "train/loss")
    assert [s for s, _ in losses] == list(range(6))
    assert history(client, rid, "val/loss") and history(client, rid, "val/ppl")
    # One step convention for every training metric: the optimizer steps taken before the step it describes.
    for key in ("train/grad_norm", "train/tokens", "train/update_rms/muon", "lr-Muon/muon", "lr-Muon/muon-momentum"):
        assert [s for s, _ in history(client, rid, key)] == list(range(6)), key
    assert [s for s, _ in history(client, rid, "perf/tokens_per_s")] == list(range(1, 6))  # clock starts after 0
    assert [s for s, _ in history(client, rid, "perf/step_time_s")] == list(range(1, 6))
    assert [v for _, v in history(client, rid, "train/tokens")] == [16 * 2 * (i + 1) for i in range(6)]
    for stat in ("correction_ratio", "r_norm", "stable_rank_w_r", "stable_rank_w_q", "stable_rank_w_k"):
        assert [s for s, _ in history(client, rid, f"diag/layer0/{stat}")] == [0, 3, 6]  # 0: before any update
    checkpoints = list((tmp_path / "runs").rglob("*.ckpt"))
    assert checkpoints and all(rid in str(p) for p in checkpoints)
    assert torch.load(checkpoints[0], weights_only=True)["mlflow"]["run_id"] == rid


def test_resume_reproduces_the_uninterrupted_run_in_the_same_mlflow_run(tmp_path, corpus, store):
    schedule = {"model": {"schedule": {"total_steps": 8, "wd_anneal_gamma": 1.0}, "optimizer": {"weight_decay": 0.1}}}
    trainer = {"max_steps": 8, "val_check_interval": 4}
    full = tiny_config(tmp_path, corpus, experiment="full", store=store, trainer=trainer, **schedule)
    run_cli(["fit", "--config", str(full)], tmp_path)
    part = tiny_config(tmp_path, corpus, experiment="part", store=store, trainer=trainer, **schedule)
    run_cli(["fit", "--config", str(part), "--trainer.max_steps=4"], tmp_path)  # "interrupted" after 4 steps
    client = mlflow_client(store)
    first = only_run(client, "part")
    [ckpt] = [p for p in (tmp_path / "runs").rglob("last.ckpt") if first.info.run_id in str(p)]
    run_cli(["fit", "--config", str(part), "--ckpt_path", str(ckpt)], tmp_path)

    resumed = only_run(client, "part")  # still one run: the resume continued it
    assert resumed.info.run_id == first.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["parallax.resumes"] == "1"
    reference = only_run(client, "full")
    for key in (
        "train/loss",
        "val/loss",
        "lr-Muon/muon",
        "lr-Muon/muon-weight_decay",
        "train/tokens",
        "train/grad_norm",
    ):
        expected = history(client, reference.info.run_id, key)
        got = history(client, resumed.info.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5, abs=1e-7), key
    artifacts = {a.path for a in client.list_artifacts(resumed.info.run_id)}
    assert {"config.yaml", "config_resume1.yaml"} <= artifacts


def test_ckpt_path_last_continues_the_latest_run_and_each_run_is_reported(tmp_path, corpus, store, capsys):
    config = tiny_config(tmp_path, corpus, experiment="last", store=store, trainer={"max_steps": 2})
    run_cli(["fit", "--config", str(config)], tmp_path)
    run_cli(["fit", "--config", str(config), "--trainer.max_steps=4"], tmp_path)  # the latest run
    client = mlflow_client(store)
    experiment = client.get_experiment_by_name("last").experiment_id
    older, latest = sorted(client.search_runs([experiment]), key=lambda r: r.info.start_time)
    err = capsys.readouterr().err
    uri = f"sqlite:///{store / 'mlflow.db'}"
    for run in (older, latest):  # each fit says where its run is and how to open it
        assert f"fit run {run.info.run_id} (experiment 'last') in {uri}" in err, err[-3000:]
    assert f"python -m parallax_lightning ui --backend-store-uri {uri}" in err

    run_cli(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps=6"], tmp_path)
    err = capsys.readouterr().err
    assert "--ckpt_path last = " in err and latest.info.run_id in err
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert len(runs) == 2  # no new run: the latest one continued
    resumed = runs[latest.info.run_id]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["parallax.resumes"] == "1"
    assert Path(resumed.data.tags["parallax.checkpoint"]).parts[-3:] == (latest.info.run_id, "checkpoints", "last.ckpt")
    assert [s for s, _ in history(client, latest.info.run_id, "train/loss")] == list(range(6))
    assert runs[older.info.run_id].data.tags.get("parallax.resumes") is None

    run_cli(["validate", "--config", str(config), "--ckpt_path", "last"], tmp_path)
    [validation] = [r for r in client.search_runs([experiment]) if r.info.run_id not in runs]
    assert validation.data.tags["parallax.source_run_id"] == latest.info.run_id
    assert f"validate run {validation.info.run_id}" in capsys.readouterr().err


def test_ckpt_path_last_without_a_checkpoint_fails_before_a_run_is_opened(tmp_path, corpus):
    config = tiny_config(tmp_path, corpus, experiment="nothing-yet")
    with pytest.raises(
        ValueError, match=r"--ckpt_path last: none of the 0 run\(s\) of MLflow experiment 'nothing-yet'"
    ):
        run_cli(["fit", "--config", str(config), "--ckpt_path", "last"], tmp_path)
    assert mlflow_client(tmp_path).get_experiment_by_name("nothing-yet") is None  # no run was opened
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="give the checkpoint's path"):
        run_cli(["predict", "--config", str(config), "--ckpt_path", "last", "--data.predict_prompts=[a]"], tmp_path)


def test_fit_without_a_logger_drops_the_learning_rate_monitor(tmp_path, corpus):
    """LearningRateMonitor refuses a trainer without a logger; trainer.logger=false must still train."""
    config = tiny_config(tmp_path, corpus, trainer={"max_steps": 2, "logger": False})
    cli = run_cli(["fit", "--config", str(config)], tmp_path)
    assert cli.trainer.global_step == 2 and not (tmp_path / "mlflow.db").exists()


def test_missing_data_path_fails_before_training(tmp_path, corpus):
    config = tiny_config(tmp_path, tmp_path / "no_such_corpus", experiment="missing")
    # jsonargparse reports errors raised while building the data module inside its own ValueError
    with pytest.raises((FileNotFoundError, ValueError), match="no_such_corpus' does not exist"):
        run_cli(["fit", "--config", str(config)], tmp_path)
    assert not (tmp_path / "runs").exists()


def test_sequence_longer_than_the_data_fails_before_a_run_is_opened(tmp_path, store):
    tiny = tmp_path / "tiny_corpus"
    tiny.mkdir()
    (tiny / "a.txt").write_text("only a few bytes of text")
    config = tiny_config(tmp_path, tiny, experiment="too-short", store=store, data={"seq_len": 64})
    with pytest.raises(ValueError, match="seq_len=64 is larger than the"):
        run_cli(["fit", "--config", str(config)], tmp_path)
    assert mlflow_client(store).get_experiment_by_name("too-short") is None


def test_heads_not_dividing_is_named(tmp_path, corpus):
    config = tiny_config(tmp_path, corpus, model={"model": {"n_heads": 3, "n_kv_heads": 2}})
    with pytest.raises(Exception, match="n_kv_heads"):
        run_cli(["fit", "--config", str(config)], tmp_path)


def test_validate_test_and_predict_subcommands(tmp_path, corpus, store, capsys):
    config = tiny_config(tmp_path, corpus, experiment="evals", store=store, trainer={"max_steps": 2})
    run_cli(["fit", "--config", str(config)], tmp_path)
    client = mlflow_client(store)
    trained = only_run(client, "evals")
    [ckpt] = list((tmp_path / "runs").rglob("last.ckpt"))
    for sub in ("validate", "test"):
        cli = run_cli([sub, "--config", str(config), "--ckpt_path", str(ckpt)], tmp_path)
        assert ("test/loss" if sub == "test" else "val/loss") in cli.trainer.callback_metrics
    runs = client.search_runs([client.get_experiment_by_name("evals").experiment_id])
    evals = [r for r in runs if r.info.run_id != trained.info.run_id]
    assert sorted(r.data.tags["parallax.subcommand"] for r in evals) == ["test", "validate"]
    assert all(r.data.tags["parallax.source_run_id"] == trained.info.run_id for r in evals)
    capsys.readouterr()
    predict = ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--data.predict_prompts=[import]"]
    run_cli([*predict, "--model.max_new_tokens=4"], tmp_path)
    assert "--- prompt 0: 'import'" in capsys.readouterr().out
    assert len(client.search_runs([client.get_experiment_by_name("evals").experiment_id])) == 3  # predict: no run


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, corpus):
    config = tiny_config(
        tmp_path,
        corpus,
        experiment="ddp",
        trainer={"strategy": "ddp", "devices": 2, "max_steps": 3, "val_check_interval": 3},
    )
    out = subprocess.run(
        [sys.executable, "-m", "parallax_lightning", "fit", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distributed_backend=gloo" in out.stdout + out.stderr
    client = mlflow_client(tmp_path)
    run = only_run(client, "ddp")  # rank 1 must not open a run of its own
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == [0, 1, 2]
    assert history(client, run.info.run_id, "val/loss")


def test_torch_threads_is_checked(tmp_path, corpus):
    config = tiny_config(tmp_path, corpus)
    with pytest.raises(ValueError, match="torch_threads must be a positive integer, got 0"):
        run_cli(["fit", "--config", str(config), "--torch_threads=0"], tmp_path)


def test_nan_loss_exits_with_the_step_named_and_the_run_failed(tmp_path, corpus, store, capsys, monkeypatch):
    from parallax_lightning.cli import main
    from parallax_lightning.lm_module import LanguageModelModule

    real = LanguageModelModule.compute_loss

    def compute_loss(self, batch):
        loss, logits, n = real(self, batch)
        if self.training and self.trainer.global_step == 2:
            loss = loss * float("inf")
        return loss, logits, n

    monkeypatch.setattr(LanguageModelModule, "compute_loss", compute_loss)
    config = tiny_config(tmp_path, corpus, experiment="nan", store=store)
    with bare_argv(), working_dir(tmp_path), pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config)])
    assert info.value.code == 3
    err = capsys.readouterr().err
    assert "training loss is inf at step 2" in err and "nonfinite-step2.ckpt" in err
    run = only_run(mlflow_client(store), "nan")
    assert run.info.status == "FAILED"
    assert [s for s, _ in history(mlflow_client(store), run.info.run_id, "train/loss")] == [0, 1]
    [ckpt] = list((tmp_path / "runs").rglob("nonfinite-step2.ckpt"))
    assert torch.load(ckpt, weights_only=True)["mlflow"]["run_id"] == run.info.run_id
