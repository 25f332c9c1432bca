"""The delivered model carries its preprocessing: raw inputs in, the study's test metric out.

A study standardises its inputs with the training split's statistics; the exported model holds
them as buffers (``core/preprocess.py``), so ``dils_search.load(path)(raw_x)`` scores the study's
delivered test metric on the raw test rows, and so do its ONNX file in onnxruntime and its
``torch.export`` program: for a CLI study on a raw ``.npz`` file, for the Python API on raw arrays
and (tests/test_study.py, tests/test_finalize.py) for built-in datasets. The data here is
scikit-learn's digits saved raw (pixel values 0..16), as in the report that filed the issue.
"""

from __future__ import annotations

import io
import json
import math
import os
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import optuna
import pytest
import torch
from sklearn.datasets import load_digits

import dils_search as ds
from dils_search.cli import main
from dils_search.core.checkpoint import FORMAT, to_bytes
from dils_search.core.data import split_indices
from dils_search.core.export import run_exported

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONFIG = """name = "raw-digits"
seed = 0
[data]
dataset = "file"
path = "digits_raw.npz"
[model]
kind = "conv"
dims = 2
hidden = [8]
pooling = "flatten"
[train]
lr = 0.003
base_epochs = 3
epochs_per_step = 1
[search]
max_steps = 1
widths = [8]
n_trials = 2
sampler = "random"
[final]
epochs = 1
top_k = 1
"""


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return d.images[:, None].astype(np.float64), d.target  # N x 1 x 8 x 8, pixel values 0..16


def _accuracy(out: np.ndarray | torch.Tensor, y: np.ndarray) -> float:
    return float((np.asarray(out).argmax(1) == y).mean())


