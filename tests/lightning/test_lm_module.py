"""LanguageModelModule: every attention kind trains through the module, the loss ignores -100 labels,
perplexity agrees with the loss, optimizers and schedules do what the config says, a NaN loss stops
training with a checkpoint of the last good state, and checkpoints load weights-only."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from parallax_lightning.attention import ATTENTION_KINDS
from parallax_lightning.callbacks import SpeedMonitor, TrainingMetrics, peak_flops_for
from parallax_lightning.data import TextDataModule
from parallax_lightning.lm_module import LanguageModelModule, NonFiniteLossError
from parallax_lightning.model import DecoderConfig
from parallax_lightning.model_sizes import flops_per_token
from parallax_lightning.optim import OptimizerConfig, Schedule, ScheduleConfig, ScheduledLR, build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(attention="parallax", **overrides) -> DecoderConfig:
    base = dict(vocab_size=320, max_seq_len=16, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64, attention=attention)
    return DecoderConfig(**{**base, **overrides})


def trainer(tmp_path, steps=3, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def poison_forward_call(module, n: int) -> None:
    """The model's n-th forward call (1-based) returns NaN logits; every other call is the real forward."""
    real_forward = module.model.forward
    calls = {"n": 0}

    def forward(input_ids, cache=None):
        calls["n"] += 1
        logits = real_forward(input_ids, cache)
        return logits * float("nan") if calls["n"] == n else logits

    module.model.forward = forward


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_each_attention_kind_trains_through_the_module(tmp_path, corpus, attention):
    module = LanguageModelModule(tiny(attention), optimizer=OptimizerConfig(name="muon", adamw_lr=3e-3))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=2)
    t = trainer(tmp_path, steps=3)
    t.fit(module, dm)
    assert t.global_step == 3
    assert math.isfinite(t.callback_metrics["train/loss"]) and math.isfinite(t.callback_metrics["val/loss"])
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert any("attn" in k for k in changed) and any("mlp" in k for k in changed)


def test_loss_ignores_minus_100_labels():
    module = LanguageModelModule(tiny())
    ids = torch.randint(0, 256, (2, 16))
    labels = torch.randint(0, 256, (2, 16))
    labels[0, :10] = -100
    loss, logits, n = module.compute_loss({"input_ids": ids, "labels": labels})
    keep = labels != -100
    assert n == keep.sum()
    assert torch.allclose(loss, F.cross_entropy(logits[keep].float(), labels[keep]))


def test_val_perplexity_is_exp_of_the_token_weighted_loss(tmp_path, corpus):
    module = LanguageModelModule(tiny())
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=3)
    [metrics] = trainer(tmp_path).validate(module, dm, verbose=False)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)


def test_optimizer_choice():
    model = LanguageModelModule(tiny()).model
    from parallax_muon import Muon

    muon = build_optimizer(model, OptimizerConfig(name="muon", lr=0.03, adamw_lr=1e-3), verbose=False)
    assert isinstance(muon, Muon)
    lrs = {g["lr"] for g in muon.param_groups}
    assert lrs == {0.03, 1e-3}
    adamw = build_optimizer(model, OptimizerConfig(name="adamw", adamw_lr=2e-3, adamw_weight_decay=0.1))
    assert isinstance(adamw, torch.optim.AdamW)
    decayed = [p for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and all(p.ndim >= 2 for p in decayed)  # norms are never decayed
    with pytest.raises(ValueError, match=r"OptimizerConfig\.name"):
        OptimizerConfig(name="sgd")


def test_adamw_decay_survives_fsdp_flattening():
    """FSDP hands the optimizer 1-D shards: weight decay must still follow the layer type, not the shape."""
    from parallax_lightning.optim import adamw_param_groups

    model = LanguageModelModule(tiny()).model
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.flatten()
    decay, no_decay = adamw_param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.embed.weight)} | {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)
    }
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0


