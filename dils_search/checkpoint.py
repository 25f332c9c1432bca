"""Save and load models as spec JSON + ``state_dict``: never executable pickle."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .model import GrowableNet, build
from .spec import spec_from_json

__all__ = ["save", "load", "to_bytes", "from_bytes", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt or not a dils-search checkpoint."""


def to_bytes(model: GrowableNet, extra: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    payload: dict[str, Any] = {
        "format": "dils-search/1",
        "spec": model.spec.to_json(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if extra:
        payload["extra"] = extra
    torch.save(payload, buf)
    return buf.getvalue()


def from_bytes(data: bytes, *, source: str = "<bytes>", map_location: str | torch.device = "cpu") -> GrowableNet:
    """Rebuild a model with ``torch.load(weights_only=True)``; anything that is not plain data is refused."""
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {source} refused: not a safe dils-search checkpoint ({first})") from None
    if not isinstance(payload, dict) or "spec" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"checkpoint {source} is not a dils-search checkpoint (needs 'spec' and 'state_dict')")
    try:
        model = build(spec_from_json(payload["spec"]))
        model.load_state_dict(payload["state_dict"])
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {source} does not match its spec: {str(exc).splitlines()[0]}") from None
    return model


def save(model: GrowableNet, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(to_bytes(model, extra))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> GrowableNet:
    """The ``nn.Module`` stored at ``path`` (from ``save``, ``deepen`` or ``export``), with its ``.spec``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint path={str(path)!r} does not exist")
    return from_bytes(p.read_bytes(), source=repr(str(path)), map_location=map_location)
