"""Architecture specs: JSON-serialisable descriptions a model is always rebuilt from."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from ..errors import SpecError
from ..registry import FAMILIES, INITS
from . import defaults

if TYPE_CHECKING:
    from .family import Family

__all__ = [
    "ACTIVATIONS", "POOLINGS", "ConvSpec", "GrowthStep", "MLPSpec", "Spec", "check_step",
    "family_of", "forward_flops", "head_in_features", "spec_from_dict", "spec_from_json", "stream_widths", "param_count", "flops_text",
    "MAX_WIDTH", "MAX_DEPTH", "MAX_OUTPUTS", "MAX_PARAMS", "MAX_LOCATIONS",
]

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
POOLINGS = ("avg", "max", "flatten")

# Documented upper limits (README, "Limits"), checked whenever a spec is built, so that a typo, a
# stray label or a hostile checkpoint is refused in one line before anything is allocated or written.
MAX_WIDTH = 65536  # units or channels of one layer, and input features/channels
MAX_DEPTH = 256  # hidden layers
MAX_OUTPUTS = 100_000  # classes or regression outputs
MAX_PARAMS = 100_000_000  # parameters: 400 MB of float32 weights, about 1.6 GB while Adam trains them
MAX_LOCATIONS = 16_777_216  # input positions of a conv spec (4096 x 4096)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> None:
    if not _is_int(value) or value <= 0:  # type: ignore[operator]
        raise SpecError(f"{name}={value!r} must be an integer > 0")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"{name}={value!r} must be true or false")


def _as_list(spec: object, name: str) -> None:
    """Store tuples as lists so that ``from_json(to_json())`` compares equal (frozen dataclass)."""
    value = getattr(spec, name)
    if isinstance(value, tuple):
        object.__setattr__(spec, name, list(value))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_common(hidden: list[int], out_features: int, activation: str) -> None:
    if not isinstance(hidden, list) or not all(_is_int(h) for h in hidden):
        raise SpecError(f"hidden={_short(hidden)} must be a list of integers")
    if len(hidden) > MAX_DEPTH:
        raise SpecError(f"hidden has {len(hidden)} layers; allowed: at most {MAX_DEPTH}")
    bad = [h for h in hidden if h <= 0 or h > MAX_WIDTH]
    if bad:
        raise SpecError(f"hidden={_short(hidden)}: width {bad[0]} is out of range; allowed: 1..{MAX_WIDTH}")
    if not _is_int(out_features) or not 0 < out_features <= MAX_OUTPUTS:
        raise SpecError(f"out_features={out_features!r} is out of range; allowed: 1..{MAX_OUTPUTS}")
    if activation not in ACTIVATIONS:
        raise SpecError(f"activation={activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class MLPSpec:
    """A multilayer perceptron: input -> hidden layers -> linear head.

    With ``residual=True`` hidden layer 0 is a plain stem and every later hidden layer is a
    block ``u + W2 act(W1 u + b1) + b2`` whose inner width is ``hidden[i]``; the residual
    stream keeps width ``hidden[0]``.
    """

    in_features: int
    hidden: list[int]
    out_features: int
    activation: str = "relu"
    residual: bool = False
    kind: Literal["mlp"] = field(default="mlp", init=False)

    def __post_init__(self) -> None:
        _as_list(self, "hidden")
        _check_positive_int("in_features", self.in_features)
        _check_common(self.hidden, self.out_features, self.activation)
        _check_bool("residual", self.residual)
        if self.residual and not self.hidden:
            raise SpecError("residual=True needs at least one hidden layer (the stem)")
        if self.in_features > MAX_WIDTH * 256:
            raise SpecError(f"in_features={self.in_features} is out of range; allowed: 1..{MAX_WIDTH * 256}")
        _check_params(self)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_features,)

    def with_hidden(self, hidden: list[int]) -> MLPSpec:
        return replace(self, hidden=list(hidden))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class ConvSpec:
    """A plain or residual 1-D/2-D CNN with 'same' padding, then pooling and a linear head.

    ``hidden`` lists the channels of each conv layer. Pooling happens once, before the head
    (``avg``/``max`` are global, ``flatten`` keeps every location), so inserting a layer never
    changes spatial sizes.
    """

    dims: int
    in_channels: int
    input_size: list[int]
    hidden: list[int]
    out_features: int
    kernel_size: int = 3
    batchnorm: bool = False
    pooling: str = defaults.POOLING
    residual: bool = False
    activation: str = "relu"
    kind: Literal["conv"] = field(default="conv", init=False)

    def __post_init__(self) -> None:
        _as_list(self, "hidden")
        _as_list(self, "input_size")
        if not _is_int(self.dims) or self.dims not in (1, 2):
            raise SpecError(f"dims={self.dims!r} is not allowed; allowed: 1, 2")
        _check_positive_int("in_channels", self.in_channels)
        size = self.input_size
        if not isinstance(size, list) or len(size) != self.dims or not all(_is_int(s) and s > 0 for s in size):
            raise SpecError(f"input_size={self.input_size!r} must be {self.dims} positive integers")
        _check_bool("batchnorm", self.batchnorm)
        _check_bool("residual", self.residual)
        if not _is_int(self.kernel_size) or self.kernel_size <= 0 or self.kernel_size % 2 == 0:
            raise SpecError(f"kernel_size={self.kernel_size!r} must be a positive odd integer")
        if self.pooling not in POOLINGS:
            raise SpecError(f"pooling={self.pooling!r} is unknown; allowed: {', '.join(POOLINGS)}")
        _check_common(self.hidden, self.out_features, self.activation)
        if self.residual and not self.hidden:
            raise SpecError("residual=True needs at least one hidden layer (the stem)")
        if self.in_channels > MAX_WIDTH or math.prod(size) > MAX_LOCATIONS or self.kernel_size > 63:
            raise SpecError(f"in_channels={self.in_channels}, input_size={size}, kernel_size={self.kernel_size} are "
                             f"out of range; allowed: at most {MAX_WIDTH} channels, {MAX_LOCATIONS} locations, kernel 63")
        _check_params(self)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.input_size)

    def with_hidden(self, hidden: list[int]) -> ConvSpec:
        return replace(self, hidden=list(hidden))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


Spec = MLPSpec | ConvSpec


def spec_from_dict(data: dict[str, Any]) -> Spec:
    """Rebuild a spec from ``to_dict()`` output; refuses unknown kinds or fields."""
    data = dict(data)
    kind = data.pop("kind", None)
    if not isinstance(kind, str) or kind not in FAMILIES:
        raise SpecError(f"spec kind={kind!r} is unknown; allowed: {', '.join(FAMILIES.names())}")
    try:
        return FAMILIES.get(kind).spec_cls(**data)
    except TypeError as exc:
        raise SpecError(f"invalid {kind} spec: {exc}") from None


def spec_from_json(text: str) -> Spec:
    """Rebuild a spec from ``to_json()`` output; anything else raises ``ValueError``."""
    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise SpecError(f"spec JSON is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec JSON must be an object, got {type(data).__name__}")
    return spec_from_dict(data)


# ---------------------------------------------------------------- arithmetic on specs (no torch)


def flops_text(x: float | None, none: str = "-") -> str:
    """``x`` FLOPs as people read them (``13.06 GFLOP``); ``none`` for None."""
    if x is None:
        return none
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} FLOP"


def family_of(spec: Spec) -> Family[Any]:
    """The :class:`~dils_search.core.family.Family` of ``spec``, registered under its ``kind``."""
    return FAMILIES.get(spec.kind)


def param_count(spec: Spec) -> int:
    """Parameters of the model ``spec`` describes (weights and biases; BatchNorm's included)."""
    family = family_of(spec)
    widths = stream_widths(spec)
    taps = family.taps(spec)
    total = 0
    for i, h in enumerate(spec.hidden):
        total += widths[i] * h * taps + h
        if spec.residual and i > 0:
            total += h * widths[i] * taps + widths[i]
        total += family.norm_params(spec, h)
    return total + head_in_features(spec) * spec.out_features + spec.out_features


def _check_params(spec: Spec) -> None:
    n = param_count(spec)
    if n > MAX_PARAMS:
        raise SpecError(f"hidden={_short(spec.hidden)} gives {n:,} parameters; allowed: at most {MAX_PARAMS:,} "
                         f"(about {16 * n / 2**30:.1f} GiB to train with Adam)")


def stream_widths(spec: Spec) -> list[int]:
    """Width of the representation entering each position 0..len(hidden)."""
    widths = [family_of(spec).in_width(spec)]
    for i, h in enumerate(spec.hidden):
        widths.append(widths[-1] if (spec.residual and i > 0) else h)
    return widths


def head_in_features(spec: Spec) -> int:
    c = stream_widths(spec)[-1]
    family = family_of(spec)
    return c * family.locations(spec) if family.pooling(spec) == "flatten" else c


def forward_flops(spec: Spec) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward pass of one sample, plus three per output of a
    plain hidden layer for its ``scale`` and ``offset`` (``core/model.Dense``)."""
    family = family_of(spec)
    widths = stream_widths(spec)
    locations = family.locations(spec)
    per = family.taps(spec) * locations  # MACs per (input, output) pair
    total = 0
    for i, h in enumerate(spec.hidden):
        residual = spec.residual and i > 0
        total += 2 * widths[i] * h * per * (2 if residual else 1) + (0 if residual else 3 * h * locations)
    total += 2 * head_in_features(spec) * spec.out_features
    return total


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class GrowthStep:
    """One insertion: the new layer becomes hidden layer ``position`` with ``width`` units."""

    position: int
    width: int
    init: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> GrowthStep:
        return GrowthStep(int(data["position"]), int(data["width"]), str(data["init"]))

    def inserted_into(self, spec: Spec) -> Spec:
        """``spec`` with this step's layer inserted (the spec of the grown network)."""
        return spec.with_hidden([*spec.hidden[: self.position], self.width, *spec.hidden[self.position :]])


def check_step(spec: Spec, step: GrowthStep) -> None:
    """Raise ``ValueError`` naming the value and what is allowed if ``step`` is impossible on ``spec``."""
    n = len(spec.hidden)
    if not isinstance(step.init, str) or step.init not in INITS:
        raise SpecError(f"init={step.init!r} is unknown; allowed: {', '.join(INITS.names())}")
    low = 1 if spec.residual else 0
    if isinstance(step.position, bool) or not isinstance(step.position, int) or not low <= step.position <= n:
        extra = " (hidden layer 0 of a residual spec is its stem)" if spec.residual and step.position == 0 else ""
        raise SpecError(f"position={step.position!r} is out of range{extra}; allowed: {low}..{n} for hidden={spec.hidden}")
    if isinstance(step.width, bool) or not isinstance(step.width, int) or step.width <= 0:
        raise SpecError(f"width={step.width!r} must be an integer > 0")
    rule = getattr(INITS.get(step.init), "check", None)  # the method's own rules (core/inits.py), if any
    if rule is not None:
        rule(spec, step)


# Convenience so that ``MLPSpec.from_json`` / ``ConvSpec.from_json`` read naturally.
MLPSpec.from_json = staticmethod(spec_from_json)  # type: ignore[attr-defined]
ConvSpec.from_json = staticmethod(spec_from_json)  # type: ignore[attr-defined]
