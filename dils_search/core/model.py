"""Build an ``nn.Module`` from a spec; count its forward FLOPs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .spec import Spec, family_of, forward_flops, head_in_features, stream_widths

__all__ = ["GrowableNet", "build", "forward_flops", "count_params", "make_activation"]


def make_activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "leaky_relu": nn.LeakyReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
    }[name]()


class Dense(nn.Module):
    """``(act(scale * norm(affine(u))) - offset) / scale``; ``affine`` is the layer DILS re-solves when
    something is inserted before it.

    ``scale`` and ``offset`` are fixed buffers, one value per unit or channel, 1 and 0 (the plain
    ``act(norm(affine(u)))``) unless an inherited layer set them. dils-analytic puts its units in the
    activation's linear range: ReLU-like units with a large shift, whose constant output ``offset``
    removes so that the next layer sees centred inputs (the next layer's bias could absorb it, so
    the function class is the same; a conv's zero padding stays consistent, which folding it into
    the bias would break); tanh/sigmoid units by a tiny ``scale``, kept out of the trained weights so
    that both this layer and the next one train at their usual pace (docs/inheritance.md)."""

    offset: torch.Tensor
    scale: torch.Tensor

    def __init__(self, affine: nn.Module, act: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.affine = affine
        self.norm = norm if norm is not None else nn.Identity()
        self.act = act
        weight: Any = affine.weight
        like = {"dtype": weight.dtype, "device": weight.device}
        self.register_buffer("offset", torch.zeros(weight.shape[0], **like))
        self.register_buffer("scale", torch.ones(weight.shape[0], **like))

    def pre(self, u: torch.Tensor) -> torch.Tensor:
        return self.affine(u)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.affine(u))
        shape = (-1, *(1,) * (z.dim() - 2))
        scale = self.scale.view(shape)
        return (self.act(z * scale) - self.offset.view(shape)) / scale


class Residual(nn.Module):
    """``u + out(act(norm(inner(u))))``; zeroing ``out`` makes it the identity."""

    def __init__(self, inner: nn.Module, out: nn.Module, act: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.norm = norm if norm is not None else nn.Identity()
        self.act = act
        self.out = out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.out(self.act(self.norm(self.inner(u))))


class Head(nn.Module):
    """Pooling (conv nets only) then the linear classifier/regressor."""

    def __init__(self, pooling: str | None, linear: nn.Linear, locations: int = 1) -> None:
        super().__init__()
        self.pooling = pooling
        self.locations = locations if pooling == "flatten" else 1
        self.affine = linear

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        if self.pooling is None:
            return h
        if self.pooling == "avg":
            return h.flatten(2).mean(dim=2)
        if self.pooling == "max":
            return h.flatten(2).amax(dim=2)
        return h.flatten(1)

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        return self.affine(self.pool(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pre(h)


def make_block(spec: Spec, index: int, in_width: int) -> nn.Module:
    """Hidden layer ``index`` of ``spec`` whose input has ``in_width`` features/channels (its family builds it)."""
    return family_of(spec).make_block(spec, index, in_width)


class GrowableNet(nn.Module):
    """A network made of hidden blocks and a head, carrying the ``spec`` it was built from."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        widths = stream_widths(spec)
        self.blocks = nn.ModuleList(make_block(spec, i, widths[i]) for i in range(len(spec.hidden)))
        family = family_of(spec)
        self.head = Head(family.pooling(spec), nn.Linear(head_in_features(spec), spec.out_features), family.locations(spec))

    def features(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """The representation entering insertion point ``position``."""
        h = x
        for block in self.blocks[:position]:
            h = block(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, len(self.blocks)))

    def extra_repr(self) -> str:
        return f"spec={self.spec.to_json()}"


def build(spec: Spec, seed: int | None = None) -> GrowableNet:
    """A freshly initialised network for ``spec`` (PyTorch's default init), seeded if asked."""
    if seed is None:
        return GrowableNet(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GrowableNet(spec)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
