"""Benchmark the DILS init methods on real data: how much of the function each one keeps.

For every task (digits and MNIST-1D MLPs, a residual digits MLP, a digits 1x8x8 Conv2d and an
MNIST-1D Conv1d), seed, insertion position, width (half, equal to and twice the incoming width)
and init method, it trains the parent once, grows it, and records:

- ``gap``: the largest absolute output difference on the test split, relative to the largest
  output (``dils_search.core.grow.output_gap``);
- test accuracy before, right after the insertion, and after ``k`` fine-tune epochs (the same
  ``k`` and recipe for every method, with a one-epoch lr re-warmup);
- insertion wall time and FLOPs.

A ``parent+k`` row per task and seed trains the parent for the same ``k`` epochs without inserting
anything. Each result is printed as one JSON line on stdout; ``--out DIR`` also writes
``results.json``, ``summary.md`` and ``inherit.html`` (a self-contained Plotly page).

    python scripts/bench_inherit.py --quick              # smoke test, well under a minute
    python scripts/bench_inherit.py --out bench-out      # the full run quoted in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dils_search import ConvSpec, GrowOptions, GrowthStep, MLPSpec, build, grow, output_gap
from dils_search.core.data import Dataset, load_dataset
from dils_search.core.grow import check_step
from dils_search.core.model import stream_widths
from dils_search.core.spec import Spec
from dils_search.core.train import Recipe, evaluate, train
from dils_search.registry import INITS

WIDTH_CLASSES = ("half", "equal", "double")


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    spec: Spec
    base_epochs: int
    lr: float
    num_samples: int | None = None


def tasks(quick: bool) -> list[Task]:
    mnist1d_n = 1000 if quick else 4000
    full = [
        Task("digits-mlp", "digits", MLPSpec(64, [32, 32], 10), 40, 3e-3),
        Task("digits-mlp-residual", "digits", MLPSpec(64, [32, 32], 10, residual=True), 40, 3e-3),
        Task("mnist1d-mlp", "mnist1d", MLPSpec(40, [64, 64], 10), 60, 3e-3, mnist1d_n),
        Task("digits-cnn2d", "digits", ConvSpec(2, 1, [8, 8], [8, 16], 10, batchnorm=True, pooling="flatten"), 20, 3e-3),
        Task("mnist1d-cnn1d", "mnist1d", ConvSpec(1, 1, [40], [16, 16], 10, batchnorm=True, pooling="flatten"), 30, 3e-3, mnist1d_n),
    ]
    if quick:
        return [replace(t, base_epochs=max(1, t.base_epochs // 4)) for t in full if t.dataset == "digits"]
    return full


def _width(width_class: str, d: int) -> int:
    """0 when the class does not exist (half of one channel)."""
    return {"half": d // 2, "equal": d, "double": 2 * d}[width_class]


def _distinct(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop 'half' rows that are not narrower than their input (results of older runs had them)."""
    return [r for r in rows if not (r.get("width_class") == "half" and r["width"] >= r["incoming"])]


def _accuracy(model: torch.nn.Module, data: Dataset) -> float:
    return evaluate(model, data.x_test, data.y_test, data.task)["metric"]


def _load(task: Task, seed: int) -> Dataset:
    data = load_dataset(task.dataset, seed=seed, num_samples=task.num_samples)
    return data.reshaped(task.spec.input_shape)


