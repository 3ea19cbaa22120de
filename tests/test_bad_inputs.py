"""The bad-input catalogue: one table of wrong calls across the kernels, Muon, the CLI, configs, data,
token shards, tokenizers and checkpoints. Each must fail with the expected error type, and the message must
name the offending value (a shape, a number, a key, a file), so the user can see what to change.

Cases are (area, what, call, error type, text the message must contain); a call receives a scratch folder.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from parallax_kernels import (
    parallax_attn,
    parallax_attn_reference,
    parallax_decode,
    parallax_decode_reference,
    softmax_decode,
)
from parallax_muon import Muon
from tests.lightning.platform_utils import run_cli, tiny_config, write_corpus


@dataclass
class Case:
    area: str
    what: str
    call: Callable[[Path], Any]
    error: type[BaseException]
    names: str

    @property
    def id(self) -> str:
        return f"{self.area}: {self.what}"


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def qrkv(B=1, T=8, H=2, Hkv=2, D=16, Tk=None):
    Tk = T if Tk is None else Tk
    return t(B, T, H, D), t(B, T, H, D), t(B, Tk, Hkv, D), t(B, Tk, Hkv, D)


def attn(**changes):
    q, r, k, v = qrkv()
    args = {"q": q, "r": r, "k": k, "v": v, **changes}
    return lambda _: parallax_attn(**args)


def decode(_op=parallax_decode, **changes):
    q, r = t(2, 1, 2, 16), t(2, 1, 2, 16)
    k, v = t(2, 8, 1, 16), t(2, 8, 1, 16)
    args = {"q": q, "r": r, "k_cache": k, "v_cache": v, **changes}
    return lambda _: _op(**args)


_STRIDED = t(2, 8, 1, 32)[..., ::2]


# -- data helpers -------------------------------------------------------------------------------------------
def corpus(folder: Path) -> Path:
    return write_corpus(folder / "corpus", n_docs=3, words_per_doc=200)


def text_data(folder: Path, **kwargs):
    from parallax_lightning.data import TextDataModule

    kwargs.setdefault("source", str(corpus(folder)))
    dm = TextDataModule(**{"seq_len": 16, "batch_size": 2, **kwargs})
    dm.setup("fit")
    return dm


def empty_corpus(folder: Path):
    (folder / "empty").mkdir()
    (folder / "empty" / "a.txt").write_text("")
    return text_data(folder, source=str(folder / "empty"))


def shard(folder: Path, header=(20240520, 1, 100), tokens=100, name="s.bin", dtype=np.uint16) -> Path:
    h = np.zeros(256, dtype="<i4")
    h[: len(header)] = header
    path = folder / name
    path.write_bytes(h.tobytes() + np.arange(tokens, dtype=dtype).tobytes())
    return path


def shard_data(folder: Path, **kwargs):
    from parallax_lightning.data import TokenShardDataModule

    dm = TokenShardDataModule(**{"seq_len": 16, "batch_size": 2, **kwargs})
    dm.setup("fit")
    return dm


def out_of_range_tokens(folder: Path):
    from parallax_lightning.data.shards import write_shard

    write_shard(folder / "big.bin", np.full(4096, 400, dtype=np.uint16))
    return shard_data(folder, train_files=str(folder / "big.bin"), vocab_size=320)


def pickled_tokenizer(folder: Path):
    from parallax_lightning.data.tokenizers import load_tokenizer

    path = folder / "tokenizer.json"
    path.write_bytes(pickle.dumps({"not": "json"}))
    return load_tokenizer(str(path))


# -- CLI helpers --------------------------------------------------------------------------------------------
def cli(*args, **sections):
    def call(folder: Path):
        config = tiny_config(folder, corpus(folder), **sections)
        return run_cli(["fit", "--config", str(config), *args], folder)

    return call


def ui(*args):
    from parallax_lightning.tracking_ui import ui_main

    return lambda _: ui_main(list(args))


# -- checkpoint helpers -------------------------------------------------------------------------------------
def truncated_checkpoint(folder: Path):
    from parallax_lightning.checkpoint_io import AtomicCheckpointIO

    path = folder / "cut.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(4096)}}, path)
    path.write_bytes(path.read_bytes()[:3000])
    return AtomicCheckpointIO().load_checkpoint(path)


class _Code:
    def __reduce__(self):
        return (print, ("this would run",))


def code_checkpoint(folder: Path):
    from parallax_lightning.checkpoint_io import AtomicCheckpointIO

    path = folder / "code.ckpt"
    torch.save({"state_dict": {}, "x": _Code()}, path)
    return AtomicCheckpointIO().load_checkpoint(path)


def model_config(**kwargs):
    from parallax_lightning.model import DecoderConfig

    return lambda _: DecoderConfig(**kwargs)


def optim_config(kind, **kwargs):
    from parallax_lightning import optim

    return lambda _: getattr(optim, kind)(**kwargs)


def module(**kwargs):
    from parallax_lightning.lm_module import LanguageModelModule

    return lambda _: LanguageModelModule(**kwargs)


def muon(**kwargs):
    return lambda _: Muon([torch.nn.Parameter(torch.randn(8, 8))], **kwargs)


def _cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


def attn_reference(**changes):
    q, r, k, v = qrkv()
    return lambda _: parallax_attn_reference(**{"q": q, "r": r, "k": k, "v": v, **changes})


def softmax_dec(**changes):
    q, k, v = t(2, 1, 2, 16), t(2, 8, 1, 16), t(2, 8, 1, 16)
    return lambda _: softmax_decode(**{"q": q, "k_cache": k, "v_cache": v, **changes})


def adamw(**kwargs):
    return lambda _: Muon([{"params": [torch.nn.Parameter(torch.randn(8))], "use_muon": False}], **kwargs)


def muon_load(edit):
    """A Muon (one Muon, one AdamW group) after one step; its state dict, edited, loaded into a twin."""

    def make():
        w, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
        return w, b, Muon([{"params": [w]}, {"params": [b], "use_muon": False}])

    def call(_):
        w, b, opt = make()
        w.grad, b.grad = torch.randn(8, 8), torch.randn(8)
        opt.step()
        sd = opt.state_dict()
        edit(sd)
        return make()[2].load_state_dict(sd)

    return call


CASES = [
    # kernels: training op
    Case("kernel", "q of rank 3", attn(q=t(8, 2, 16)), ValueError, "got 3 dims"),
    Case("kernel", "integer q", attn(q=torch.ones(1, 8, 2, 16, dtype=torch.int64)), ValueError, "torch.int64"),
    Case("kernel", "q as a list", attn(q=[[1.0]]), TypeError, "got list"),
    Case("kernel", "3 query heads over 2 kv heads", attn(q=t(1, 8, 3, 16), r=t(1, 8, 3, 16)), ValueError, "(3)"),
    Case("kernel", "r shaped unlike q", attn(r=t(1, 8, 2, 8)), ValueError, "(1, 8, 2, 8)"),
    Case("kernel", "k in fp16, q in fp32", attn(k=t(1, 8, 2, 16, dtype=torch.float16)), ValueError, "torch.float16"),
    Case("kernel", "negative scale", attn(scale=-1.0), ValueError, "got -1.0"),
    Case("kernel", "NaN scale", attn(scale=float("nan")), ValueError, "got nan"),
    Case("kernel", "window of 0 keys", attn(window_size=0), ValueError, "got 0"),
    Case("kernel", "window without causal", attn(window_size=4, causal=False), ValueError, "window_size=4"),
    Case("kernel", "more queries than keys", attn(q=t(1, 9, 2, 16), r=t(1, 9, 2, 16)), ValueError, "(9) than keys (8)"),
    Case(
        "kernel",
        "empty sequence in cu_seqlens",
        attn(cu_seqlens=torch.tensor([0, 3, 3, 8], dtype=torch.int32)),
        ValueError,
        "[0, 3, 3, 8]",
    ),
    Case("kernel", "max_seqlen without cu_seqlens", attn(max_seqlen=4), ValueError, "max_seqlen"),
    # kernels: decode
    Case("decode", "two query tokens", decode(q=t(2, 2, 2, 16), r=t(2, 2, 2, 16)), ValueError, "(2, 2, 2, 16)"),
    Case(
        "decode",
        "lengths outside the cache",
        decode(cache_seqlens=torch.tensor([0, 9], dtype=torch.int32)),
        ValueError,
        "[0, 9]",
    ),
    Case("decode", "float lengths", decode(cache_seqlens=torch.tensor([1.0, 2.0])), ValueError, "torch.float32"),
    Case(
        "decode",
        "cache with strided head_dim",
        decode(k_cache=_STRIDED, v_cache=_STRIDED),
        ValueError,
        str(tuple(_STRIDED.stride())),
    ),
    # Muon
    Case("muon", "negative lr", muon(lr=-1.0), ValueError, "lr=-1.0"),
    Case("muon", "momentum of 1.5", muon(momentum=1.5), ValueError, "momentum=1.5"),
    Case("muon", "zero Newton-Schulz steps", muon(ns_steps=0), ValueError, "got 0"),
    Case("muon", "unknown backend", muon(backend="cuda_magic"), ValueError, "'cuda_magic'"),
    # configs
    Case("config", "misspelled attention", model_config(attention="paralax"), ValueError, "'paralax'"),
    Case("config", "kv heads not dividing heads", model_config(n_heads=3, n_kv_heads=2), ValueError, "(got 2)"),
    Case("config", "window of 0", model_config(window_size=0), ValueError, "(got 0)"),
    Case("config", "unknown schedule", optim_config("ScheduleConfig", name="cosinus"), ValueError, "'cosinus'"),
    Case("config", "negative warmup", optim_config("ScheduleConfig", warmup_steps=-1), ValueError, "got -1"),
    Case("config", "unknown optimizer", optim_config("OptimizerConfig", name="sgd"), ValueError, "'sgd'"),
    Case("config", "negative lr", optim_config("OptimizerConfig", lr=-1.0), ValueError, "got -1"),
    Case("config", "unknown NaN policy", module(nonfinite="ignore"), ValueError, "'ignore'"),
    # CLI
    Case("cli", "misspelled model key", cli(model={"model": {"d_modle": 64}}), SystemExit, "d_modle"),
    Case("cli", "misspelled trainer key", cli(trainer={"max_stepz": 3}), SystemExit, "max_stepz"),
    Case("cli", "zero torch threads", cli("--torch_threads=0"), ValueError, "got 0"),
    Case(
        "cli",
        "untrusted class_path",
        cli(trainer={"callbacks": [{"class_path": "somepkg.callbacks.Spy"}]}),
        ValueError,
        "'somepkg.callbacks.Spy'",
    ),
    Case(
        "cli",
        "torch class that runs a command",
        cli(trainer={"callbacks": [{"class_path": "torch.distributed.elastic.multiprocessing.SubprocessHandler"}]}),
        ValueError,
        "'torch.distributed.elastic.multiprocessing.SubprocessHandler'",
    ),
    Case(
        "cli",
        "class_path in the logger's tags",
        cli(trainer={"logger": {"init_args": {"tags": {"t": {"class_path": "lightning.pytorch.callbacks.Timer"}}}}}),
        ValueError,
        "trainer.logger.init_args.tags.t.class_path",
    ),
    Case(
        "cli",
        "class_path in a strategy's object argument",
        cli(
            trainer={
                "strategy": {
                    "class_path": "lightning.pytorch.strategies.DDPStrategy",
                    "init_args": {"ddp_comm_state": {"class_path": "lightning.pytorch.callbacks.Timer"}},
                }
            }
        ),
        ValueError,
        "trainer.strategy.init_args.ddp_comm_state.class_path",
    ),
    Case(
        "cli",
        "secret environment variable",
        cli(trainer={"logger": {"init_args": {"run_name": "${oc.env:MLFLOW_TRACKING_PASSWORD}"}}}),
        ValueError,
        "MLFLOW_TRACKING_PASSWORD",
    ),
    Case(
        "cli",
        "credentials in default_root_dir",
        cli(trainer={"default_root_dir": "s3://AKIA:hunter2@bucket/runs"}),
        ValueError,
        "s3://***@bucket/runs",
    ),
    Case(
        "cli", "YAML alias bomb", lambda d: run_cli(["fit", "--config", str(_laughs(d))], d), ValueError, "laughs.yaml"
    ),
    Case("cli", "allow flag of '*'", cli("--allow_class_path", "*"), ValueError, "'*'"),
    Case("cli", "config widening trust", cli(allow_class_path="somepkg"), ValueError, "allow_class_path"),
    Case("cli", "UI on port 70000", ui("--port", "70000"), ValueError, "got 70000"),
    # data
    Case(
        "data",
        "missing corpus",
        lambda d: text_data(d, source=str(d / "no_such_corpus")),
        FileNotFoundError,
        "no_such_corpus",
    ),
    Case("data", "empty corpus", empty_corpus, ValueError, "empty"),
    Case("data", "sequence length 0", lambda d: text_data(d, seq_len=0), ValueError, "got 0"),
    Case("data", "validation share 1.5", lambda d: text_data(d, val_fraction=1.5), ValueError, "got 1.5"),
    Case(
        "data", "vocabulary below the tokenizer's", lambda d: text_data(d, vocab_size=100), ValueError, "vocab_size=100"
    ),
    Case("data", "sequence longer than the data", lambda d: text_data(d, seq_len=100000), ValueError, "seq_len=100000"),
    Case("data", "unknown tokenizer", lambda d: text_data(d, tokenizer="wordpiece"), FileNotFoundError, "'wordpiece'"),
    Case("data", "tokenizer file that is a pickle", pickled_tokenizer, ValueError, "tokenizer.json"),
    # token shards
    Case(
        "shard",
        "wrong magic number",
        lambda d: shard_data(d, train_files=str(shard(d, (12345, 1, 100)))),
        ValueError,
        "magic number 12345",
    ),
    Case(
        "shard",
        "truncated",
        lambda d: shard_data(d, train_files=str(shard(d, tokens=60))),
        ValueError,
        "header says 100 tokens",
    ),
    Case(
        "shard",
        "unknown version",
        lambda d: shard_data(d, train_files=str(shard(d, (20240520, 7, 100)))),
        ValueError,
        "version 7",
    ),
    Case(
        "shard", "shorter than a header", lambda d: shard_data(d, train_files=str(_short(d))), ValueError, "short.bin"
    ),
    Case("shard", "missing", lambda d: shard_data(d, train_files=str(d / "gone.bin")), FileNotFoundError, "gone.bin"),
    Case("shard", "token id outside the vocabulary", out_of_range_tokens, ValueError, "token id 400"),
    # checkpoints
    Case("checkpoint", "truncated", truncated_checkpoint, ValueError, "cut.ckpt"),
    Case("checkpoint", "carrying code", code_checkpoint, ValueError, "code.ckpt"),
    # kernels: packed offsets with max_seqlen (checked on their device; on CPU a ValueError)
    Case(
        "kernel",
        "unsorted cu_seqlens with max_seqlen",
        attn(cu_seqlens=_cu(0, 5, 3, 8), max_seqlen=8),
        ValueError,
        "got [0, 5, 3, 8]",
    ),
    Case(
        "kernel",
        "cu_seqlens past the end with max_seqlen",
        attn(cu_seqlens=_cu(0, 4, 12), max_seqlen=8),
        ValueError,
        "end at the packed length 8",
    ),
    Case(
        "kernel",
        "negative cu_seqlens with max_seqlen",
        attn(cu_seqlens=_cu(-4, 4, 8), max_seqlen=8),
        ValueError,
        "got [-4, 4, 8]",
    ),
    Case(
        "kernel",
        "sequence longer than max_seqlen",
        attn(cu_seqlens=_cu(0, 6, 8), max_seqlen=4),
        ValueError,
        "max_seqlen=4",
    ),
    Case("kernel", "cu_seqlens not starting at 0", attn(cu_seqlens=_cu(2, 8)), ValueError, "[2, 8]"),
    Case(
        "kernel",
        "cu_seqlens on another device",
        attn(cu_seqlens=_cu(0, 8).to("meta")),
        ValueError,
        "cu_seqlens is on meta",
    ),
    Case(
        "kernel", "reference with cu_seqlens past the end", attn_reference(cu_seqlens=_cu(0, 9)), ValueError, "[0, 9]"
    ),
    # kernels: decode lengths (one rule on every backend: [1, L_max])
    Case("decode", "negative length", decode(cache_seqlens=_cu(-1, 3)), ValueError, "got [-1]"),
    Case("decode", "length of 2^31 - 1", decode(cache_seqlens=_cu(2**31 - 1, 3)), ValueError, "got [2147483647]"),
    Case(
        "decode",
        "reference: length past the cache",
        decode(_op=parallax_decode_reference, cache_seqlens=_cu(3, 9)),
        ValueError,
        "got [9]",
    ),
    Case(
        "decode",
        "reference: negative length",
        decode(_op=parallax_decode_reference, cache_seqlens=_cu(-2, 3)),
        ValueError,
        "got [-2]",
    ),
    Case("decode", "softmax: length zero", softmax_dec(cache_seqlens=_cu(0, 8)), ValueError, "got [0]"),
    Case(
        "decode",
        "softmax: float lengths",
        softmax_dec(cache_seqlens=torch.tensor([1.0, 2.0])),
        ValueError,
        "torch.float32",
    ),
    Case("decode", "softmax: two query tokens", softmax_dec(q=t(2, 2, 2, 16)), ValueError, "(2, 2, 2, 16)"),
    # Muon: hyper-parameters must be finite and in range
    Case("muon", "infinite lr", muon(lr=float("inf")), ValueError, "lr=inf"),
    Case("muon", "NaN lr", muon(lr=float("nan")), ValueError, "lr=nan"),
    Case("muon", "lr as a string", muon(lr="1e-3"), TypeError, "'1e-3'"),
    Case("muon", "infinite weight decay", muon(weight_decay=float("inf")), ValueError, "weight_decay=inf"),
    Case("muon", "NaN momentum", muon(momentum=float("nan")), ValueError, "momentum=nan"),
    Case("muon", "infinite AdamW lr", adamw(adamw_lr=float("inf")), ValueError, "lr=inf"),
    Case("muon", "negative AdamW eps", adamw(adamw_eps=-1.0), ValueError, "eps=-1.0"),
    Case("muon", "NaN AdamW beta", adamw(adamw_betas=(float("nan"), 0.95)), ValueError, "betas=(nan, 0.95)"),
    Case(
        "muon",
        "per-group infinite lr",
        lambda _: Muon([{"params": [torch.randn(8, 8)], "lr": float("inf"), "name": "attn"}]),
        ValueError,
        "group 'attn': lr=inf",
    ),
    # Muon: state dicts that do not fit
    Case(
        "muon",
        "state dict with another group count",
        muon_load(lambda sd: sd["param_groups"].pop()),
        ValueError,
        "the state dict has 1 param groups, this optimizer 2",
    ),
    Case(
        "muon",
        "AdamW group loaded as Muon",
        muon_load(lambda sd: sd["param_groups"][1].update(use_muon=True)),
        ValueError,
        "group 1 ('adamw_1') is an AdamW group here",
    ),
    Case(
        "muon",
        "momentum buffer of another shape",
        muon_load(lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(4, 4))),
        ValueError,
        "momentum_buffer in the state dict has shape (4, 4), expected the parameter's shape (8, 8)",
    ),
    Case(
        "muon",
        "exp_avg of another shape",
        muon_load(lambda sd: sd["state"][1].update(exp_avg=torch.zeros(2))),
        ValueError,
        "exp_avg in the state dict has shape (2,)",
    ),
    Case(
        "muon",
        "state dict with an infinite lr",
        muon_load(lambda sd: sd["param_groups"][0].update(lr=float("inf"))),
        ValueError,
        "Muon.load_state_dict: group 'muon_0': lr=inf",
    ),
    # refused before an MLflow run is opened (Muon checks these only when the trainer builds it)
    Case("config", "Muon momentum of 1", optim_config("OptimizerConfig", momentum=1.0), ValueError, "got 1.0"),
    Case("config", "Muon ns_steps of 0", optim_config("OptimizerConfig", ns_steps=0), ValueError, "got 0"),
    Case("config", "fractional ns_steps", optim_config("OptimizerConfig", ns_steps=2.5), ValueError, "got 2.5"),
    Case("config", "unknown adjust_lr", optim_config("OptimizerConfig", adjust_lr="rms"), ValueError, "'rms'"),
    Case("config", "unknown ns_coefficients", optim_config("OptimizerConfig", ns_coefficients="x"), ValueError, "'x'"),
    Case("config", "nesterov as text", optim_config("OptimizerConfig", nesterov="yes"), ValueError, "got 'yes'"),
    Case("config", "AdamW beta of 1", optim_config("OptimizerConfig", adamw_betas=(0.9, 1.0)), ValueError, "1.0)"),
    Case("cli", "missing ckpt_path", cli("--ckpt_path", "gone.ckpt"), FileNotFoundError, "gone.ckpt"),
    Case(
        "cli",
        "checkpoint of another width",
        lambda d: cli("--ckpt_path", str(_narrow_ckpt(d)))(d),
        ValueError,
        "(320, 8)",
    ),
    Case(
        "cli", "validation every 0 batches", cli(trainer={"val_check_interval": 0}), ValueError, "val_check_interval=0"
    ),
    Case("cli", "accumulating 0 batches", cli(trainer={"accumulate_grad_batches": 0}), ValueError, "batches=0"),
    Case("data", "tokenizer ids beyond its vocabulary", lambda d: _gappy_tokenizer(d), ValueError, "id 700"),
    Case(
        "data",
        "binary file refused",
        lambda d: text_data(d, source=str(_binary(d)), binary_files="error"),
        ValueError,
        "NUL byte",
    ),
]


def _laughs(folder: Path) -> Path:
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = folder / "laughs.yaml"
    path.write_text("\n".join(lines) + "\nbomb: *a9\n")
    return path


def _narrow_ckpt(folder: Path) -> Path:
    path = folder / "narrow.ckpt"
    torch.save({"state_dict": {"model.embed.weight": torch.zeros(320, 8)}}, path)
    return path


def _gappy_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models

    from parallax_lightning.data.tokenizers import load_tokenizer

    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 700}, unk_token="[UNK]")).save(str(folder / "gappy.json"))
    return load_tokenizer(str(folder / "gappy.json"))


def _binary(folder: Path) -> Path:
    path = folder / "blob.bin"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    return path


def _short(folder: Path) -> Path:
    path = folder / "short.bin"
    path.write_bytes(b"\x00" * 100)
    return path


def test_the_catalogue_is_broad():
    areas = {c.area for c in CASES}
    assert len(CASES) >= 25 and {"kernel", "decode", "muon", "cli", "config", "data", "shard"} <= areas


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_named(case, tmp_path, capsys):
    with pytest.raises(case.error) as info:
        case.call(tmp_path)
    message = str(info.value) + capsys.readouterr().err  # parse errors are printed, then exit(2)
    assert case.names in message, f"{case.id}: {case.names!r} not in {message[-2000:]!r}"
