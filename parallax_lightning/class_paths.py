"""Which `class_path` values a config may name, and what else a config may not do.

A config names the platform's components and nothing more: the classes under `TRUSTED_PREFIXES` (this
platform's models, data modules, callbacks and logger, and Lightning's callbacks, loggers, strategies,
plugins, profilers and accelerators), unless the user widens the list on the command line
(`--allow_class_path PREFIX`, comma-separated or repeated) or in the environment
(`PARALLAX_ALLOW_CLASS_PATHS=PREFIX,...`). A config file cannot widen it. Not `torch` as a whole: some torch
classes start processes or open sockets when constructed (torch.distributed.elastic's SubprocessHandler runs
a command), and no config of this platform needs to name one.

Why: jsonargparse imports the module a `class_path` names and instantiates the class with the config's
`init_args`, so a config from someone else could otherwise run any importable code. The checks, in order:

1. over the raw config files and arguments, before anything is parsed: YAML whose anchors and aliases
   expand beyond `MAX_YAML_NODES` (a "billion laughs") is refused without being expanded; every class path
   must be under the trusted prefixes; `${oc.env:NAME}` may not read a secret-looking variable (its value
   would be stored with the run); a config may not set `allow_class_path`.
2. inside jsonargparse while it parses: its import-path policy limited to the same prefixes (it also sees
   shorthands such as `--trainer.logger=pkg.Logger` and where an object is really defined), and subclass
   specs in values typed `Any` are never instantiated.
3. over the parsed config, before any class is built (`check_free_form`): a `class_path` inside a value
   whose type accepts anything (`Any`, `object`, `dict[str, Any]`, e.g. the logger's `tags`) is refused:
   such values are plain data.

One file: the three checks apply one trust list and one policy, and a reader auditing what a config may
build should find all of it in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import inspect
import os
import re
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .redaction import secret_env_name

# What the platform's configs name (experiments/, the CLI's defaults and typed fields). Lightning's plugins
# are defined under lightning.fabric.plugins and re-exported by lightning.pytorch.plugins; jsonargparse checks
# both names. The top-level names of parallax_lightning are its lazy re-exports of the classes below.
_LIGHTNING_COMPONENTS = ("callbacks", "loggers", "strategies", "plugins", "profilers", "accelerators")
TRUSTED_PREFIXES = (
    "parallax_lightning.LanguageModelModule",
    "parallax_lightning.ParallaxMLFlowLogger",
    "parallax_lightning.TextDataModule",
    "parallax_lightning.TokenShardDataModule",
    "parallax_lightning.TokenDataModule",
    "parallax_lightning.lm_module",
    "parallax_lightning.data",
    "parallax_lightning.long_context",
    "parallax_lightning.callbacks",
    "parallax_lightning.tracking.ParallaxMLFlowLogger",
    "parallax_lightning.checkpoint_io.AtomicCheckpointIO",
    "parallax_lightning.strategies.FSDP2Strategy",
    *(f"lightning.pytorch.{c}" for c in _LIGHTNING_COMPONENTS),
    *(f"pytorch_lightning.{c}" for c in _LIGHTNING_COMPONENTS),
    "lightning.fabric.plugins",
    "lightning_fabric.plugins",
)
MAX_YAML_NODES = 100_000
ENV_VAR = "PARALLAX_ALLOW_CLASS_PATHS"
FLAG = "--allow_class_path"

# Config keys whose plain string value is itself a class path (jsonargparse's shorthand for subclass types).
_CLASS_KEYS = {"model", "data", "logger", "callbacks", "plugins", "strategy", "profiler", "accelerator"}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


class ConfigRefused(ValueError):
    """A config or command line that the platform refuses to run, with the reason and the key named."""


class ClassPathNotAllowed(ConfigRefused):
    """A config names a class outside the trusted namespaces, or a class where only data is accepted."""


class SecretInConfig(ConfigRefused):
    """A config reads a secret-looking environment variable into values that are stored with the run."""


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
    module = class_path.rsplit(".", 1)[0]
    extra = [p for p in prefixes if p not in TRUSTED_PREFIXES]
    return ClassPathNotAllowed(
        f"class_path {class_path!r} ({where}) is not among the classes a config may name (this platform's "
        "models, data modules, callbacks and logger, and Lightning's callbacks, loggers, strategies, plugins, "
        f"profilers and accelerators: SECURITY.md lists them{'; also ' + ', '.join(extra) if extra else ''}): "
        f"loading it would import and run that code. If you wrote or trust it, pass {FLAG} {module} on the "
        f"command line or set {ENV_VAR}={module}"
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


class ConfigTooLarge(ConfigRefused):
    """A YAML config whose anchors and aliases expand into too many nodes (or into itself)."""


def _expanded_nodes(root: yaml.Node, source: str, limit: int = MAX_YAML_NODES) -> int:
    """How many nodes the YAML graph `root` becomes once aliases are expanded, computed once per distinct
    node (an alias is the same node object again), so a billion laughs costs its size on disk, not 9^9."""
    sizes: dict[int, int] = {}
    pending: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in pending:
            raise ConfigTooLarge(f"{source}: a YAML alias refers to a node that contains it (an endless config)")
        pending.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                raise ConfigTooLarge(
                    f"{source}: the YAML expands to more than {limit} nodes through anchors and aliases (&name / "
                    "*name); a config this size is not a training setup. Write the values out, or fewer aliases"
                )
        pending.discard(key)
        sizes[key] = total
        return total

    try:
        return size(root)
    except RecursionError:
        raise ConfigTooLarge(f"{source}: the YAML is nested too deeply to be a config") from None


def load_yaml(text: str, source: str) -> Any:
    """The YAML in `text` as plain data, refused before it is expanded when its aliases blow it up.
    Raises yaml.YAMLError for text that is not YAML."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigTooLarge(f"{source}: the YAML is nested too deeply to be a config") from None
    if root is None:
        return None
    _expanded_nodes(root, source)
    return yaml.safe_load(text)


