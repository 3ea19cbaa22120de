"""parallax_muon: a standalone Muon optimizer (Newton–Schulz orthogonalization). Depends on torch only.

    from parallax_muon import Muon, muon_param_groups
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=3e-4)

Triton (the CUDA fast path) is imported lazily, only when a CUDA step needs it.
"""

from parallax_muon.diagnostics import qk_clip, stable_rank
from parallax_muon.newton_schulz import JORDAN, POLAR_EXPRESS, newton_schulz, resolve_coefficients
from parallax_muon.optimizer import Muon
from parallax_muon.param_groups import muon_param_groups, routing_summary

__all__ = [
    "JORDAN",
    "POLAR_EXPRESS",
    "Muon",
    "muon_param_groups",
    "newton_schulz",
    "qk_clip",
    "resolve_coefficients",
    "routing_summary",
    "stable_rank",
]
