"""Streamed (a torch Dataset through a DataLoader) vs in-memory training on the same data.

Both paths get the same standardised splits (``Dataset.from_arrays``; the streamed one wraps its
tensors, or builds each sample from numpy on request), the same model, seed and recipe, so they
see the same batches in the same order. Reports seconds per epoch and the final metrics as JSON.

    python scripts/bench_streaming.py                  # the run quoted in docs/benchmarks.md
    python scripts/bench_streaming.py --quick          # smoke test
    python scripts/bench_streaming.py --device cuda    # on a GPU (default: CUDA when available)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from dils_search import MLPSpec, build
from dils_search.core.data import Dataset, load_dataset
from dils_search.core.train import Recipe, evaluate_split, train


class NumpyItems(TorchDataset):  # type: ignore[type-arg]
    """A map-style dataset that builds each ``(x, y)`` from numpy on request, as a file-backed one would."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.numpy(), y.numpy()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, Any]:
        return self.x[i], self.y[i]


def run(data: Any, spec: MLPSpec, recipe: Recipe, device: torch.device) -> dict[str, Any]:
    model = build(spec, seed=recipe.seed).to(device)
    res = train(model, data, recipe)
    return {"seconds_per_epoch": round(res.seconds / max(res.epochs_run, 1), 4), "flops": res.flops,
            "samples_seen": res.samples_seen, "val": round(res.val_metric, 5),
            "test": round(evaluate_split(model, data, "test")["metric"], 5)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-samples", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small data, 1 epoch, 1 repeat")
    ap.add_argument("--out", type=Path, default=None, help="also write bench_streaming.json here")
    a = ap.parse_args()
    if a.quick:
        a.num_samples, a.epochs, a.repeats = 1000, 1, 1
    torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mem = load_dataset("mnist1d", seed=0, num_samples=a.num_samples)
    sets = {s: (getattr(mem, f"x_{s}"), getattr(mem, f"y_{s}")) for s in ("train", "val", "test")}
    paths = {
        "in_memory": mem.to(device),
        "streamed_tensors": Dataset.from_torch(*(TensorDataset(*sets[s]) for s in sets), task=mem.task,
                                               batch_size=4096).to(device),
        "streamed_numpy_items": Dataset.from_torch(*(NumpyItems(*sets[s]) for s in sets), task=mem.task,
                                                   batch_size=4096).to(device),
    }
    spec = MLPSpec(mem.in_features, [128, 128], mem.out_features)
    recipe = Recipe(epochs=a.epochs, batch_size=a.batch_size, lr=2e-3, seed=0)
    results: dict[str, Any] = {}
    run(mem.to(device), spec, Recipe(epochs=1, batch_size=a.batch_size), device)  # warm-up: lazy init, kernels
    for name, data in paths.items():
        runs = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            runs.append(run(data, spec, recipe, device))
            runs[-1]["wall_s"] = round(time.perf_counter() - t, 3)
        results[name] = {**runs[-1], "seconds_per_epoch": round(statistics.median(r["seconds_per_epoch"] for r in runs), 4)}
    base = results["in_memory"]["seconds_per_epoch"]
    for r in results.values():
        r["slowdown_vs_in_memory"] = round(r["seconds_per_epoch"] / base, 2)
    out = {"benchmark": "streaming", "device": str(device), "threads": a.threads, "n_train": mem.size("train"),
           "epochs": a.epochs, "batch_size": a.batch_size, "repeats": a.repeats, "spec": spec.to_dict(),
           "same_metrics": len({(r["val"], r["test"], r["flops"]) for r in results.values()}) == 1, "results": results}
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "bench_streaming.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
