"""The paper campaign's pieces: its configs, run_grid.py's run specs and overrides, export_runs.py over an
MLflow store, report.py's statistics over run records, one real (tiny) run through run_grid.py, and the MLflow
UI screenshot.

The report tests use SYNTHETIC records (tagged synthetic=true; the report says so in its first lines) whose
expected statistics are computed by hand here. The run_grid test trains one tiny run on CPU so that the metric
names export_runs.py reads are the ones the platform writes.
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

from tests.lightning.platform_utils import bare_argv, write_corpus

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
export_runs = _load("paper_export_runs", PAPER / "export_runs.py")


# ------------------------------------------------------------------------------------------------ configs


def _resolved(*files: str) -> dict:
    """The config LightningCLI resolves from these files (parsed only: nothing is built)."""
    from parallax_lightning.cli import ParallaxCLI

    args = ["fit"]
    for f in files:
        args += ["--config", str(PAPER / f)]
    buf = io.StringIO()
    with bare_argv(), contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        ParallaxCLI(args=[*args, "--print_config"])
    return yaml.safe_load(buf.getvalue())


def test_cells_share_everything_but_attention_and_optimizer_and_run_the_whole_schedule():
    from parallax_lightning.model_sizes import preset

    main = ("softmax-muon", "parallax-muon", "softmax-adamw", "parallax-adamw")
    configs = {cell: _resolved("grid.yaml", *run_grid.CELLS[cell][0]) for cell in main}
    for cell, cfg in configs.items():
        attention, optimizer = cell.split("-")
        model = cfg["model"]["init_args"]
        assert model["model"]["attention"] == attention
        assert model["optimizer"]["name"] == optimizer == run_grid.CELLS[cell][1]
        assert model["schedule"]["name"] == "wsd" and model["schedule"]["wd_anneal_gamma"] == 1.0
        small = preset("small")
        for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden"):
            assert model["model"][key] == getattr(small, key), (cell, key)
        trainer = cfg["trainer"]
        assert trainer["precision"] == "bf16-mixed" and trainer["max_time"] is None  # never cut
        data = cfg["data"]["init_args"]
        assert trainer["max_steps"] * data["batch_size"] * data["seq_len"] >= 20_000_000  # PROTOCOL.md §4
        assert trainer["max_steps"] % trainer["val_check_interval"] == 0  # a validation at the last step
        assert cfg["diagnostics"]["every_n_steps"] == trainer["val_check_interval"]
        assert data["tokenizer"] == "tokenizer.json" and data["seed"] == 1234

    def shared(cfg):
        return {k: v for k, v in cfg.items() if k != "model"}, cfg["model"]["init_args"]["schedule"]

    first = shared(configs["softmax-muon"])
    for cell, cfg in configs.items():
        assert shared(cfg) == first, f"{cell} differs from softmax-muon outside the model's attention/optimizer"


@pytest.mark.parametrize("control", ["softmax_param_matched.yaml", "parallax_compute_matched.yaml"])
def test_controls_are_the_presets_matched_variants(control):
    from parallax_lightning.model_sizes import preset

    model = _resolved("grid.yaml", control, "muon.yaml")["model"]["init_args"]["model"]
    expected = preset(f"small-{run_grid.CONTROL_PRESETS[control]}")
    for key in ("attention", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden"):
        assert model[key] == getattr(expected, key), key
    assert run_grid.tiny_control_model(control)["attention"] == expected.attention


def _args(*extra):
    return run_grid.build_parser().parse_args(["--data", "d", "--out", "o", "--runs", "softmax-muon", *extra])


def test_run_specs_set_lr_seed_and_the_matched_effective_decay():
    args = _args()
    args.scratch = "s"
    spec = run_grid.parse_spec("parallax-muon:0.04:2")
    assert spec.name == "parallax-muon_lr0.04_s2"
    o = run_grid.run_overrides(args, spec)
    opt = o["model"]["init_args"]["optimizer"]
    assert opt["lr"] == 0.04 and opt["weight_decay"] == pytest.approx(1e-3 / 0.04)
    assert opt["adamw_lr"] == 2e-3 and opt["adamw_weight_decay"] == pytest.approx(0.5)
    assert o["seed_everything"] == 1236 and o["trainer"]["max_time"] is None
    assert o["trainer"]["logger"]["init_args"]["tags"]["paper.seed"] == "2"
    assert o["trainer"]["logger"]["init_args"]["tracking_uri"].endswith("/stores/parallax-muon_lr0.04_s2/mlflow.db")
    spec = run_grid.parse_spec("swap_wr_muon:0.001:0:0.01")
    assert spec.name == "swap_wr_muon_lr0.001_s0_mlr0.01"
    opt = run_grid.run_overrides(args, spec)["model"]["init_args"]["optimizer"]
    # every decayed group decays at κ = lr·λ = 1e-3, whichever optimizer and lr it has
    assert opt["adamw_lr"] * opt["adamw_weight_decay"] == pytest.approx(1e-3)
    assert opt["lr"] == 0.01 and opt["lr"] * opt["weight_decay"] == pytest.approx(1e-3)
    assert run_grid.parse_spec("softmax-adamw") == run_grid.RunSpec("softmax-adamw", 2e-3, 0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("nope:0.01:0", "unknown cell 'nope'"),
        ("softmax-muon:0.01", "expected cell:lr:seed"),
        ("softmax-muon:x:0", "must be numbers"),
        ("softmax-muon:-1:0", "must be positive"),
        ("softmax-muon:0.02:0:0.02", "muon_lr is for AdamW cells"),
    ],
)
def test_bad_run_specs_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        run_grid.parse_spec(bad)


def test_run_grid_reads_the_experiment_and_data_settings_as_the_runs_see_them():
    assert run_grid.experiment_name(_args()) == "paper-grid"
    assert run_grid.experiment_name(_args("--tiny", "--experiment", "mine")) == "mine"
    args = _args("--experiment", "mine", "--set", "trainer.logger.init_args.experiment_name=x")
    assert run_grid.experiment_name(args) == "x"  # --set is applied last in run_overrides, so the runs go to x
    args = _args("--set", "data.init_args.seq_len=64")
    assert run_grid._data_settings(args)["seq_len"] == 64 and "batch_size" in run_grid._data_settings(args)


def test_runs_with_a_complete_record_are_skipped(tmp_path):
    spec = run_grid.parse_spec("parallax-muon:0.02:1")
    (tmp_path / f"{spec.name}.json").write_text(json.dumps({"status": "incomplete"}))
    assert run_grid.already_done(spec, [tmp_path]) is None  # an incomplete run is trained again
    (tmp_path / f"{spec.name}.json").write_text(json.dumps({"status": "ok"}))
    assert run_grid.already_done(spec, [tmp_path]) == tmp_path / f"{spec.name}.json"


# ------------------------------------------------------------------------------------------ statistics


def test_t_quantiles_match_the_table():
    for df, value in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert report.t_quantile(0.975, df) == pytest.approx(value, abs=1e-3), df
    assert report.t_quantile(0.95, 4) == pytest.approx(2.132, abs=1e-3)
    assert report.t_quantile(0.025, 2) == pytest.approx(-4.303, abs=1e-3)
    assert report.t_cdf(0.0, 5) == pytest.approx(0.5)


def test_summary_is_mean_sample_std_and_t_interval():
    s = report.summarize([1.0, 2.0, 4.0])  # mean 7/3, sd sqrt(((4/3)^2 + (1/3)^2 + (5/3)^2) / 2) = sqrt(7/3)
    assert s.mean == pytest.approx(7 / 3) and s.sd == pytest.approx(math.sqrt(7 / 3))
    half = 4.302653 * math.sqrt(7 / 3) / math.sqrt(3)
    assert (s.lo, s.hi) == (pytest.approx(7 / 3 - half, abs=1e-5), pytest.approx(7 / 3 + half, abs=1e-5))
    assert s.verdict == "contains 0: inconclusive"
    assert report.summarize([-0.05, -0.04, -0.06, -0.05, -0.05]).verdict == "below 0"
    one = report.summarize([0.3])
    assert one.lo is None and one.verdict == "one seed: no interval"


# ------------------------------------------------------------------------------- report over records

# final val loss of the synthetic runs: the sweep at seed 0, then seeds 1..2 at the chosen (middle) LR
SWEEP = {
    "softmax-muon": {0.01: 3.40, 0.02: 3.30, 0.04: 3.35},
    "parallax-muon": {0.01: 3.35, 0.02: 3.25, 0.04: 3.32},
    "softmax-adamw": {1e-3: 3.50, 2e-3: 3.45, 4e-3: 3.48},
    "parallax-adamw": {1e-3: 3.49, 2e-3: 3.44, 4e-3: 3.47},
}
SEEDS = {  # at the chosen LR, seeds 0, 1, 2 (seed 0 = the sweep's)
    "softmax-muon": [3.30, 3.32, 3.29],
    "parallax-muon": [3.25, 3.26, 3.25],
    "softmax-adamw": [3.45, 3.46, 3.44],
    "parallax-adamw": [3.44, 3.46, 3.42],
}


def _record(cell, lr, seed, final, status="ok", diag=None):
    attention = "parallax" if "parallax" in cell or cell.startswith("swap") else "softmax"
    steps = [80 * i for i in range(1, 9)]
    return {
        "schema": 1, "run_name": f"{cell}_lr{lr:g}_s{seed}", "cell": cell, "attention": attention, "lr": lr,
        "seed": seed, "status": status, "max_steps": 640, "final_step": 640 if status == "ok" else 300,
        "tokens_per_step": 32768, "tokens": 640 * 32768, "final_val_loss": final,
        "val_loss": [[s, final + 0.5 * (640 - s) / 640] for s in steps], "tokens_per_s_median": 3e5,
        "wall_s": 90.0, "git_commit": "abc", "tags": {"synthetic": "true"}, "start_time_ms": seed,
        "diagnostics": diag or {},
    }  # fmt: skip


def _diag(wr0, wr1, wq0, wq1):
    return {
        "step0": {"stable_rank_w_r": [wr0, wr0], "stable_rank_w_q": [wq0, wq0], "correction_ratio": [1.0, 2.0]},
        "final": {"stable_rank_w_r": [wr1, wr1], "stable_rank_w_q": [wq1, wq1], "correction_ratio": [3.0, 6.0]},
    }


def _write_records(folder: Path, with_seeds=True):
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for cell, points in SWEEP.items():
        for lr, final in points.items():
            records.append(_record(cell, lr, 0, final, diag=_diag(100, 150 + 10 * ("muon" in cell), 100, 140)))
        if with_seeds:
            lr = 0.02 if cell.endswith("muon") else 2e-3
            for seed in (1, 2):
                diag = _diag(100, 150 + 10 * seed, 100, 140 + 5 * seed)
                records.append(_record(cell, lr, seed, SEEDS[cell][seed], diag=diag))
    records.append(_record("parallax-muon", 0.02, 3, 3.0, status="incomplete"))  # listed, never used
    for r in records:
        name = r["run_name"] + ("_cut" if r["status"] != "ok" else "")
        (folder / f"{name}.json").write_text(json.dumps(r))
    return folder


def _paired_by_hand(a, b):
    d = [x - y for x, y in zip(SEEDS[a], SEEDS[b])]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    return d, m, sd, half


def test_report_gaps_and_interaction_are_paired_by_seed_with_t_intervals(tmp_path):
    records = report.load_records(_write_records(tmp_path / "runs"))
    assert report.chosen_lr(records, "parallax-muon") == (0.02, "lowest of 3 seed-0 point(s)")
    seeds, diffs = report.paired(records, "parallax-muon", "softmax-muon")
    d, m, sd, half = _paired_by_hand("parallax-muon", "softmax-muon")
    assert seeds == [0, 1, 2] and diffs == pytest.approx(d)  # the incomplete seed-3 run is not paired
    s = report.summarize(diffs)
    assert (s.mean, s.sd, s.lo, s.hi) == pytest.approx((m, sd, m - half, m + half), abs=1e-6)
    da, *_ = _paired_by_hand("parallax-adamw", "softmax-adamw")
    seeds, inter = report.interaction(records)
    assert seeds == [0, 1, 2] and inter == pytest.approx([x - y for x, y in zip(d, da)])
    # pooled within-cell std over the 4 cells, 2 df each
    ss = sum(sum((v - sum(vs) / 3) ** 2 for v in vs) for vs in SEEDS.values())
    sd_pooled, df = report.pooled_sd(records)
    assert df == 8 and sd_pooled == pytest.approx(math.sqrt(ss / 8))
    rows = {row[0]: row for row in report.comparisons(records)}
    assert rows["gap_Muon"][4] == "below 0" and rows["interaction"][2] == "0, 1, 2"
    assert f"{m:+.4f} ± {sd:.4f} (n=3)" in rows["gap_Muon"][3]
    assert next(row[2] for row in report.comparisons(records, min_seed=1)) == "1, 2"  # the sensitivity check


def test_report_diagnostics_are_changes_from_step_0_with_wq_as_control(tmp_path):
    records = report.load_records(_write_records(tmp_path / "runs"))
    text = report.diagnostics_table(records)
    row = next(line for line in text.splitlines() if line.startswith("| parallax-muon | stable_rank_w_r |"))
    # seeds 0, 1, 2 end at 160, 160, 170 from 100: change mean 63.33
    assert "| 100.00 | 163.33 | +63.33 ± 5.77 (n=3)" in row
    ratio = next(line for line in text.splitlines() if line.startswith("| parallax-muon | correction_ratio |"))
    assert "| 2.00 | 6.00 | +4.00" in ratio  # the deep half (layer 1 of 2)
    [line] = [x for x in report.wr_vs_wq(records) if x.startswith("- parallax-muon")]
    # (ΔW_R − ΔW_Q) per seed: (60 − 40), (60 − 45), (70 − 50) = 20, 15, 20
    assert "+18.33 ± 2.89 (n=3)" in line and "above 0" in line


def test_next_runs_follow_the_protocol(tmp_path):
    sweep_only = report.load_records(_write_records(tmp_path / "a", with_seeds=False))
    todo = report.next_runs(sweep_only)
    assert "parallax-muon:0.02:1" in todo and "softmax-adamw:0.002:2" in todo
    assert "softmax_pm-muon:0.02:0" in todo and "swap_wr_muon:0.002:0:0.02" in todo
    assert not any(t.startswith("softmax-muon:0.01:") for t in todo)  # the sweep is done
    (tmp_path / "b").mkdir()
    edge = [_record("parallax-muon", lr, 0, v) for lr, v in {0.01: 3.3, 0.02: 3.2, 0.04: 3.1}.items()]
    todo = report.next_runs(edge)
    assert "parallax-muon:0.08:0" in todo  # the best is the largest: extend past the edge before adding seeds
    assert not any(t.startswith("parallax-muon:0.04:1") for t in todo)
    assert todo[:3] == ["softmax-muon:0.01:0", "softmax-muon:0.02:0", "softmax-muon:0.04:0"]


def test_report_writes_results_and_figures_from_all_records(tmp_path):
    runs = _write_records(tmp_path / "runs")
    out = tmp_path / "report"
    assert report.main(["--runs-dir", str(runs), "--out-dir", str(out)]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "SYNTHETIC TEST DATA" in text and "21 run record(s)" in text and "(20 complete)" in text
    assert "| parallax-muon_lr0.02_s3 | parallax-muon | 0.02 | 3 | incomplete |" in text
    assert "| parallax-muon | 0.01: 3.3500, 0.02: 3.2500, 0.04: 3.3200 | 0.02 |" in text
    for name in report.FIGURES:
        assert f"![{name}]({name})" in text
        _assert_png_has_content(out / name)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main(["--runs-dir", str(empty), "--out-dir", str(tmp_path / "r2")]) == 0
    assert "No run has been recorded yet." in (tmp_path / "r2" / "RESULTS.md").read_text()


def test_report_print_only_writes_nothing(tmp_path, capsys):
    runs = _write_records(tmp_path / "runs")
    out = tmp_path / "out"
    out.mkdir()
    assert report.main(["--runs-dir", str(runs), "--out-dir", str(out), "--print-only"]) == 0
    assert "## Paired comparisons" in capsys.readouterr().out
    assert list(out.iterdir()) == []


def test_report_names_a_record_that_is_not_one(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"cell": "a"}))
    with pytest.raises(SystemExit, match=r"x\.json has no 'run_name'"):
        report.load_records(tmp_path)


def _assert_png_has_content(path: Path):
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, path
    assert float(pixels[..., :3].std()) > 0.02, f"{path} is blank"


# ---------------------------------------------------------------------------------- export (synthetic)


def _log_synthetic_run(uri, name, last=640, max_steps=640, exit_code="0"):
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("paper-grid") or client.get_experiment(client.create_experiment("paper-grid"))
    tags = {"synthetic": "true", "paper.run": name, "paper.cell": "parallax-muon", "paper.lr": "0.02"}
    tags |= {"paper.seed": "1", "paper.exit_code": exit_code, "paper.wall_s": "91.5", "parallax.git_commit": "c0ffee"}
    run = client.create_run(exp.experiment_id, run_name=name, tags=tags)
    params = {"model.model.attention": "parallax", "model.optimizer.name": "muon", "data.batch_size": "32"}
    params |= {"data.seq_len": "1024", "trainer.max_steps": str(max_steps), "seed_everything": "1235"}
    metrics = []
    for step in range(80, last + 1, 80):  # Lightning logs validation after N steps at step N-1
        metrics.append(Metric("val/loss", 4.0 - step / 1000, 0, step - 1))
        metrics.append(Metric("train/loss", 4.1 - step / 1000, 0, step - 1))
        metrics.append(Metric("perf/tokens_per_s", 3e5 + step, 0, step))
    for step in [0, *range(80, last + 1, 80)]:  # the diagnostics log at optimizer steps done
        for layer in range(2):
            metrics.append(Metric(f"diag/layer{layer}/stable_rank_w_r", 100.0 + step / 10 + layer, 0, step))
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_export_reads_keys_left_at_their_defaults_from_config_yaml(tmp_path, monkeypatch):
    """Runs log as parameters only the keys that differ from the defaults; the record takes the others from the
    run's config.yaml (every key, resolved)."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # the store's default artifact folder, ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rid = _log_synthetic_run(uri, "parallax-muon_lr0.02_s1")
    config = {"model": {"init_args": {"optimizer": {"lr": 0.02, "name": "adamw"}}}, "data": {"seed": 7}}
    MlflowClient(uri).log_text(rid, json.dumps(config), "config.yaml")
    assert export_runs.main(["--store", uri, "--out", str(tmp_path / "runs")]) == 0
    record = json.loads((tmp_path / "runs" / "parallax-muon_lr0.02_s1.json").read_text())
    assert record["muon_lr"] == 0.02 and record["data_seed"] == 7
    assert record["optimizer"] == "muon"  # a logged parameter wins
    assert "model.optimizer.lr" not in record["params"]  # the run's own parameters, as logged