def test_muon_under_fsdp_is_refused_by_name():
    class FSDPStrategy:  # stands in for Lightning's (which needs a GPU)
        pass

    module = LanguageModelModule(tiny(), optimizer=OptimizerConfig(name="muon"))
    module._trainer = type("T", (), {"strategy": FSDPStrategy(), "global_rank": 0, "max_steps": 10})()
    with pytest.raises(ValueError, match="cannot run under Lightning's FSDP"):
        module.configure_optimizers()


def test_cosine_schedule():
    s = Schedule(ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert s.lr_factor(0) == pytest.approx(1 / 11)
    assert s.lr_factor(9) == pytest.approx(10 / 11)
    assert s.lr_factor(10) == pytest.approx(1.0)
    assert s.lr_factor(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.lr_factor(110) == pytest.approx(0.1)


def test_wsd_schedule_with_weight_decay_annealing():
    cfg = ScheduleConfig(name="wsd", warmup_steps=0.1, decay_fraction=0.2, wd_anneal_gamma=2.0)
    s = Schedule(cfg, total_steps=100)
    assert s.warmup == 10
    assert s.lr_factor(50) == 1.0 and s.wd_factor(50) == 1.0  # stable phase
    assert s.lr_factor(80) == 1.0 and s.lr_factor(90) == pytest.approx(0.5)  # linear decay over the last 20
    t = 10 / 20
    assert s.wd_factor(90) == pytest.approx((1 - t) ** 2.0)  # λ(t) = λ(1 − t)^γ
    assert s.lr_factor(100) == 0.0 and s.wd_factor(100) == 0.0
    sqrt = Schedule(ScheduleConfig(name="wsd", decay_fraction=0.5, decay_shape="sqrt"), total_steps=100)
    assert sqrt.lr_factor(75) == pytest.approx(1 - math.sqrt(0.5))
    with pytest.raises(ValueError, match="warmup_steps=100 must be shorter"):
        Schedule(ScheduleConfig(warmup_steps=100), total_steps=100)


def test_scheduler_anneals_weight_decay_and_saves_weights_only(tmp_path):
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = torch.optim.AdamW([p], lr=1.0, weight_decay=0.5)
    cfg = ScheduleConfig(name="wsd", decay_fraction=0.5, wd_anneal_gamma=1.0)
    sched = ScheduledLR(opt, Schedule(cfg, total_steps=10))
    for _ in range(7):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1 - 2 / 5)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.5 * (1 - 2 / 5))
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2 = torch.optim.AdamW([p], lr=1.0, weight_decay=0.5)
    sched2 = ScheduledLR(opt2, Schedule(cfg, total_steps=10))
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    assert sched2.last_epoch == 8
    assert opt2.param_groups[0]["lr"] == pytest.approx(1 - 3 / 5)


def test_schedule_needs_the_length_of_training(tmp_path, corpus):
    module = LanguageModelModule(tiny())
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=2)
    t = trainer(tmp_path, steps=-1, max_epochs=1, limit_train_batches=2, val_check_interval=None)
    with pytest.raises(ValueError, match=r"set trainer\.max_steps"):
        t.fit(module, dm)


def test_nan_loss_stops_with_a_checkpoint_of_the_last_good_state(tmp_path, corpus):
    module = LanguageModelModule(tiny(), optimizer=OptimizerConfig(name="adamw"))
    poison_forward_call(module, 4)
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=2)
    t = trainer(tmp_path, steps=10, val_check_interval=100)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3") as info:
        t.fit(module, dm)
    path = tmp_path / "nonfinite-step3.ckpt"
    assert str(path) in str(info.value)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert ckpt["TextDataModule"]["next_batch"] == 3  # resuming replays the batch that failed


def test_checkpoint_is_weights_only_and_reloads(tmp_path, corpus):
    module = LanguageModelModule(tiny(attention="softmax"), optimizer=OptimizerConfig(name="muon"))
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=2)
    t = trainer(tmp_path, steps=2)
    t.fit(module, dm)
    t.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["attention"] == "softmax"
    again = LanguageModelModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    ids = torch.randint(0, 256, (1, 8))
    module.eval()
    again.eval()
    assert torch.equal(again(ids), module(ids))


