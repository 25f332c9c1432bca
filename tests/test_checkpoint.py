"""Checkpoints are spec JSON + state_dict, loaded with weights_only=True: never executable pickle."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from dils_search import ConvSpec, MLPSpec, build
from dils_search.core.checkpoint import CheckpointError, from_bytes, load, save, to_bytes


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
    assert again.spec == spec and _same(model, again.net)
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


F = "dils-search/1"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"weights": {}}, "is not a dils-search checkpoint (needs 'spec' and 'state_dict')"),
        ([1, 2, 3], "is not a dils-search checkpoint"),
        ({"format": F, "spec": '{"kind": "mlp", "in_features": 3, "hidden": [4], "out_features": 2}', "state_dict": {}},
         "does not match its spec"),
        ({"format": F, "spec": "{oops", "state_dict": {}}, "has an invalid spec: spec JSON is not valid JSON"),
        ({"format": F, "spec": 17, "state_dict": {}}, "spec must be a JSON string"),
        ({"spec": '{"kind": "mlp", "in_features": 3, "hidden": [4], "out_features": 2}', "state_dict": {}},
         "has format='None'; allowed: 'dils-search/1', 'dils-search/2'"),
        ({"format": F, "spec": '{"kind": "mlp", "in_features": 3, "hidden": [4], "out_features": 2}', "state_dict": [1]},
         "state_dict must map names to tensors"),
        ({"format": F, "spec": '{"kind": "mlp", "in_features": 3, "hidden": [100000000], "out_features": 2}',
          "state_dict": {}}, "has an invalid spec: hidden=[100000000]: width 100000000 is out of range"),
        ({"format": F, "spec": '{"kind": "mlp", "in_features": 3, "hidden": [60000, 60000], "out_features": 2}',
          "state_dict": {}}, "parameters; allowed: at most 100,000,000"),
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
    payload = {"format": F, "spec": MLPSpec(3, [5], 2).to_json(), "state_dict": small.state_dict()}
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


@pytest.mark.parametrize("content", [b"just some text\n", b"e" * 5000, b"PK\x03\x04not a zip", b""])
def test_files_that_are_not_checkpoints_are_refused_as_checkpoint_errors(content: bytes, tmp_path: Path) -> None:
    """A text file, junk or an empty file: always ``CheckpointError`` (a ValueError), never a KeyError
    or a TypeError from inside the unpickler."""
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load(path)


def test_save_refuses_a_folder_and_leaves_no_temp_file(tmp_path: Path) -> None:
    model = build(MLPSpec(3, [4], 2), seed=0)
    with pytest.raises(CheckpointError, match="is a folder"):
        save(model, tmp_path)
    with pytest.raises(CheckpointError, match="folder that does not exist"):
        save(model, tmp_path / "missing" / "m.pt", make_parents=False)
    assert not (tmp_path / "missing").exists() and list(tmp_path.iterdir()) == []