def test_export_writes_one_record_per_run_with_step0_diagnostics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_synthetic_run(uri, "parallax-muon_lr0.02_s1")
    _log_synthetic_run(uri, "parallax-muon_lr0.02_s2", last=320)  # stopped early: incomplete
    out = tmp_path / "runs"
    assert export_runs.main(["--store", uri, "--out", str(out)]) == 0
    full = json.loads((out / "parallax-muon_lr0.02_s1.json").read_text())
    assert full["status"] == "ok" and full["cell"] == "parallax-muon" and full["lr"] == 0.02 and full["seed"] == 1
    assert full["final_step"] == 640 and full["tokens"] == 640 * 32768 and full["final_val_loss"] == pytest.approx(3.36)
    assert [s for s, _ in full["val_loss"]] == list(range(80, 641, 80))  # keyed by optimizer steps done
    assert full["diagnostics"]["step0"]["stable_rank_w_r"] == [100.0, 101.0]
    assert (
        full["diagnostics"]["final"]["stable_rank_w_r"] == [164.0, 165.0] and full["diagnostics"]["final_step"] == 640
    )
    assert full["wall_s"] == 91.5 and full["git_commit"] == "c0ffee" and full["seed_everything"] == 1235
    assert full["params"]["trainer.max_steps"] == "640"
    assert json.loads((out / "parallax-muon_lr0.02_s2.json").read_text())["status"] == "incomplete"
    # a later, partial record of another MLflow run never replaces a complete one
    other = tmp_path / "other.db"
    _log_synthetic_run(f"sqlite:///{other}", "parallax-muon_lr0.02_s1", last=160)
    assert export_runs.export_store(f"sqlite:///{other}", out) == []
    assert json.loads((out / "parallax-muon_lr0.02_s1.json").read_text())["status"] == "ok"
    # failed exit code
    _log_synthetic_run(f"sqlite:///{tmp_path / 'f.db'}", "softmax-muon_lr0.02_s0", exit_code="1")
    export_runs.export_store(f"sqlite:///{tmp_path / 'f.db'}", out)
    assert json.loads((out / "softmax-muon_lr0.02_s0.json").read_text())["status"] == "failed"