def run_task(task: Task, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every insertion for one task and seed; one dict per result."""
    data = _load(task, seed)
    parent = build(task.spec, seed=seed)
    train(parent, data, Recipe(epochs=task.base_epochs, lr=task.lr, batch_size=64, seed=seed))
    parent.eval()
    before = _accuracy(parent, data)
    calib = data.x_train[: args.calib]
    finetune = Recipe(epochs=args.finetune_epochs, lr=task.lr * args.finetune_lr_scale, batch_size=64, rewarmup_epochs=1.0, seed=seed)
    opts = GrowOptions(seed=seed, approx_epochs=args.approx_epochs)
    common = {"task": task.name, "seed": seed, "acc_before": before, "finetune_epochs": args.finetune_epochs}
    rows = []

    control = build(task.spec)
    control.load_state_dict(parent.state_dict())
    res = train(control, data, finetune)
    rows.append({**common, "init": "parent+k", "position": None, "width": None, "width_class": None, "gap": 0.0,
                 "acc_after": before, "acc_finetuned": _accuracy(control, data), "finetune_seconds": res.seconds})

    spec = task.spec
    positions = range(1 if spec.residual else 0, len(spec.hidden) + 1)
    if args.quick:
        positions = range(len(spec.hidden), len(spec.hidden) + 1)
    for position in positions:
        d = stream_widths(spec)[position]
        for width_class in ("equal",) if args.quick else WIDTH_CLASSES:
            width = _width(width_class, d)
            if width == 0:
                continue
            for init in INITS.names():
                step = GrowthStep(position, width, init)
                try:
                    check_step(spec, step)
                except ValueError:
                    continue
                start = time.perf_counter()
                child = grow(parent, step, calib, opts)
                seconds = time.perf_counter() - start
                row = {
                    **common, "init": init, "position": position, "incoming": d, "width": width,
                    "width_class": width_class, "basis": child.growth_info.basis,
                    "gap": output_gap(parent, child, data.x_test), "calib_gap": child.growth_info.calib_gap,
                    "acc_after": _accuracy(child, data), "insert_seconds": seconds,
                    "insert_flops": child.growth_info.flops,
                }
                res = train(child, data, finetune)
                row.update(acc_finetuned=_accuracy(child, data), finetune_seconds=res.seconds, finetune_flops=res.flops)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps(rows[0]), flush=True)
    return rows


# --------------------------------------------------------------------------- summary and plot


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per task x init x width class: gaps, accuracy changes (percentage points), time."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in _distinct(rows):
        groups[(r["task"], r["init"], r["width_class"] or "-")].append(r)
    order = {name: i for i, name in enumerate(["parent+k", *INITS.names(), "-", *WIDTH_CLASSES])}
    out = []
    for (task, init, wc), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], order[kv[0][2]])):
        after = [100 * (r["acc_after"] - r["acc_before"]) for r in rs]
        tuned = [100 * (r["acc_finetuned"] - r["acc_before"]) for r in rs]
        out.append({
            "task": task, "init": init, "width": wc, "n": len(rs),
            "gap_max": max(r["gap"] for r in rs), "gap_median": statistics.median(r["gap"] for r in rs),
            "d_acc_after_mean": statistics.fmean(after), "d_acc_after_worst": min(after),
            "d_acc_finetuned_mean": statistics.fmean(tuned),
            "insert_ms_mean": 1000 * statistics.fmean(r.get("insert_seconds", 0.0) for r in rs),
        })
    return out


def losses(rows: list[dict[str, Any]]) -> list[str]:
    """Cases where another method ends fine-tuning ahead of dils-analytic (same task, seed, position, width)."""
    cases: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for r in _distinct(rows):
        if r["init"] != "parent+k":
            cases[(r["task"], r["seed"], r["position"], r["width_class"])][r["init"]] = r["acc_finetuned"]
    wins: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for (task, *_), accs in cases.items():
        if "dils-analytic" not in accs:
            continue
        for init, acc in accs.items():
            if init != "dils-analytic":
                wins[(task, init)][1] += 1
                wins[(task, init)][0] += int(acc > accs["dils-analytic"])
    return [f"{task}: {init} finished fine-tuning ahead of dils-analytic in {w} of {n} cases"
            for (task, init), (w, n) in sorted(wins.items()) if w]


def markdown(summary: list[dict[str, Any]]) -> str:
    head = ("| task | init | width | n | max gap | median gap | Δacc right after (mean / worst, pp) "
            "| Δacc after k epochs (mean, pp) | insert ms |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = [
        f"| {s['task']} | {s['init']} | {s['width']} | {s['n']} | {s['gap_max']:.1e} | {s['gap_median']:.1e} "
        f"| {s['d_acc_after_mean']:+.2f} / {s['d_acc_after_worst']:+.2f} | {s['d_acc_finetuned_mean']:+.2f} "
        f"| {s['insert_ms_mean']:.0f} |"
        for s in summary
    ]
    return head + "\n".join(lines) + "\n"


def position_markdown(rows: list[dict[str, Any]]) -> str:
    """dils-analytic per task, position and width (its basis, gap, accuracy changes) beside every
    other method's accuracy change after fine-tuning (pp, mean over seeds)."""
    cells: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    control: dict[str, list[float]] = defaultdict(list)
    for r in _distinct(rows):
        if r["init"] == "parent+k":
            control[r["task"]].append(100 * (r["acc_finetuned"] - r["acc_before"]))
        else:
            cells[(r["task"], r["position"], r["incoming"], r["width"], r["width_class"])][r["init"]].append(r)
    others = [i for i in INITS.names() if i != "dils-analytic"]
    head = ("| task | p | d → width | dils-analytic basis | gap | Δacc after / after k (pp) | "
            + " | ".join(f"{i} after k" for i in others) + " | parent+k |\n|" + "---|" * (7 + len(others)) + "\n")
    lines = []
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[3])):
        task, position, d, width, _ = key
        by = cells[key]
        a = by.get("dils-analytic", [])
        if not a:
            continue

        def tuned(rs: list[dict[str, Any]]) -> str:
            return f"{statistics.fmean(100 * (r['acc_finetuned'] - r['acc_before']) for r in rs):+.2f}" if rs else "–"

        after = statistics.fmean(100 * (r["acc_after"] - r["acc_before"]) for r in a)
        lines.append(
            f"| {task} | {position} | {d} → {width} | {'/'.join(sorted({r['basis'] for r in a}))} "
            f"| {max(r['gap'] for r in a):.1e} | {after:+.2f} / {tuned(a)} | "
            + " | ".join(tuned(by.get(i, [])) for i in others)
            + f" | {statistics.fmean(control[task]):+.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def figure_data(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and init: the largest gap (floored at 1e-12 for a log axis) and the mean accuracy
    change right after insertion and after fine-tuning."""
    summary = summary_rows(rows)
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in summary:
        by[(s["task"], s["init"])].append(s)
    tasks_ = sorted({t for t, _ in by})
    inits = [i for i in ["parent+k", *INITS.names()] if any(i == j for _, j in by)]
    data: dict[str, Any] = {"tasks": tasks_, "inits": inits, "gap": {}, "after": {}, "tuned": {}}
    for init in inits:
        data["gap"][init] = [max((s["gap_max"] for s in by.get((t, init), [])), default=None) for t in tasks_]
        data["after"][init] = [_mean([s["d_acc_after_mean"] for s in by.get((t, init), [])]) for t in tasks_]
        data["tuned"][init] = [_mean([s["d_acc_finetuned_mean"] for s in by.get((t, init), [])]) for t in tasks_]
    for init in inits:
        data["gap"][init] = [None if g is None else max(g, 1e-12) for g in data["gap"][init]]
    return data


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def draw(data: dict[str, Any]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=3, cols=1, subplot_titles=(
        "largest relative output gap on the test split (log)",
        "accuracy change right after insertion (pp)",
        "accuracy change after k fine-tune epochs (pp)",
    ))
    for init in data["inits"]:
        for row, key in ((1, "gap"), (2, "after"), (3, "tuned")):
            if key == "gap" and init == "parent+k":
                continue
            fig.add_trace(go.Bar(name=init, x=data["tasks"], y=data[key][init], legendgroup=init, showlegend=row == 2), row=row, col=1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(barmode="group", height=1000, title="dils-search: inheritance by init method")
    return fig


def write_outputs(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_rows(rows)
    payload = {"args": vars(args), "rows": rows, "summary": summary}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / "summary.md").write_text(
        markdown(summary) + "\n" + "\n".join(f"- {line}" for line in losses(rows)) + "\n\n" + position_markdown(rows)
    )
    fig = draw(figure_data(rows))
    fig.write_html(out / "inherit.html", include_plotlyjs=True)
    try:
        fig.write_image(out / "inherit.png")
    except Exception as exc:  # kaleido is optional
        print(f"bench_inherit: no PNG ({type(exc).__name__}); the HTML file has the plot", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: three small tasks, one seed, one position")
    parser.add_argument("--out", type=Path, help="write results.json, summary.md and inherit.html here")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1, or 0 with --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these models are too small to gain from more)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="k, the same for every method (default 3, 1 with --quick)")
    parser.add_argument("--finetune-lr-scale", type=float, default=0.3,
                        help="fine-tune lr = this x the parent's training lr (default 0.3)")
    parser.add_argument("--calib", type=int, default=512, help="calibration samples from the training split (default 512)")
    parser.add_argument("--approx-epochs", type=int, default=None, help="dils-approx epoch cap (default 200, 20 with --quick)")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these task names")
    parser.add_argument("--summarise", type=Path, metavar="RESULTS_JSON",
                        help="run nothing: rebuild summary.md and the plot in --out from an earlier results.json")
    args = parser.parse_args(argv)
    if args.summarise:
        if not args.out:
            parser.error("--summarise needs --out DIR")
        saved = json.loads(args.summarise.read_text())
        write_outputs(args.out, saved["rows"], argparse.Namespace(**saved["args"]))
        print((args.out / "summary.md").read_text())
        return 0
    args.seeds = args.seeds or ([0] if args.quick else [0, 1])
    args.finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else (1 if args.quick else 3)
    args.approx_epochs = args.approx_epochs if args.approx_epochs is not None else (20 if args.quick else 200)
    torch.set_num_threads(args.threads)
    chosen = [t for t in tasks(args.quick) if args.tasks is None or t.name in args.tasks]
    if not chosen:
        parser.error(f"--tasks {args.tasks} matches none of: {', '.join(t.name for t in tasks(args.quick))}")
    start = time.perf_counter()
    rows = []
    for task in chosen:
        for seed in args.seeds:
            rows.extend(run_task(task, seed, args))
    print(markdown(summary_rows(rows)), file=sys.stderr)
    for line in losses(rows):
        print(f"- {line}", file=sys.stderr)
    print(f"bench_inherit: {len(rows)} results in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.out:
        write_outputs(args.out, rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
