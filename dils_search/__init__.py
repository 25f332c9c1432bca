"""dils-search: search a network's depth by growing it with layers that inherit what it knew.

The core (specs, ``build``, ``grow``, ``train``, data) knows nothing of Optuna, Ray or SQL;
``dils_search.search`` adapts it to Optuna (and Ray Tune), ``LineageStore`` keeps the nodes.
Importing this package never imports Ray.
"""

from __future__ import annotations

from .checkpoint import CheckpointError, load, save
from .config import ConfigError, StudyConfig, load_config
from .data import Dataset, load_dataset
from .grow import INIT_METHODS, GrowOptions, GrowthInfo, GrowthStep, check_step, grow, output_gap
from .model import build, count_params, forward_flops
from .spec import ConvSpec, MLPSpec, Spec, spec_from_json
from .store import LineageStore, StoreError
from .train import Recipe, TrainResult, evaluate, train

__all__ = [
    "INIT_METHODS", "CheckpointError", "ConfigError", "ConvSpec", "Dataset", "GrowOptions", "GrowthInfo",
    "GrowthStep", "LineageStore", "MLPSpec", "Recipe", "Spec", "StoreError", "StudyConfig", "TrainResult",
    "build", "check_step", "count_params", "evaluate", "forward_flops", "grow", "load", "load_config",
    "load_dataset", "output_gap", "save", "spec_from_json", "train",
]
__version__ = "0.1.0"
