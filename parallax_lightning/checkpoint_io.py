"""How the platform writes and reads checkpoints (Lightning's CheckpointIO, set by the CLI).

Writes are atomic and durable: the checkpoint goes to a temporary file in the same folder, is fsynced and
renamed over the target (then the folder is fsynced), so a crash or a kill mid-write leaves the previous
checkpoint under that name intact, and `last.ckpt` always names a complete file. Lightning's own writer
streams into the final name through fsspec without an fsync.

Reads use `torch.load(weights_only=True)`: a checkpoint can hold tensors, numbers, strings and containers,
never code, so loading somebody else's file cannot run anything. Checkpoints this platform writes are plain
data (configs are stored as dicts).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into a temporary file beside `path`, fsync, rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; checkpoints are usually shared like others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint as data only; the error for a file that holds code says what to do."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise ValueError(
                f"checkpoint {str(path)!r} holds Python objects other than tensors and plain data, so it is not "
                f"loaded: unpickling them could run code. If you made this file yourself and trust it, load it "
                f"with torch.load and weights_only=False, and save its state dicts again. ({err})"
            ) from err
        raise ValueError(f"checkpoint {str(path)!r} cannot be read (truncated or not a checkpoint): {err}") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with atomic, fsynced local writes and weights-only reads (see the module docstring).

    Remote paths (s3://, gs://, ...) go through Lightning's fsspec writer, whose object stores publish a file
    only once it is complete.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        protocol = get_filesystem(path).protocol
        if not {"file", "local"} & set(protocol if isinstance(protocol, (tuple, list)) else (protocol,)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None):
        if weights_only is False:
            raise ValueError(
                f"refusing to load {str(path)!r} with weights_only=False: this platform loads checkpoints as data "
                "only (see SECURITY.md)"
            )
        if not Path(path).is_file():
            if get_filesystem(path).exists(path):  # remote: Lightning's loader, restricted to data
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        return load_weights_only(path, map_location=map_location if map_location is not None else "cpu")


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def check_checkpoint_fits(
    path: str | os.PathLike, module: torch.nn.Module, strict: bool = True
) -> dict[str, Any] | None:
    """Raise before anything is restored when a local checkpoint cannot load into `module`: the path is
    missing, the file is not a Lightning checkpoint, a tensor's shape differs (the first one is named with
    both shapes), or (with `strict`, Lightning's default) keys are missing or extra. Loading a mismatched
    checkpoint later fails only after the trainer has set up (and an MLflow run been opened or continued).

    The file is memory-mapped: only the shapes are read. Returns the checkpoint (None for a folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path {str(path)!r} does not exist")
    if path.is_dir():  # a sharded checkpoint (FSDP, DeepSpeed): its strategy reads and checks it
        return None
    checkpoint = load_weights_only(path, mmap=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"ckpt_path {str(path)!r} is not a Lightning checkpoint: it holds no 'state_dict'")
    expected = module.state_dict()
    mismatched = [
        (key, _shape(state[key]), _shape(value))
        for key, value in expected.items()
        if key in state and _shape(state[key]) != _shape(value)
    ]
    missing = [key for key in expected if key not in state] if strict else []
    extra = [key for key in state if key not in expected] if strict else []
    if not (mismatched or missing or extra):
        return checkpoint
    problems = []
    if mismatched:
        key, saved, built = mismatched[0]
        more = f" ({len(mismatched) - 1} more tensors differ too)" if len(mismatched) > 1 else ""
        problems.append(f"parameter {key} has shape {saved} in the checkpoint but {built} in the model{more}")
    if missing:
        problems.append(f"the checkpoint lacks {_some(missing)}")
    if extra:
        problems.append(f"the model has no {_some(extra)}")
    raise ValueError(
        f"ckpt_path {str(path)!r} does not fit the model: {'; '.join(problems)}."
        + _config_differences(checkpoint, module)
        + " Use the model settings the checkpoint was trained with."
    )


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _config_differences(checkpoint: dict, module: torch.nn.Module) -> str:
    """' The checkpoint's model config differs in: d_model 64 (now 128).' when both configs are known."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("model")
    config = getattr(module, "model_config", None)
    if not isinstance(saved, dict) or not dataclasses.is_dataclass(config):
        return ""
    now = dataclasses.asdict(config)
    diffs = [f"{k} {saved[k]!r} (now {now[k]!r})" for k in now if k in saved and saved[k] != now[k]]
    return f" The checkpoint's model config differs in: {', '.join(diffs)}." if diffs else ""
