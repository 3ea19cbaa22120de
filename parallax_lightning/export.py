"""Trained models out of the platform: checkpoints as models, and a Hugging Face–style folder.

    python -m parallax_lightning export --ckpt_path runs/.../last.ckpt --out my_model/

writes ``my_model/config.json`` (the DecoderConfig fields plus ``model_type``), ``model.safetensors`` (the
decoder's weights) and the tokenizer (``tokenizer.json``, or ``"tokenizer": "byte"`` in config.json for the
byte-level tokenizer, which needs no file). ``load_pretrained("my_model/")`` builds the same decoder back.

Everything read here is untrusted input and is read as data only: checkpoints with
``torch.load(weights_only=True)``, folders as JSON and safetensors (no pickle, no code from the folder).
Unknown or mistyped config keys, missing or extra weights and shape mismatches are errors that name the
key and the file, raised before anything is built or written.

``load_model(source)`` takes either a checkpoint file or an exported folder: the ``eval`` and ``generate``
commands use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
from .model import Decoder, DecoderConfig

MODEL_TYPE = "parallax_decoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# config.json keys besides the DecoderConfig fields
META_KEYS = ("model_type", "format_version", "tokenizer", "eos_token_id")


class CheckpointError(ValueError):
    """A checkpoint or exported folder that cannot be turned into a model; the message names the file and
    the key at fault."""


@dataclass
class LoadedModel:
    """A decoder in eval mode with what came with it."""

    model: Decoder
    tokenizer: ByteTokenizer | HFTokenizer | None
    run_info: dict[str, str] | None  # the MLflow run that trained it (checkpoints only)
    global_step: int | None
    source: Path


# ------------------------------------------------------------------------------------ config checks


def _allowed_types(field: dataclasses.Field) -> tuple[type, ...]:
    """The JSON scalar types a DecoderConfig field accepts, read from its annotation ("int | None", ...)."""
    names = {part.strip() for part in str(field.type).split("|")}
    table = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}
    allowed: tuple[type, ...] = ()
    for name in names:
        allowed += table.get(name, ())
    return allowed


def decoder_config_from_dict(values: Any, where: str) -> DecoderConfig:
    """A DecoderConfig from untrusted data: unknown keys, wrong types and invalid values are named errors."""
    if not isinstance(values, Mapping):
        raise CheckpointError(
            f"{where}: the model config must be a mapping of DecoderConfig fields, got {type(values).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(DecoderConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown model config key(s) {unknown}; DecoderConfig has {sorted(fields)} "
            "(was it written by a newer version of parallax_lightning?)"
        )
    for key, value in values.items():
        allowed = _allowed_types(fields[key])
        # bool is an int subclass: an int field never takes True/False, a bool field never takes 0/1
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if allowed and not ok:
            raise CheckpointError(
                f"{where}: model config key {key!r} must be of type {fields[key].type}, got {value!r} "
                f"({type(value).__name__})"
            )
    try:
        return DecoderConfig(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: invalid model config: {err}") from err


def _load_state(model: Decoder, state: Mapping[str, Any], where: str) -> None:
    """Strict load with errors that name the keys: missing, unexpected, non-tensor, wrong shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the weights do not match the model config: missing {missing[:8]}"
            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            + f", unexpected {unexpected[:8]}"
            + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        )
    for key, ref in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: weight {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: weight {key!r} has shape {tuple(value.shape)} but the model config gives {tuple(ref.shape)}"
            )
        if not value.is_floating_point():
            raise CheckpointError(f"{where}: weight {key!r} has dtype {value.dtype}, not a floating-point type")
    dtypes = {state[k].dtype for k in expected}
    if len(dtypes) == 1:
        model.to(dtypes.pop())  # keep the stored precision: logits then match the trained model bit for bit
    model.load_state_dict(dict(state), strict=True)


# ------------------------------------------------------------------------------------ checkpoints