@pytest.fixture(scope="module")
def cli_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A conv study on raw image files with their own test split, run by the CLI, and its show --json."""
    work = tmp_path_factory.mktemp("raw")
    x, y = _raw_digits()
    np.savez(work / "digits_raw.npz", x=x[:1500], y=y[:1500], x_test=x[1500:], y_test=y[1500:])
    (work / "cfg.toml").write_text(CONFIG)
    url = f"sqlite:///{work / 's.db'}"
    here = os.getcwd()
    os.chdir(work)
    try:
        assert main(["run", "cfg.toml", "--storage", url, "--artifacts", "art", "--no-report", "--quiet"]) == 0
    finally:
        os.chdir(here)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["show", "--storage", url, "--study-name", "raw-digits", "--json"]) == 0
    return {"work": work, "url": url, "final": json.loads(buf.getvalue())["final"], "x_test": x[1500:],
            "y_test": y[1500:]}


def _export(study: dict[str, Any], fmt: str, name: str, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    out = study["work"] / name
    capsys.readouterr()
    here = os.getcwd()
    os.chdir(study["work"])  # the config names its data file relative to the folder the study ran in
    try:
        rc = main(["export", "--storage", study["url"], "--study-name", "raw-digits", "--artifacts",
                   str(study["work"] / "art"), "--out", str(out), "--format", fmt])
    finally:
        os.chdir(here)
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file(), printed
    return out, printed


@pytest.mark.slow  # a CLI study (or a GrowthTree study) and exports
def test_exported_checkpoint_scores_the_delivered_metric_on_raw_inputs(cli_study: dict[str, Any],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out, printed = _export(cli_study, "dils", "model.pt", capsys)
    final, x, y = cli_study["final"], cli_study["x_test"], cli_study["y_test"]
    model = ds.load(out)
    assert isinstance(model, ds.Predictor) and model.task == "classification" and model.classes == 10
    assert model.input_shape == (1, 8, 8) and not model.preprocess.is_identity
    got = ds.evaluate(model, torch.as_tensor(x), torch.as_tensor(y), "classification")["metric"]
    assert got == pytest.approx(final["test_metric"], abs=1e-6)
    assert f"test metric {final['test_metric']:.4f}" in printed  # export says so itself
    assert np.array_equal(model.predict(x.reshape(len(x), -1)).numpy(), model.predict(x).numpy())  # flat rows too
    # what the issue saw: the network alone, given raw pixels, is not the delivered model
    raw_net = ds.evaluate(model.net, torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y), "classification")
    assert raw_net["metric"] < got - 0.05
    # the checkpoint records the task, the class count and the input shape
    payload = torch.load(out, weights_only=True)
    assert payload["format"] == FORMAT == "dils-search/2"
    assert (payload["task"], payload["classes"], payload["input_shape"]) == ("classification", 10, [1, 8, 8])
    assert set(payload["preprocess"]) == {"mean", "std"} and payload["preprocess"]["mean"].dtype == torch.float64


@pytest.mark.slow  # a CLI study (or a GrowthTree study) and exports
@pytest.mark.parametrize(("fmt", "name"), [("onnx", "model.onnx"), ("torch.export", "model.pt2")])
def test_onnx_and_torch_export_match_torch_on_the_raw_test_rows(cli_study: dict[str, Any], fmt: str, name: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, printed = _export(cli_study, fmt, name, capsys)
    checkpoint, _ = _export(cli_study, "dils", f"{name}.pt", capsys)
    x, y = cli_study["x_test"], cli_study["y_test"]
    with torch.inference_mode():
        reference = ds.load(checkpoint).eval()(torch.as_tensor(x, dtype=torch.float32)).numpy()
    if fmt == "onnx":  # read back by onnxruntime itself, as a serving stack would
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.astype(np.float32)})[0]
        assert [i.name for i in session.get_inputs()] == ["x"]
        assert session.run(None, {"x": x[:3].astype(np.float32)})[0].shape == (3, 10)  # any batch size
    else:
        got = torch.export.load(str(out)).module()(torch.as_tensor(x, dtype=torch.float32)).detach().numpy()
    assert np.abs(got - reference).max() < 1e-4
    assert np.array_equal(got.argmax(1), reference.argmax(1))  # the same predictions, row by row
    assert _accuracy(got, y) == pytest.approx(cli_study["final"]["test_metric"], abs=1e-6)
    assert "largest |" in printed


@pytest.mark.slow  # a CLI study (or a GrowthTree study) and exports
def test_deepen_keeps_the_preprocessing_and_the_metadata(cli_study: dict[str, Any], monkeypatch: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = _export(cli_study, "dils", "to-deepen.pt", capsys)
    monkeypatch.chdir(cli_study["work"])  # deepen reads the data the checkpoint records
    deeper = cli_study["work"] / "deeper.pt"
    rc = main(["deepen", str(out), "--insert", "1:64:dils-analytic", "--epochs", "0", "--out", str(deeper), "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    before, after = ds.load(out), ds.load(deeper)
    assert len(after.spec.hidden) == len(before.spec.hidden) + 1
    assert (after.task, after.classes, after.input_shape) == (before.task, before.classes, before.input_shape)
    assert torch.equal(after.preprocess.mean, before.preprocess.mean)
    assert torch.equal(after.preprocess.std, before.preprocess.std)
    x, y = cli_study["x_test"], cli_study["y_test"]
    raw = ds.evaluate(after, torch.as_tensor(x), torch.as_tensor(y), "classification")["metric"]
    assert raw == pytest.approx(res["metric_after_insert"], abs=1e-6)  # raw inputs in, deepen's own figure out


@pytest.mark.slow  # a CLI study (or a GrowthTree study) and exports
def test_export_refuses_unknown_formats_and_a_pt2_without_its_suffix(cli_study: dict[str, Any], monkeypatch: Any,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    base = ["export", "--storage", cli_study["url"], "--study-name", "raw-digits", "--artifacts",
            str(cli_study["work"] / "art")]
    capsys.readouterr()
    monkeypatch.chdir(cli_study["work"])
    assert main([*base, "--out", str(cli_study["work"] / "m.ts"), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.export" in err[0] and "torchscript" in err[0]
    assert main([*base, "--out", str(cli_study["work"] / "m.bin"), "--format", "torch.export"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must end in .pt2" in err[0]
    assert not (cli_study["work"] / "m.bin").exists() and not (cli_study["work"] / "m.ts").exists()


@pytest.mark.slow  # a CLI study (or a GrowthTree study) and exports
def test_growth_tree_on_raw_arrays_saves_a_model_that_takes_raw_arrays(tmp_path: Path) -> None:
    """The README's Python API path: raw arrays in, a served model out, scored on the raw test rows."""
    x, y = _raw_digits()
    x = x.reshape(len(x), -1)  # 0..16 pixel values, as load_digits gives them
    data = ds.Dataset.from_arrays(x, y, seed=0)  # task inferred from the integer labels
    tree = ds.GrowthTree(base=ds.MLPSpec(data.in_features, [16], data.out_features), data=data,
                         recipe=ds.Recipe(epochs=3, lr=3e-3), storage=f"sqlite:///{tmp_path / 'my.db'}",
                         artifacts=str(tmp_path / "art"))
    space = ds.GrowthSpace(max_steps=1, widths=[16])
    study = optuna.create_study(direction=tree.direction, sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: tree.train(tree.suggest(t, space), trial=t).val_metric, n_trials=2)
    final = tree.finalize(study)
    path = final.save(tmp_path / "model.pt")
    tree.close()
    _, _, test = split_indices(len(x), seed=0)  # the raw test rows of the seeded split
    model = ds.load(path)
    got = ds.evaluate(model, torch.as_tensor(x[test]), torch.as_tensor(y[test]), "classification")["metric"]
    assert got == pytest.approx(final.test_metric, abs=1e-6)
    for fmt, name in (("onnx", "m.onnx"), ("torch.export", "m.pt2")):
        out = ds.export(model, tmp_path / name, fmt)
        served = run_exported(out, fmt, x[test])
        assert _accuracy(served, y[test]) == pytest.approx(final.test_metric, abs=1e-6)


