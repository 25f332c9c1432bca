"""Map-style torch ``Dataset`` s streamed through a ``DataLoader``: data larger than memory."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import DataError
from .data import SPLIT_NAMES, check_classes, class_labels, describe, resolve_task
from .preprocess import Preprocess

__all__ = ["StreamedDataset"]


@dataclass(frozen=True)
class StreamedDataset:
    """Three map-style torch datasets, each item an ``(x, y)`` pair, read batch by batch.

    No feature normalisation is applied: the inputs reach the model as the datasets return them
    (standardise them in your ``Dataset``, e.g. in ``__getitem__``). ``Dataset.from_arrays``
    standardises with the training split's statistics instead, so compare the two paths on the same
    tensors (``TensorDataset(d.x_train, d.y_train)``, ...). Building one reads the labels once to
    infer the task if needed (the one label rule of ``resolve_task``: whole-number labels are
    classes), check that class labels are 0..K-1 and count the classes; pass ``task`` (and, for
    classification, ``out_features``) to skip that pass. Every batch is checked for NaN or inf values:
    a ``DataError`` names the split and the sample, so bad data is never taken for a diverging lr.
    Training visits the same samples in the same order as the in-memory path for the same seed
    (a seeded permutation per epoch, fed to the ``DataLoader`` as its batch sampler), so the FLOPs
    accounting (3 x forward FLOPs x samples seen) is the same."""

    name: str
    task: str
    train: Any
    val: Any
    test: Any
    out_features: int
    sample_shape: tuple[int, ...]
    batch_size: int = 1024
    num_workers: int = 0
    inferred: bool = False
    shape: tuple[int, ...] | None = None  # what each batch is reshaped to (a spec's input_shape)
    device: str = "cpu"

    @staticmethod
    def build(train: Any, val: Any, test: Any, task: str | None = None, batch_size: int = 1024,
              out_features: int | None = None, num_workers: int = 0, name: str = "torch") -> StreamedDataset:
        sets = {"train": train, "val": val, "test": test}
        for split, ds in sets.items():
            if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
                raise DataError(f"data {name!r}: the {split} split must be a map-style torch Dataset "
                                f"(with __getitem__ and __len__), not {type(ds).__name__}")
        if len(train) < 2 or len(val) < 1:
            raise DataError(f"data {name!r} has {len(train)} training and {len(val)} validation samples; too few")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"data {name!r}: batch_size={batch_size!r} must be a positive integer")
        first = train[0]
        if not isinstance(first, (tuple, list)) or len(first) != 2:
            raise DataError(f"data {name!r}: each item must be an (x, y) pair")
        x0, y0 = torch.as_tensor(first[0]), torch.as_tensor(first[1])
        resolved, inferred = resolve_task(name, y0.numpy()[None], task) if task is not None else ("regression", True)
        data = StreamedDataset(name, resolved, train, val, test, 1, tuple(x0.shape), batch_size, num_workers,
                               inferred)
        if task == "regression":
            return replace(data, out_features=out_features or max(1, int(y0.numel())))
        if out_features is not None and task is not None:
            return replace(data, out_features=out_features)
        labels = {s: data._labels(s) if len(sets[s]) else np.zeros(0, dtype=y0.numpy().dtype) for s in SPLIT_NAMES}
        if task is None:  # the same rule as Dataset.from_arrays, on every label
            resolved, inferred = resolve_task(name, np.concatenate(list(labels.values())), None)
            data = replace(data, task=resolved, inferred=inferred)
            if resolved == "regression":
                return replace(data, out_features=out_features or max(1, int(y0.numel())))
        found = {s: np.unique(class_labels(name, y)) for s, y in labels.items()}
        all_found = np.unique(np.concatenate(list(found.values())))
        out_features = check_classes(name, all_found, found["train"], strict=True, inferred=task is None)
        return replace(data, out_features=out_features)

    def _labels(self, split: str) -> np.ndarray:
        """Every label of ``split`` (one pass over the data); NaN or inf labels are refused."""
        ys = [y for _, y in self._loader(split)]
        y = torch.cat([t.reshape(t.shape[0], -1) if t.dim() > 1 else t for t in ys]).numpy()
        if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
            raise DataError(f"data {self.name!r}: the {split} split has {int((~np.isfinite(y)).sum())} NaN or inf "
                            "labels; clean the data")
        return y

    @property
    def in_features(self) -> int:
        return int(math.prod(self.sample_shape))

    def size(self, split: str) -> int:
        return len(getattr(self, split))

    def _loader(self, split: str, order: torch.Tensor | None = None, batch_size: int | None = None) -> DataLoader:
        bs = batch_size or self.batch_size
        kw: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.device.startswith("cuda")}
        if order is None:
            return DataLoader(getattr(self, split), batch_size=bs, shuffle=False, **kw)
        idx = order.tolist()
        return DataLoader(getattr(self, split), batch_sampler=[idx[i : i + bs] for i in range(0, len(idx), bs)], **kw)

    def batches(self, split: str, batch_size: int | None = None, order: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` batches of ``split`` on ``device``, in ``order`` (a permutation) if given: x as
        float32 in ``shape`` (flat by default), y as int64 labels or float32 rows of targets."""
        dev = torch.device(device or self.device)
        shape = self.shape or (self.in_features,)
        start = 0
        for x, y in self._loader(split, order, batch_size):
            _check_batch(self.name, split, x, y, order, start)
            start += x.shape[0]
            x = x.to(dev, dtype=torch.float32, non_blocking=True).reshape(x.shape[0], *shape)
            if self.task == "classification":
                y = y.to(dev, dtype=torch.int64, non_blocking=True).reshape(-1)
            else:
                y = y.to(dev, dtype=torch.float32, non_blocking=True).reshape(y.shape[0], -1)
            yield x, y

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` training inputs (calibration inputs for a growth step)."""
        return self.inputs("train", n)

    def inputs(self, split: str, n: int | None = None) -> torch.Tensor:
        """The first ``n`` (default: all) inputs of ``split``, in memory."""
        idx = torch.arange(self.size(split) if n is None else min(n, self.size(split)))
        return torch.cat([x for x, _ in self.batches(split, order=idx)])

    def preprocess(self, net_shape: tuple[int, ...] | None = None) -> Preprocess:
        """The identity (streamed inputs reach the model as the datasets return them), reshaped to
        ``net_shape`` (default: the batches' shape)."""
        return Preprocess.identity(self.sample_shape, tuple(net_shape) if net_shape else self.shape or (self.in_features,))

    def describe(self) -> str:
        return describe(self)

    def to(self, device: torch.device | str) -> StreamedDataset:
        """Batches go to ``device`` (pinned host memory on CUDA); the data itself stays where it is."""
        return replace(self, device=str(torch.device(device)))

    def reshaped(self, shape: tuple[int, ...]) -> StreamedDataset:
        if int(math.prod(shape)) != self.in_features:
            raise DataError(f"data {self.name!r} has {self.in_features} features per sample, but the spec's input "
                            f"shape {list(shape)} needs {int(math.prod(shape))}")
        return replace(self, shape=tuple(shape))


def _check_batch(name: str, split: str, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor | None, start: int) -> None:
    """A ``DataError`` naming the first sample of the batch with a NaN or inf input or target."""
    for what, t in (("inputs", x), ("targets", y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            row = int((~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero()[0, 0]) + start
            index = int(order[row]) if order is not None else row
            raise DataError(f"data {name!r}: sample {index} of the {split} split has NaN or inf {what}; clean the "
                            "data (or fix the Dataset's __getitem__)")
