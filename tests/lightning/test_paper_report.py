"""The paper grid's pieces: its configs, the report over an MLflow store, one real (tiny) run through
run_grid.py, and the MLflow UI screenshot.

The report test logs SYNTHETIC metrics through MlflowClient (the runs are tagged synthetic=true and the
report says so in its first lines): it checks that every number in the table and the claims is computed
from the store. The run_grid test trains one tiny cell on CPU so that the metric names the report reads
are the ones the platform writes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from tests.lightning.platform_utils import write_corpus

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "experiments" / "paper"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


report = _load("paper_report", PAPER / "report.py")
run_grid = _load("paper_run_grid", PAPER / "run_grid.py")
screenshot = _load("paper_screenshot", PAPER / "screenshot.py")


# ------------------------------------------------------------------------------------------------ configs


def _resolved(*files: str) -> dict:
    """The config LightningCLI resolves from these files (parsed only: nothing is built)."""
    from parallax_lightning.cli import ParallaxCLI

    args = ["fit"]
    for f in files:
        args += ["--config", str(PAPER / f)]
    buf, argv = io.StringIO(), sys.argv
    sys.argv = ["parallax_lightning"]
    try:
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
            ParallaxCLI(args=[*args, "--print_config"])
    finally:
        sys.argv = argv
    return yaml.safe_load(buf.getvalue())


def test_grid_cells_share_everything_but_attention_and_optimizer():
    from parallax_lightning.model import preset

    configs = {cell: _resolved("grid.yaml", a, o) for cell, (a, o) in run_grid.CELLS.items()}
    for cell, cfg in configs.items():
        attention, optimizer = cell.split("-")
        model = cfg["model"]["init_args"]
        assert model["model"]["attention"] == attention
        assert model["optimizer"]["name"] == optimizer
        assert model["schedule"]["name"] == "wsd" and model["schedule"]["wd_anneal_gamma"] is not None
        # the small preset's shapes, so the paper's parameter and FLOP accounting applies
        small = preset("small")
        for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden"):
            assert model["model"][key] == getattr(small, key), (cell, key)
        assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["trainer"]["max_time"]
        assert cfg["data"]["init_args"]["tokenizer"] == "tokenizer.json"  # not the byte default of TextDataModule

    def shared(cfg):
        return {k: v for k, v in cfg.items() if k != "model"}, cfg["model"]["init_args"]["schedule"]

    first = shared(configs["softmax-muon"])
    for cell, cfg in configs.items():
        assert shared(cfg) == first, f"{cell} differs from softmax-muon outside the model's attention/optimizer"
    assert (
        configs["softmax-muon"]["model"]["init_args"]["optimizer"]
        == (configs["parallax-muon"]["model"]["init_args"]["optimizer"])
    )


@pytest.mark.parametrize("control", ["softmax_param_matched.yaml", "parallax_compute_matched.yaml"])
def test_controls_are_the_presets_matched_variants(control):
    from parallax_lightning.model import preset

    model = _resolved("grid.yaml", control, "muon.yaml")["model"]["init_args"]["model"]
    expected = preset(f"small-{run_grid.CONTROL_PRESETS[control]}")
    for key in ("attention", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden"):
        assert model[key] == getattr(expected, key), key
    assert run_grid.tiny_control_model(control)["attention"] == expected.attention


def test_run_grid_reads_the_experiment_and_data_settings_as_the_runs_see_them():
    args = run_grid.build_parser().parse_args(["--data", "d", "--out", "o"])
    assert run_grid.experiment_name(args) == "paper-grid"
    args = run_grid.build_parser().parse_args(["--data", "d", "--out", "o", "--tiny", "--experiment", "mine"])
    assert run_grid.experiment_name(args) == "mine"
    argv = ["--data", "d", "--out", "o", "--experiment", "mine", "--set", "trainer.logger.init_args.experiment_name=x"]
    argv += ["--set", "data.init_args.seq_len=64"]
    args = run_grid.build_parser().parse_args(argv)
    assert run_grid.experiment_name(args) == "x"  # --set is applied last in run_overrides, so the runs go to x
    assert run_grid._data_settings(args)["seq_len"] == 64 and "batch_size" in run_grid._data_settings(args)


def test_max_time_string_is_lightnings_format():
    assert run_grid.max_time_string(95) == "00:00:01:35"
    assert run_grid.max_time_string(3725.7) == "00:01:02:05"


# --------------------------------------------------------------------------------- report (synthetic)

VAL = {"softmax-muon": 3.50, "parallax-muon": 3.45, "softmax-adamw": 3.60, "parallax-adamw": 3.59}
RATIO = {"muon": [2.0, 4.0, 6.0, 8.0], "adamw": [1.0, 1.0, 2.0, 2.0]}
SRANK = {"muon": [90.0, 100.0, 110.0, 100.0], "adamw": [8.0, 10.0, 12.0, 10.0]}
TPS = {"softmax": 500_000.0, "parallax": 420_000.0}


def _log_synthetic_grid(uri: str, grid_id: str, cut_cell: str | None = "parallax-adamw", start: int = 0):
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("paper-grid") or client.get_experiment(client.create_experiment("paper-grid"))
    for i, (cell, final) in enumerate(VAL.items()):
        attention, optimizer = cell.split("-")
        tags = {"synthetic": "true", "paper.grid_id": grid_id, "paper.cell": cell}
        last = 600 if cell == cut_cell else 700
        if cell == cut_cell:
            tags["paper.stopped_by_max_time"] = "true"
        run = client.create_run(exp.experiment_id, run_name=cell, tags=tags, start_time=start + i)
        params = {
            "model.model.attention": attention,
            "model.optimizer.name": optimizer,
            "model.params_non_embedding": "56600000" if attention == "parallax" else "51900000",
            "model.model.d_model": "768",
            "model.model.n_heads": "6",
            "model.model.head_dim": "128",
            "data.batch_size": "32",
            "data.seq_len": "1024",
            "trainer.max_steps": "700",
            "trainer.devices": "1",
        }
        metrics = []
        for step in range(100, last + 1, 100):
            loss = final + 0.5 * (last - step) / last
            # Lightning logs validation after N steps at step N-1 (the report shifts it back)
            metrics += [Metric("val/loss", loss, 0, step - 1), Metric("val/ppl", math.exp(loss), 0, step - 1)]
            metrics += [Metric("train/loss", loss + 0.02, 0, step - 1)]
            for j, tps in enumerate((0.9, 1.0, 1.1)):  # median = TPS
                metrics.append(Metric("perf/tokens_per_s", TPS[attention] * tps, 0, step - 10 * j))
                metrics.append(Metric("perf/mfu", 0.2 * tps, 0, step - 10 * j))
            for layer in range(4):
                metrics.append(Metric(f"diag/layer{layer}/stable_rank_w_q", 50.0 + layer, 0, step))
                if attention == "parallax":
                    grow = step / last
                    metrics.append(
                        Metric(f"diag/layer{layer}/correction_ratio", RATIO[optimizer][layer] * grow, 0, step)
                    )
                    metrics.append(
                        Metric(f"diag/layer{layer}/stable_rank_w_r", SRANK[optimizer][layer] * grow, 0, step)
                    )
        metrics.append(Metric("system/cpu_utilization_percentage", 50.0, 0, 5000))  # not a training step
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run.info.run_id)


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paper_store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    _log_synthetic_grid(uri, "older-grid", cut_cell=None, start=1)
    _log_synthetic_grid(uri, "synthetic-test", start=10_000)  # the newest: the report's default
    return uri


def test_report_computes_table_claims_and_figures(synthetic_store, tmp_path):
    out = tmp_path / "report"
    assert report.main(["--tracking-uri", synthetic_store, "--out-dir", str(out)]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "SYNTHETIC TEST DATA" in text
    assert "grid `synthetic-test`" in text
    for cell, final in VAL.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {cell} |"))
        assert f"{final:.4f}" in row and f"{math.exp(final):.2f}" in row
        if cell == "parallax-adamw":
            assert "600/700" in row and "19.7M" in row and "yes: max_time at step 600/700" in row
        else:
            assert "700/700" in row and "22.9M" in row and row.endswith("| no |")
    # medians of the logged windows, the deep-half mean of the ratio, the mean stable rank
    assert "| 500,000 | 20.0% |" in text and "| 420,000 | 20.0% |" in text
    assert "| 7.00 | 100.0 |" in text and "| 2.00 | 10.0 |" in text
    # the claims, from the numbers above
    assert "**holds**: val loss 3.4500 vs 3.5000, gap Parallax − softmax = -0.0500" in text
    assert (
        "2. *The advantage mostly disappears under AdamW* — **holds**: gap Parallax − softmax under AdamW -0.0100"
        in text
    )
    assert "3. *Muon keeps the correction branch large* — **holds**" in text and "7.00 under Muon vs 2.00" in text
    assert "4. *Muon keeps W_R high-rank* — **holds**: mean stable rank of W_R 100.0 under Muon vs 10.0" in text
    assert "muon: 420,000 / 500,000 tokens/s = 0.84×" in text
    assert "**Unequal token counts.**" in text and "parallax-adamw: yes: max_time at step 600/700" in text
    for name in report.FIGURES:
        assert f"![{name}]({name})" in text
        _assert_png_has_content(out / name)


def test_report_print_only_writes_nothing(synthetic_store, tmp_path, capsys):
    assert report.main(["--tracking-uri", synthetic_store, "--out-dir", str(tmp_path), "--print-only"]) == 0
    printed = capsys.readouterr().out
    assert "| parallax-muon | parallax | muon |" in printed and "1. *Parallax beats softmax under Muon*" in printed
    assert list(tmp_path.iterdir()) == []


def test_report_names_a_missing_experiment(synthetic_store, tmp_path):
    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        report.main(["--tracking-uri", synthetic_store, "--experiment", "nope", "--out-dir", str(tmp_path)])


def _assert_png_has_content(path: Path):
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, path
    assert float(pixels[..., :3].std()) > 0.02, f"{path} is blank"


# ------------------------------------------------------------------------------- a real tiny run


@pytest.mark.slow
def test_run_grid_trains_a_tiny_cell_that_the_report_reads(tmp_path):
    prepare = _load("paper_prepare_shards", ROOT / "experiments" / "prepare_shards.py")
    corpus = write_corpus(tmp_path / "corpus", n_docs=10, words_per_doc=500)
    shards = tmp_path / "shards"
    prepare.main(
        [
            *["--source", str(corpus), "--out", str(shards), "--tokenizer", "bpe", "--vocab-size", "300"],
            *["--name", "paper", "--val-fraction", "0.3"],
        ]
    )
    out = tmp_path / "out"
    argv = ["--data", str(shards), "--out", str(out), "--tiny", "--runs", "parallax-muon", "--max-steps", "4"]
    argv += ["--budget-s", "300", "--run-max-time-s", "200", "--scratch", str(tmp_path / "scratch")]
    # smaller than tiny.yaml (this machine is shared): the point is the metric names, not the numbers
    for item in ("trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "diagnostics.every_n_steps=2"):
        argv += ["--set", item]
    argv += ["--set", "data.init_args.vocab_size=320", "--set", "data.init_args.seq_len=64"]
    argv += ["--set", "data.init_args.batch_size=4", "--set", "torch_threads=1"]
    rc = run_grid.main(argv)
    log = (out / "grid.log").read_text()
    assert rc == 0, log[-3000:]
    assert {p.name for p in out.iterdir()} == {"mlflow.db", "grid.log", "grid_status.tsv", "artifacts.tar.gz"}
    grid_id, [run] = report.load_runs(f"sqlite:///{out / 'mlflow.db'}", "paper-grid-tiny")
    assert grid_id.endswith("-tiny") and run.cell == "parallax-muon" and run.status == "FINISHED"
    assert (run.attention, run.optimizer, run.max_steps, run.final_step) == ("parallax", "muon", 4, 4)
    assert run.val and run.val[-1][0] == 4 and math.isfinite(run.final_val)
    assert run.tokens_seen == 4 * 4 * 64
    assert len(run.layers("correction_ratio")) == 2 and len(run.layers("stable_rank_w_r")) == 2
    assert run.tokens_per_s and not run.cut and run.tags["paper.stopped_by_max_time"] == "false"
    assert run.tags["paper.exit_code"] == "0"


# -------------------------------------------------------------------------------------- screenshot


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs_side_by_side(synthetic_store, tmp_path):
    if screenshot.find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the MLflow UI screenshot is not taken")
    _, runs = report.load_runs(synthetic_store, "paper-grid")
    png = screenshot.capture_compare_view(synthetic_store, "paper-grid", [r.run_id for r in runs], tmp_path / "ui.png")
    _assert_png_has_content(png)  # capture_compare_view itself checks that the page names all four runs


def test_steps_from_bench_fill_the_target_time_in_whole_validation_intervals(tmp_path):
    bench = tmp_path / "bench_e2e.json"
    rows = [
        {"name": "softmax", "seq_len": 1024, "tokens_per_s": 9e5},
        {"name": "parallax", "seq_len": 1024, "tokens_per_s": 4e5},
    ]
    bench.write_text(json.dumps({"results": rows}))
    argv = ["--data", "x", "--out", "y", "--steps-from-bench", str(bench), "--target-train-s", "65"]
    args = run_grid.build_parser().parse_args(argv)
    # 65 s x 400k x 0.85 / 32768 tokens per step = 674 -> 600 (whole intervals of 100)
    assert run_grid.steps_from_bench(args) == 600
    args.target_train_s = 10
    assert run_grid.steps_from_bench(args) == 300  # clamped to --min-steps
    bench.write_text(json.dumps({"results": rows[:1]}))
    assert run_grid.steps_from_bench(args) is None  # no Parallax number: keep the config's max_steps


def _run(cell, val, max_steps=600):
    attention, optimizer = cell.split("-")
    return report.Run(
        run_id=cell, cell=cell, name=cell, status="FINISHED", attention=attention, optimizer=optimizer,
        params_non_embedding=1, batch_size=2, seq_len=4, devices=1, max_steps=max_steps,
        final_step=val[-1][0] + 1, val=val, val_ppl=[], train=[], tokens_per_s=[], mfu=[], diag={},
    )  # fmt: skip


def test_cut_runs_are_also_compared_at_equal_tokens():
    """When max_time cuts runs short, claims 1 and 2 are restated at the last validation all cells reached."""
    runs = [
        _run("softmax-muon", [(99, 4.0), (199, 3.0), (299, 2.5)]),
        _run("parallax-muon", [(99, 3.9), (199, 2.8)]),  # cut after step 199
        _run("softmax-adamw", [(99, 4.5), (199, 3.6), (299, 3.2)]),
        _run("parallax-adamw", [(99, 4.5), (199, 3.59), (299, 3.1)]),
    ]
    step, at = report.equal_token_step(runs)
    assert step == 199 and at == {
        "softmax-muon": 3.0,
        "parallax-muon": 2.8,
        "softmax-adamw": 3.6,
        "parallax-adamw": 3.59,
    }
    text = "\n".join(report.claims(runs, min_gap=0.01))
    equal = [line for line in text.splitlines() if line.startswith("1′.")]
    assert len(equal) == 1
    assert "-0.2000 nats" in equal[0] and "claim 1 **holds**" in equal[0]
    assert "-0.0100 nats" in equal[0] and "claim 2 **holds**" in equal[0]
    # The end-of-run comparison still uses the final losses and says the runs were cut.
    assert "Unequal token counts" in text and "val loss 2.8000 vs 2.5000" in text
