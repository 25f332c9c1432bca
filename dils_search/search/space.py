"""The search space of growth paths (``GrowthSpace``), its define-by-run sampling and its replay.

``sample_path(trial, space, base)`` suggests, with names that never change between trials (so any
Optuna sampler can learn): ``n_steps`` (when ``max_steps > 1``), then per step ``init_i`` (when
there is more than one init), ``pos_i`` (a relative position in [0, 1] mapped onto the allowed
positions, when there is more than one) and ``width_i`` (when there is more than one width; never
for an init that keeps the incoming width, such as identity). A config's ``[search]`` is a
``GrowthSpace`` too, as its policy narrows it (``Policy.space``), so the CLI, the Ray backend and
the plugin sample alike. ``Replay`` answers the same suggestions from a Ray Tune config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from ..config import check_space
from ..core.inits import init_allowed, init_method
from ..core.spec import GrowthStep, Spec, check_step, stream_widths
from ..errors import InputError

__all__ = ["GrowthSpace", "Suggester", "Replay", "DefineByRun", "sample_path", "positions_on", "check_path"]


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


@dataclass(frozen=True)
class GrowthSpace:
    """Which growth paths a trial may take.

    ``min_steps`` (default 0) to ``max_steps``: how many layers a path inserts; with ``min_steps=0``
    the base itself is a candidate (``n_steps`` = 0), so a study whose insertions all hurt can still
    deliver its base; ``min_steps=1`` makes every trial grow (a config's ``[search]`` does). ``widths``:
    the widths a new layer may have; ``inits``: init method names (``registry.INITS``: dils-analytic,
    dils-approx, identity, zero, random, or one registered by a plugin); ``positions``: ``"any"``
    (anywhere), ``"last"`` (just before the head) or a list of hidden-layer indices. Checked as
    ``[search]`` is (``config.check_space``).
    """

    max_steps: int
    widths: tuple[int, ...] | list[int]
    inits: tuple[str, ...] | list[str] = ("dils-analytic",)
    positions: str | tuple[int, ...] | list[int] = "any"
    min_steps: int = 0

    def __post_init__(self) -> None:
        v = check_space(self.max_steps, self.widths, self.inits, self.positions, min_steps=self.min_steps)
        for name in ("widths", "inits", "positions"):
            object.__setattr__(self, name, v[name] if isinstance(v[name], str) else tuple(v[name]))

    def allowed_positions(self, spec: Spec) -> list[int]:
        """Where a step may go on ``spec``."""
        return positions_on(spec, self.positions)

    def check_base(self, base: Spec) -> None:
        """Refuse positions that allow none on ``base``: every path would be the root alone, again and again."""
        if not self.allowed_positions(base):
            raise InputError(f"positions={self.to_dict()['positions']!r} allows no position on the base "
                             f"(hidden={list(base.hidden)}); allowed: positions up to {len(base.hidden)}")

    def to_dict(self) -> dict[str, Any]:
        return {"min_steps": self.min_steps, "max_steps": self.max_steps, "widths": list(self.widths), "inits": list(self.inits),
                "positions": self.positions if isinstance(self.positions, str) else list(self.positions)}


def draw_steps(trial: Suggester, base: Spec, *, max_steps: int, inits: Sequence[str], widths: Sequence[int],
               positions: Callable[[Spec], list[int]], min_steps: int = 1) -> list[GrowthStep]:
    """Sample a growth path on ``base`` define-by-run; only steps ``check_step`` accepts are produced.
    ``positions(spec)`` lists where a step may go; ``n_steps`` is drawn from ``min_steps..max_steps``
    (0: the base itself is a candidate)."""
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
        else:
            width = trial.suggest_categorical(f"width_{i}", list(widths)) if len(widths) > 1 else widths[0]
        step = GrowthStep(int(position), int(width), str(init))
        steps.append(step)
        spec = step.inserted_into(spec)
    return steps


def sample_path(trial: Suggester, space: GrowthSpace, base: Spec) -> tuple[GrowthStep, ...]:
    """A growth path on ``base`` from ``space``, suggested define-by-run on ``trial``."""
    return tuple(draw_steps(trial, base, max_steps=space.max_steps, inits=space.inits, widths=space.widths,
                            positions=space.allowed_positions, min_steps=space.min_steps))


def check_path(base: Spec, steps: tuple[GrowthStep, ...]) -> Spec:
    """The deepest spec of ``steps`` on ``base``, every step checked (position, init, the documented
    limits) before anything is trained: an ``InputError`` naming the step otherwise."""
    spec = base
    for i, step in enumerate(steps):
        if not isinstance(step, GrowthStep):
            raise InputError(f"path step {step!r} is not a GrowthStep; get paths from tree.suggest(trial, space)")
        try:
            check_step(spec, step)
            spec = step.inserted_into(spec)
        except ValueError as exc:  # SpecError (an InputError) or a limit of the spec
            raise InputError(f"path step {i} ({step.position}:{step.width}:{step.init}): {str(exc).splitlines()[0]}") from None
    return spec


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


class DefineByRun:
    """``OptunaSearch``'s define-by-run space: ``extra(trial)`` (the user's own params), then the
    growth params of ``sample_path``. Picklable when ``extra`` is."""

    def __init__(self, base: Spec, space: GrowthSpace, extra: Callable[[Any], Any] | None = None) -> None:
        self.base, self.space, self.extra = base, space, extra

    def __call__(self, trial: Any) -> None:
        if self.extra is not None:
            self.extra(trial)
        sample_path(trial, self.space, self.base)