def test_regression_targets_stay_in_the_users_units(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(50.0, 20.0, size=(300, 4))  # far from standardised
    y = x @ np.array([0.5, -1.0, 0.25, 2.0]) + 100.0
    data = ds.Dataset.from_arrays(x, y, seed=0)
    assert data.task == "regression" and data.inferred
    net = ds.build(ds.MLPSpec(4, [16], 1), seed=0)
    ds.train(net, data, ds.Recipe(epochs=30, lr=1e-2))
    ds.save(ds.Predictor(net, data.preprocess(), "regression"), tmp_path / "r.pt")
    model = ds.load(tmp_path / "r.pt")
    _, _, test = split_indices(len(x), seed=0)
    raw = ds.evaluate(model, torch.as_tensor(x[test]), torch.as_tensor(y[test]), "regression")["metric"]
    assert raw == pytest.approx(ds.evaluate(net, data.x_test, data.y_test, "regression")["metric"], abs=1e-6)
    assert model.classes is None and model.predict(x[test]).shape == (len(test), 1)


def test_format_1_files_still_load_with_no_preprocessing(tmp_path: Path) -> None:
    net = ds.build(ds.MLPSpec(3, [4], 2), seed=0)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith(".offset")}  # format 1 had no offsets
    old = {"format": "dils-search/1", "spec": net.spec.to_json(), "state_dict": state}
    torch.save(old, tmp_path / "old.pt")
    model = ds.load(tmp_path / "old.pt")
    assert model.preprocess.is_identity and model.task is None and model.input_shape == (3,)
    x = torch.randn(5, 3)
    assert torch.equal(model(x), net(x))
    # a stored node (a bare network) round-trips with the network's own state_dict keys
    payload = torch.load(io.BytesIO(to_bytes(net)), weights_only=True)
    assert set(payload["state_dict"]) == set(net.state_dict()) and "preprocess" not in payload


def test_bad_preprocessing_in_a_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    net = ds.build(ds.MLPSpec(3, [4], 2), seed=0)
    bad = {"format": FORMAT, "spec": net.spec.to_json(), "state_dict": net.state_dict(), "input_shape": [3],
           "preprocess": {"mean": torch.zeros(3, dtype=torch.float64), "std": torch.tensor([1.0, 0.0, math.inf])}}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ds.CheckpointError, match="invalid preprocessing: preprocessing needs finite means"):
        ds.load(tmp_path / "bad.pt")
