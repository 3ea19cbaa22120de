"""parallax_lightning uses Lightning, MLflow and jsonargparse through their public APIs only.

The source is read with `ast`; a finding is
- an attribute whose name starts with one underscore, read or written on anything but `self` / `cls` or a
  name this module defines (a library object's private state: `trainer._logger_connector`, `logger._run_id`);
- `getattr` / `setattr` / `hasattr` with such a name as a literal;
- an import of a private module or name from another package (`from jsonargparse import _common`);
- a method with such a name in a class that inherits it from a library class (an override of a private
  hook: LightningCLI._instantiate_trainer, ModelCheckpoint._link_checkpoint);
- `self._name` in such a class where a library base class defines `_name` (its private state or helper).

The exceptions live in the adapters named in ALLOWED, each guarded by its own version check and drift test.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "parallax_lightning"
LIBRARIES = ("lightning", "pytorch_lightning", "lightning_fabric", "mlflow", "jsonargparse", "torchmetrics")

# file (relative to the package) -> functions in it that may use internals; "*" = the whole file.
ALLOWED = {
    "_lightning_compat.py": {"*"},  # fit-loop logging counter, pending step metrics, ModelCheckpoint, FSDP2 sizes
    "class_paths.py": {"_settings_snapshot", "_settings_restore"},  # jsonargparse's settings table (no getter)
}


# namedtuple's public API starts with an underscore (so it cannot clash with field names)
NAMEDTUPLE_API = {"_fields", "_asdict", "_replace", "_make", "_field_defaults"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in NAMEDTUPLE_API


def _module_names(tree: ast.Module) -> set[str]:
    """Names bound at module level to this package's own objects (functions, classes, constants, and modules
    or names imported from parallax_lightning)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("parallax")):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _library_privates(cls: type) -> set[str]:
    """Private names a library base class of `cls` defines: its methods and the attributes its code sets."""
    names: set[str] = set()
    for base in cls.__mro__[1:]:
        if base.__module__.split(".")[0] not in LIBRARIES:
            continue
        names.update(n for n in vars(base) if _private(n))
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        names.update(n for n in re.findall(r"self\.(_\w+)", source) if _private(n))
    return names


class _Finder(ast.NodeVisitor):
    def __init__(self, rel: str, tree: ast.Module, module):
        self.rel = rel
        self.local = _module_names(tree)
        self.module = module
        self.findings: list[str] = []
        self.function: list[str] = []
        self.inherited: list[set[str]] = []  # per enclosing class: private names its library bases define

    def report(self, node: ast.AST, what: str) -> None:
        allowed = ALLOWED.get(self.rel, set())
        if "*" in allowed or any(f in allowed for f in self.function):
            return
        self.findings.append(f"{self.rel}:{node.lineno}: {what}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        cls = getattr(self.module, node.name, None) if not self.function else None
        privates = _library_privates(cls) if isinstance(cls, type) else set()
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in privates:
                self.report(item, f"{node.name}.{item.name} overrides a private member of a library class")
        self.inherited.append(privates)
        self.generic_visit(node)
        self.inherited.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.function.append(node.name)
        self.generic_visit(node)
        self.function.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def check(self, node: ast.AST, owner: ast.expr, name: str, how: str) -> None:
        if not _private(name):
            return
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            if self.inherited and name in self.inherited[-1]:
                self.report(node, f"{how} of self: {name} is a private member of a library base class")
        elif not (isinstance(owner, ast.Name) and owner.id in self.local):
            self.report(node, f"{how}: private attribute {name} of {ast.unparse(owner)}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.check(node, node.value, node.attr, "attribute")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        reflective = isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
        name = node.args[1] if reflective and len(node.args) >= 2 else None
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            self.check(node, node.args[0], name.value, node.func.id)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and not (node.module or "").startswith("parallax"):
            parts = (node.module or "").split(".") + [alias.name for alias in node.names]
            if any(_private(p) for p in parts):
                self.report(node, f"import of a private name: from {node.module} import ...")
        self.generic_visit(node)


def private_uses(package: Path = PACKAGE) -> list[str]:
    findings: list[str] = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        name = "parallax_lightning." + ".".join(path.relative_to(package).with_suffix("").parts)
        module = importlib.import_module(name.removesuffix(".__init__"))
        finder = _Finder(path.relative_to(package).as_posix(), tree, module)
        finder.visit(tree)
        findings += finder.findings
    return findings


def test_parallax_lightning_uses_its_libraries_through_public_apis_only():
    findings = private_uses()
    assert not findings, "private API uses outside the adapters:\n" + "\n".join(findings)


def _private_uses_in(tmp_path, monkeypatch, source: str) -> list:
    """The check run on a package of one module, `source`; importing any module gives what `source` defines."""
    package = tmp_path / "parallax_lightning"
    package.mkdir()
    (package / "probe_module.py").write_text(source)
    namespace: dict = {}
    exec(compile(source, "probe_module", "exec"), namespace)
    monkeypatch.setattr(importlib, "import_module", lambda name: type("M", (), namespace))
    return private_uses(package)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f(trainer):\n    return trainer._logger_connector\n", "private attribute _logger_connector of trainer"),
        ("def f(loop):\n    loop.epoch_loop._batches_that_stepped += 1\n", "_batches_that_stepped"),
        ("def f(logger):\n    return getattr(logger, '_run_id')\n", "getattr: private attribute _run_id of logger"),
        ("from jsonargparse import _common\n", "import of a private name"),
        (
            "from lightning.pytorch.cli import LightningCLI\n"
            "class CLI(LightningCLI):\n    def _instantiate_trainer(self, config, callbacks):\n        return None\n",
            "CLI._instantiate_trainer overrides a private member",
        ),
        (
            "from lightning.pytorch.callbacks import ModelCheckpoint\n"
            "class C(ModelCheckpoint):\n    def f(self):\n        return self._last_global_step_saved\n",
            "_last_global_step_saved is a private member of a library base class",
        ),
    ],
)
def test_the_check_finds_each_kind_of_private_use(tmp_path, monkeypatch, source, expected):
    findings = _private_uses_in(tmp_path, monkeypatch, source)
    assert len(findings) == 1 and expected in findings[0], findings


def test_own_private_names_are_not_findings(tmp_path, monkeypatch):
    source = (
        "_CACHE = {}\n"
        "def _helper():\n    return _CACHE\n"
        "class Thing:\n    def __init__(self):\n        self._x = 1\n    def _own(self):\n        return self._x\n"
    )
    assert _private_uses_in(tmp_path, monkeypatch, source) == []
