"""Does an inherited layer fine-tune at least as well as a fresh one? (issue: no collapse after insertion)

For every task, seed, insertion position 0..L, width (narrower than, equal to and wider than the
width entering the position) and init method, it trains the parent once, grows it, then fine-tunes
the child for 5 epochs with the task's study recipe (Adam, 0.5-epoch lr re-warmup). It records the
validation metric before (the parent), right after the insertion, and after 1, 3 and 5 epochs,
beside the parent trained the same epochs with the same recipe (``parent+k``) and a random-init
insertion at the same place (the ``random`` rows).

Tasks: every shipped dataset (digits, MNIST-1D, synthetic regression), a wide-input image task
(digits upscaled to 28 x 28 = 784 inputs), the digits MLP with each other activation (leaky ReLU,
GELU, tanh, sigmoid), a residual digits MLP (for ``zero``) and the MNIST-1D CNN of
``studies/mnist1d-cnn.toml``.

    python scripts/bench_finetune.py --quick                  # smoke test, under a minute
    python scripts/bench_finetune.py --out bench-finetune     # the 3-seed run quoted in docs/benchmarks.md
    python scripts/bench_finetune.py --out lever --tasks digits784,mnist1d-mlp --no-recentre   # a lever

One JSON line per case on stdout; ``--out DIR`` also writes ``results.json``, ``summary.md`` (the
target check) and ``finetune.html`` (a self-contained Plotly page).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dils_search import ConvSpec, GrowOptions, GrowthStep, MLPSpec, build, grow
from dils_search.core.data import Dataset, load_dataset
from dils_search.core.inits import init_allowed
from dils_search.core.spec import Spec, stream_widths
from dils_search.core.train import Recipe, evaluate, train

EPOCHS = (1, 3, 5)
INITS = ("dils-analytic", "dils-approx", "identity", "zero", "random")
TOLERANCE = 0.003  # the target: within 0.3 pp of max(parent+5, random+5)


@dataclass(frozen=True)
class Task:
    name: str
    data: Callable[[int], Dataset]
    spec: Callable[[Dataset], Spec]
    base_epochs: int
    lr: float
    batch_size: int
    calib: int


def _digits784(seed: int) -> Dataset:
    """scikit-learn's digits, bilinearly upscaled from 8 x 8 to 28 x 28 (784 inputs, 1797 images)."""
    from digits784 import digits784  # scripts/digits784.py, beside this script

    return Dataset.from_arrays(*digits784(), task="classification", seed=seed, name="digits784")


def tasks(quick: bool) -> list[Task]:
    n1d = 1000 if quick else 4000
    return [
        Task("digits784", _digits784, lambda d: MLPSpec(784, [64], 10), 10, 1e-3, 128, 512),
        Task("digits-mlp", lambda s: load_dataset("digits", seed=s), lambda d: MLPSpec(64, [32], 10), 15, 1e-3, 64, 1024),
        *(Task(f"digits-{act}", lambda s: load_dataset("digits", seed=s),
               lambda d, act=act: MLPSpec(64, [32], 10, activation=act), 15, 1e-3, 64, 1024)
          for act in ("leaky_relu", "gelu", "tanh", "sigmoid")),
        Task("digits-residual", lambda s: load_dataset("digits", seed=s),
             lambda d: MLPSpec(64, [32, 32], 10, residual=True), 15, 1e-3, 64, 1024),
        Task("mnist1d-mlp", lambda s: load_dataset("mnist1d", seed=s, num_samples=n1d),
             lambda d: MLPSpec(40, [64], 10), 30, 2e-3, 128, 1024),
        Task("synthetic", lambda s: load_dataset("synthetic", seed=s, num_samples=4000, options={"task": "regression"}),
             lambda d: MLPSpec(16, [32], 1), 20, 2e-3, 128, 1024),
        Task("mnist1d-cnn", lambda s: load_dataset("mnist1d", seed=s, num_samples=n1d),
             lambda d: ConvSpec(1, 1, [40], [16], 10, kernel_size=5, batchnorm=True, pooling="flatten"), 15, 2e-3, 128, 512),
    ]


