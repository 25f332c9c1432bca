"""Training-loop overhead: ``dils_search.core.train`` vs a bare hand-written PyTorch loop.

Both train the same model (rebuilt from the same spec and seed) on the same in-memory MNIST-1D
tensors, with the same thread count, batch size and optimizer, in the same process, interleaved:
repetition r times one ``train`` epoch and one bare epoch, alternating which goes first. The
figure of merit is the median over repetitions of (train seconds / bare seconds) per epoch.

``train`` also evaluates on the validation split after every epoch (that is what it is for: early
stopping and the history); the bare loop does not, so the ratio charges that work to ``train``.
The bare loop uses ``torch.optim.Adam`` as a tutorial does (its default, per-tensor, kernels);
``train`` uses the fused kernels. For reference, two more bare variants are timed: one that also
evaluates every epoch, and one with the same fused Adam (the ratio to it is ``train``'s own overhead).

Prints JSON to stdout; ``--out DIR`` also writes ``DIR/bench_train_loop.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dils_search.core.data import Dataset, load_dataset
from dils_search.core.model import build
from dils_search.core.spec import MLPSpec
from dils_search.core.train import Recipe, train


def bare_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bs: int,
               gen: torch.Generator, x_val: torch.Tensor | None = None) -> float:
    """One epoch the way a tutorial writes it; returns wall seconds."""
    start = time.perf_counter()
    model.train()
    perm = torch.randperm(x.shape[0], generator=gen)
    for i in range(0, x.shape[0], bs):
        idx = perm[i : i + bs]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if x_val is not None:
        model.eval()
        with torch.inference_mode():
            model(x_val).argmax(1)
    return time.perf_counter() - start


def measure(data: Dataset, hidden: list[int], reps: int, epochs: int, batch_size: int, lr: float) -> dict[str, Any]:
    spec = MLPSpec(data.in_features, hidden, data.out_features)
    ours = build(spec, seed=0)
    bare = build(spec, seed=0)
    bare_eval = build(spec, seed=0)
    bare_fused = build(spec, seed=0)
    opts = {id(m): torch.optim.Adam(m.parameters(), lr=lr) for m in (bare, bare_eval)}
    opts[id(bare_fused)] = torch.optim.Adam(bare_fused.parameters(), lr=lr, fused=True)
    models = {"bare": bare, "bare_eval": bare_eval, "bare_fused": bare_fused}
    gen = torch.Generator().manual_seed(0)
    x, y = data.x_train, data.y_train
    recipe = Recipe(optimizer="adam", lr=lr, epochs=epochs, batch_size=batch_size, seed=0)

    def run_ours() -> float:
        start = time.perf_counter()
        train(ours, data, recipe)
        return (time.perf_counter() - start) / epochs

    def run_bare(m: torch.nn.Module, with_eval: bool) -> float:
        xv = data.x_val if with_eval else None
        return sum(bare_epoch(m, opts[id(m)], x, y, batch_size, gen, xv) for _ in range(epochs)) / epochs

    names = ["ours", *models]
    for which in names:  # warm-up: allocator, kernels, optimizer state
        run_ours() if which == "ours" else run_bare(models[which], which == "bare_eval")
    rows = []
    for r in range(reps):
        t: dict[str, float] = {}
        for which in names if r % 2 == 0 else names[::-1]:
            t[which] = run_ours() if which == "ours" else run_bare(models[which], which == "bare_eval")
        rows.append(t)
    ratios = [r["ours"] / r["bare"] for r in rows]
    ratios_eval = [r["ours"] / r["bare_eval"] for r in rows]
    ratios_fused = [r["ours"] / r["bare_fused"] for r in rows]
    return {
        "hidden": hidden,
        "steps_per_epoch": math.ceil(x.shape[0] / batch_size),
        "train_epoch_s_median": statistics.median(r["ours"] for r in rows),
        "bare_epoch_s_median": statistics.median(r["bare"] for r in rows),
        "bare_eval_epoch_s_median": statistics.median(r["bare_eval"] for r in rows),
        "bare_fused_epoch_s_median": statistics.median(r["bare_fused"] for r in rows),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_vs_bare_with_eval_median": statistics.median(ratios_eval),
        "ratio_vs_bare_fused_median": statistics.median(ratios_fused),
        "ratios": [round(v, 4) for v in ratios],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few seconds: 4,000 samples, 3 repetitions")
    p.add_argument("--out", default=None, metavar="DIR", help="also write DIR/bench_train_loop.json")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both loops (default 1)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 9; 3 with --quick)")
    p.add_argument("--num-samples", type=int, default=None, help="MNIST-1D samples (default 20000; 4000 with --quick)")
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n = a.num_samples or (4000 if a.quick else 20000)
    reps = a.reps or (3 if a.quick else 9)
    epochs = 1 if a.quick else 2
    t0 = time.perf_counter()
    data = load_dataset("mnist1d", seed=0, num_samples=n)
    gen_s = time.perf_counter() - t0
    # the mnist1d-mlp base net, and a net grown three times from it
    results = [measure(data, h, reps, epochs, a.batch_size, 2e-3) for h in ([64], [64, 128, 128, 64])]
    out = {
        "benchmark": "train_loop",
        "command": "python scripts/bench_train_loop.py" + (" --quick" if a.quick else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "num_samples": n,
        "n_train": int(data.x_train.shape[0]),
        "batch_size": a.batch_size,
        "epochs_per_rep": epochs,
        "reps": reps,
        "data_seconds": round(gen_s, 2),
        "results": results,
        "target": "train epoch <= 1.3x bare epoch (median ratio)",
        "met": all(r["ratio_median"] <= 1.3 for r in results),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_train_loop.json").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