# ${oc.env:NAME} or ${oc.env:NAME,default}, spaces allowed; NAME up to the first ',' or '}'.
_OC_ENV = re.compile(r"\$\{\s*oc\.env\s*:\s*(?P<name>[^,}]*)")


def check_env_interpolation(value: str, where: str) -> None:
    """Refuse `${oc.env:NAME}` of a secret-looking NAME (or of a NAME computed by another interpolation):
    the value would be stored in the run's parameters, its config.yaml and possibly its name."""
    for match in _OC_ENV.finditer(value):
        name = match["name"].strip()
        if "${" in name:
            raise SecretInConfig(
                f"{where}: {match[0]!r} reads an environment variable whose name is itself interpolated; name the "
                "variable literally, e.g. ${oc.env:DATA_DIR}"
            )
        if secret_env_name(name):
            raise SecretInConfig(
                f"{where}: ${{oc.env:{name}}} would copy a secret-looking environment variable ({name}) into the "
                "run's parameters and config.yaml, which are stored in MLflow. Credentials stay in the "
                "environment: MLflow reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / "
                "MLFLOW_TRACKING_TOKEN itself; other libraries read their own variables"
            )


def _strings(tree: Any, path: str = "", values_only: bool = False) -> Iterator[tuple[str, str]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not values_only:
                yield where, key
            yield from _strings(value, where, values_only)
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            yield from _strings(item, f"{path}[{i}]", values_only)
    elif isinstance(tree, str):
        yield path, tree


def _check_yaml(
    text: str, prefixes: Sequence[str], source: str, base: Path | None = None, seen: set[Path] | None = None
) -> None:
    try:
        tree = load_yaml(text, source)
    except yaml.YAMLError:
        return  # not YAML: the parser reports it
    if isinstance(tree, Mapping) and "allow_class_path" in tree:
        raise ClassPathNotAllowed(
            f"{source} sets allow_class_path: widening the trusted namespaces is only accepted on the command "
            f"line ({FLAG}) or in {ENV_VAR}, never from a config"
        )
    check_config_tree(tree, prefixes, source)
    # jsonargparse reads a section from a file named in its place (`trainer: trainer.yaml`): check those too.
    seen = set() if seen is None else seen
    for where, value in _strings(tree, values_only=True):
        path = _yaml_file(value, base)
        if path is not None and path.resolve() not in seen:
            seen.add(path.resolve())
            _check_yaml(
                path.read_text(), prefixes, f"config file {str(path)!r} (key {where} in {source})", path.parent, seen
            )


def _yaml_file(value: str, base: Path | None) -> Path | None:
    """The YAML file a config value names, if it is one (JSON ones are left out: tokenizer.json is data)."""
    if not value.lower().endswith((".yaml", ".yml")) or "\n" in value:
        return None
    for candidate in ([base / value] if base is not None else []) + [Path(value)]:
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):
            continue
    return None