def _checkpoint_tokenizer_spec(checkpoint: Mapping[str, Any], path: Path) -> str | None:
    """The tokenizer a checkpoint's data module used, as 'byte' or a tokenizer.json path; None if unknown."""
    data = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(data, Mapping):
        return None
    spec = data.get("tokenizer")
    if spec == "byte":
        return "byte"
    if isinstance(spec, str) and spec != "bpe":
        return spec if Path(spec).exists() else None
    if spec == "bpe":  # TextDataModule trained a BPE and saved it in its cache folder
        cache = data.get("cache_dir")
        folders = [Path(cache)] if isinstance(cache, str) else []
        source = data.get("source")
        for s in [source] if isinstance(source, str) else source if isinstance(source, list) else []:
            if isinstance(s, str) and Path(s).exists():
                folders.append((Path(s) if Path(s).is_dir() else Path(s).parent) / ".parallax_cache")
        folders.append(Path.cwd() / ".parallax_cache")
        size = data.get("bpe_vocab_size")
        for folder in folders:
            found = sorted(folder.glob(f"bpe{size}-*.json")) if folder.is_dir() else []
            if len(found) == 1:
                return str(found[0])
        return None
    if spec is None and data.get("train_files") is not None:  # token shards: meta.json names the tokenizer
        files = data["train_files"]
        first = files[0] if isinstance(files, list) and files else files
        if isinstance(first, str):
            import glob

            matches = sorted(glob.glob(first)) or [first]
            folder = Path(matches[0])
            folder = folder if folder.is_dir() else folder.parent
            meta = folder / "meta.json"
            if meta.is_file():
                try:
                    named = json.loads(meta.read_text()).get("tokenizer")
                except (json.JSONDecodeError, AttributeError):
                    return None
                if named == "byte":
                    return "byte"
                if isinstance(named, str) and (folder / named).exists():
                    return str(folder / named)
    return None


def read_checkpoint(path: str | os.PathLike) -> tuple[DecoderConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, decoder state dict, checkpoint) of a platform checkpoint, checked; loaded weights-only."""
    from .checkpoint_io import load_weights_only

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = load_weights_only(path, map_location="cpu")
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    where = f"checkpoint {str(path)!r}"
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{where} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict)")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or "model" not in hparams:
        raise CheckpointError(
            f"{where} has no hyper_parameters['model'] (the DecoderConfig): it was not written by "
            "parallax_lightning's LanguageModelModule"
        )
    config = decoder_config_from_dict(hparams["model"], where)
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where} has no state_dict")
    prefix = "model."
    decoder_state = {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
    if not decoder_state:
        raise CheckpointError(f"{where}: its state_dict holds no 'model.*' weights (the decoder's)")
    return config, decoder_state, dict(checkpoint)


def resolve_tokenizer(spec: str | None, fallback: str | None, where: str, vocab_size: int):
    """The tokenizer to use: `spec` if given, else the one the model records; checked against the vocabulary."""
    chosen = spec if spec is not None else fallback
    if chosen is None:
        raise CheckpointError(
            f"{where} does not say which tokenizer it was trained with (or its file is gone): pass "
            "--tokenizer byte or --tokenizer PATH/tokenizer.json"
        )
    tokenizer = load_tokenizer(chosen)
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"tokenizer {chosen!r} has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}: "
            "it is not the tokenizer this model was trained with"
        )
    return tokenizer


def load_model(
    source: str | os.PathLike,
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_backend: str | None = None,
    need_tokenizer: bool = True,
) -> LoadedModel:
    """A checkpoint file or an exported folder as an eval-mode Decoder (plus tokenizer and run).

    tokenizer: "byte" or a tokenizer.json path; None = the one the checkpoint's data used (or the folder's).
    dtype: cast the weights (None keeps the stored dtype). attn_backend: override the config's."""
    source = Path(source)
    if source.is_dir():
        model, spec = _load_folder(source)
        run_info, step = None, None
    elif source.is_file():
        config, state, checkpoint = read_checkpoint(source)
        model = Decoder(config)
        _load_state(model, state, f"checkpoint {str(source)!r}")
        spec = _checkpoint_tokenizer_spec(checkpoint, source)
        info = checkpoint.get("mlflow")
        run_info = dict(info) if isinstance(info, Mapping) and isinstance(info.get("run_id"), str) else None
        step = checkpoint.get("global_step")
        step = int(step) if isinstance(step, int) and not isinstance(step, bool) else None
    else:
        raise FileNotFoundError(f"{str(source)!r} is neither a checkpoint file nor an exported model folder")
    if attn_backend is not None:
        model = _with_backend(model, attn_backend)
    tok = None
    if need_tokenizer or tokenizer is not None:
        tok = resolve_tokenizer(tokenizer, spec, f"{str(source)!r}", model.config.vocab_size)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tok, run_info, step, source)