def test_predict_continues_prompts(tmp_path, corpus):
    module = LanguageModelModule(tiny(max_seq_len=32), max_new_tokens=5, temperature=0.0)
    dm = TextDataModule(source=str(corpus), seq_len=32, predict_prompts=["the quick", "fox"])
    out = trainer(tmp_path).predict(module, dm)
    assert [o["prompt"] for o in out] == ["the quick", "fox"]
    assert all(len(o["tokens"]) <= 5 and isinstance(o["completion"], str) for o in out)


def test_compile_flag_compiles_the_decoder_in_place(monkeypatch):
    module = LanguageModelModule(tiny(), compile=True)
    calls = []
    monkeypatch.setattr(module.model, "compile", lambda *a, **k: calls.append(1))
    module.configure_model()
    module.configure_model()
    assert calls == [1] and module.compiled
    assert all(not k.startswith("model._orig_mod") for k in module.state_dict())


@pytest.mark.parametrize(("device", "expected"), [("cpu", False), ("cuda", True)])
def test_compile_defaults_to_on_for_cuda_only(monkeypatch, device, expected):
    module = LanguageModelModule(tiny())
    assert module.hparams.compile is None
    calls = []
    monkeypatch.setattr(module.model, "compile", lambda *a, **k: calls.append(1))
    fake_trainer = type("T", (), {"strategy": type("S", (), {"root_device": torch.device(device)})()})()
    monkeypatch.setattr(module, "_trainer", fake_trainer)
    module.configure_model()
    assert module.compiled is expected and calls == ([1] if expected else [])
    with pytest.raises(ValueError, match="compile"):
        LanguageModelModule(tiny(), compile="yes")


def test_compiled_training_resumes_uncompiled_and_reports_compile_time(tmp_path, corpus):
    """A run trained with compile on (a real torch.compile; aot_eager skips code generation on CPU) saves
    plain parameter names and resumes, optimizer state included, with compile off; the first step's time,
    compilation included, is logged as perf/compile_s."""
    import functools

    logged = []

    class Recorder(pl.loggers.logger.Logger):
        name, version = "rec", "0"

        def log_metrics(self, metrics, step=None):
            logged.append(dict(metrics))

        def log_hyperparams(self, *args, **kwargs):
            pass

    config = tiny(fused_qkvr=True)
    module = LanguageModelModule(config, compile=True)
    module.model.compile = functools.partial(type(module.model).compile, module.model, backend="aot_eager")
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=2)
    t = trainer(tmp_path, steps=2, logger=Recorder(), callbacks=[SpeedMonitor()])
    t.fit(module, dm)
    assert module.compiled and module.model._compiled_call_impl is not None
    [compile_s] = [m["perf/compile_s"] for m in logged if "perf/compile_s" in m]
    assert compile_s > 0
    t.save_checkpoint(tmp_path / "compiled.ckpt")
    ckpt = torch.load(tmp_path / "compiled.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == set(LanguageModelModule(config).state_dict())

    again = LanguageModelModule(config, compile=False)
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=2)
    t2 = trainer(tmp_path, steps=3)
    t2.fit(again, dm, ckpt_path=tmp_path / "compiled.ckpt")
    assert t2.global_step == 3 and not again.compiled
    assert math.isfinite(t2.callback_metrics["train/loss"])
    # the weights load into the other projection layout, but its optimizer state cannot resume there
    other = LanguageModelModule(tiny(fused_qkvr=False))
    with pytest.raises(ValueError, match=r"fused_qkvr=true.*sets false"):
        trainer(tmp_path, steps=4).fit(other, dm, ckpt_path=tmp_path / "compiled.ckpt")
    loaded = LanguageModelModule.load_from_checkpoint(tmp_path / "compiled.ckpt", model=tiny(), weights_only=True)
    ids = torch.randint(0, 320, (1, 8))
    module.eval(), loaded.eval()
    torch.testing.assert_close(loaded(ids), module(ids))