def widths(d: int) -> dict[str, int]:
    """Narrower (half, at most 64: a wide input meets a usual layer; none for one channel), equal and
    wider (twice) than ``d``."""
    narrower = {"narrower": min(d // 2, 64)} if d > 1 else {}
    return {**narrower, "equal": d, "wider": 2 * d}


def _val(model: torch.nn.Module, data: Dataset) -> float:
    return evaluate(model, data.x_val, data.y_val, data.task)["metric"]


def _fine_tune(model: torch.nn.Module, data: Dataset, recipe: Recipe) -> dict[str, float]:
    model = copy.deepcopy(model)
    result = train(model, data, recipe)
    return {f"after_{h['epoch']}": h["val_metric"] for h in result.history if h["epoch"] in EPOCHS}


def run_task(task: Task, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    data = task.data(seed)
    spec = task.spec(data)
    data = data.reshaped(spec.input_shape)
    parent = build(spec, seed=seed)
    train(parent, data, Recipe(epochs=task.base_epochs, lr=task.lr, batch_size=task.batch_size, seed=seed))
    tune = Recipe(epochs=max(EPOCHS), lr=task.lr, batch_size=task.batch_size, rewarmup_epochs=args.rewarmup, seed=seed)
    before = _val(parent, data)
    base = {"task": task.name, "seed": seed, "before": before}
    rows = [{**base, "init": "parent+k", "position": -1, "width": 0, "width_class": "-", "incoming": 0,
             "right_after": before, **_fine_tune(parent, data, tune)}]
    print(json.dumps(rows[0]), flush=True)
    calib = data.x_train[: task.calib]
    opts = GrowOptions(seed=seed, recentre=args.recentre, approx_epochs=args.approx_epochs,
                       target_basis=args.target_basis, fresh_scale=args.fresh_scale, gain=args.gain)
    for position in range(1 if spec.residual else 0, len(spec.hidden) + 1):
        d = stream_widths(spec)[position]
        for width_class, width in widths(d).items():
            for init in args.inits:
                if not init_allowed(spec, position, init, width) or (init == "identity" and width != d):
                    continue
                start = time.perf_counter()
                child = grow(parent, GrowthStep(position, width, init), calib, opts)
                grow_s = time.perf_counter() - start
                row = {**base, "init": init, "position": position, "width": width, "width_class": width_class,
                       "incoming": d, "basis": child.growth_info.basis, "grow_seconds": round(grow_s, 3),
                       "right_after": _val(child, data),
                       **_fine_tune(child, data, tune)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------- the target check


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def chance(task: str) -> float:
    """The metric of a model that learned nothing: 1/10 accuracy, or R^2 = 0."""
    return 0.0 if task == "synthetic" else 0.1


def check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case (task, position, width class, init), means over seeds, and the issue's two targets:
    inherited inits after 5 epochs >= max(parent+5, random+5) - 0.3 pp; nothing ends at chance."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["position"], r["width_class"], r["init"])].append(r)
    parent = {t: _mean([r["after_5"] for r in g]) for (t, p, w, i), g in groups.items() if i == "parent+k"}
    cases = []
    for (t, p, w, i), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        if i == "parent+k":
            continue
        rand = groups.get((t, p, w, "random"))
        ref = max(parent[t], _mean([r["after_5"] for r in rand])) if rand else parent[t]
        case = {"task": t, "position": p, "width_class": w, "width": g[0]["width"], "init": i, "seeds": len(g),
                "before": _mean([r["before"] for r in g]), "right_after": _mean([r["right_after"] for r in g]),
                **{f"after_{k}": _mean([r[f"after_{k}"] for r in g]) for k in EPOCHS},
                "parent_5": parent[t], "reference": ref, "worst_5": min(r["after_5"] for r in g)}
        case["delta_pp"] = 100 * (case["after_5"] - ref)
        case["at_chance"] = case["worst_5"] <= chance(t) + 0.05
        case["meets"] = i not in ("dils-analytic", "dils-approx") or case["delta_pp"] >= -100 * TOLERANCE
        cases.append(case)
    inherited = [c for c in cases if c["init"] in ("dils-analytic", "dils-approx")]
    return {"cases": cases, "inherited_cases": len(inherited), "inherited_met": sum(c["meets"] for c in inherited),
            "worst_inherited_delta_pp": min((c["delta_pp"] for c in inherited), default=0.0),
            "at_chance": [c for c in cases if c["at_chance"]]}


def summary_md(result: dict[str, Any]) -> str:
    lines = [f"inherited cases meeting the target (>= max(parent+5, random+5) - {100 * TOLERANCE:.1f} pp, mean over "
             f"seeds): {result['inherited_met']}/{result['inherited_cases']}; worst delta "
             f"{result['worst_inherited_delta_pp']:+.2f} pp; cases ending at chance: {len(result['at_chance'])}", "",
             "| task | pos | width | init | before | right after | +1 | +3 | +5 | parent+5 | max(parent, random)+5 | delta pp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        flag = "" if c["meets"] else " **miss**"
        lines.append(f"| {c['task']} | {c['position']} | {c['width_class']} {c['width']} | {c['init']} | {c['before']:.4f} | "
                     f"{c['right_after']:.4f} | {c['after_1']:.4f} | {c['after_3']:.4f} | {c['after_5']:.4f} | "
                     f"{c['parent_5']:.4f} | {c['reference']:.4f} | {c['delta_pp']:+.2f}{flag} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """delta pp after 5 epochs per case, one bar group per init, one row per task."""
    from plotly.subplots import make_subplots

    tasks_ = sorted({c["task"] for c in result["cases"]})
    fig = make_subplots(rows=len(tasks_), cols=1, subplot_titles=tasks_, vertical_spacing=0.06)
    colours = {"dils-analytic": "#1f77b4", "dils-approx": "#ff7f0e", "identity": "#2ca02c", "zero": "#9467bd",
               "random": "#7f7f7f"}
    for row, t in enumerate(tasks_, start=1):
        for init, colour in colours.items():
            cs = [c for c in result["cases"] if c["task"] == t and c["init"] == init]
            if cs:
                fig.add_bar(x=[f"p{c['position']} {c['width_class']}" for c in cs], y=[c["delta_pp"] for c in cs],
                            name=init, marker_color=colour, showlegend=row == 1, legendgroup=init, row=row, col=1)
        fig.add_hline(y=-100 * TOLERANCE, line_dash="dot", row=row, col=1)
    fig.update_yaxes(title_text="pp vs max(parent, random) after 5 epochs")
    fig.update_layout(height=320 * len(tasks_), barmode="group", title="Fine-tuning after an insertion (mean of seeds)")
    path.write_text(fig.to_html(include_plotlyjs=True, full_html=True), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write results.json, summary.md and finetune.html here")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed, digits tasks only, smaller data")
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    parser.add_argument("--inits", default=",".join(INITS), help="comma-separated init methods")
    parser.add_argument("--no-recentre", dest="recentre", action="store_false", help="lever: no offset buffer")
    parser.add_argument("--no-target-basis", dest="target_basis", action="store_false",
                        help="lever: no reduced-rank (target) rows for narrow MLP layers")
    parser.add_argument("--no-gain", dest="gain", action="store_false",
                        help="lever: tanh/sigmoid rows keep their linear-range scale in the weights")
    parser.add_argument("--no-fresh-scale", dest="fresh_scale", action="store_false",
                        help="lever: inherited rows under BatchNorm keep their own scale")
    parser.add_argument("--rewarmup", type=float, default=0.5, help="lever: re-warmup epochs of the fine-tuning")
    parser.add_argument("--approx-epochs", type=int, default=100, help="lever: dils-approx's epoch cap")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-log", type=Path, help="run nothing: summarise the JSON lines of an earlier run's stdout")
    args = parser.parse_args(argv)
    args.inits = [i for i in args.inits.split(",") if i]
    torch.set_num_threads(args.threads)
    chosen = [t for t in tasks(args.quick) if not args.tasks or t.name in args.tasks.split(",")]
    if args.quick and not args.tasks:  # the three digits tasks (784 and 64 pixels, residual); the activations' own
        chosen = [t for t in chosen if t.name in ("digits784", "digits-mlp", "digits-residual")]  # are tested
    seeds = range(1 if args.quick else args.seeds)
    start = time.perf_counter()
    if args.from_log:
        rows = [json.loads(line) for line in args.from_log.read_text().splitlines() if line.startswith('{"task"')]
    else:
        rows = [r for t in chosen for s in seeds for r in run_task(t, s, args)]
    result = check(rows)
    out = {"levers": {k: v for k, v in vars(args).items() if k not in ("out", "threads")}, "seconds": round(time.perf_counter() - start, 1),
           "inherited_met": result["inherited_met"], "inherited_cases": result["inherited_cases"],
           "worst_inherited_delta_pp": round(result["worst_inherited_delta_pp"], 3), "at_chance": len(result["at_chance"])}
    print(json.dumps(out))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"summary": out, "rows": rows, **result}, default=float, indent=1))
        (args.out / "summary.md").write_text(summary_md(result))
        plot(result, args.out / "finetune.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
