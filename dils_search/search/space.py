"""The define-by-run search space of growth paths.

Parameter names and ranges never change between trials, so that TPE can learn:
``n_steps``, then per step ``init_i`` (categorical), ``pos_i`` (a relative position in
[0, 1] mapped to an allowed index) and ``width_i`` (categorical; identity has no width,
since it must keep the incoming width).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..config import StudyConfig
from ..core.grow import GrowthStep, allowed_inits
from ..core.model import stream_widths
from ..core.spec import Spec

__all__ = ["Suggester", "sample_steps", "allowed_positions"]


class Suggester(Protocol):
    def suggest_int(self, name: str, low: int, high: int) -> int: ...
    def suggest_float(self, name: str, low: float, high: float) -> float: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def allowed_positions(cfg: StudyConfig, spec: Spec) -> list[int]:
    n = len(spec.hidden)
    low = 1 if spec.residual else 0
    if cfg.search.positions == "last" or cfg.search.policy == "stack":
        return [n]
    if cfg.search.positions == "any":
        return list(range(low, n + 1))
    listed = [int(p) for p in cfg.search.positions]
    return [p for p in listed if low <= p <= n]


def _pick(positions: list[int], rel: float) -> int:
    return positions[min(int(rel * len(positions)), len(positions) - 1)]


def sample_steps(trial: Suggester, cfg: StudyConfig, base: Spec) -> list[GrowthStep]:
    """Sample a growth path on ``base`` define-by-run; only steps ``check_step`` accepts are produced."""
    s = cfg.search
    n_steps = trial.suggest_int("n_steps", 1, s.max_steps) if s.max_steps > 1 else 1
    spec = base
    steps: list[GrowthStep] = []
    for i in range(n_steps):
        init = trial.suggest_categorical(f"init_{i}", list(s.inits)) if len(s.inits) > 1 else s.inits[0]
        positions = allowed_positions(cfg, spec)
        if init == "identity":
            positions = [p for p in positions if "identity" in allowed_inits(spec, p)]
        if not positions:  # e.g. identity where only position 0 is allowed: stop the path here
            break
        rel = trial.suggest_float(f"pos_{i}", 0.0, 1.0) if len(positions) > 1 else 0.0
        position = _pick(positions, rel)
        if init == "identity":
            width = stream_widths(spec)[position]
        elif s.policy == "stack" and s.stack_width:
            width = s.stack_width
        else:
            width = trial.suggest_categorical(f"width_{i}", list(s.widths)) if len(s.widths) > 1 else s.widths[0]
        step = GrowthStep(position, int(width), str(init))
        steps.append(step)
        spec = step.inserted_into(spec)
    return steps
