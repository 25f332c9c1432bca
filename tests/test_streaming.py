"""A map-style torch Dataset streamed through a DataLoader trains and scores like the in-memory path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

import dils_search as ds
from dils_search import ConvSpec, MLPSpec, build
from dils_search.core.data import Dataset
from dils_search.core.stream import StreamedDataset
from dils_search.core.train import Recipe, evaluate_split, train


class _Lazy(TorchDataset):  # type: ignore[type-arg]
    """Builds each sample on request, from numpy: nothing but an index is held per sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.numpy(), y.numpy()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


def _streamed(d: Dataset, lazy: bool = False, **kw: object) -> StreamedDataset:
    """The in-memory splits (already standardised: the streamed path does not normalise) as torch datasets."""
    wrap = _Lazy if lazy else TensorDataset
    return Dataset.from_torch(*(wrap(getattr(d, f"x_{s}"), getattr(d, f"y_{s}")) for s in ("train", "val", "test")),
                              **kw)  # type: ignore[arg-type]


def _data(task: str) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5) if task == "classification" else x[:, :2] @ [1.0, -2.0]
    return Dataset.from_arrays(x, y, task=task, seed=1)


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("lazy", [False, True])
def test_streamed_training_matches_in_memory(task: str, lazy: bool) -> None:
    mem = _data(task)
    streamed = _streamed(mem, lazy, task=task, batch_size=64)
    assert (streamed.task, streamed.out_features, streamed.in_features) == (mem.task, mem.out_features, mem.in_features)
    assert all(streamed.size(s) == mem.size(s) for s in ("train", "val", "test"))
    recipe = Recipe(epochs=4, batch_size=32, lr=3e-3, seed=5, patience=2, schedule="cosine", rewarmup_epochs=0.5)
    spec = MLPSpec(6, [16, 16], mem.out_features)
    a, b = build(spec, seed=0), build(spec, seed=0)
    ra, rb = train(a, mem, recipe), train(b, streamed, recipe)
    # the same batches in the same order: the same samples seen and FLOPs, the same weights up to float error
    assert (ra.samples_seen, ra.flops, ra.epochs_run, ra.best_epoch) == (rb.samples_seen, rb.flops, rb.epochs_run, rb.best_epoch)
    for ha, hb in zip(ra.history, rb.history, strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
        assert ha["val_metric"] == pytest.approx(hb["val_metric"], abs=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)
    for split in ("train", "val", "test"):  # the same weights score the same on both paths
        ea, eb = evaluate_split(a, mem, split), evaluate_split(a, streamed, split)
        assert ea["metric"] == pytest.approx(eb["metric"], abs=1e-5) and ea["loss"] == pytest.approx(eb["loss"], rel=1e-5)


def test_streamed_conv_data_is_reshaped_per_batch() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 1, 8, 8)).astype(np.float32)
    y = np.arange(200) % 3
    mem = Dataset.from_arrays(x, y)
    assert mem.sample_shape == (1, 8, 8)
    spec = ConvSpec(2, 1, [8, 8], [4], 3)
    mem = mem.reshaped(spec.input_shape)
    streamed = _streamed(mem, batch_size=50).reshaped(spec.input_shape)
    assert streamed.sample_shape == (1, 8, 8) and streamed.head(7).shape == (7, 1, 8, 8)
    assert torch.equal(streamed.head(7), mem.head(7))
    a, b = build(spec, seed=0), build(spec, seed=0)
    recipe = Recipe(epochs=2, batch_size=16, seed=0)
    ra, rb = train(a, mem, recipe), train(b, streamed, recipe)
    assert ra.flops == rb.flops and ra.val_metric == pytest.approx(rb.val_metric, abs=1e-5)


def test_from_torch_infers_and_checks_labels() -> None:
    x = torch.randn(30, 3)
    ok = Dataset.from_torch(TensorDataset(x, torch.arange(30) % 3), TensorDataset(x, torch.arange(30) % 3),
                            TensorDataset(x, torch.arange(30) % 3))
    assert ok.task == "classification" and ok.inferred and ok.out_features == 3
    assert ok.describe() == ("data torch: task classification (inferred: whole-number labels are classes; set task to choose), "
                             "metric accuracy, 3 classes, input shape [3], train/val/test 30/30/30")
    reg = Dataset.from_torch(*[TensorDataset(x, torch.randn(30, 2))] * 3)
    assert reg.task == "regression" and reg.out_features == 2 and "metric r2, 2 output(s)" in reg.describe()
    gappy = TensorDataset(x, torch.tensor([0, 1, 5] * 10))
    with pytest.raises(ValueError, match=r"class labels 0, 1, 5; labels must be the integers 0..K-1"):
        Dataset.from_torch(gappy, gappy, gappy)
    only01 = TensorDataset(x, torch.arange(30) % 2)
    with pytest.warns(UserWarning, match=r"class label\(s\) 2 are absent from the training split"):
        Dataset.from_torch(only01, TensorDataset(x, torch.arange(30) % 3), only01)
    with pytest.raises(ValueError, match="must be a map-style torch Dataset"):
        Dataset.from_torch([1, 2, 3], 5, None)


@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_nan_in_streamed_data_is_named_as_bad_data(where: str) -> None:
    """Not a TrainingDiverged that points at the learning rate: a DataError naming the split and the sample."""
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    bad_x, bad_y = x.clone(), y.clone()
    (bad_x if where == "inputs" else bad_y)[17, 0] = float("nan")
    good, bad = TensorDataset(x, y), TensorDataset(bad_x, bad_y)
    data = Dataset.from_torch(bad, good, good, task="regression", batch_size=8)
    with pytest.raises(ds.DataError, match=rf"sample 17 of the train split has NaN or inf {where}"):
        train(build(MLPSpec(3, [4], 1), seed=0), data, Recipe(epochs=1, batch_size=8))
    nan_labels = TensorDataset(x, torch.where(torch.arange(40) == 5, float("nan"), 1.0))
    with pytest.raises(ds.DataError, match="the val split has 1 NaN or inf labels"):
        Dataset.from_torch(TensorDataset(x, torch.ones(40)), nan_labels, nan_labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_batches_follow_the_model_to_cuda() -> None:
    mem = _data("classification")
    streamed = _streamed(mem, task="classification").to("cuda")
    model = build(MLPSpec(6, [8], mem.out_features), seed=0).to("cuda")
    res = train(model, streamed, Recipe(epochs=1, batch_size=32))
    assert math.isfinite(res.val_metric) and evaluate_split(model, streamed, "test")["metric"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_streaming.py", "bench_pooling.py"])
def test_bench_scripts_quick(script: str, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "scripts" / script), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, cwd=root,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert (tmp_path / f"{script[:-3]}.json").is_file()
    if script == "bench_streaming.py":
        assert out["same_metrics"] and len({r["flops"] for r in out["results"].values()}) == 1
    else:
        assert set(out["mean_test_accuracy"]) == {f"{t}/{p}" for t in ("digits-conv2d", "mnist1d-conv1d")
                                                  for p in ("avg", "max", "flatten")}
