"""Write a delivered model for a serving stack: our checkpoint, ONNX, or a ``torch.export`` program.

Every format holds the whole ``Predictor`` (``core/preprocess.py``): the input preprocessing as
constants, then the network, so each takes raw inputs of shape ``N x input_shape`` (any batch
size) and returns logits (classification) or targets (regression).

- ``dils``: our checkpoint (spec + ``state_dict`` + preprocessing); ``dils_search.load(path)``.
- ``onnx``: an ONNX model (``torch.onnx.export``, the ``torch.export``-based exporter), input ``x``
  (float32), output ``y``; run it with ``onnxruntime.InferenceSession(path)``. Needs the ``[onnx]``
  extra (onnx, onnxscript, onnxruntime).
- ``torch.export``: a ``.pt2`` ``ExportedProgram`` (``torch.export.save``), input float32; run it
  with ``torch.export.load(path).module()(x)``. TorchScript is not offered: torch 2.13 deprecates
  ``torch.jit``, and ``torch.export`` is its successor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, MissingDependency
from .checkpoint import save
from .model import GrowableNet
from .preprocess import Predictor

__all__ = ["FORMATS", "export", "run_exported"]

FORMATS = ("dils", "onnx", "torch.export")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters log and warn about things that do not concern the user (torchvision, pytree)."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _predictor(model: Predictor | GrowableNet) -> Predictor:
    if isinstance(model, GrowableNet):
        model = Predictor(model)
    if not isinstance(model, Predictor):
        raise InputError(f"model={type(model).__name__} must be a dils_search Predictor (dils_search.load) or GrowableNet")
    return model


def export(model: Predictor | GrowableNet, path: str | os.PathLike[str], format: str = "dils",
           extra: dict[str, Any] | None = None, *, make_parents: bool = True) -> Path:
    """Write ``model`` to ``path`` in ``format`` (see the module doc); returns the path."""
    if format not in FORMATS:
        hint = "; torch 2.13 deprecates TorchScript: use 'torch.export'" if format == "torchscript" else ""
        raise InputError(f"format={format!r} is unknown; allowed: {', '.join(FORMATS)}{hint}")
    pred = _predictor(model)
    if format == "dils":
        return save(pred, path, extra, make_parents=make_parents)
    out = Path(path)
    if format == "torch.export" and out.suffix != ".pt2":
        raise InputError(f"out={str(out)!r} must end in .pt2 for format 'torch.export' (torch.export.load reads .pt2 files)")
    if out.is_dir():
        raise InputError(f"out={str(out)!r} is a folder; give a file name")
    if not out.parent.is_dir():
        if not make_parents:
            raise InputError(f"out={str(out)!r} is in a folder that does not exist: {str(out.parent)!r}")
        out.parent.mkdir(parents=True, exist_ok=True)
    import copy

    cpu = copy.deepcopy(pred).cpu().eval()
    example = (torch.zeros(2, *cpu.input_shape),)
    dynamic = ({0: torch.export.Dim("batch")},)
    # a new private folder of a random name beside ``out`` (never a predictable name a link could be planted at)
    private = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp = private / out.name
    try:
        with _quiet():
            if format == "torch.export":
                torch.export.save(torch.export.export(cpu, example, dynamic_shapes=dynamic), str(tmp))
            else:
                try:
                    import onnx  # noqa: F401
                    import onnxscript  # noqa: F401
                except ImportError as exc:
                    raise MissingDependency(f"--format onnx needs {exc.name or 'onnx'}; install it with: pip install "
                                            "'dils-search[onnx]'") from None
                program = torch.onnx.export(cpu, example, dynamo=True, input_names=["x"], output_names=["y"],
                                            dynamic_shapes=dynamic, verbose=False)
                assert program is not None
                program.save(str(tmp), external_data=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return out


def run_exported(path: str | os.PathLike[str], format: str, x: Any, batch_size: int = 4096) -> np.ndarray:
    """The outputs of the model exported to ``path`` in ``format`` on raw inputs ``x`` (as float32 for
    ``onnx``/``torch.export``), through the runtime that format is served with (onnxruntime for ONNX)."""
    x = np.asarray(x)
    if format == "dils":
        from .checkpoint import load

        model = load(path).eval()
        with torch.inference_mode():
            return np.concatenate([model(torch.as_tensor(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)])
    x32 = x.astype(np.float32)
    if format == "torch.export":
        module = torch.export.load(str(path)).module()
        with torch.inference_mode():
            return np.concatenate([module(torch.from_numpy(x32[i:i + batch_size])).numpy()
                                   for i in range(0, len(x32), batch_size)])
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise MissingDependency("running an ONNX model needs onnxruntime; pip install 'dils-search[onnx]'") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"x": x32[i:i + batch_size]})[0] for i in range(0, len(x32), batch_size)])
    raise InputError(f"format={format!r} is unknown; allowed: {', '.join(FORMATS)}")
