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

__all__ = ["StreamedDataset"]


@dataclass(frozen=True)
class StreamedDataset:
    """Three map-style torch datasets, each item an ``(x, y)`` pair, read batch by batch.

    No feature normalisation is applied: the inputs reach the model as the datasets return them
    (standardise them in your ``Dataset``, e.g. in ``__getitem__``). ``Dataset.from_arrays``
    standardises with the training split's statistics instead, so compare the two paths on the same
    tensors (``TensorDataset(d.x_train, d.y_train)``, ...). Building one reads the labels once (not
    kept in memory beyond the distinct values) to infer the task if needed, check that class labels
    are 0..K-1 and count the classes; pass ``out_features`` with ``task`` to skip that pass.
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
        resolved, inferred = resolve_task(name, y0.numpy(), task)
        data = StreamedDataset(name, resolved, train, val, test, 1, tuple(x0.shape), batch_size, num_workers,
                               inferred)
        if resolved == "regression":
            return replace(data, out_features=out_features or max(1, int(y0.numel())))
        if out_features is None or task is None:
            found = {s: np.unique(class_labels(name, y.numpy())) for s in SPLIT_NAMES
                     for y in [torch.cat([b for _, b in data._loader(s)]) if len(sets[s]) else torch.zeros(0)]}
            all_found = np.unique(np.concatenate(list(found.values())))
            out_features = check_classes(name, all_found, found["train"], strict=True)
        return replace(data, out_features=out_features)

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
        for x, y in self._loader(split, order, batch_size):
            x = x.to(dev, dtype=torch.float32, non_blocking=True).reshape(x.shape[0], *shape)
            if self.task == "classification":
                y = y.to(dev, dtype=torch.int64, non_blocking=True).reshape(-1)
            else:
                y = y.to(dev, dtype=torch.float32, non_blocking=True).reshape(y.shape[0], -1)
            yield x, y

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` training inputs (calibration inputs for a growth step)."""
        idx = torch.arange(min(n, self.size("train")))
        return torch.cat([x for x, _ in self.batches("train", order=idx)])

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
