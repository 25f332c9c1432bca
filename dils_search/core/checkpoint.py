"""Save and load models as spec JSON + ``state_dict``: never executable pickle.

Format ``dils-search/2`` adds each hidden block's ``offset`` buffer to the network's ``state_dict``
and, for a delivered model (a ``Predictor``), its input preprocessing (``preprocess``: the training
split's ``mean`` and ``std`` per feature), ``task``, ``classes`` and ``input_shape`` (one raw
sample's shape) beside it. Files of format ``dils-search/1`` still load: zero offsets, and no
preprocessing (the identity)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, InputError
from .model import GrowableNet, build
from .preprocess import Predictor, Preprocess
from .spec import spec_from_json

__all__ = ["save", "load", "load_extra", "to_bytes", "from_bytes", "CheckpointError", "FORMAT", "READABLE"]

FORMAT = "dils-search/2"
#: formats ``from_bytes`` still reads; a format-1 file predates ``Dense.offset`` and ``Dense.scale``
#: (its offsets are zero, its scales one) and records no preprocessing (the identity)
READABLE = ("dils-search/1", FORMAT)


def to_bytes(model: GrowableNet | Predictor, extra: dict[str, Any] | None = None) -> bytes:
    """A ``GrowableNet`` (a node) or a ``Predictor`` (a delivered model, with its preprocessing) as bytes."""
    net = model.net if isinstance(model, Predictor) else model
    buf = io.BytesIO()
    payload: dict[str, Any] = {
        "format": FORMAT,
        "spec": net.spec.to_json(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    if isinstance(model, Predictor):
        payload.update(preprocess=model.preprocess.to_payload(), task=model.task, classes=model.classes,
                       input_shape=list(model.input_shape))
    if extra:
        payload["extra"] = extra
    torch.save(payload, buf)
    return buf.getvalue()


def _upgraded(state: dict[str, torch.Tensor], model: GrowableNet, version: str) -> dict[str, torch.Tensor]:
    """A format-1 ``state_dict`` completed with the buffers format 2 added (each plain hidden block's
    ``offset`` 0 and ``scale`` 1), so an older checkpoint loads as the network it was."""
    if version != "dils-search/1":
        return state
    fresh = model.state_dict()
    added = {k: v for k, v in fresh.items() if k.endswith((".offset", ".scale")) and k not in state}
    return {**state, **added}


def from_bytes(data: bytes, *, source: str = "<bytes>", map_location: str | torch.device = "cpu") -> GrowableNet:
    """Rebuild a network with ``torch.load(weights_only=True)``; anything that is not plain data is refused.

    Every way a file can fail to be a checkpoint (not a pickle, not our format, a spec that is not
    one, widths over the limits, tensors that do not fit the spec) raises ``CheckpointError``."""
    return _net(_payload(data, source, map_location), source)


def predictor_from_bytes(data: bytes, *, source: str = "<bytes>", map_location: str | torch.device = "cpu") -> Predictor:
    """The ``Predictor`` (network + recorded preprocessing, task and input shape) stored in ``data``."""
    payload = _payload(data, source, map_location)
    net = _net(payload, source)
    task = payload.get("task")
    shape = payload.get("input_shape", list(net.spec.input_shape))
    if task is not None and not isinstance(task, str):
        raise CheckpointError(f"checkpoint {source}: task must be a string, got {type(task).__name__}")
    if not isinstance(shape, list | tuple) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise CheckpointError(f"checkpoint {source}: input_shape must be a list of positive integers")
    pre = payload.get("preprocess")
    try:
        if pre is None:
            prep = Preprocess.identity(shape, net.spec.input_shape)
        elif isinstance(pre, dict) and all(isinstance(pre.get(k), torch.Tensor) for k in ("mean", "std")):
            prep = Preprocess(pre["mean"].cpu().numpy(), pre["std"].cpu().numpy(), shape, net.spec.input_shape)
        else:
            raise CheckpointError(f"checkpoint {source}: preprocess must hold tensors 'mean' and 'std'")
        return Predictor(net, prep, task, shape).to(map_location)
    except InputError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {source} has invalid preprocessing: {str(exc).splitlines()[0][:200]}") from None


def _payload(data: bytes, source: str, map_location: str | torch.device) -> dict[str, Any]:
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # the unpickler raises many types on bytes that are not a checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {source} refused: not a safe dils-search checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or "spec" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"checkpoint {source} is not a dils-search checkpoint (needs 'spec' and 'state_dict')")
    if payload.get("format") not in READABLE:
        raise CheckpointError(f"checkpoint {source} has format={str(payload.get('format'))[:60]!r}; allowed: "
                              f"{', '.join(map(repr, READABLE))}")
    return payload


def _net(payload: dict[str, Any], source: str) -> GrowableNet:
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
        model.load_state_dict(_upgraded(state, model, str(payload.get("format"))))
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {source} does not match its spec: {str(exc).splitlines()[0][:200]}") from None
    return model


def save(model: GrowableNet | Predictor, path: str | os.PathLike[str], extra: dict[str, Any] | None = None, *,
         make_parents: bool = True) -> Path:
    """Write ``model`` (a network, or a ``Predictor`` with its preprocessing) atomically (a new temp file
    in the target folder, fsync, rename); the CLI passes ``make_parents=False`` so that a typo in ``--out``
    never creates folders."""
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


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Predictor:
    """The model stored at ``path`` (from ``save``, ``deepen`` or ``export``) as a ``Predictor``: it takes
    inputs as the study was given them (raw) and applies the recorded preprocessing itself; ``.net``
    is the network (``.spec``), ``.task`` and ``.classes`` what it predicts."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint path={str(path)!r} does not exist")
    return predictor_from_bytes(p.read_bytes(), source=repr(str(path)), map_location=map_location)


def load_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``extra`` a checkpoint was saved with (``export`` records the data, seed and split there)."""
    try:
        payload = torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True)
    except Exception:  # load() has already refused it with a clear message, or will
        return {}
    extra = payload.get("extra") if isinstance(payload, dict) else None
    return extra if isinstance(extra, dict) else {}
