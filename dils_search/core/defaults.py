"""Defaults that a core dataclass and a config section share, declared once.

``Recipe`` (core/train.py) and ``TrainConfig``, ``GrowOptions`` (core/grow.py) and ``GrowConfig``
take these, so the library and the studies cannot drift apart. This module imports nothing, so
reading a config still never imports torch. Where the two used to differ, the config's default
won, since it is what studies ran with and what their node keys hold: ``APPROX_EPOCHS`` was 200 in
``GrowOptions`` and 100 in ``GrowConfig``; it is 100.

Not shared on purpose: ``TrainConfig.rewarmup_epochs`` (0.5) is the re-warmup after each growth
step, while ``Recipe.rewarmup_epochs`` (0.0) is the one of a single ``train`` call, none unless
asked; ``TrainConfig.patience = 0`` and ``Recipe.patience = None`` both mean no early stopping.
"""

from __future__ import annotations

__all__ = ["OPTIMIZER", "LR", "BATCH_SIZE", "WEIGHT_DECAY", "SCHEDULE", "RIDGE", "APPROX_TOL", "APPROX_EPOCHS",
           "POOLING"]

# training (Recipe, TrainConfig)
OPTIMIZER = "adam"
LR = 1e-3
BATCH_SIZE = 128
WEIGHT_DECAY = 0.0
SCHEDULE = "constant"  # or "cosine": after the re-warmup, the lr decays to 0 by the last step

# inheriting a layer (GrowOptions, GrowConfig)
RIDGE = 1e-7
APPROX_TOL = 1e-3
APPROX_EPOCHS = 100  # the config's; GrowOptions had 200 (see above)

# a conv spec's pooling before its head (ConvSpec, ModelConfig): "max" scored best over the shipped
# image-like tasks (digits 1x8x8 Conv2d, MNIST-1D 1x40 Conv1d; scripts/bench_pooling.py,
# docs/benchmarks.md); it was "avg", which the shipped configs never relied on
POOLING = "max"
