"""parallax_lightning: the Lightning + MLflow experiment platform for Parallax models.

    python -m parallax_lightning fit --config experiments/quickstart.yaml

`LanguageModelModule` and the DataModules import lightning; they load on first use, so that the pure
torch parts (`parallax_lightning.model`) stay light to import.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LanguageModelModule": ".lm_module",
    "ParallaxCLI": ".cli",
    "ParallaxMLFlowLogger": ".tracking",
    "TextDataModule": ".data",
    "TokenShardDataModule": ".data",
    "TokenDataModule": ".data",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