# ------------------------------------------------------------------------------- a real tiny run


@pytest.mark.slow
def test_run_grid_trains_a_tiny_run_that_is_exported_and_reported(tmp_path):
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
    argv = ["--data", str(shards), "--out", str(out), "--tiny", "--max-steps", "4", "--concurrent", "2"]
    argv += ["--runs", "parallax-muon:0.02:1", "swap_wr_muon:0.002:1:0.02"]  # the swap logs optimizer.route
    argv += ["--scratch", str(tmp_path / "scratch"), "--skip-done", str(tmp_path / "none")]
    # smaller than tiny.yaml (this machine is shared): the point is the metric names, not the numbers
    for item in ("trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "diagnostics.every_n_steps=2"):
        argv += ["--set", item]
    argv += ["--set", "data.init_args.vocab_size=320", "--set", "data.init_args.seq_len=64"]
    argv += ["--set", "data.init_args.batch_size=4", "--set", "torch_threads=1"]
    rc = run_grid.main(argv)
    log = (out / "logs" / "parallax-muon_lr0.02_s1.log").read_text()
    assert rc == 0, log[-3000:]
    record = json.loads((out / "runs" / "parallax-muon_lr0.02_s1.json").read_text())
    assert record["status"] == "ok" and (record["max_steps"], record["final_step"]) == (4, 4)
    assert record["seed_everything"] == 1235 and record["lr"] == 0.02
    assert record["weight_decay"] == pytest.approx(0.05) and record["adamw_weight_decay"] == pytest.approx(0.5)
    assert [s for s, _ in record["val_loss"]] == [2, 4] and math.isfinite(record["final_val_loss"])
    diag = record["diagnostics"]
    assert len(diag["step0"]["stable_rank_w_r"]) == 2 and len(diag["final"]["correction_ratio"]) == 2
    assert diag["step0"]["stable_rank_w_q"] != diag["final"]["stable_rank_w_q"]
    assert record["config"]["model"]["init_args"]["optimizer"]["lr"] == 0.02  # the resolved config artifact
    swap = json.loads((out / "runs" / "swap_wr_muon_lr0.002_s1_mlr0.02.json").read_text())
    assert swap["status"] == "ok" and swap["optimizer"] == "adamw" and "r_proj" in swap["route"]
    assert swap["adamw_lr"] * swap["adamw_weight_decay"] == pytest.approx(1e-3)
    assert swap["muon_lr"] * swap["weight_decay"] == pytest.approx(1e-3)
    assert (out / "grid_status.tsv").read_text().count("ok, record ok") == 2
    # a second call skips it
    assert run_grid.main([*argv[: argv.index("--skip-done")], *argv[argv.index("--skip-done") + 2 :]]) == 0


# -------------------------------------------------------------------------------------- screenshot


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs_side_by_side(tmp_path):
    if screenshot.find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the MLflow UI screenshot is not taken")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = [_log_synthetic_run(uri, f"parallax-muon_lr0.02_s{s}") for s in (1, 2)]
    png = screenshot.capture_compare_view(uri, "paper-grid", ids, tmp_path / "ui.png")
    _assert_png_has_content(png)


# ------------------------------------------------------------------------------------------------- corpus


def test_corpus_split_is_by_name_and_drops_repeated_text(tmp_path):
    build = _load("paper_build_corpus", PAPER / "build_corpus.py")
    docs = [(f"page{i}.rst", f"text of page {i}\n") for i in range(400)]
    docs.append(("copy.rst", "text of page 7\n"))  # the same text under another name
    counts = build.write_split_corpus({"docs": iter(docs)}, tmp_path / "c", fraction=0.1)
    assert counts["docs"]["duplicates"] == 1
    assert counts["docs"]["train"]["documents"] + counts["docs"]["val"]["documents"] == 400
    held = {p.name for p in (tmp_path / "c" / "val" / "docs").iterdir()}
    assert 20 <= len(held) <= 60 and held == {n for n, _ in docs[:400] if build.is_held_out(f"docs/{n}", 0.1)}
    assert not held & {p.name for p in (tmp_path / "c" / "train" / "docs").iterdir()}
    # the split of a name does not depend on the other files
    again = build.write_split_corpus({"docs": iter(docs[::-1])}, tmp_path / "d", fraction=0.1)
    assert {p.name for p in (tmp_path / "d" / "val" / "docs").iterdir()} - {"copy.rst"} == held - {"copy.rst"}
    assert again["docs"]["duplicates"] == 1


def test_val_source_is_held_out_from_the_tokens_and_the_bpe(tmp_path, monkeypatch):
    prepare = _load("paper_prepare_shards2", ROOT / "experiments" / "prepare_shards.py")
    train = write_corpus(tmp_path / "train", n_docs=6, words_per_doc=200)
    val = tmp_path / "val"
    val.mkdir()
    (val / "held.txt").write_text("zyzzyva quokka " * 50)
    seen = []
    real = prepare.train_byte_bpe

    def spy(docs, vocab_size, path):
        docs = list(docs)
        seen.extend(docs)
        return real(iter(docs), vocab_size, path)

    monkeypatch.setattr(prepare, "train_byte_bpe", spy)
    argv = ["--source", str(train), "--val-source", str(val), "--out", str(tmp_path / "s"), "--tokenizer", "bpe"]
    meta = prepare.main([*argv, "--vocab-size", "300", "--name", "paper"])
    assert len(seen) == 6 and not any("zyzzyva" in d for d in seen)  # the BPE saw the training files only
    assert meta["val_source"] and meta["val_fraction"] is None
    from parallax_lightning.data.tokenizers import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "s" / "tokenizer.json"))
    assert meta["val_tokens"] == len(tok.encode("zyzzyva quokka " * 50)) + 1  # all of it, plus the EOS
    with pytest.raises(SystemExit, match="not both"):
        prepare.main([*argv[:-2], "--val-fraction", "0.1", "--out", str(tmp_path / "t")])