def check_config_tree(tree: Any, prefixes: Sequence[str], source: str) -> None:
    """The checks of a config that need no parser: trusted class paths, no secret `${oc.env:...}`."""
    check_tree(tree, prefixes, source)
    for where, value in _strings(tree):
        check_env_interpolation(value, f"key {where} in {source}" if where else source)


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
        check_env_interpolation(value, f"{key} on the command line")
        if name == "config" or key == "-c":
            path = Path(value)
            try:
                is_file = path.is_file()
            except (OSError, ValueError):  # a config given inline can be longer than a file name may be
                is_file = False
            if is_file:
                _check_yaml(path.read_text(), prefixes, f"config file {str(path)!r}", path.parent)
            else:  # jsonargparse also takes the config itself as a string
                _check_yaml(value, prefixes, "--config on the command line")
        elif name.endswith("class_path") or name.split(".")[-1] in _CLASS_KEYS:
            if _DOTTED.match(value) and not is_allowed(value, prefixes):
                raise _refuse(value, f"{key} on the command line", prefixes)
            if value.lstrip().startswith(("{", "[")):
                _check_yaml(value, prefixes, f"{key} on the command line")
        elif _yaml_file(value, None) is not None:  # e.g. --trainer trainer.yaml
            path = _yaml_file(value, None)
            _check_yaml(
                path.read_text(), prefixes, f"config file {str(path)!r} ({key} on the command line)", path.parent
            )
        elif value.lstrip().startswith(("{", "[")) or "*" in value:  # inline YAML, aliases included
            _check_yaml(value, prefixes, f"{key} on the command line")


# -- class paths inside free-form values -------------------------------------------------------------------
# Types whose values are data, never a component (paths, times, enums, containers of them).
_DATA_MODULES = {"builtins", "pathlib", "datetime", "typing", "types", "collections", "decimal", "fractions", "uuid"}


def _component_classes(annotation: Any) -> list[type]:
    """The classes a parameter's type accepts as components; none means the value is free-form data."""
    if annotation in (None, Any, object, inspect.Parameter.empty) or isinstance(annotation, (str, typing.TypeVar)):
        return []
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return []
    if origin is not None:  # unions, containers, Annotated, Callable[..., X]: whatever their arguments accept
        args = typing.get_args(annotation)
        if origin is typing.Annotated:
            args = args[:1]
        flat = [a for arg in args for a in (arg if isinstance(arg, list) else [arg])]  # Callable[[A, B], R]
        return [cls for arg in flat for cls in _component_classes(arg)]
    if not isinstance(annotation, type) or issubclass(annotation, enum.Enum):
        return []
    if annotation.__module__.split(".")[0] in _DATA_MODULES:
        return []
    return [annotation]


def _parameter_types(cls: Any) -> dict[str, Any]:
    """Parameter name -> type for a class's constructor, the bases' included (for **kwargs passed on)."""
    if cls is None:
        return {}
    if dataclasses.is_dataclass(cls):
        with contextlib.suppress(Exception):
            return typing.get_type_hints(cls)
        return {}
    types: dict[str, Any] = {}
    for klass in reversed(getattr(cls, "__mro__", ())):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not resolve says nothing: its values count as data
            hints = {name: None for name in getattr(init, "__annotations__", {})}
        types.update(hints)
    return types


