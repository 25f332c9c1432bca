"""Seeded, standardised train/val/test splits; nothing is downloaded at run time."""

from __future__ import annotations

import functools
import math
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import DataError
from ..registry import DATASETS
from .arrays import as_float32, check_finite, standardiser
from .spec import MAX_OUTPUTS

if TYPE_CHECKING:
    from .preprocess import Preprocess
    from .stream import StreamedDataset

__all__ = ["Dataset", "DATASETS", "TASKS", "describe", "load_dataset", "synthetic", "split_indices", "raw_rows"]


TASKS = ("classification", "regression")
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    """In-memory splits. ``task`` is classification (integer labels 0..K-1) or regression (float targets).

    Build one with ``Dataset.from_arrays`` (numpy arrays or torch tensors, split and standardised here)
    or stream a map-style torch ``Dataset`` with ``Dataset.from_torch`` (a ``StreamedDataset``).
    ``sample_shape`` is one input's shape as given (``x.shape[1:]``); the tensors hold it flattened
    until ``reshaped`` gives them a spec's ``input_shape``. ``inferred`` says the task was inferred
    from the labels (``describe`` says so). ``input_mean``/``input_std`` are the training split's
    per-feature statistics the inputs were standardised with (``preprocess`` puts them in a model)."""

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    out_features: int
    sample_shape: tuple[int, ...] = ()
    inferred: bool = False
    input_mean: torch.Tensor | None = None  # float64, one per feature
    input_std: torch.Tensor | None = None

    @staticmethod
    def from_arrays(
        x: Any, y: Any, task: str | None = None, seed: int = 0, val_fraction: float = 0.15,
        test_fraction: float = 0.15, name: str = "arrays", test: tuple[Any, Any] | None = None,
    ) -> Dataset:
        """Seeded train/val/test splits of ``x`` (N x ...) and ``y`` (N, or N x outputs), numpy or torch.
        Features are standardised with the training split's mean and std. ``task=None`` infers it
        (``resolve_task``): one label per sample that is a whole number (integers, bools, or floats
        such as 3.0) means classification, anything else regression. Classification labels must be
        the integers 0..K-1. ``test`` is an optional ``(x, y)`` kept as the test split (then
        ``test_fraction`` is not used)."""
        t = (_numpy(test[0]), _numpy(test[1])) if test is not None else None
        return _split(name, _numpy(x), _numpy(y), seed, val_fraction, test_fraction, t, task=task, strict=True)

    @staticmethod
    def from_torch(
        train: Any, val: Any, test: Any, task: str | None = None, batch_size: int = 1024,
        out_features: int | None = None, num_workers: int = 0, name: str = "torch",
    ) -> StreamedDataset:
        """Stream three map-style torch ``Dataset`` s yielding ``(x, y)`` through a ``DataLoader``, so
        data larger than memory works. See ``StreamedDataset`` (no feature normalisation is applied)."""
        from .stream import StreamedDataset

        return StreamedDataset.build(train, val, test, task=task, batch_size=batch_size, out_features=out_features,
                                     num_workers=num_workers, name=name)

    @property
    def in_features(self) -> int:
        return int(math.prod(self.x_train.shape[1:]))

    def size(self, split: str) -> int:
        return int(getattr(self, f"x_{split}").shape[0])

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` training inputs (calibration inputs for a growth step)."""
        return self.x_train[:n]

    def batches(self, split: str, batch_size: int, order: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` batches of ``split`` on ``device``, in ``order`` (a permutation) if given."""
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        if device is not None:
            x, y = x.to(device), y.to(device)
        n = x.shape[0]
        if order is not None:
            order = order.to(x.device)
        for i in range(0, n, batch_size):
            if order is None:
                yield x[i : i + batch_size], y[i : i + batch_size]
            else:
                idx = order[i : i + batch_size]
                yield x[idx], y[idx]

    def describe(self) -> str:
        return describe(self)

    def inputs(self, split: str, n: int | None = None) -> torch.Tensor:
        """The first ``n`` (default: all) inputs of ``split``."""
        x = getattr(self, f"x_{split}")
        return x if n is None else x[:n]

    def preprocess(self, net_shape: tuple[int, ...] | None = None) -> Preprocess:
        """What this data did to the raw inputs, as a module (``core/preprocess.py``): standardise with
        the training split's statistics, reshape to ``net_shape`` (default: the data's current shape)."""
        from .preprocess import Preprocess

        shape = tuple(net_shape) if net_shape is not None else tuple(self.x_train.shape[1:])
        raw = self.sample_shape or (self.in_features,)
        if self.input_mean is None or self.input_std is None:
            return Preprocess.identity(raw, shape)
        return Preprocess(self.input_mean.numpy(), self.input_std.numpy(), raw, shape)

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, **{k: getattr(self, k).to(device) for k in _SPLITS})

    def reshaped(self, shape: tuple[int, ...]) -> Dataset:
        """The same data with every sample reshaped to ``shape`` (a spec's ``input_shape``)."""
        need = int(math.prod(shape))
        if need != self.in_features:
            raise DataError(
                f"data {self.name!r} has {self.in_features} features per sample, but the spec's input shape "
                f"{list(shape)} needs {need}"
            )
        return replace(self, **{k: getattr(self, k).reshape(-1, *shape) for k in ("x_train", "x_val", "x_test")})


def describe(data: Any) -> str:
    """One line: the task (and whether it was inferred), the metric, the class count or outputs, the
    input shape and the split sizes."""
    task = f"{data.task} (inferred: whole-number labels are classes; set task to choose)" if data.inferred else data.task
    metric = "accuracy" if data.task == "classification" else "r2"
    out = f"{data.out_features} classes" if data.task == "classification" else f"{data.out_features} output(s)"
    sizes = "/".join(str(data.size(s)) for s in SPLIT_NAMES)
    return (f"data {data.name}: task {task}, metric {metric}, {out}, input shape {list(data.sample_shape)}, "
            f"train/val/test {sizes}")


_SPLITS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def _numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _shown(values: np.ndarray, k: int = 6) -> str:
    vals = [f"{v:g}" if isinstance(v, float) else str(v) for v in values[:k].tolist()]
    return ", ".join(vals) + (f" ... ({len(values)} distinct)" if len(values) > k else "")


def resolve_task(name: str, y: np.ndarray, task: str | None) -> tuple[str, bool]:
    """``(task, inferred)`` for labels ``y`` (all of them), the one label rule of every data path:
    one label per sample that is a whole number (an integer, a bool, or a float such as 3.0) means
    classification; other float labels, or several targets per sample, mean regression; unless
    ``task`` says otherwise. (The CLI's ``[data] task`` defaults to classification.)"""
    if task is not None and task not in TASKS:
        raise DataError(f"data {name!r}: task={task!r} is unknown; allowed: {', '.join(TASKS)}")
    if task is not None:
        return task, False
    if y.ndim > 1 and math.prod(y.shape[1:]) != 1:
        return "regression", True
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        return "classification", True
    whole = bool(np.all(np.isfinite(y)) and np.all(y == np.round(y))) if y.size else False
    return ("classification" if whole else "regression"), True


def class_labels(name: str, y: np.ndarray) -> np.ndarray:
    """``y`` as int64 class labels, or a one-line ``DataError`` naming the labels found."""
    if y.ndim > 1 and math.prod(y.shape[1:]) != 1:
        raise DataError(f"data {name!r} has targets of shape {list(y.shape[1:])} per sample; classification "
                        "needs one integer label per sample (or set task='regression')")
    y = y.reshape(y.shape[0])
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        if not np.all(y == np.round(y)):
            bad = np.unique(y[y != np.round(y)])
            raise DataError(f"data {name!r} has non-integer labels ({_shown(bad)}); classification labels must be "
                            "the integers 0..K-1; set task='regression' ([data] task = \"regression\" in a config) "
                            "for a regression study")
    return y.astype(np.int64)


def check_classes(name: str, found: np.ndarray, train: np.ndarray, strict: bool, inferred: bool = False) -> int:
    """The class count K for the distinct labels ``found`` (all splits) and ``train`` (training split).
    ``strict``: the labels must be exactly 0..K-1 (user data); otherwise K = largest label + 1.
    ``inferred``: the task was inferred from whole-number labels (the error then says how to choose)."""
    hint = "; or set task='regression' if they are targets, not classes" if inferred else ""
    if len(found) and found.min() < 0:
        raise DataError(f"data {name!r} has negative class labels (labels found: {_shown(found)}); "
                        f"labels must be 0..K-1{hint}")
    out = int(found.max()) + 1 if len(found) else 1
    if out < 2:
        raise DataError(f"data {name!r} has a single class (labels found: {_shown(found)}); classification needs "
                        "at least 2 classes (or set task='regression')")
    if out > MAX_OUTPUTS:
        raise DataError(f"data {name!r} has class label {out - 1}; labels must be 0..K-1 with K at most "
                        f"{MAX_OUTPUTS} (labels found: {_shown(found)}){hint}")
    if strict and len(found) != out:
        raise DataError(f"data {name!r} has class labels {_shown(found)}; labels must be the integers 0..K-1 "
                        f"with every class present (relabel them, e.g. with np.unique(y, return_inverse=True)){hint}")
    missing = np.setdiff1d(found, train)
    if strict and len(missing):
        warnings.warn(f"data {name!r}: class label(s) {_shown(missing)} are absent from the training split",
                      stacklevel=3)
    return out


def split_indices(n: int, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.15,
                  has_test: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seeded ``(train, val, test)`` row indices of ``n`` samples, as every data path splits them
    (``test`` is empty when the data brings its own test split): the raw rows of a split are
    ``x[test]``, e.g. to check a delivered model on raw inputs."""
    idx = np.random.default_rng(seed).permutation(n)
    n_test = 0 if has_test else int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    return idx[n_test + n_val :], idx[n_test : n_test + n_val], idx[:n_test]


def _split(
    name: str, x: np.ndarray, y: np.ndarray, seed: int, val_fraction: float, test_fraction: float,
    test: tuple[np.ndarray, np.ndarray] | None = None, task: str | None = None, strict: bool = False,
    inferred: bool | None = None,
) -> Dataset:
    x, y = check_finite(name, x, y)
    if test is not None:
        test = check_finite(name, *test)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"data {name!r} has {x.shape[0]} inputs but {y.shape[0]} targets")
    task, was_inferred = resolve_task(name, y if test is None else np.concatenate([y, test[1]]), task)
    classification = task == "classification"
    sample_shape = tuple(int(s) for s in x.shape[1:])
    tr, va, te = split_indices(x.shape[0], seed, val_fraction, test_fraction, has_test=test is not None)
    if len(tr) < 2 or len(va) < 1:
        raise DataError(f"data {name!r} has {x.shape[0]} samples; too few for train/val/test splits")
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    mean, std = standardiser(name, x, tr)

    def xs(a: np.ndarray) -> torch.Tensor:
        with np.errstate(over="ignore", invalid="ignore"):
            return as_float32(name, "inputs", (a.reshape(a.shape[0], -1) - mean) / std)

    def ys(a: np.ndarray) -> torch.Tensor:
        if classification:
            return torch.from_numpy(a.astype(np.int64))
        return as_float32(name, "targets", a.reshape(a.shape[0], -1))

    x_test, y_test = (test[0], test[1]) if test is not None else (x[te], y[te])
    if classification:
        y, y_test = class_labels(name, y), class_labels(name, y_test)
        out = check_classes(name, np.union1d(np.unique(y), np.unique(y_test)), np.unique(y[tr]), strict,
                            inferred=was_inferred and inferred is None)
    else:
        out = int(np.prod(y.shape[1:])) if y.ndim > 1 else 1
    return Dataset(
        name=name,
        task=task,
        x_train=xs(x[tr]), y_train=ys(y[tr]),
        x_val=xs(x[va]), y_val=ys(y[va]),
        x_test=xs(x_test), y_test=ys(y_test),
        out_features=out,
        sample_shape=sample_shape,
        inferred=was_inferred if inferred is None else inferred,
        input_mean=torch.from_numpy(mean), input_std=torch.from_numpy(std),
    )


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64)


def _mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _mnist1d_cached(int(num_samples), int(seed))
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=4)
def _mnist1d_cached(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # generating 20,000 samples takes ~15 s; a study loads its data more than once per process
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    state = np.random.get_state()  # make_dataset reseeds NumPy's global RNG; leave it as we found it
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)
    x = np.concatenate([raw["x"], raw["x_test"]])
    y = np.concatenate([raw["y"], raw["y_test"]])
    return x.astype(np.float64), y.astype(np.int64)


def synthetic(
    num_samples: int = 4000, in_features: int = 16, depth: int = 6, width: int = 32, out_features: int = 1,
    task: str = "regression", classes: int = 4, noise: float = 0.05, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A deep compositional task: targets come from a random ``depth``-layer tanh teacher network,
    so shallow students underfit it. ``task="classification"`` buckets the teacher's output."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, in_features))
    h = x
    for _ in range(depth):
        w = rng.standard_normal((h.shape[1], width)) * (1.6 / math.sqrt(h.shape[1]))
        h = np.tanh(h @ w + 0.1 * rng.standard_normal(width))
    n_out = classes if task == "classification" else out_features
    z = h @ (rng.standard_normal((width, n_out)) / math.sqrt(width))
    if task == "classification":
        return x, z.argmax(1).astype(np.int64)
    z = (z - z.mean(0)) / (z.std(0) + 1e-12)
    return x, z + noise * rng.standard_normal(z.shape)


def _from_file(path: str, label_column: str | int | None) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data path={path!r} does not exist or is not a file; give an .npz or .csv file")
    try:
        if p.suffix == ".npz":
            if not zipfile.is_zipfile(p):
                raise DataError(f"data path={path!r} is not an .npz archive (np.savez writes one)")
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z or "y" not in z:
                    raise DataError(f"data path={path!r} must hold arrays 'x' and 'y' (found: {', '.join(z.files)})")
                test = (z["x_test"], z["y_test"]) if "x_test" in z and "y_test" in z else None
                return z["x"], z["y"], test
        if p.suffix == ".csv":
            arr = np.genfromtxt(p, delimiter=",", names=True)
            names = list(arr.dtype.names or [])
            col = names[-1] if label_column is None else (names[label_column] if isinstance(label_column, int) else label_column)
            if col not in names:
                raise DataError(f"label_column={label_column!r} is not a column of {path!r}; columns: {', '.join(names)}")
            y = arr[col]
            x = np.stack([arr[n] for n in names if n != col], axis=1)
            if np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            return x, y, None
    except ValueError as exc:
        if str(exc).startswith(("data path=", "label_column=")):
            raise
        # numpy's own refusals (object arrays need pickle, which is never allowed) do not name the file
        raise DataError(f"data path={path!r} could not be read: {exc}") from None
    except Exception as exc:  # unreadable or corrupt file: report it in one line
        raise DataError(f"data path={path!r} could not be read: {exc}") from None
    raise DataError(f"data path={path!r} has suffix {p.suffix!r}; allowed: .npz, .csv")


# ---------------------------------------------------------------- the built-in datasets (registry.DATASETS)


def _load_digits(**_: Any) -> tuple[np.ndarray, np.ndarray, None]:
    return (*_digits(), None)


def _load_mnist1d(*, seed: int, num_samples: int | None, **_: Any) -> tuple[np.ndarray, np.ndarray, None]:
    return (*_mnist1d(num_samples or 4000, seed), None)


def _load_synthetic(*, seed: int, num_samples: int | None, options: dict[str, Any], **_: Any) -> tuple[np.ndarray, np.ndarray, None]:
    return (*synthetic(num_samples=num_samples or 4000, seed=seed, **options), None)


def _load_file(*, path: str | None, label_column: str | int | None, **_: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    if not path:
        raise DataError("data name='file' needs a path to an .npz or .csv file")
    return _from_file(path, label_column)


def load_dataset(
    name: str, *, seed: int = 0, num_samples: int | None = None, path: str | None = None,
    val_fraction: float = 0.15, test_fraction: float = 0.15, label_column: str | int | None = None,
    options: dict[str, Any] | None = None, task: str | None = None,
) -> Dataset:
    """Load ``name`` (a dataset in ``registry.DATASETS``: digits, mnist1d, synthetic, file, ...) as seeded,
    standardised splits. The loader is called as ``loader(seed=, num_samples=, path=, label_column=,
    options=)`` and returns ``(x, y, test)``, ``test`` an ``(x, y)`` pair kept as the test split, or None.

    ``task`` (classification or regression; None infers it from the labels' dtype) applies to the
    labels. The strict label rule (exactly 0..K-1, a one-line error otherwise) applies to ``file``
    data; a built-in dataset keeps K = largest label + 1 (a synthetic teacher may leave a class empty)."""
    if not isinstance(name, str) or name not in DATASETS:
        raise DataError(f"dataset={name!r} is unknown; allowed: {', '.join(DATASETS.names())}")
    loader = DATASETS.get(name)
    x, y, test = loader(seed=seed, num_samples=num_samples, path=path, label_column=label_column, options=dict(options or {}))
    user = name == "file"
    return _split(name if not user else str(path), x, y, seed, val_fraction, test_fraction, test, task=task,
                  strict=user, inferred=None if user else False)


def raw_rows(name: str, split: str = "test", *, seed: int = 0, num_samples: int | None = None, path: str | None = None,
             val_fraction: float = 0.15, test_fraction: float = 0.15, label_column: str | int | None = None,
             options: dict[str, Any] | None = None, **_: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ``(x, y)`` rows of ``split`` as the loader gave them, before standardisation: the inputs a
    delivered model (``core/preprocess.py``) takes, e.g. to check an exported model on the study's test rows."""
    if not isinstance(name, str) or name not in DATASETS:
        raise DataError(f"dataset={name!r} is unknown; allowed: {', '.join(DATASETS.names())}")
    x, y, test = DATASETS.get(name)(seed=seed, num_samples=num_samples, path=path, label_column=label_column,
                                   options=dict(options or {}))
    if split == "test" and test is not None:
        return np.asarray(test[0]), np.asarray(test[1])
    tr, va, te = split_indices(len(x), seed, val_fraction, test_fraction, has_test=test is not None)
    idx = {"train": tr, "val": va, "test": te}[split]
    return np.asarray(x)[idx], np.asarray(y)[idx]