def test_fused_block_refuses_a_separate_w_r_learning_rate_when_built():
    with pytest.raises(ValueError, match=r"fused_qkvr.*r_proj_lr_mult"):
        LanguageModelModule(tiny(fused_qkvr=True), optimizer=OptimizerConfig(r_proj_lr_mult=2.0))
    LanguageModelModule(tiny(fused_qkvr=True), optimizer=OptimizerConfig(name="adamw", r_proj_lr_mult=2.0))


def test_speed_monitor_logs_tokens_per_second_and_mfu(tmp_path, corpus):
    logged = []

    class Recorder(pl.loggers.logger.Logger):
        name, version = "rec", "0"

        def log_metrics(self, metrics, step=None):
            logged.append((step, dict(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

    module = LanguageModelModule(tiny())
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=2)
    callbacks = [SpeedMonitor(peak_flops=1e9), TrainingMetrics()]
    t = trainer(tmp_path, steps=4, logger=Recorder(), log_every_n_steps=2, callbacks=callbacks)
    t.fit(module, dm)
    perf = [m for _, m in logged if "perf/tokens_per_s" in m]
    assert perf
    for m in perf:
        expected = m["perf/tokens_per_s"] * flops_per_token(module.model_config, 16) / 1e9
        assert m["perf/mfu"] == pytest.approx(expected)

    def steps(key):
        return [s for s, m in logged if key in m]

    # One step convention: optimizer steps taken before the step the metric describes (Lightning's train/loss).
    assert steps("train/loss") == [1, 3]
    assert steps("perf/tokens_per_s") == [1, 3]  # the clock starts after step 0 (compilation, warm-up)
    for key in ("train/grad_norm", "train/tokens", "train/update_rms/muon", "train/update_rms/adamw_embedding"):
        assert steps(key) == [1, 3], key
    tokens = [m["train/tokens"] for _, m in logged if "train/tokens" in m]
    assert tokens == [2 * 2 * 16, 4 * 2 * 16]  # batches × batch size × sequence length, cumulative
    assert all(m["train/grad_norm"] > 0 for _, m in logged if "train/grad_norm" in m)


def test_peak_flops_come_from_lightning_except_the_h200_it_misses(monkeypatch):
    assert peak_flops_for(torch.device("cpu"), "bf16-mixed") is None
    for name, precision, peak in (
        ("NVIDIA H200", "bf16-mixed", 989e12),  # Lightning's table does not know this name
        ("NVIDIA H200 NVL", "bf16-true", 835e12),
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),  # Lightning's entry
        ("NVIDIA A100-SXM4-80GB", "16-mixed", 312e12),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops_for(torch.device("cuda", 0), precision) == pytest.approx(peak), name


def test_nan_guard_is_a_callback_the_module_brings_and_its_skip_count_is_checkpointed(tmp_path, corpus):
    from parallax_lightning.nonfinite import NonFiniteGuard

    module = LanguageModelModule(tiny(), optimizer=OptimizerConfig(name="adamw"), nonfinite="skip")
    poison_forward_call(module, 2)
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=2)
    t = trainer(tmp_path, steps=3, val_check_interval=100)
    with pytest.warns(UserWarning, match=r"skipping step 1: .*training loss is nan"):
        t.fit(module, dm)
    [guard] = [c for c in t.callbacks if isinstance(c, NonFiniteGuard)]
    assert (guard.mode, guard.skips_total) == ("skip", 1)
    t.save_checkpoint(tmp_path / "m.ckpt")
    assert torch.load(tmp_path / "m.ckpt", weights_only=True)["nonfinite_skips"] == 1
    again = LanguageModelModule(tiny(), optimizer=OptimizerConfig(name="adamw"), nonfinite="skip")
    t2 = trainer(tmp_path, steps=4, val_check_interval=100)
    t2.fit(again, TextDataModule(source=str(corpus), seq_len=16, batch_size=2), ckpt_path=tmp_path / "m.ckpt")
    assert again.nonfinite_guard.skips_total == 1
