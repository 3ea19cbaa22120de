"""Per-position loss beyond the training length (document windows, the curve against a direct computation,
the length guard, the callback's MLflow curves), and the MQAR CPU config end to end through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parallax_lightning.long_context.length_guard import beyond_max_seq_len
from parallax_lightning.long_context.positional import PerPositionLoss, document_windows, per_position_loss
from parallax_lightning.model import Decoder, DecoderConfig

from .platform_utils import fit_tiny_decoder

REPO = Path(__file__).resolve().parents[2]
EOS = 99


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for n in lengths:
        parts += [rng.integers(0, EOS, size=n), np.array([EOS])]
    return np.concatenate(parts)


def test_document_windows_start_documents_and_skip_short_ones():
    arr = _docs([30, 10, 25, 40])
    starts = [0, 31, 42, 68]
    w = document_windows([arr], 20, eos_id=EOS)
    assert w.shape == (3, 21) and w.dtype == np.int64
    for row, s in zip(w, [starts[0], starts[2], starts[3]]):  # the 10-token document is too short
        assert (row == arr[s : s + 21]).all() and EOS not in row
    assert document_windows([arr], 20, eos_id=EOS, max_windows=2).shape == (2, 21)
    assert document_windows([arr, arr], 20, eos_id=EOS).shape == (6, 21)  # windows never cross arrays
    stream = document_windows([arr], 20, align="stream")  # no separator: consecutive windows at stride 21
    assert stream.shape == (len(arr) // 21, 21) and (stream[1] == arr[21:42]).all()
    assert (document_windows([arr], 20) == stream).all()  # auto without eos: stream


def test_document_windows_errors_are_named():
    arr = _docs([30, 10])
    with pytest.raises(ValueError, match="no document holds 41 consecutive tokens"):
        document_windows([arr], 40, eos_id=EOS)
    with pytest.raises(ValueError, match="needs the end-of-document token"):
        document_windows([arr], 10, align="document")
    with pytest.raises(ValueError, match="align must be one of"):
        document_windows([arr], 10, eos_id=EOS, align="documents")
    with pytest.raises(ValueError, match="length must be a positive integer"):
        document_windows([arr], 0, eos_id=EOS)


def _tiny(max_seq_len=16, attention="parallax"):
    config = DecoderConfig(
        vocab_size=100, max_seq_len=max_seq_len, d_model=32, n_layers=1, n_heads=2, attention=attention
    )
    return Decoder(config).eval()


@pytest.mark.parametrize("attention", ["parallax", "softmax"])
def test_per_position_loss_matches_the_direct_computation_beyond_the_training_length(attention):
    model = _tiny(16, attention)
    tokens = torch.randint(0, 100, (5, 49))  # 48 positions, 3x the model's max_seq_len
    curve = per_position_loss(model, tokens, batch_size=2)
    assert curve.shape == (48,) and curve.dtype == torch.float32 and torch.isfinite(curve).all()
    with beyond_max_seq_len(model, 48):
        logits = model(tokens[:, :-1])
    direct = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(0)
    torch.testing.assert_close(curve, direct, rtol=1e-5, atol=1e-5)
    # the guard is back: the model still refuses what it was not asked to allow
    assert model.config.max_seq_len == 16
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model(tokens[:, :20])
    with pytest.raises(ValueError, match=r"tokens must be an integer array \(N, L \+ 1\)"):
        per_position_loss(model, tokens[:, :1])


def test_length_guard_restores_on_error():
    model = _tiny(16)
    with pytest.raises(RuntimeError, match="boom"), beyond_max_seq_len(model, 64) as dec:
        assert dec.config.max_seq_len == 64
        raise RuntimeError("boom")
    assert model.config.max_seq_len == 16
    with pytest.raises(TypeError, match="expected a Decoder"), beyond_max_seq_len(torch.nn.Linear(2, 2), 8):
        pass


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module: creating one costs seconds of schema migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_callback_logs_curves_per_position_to_mlflow(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from parallax_lightning.data import TextDataModule
    from parallax_lightning.tracking import ParallaxMLFlowLogger

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    for i in range(24):  # documents of about 600–1200 bytes: long enough for 4 × 32 + 1
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(120, 200)))))
    dm = TextDataModule(source=str(corpus), seq_len=32, batch_size=4, val_fraction=0.25, cache_dir=str(tmp_path))
    uri = mlflow_uri
    logger = ParallaxMLFlowLogger(experiment_name="positions", tracking_uri=uri, system_metrics=False)
    callback = PerPositionLoss(factors=[1, 2, 4], bucket_size=8, max_documents=3, batch_size=2)
    module = fit_tiny_decoder(
        dm, 32, tmp_path, logger, callback, max_steps=3, limit_val_batches=2, val_check_interval=3
    )
    assert sorted(callback.curves) == [32, 64, 128]
    assert all(c.shape == (L,) for L, c in callback.curves.items())
    assert module.model.config.max_seq_len == 32
    client = MlflowClient(uri)
    history = client.get_metric_history(logger.run_id, "pos_loss/len128")
    assert sorted(m.step for m in history) == list(range(0, 128, 8))  # step = first position of a bucket
    expected = [float(callback.curves[128][s : s + 8].mean()) for s in range(0, 128, 8)]
    assert np.allclose([m.value for m in sorted(history, key=lambda m: m.step)], expected, rtol=1e-6)
    metrics = client.get_run(logger.run_id).data.metrics
    assert metrics["pos_loss/len128/documents"] == 3
    assert {"pos_loss/len64/within_train_len", "pos_loss/len64/beyond_train_len"} <= set(metrics)
    artifacts = [a.path for a in client.list_artifacts(logger.run_id, "figures")]
    assert "figures/per_position_loss.png" in artifacts


def _load_sweep():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep", REPO / "experiments" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_commands_and_report_from_tagged_runs(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    sweep = _load_sweep()
    config = str(REPO / "experiments/long_context/mqar_cpu.yaml")
    args = sweep.parse_args(
        ["--config", config, "--attention", "softmax", "parallax", "--d_model", "64", "128",
         "--axis", "model.model.n_layers=2,3", "--sweep-id", "s1", "--experiment", "sweep-test",
         "--", "--trainer.max_steps", "7"]
    )  # fmt: skip
    points = sweep.grid(args)
    assert len(points) == 8 and points[0] == {
        "model.model.attention": "softmax",
        "model.model.d_model": "64",
        "model.model.n_layers": "2",
    }
    cmd = sweep.command(args, points[-1], mlflow_uri, tmp_path)
    assert cmd[cmd.index("--model.model.attention") + 1] == "parallax"
    assert cmd[cmd.index("--model.model.d_model") + 1] == "128" and cmd[-2:] == ["--trainer.max_steps", "7"]
    assert '"parallax.sweep": "s1"' in cmd[cmd.index("--trainer.logger.init_args.tags") + 1]
    with pytest.raises(SystemExit):
        sweep.parse_args(["--config", "no/such.yaml"])

    # the report reads runs back by experiment and tag; an untagged run and another sweep stay out
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("sweep-test")
    values = {("softmax", "64"): 0.5, ("softmax", "128"): 0.75, ("parallax", "64"): 0.625, ("parallax", "128"): 1.0}
    for (attention, width), value in values.items():
        run = client.create_run(exp, tags={"parallax.sweep": "s1", "parallax.sweep.attention": attention,
                                           "parallax.sweep.d_model": width})  # fmt: skip
        client.log_metric(run.info.run_id, "val/acc", value * 0.5, step=1)
        client.log_metric(run.info.run_id, "val/acc", value, step=2)  # the final value is the one reported
        client.set_terminated(run.info.run_id)
    other = client.create_run(exp, tags={"parallax.sweep": "s2", "parallax.sweep.attention": "softmax"})
    client.log_metric(other.info.run_id, "val/acc", 0.0)
    client.log_metric(client.create_run(exp).info.run_id, "val/acc", 0.0)
    runs = sweep.collect(mlflow_uri, "sweep-test", "s1")
    assert len(runs) == 4
    text = sweep.report(runs, ["val/acc", "val/missing"], tmp_path / "out", "s1", "sweep-test", mlflow_uri)
    assert "| attention | d_model 64 | d_model 128 |" in text
    assert "| parallax | 0.625 | 1.000 |" in text and "| softmax | 0.500 | 0.750 |" in text
    assert "## val/missing" in text and "| softmax | — | — |" in text
    assert (tmp_path / "out" / "sweep.md").read_text() == text
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="no runs tagged"):
        sweep.collect(mlflow_uri, "sweep-test", "s3")


def test_sweep_runs_are_children_of_one_parent_run(tmp_path, corpus, monkeypatch):
    """A sweep opens a parent run; each member is a child (MLflow's parent-run tag, which the UI folds), the
    report ignores the parent, and the parent ends FINISHED holding the report."""
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from .platform_utils import tiny_config

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = _load_sweep()
    config = tiny_config(tmp_path, corpus, trainer={"max_steps": 2, "val_check_interval": 2})
    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    argv = ["--config", str(config), "--attention", "softmax", "parallax", "--sweep-id", "s1"]
    argv += ["--experiment", "nested", "--tracking-uri", uri, "--metric", "val/loss", "--out", str(tmp_path / "out")]
    assert sweep.main(argv) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("nested")
    [parent] = client.search_runs([exp.experiment_id], f"tags.`{sweep.PARENT_TAG}` = 's1'")
    children = client.search_runs([exp.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["parallax.sweep.attention"] for r in children) == ["parallax", "softmax"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.info.run_id for r in sweep.collect(uri, "nested", "s1")} == {r.info.run_id for r in children}
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert "sweep.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_mqar_cpu_config_learns_through_the_cli(tmp_path, monkeypatch):
    """A short run of experiments/long_context/mqar_cpu.yaml (softmax, the quicker learner) answers far above
    chance (1/32 for a uniform guess among the values, about 0.19 for a guess among the context's values)."""
    from parallax_lightning.cli import ParallaxCLI

    monkeypatch.chdir(tmp_path)
    cli = ParallaxCLI(
        args=[
            "fit",
            "--config", str(REPO / "experiments/long_context/mqar_cpu.yaml"),
            "--model.model.attention", "softmax",
            # MQAR leaves its plateau abruptly, at a step that depends on the initial weights: 100 steps leave
            # a margin at this seed (seed 1234 was still on the plateau at step 70 with the current init)
            "--trainer.max_steps", "100",
            "--trainer.val_check_interval", "100",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false",
            "--data.num_val_examples", "64",
            "--diagnostics.every_n_steps", "0",
        ]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert cli.model.model_config.attention == "softmax" and cli.model.model_config.vocab_size == 64
    assert cli.model.model_config.max_seq_len == 128  # the longest evaluation set
    for key in ("val/acc/len64_kv4", "val/acc/len64_kv8", "val/acc/length_test", "val/acc/kv_test", "val/acc/kv16"):
        assert key in metrics, key
    assert float(metrics["val/acc"]) > 0.5, float(metrics["val/acc"])


@pytest.mark.parametrize("name", ["mqar", "mqar_quick", "mqar_cpu", "passkey", "length_generalization"])
def test_shipped_long_context_configs_parse(name, tmp_path, monkeypatch, capsys):
    """Every config the long-context README names is accepted by the CLI as written (keys, types, classes)."""
    import yaml

    from parallax_lightning.cli import ParallaxCLI

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        ParallaxCLI(args=["fit", "--config", str(REPO / f"experiments/long_context/{name}.yaml"), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["model"]["attention"] == "parallax"
    assert printed["data"]["class_path"].startswith("parallax_lightning.")


def test_per_position_loss_names_a_data_module_without_token_windows():
    """MQAR generates its sets: there are no validation documents to read, and the error says so."""
    from types import SimpleNamespace

    from parallax_lightning.long_context.mqar import MQARDataModule

    dm = MQARDataModule(train=[[64, 4]], val=[[64, 4]], vocab_size=256)
    with pytest.raises(ValueError, match=r"PerPositionLoss reads the validation split.*MQARDataModule"):
        PerPositionLoss()._source(SimpleNamespace(datamodule=dm))
