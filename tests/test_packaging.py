"""The three import packages, their dependency direction, and the names we must never install."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_parallax_muon_needs_torch_only():
    loaded = _modules_after_import("parallax_muon")
    for heavy in (
        "lightning",
        "pytorch_lightning",
        "triton",
        "mlflow",
        "omegaconf",
        "parallax_lightning",
        "parallax_kernels",
    ):
        assert heavy not in loaded, f"importing parallax_muon imported {heavy}"


def test_parallax_kernels_does_not_import_the_platform():
    loaded = _modules_after_import("parallax_kernels")
    for heavy in ("lightning", "pytorch_lightning", "mlflow", "omegaconf", "parallax_lightning", "parallax_muon"):
        assert heavy not in loaded, f"importing parallax_kernels imported {heavy}"


@pytest.mark.parametrize("name", ["kernels", "parallax"])
def test_reserved_top_level_names_are_not_installed(name, tmp_path):
    """`kernels` and `parallax` belong to other PyPI packages (the latter to the paper authors').

    Run from an empty folder, so the repository root is not on sys.path: only what the
    installation provides can be found.
    """
    code = (
        "import importlib.util, sys; import parallax_kernels; "
        f"spec = importlib.util.find_spec({name!r}); "
        "print(spec.origin if spec else 'absent'); print(parallax_kernels.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    found, kernels_file = out.stdout.split()
    assert found == "absent" or "site-packages" in found, f"this project installs a top-level {name!r}: {found}"
    assert kernels_file.endswith("__init__.py")
