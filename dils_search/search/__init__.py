"""The search layer: a thin adapter from growth paths onto Optuna (and, optionally, Ray Tune)."""

from __future__ import annotations

from .paths import GrowthPath, Task, make_task, run_path
from .policies import POLICY_REGISTRY, Policy, make_policy
from .study import GrowthPruner, create_study, load_study, optimize, resume_study, run_study
from .summary import StudySummary, summarize

__all__ = [
    "GrowthPath", "GrowthPruner", "POLICY_REGISTRY", "Policy", "StudySummary", "Task", "create_study",
    "load_study", "make_policy", "make_task", "optimize", "resume_study", "run_path", "run_study", "summarize",
]
