"""Model families: everything that differs between an MLP and a CNN, in one class per family.

A family object knows its spec class and how a config's ``[model]`` section becomes a base spec
(``spec_from_config``); the shape arithmetic the rest of the core is written against (the width
entering the network, weights per input-output pair, positions a layer is applied at, pooling,
BatchNorm parameters); how one hidden layer is built (``make_block`` from ``make_affine`` and
``make_norm``); and which rows dils-analytic tries for a new layer (``candidate_rows``).

Families are registered in :data:`dils_search.registry.FAMILIES` under the name a spec's ``kind``
and a config's ``model.kind`` use; :func:`dils_search.core.spec.family_of` finds a spec's family.
This module imports no torch at import time (reading a config must not), only inside the methods
that build modules.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..errors import SpecError
from .spec import ConvSpec, MLPSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ._bases import Rows

__all__ = ["Family", "MLPFamily", "ConvFamily", "MLP", "CONV"]

S = TypeVar("S")


class Family(Generic[S]):
    """One model family. Subclasses set ``name``/``spec_cls`` and override the hooks below."""

    name: str = ""
    spec_cls: type[Any] = object  # built from a config section by ``spec_from_config`` and from JSON by ``spec_from_dict``

    # ------------------------------------------------------------ config -> spec

    def spec_from_config(self, model: Any, in_features: int, out_features: int, sample_shape: tuple[int, ...] = ()) -> S:
        """The base spec for a config's ``[model]`` section and data with these inputs/outputs
        (``sample_shape``: one input's shape as the data holds it, ``()`` if unknown)."""
        raise NotImplementedError

    # ------------------------------------------------------------ shape arithmetic (no torch)

    def in_width(self, spec: S) -> int:
        """Features or channels entering hidden layer 0."""
        raise NotImplementedError

    def taps(self, spec: S) -> int:
        """Weights per (input, output) pair of one hidden affine map: 1, or the kernel's taps."""
        return 1

    def locations(self, spec: S) -> int:
        """Positions every hidden layer is applied at: 1, or the input's spatial size."""
        return 1

    def pooling(self, spec: S) -> str | None:
        """What the head does before its linear map: None (nothing), ``avg``, ``max`` or ``flatten``."""
        return None

    def norm_params(self, spec: S, width: int) -> int:
        """Parameters of the normalisation after a hidden affine map of ``width`` outputs."""
        return 0

    # ------------------------------------------------------------ modules (torch)

    def make_affine(self, spec: S, cin: int, cout: int) -> nn.Module:
        """A freshly initialised hidden affine map from ``cin`` to ``cout`` features/channels."""
        raise NotImplementedError

    def make_norm(self, spec: S, width: int) -> nn.Module | None:
        """The normalisation after a hidden affine map, or None."""
        return None

    def make_block(self, spec: S, index: int, in_width: int) -> nn.Module:
        """Hidden layer ``index`` of ``spec`` whose input has ``in_width`` features/channels."""
        from .model import Dense, Residual, make_activation

        s: Any = spec
        width = s.hidden[index]
        act = make_activation(s.activation)
        norm = self.make_norm(spec, width)
        if s.residual and index > 0:
            return Residual(self.make_affine(spec, in_width, width), self.make_affine(spec, width, in_width), act, norm)
        return Dense(self.make_affine(spec, in_width, width), act, norm)

    def candidate_rows(self, spec: S, x: torch.Tensor, m: int, linear_range: float) -> list[Rows]:
        """dils-analytic's rows for a new layer of width ``m``, best first; ``x`` is the calibration
        data entering it, one row per sample and location (float64, CPU)."""
        raise NotImplementedError


class MLPFamily(Family[MLPSpec]):
    """Multilayer perceptrons: linear maps on feature vectors."""

    name = "mlp"
    spec_cls = MLPSpec

    def spec_from_config(self, model: Any, in_features: int, out_features: int,
                         sample_shape: tuple[int, ...] = ()) -> MLPSpec:
        return self.spec_cls(in_features, list(model.hidden), out_features, model.activation, model.residual)

    def in_width(self, spec: MLPSpec) -> int:
        return spec.in_features

    def make_affine(self, spec: MLPSpec, cin: int, cout: int) -> nn.Module:
        from torch import nn

        return nn.Linear(cin, cout)

    def candidate_rows(self, spec: MLPSpec, x: torch.Tensor, m: int, linear_range: float) -> list[Rows]:
        from ._bases import dense_rows

        return dense_rows(spec, x, m, linear_range)


class ConvFamily(Family[ConvSpec]):
    """1-D/2-D CNNs with 'same' padding and one pooling before the head."""

    name = "conv"
    spec_cls = ConvSpec

    def spec_from_config(self, model: Any, in_features: int, out_features: int,
                         sample_shape: tuple[int, ...] = ()) -> ConvSpec:
        m = model
        c, size = self.input_geometry(m.dims, m.in_channels, list(m.input_size), in_features, sample_shape)
        return self.spec_cls(m.dims, c, size, list(m.hidden), out_features, m.kernel_size, m.batchnorm,
                             m.pooling, m.residual, m.activation)

    @staticmethod
    def input_geometry(dims: int, channels: int, size: list[int], in_features: int,
                       sample_shape: tuple[int, ...] = ()) -> tuple[int, list[int]]:
        """``(in_channels, input_size)``: the given ones (0 and [] mean unset), the rest from the data:
        an N x C x L (dims 1) or N x C x H x W (dims 2) array gives both, N x H x W or a flat N x F one
        channel (a flat N x F with ``in_channels`` C: F / C long)."""
        shape = tuple(sample_shape) or (in_features,)
        if size:
            return channels or max(1, in_features // math.prod(size)), size
        if len(shape) == dims + 1:
            return channels or shape[0], list(shape[1:])
        if dims == 1 and len(shape) == 1:
            return channels or 1, [in_features // (channels or 1)]
        if len(shape) == dims:
            return channels or 1, list(shape)
        raise SpecError(f"input_size is not set and the data's samples have shape {list(shape)}, which does not give "
                        f"dims={dims} (C x L or C x H x W); set in_channels and input_size")

    def in_width(self, spec: ConvSpec) -> int:
        return spec.in_channels

    def taps(self, spec: ConvSpec) -> int:
        return int(spec.kernel_size**spec.dims)

    def locations(self, spec: ConvSpec) -> int:
        return math.prod(spec.input_size)

    def pooling(self, spec: ConvSpec) -> str | None:
        return spec.pooling

    def norm_params(self, spec: ConvSpec, width: int) -> int:
        return 2 * width if spec.batchnorm else 0

    def make_affine(self, spec: ConvSpec, cin: int, cout: int) -> nn.Module:
        from torch import nn

        cls = nn.Conv1d if spec.dims == 1 else nn.Conv2d
        k = spec.kernel_size
        return cls(cin, cout, k, padding=k // 2)

    def make_norm(self, spec: ConvSpec, width: int) -> nn.Module | None:
        from torch import nn

        if not spec.batchnorm:
            return None
        return nn.BatchNorm1d(width) if spec.dims == 1 else nn.BatchNorm2d(width)

    def candidate_rows(self, spec: ConvSpec, x: torch.Tensor, m: int, linear_range: float) -> list[Rows]:
        from ._bases import conv_rows

        return conv_rows(spec, x, m, linear_range)


#: the built-in families, registered in ``registry.FAMILIES`` as "mlp" and "conv"
MLP = MLPFamily()
CONV = ConvFamily()
