"""dils-search: search a network's depth by growing it with layers that inherit what it knew.

The core (specs, ``build``, ``grow``, ``train``, data) knows nothing of Optuna, Ray or SQL;
``dils_search.search`` adapts it to Optuna (and Ray Tune), ``LineageStore`` keeps the nodes.
Importing this package never imports Ray.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# name -> module; imported on first use, so `import dils_search` (and `dils-search ls`/`show`) does
# not import torch until something needs it (specs, steps and their FLOPs never do)
_EXPORTS = {
    "CheckpointError": "core.checkpoint", "load": "core.checkpoint", "save": "core.checkpoint",
    "export": "core.export", "Predictor": "core.preprocess", "Preprocess": "core.preprocess",
    "ConfigError": "config", "StudyConfig": "config", "load_config": "config",
    "Dataset": "core.data", "load_dataset": "core.data",
    "GrowOptions": "core.grow", "GrowthInfo": "core.grow", "grow": "core.grow", "output_gap": "core.grow",
    "build": "core.model", "count_params": "core.model",
    "ConvSpec": "core.spec", "GrowthStep": "core.spec", "MLPSpec": "core.spec", "Spec": "core.spec",
    "check_step": "core.spec", "forward_flops": "core.spec", "spec_from_json": "core.spec",
    "INITS": "registry", "POLICIES": "registry", "DATASETS": "registry",
    "LineageStore": "store", "StoreError": "store",
    "Recipe": "core.train", "TrainResult": "core.train", "evaluate": "core.train", "train": "core.train",
    "GrowthTree": "search.tree", "GrowthSpace": "search.tree", "TreeNode": "search.tree",
    "DilsError": "errors", "InputError": "errors", "DataError": "errors", "SpecError": "errors",
    "TrainingDiverged": "errors", "MissingDependency": "errors",
}

if TYPE_CHECKING:
    from .config import ConfigError, StudyConfig, load_config
    from .core.checkpoint import CheckpointError, load, save
    from .core.data import Dataset, load_dataset
    from .core.export import export
    from .core.grow import GrowOptions, GrowthInfo, grow, output_gap
    from .core.model import build, count_params
    from .core.preprocess import Predictor, Preprocess
    from .core.spec import ConvSpec, GrowthStep, MLPSpec, Spec, check_step, forward_flops, spec_from_json
    from .core.train import Recipe, TrainResult, evaluate, train
    from .errors import DataError, DilsError, InputError, MissingDependency, SpecError, TrainingDiverged
    from .registry import DATASETS, INITS, POLICIES
    from .search.tree import GrowthSpace, GrowthTree, TreeNode
    from .store import LineageStore, StoreError


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASETS", "INITS", "POLICIES", "CheckpointError", "ConfigError", "ConvSpec", "DataError", "Dataset", "DilsError", "GrowOptions",
    "GrowthInfo", "GrowthSpace", "GrowthTree", "TreeNode", "InputError", "MissingDependency", "SpecError", "TrainingDiverged",
    "GrowthStep", "LineageStore", "MLPSpec", "Recipe", "Spec", "StoreError", "StudyConfig", "TrainResult",
    "Predictor", "Preprocess", "build", "check_step", "count_params", "evaluate", "export", "forward_flops", "grow",
    "load", "load_config",
    "load_dataset", "output_gap", "save", "spec_from_json", "train",
]
__version__ = "0.1.0"
