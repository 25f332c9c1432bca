"""The define-by-run search space of growth paths.

Parameter names and ranges never change between trials, so that TPE can learn:
``n_steps``, then per step ``init_i`` (categorical), ``pos_i`` (a relative position in
[0, 1] mapped to an allowed index) and ``width_i`` (categorical; identity has no width,
since it must keep the incoming width).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..config import StudyConfig
from ..core.inits import init_allowed, init_method
from ..core.spec import GrowthStep, Spec, stream_widths
from ..registry import POLICIES

__all__ = ["Suggester", "sample_steps", "allowed_positions"]


class Suggester(Protocol):
    def suggest_int(self, name: str, low: int, high: int) -> int: ...
    def suggest_float(self, name: str, low: float, high: float) -> float: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def allowed_positions(cfg: StudyConfig, spec: Spec) -> list[int]:
    """Where a step may go on ``spec``: the config's ``search.positions``, as the policy narrows them."""
    n = len(spec.hidden)
    low = 1 if spec.residual else 0
    if cfg.search.positions == "last":
        out = [n]
    elif cfg.search.positions == "any":
        out = list(range(low, n + 1))
    else:
        out = [p for p in (int(p) for p in cfg.search.positions) if low <= p <= n]
    return list(POLICIES.get(cfg.search.policy).positions(cfg, spec, out))


def _pick(positions: list[int], rel: float) -> int:
    return positions[min(int(rel * len(positions)), len(positions) - 1)]


def sample_steps(trial: Suggester, cfg: StudyConfig, base: Spec) -> list[GrowthStep]:
    """Sample a growth path on ``base`` define-by-run; only steps ``check_step`` accepts are produced."""
    s = cfg.search
    fixed = POLICIES.get(s.policy).fixed_width(cfg)  # e.g. stack's search.stack_width
    n_steps = trial.suggest_int("n_steps", 1, s.max_steps) if s.max_steps > 1 else 1
    spec = base
    steps: list[GrowthStep] = []
    for i in range(n_steps):
        init = trial.suggest_categorical(f"init_{i}", list(s.inits)) if len(s.inits) > 1 else s.inits[0]
        positions = [p for p in allowed_positions(cfg, spec) if init_allowed(spec, p, init)]
        if not positions:  # e.g. identity where only position 0 is allowed: stop the path here
            break
        rel = trial.suggest_float(f"pos_{i}", 0.0, 1.0) if len(positions) > 1 else 0.0
        position = _pick(positions, rel)
        if init_method(init).same_width:  # identity keeps the incoming width: no width is sampled
            width = stream_widths(spec)[position]
        elif fixed:
            width = fixed
        else:
            width = trial.suggest_categorical(f"width_{i}", list(s.widths)) if len(s.widths) > 1 else s.widths[0]
        step = GrowthStep(position, int(width), str(init))
        steps.append(step)
        spec = step.inserted_into(spec)
    return steps
