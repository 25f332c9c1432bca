"""The search layer: the GrowthTree engine and its adapters onto Optuna (and, optionally, Ray Tune).

Names are imported on first use, so ``dils_search.search.storage`` (``dils-search ls``) loads
without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GrowthPath": "paths", "Task": "trainers", "make_task": "trainers", "PathOutcome": "follow",
    "POLICY_REGISTRY": "policies", "Policy": "policies", "make_policy": "policies",
    "GrowthPruner": "study", "create_study": "study", "load_study": "study", "optimize": "study",
    "resume_study": "study", "run_study": "study",
    "StudySummary": "summary", "summarize": "summary",
    "GrowthTree": "tree", "GrowthSpace": "tree", "TreeNode": "tree",
}

if TYPE_CHECKING:
    from .follow import PathOutcome
    from .paths import GrowthPath
    from .policies import POLICY_REGISTRY, Policy, make_policy
    from .study import GrowthPruner, create_study, load_study, optimize, resume_study, run_study
    from .summary import StudySummary, summarize
    from .trainers import Task, make_task
    from .tree import GrowthSpace, GrowthTree, TreeNode

__all__ = [
    "GrowthPath", "GrowthSpace", "GrowthTree", "TreeNode", "GrowthPruner", "POLICY_REGISTRY", "Policy", "StudySummary", "Task", "create_study",
    "load_study", "make_policy", "make_task", "optimize", "resume_study", "PathOutcome", "run_study", "summarize",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
