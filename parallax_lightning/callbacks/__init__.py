"""Callbacks the CLI registers (each configurable under its own key, or listed in `trainer.callbacks`), one
module per concern (monitors.py, diagnostics.py, checkpointing.py); configs name them here, e.g.
`parallax_lightning.callbacks.ParallaxCheckpoint`:

- `SpeedMonitor`: tokens/s, step time and MFU (model FLOPs utilisation: FLOPs per token counted by hand,
  attention included, over the device's dense peak from Lightning's table, a small addition, or a configured
  peak), computed with Lightning's `Throughput`.
- `TrainingMetrics`: gradient norm, tokens trained on so far, and the optimizer's per-group update RMS.
- `LRMonitor`: Lightning's LearningRateMonitor (learning rate, momentum, weight decay per parameter group),
  logged when the optimizer steps.
- `ParallaxDiagnostics`: every N steps, per layer, the correction-to-output ratio ‖Cov·r‖/‖v̄‖, mean ‖r‖ and
  the stable ranks of W_R, W_Q, W_K (the paper's evidence for the Muon codesign), plus a figure at the end.
- `LossCurves`: a figure of the train / validation loss of the whole run (resumed sessions included).
- `ParallaxCheckpoint`: ModelCheckpoint that also saves `last` when training ends between two periodic saves,
  and on SIGTERM or SIGINT saves it and exits with 128 + the signal number (`TrainingInterrupted`).
"""

from .checkpointing import ParallaxCheckpoint, TrainingInterrupted
from .diagnostics import LossCurves, ParallaxDiagnostics, save_figure
from .monitors import LRMonitor, SpeedMonitor, TrainingMetrics, peak_flops_for

__all__ = [
    "LRMonitor",
    "LossCurves",
    "ParallaxCheckpoint",
    "ParallaxDiagnostics",
    "SpeedMonitor",
    "TrainingInterrupted",
    "TrainingMetrics",
    "peak_flops_for",
    "save_figure",
]
