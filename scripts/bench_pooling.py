"""Which pooling should a conv spec use by default? Trains the same small CNN with each pooling
(``avg``/``max`` global, ``flatten`` keeps every location) on the shipped image-like tasks: digits as
1x8x8 (2-D conv) and MNIST-1D as 1x40 (1-D conv). Seeded; prints one JSON object.

    python scripts/bench_pooling.py                 # the run quoted in docs/benchmarks.md
    python scripts/bench_pooling.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dils_search import ConvSpec, build
from dils_search.core.data import load_dataset
from dils_search.core.spec import POOLINGS
from dils_search.core.train import Recipe, evaluate, train

TASKS = {  # name: (dataset, num_samples, dims, input_size, hidden, kernel_size)
    "digits-conv2d": ("digits", None, 2, [8, 8], [16, 16], 3),
    "mnist1d-conv1d": ("mnist1d", 4000, 1, [40], [16, 16], 5),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    ap.add_argument("--out", type=Path, default=None, help="also write bench_pooling.json here")
    a = ap.parse_args()
    seeds, epochs = (1, 2) if a.quick else (a.seeds, a.epochs)
    torch.set_num_threads(1)
    results = []
    for task, (dataset, n, dims, size, hidden, k) in TASKS.items():
        for seed in range(seeds):
            data = load_dataset(dataset, seed=seed, num_samples=n).reshaped((1, *size))
            for pooling in POOLINGS:
                spec = ConvSpec(dims, 1, size, hidden, data.out_features, kernel_size=k, pooling=pooling)
                model = build(spec, seed=seed)
                t = time.perf_counter()
                res = train(model, data, Recipe(optimizer="adam", lr=2e-3, epochs=epochs, batch_size=128, seed=seed))
                results.append({"task": task, "seed": seed, "pooling": pooling, "val": round(res.val_metric, 4),
                                "test": round(evaluate(model, data.x_test, data.y_test, data.task)["metric"], 4),
                                "seconds": round(time.perf_counter() - t, 2)})
                print(json.dumps(results[-1]), file=sys.stderr)
    summary = {f"{t}/{p}": round(statistics.mean(r["test"] for r in results if r["task"] == t and r["pooling"] == p), 4)
               for t in TASKS for p in POOLINGS}
    out = {"benchmark": "pooling", "epochs": epochs, "seeds": seeds, "threads": 1,
           "mean_test_accuracy": summary, "results": results}
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "bench_pooling.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
