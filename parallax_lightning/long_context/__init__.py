"""Long-context experiments: multi-query associative recall (MQAR), passkey retrieval, and per-position loss
beyond the training length. Each is a DataModule / LightningModule / callback driven by the platform's CLI:

    python -m parallax_lightning fit --config experiments/long_context/mqar_cpu.yaml
    python -m parallax_lightning fit --config experiments/long_context/passkey.yaml

Names load on first use, so importing the package costs nothing until a piece is needed.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "MQARSetting": ".mqar",
    "mqar_examples": ".mqar",
    "check_mqar": ".mqar",
    "MQARDataModule": ".mqar",
    "MQARModule": ".mqar",
    "PasskeyTask": ".passkey",
    "PasskeyDataModule": ".passkey",
    "PasskeyEval": ".passkey",
    "per_position_loss": ".positional",
    "document_windows": ".positional",
    "PerPositionLoss": ".positional",
    "beyond_max_seq_len": ".length_guard",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