def _with_backend(model: Decoder, backend: str) -> Decoder:
    config = dataclasses.replace(model.config, attn_backend=backend)
    other = Decoder(config).to(model.embed.weight.dtype)
    other.load_state_dict(model.state_dict())
    return other


# ------------------------------------------------------------------------------------ export / load


def export_pretrained(
    ckpt_path: str | os.PathLike, out: str | os.PathLike, tokenizer: str | None = None, overwrite: bool = False
) -> Path:
    """Write a checkpoint's decoder as config.json + model.safetensors (+ tokenizer.json) into `out`.

    The folder is assembled beside `out` and renamed into place, so a failure leaves no half-written folder."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not (overwrite and out.is_dir()):
        raise FileExistsError(f"export: {str(out)!r} already exists (pass --overwrite to replace a folder)")
    loaded = load_model(ckpt_path, tokenizer=tokenizer)
    model, tok = loaded.model, loaded.tokenizer
    config = {
        "model_type": MODEL_TYPE,
        "format_version": FORMAT_VERSION,
        **dataclasses.asdict(model.config),
        "tokenizer": "byte" if isinstance(tok, ByteTokenizer) else TOKENIZER_FILE,
        "eos_token_id": tok.eos_id,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "model_type": MODEL_TYPE})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if isinstance(tok, HFTokenizer):
            if tok.path is not None and tok.path.is_file():
                shutil.copyfile(tok.path, tmp / TOKENIZER_FILE)
            else:
                tok.tokenizer.save(str(tmp / TOKENIZER_FILE))
        os.chmod(tmp, 0o755 & ~_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_folder_config(folder: Path) -> tuple[DecoderConfig, str | None]:
    """(DecoderConfig, tokenizer spec) from an exported folder's config.json, checked."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {CONFIG_FILE}: it is not a folder written by `export`")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{str(path)!r}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r}: format_version is {version!r}; this version of parallax_lightning reads {FORMAT_VERSION}"
        )
    tok = raw.get("tokenizer")
    if tok not in (None, "byte", TOKENIZER_FILE):
        raise CheckpointError(f"{str(path)!r}: tokenizer must be 'byte' or {TOKENIZER_FILE!r}, got {tok!r}")
    eos = raw.get("eos_token_id")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
        raise CheckpointError(f"{str(path)!r}: eos_token_id must be an integer or null, got {eos!r}")
    config = decoder_config_from_dict({k: v for k, v in raw.items() if k not in META_KEYS}, repr(str(path)))
    spec = None if tok is None else "byte" if tok == "byte" else str(folder / TOKENIZER_FILE)
    return config, spec


def _load_folder(folder: Path) -> tuple[Decoder, str | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config, spec = read_folder_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(weights)!r} is not a readable safetensors file: {err}") from err
    model = Decoder(config)
    _load_state(model, state, repr(str(weights)))
    return model, spec


def load_pretrained(
    folder: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_backend: str | None = None,
) -> Decoder:
    """The Decoder of a folder written by `export` (eval mode). Reads JSON and safetensors only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"load_pretrained: {str(folder)!r} is not a folder")
    return load_model(folder, device=device, dtype=dtype, attn_backend=attn_backend, need_tokenizer=False).model


def load_pretrained_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved with an exported model."""
    folder = Path(folder)
    config, spec = read_folder_config(folder)
    return resolve_tokenizer(None, spec, repr(str(folder)), config.vocab_size)


# ------------------------------------------------------------------------------------ command line


def export_main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parallax_lightning export",
        description="Write a checkpoint's model as config.json + model.safetensors + tokenizer, loadable with "
        "parallax_lightning.export.load_pretrained(DIR) (JSON and safetensors only: no code runs on loading).",
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `fit` (e.g. .../last.ckpt)")
    parser.add_argument("--out", required=True, help="the folder to create")
    parser.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    opts = parser.parse_args(args)
    try:
        out = export_pretrained(opts.ckpt_path, opts.out, tokenizer=opts.tokenizer, overwrite=opts.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError) as err:
        print(f"parallax_lightning export: {err}", file=sys.stderr)
        return 2
    print(f"exported {opts.ckpt_path} to {out}")
    return 0
