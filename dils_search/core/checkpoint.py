"""Save and load models as spec JSON + ``state_dict``: never executable pickle."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .model import GrowableNet, build
from .spec import spec_from_json

__all__ = ["save", "load", "load_extra", "to_bytes", "from_bytes", "CheckpointError"]


def to_bytes(model: GrowableNet, extra: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    payload: dict[str, Any] = {
        "format": FORMAT,
        "spec": model.spec.to_json(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if extra:
        payload["extra"] = extra
    torch.save(payload, buf)
    return buf.getvalue()


FORMAT = "dils-search/1"


def from_bytes(data: bytes, *, source: str = "<bytes>", map_location: str | torch.device = "cpu") -> GrowableNet:
    """Rebuild a model with ``torch.load(weights_only=True)``; anything that is not plain data is refused.

    Every way a file can fail to be a checkpoint (not a pickle, not our format, a spec that is not
    one, widths over the limits, tensors that do not fit the spec) raises ``CheckpointError``."""
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # the unpickler raises many types on bytes that are not a checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {source} refused: not a safe dils-search checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or "spec" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"checkpoint {source} is not a dils-search checkpoint (needs 'spec' and 'state_dict')")
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {source} has format={str(payload.get('format'))[:60]!r}; allowed: {FORMAT!r}")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {source}: state_dict must map names to tensors")
    try:
        spec = spec_from_json(payload["spec"]) if isinstance(payload["spec"], str) else None
    except Exception as exc:  # ValueError from the spec's own checks (limits included), KeyError, TypeError
        raise CheckpointError(f"checkpoint {source} has an invalid spec: {str(exc).splitlines()[0][:200]}") from None
    if spec is None:
        raise CheckpointError(f"checkpoint {source}: spec must be a JSON string")
    try:
        model = build(spec)
        model.load_state_dict(state)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {source} does not match its spec: {str(exc).splitlines()[0][:200]}") from None
    return model


def save(model: GrowableNet, path: str | os.PathLike[str], extra: dict[str, Any] | None = None, *,
         make_parents: bool = True) -> Path:
    """Write ``model`` atomically (a new temp file in the target folder, fsync, rename); the CLI passes ``make_parents=False``
    so that a typo in ``--out`` never creates folders."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"out={str(path)!r} is a folder; give a file name, e.g. {str(path / 'model.pt')!r}")
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise CheckpointError(f"out={str(path)!r} is in a folder that does not exist: {str(path.parent)!r}")
    # a new temp file of a random name, created exclusively (O_EXCL, never through a planted link)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp's 0600 would hide an exported model from the group
            fh.write(to_bytes(model, extra))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> GrowableNet:
    """The ``nn.Module`` stored at ``path`` (from ``save``, ``deepen`` or ``export``), with its ``.spec``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint path={str(path)!r} does not exist")
    return from_bytes(p.read_bytes(), source=repr(str(path)), map_location=map_location)


def load_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``extra`` a checkpoint was saved with (``export`` records the data, seed and split there)."""
    try:
        payload = torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True)
    except Exception:  # load() has already refused it with a clear message, or will
        return {}
    extra = payload.get("extra") if isinstance(payload, dict) else None
    return extra if isinstance(extra, dict) else {}
