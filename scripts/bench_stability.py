"""Stability: does inheritance stabilise deep plain networks (the paper's claim)?

Deep plain MLPs (8 and 16 hidden layers of one width, ReLU, no residual connections) are trained
two ways, on MNIST-1D and on the synthetic deep-teacher regression task, over 5 seeds:

- ``scratch``: the deep net built at full depth with PyTorch's default init and trained with Adam;
- ``grown``: a 2-hidden-layer net trained first, then deepened one layer at a time by dils-analytic
  (inserted right before the head, same width), fine-tuned for a few epochs after each insertion.

Both arms get the same total training FLOPs: the grown arm's schedule (base epochs, fine-tune
epochs after every insertion, and the insertions' own cost) fixes the budget, and scratch gets the
whole number of full-depth epochs that first reaches it (so scratch never gets less). Seeds vary
the initialisation and the batch order; the data split is fixed. A run *diverged* if its loss
became NaN/inf; it is *stuck* if its test metric ends at chance (accuracy below 1/classes + 0.05,
or R^2 below 0.05). Prints JSON; ``--out DIR`` also writes ``DIR/bench_stability.json`` and a
self-contained ``DIR/bench_stability.html``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

CHANCE_MARGIN = 0.05


class Setup(NamedTuple):
    dataset: str
    num_samples: int
    task: str
    width: int
    lr: float
    batch_size: int
    base_epochs: int
    epochs_per_insert: int
    calib: int


FULL = {
    "mnist1d": Setup("mnist1d", 4000, "classification", 64, 2e-3, 128, 10, 2, 1024),
    "synthetic": Setup("synthetic", 4000, "regression", 64, 2e-3, 128, 10, 2, 1024),
}
QUICK = {
    "synthetic": Setup("synthetic", 600, "regression", 16, 2e-3, 128, 2, 1, 256),
}


def load(setup: Setup) -> Any:
    from dils_search.core.data import load_dataset

    options = {"task": setup.task} if setup.dataset == "synthetic" else None
    return load_dataset(setup.dataset, seed=0, num_samples=setup.num_samples, options=options)


def chance_level(data: Any) -> float:
    if data.task == "classification":
        return 1.0 / data.out_features + CHANCE_MARGIN
    return CHANCE_MARGIN


def run_one(args: tuple[str, Setup, int, int]) -> dict[str, Any]:
    """One seed of one (dataset, depth): the grown arm, then scratch at the same FLOPs."""
    name, setup, depth, seed = args
    import torch

    torch.set_num_threads(1)
    from dils_search.core.grow import GrowOptions, GrowthStep, grow
    from dils_search.core.model import build, forward_flops
    from dils_search.core.spec import MLPSpec
    from dils_search.core.train import Recipe, TrainingDiverged, evaluate, train

    data = load(setup)
    n = int(data.x_train.shape[0])
    calib = data.x_train[: setup.calib]
    chance = chance_level(data)
    out: dict[str, Any] = {"dataset": name, "depth": depth, "seed": seed}

    def recipe(epochs: int, rewarmup: float = 0.0) -> Recipe:
        return Recipe(lr=setup.lr, epochs=epochs, batch_size=setup.batch_size, rewarmup_epochs=rewarmup, seed=seed)

    def finish(arm: str, model: torch.nn.Module | None, flops: float, seconds: float, diverged: bool, extra: dict[str, Any]) -> None:
        test = evaluate(model, data.x_test, data.y_test, data.task)["metric"] if model is not None and not diverged else float("nan")
        if not math.isfinite(test):
            diverged = True
        out[arm] = {"test": None if diverged else test, "diverged": diverged,
                    "stuck": (not diverged) and test < chance, "flops": int(flops), "seconds": round(seconds, 2), **extra}

    # grown: 2 hidden layers, then dils-analytic insertions right before the head
    start = time.perf_counter()
    spec = MLPSpec(data.in_features, [setup.width] * 2, data.out_features)
    model = build(spec, seed=seed)
    flops = 0.0
    diverged = False
    gaps = []
    try:
        flops += train(model, data, recipe(setup.base_epochs)).flops
        for i in range(depth - 2):
            pos = len(model.spec.hidden)
            model = grow(model, GrowthStep(pos, setup.width, "dils-analytic"), calib, GrowOptions(seed=seed * 1000 + i))
            flops += model.growth_info.flops  # type: ignore[union-attr]
            gaps.append(model.growth_info.calib_gap)  # type: ignore[union-attr]
            flops += train(model, data, recipe(setup.epochs_per_insert, rewarmup=0.5)).flops
    except TrainingDiverged:
        diverged = True
    finish("grown", model, flops, time.perf_counter() - start, diverged,
           {"max_insert_gap": max(gaps) if gaps else 0.0, "epochs_at_full_depth": setup.epochs_per_insert})
    budget = flops

    # scratch: full depth from the start, whole epochs until the grown arm's FLOPs are reached
    start = time.perf_counter()
    deep = MLPSpec(data.in_features, [setup.width] * depth, data.out_features)
    per_epoch = 3 * forward_flops(deep) * n
    epochs = max(1, math.ceil(budget / per_epoch))
    model = build(deep, seed=seed)
    diverged = False
    sflops = 0.0
    try:
        sflops = train(model, data, recipe(epochs)).flops
    except TrainingDiverged:
        diverged = True
        sflops = budget
    finish("scratch", model, sflops, time.perf_counter() - start, diverged, {"epochs": epochs})
    out["chance"] = chance
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["depth"]), []).append(r)
    out = []
    for (ds, depth), rs in groups.items():
        entry: dict[str, Any] = {"dataset": ds, "depth": depth, "seeds": len(rs)}
        for arm in ("scratch", "grown"):
            tests = [r[arm]["test"] for r in rs if r[arm]["test"] is not None]
            entry[arm] = {
                "mean": statistics.fmean(tests) if tests else None,
                "std": statistics.stdev(tests) if len(tests) > 1 else None,
                "min": min(tests) if tests else None,
                "diverged": sum(r[arm]["diverged"] for r in rs),
                "stuck_at_chance": sum(r[arm]["stuck"] for r in rs),
                "flops_mean": statistics.fmean(r[arm]["flops"] for r in rs),
                "seconds_mean": statistics.fmean(r[arm]["seconds"] for r in rs),
                "tests": [None if t is None else round(t, 4) for t in (r[arm]["test"] for r in rs)],
            }
        g, s = entry["grown"], entry["scratch"]
        entry["grown_std_lower"] = g["std"] is not None and s["std"] is not None and g["std"] < s["std"]
        entry["grown_none_stuck"] = g["stuck_at_chance"] == 0 and g["diverged"] == 0
        out.append(entry)
    return out


class Bar(NamedTuple):
    label: str
    arm: str
    tests: list[float | None]


def bars(summary: list[dict[str, Any]]) -> list[Bar]:
    return [Bar(f"{e['dataset']} depth {e['depth']}", arm, e[arm]["tests"]) for e in summary for arm in ("scratch", "grown")]


def draw(data: list[Bar], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for arm, color in (("scratch", "#d62728"), ("grown", "#1f77b4")):
        xs, ys = [], []
        for b in (b for b in data if b.arm == arm):
            for t in b.tests:
                xs.append(b.label)
                ys.append(t)
        fig.add_trace(go.Box(x=xs, y=ys, name=arm, marker_color=color, boxpoints="all", jitter=0.3))
    fig.update_layout(boxmode="group", title="Deep plain MLPs: test metric over seeds at equal training FLOPs",
                      yaxis_title="test metric (accuracy or R^2)")
    path.write_text(fig.to_html(include_plotlyjs=True, full_html=True), encoding="utf-8")


def warm_up() -> None:
    """Pay one-off import costs before anything is timed (forked workers inherit the modules):
    the first ``torch.optim`` optimizer imports torch._dynamo and sympy, seconds on a busy machine."""
    import torch

    torch.set_num_threads(1)
    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny synthetic data, depth 4, 2 seeds")
    p.add_argument("--out", default=None, metavar="DIR", help="also write DIR/bench_stability.json and .html")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..K-1 (default 5; 2 with --quick)")
    p.add_argument("--depths", default=None, help="comma-separated hidden-layer counts (default 8,16; 4 with --quick)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (default 2)")
    a = p.parse_args(argv)
    setups = QUICK if a.quick else FULL
    depths = [int(d) for d in (a.depths or ("4" if a.quick else "8,16")).split(",")]
    seeds = list(range(a.seeds or (2 if a.quick else 5)))
    for setup in setups.values():
        load(setup)  # generate once in the parent; forked workers inherit the memoised arrays
    warm_up()
    jobs = [(name, setup, d, s) for name, setup in setups.items() for d in sorted(depths, reverse=True) for s in seeds]
    start = time.perf_counter()
    if a.jobs > 1:
        with mp.get_context("fork").Pool(a.jobs) as pool:
            rows = list(pool.imap(run_one, jobs))
    else:
        rows = [run_one(j) for j in jobs]
    summary = summarise(rows)
    result = {
        "benchmark": "stability",
        "command": "python scripts/bench_stability.py" + (" --quick" if a.quick else ""),
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                           for f in ("ru_utime", "ru_stime")), 1),
        "setups": {k: v._asdict() for k, v in setups.items()},
        "summary": summary,
        "targets": {
            "grown_std_lower_everywhere": all(e["grown_std_lower"] for e in summary),
            "grown_never_stuck_or_diverged": all(e["grown_none_stuck"] for e in summary),
        },
        "runs": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_stability.json").write_text(text + "\n", encoding="utf-8")
        draw(bars(summary), Path(a.out) / "bench_stability.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
