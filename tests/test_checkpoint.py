"""Checkpoints are spec JSON + state_dict, loaded with weights_only=True: never executable pickle."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from dils_search import ConvSpec, MLPSpec, build
from dils_search.checkpoint import CheckpointError, from_bytes, load, save, to_bytes


class _RunsCode:
    """Unpickling this calls os.system: a checkpoint loader must refuse it before it runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "spec",
    [MLPSpec(5, [7, 3], 2, activation="gelu"), ConvSpec(2, 1, [6, 6], [4, 4], 3, batchnorm=True, residual=True)],
)
def test_save_load_round_trip(tmp_path: Path, spec: MLPSpec | ConvSpec) -> None:
    model = build(spec, seed=0).eval()
    path = save(model, tmp_path / "sub" / "m.pt", extra={"note": "x"})
    again = load(path)
    assert again.spec == spec and _same(model, again)
    x = torch.randn(4, *spec.input_shape)
    assert torch.equal(model(x), again.eval()(x))
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary file left behind
    assert _same(from_bytes(to_bytes(model)), model)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = build(MLPSpec(3, [4], 2), seed=0)
    payload = {"format": "dils-search/1", "spec": model.spec.to_json(), "state_dict": model.state_dict(), "x": _RunsCode(marker)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    with pytest.raises(CheckpointError, match="refused: not a safe dils-search checkpoint"):
        from_bytes(buf.getvalue())
    assert not marker.exists()

    plain = tmp_path / "plain.pt"  # a bare pickle stream, not torch's zip format
    plain.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match="refused"):
        load(plain)
    assert not marker.exists()
    # the same bytes do run code when unpickled naively: the test above is not vacuous
    pickle.loads(plain.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"weights": {}}, "is not a dils-search checkpoint (needs 'spec' and 'state_dict')"),
        ([1, 2, 3], "is not a dils-search checkpoint"),
        ({"spec": '{"kind": "mlp", "in_features": 3, "hidden": [4], "out_features": 2}', "state_dict": {}}, "does not match its spec"),
        ({"spec": "{oops", "state_dict": {}}, "does not match its spec: spec JSON is not valid JSON"),
        ({"spec": 17, "state_dict": {}}, "does not match its spec"),
    ],
)
def test_payloads_that_are_not_checkpoints(payload: object, message: str) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    with pytest.raises(CheckpointError) as err:
        from_bytes(buf.getvalue(), source="'x.pt'")
    assert message in str(err.value) and "'x.pt'" in str(err.value)


def test_wrong_shapes_for_the_spec_are_refused() -> None:
    small = build(MLPSpec(3, [4], 2), seed=0)
    payload = {"spec": MLPSpec(3, [5], 2).to_json(), "state_dict": small.state_dict()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    with pytest.raises(CheckpointError, match="does not match its spec"):
        from_bytes(buf.getvalue())


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope.pt")
    good = to_bytes(build(MLPSpec(3, [4], 2), seed=0))
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="refused"):
        load(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError):
        load(tmp_path / "empty.pt")
    assert issubclass(CheckpointError, ValueError)