def _resolve(class_path: str) -> Any:
    """The class a trusted class path names (jsonargparse has imported it by now), or None."""
    parts = class_path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _class_paths_in_data(node: Any, annotation: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, Mapping):
        class_path = node.get("class_path")
        if isinstance(class_path, str):
            if not _component_classes(annotation):
                yield f"{where}.class_path", class_path
                return
            types = _parameter_types(_resolve(class_path))
            for key, value in (node.get("init_args") or {}).items():
                yield from _class_paths_in_data(value, types.get(key), f"{where}.init_args.{key}")
            for key, value in (node.get("dict_kwargs") or {}).items():
                yield from _class_paths_in_data(value, None, f"{where}.dict_kwargs.{key}")
            return
        classes = _component_classes(annotation)
        fields = next((_parameter_types(c) for c in classes if dataclasses.is_dataclass(c)), None)
        for key, value in node.items():
            if str(key).startswith("__"):  # jsonargparse's bookkeeping (__path__)
                continue
            sub = fields.get(key) if fields is not None else (annotation if classes else None)
            yield from _class_paths_in_data(value, sub, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from _class_paths_in_data(item, annotation, f"{where}[{i}]")


def check_free_form(
    config: Mapping[str, Any], components: Mapping[str, Any], arguments: Mapping[str, type], source: str
) -> None:
    """Refuse a `class_path` anywhere a config's type does not name a component class: inside values typed
    `Any`, `object`, `dict[str, Any]` and the like, which stay plain data. `components` maps top-level keys
    given by class_path (model, data) to their type; `arguments` maps top-level sections of constructor
    arguments (trainer, checkpoint, ...) to their class; any other top-level key is data."""
    for key, value in config.items():
        if key in arguments and isinstance(value, Mapping):
            types = _parameter_types(arguments[key])
            found = (
                hit
                for name, sub in value.items()
                for hit in _class_paths_in_data(sub, types.get(name), f"{key}.{name}")
            )
        else:
            found = _class_paths_in_data(value, components.get(key), str(key))
        for where, class_path in found:
            raise ClassPathNotAllowed(
                f"key {where} in {source} names a class ({class_path!r}) inside a value that is plain data (its type "
                "accepts anything, e.g. dict[str, Any]): such values are never turned into objects, so a config "
                "cannot build a class there. Remove the class_path, or pass the object through a parameter typed "
                "with its class"
            )


@contextlib.contextmanager
def import_policy(prefixes: Sequence[str]) -> Iterator[None]:
    """While the block runs, jsonargparse imports only under `prefixes` and never instantiates a subclass spec
    found in a value typed `Any`; afterwards its settings are as they were.

    jsonargparse has a public setter for these settings but no getter, so the restore reads its settings
    table: that one private access lives here, and tests/lightning/test_safety.py fails if the table changes.
    Without it (another jsonargparse), the settings still apply, for the rest of the process."""
    from jsonargparse import set_parsing_settings

    saved = _settings_snapshot()
    # A jsonargparse older than a setting refuses it (TypeError): the checks of this module still apply.
    with contextlib.suppress(TypeError):
        set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=list(prefixes))
    with contextlib.suppress(TypeError):
        set_parsing_settings(instantiate_subclass_spec_in_any=False)
    try:
        yield
    finally:
        _settings_restore(saved)


_POLICY_SETTINGS = ("import_path_verdicts", "import_paths_enforced", "instantiate_subclass_spec_in_any")
JSONARGPARSE_TESTED = ("4.53", "4.54")  # the settings table was read as below in jsonargparse >= [0], < [1]
_untested_warned: list[str] = []


def _jsonargparse_tested(version: str | None = None) -> bool:
    """Whether jsonargparse's settings table may be read (its version is in JSONARGPARSE_TESTED); warns once
    per process when not: the import policy then stays applied after the CLI returns."""
    from packaging.version import Version

    if version is None:
        import importlib.metadata

        version = importlib.metadata.version("jsonargparse")
    if Version(JSONARGPARSE_TESTED[0]) <= Version(version) < Version(JSONARGPARSE_TESTED[1]):
        return True
    if version not in _untested_warned:
        _untested_warned.append(version)
        warnings.warn(
            f"jsonargparse {version} is outside the versions parallax_lightning reads its settings table with "
            f"(>={JSONARGPARSE_TESTED[0]},<{JSONARGPARSE_TESTED[1]}): the class-path import policy stays applied "
            "for the rest of this process instead of being restored after the CLI returns",
            stacklevel=3,
        )
    return False


def _settings_snapshot() -> dict[str, Any] | None:
    """jsonargparse's current values of the settings import_policy changes (None: another jsonargparse than
    the tested ones, or the table is not where it was)."""
    if not _jsonargparse_tested():
        return None
    try:
        from jsonargparse import _common

        table = _common.parsing_settings
        return {key: (dict(table[key]) if isinstance(table[key], dict) else table[key]) for key in _POLICY_SETTINGS}
    except (ImportError, AttributeError, KeyError, TypeError):
        return None


def _settings_restore(saved: dict[str, Any] | None) -> None:
    if saved is not None:
        from jsonargparse import _common

        _common.parsing_settings.update(saved)
