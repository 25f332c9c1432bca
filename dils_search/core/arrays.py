"""Checks on the arrays a dataset is built from: real numbers, finite, and standardisable in float32.

An object array of numbers is made float (so its NaNs are seen); complex numbers, and inputs that are
not numbers, are refused; a column whose mean or spread overflows float64, or whose standardised
values overflow float32, is refused instead of turning into NaN. Every refusal is one ``DataError``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError

__all__ = ["as_float32", "check_finite", "standardiser"]


def _real(name: str, label: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "c":
        raise DataError(f"data {name!r} has complex {label} (dtype {arr.dtype}); allowed: real numbers")
    if arr.dtype.kind == "O":
        try:
            return arr.astype(np.float64)
        except (TypeError, ValueError):
            if label == "inputs":  # targets may be class names: the label rule reads them
                raise DataError(f"data {name!r} has inputs of dtype object that are not all numbers; allowed: "
                                "real numbers (bool, integer or float arrays)") from None
    elif label == "inputs" and arr.dtype.kind not in "biuf":
        raise DataError(f"data {name!r} has inputs of dtype {arr.dtype}; allowed: real numbers (bool, integer or float)")
    return arr


def check_finite(name: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as real arrays, or a ``DataError`` for complex numbers, non-numbers, NaN or inf."""
    x, y = _real(name, "inputs", x), _real(name, "targets", y)
    for label, arr in (("inputs", x), ("targets", y)):
        if np.issubdtype(arr.dtype, np.floating):
            bad = int((~np.isfinite(arr)).sum())
            if bad:
                raise DataError(f"data {name!r} has {bad} NaN or inf values in its {label}; clean the file first")
    return x, y


def standardiser(name: str, x: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the rows ``train`` of ``x`` (a 2-D float64 array; std 1 where constant)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a 1e308 column overflows: refused just below
        mean, std = x[train].mean(0), x[train].std(0)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        col = int(np.argmax(~(np.isfinite(mean) & np.isfinite(std))))
        raise DataError(f"data {name!r}: input feature {col} (largest magnitude {float(np.abs(x[:, col]).max()):g}) "
                        "overflows when standardised; allowed: values whose squares fit a float64 (about 1e150); rescale it")
    std[std < 1e-8] = 1.0
    return mean, std


def as_float32(name: str, label: str, a: np.ndarray) -> torch.Tensor:
    """``a`` as a float32 tensor, or a one-line ``DataError`` when its values overflow float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"data {name!r} has {label} too large for float32 once standardised (largest magnitude "
                        f"{float(np.nanmax(np.abs(a))) if a.size else 0:g}); allowed: values that fit, rescale them")
    return torch.from_numpy(out)
