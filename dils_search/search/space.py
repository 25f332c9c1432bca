"""The define-by-run search space of growth paths.

Parameter names and ranges never change between trials, so that TPE can learn:
``n_steps``, then per step ``init_i`` (categorical), ``pos_i`` (a relative position in
[0, 1] mapped to an allowed index) and ``width_i`` (categorical; identity has no width,
since it must keep the incoming width).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from ..config import StudyConfig
from ..core.inits import init_allowed, init_method
from ..core.spec import GrowthStep, Spec, stream_widths
from ..errors import InputError
from ..registry import POLICIES

__all__ = ["Suggester", "Replay", "draw_steps", "sample_steps", "allowed_positions", "positions_on"]


class Suggester(Protocol):
    def suggest_int(self, name: str, low: int, high: int) -> int: ...
    def suggest_float(self, name: str, low: float, high: float) -> float: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def positions_on(spec: Spec, positions: str | Sequence[int]) -> list[int]:
    """The insertion positions ``positions`` ("any", "last" or a list) name on ``spec``."""
    n = len(spec.hidden)
    low = 1 if spec.residual else 0
    if positions == "last":
        return [n]
    if positions == "any":
        return list(range(low, n + 1))
    return [p for p in (int(p) for p in positions) if low <= p <= n]


def allowed_positions(cfg: StudyConfig, spec: Spec) -> list[int]:
    """Where a step may go on ``spec``: the config's ``search.positions``, as the policy narrows them."""
    out = positions_on(spec, cfg.search.positions)
    return list(POLICIES.get(cfg.search.policy).positions(cfg, spec, out))


def draw_steps(trial: Suggester, base: Spec, *, max_steps: int, inits: Sequence[str], widths: Sequence[int],
               positions: Callable[[Spec], list[int]], fixed_width: int = 0, min_steps: int = 1) -> list[GrowthStep]:
    """Sample a growth path on ``base`` define-by-run; only steps ``check_step`` accepts are produced.
    ``positions(spec)`` lists where a step may go; ``fixed_width`` (when set) replaces ``width_i``;
    ``n_steps`` is drawn from ``min_steps..max_steps`` (0: the base itself is a candidate)."""
    n_steps = trial.suggest_int("n_steps", min_steps, max_steps) if max_steps > min_steps else max_steps
    spec = base
    steps: list[GrowthStep] = []
    for i in range(n_steps):
        init = trial.suggest_categorical(f"init_{i}", list(inits)) if len(inits) > 1 else inits[0]
        allowed = [p for p in positions(spec) if init_allowed(spec, p, init)]
        if not allowed:  # e.g. identity where only position 0 is allowed: stop the path here
            break
        rel = trial.suggest_float(f"pos_{i}", 0.0, 1.0) if len(allowed) > 1 else 0.0
        position = allowed[min(int(rel * len(allowed)), len(allowed) - 1)]
        if init_method(init).same_width:  # identity keeps the incoming width: no width is sampled
            width = stream_widths(spec)[position]
        elif fixed_width:
            width = fixed_width
        else:
            width = trial.suggest_categorical(f"width_{i}", list(widths)) if len(widths) > 1 else widths[0]
        step = GrowthStep(int(position), int(width), str(init))
        steps.append(step)
        spec = step.inserted_into(spec)
    return steps


def sample_steps(trial: Suggester, cfg: StudyConfig, base: Spec) -> list[GrowthStep]:
    """The config's growth path on ``base`` (``draw_steps`` with ``[search]`` and the policy's narrowing)."""
    s = cfg.search
    return draw_steps(trial, base, max_steps=s.max_steps, inits=s.inits, widths=s.widths,
                      positions=lambda spec: allowed_positions(cfg, spec),
                      fixed_width=POLICIES.get(s.policy).fixed_width(cfg))  # e.g. stack's search.stack_width


class Replay:
    """A ``Suggester`` that answers from recorded params (a Ray Tune config) and notes each distribution.

    Replaying the define-by-run space on a Tune config rebuilds the exact path, params and
    distributions that the space produced, so the Optuna trials stored from Ray match the Optuna
    backend's.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.distributions: dict[str, BaseDistribution] = {}

    def _value(self, name: str) -> Any:
        if name not in self.params:
            raise InputError(f"trial config has no parameter {name!r}; it was not sampled by this search space "
                             "(for a GrowthTree, search with tree.search_space(space))")
        return self.params[name]

    def suggest_int(self, name: str, low: int, high: int) -> int:
        self.distributions[name] = IntDistribution(low, high)
        return int(self._value(name))

    def suggest_float(self, name: str, low: float, high: float) -> float:
        self.distributions[name] = FloatDistribution(low, high)
        return float(self._value(name))

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        self.distributions[name] = CategoricalDistribution(list(choices))
        return self._value(name)
