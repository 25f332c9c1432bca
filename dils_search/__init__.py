"""dils-search: search a network's depth by growing it with layers that inherit what it knew.

The core (specs, ``build``, ``grow``, ``train``, data) knows nothing of Optuna, Ray or SQL;
``dils_search.search`` adapts it to Optuna (and Ray Tune), ``LineageStore`` keeps the nodes.
Importing this package never imports Ray.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

# name -> module; imported on first use, so `import dils_search` (and `dils-search ls`/`show`) does
# not import torch until something needs it (specs, steps and their FLOPs never do)
_EXPORTS = {
    "CheckpointError": "checkpoint", "load": "checkpoint", "save": "checkpoint",
    "ConfigError": "config", "StudyConfig": "config", "load_config": "config",
    "Dataset": "data", "load_dataset": "data",
    "GrowOptions": "grow", "GrowthInfo": "grow", "grow": "grow", "output_gap": "grow",
    "build": "model", "count_params": "model",
    "INIT_METHODS": "spec", "ConvSpec": "spec", "GrowthStep": "spec", "MLPSpec": "spec", "Spec": "spec",
    "check_step": "spec", "forward_flops": "spec", "spec_from_json": "spec",
    "LineageStore": "store", "StoreError": "store",
    "Recipe": "train", "TrainResult": "train", "evaluate": "train", "train": "train",
    "DilsError": "errors", "InputError": "errors", "DataError": "errors", "SpecError": "errors",
    "TrainingDiverged": "errors", "MissingDependency": "errors",
}

if TYPE_CHECKING:
    from .checkpoint import CheckpointError, load, save
    from .config import ConfigError, StudyConfig, load_config
    from .data import Dataset, load_dataset
    from .errors import DataError, DilsError, InputError, MissingDependency, SpecError, TrainingDiverged
    from .grow import GrowOptions, GrowthInfo, grow, output_gap
    from .model import build, count_params
    from .spec import INIT_METHODS, ConvSpec, GrowthStep, MLPSpec, Spec, check_step, forward_flops, spec_from_json
    from .store import LineageStore, StoreError
    from .train import Recipe, TrainResult, evaluate, train


class _Package(types.ModuleType):
    """``dils_search.grow`` and ``dils_search.train`` are the functions, as the docs say, even after
    Python binds the submodules of the same names onto the package when they are imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("grow", "train") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "INIT_METHODS", "CheckpointError", "ConfigError", "ConvSpec", "DataError", "Dataset", "DilsError", "GrowOptions",
    "GrowthInfo", "InputError", "MissingDependency", "SpecError", "TrainingDiverged",
    "GrowthStep", "LineageStore", "MLPSpec", "Recipe", "Spec", "StoreError", "StudyConfig", "TrainResult",
    "build", "check_step", "count_params", "evaluate", "forward_flops", "grow", "load", "load_config",
    "load_dataset", "output_gap", "save", "spec_from_json", "train",
]
__version__ = "0.1.0"
