"""Init methods as the registry (``registry.INITS``) holds them: what each needs of a spec, and the
one call every init method answers.

An init method is a function ``fn(ctx: InitContext) -> None`` (the :class:`InitFn` protocol) that
sets the weights of ``ctx.block``, the layer just inserted into ``ctx.model``, and says how in
``ctx.basis``. A registry entry is an :class:`InitMethod` (the function and its rules) or such a
function alone, which is taken to apply to any spec at any width::

    from dils_search.core.inits import InitContext
    from dils_search.registry import INITS

    @INITS.register("small-random")
    def small_random(ctx: InitContext) -> None:
        with torch.no_grad():
            for p in ctx.block.parameters():
                p.mul_(0.01)
        ctx.basis = "scaled-kaiming"

The built-ins' rules live here so that checking a step or a config never imports torch; their weight
code lives in ``core/grow.py`` and is imported on first use.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import SpecError
from ..registry import INITS
from .spec import GrowthStep, Spec, check_step, stream_widths

if TYPE_CHECKING:  # torch is imported only where weights are set (core/grow.py)
    import torch

    from .grow import GrowOptions
    from .model import GrowableNet

__all__ = ["InitMethod", "InitContext", "InitFn", "init_method", "init_allowed", "allowed_inits", "refusal",
           "step_width"]


@dataclass
class InitContext:
    """What an init method is given (``grow`` builds it), and what it reports back.

    ``model``: the deeper copy being built (its ``spec`` already has the new layer); ``block``: the
    inserted hidden block, randomly initialised; ``step``: the insertion (``position``, ``width``,
    ``init``); ``inputs``: the features entering the new block on the calibration data; ``target``:
    the pre-activation of the layer after it before the insertion (what an exact method reproduces;
    None for a residual spec, whose new block must output zero); ``options``: the ``GrowOptions``.
    The method sets ``basis`` (how it chose the weights) and, if it fitted by gradient descent,
    ``approx_epochs``; the parent model is never touched.
    """

    model: GrowableNet
    block: Any  # the inserted hidden block: a Dense or Residual nn.Module (core/model.py)
    step: GrowthStep
    inputs: torch.Tensor
    target: torch.Tensor | None
    options: GrowOptions
    basis: str = ""
    approx_epochs: int = 0

    @property
    def position(self) -> int:
        return self.step.position


class InitFn(Protocol):
    """An init method: sets the new block's weights from ``ctx`` (and ``ctx.basis``); returns nothing."""

    def __call__(self, ctx: InitContext) -> None: ...


@dataclass(frozen=True)
class InitMethod:
    """One init method.

    ``apply``: the ``InitFn`` that sets the new layer's weights, or its ``"module:attribute"`` name.
    ``check(spec, step)``: raises ``SpecError`` (one line naming the value and what to use instead)
    when the method cannot insert ``step`` into ``spec``; None means it applies everywhere.
    ``same_width``: the new layer must keep the width entering it (the search never samples a width).
    """

    apply: InitFn | str
    check: Callable[[Spec, GrowthStep], None] | None = None
    same_width: bool = False

    def function(self) -> InitFn:
        """``apply``, imported if it is a name."""
        fn = pkgutil.resolve_name(self.apply) if isinstance(self.apply, str) else self.apply
        return fn  # type: ignore[no-any-return]


def init_method(name: Any, field: str = "init") -> InitMethod:
    """The registered init method ``name`` (a plain function becomes an ``InitMethod`` without rules)."""
    obj = INITS.get(name, field)
    return obj if isinstance(obj, InitMethod) else InitMethod(obj)


def step_width(spec: Spec, position: int, init: str, width: int) -> int:
    """``width``, or the width entering ``position`` for an init that must keep it (identity)."""
    return stream_widths(spec)[position] if init_method(init).same_width else width


def init_allowed(spec: Spec, position: int, init: str, width: int | None = None) -> bool:
    """Whether ``check_step`` accepts ``init`` at ``position`` (at ``width``, or the incoming width)."""
    w = stream_widths(spec)[position] if width is None else step_width(spec, position, init, width)
    try:
        check_step(spec, GrowthStep(position, w, init))
    except ValueError:
        return False
    return True


def refusal(spec: Spec, init: str, width: int) -> str | None:
    """Why ``init`` fits at no position of ``spec`` (``check_step``'s message at the last one), or None if it fits."""
    error = None
    for position in range(1 if spec.residual else 0, len(spec.hidden) + 1):
        try:
            check_step(spec, GrowthStep(position, step_width(spec, position, init, width), init))
            return None
        except ValueError as exc:
            error = str(exc)
    return error


def allowed_inits(spec: Spec, position: int, width: int | None = None) -> list[str]:
    """Registered init methods that ``check_step`` accepts at ``position`` (identity at its forced width)."""
    return [init for init in INITS.names() if init_allowed(spec, position, init, width)]


# ---------------------------------------------------------------- the built-ins' rules


def _zero_check(spec: Spec, step: GrowthStep) -> None:
    if not spec.residual:
        raise SpecError("init='zero' needs a residual spec (residual=true); use dils-analytic or identity")


def _identity_check(spec: Spec, step: GrowthStep) -> None:
    if spec.residual:
        raise SpecError("init='identity' needs a plain spec; use zero for residual specs")
    if spec.activation != "relu":
        raise SpecError(f"init='identity' is not exact with activation={spec.activation!r} (act(u) != u); use dils-analytic")
    if step.position == 0:
        raise SpecError("init='identity' is not exact at position 0 (inputs are signed); use dils-analytic")
    d = stream_widths(spec)[step.position]  # the width entering the new layer
    if step.width != d:
        raise SpecError(f"identity needs width == {d} after a ReLU layer, got width={step.width}; use dils-analytic")


DILS_ANALYTIC = InitMethod("dils_search.core.grow:_init_analytic")
DILS_APPROX = InitMethod("dils_search.core.grow:_init_approx")
IDENTITY = InitMethod("dils_search.core.grow:_init_identity", _identity_check, same_width=True)
ZERO = InitMethod("dils_search.core.grow:_init_zero", _zero_check)
RANDOM = InitMethod("dils_search.core.grow:_init_random")
