"""The delivered model: what the study did to the inputs, as buffers, in front of the network.

A study standardises every input feature with its training split's mean and standard deviation
(``Dataset.from_arrays``, ``.npz``/``.csv`` files and the built-in datasets alike) and reshapes the
flat features to the spec's input shape. ``Preprocess`` does exactly that inside the model, in
float64 as the data loader does, then float32, so the network sees the very tensors it was trained
and scored on. ``Predictor`` is ``net(preprocess(x))``: give it inputs as you gave them to the study
(``N x`` the per-sample shape the data had) and it scores what the study reported. It also carries
the ``task`` and the class count. Streamed data (``Dataset.from_torch``) is not standardised, so
its ``Preprocess`` is the identity (mean 0, std 1); so is that of a checkpoint written before
preprocessing was recorded.

The network's own ``state_dict`` keys are unchanged: checkpoints store the net's ``state_dict`` and
the preprocessing beside it (``core/checkpoint.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .model import GrowableNet

__all__ = ["Preprocess", "Predictor", "TASKS"]

TASKS = ("classification", "regression")


class Preprocess(nn.Module):
    """``(x - mean) / std`` per feature (float64, then float32), reshaped to the network's input shape.

    ``input_shape`` is one raw sample's shape (what the model takes after the batch dimension);
    ``net_shape`` the spec's ``input_shape``; both hold ``mean.numel()`` values."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Any, std: Any, input_shape: Sequence[int], net_shape: Sequence[int]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float64)).reshape(-1)
        std_t = torch.as_tensor(np.asarray(std, dtype=np.float64)).reshape(-1)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.net_shape = tuple(int(s) for s in net_shape)
        n = mean_t.numel()
        if std_t.numel() != n or math.prod(self.input_shape) != n or math.prod(self.net_shape) != n:
            raise InputError(f"preprocessing has {n} means and {std_t.numel()} stds for input shape "
                             f"{list(self.input_shape)} and network input shape {list(self.net_shape)}; all must agree")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t > 0).all()):
            raise InputError("preprocessing needs finite means and finite stds > 0")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    @staticmethod
    def identity(input_shape: Sequence[int], net_shape: Sequence[int]) -> Preprocess:
        n = math.prod(int(s) for s in net_shape)
        return Preprocess(np.zeros(n), np.ones(n), input_shape, net_shape)

    @property
    def is_identity(self) -> bool:
        return bool((self.mean == 0).all() and (self.std == 1).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if math.prod(x.shape[1:]) != self.mean.numel() or x.dim() < 2:
            raise InputError(f"the model takes inputs of shape N x {list(self.input_shape)} (or N x "
                             f"{self.mean.numel()}), got {list(x.shape)}")
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        return ((flat - self.mean) / self.std).to(torch.float32).reshape((x.shape[0], *self.net_shape))

    def to_payload(self) -> dict[str, Any]:
        """What a checkpoint stores (plain tensors and lists)."""
        return {"mean": self.mean.detach().cpu(), "std": self.std.detach().cpu()}

    def extra_repr(self) -> str:
        kind = "identity" if self.is_identity else "standardise"
        return f"{kind}, input_shape={list(self.input_shape)}, net_shape={list(self.net_shape)}"


class Predictor(nn.Module):
    """The delivered model: ``net(preprocess(x))`` on inputs as the study was given them.

    ``.net`` is the trained ``GrowableNet`` (``.spec``; its other attributes read through, e.g.
    ``.blocks``), ``.preprocess`` its input preprocessing;
    ``task`` is classification (outputs are the logits of ``classes`` classes) or regression (the
    targets in your units), None when the checkpoint did not record it. ``predict`` returns class
    labels or target values."""

    def __init__(self, net: GrowableNet, preprocess: Preprocess | None = None, task: str | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if task is not None and task not in TASKS:
            raise InputError(f"task={task!r} is unknown; allowed: {', '.join(TASKS)}")
        shape = tuple(input_shape) if input_shape is not None else tuple(net.spec.input_shape)
        self.net = net
        self.preprocess = preprocess if preprocess is not None else Preprocess.identity(shape, net.spec.input_shape)
        self.task = task

    @property
    def spec(self) -> Any:
        return self.net.spec

    def __getattr__(self, name: str) -> Any:
        """The network's own attributes (``blocks``, ``head``, ...) read through, as on the network a
        checkpoint used to load as; they work on preprocessed inputs."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "net" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["net"], name)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.preprocess.input_shape

    @property
    def classes(self) -> int | None:
        return int(self.net.spec.out_features) if self.task == "classification" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))

    def predict(self, x: Any) -> torch.Tensor:
        """Class labels (classification) or target values (regression) for raw inputs ``x`` (numpy or torch)."""
        device = next(self.net.parameters()).device
        was = self.training
        self.eval()
        with torch.inference_mode():
            out = self(torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device))
        self.train(was)
        return out.argmax(1) if self.task == "classification" else out

    def extra_repr(self) -> str:
        return f"task={self.task}, classes={self.classes}, input_shape={list(self.input_shape)}"
