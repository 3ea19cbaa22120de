"""Which `class_path` values a config may name: this project's packages and torch's and Lightning's own,
unless the user widens the list on the command line (`--allow_class_path PREFIX`, comma-separated or
repeated) or in the environment (`PARALLAX_ALLOW_CLASS_PATHS=PREFIX,...`). A config file cannot widen it.

Why: jsonargparse imports the module a `class_path` names and instantiates the class with the config's
`init_args`, so a config from someone else could otherwise run any importable code. The check runs twice:
over the raw config files and arguments before anything is parsed (the error names the class path and the
file), and inside jsonargparse's own import-path policy (which also sees shorthand forms such as
`--trainer.logger=pkg.Logger` and checks where an object is really defined).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

TRUSTED_PREFIXES = (
    "parallax_lightning",
    "parallax_kernels",
    "parallax_muon",
    "torch",
    "torchmetrics",
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
)
ENV_VAR = "PARALLAX_ALLOW_CLASS_PATHS"
FLAG = "--allow_class_path"

# Config keys whose plain string value is itself a class path (jsonargparse's shorthand for subclass types).
_CLASS_KEYS = {"model", "data", "logger", "callbacks", "plugins", "strategy", "profiler", "accelerator"}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


class ClassPathNotAllowed(ValueError):
    """A config names a class outside the trusted namespaces."""


def _normalize(prefix: str, source: str) -> str:
    entry = prefix.strip().removesuffix(".*").rstrip(".")
    if entry == "*" or not entry or not all(part.isidentifier() for part in entry.split(".")):
        raise ValueError(
            f"{source}: {prefix!r} is not a module prefix (expected e.g. 'mypackage' or 'mypackage.callbacks'; "
            "'*' is not accepted: name what you trust)"
        )
    if entry == "jsonargparse" or entry.startswith("jsonargparse."):
        raise ValueError(f"{source}: {prefix!r} cannot be allowed: it would let a config change the parser's policy")
    return entry


def split_allow_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Remove `--allow_class_path X` / `--allow_class_path=X` from command-line arguments; return
    (remaining arguments, allowed prefixes)."""
    rest, allowed = [], []
    it = iter(range(len(args)))
    for i in it:
        arg = args[i]
        if arg == FLAG:
            if i + 1 >= len(args):
                raise ValueError(f"{FLAG} needs a value: a module prefix such as 'mypackage'")
            value = args[i + 1]
            next(it, None)
        elif isinstance(arg, str) and arg.startswith(FLAG + "="):
            value = arg[len(FLAG) + 1 :]
        else:
            rest.append(arg)
            continue
        allowed += [_normalize(v, FLAG) for v in value.split(",") if v.strip()]
    return rest, allowed


def allowed_prefixes(extra: Sequence[str] = ()) -> tuple[str, ...]:
    env = [_normalize(v, ENV_VAR) for v in os.environ.get(ENV_VAR, "").split(",") if v.strip()]
    return tuple(dict.fromkeys([*TRUSTED_PREFIXES, *env, *extra]))


def is_allowed(class_path: str, prefixes: Sequence[str]) -> bool:
    if "." not in class_path:  # a bare name: jsonargparse resolves it among classes already imported
        return True
    return any(class_path == p or class_path.startswith(p + ".") for p in prefixes)


def _refuse(class_path: str, where: str, prefixes: Sequence[str]) -> ClassPathNotAllowed:
    top = class_path.split(".")[0]
    return ClassPathNotAllowed(
        f"class_path {class_path!r} ({where}) is outside the namespaces this platform trusts "
        f"({', '.join(prefixes)}): loading it would import and run that code. If you wrote or trust it, pass "
        f"{FLAG} {top} on the command line or set {ENV_VAR}={top}"
    )


def _walk(tree: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(config key, class path) pairs in a parsed config."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            where = f"{path}.{key}" if path else str(key)
            if (key == "class_path" and isinstance(value, str)) or (
                key in _CLASS_KEYS and isinstance(value, str) and _DOTTED.match(value)
            ):
                yield where, value
            elif key in _CLASS_KEYS and isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, str) and _DOTTED.match(item):
                        yield f"{where}[{i}]", item
                    else:
                        yield from _walk(item, f"{where}[{i}]")
            else:
                yield from _walk(value, where)
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            yield from _walk(item, f"{path}[{i}]")


def check_tree(tree: Any, prefixes: Sequence[str], source: str) -> None:
    for where, class_path in _walk(tree):
        if not is_allowed(class_path, prefixes):
            raise _refuse(class_path, f"key {where} in {source}", prefixes)


def _check_yaml(text: str, prefixes: Sequence[str], source: str) -> None:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # not YAML: the parser reports it
    if isinstance(tree, Mapping) and "allow_class_path" in tree:
        raise ClassPathNotAllowed(
            f"{source} sets allow_class_path: widening the trusted namespaces is only accepted on the command "
            f"line ({FLAG}) or in {ENV_VAR}, never from a config"
        )
    check_tree(tree, prefixes, source)


def check_args(args: Sequence[str], prefixes: Sequence[str]) -> None:
    """Check config files and inline values on a command line before the parser imports anything."""
    args = list(args)
    for i, arg in enumerate(args):
        if not isinstance(arg, str) or not arg.startswith("-"):
            continue
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif i + 1 < len(args) and isinstance(args[i + 1], str) and not args[i + 1].startswith("--"):
            key, value = arg, args[i + 1]
        else:
            continue
        name = key.lstrip("-").removesuffix("+")
        if name == "config" or key == "-c":
            path = Path(value)
            if path.is_file():
                _check_yaml(path.read_text(), prefixes, f"config file {str(path)!r}")
            else:  # jsonargparse also takes the config itself as a string
                _check_yaml(value, prefixes, "--config on the command line")
        elif name.endswith("class_path") or name.split(".")[-1] in _CLASS_KEYS:
            if _DOTTED.match(value) and not is_allowed(value, prefixes):
                raise _refuse(value, f"{key} on the command line", prefixes)
            if value.lstrip().startswith(("{", "[")):
                _check_yaml(value, prefixes, f"{key} on the command line")
        elif value.lstrip().startswith("{") and "class_path" in value:
            _check_yaml(value, prefixes, f"{key} on the command line")


@contextlib.contextmanager
def import_policy(prefixes: Sequence[str]) -> Iterator[None]:
    """jsonargparse's import-path policy limited to `prefixes` while the block runs (then as it was).
    Without a jsonargparse that has the policy (< 4.5x), only the checks of this module apply."""
    try:
        from jsonargparse import _common, set_parsing_settings

        saved = (
            dict(_common.parsing_settings["import_path_verdicts"]),
            _common.parsing_settings["import_paths_enforced"],
        )
        set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=list(prefixes))
    except (ImportError, KeyError, TypeError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        _common.parsing_settings["import_path_verdicts"] = saved[0]
        _common.parsing_settings["import_paths_enforced"] = saved[1]
