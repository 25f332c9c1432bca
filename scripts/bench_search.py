"""Search compute: does growing with inheritance (DILS) find a good depth for less compute than
training every candidate from scratch?

For each task and seed, every policy runs as its own study (its own SQLite file and artifact
folder, so no policy gets another's nodes for free) through the real ``run_study``:
``optuna`` restricted to dils-analytic, dils-approx, identity (Net2Net) or random (AutoGrow's
init), and ``scratch`` (the same candidate space, every candidate trained from random init for as
many epochs as it would have seen along its growth path). The policies of one (task, seed) run
back to back in one process, so they see the same machine conditions; ``--jobs`` processes run
(task, seed) units in parallel.

Per study, in trial order: cumulative training FLOPs (the ``flops_spent`` user attr), cumulative
trial wall seconds (Optuna's start/complete stamps, so loading reused nodes and the store count),
and the model a user would pick so far (highest validation metric) with its test metric.

Reported per task: compute to reach a target (best final test metric of all policies on that
seed minus 0.5 pp), best test metric at equal compute (the smallest total FLOPs of any policy on
that seed), nodes trained vs node uses reused, and the DILS target: the FLOPs and wall seconds
dils-analytic needs to come within 0.5 pp of scratch's best test metric, as a fraction of
scratch's, median over seeds. Prints JSON; writes ``DIR/bench_search.json`` and a self-contained
``DIR/bench_search.html`` (plotly.js embedded).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
MARGIN = 0.005

POLICIES: dict[str, dict[str, Any]] = {
    "optuna/dils-analytic": {"policy": "optuna", "inits": ["dils-analytic"]},
    "optuna/dils-approx": {"policy": "optuna", "inits": ["dils-approx"]},
    "optuna/identity": {"policy": "optuna", "inits": ["identity"]},
    "optuna/random": {"policy": "optuna", "inits": ["random"]},
    # the candidate space of optuna/dils-analytic (same parameter names, same sampler seed), no inheritance
    "scratch": {"policy": "scratch", "inits": ["dils-analytic"]},
}

# Each task is a shipped config plus the overrides that fit the whole benchmark (4 tasks x 5
# policies x 3 seeds) into about 20 minutes on 2 cores. Recipes keep the configs' optimizer, lr and
# batch size; epochs and trials are cut, the same way for every policy. Every node's training
# anneals its lr with a cosine (train.schedule), scratch's included: with a constant lr the last
# epoch's model is noisy and grown nets lagged scratch by 1-2 pp on MNIST-1D (docs/benchmarks.md).
FULL: dict[str, dict[str, Any]] = {
    "mnist1d-mlp": {
        "data": {"num_samples": 20000},
        # 8 epochs between growth steps: at 4 (and 6) the grown nets fall short of scratch on one fixed
        # path, at 8 they match it (``--diagnose --diag-epochs 4,8``, docs/benchmarks.md)
        "train": {"base_epochs": 8, "epochs_per_step": 8, "schedule": "cosine"},
        "search": {"n_trials": 10, "max_steps": 3, "widths": [64, 128, 256]},
    },
    "mnist1d-cnn": {
        "data": {"num_samples": 20000},
        "train": {"base_epochs": 6, "epochs_per_step": 4, "schedule": "cosine"},
        "search": {"n_trials": 8, "max_steps": 2, "widths": [16, 32]},
    },
    "digits-mlp": {
        "train": {"schedule": "cosine"},
        "search": {"n_trials": 10},
    },
    "synthetic": {
        "train": {"base_epochs": 15, "epochs_per_step": 6, "schedule": "cosine"},
        "search": {"n_trials": 10, "max_steps": 3},
    },
}

QUICK: dict[str, dict[str, Any]] = {
    "synthetic": {
        "data": {"num_samples": 600},
        "train": {"base_epochs": 2, "epochs_per_step": 1},
        "grow": {"approx_epochs": 5},
        "search": {"n_trials": 2, "max_steps": 2, "widths": [32]},
    },
}


def task_config(task: str, overrides: dict[str, Any], policy: str, seed: int) -> Any:
    from dils_search.config import load_config

    cfg = load_config(ROOT / "studies" / f"{task}.toml")
    search = {**overrides.get("search", {}), **POLICIES[policy]}
    sections = {k: v for k, v in overrides.items() if k != "search"}
    return cfg.replace(seed=seed, search=search, **sections)


# ---------------------------------------------------------------- one (task, seed): every policy


def trial_curve(url: str, name: str) -> list[dict[str, Any]]:
    """Per finished trial, in order: cumulative FLOPs and wall seconds, and the pick so far."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=url)
    flops = seconds = 0.0
    best: tuple[float, float] | None = None
    out = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.datetime_start and t.datetime_complete:
            seconds += (t.datetime_complete - t.datetime_start).total_seconds()
        flops += float(t.user_attrs.get("flops_spent", 0))
        vals = t.user_attrs.get("vals")
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and vals:
            cand = (float(max(vals)), float(t.user_attrs["test_metric"]))
            if best is None or cand[0] > best[0]:
                best = cand
        if best is not None:
            out.append({"trial": t.number, "flops": flops, "seconds": round(seconds, 3), "best_val": best[0],
                        "test": best[1]})
    return out


def run_unit(args: tuple[str, int, dict[str, Any], list[str], str]) -> list[dict[str, Any]]:
    task, seed, overrides, policies, workdir = args
    import logging

    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("dils_search").setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    from dils_search.search.study import run_study
    from dils_search.search.summary import summarize
    from dils_search.search.trainers import make_task

    rows = []
    for policy in policies:
        cfg = task_config(task, overrides, policy, seed)
        tag = f"{task}--{policy.replace('/', '_')}--s{seed}"
        url = f"sqlite:///{Path(workdir) / (tag + '.db')}"
        art = str(Path(workdir) / tag)
        t0 = time.perf_counter()
        make_task(cfg, "cpu")  # memoised per process; its (one-off) data generation is not search compute
        data_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_study(cfg, url, art, tag, progress=False, device="cpu")
        wall = time.perf_counter() - t0
        s = summarize(url, tag, art)
        rows.append({
            "task": task, "policy": policy, "seed": seed, "study": tag,
            "wall_s": round(wall, 2), "data_s": round(data_s, 2),
            "n_trials": s.n_trials, "states": s.states,
            "best_val": s.best_val, "best_test": s.best_test, "best_hidden": s.best_hidden,
            "best_params": s.best_params,
            "nodes": s.nodes, "nodes_trained": s.nodes_trained, "node_uses_reused": s.node_uses_reused,
            "duplicate_trainings": s.duplicate_trainings,
            "flops_spent": s.flops_spent, "scratch_equivalent_flops": s.scratch_equivalent_flops,
            "curve": trial_curve(url, tag),
        })
        print(f"[bench_search] {tag}: best test {s.best_test}, {s.flops_spent / 1e9:.2f} GFLOP, {wall:.0f} s",
              file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- analysis (figure data; no drawing)


def to_target(curve: list[dict[str, Any]], target: float) -> tuple[float | None, float | None]:
    for p in curve:
        if p["test"] >= target - 1e-12:
            return p["flops"], p["seconds"]
    return None, None


def at_compute(curve: list[dict[str, Any]], flops: float) -> float | None:
    best = None
    for p in curve:
        if p["flops"] <= flops * (1 + 1e-9):
            best = p["test"]
    return best


def _median(xs: list[float | None]) -> float | None:
    """Median where None (never reached) counts as +inf; None if the median itself is infinite."""
    vals = [math.inf if x is None else float(x) for x in xs]
    if not vals:
        return None
    m = statistics.median(vals)
    return None if math.isinf(m) else m


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def analyse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out: dict[str, Any] = {}
    for task in tasks:
        tr = [r for r in rows if r["task"] == task]
        seeds = sorted({r["seed"] for r in tr})
        policies = list(dict.fromkeys(r["policy"] for r in tr))
        by = {(r["policy"], r["seed"]): r for r in tr}
        per_seed: dict[int, dict[str, Any]] = {}
        for s in seeds:
            runs = {p: by[(p, s)] for p in policies if (p, s) in by}
            finals = [r["best_test"] for r in runs.values() if r["best_test"] is not None]
            target = max(finals) - MARGIN if finals else None
            equal = min(r["curve"][-1]["flops"] for r in runs.values() if r["curve"]) if runs else None
            entry: dict[str, Any] = {"target": target, "equal_compute_flops": equal, "policies": {}}
            for p, r in runs.items():
                f, sec = to_target(r["curve"], target) if target is not None else (None, None)
                entry["policies"][p] = {"flops_to_target": f, "seconds_to_target": sec,
                                        "test_at_equal_compute": at_compute(r["curve"], equal) if equal else None}
            per_seed[s] = entry
        summary = {}
        for p in policies:
            rs = [by[(p, s)] for s in seeds if (p, s) in by]
            tests = [r["best_test"] for r in rs if r["best_test"] is not None]
            eq = [per_seed[r["seed"]]["policies"][p]["test_at_equal_compute"] for r in rs]
            m, sd = _mean_std(tests)
            me, sde = _mean_std([x for x in eq if x is not None])
            summary[p] = {
                "best_test_mean": m, "best_test_std": sd,
                "test_at_equal_compute_mean": me, "test_at_equal_compute_std": sde,
                "reached_target": sum(per_seed[r["seed"]]["policies"][p]["flops_to_target"] is not None for r in rs),
                "seeds": len(rs),
                "flops_to_target_median": _median([per_seed[r["seed"]]["policies"][p]["flops_to_target"] for r in rs]),
                "seconds_to_target_median": _median([per_seed[r["seed"]]["policies"][p]["seconds_to_target"] for r in rs]),
                "total_flops_median": statistics.median(r["flops_spent"] for r in rs),
                "total_seconds_median": statistics.median(r["curve"][-1]["seconds"] if r["curve"] else 0.0 for r in rs),
                "study_wall_s_median": statistics.median(r["wall_s"] for r in rs),
                "nodes_trained_mean": statistics.fmean(r["nodes_trained"] for r in rs),
                "node_uses_reused_mean": statistics.fmean(r["node_uses_reused"] for r in rs),
                "trials": statistics.fmean(r["n_trials"] for r in rs),
            }
        out[task] = {"per_seed": per_seed, "policies": summary, "dils_target": dils_target(by, seeds)}
    return out


def dils_target(by: dict[tuple[str, int], dict[str, Any]], seeds: list[int], policy: str = "optuna/dils-analytic") -> dict[str, Any] | None:
    """dils-analytic vs scratch: compute to come within 0.5 pp of scratch's best test metric."""
    if not all((policy, s) in by and ("scratch", s) in by for s in seeds):
        return None
    per = []
    for s in seeds:
        d, sc = by[(policy, s)], by[("scratch", s)]
        if sc["best_test"] is None or not sc["curve"]:
            continue
        target = sc["best_test"] - MARGIN
        f, sec = to_target(d["curve"], target)
        sf, ssec = to_target(sc["curve"], target)
        total_f, total_s = sc["curve"][-1]["flops"], sc["curve"][-1]["seconds"]
        per.append({
            "seed": s, "scratch_best_test": sc["best_test"], "dils_best_test": d["best_test"],
            "target": target, "dils_flops": f, "dils_seconds": sec,
            "scratch_total_flops": total_f, "scratch_total_seconds": total_s,
            "scratch_flops_to_target": sf, "scratch_seconds_to_target": ssec,
            "flops_ratio": None if f is None else f / total_f,
            "seconds_ratio": None if sec is None else sec / total_s,
            "flops_ratio_vs_scratch_to_target": None if f is None or not sf else f / sf,
            "seconds_ratio_vs_scratch_to_target": None if sec is None or not ssec else sec / ssec,
        })
    fr = _median([p["flops_ratio"] for p in per])
    sr = _median([p["seconds_ratio"] for p in per])
    return {
        "per_seed": per,
        "flops_ratio_median": fr,
        "seconds_ratio_median": sr,
        "flops_ratio_vs_scratch_to_target_median": _median([p["flops_ratio_vs_scratch_to_target"] for p in per]),
        "seconds_ratio_vs_scratch_to_target_median": _median([p["seconds_ratio_vs_scratch_to_target"] for p in per]),
        "reached": sum(p["dils_flops"] is not None for p in per),
        "met": fr is not None and sr is not None and fr <= 0.4 and sr <= 0.5,
    }


# ---------------------------------------------------------------- drawing


class Line(NamedTuple):
    task: str
    policy: str
    seed: int
    flops: list[float]
    seconds: list[float]
    test: list[float]


def lines(rows: list[dict[str, Any]]) -> list[Line]:
    return [Line(r["task"], r["policy"], r["seed"], [p["flops"] for p in r["curve"]],
                 [p["seconds"] for p in r["curve"]], [p["test"] for p in r["curve"]]) for r in rows]


def draw(data: list[Line], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tasks = list(dict.fromkeys(d.task for d in data))
    colors = dict(zip(POLICIES, ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#d62728"], strict=True))
    fig = make_subplots(rows=len(tasks), cols=2, subplot_titles=[f"{t}: {x}" for t in tasks
                                                                  for x in ("vs training FLOPs", "vs wall seconds")])
    shown: set[str] = set()
    for i, task in enumerate(tasks, 1):
        for d in (d for d in data if d.task == task):
            for col, xs in ((1, d.flops), (2, d.seconds)):
                fig.add_trace(go.Scatter(
                    x=xs, y=d.test, mode="lines+markers", line={"shape": "hv", "color": colors.get(d.policy)},
                    name=d.policy, legendgroup=d.policy, showlegend=d.policy not in shown,
                    hovertemplate=f"{d.policy} seed {d.seed}<br>%{{x:.3g}}<br>test %{{y:.4f}}<extra></extra>",
                ), row=i, col=col)
                shown.add(d.policy)
            fig.update_xaxes(type="log", row=i, col=1)
        fig.update_yaxes(title_text="test metric of the pick so far", row=i, col=1)
    fig.update_layout(height=330 * len(tasks), title="dils-search: best-so-far test metric (picked by validation) vs compute")
    path.write_text(fig.to_html(include_plotlyjs=True, full_html=True), encoding="utf-8")


# ---------------------------------------------------------------- diagnosis: one fixed growth path


DIAG_PATHS = {  # a path each task's search did visit, ending in a deep, well-scoring architecture
    "mnist1d-mlp": ((0, 128), (2, 256), (1, 256)),  # [64] -> [128, 64] -> [128, 64, 256] -> [128, 256, 64, 256]
    "mnist1d-cnn": ((1, 32), (2, 32)),  # [16] -> [16, 32] -> [16, 32, 32]
}
DIAG_INITS = {
    "mnist1d-mlp": ("dils-analytic", "random", "dils-approx/random-start"),
    "mnist1d-cnn": ("dils-analytic", "random"),
}


def diagnose(task_name: str, seed: int, epochs_per_step: list[int], rewarmups: list[float],
             path: tuple[tuple[int, int], ...] | None = None, schedule: str | None = None) -> list[dict[str, Any]]:
    """One growth path of ``task_name`` (20,000 MNIST-1D samples) under each init, against its final
    architecture trained from scratch for the epochs it would see in the search (base + steps x
    epochs per step). Test accuracy right after each insertion and after each fine-tune."""
    import torch

    from dils_search.core.grow import GrowOptions, GrowthStep, grow
    from dils_search.core.model import build
    from dils_search.core.train import Recipe, evaluate, train
    from dils_search.search.trainers import make_task

    torch.set_num_threads(1)
    cfg = task_config(task_name, FULL[task_name], "optuna/dils-analytic", 0)
    task = make_task(cfg, "cpu")
    data, calib, t = task.data, task.calib, cfg.train
    sched = schedule or t.schedule
    path = path or DIAG_PATHS[task_name]

    def acc(m: Any) -> float:
        return round(float(evaluate(m, data.x_test, data.y_test, data.task)["metric"]), 4)

    final = task.base
    for pos, width in path:
        final = final.with_hidden([*final.hidden[:pos], width, *final.hidden[pos:]])
    rows = []
    for eps in epochs_per_step:
        start = time.perf_counter()
        model = build(final, seed=seed)
        epochs = t.base_epochs + len(path) * eps
        r = train(model, data, Recipe(lr=t.lr, epochs=epochs, batch_size=t.batch_size, schedule=sched, seed=seed))
        scratch = {"init": "scratch", "epochs_per_step": eps, "rewarmup_epochs": None, "hidden": list(final.hidden),
                   "test": acc(model), "flops": r.flops, "seconds": round(time.perf_counter() - start, 1),
                   "epochs": epochs}
        rows.append(scratch)
        for rewarmup in rewarmups:
            for init in DIAG_INITS[task_name]:
                start = time.perf_counter()
                model = build(task.base, seed=seed)
                flops = train(model, data, Recipe(lr=t.lr, epochs=t.base_epochs, batch_size=t.batch_size, schedule=sched,
                                                  seed=seed)).flops
                traj: list[Any] = [acc(model)]
                for i, (pos, width) in enumerate(path):
                    start_from = "random" if init.endswith("/random-start") else "dils-analytic"
                    opts = GrowOptions(ridge=cfg.grow.ridge, approx_tol=cfg.grow.approx_tol,
                                       approx_epochs=cfg.grow.approx_epochs, approx_init=start_from,
                                       seed=seed * 10 + i)
                    model = grow(model, GrowthStep(pos, width, init.split("/")[0]), calib, opts)
                    flops += model.growth_info.flops
                    after = acc(model)
                    flops += train(model, data, Recipe(lr=t.lr, epochs=eps, batch_size=t.batch_size, schedule=sched,
                                                       rewarmup_epochs=rewarmup, seed=seed * 10 + i)).flops
                    traj.append({"after_insert": after, "after_fine_tune": acc(model)})
                rows.append({"init": init, "epochs_per_step": eps, "rewarmup_epochs": rewarmup,
                             "hidden": list(model.spec.hidden), "test": traj[-1]["after_fine_tune"], "flops": flops,
                             "seconds": round(time.perf_counter() - start, 1), "trajectory": traj,
                             "flops_vs_scratch": round(flops / scratch["flops"], 3),
                             "test_minus_scratch_pp": round(100 * (traj[-1]["after_fine_tune"] - scratch["test"]), 2)})
            print(f"[diagnose] {task_name} epochs/step {eps} rewarmup {rewarmup}: "
                  + ", ".join(f"{r['init']} {r['test']}" for r in rows[-len(DIAG_INITS[task_name]):])
                  + f" (scratch {scratch['test']})", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- main


def warm_up() -> None:
    """Pay one-off import costs before anything is timed (forked workers inherit the modules):
    the first ``torch.optim`` optimizer imports torch._dynamo and sympy, seconds on a busy machine."""
    import torch

    torch.set_num_threads(1)
    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny synthetic task, one seed, 2 trials per policy")
    p.add_argument("--out", default="bench-out", metavar="DIR", help="where the JSON and HTML go (default bench-out)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of: " + ", ".join(FULL))
    p.add_argument("--policies", default=None, help="comma-separated subset of: " + ", ".join(POLICIES))
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..K-1 (default 3; 1 with --quick)")
    p.add_argument("--n-trials", type=int, default=None, help="override every task's trial count")
    p.add_argument("--jobs", type=int, default=2, help="(task, seed) units run in parallel, one thread each (default 2)")
    p.add_argument("--workdir", default=None, help="keep the studies' storage here (default: a temp folder)")
    p.add_argument("--diagnose", action="store_true",
                   help="instead of the search: one fixed mnist1d-mlp growth path under each init vs scratch")
    p.add_argument("--diag-task", default="mnist1d-mlp", choices=sorted(DIAG_PATHS), help="task to diagnose")
    p.add_argument("--diag-epochs", default=None, help="epochs per growth step to try (default: the task's)")
    p.add_argument("--diag-rewarmup", default=None, help="lr re-warmup epochs after growth to try (default: the task's)")
    p.add_argument("--diag-schedule", default=None, choices=["constant", "cosine"],
                   help="lr schedule of every training run in the diagnosis (default: the task's)")
    p.add_argument("--diag-path", default=None, metavar="POS:WIDTH,...",
                   help="growth path to diagnose, e.g. 1:256,1:256,0:256 (default: a path the task's search visited)")
    a = p.parse_args(argv)
    if a.diagnose:
        warm_up()
        start = time.perf_counter()
        cfg = task_config(a.diag_task, FULL[a.diag_task], "scratch", 0)
        eps = [int(e) for e in a.diag_epochs.split(",")] if a.diag_epochs else [cfg.train.epochs_per_step]
        rew = [float(r) for r in a.diag_rewarmup.split(",")] if a.diag_rewarmup else [cfg.train.rewarmup_epochs]
        path = tuple(tuple(int(x) for x in step.split(":")) for step in a.diag_path.split(",")) if a.diag_path else None
        rows = diagnose(a.diag_task, 0, eps, rew, path, a.diag_schedule)  # type: ignore[arg-type]
        cmd = f"python scripts/bench_search.py --diagnose --diag-task {a.diag_task}" + "".join(
            f" {k} {v}" for k, v in (("--diag-epochs", a.diag_epochs), ("--diag-rewarmup", a.diag_rewarmup),
                                     ("--diag-path", a.diag_path), ("--diag-schedule", a.diag_schedule)) if v)
        res = {"benchmark": "search-diagnose", "command": cmd, "task": a.diag_task,
               "path": path or DIAG_PATHS[a.diag_task],
               "base_epochs": cfg.train.base_epochs, "lr": cfg.train.lr, "wall_s": round(time.perf_counter() - start, 1),
               "rows": rows}
        Path(a.out).mkdir(parents=True, exist_ok=True)
        tag = a.diag_task + ("_" + a.diag_path.replace(":", "x").replace(",", "_") if a.diag_path else "") + (
            f"_{a.diag_schedule}" if a.diag_schedule else "")
        (Path(a.out) / f"bench_search_diagnose_{tag}.json").write_text(json.dumps(res, indent=2) + "\n",
                                                                              encoding="utf-8")
        print(json.dumps(res, indent=2))
        return 0
    profiles = QUICK if a.quick else FULL
    tasks = a.tasks.split(",") if a.tasks else list(profiles)
    policies = a.policies.split(",") if a.policies else list(POLICIES)
    for t in tasks:
        if t not in FULL and t not in QUICK:
            p.error(f"--tasks: {t!r} is unknown; allowed: {', '.join(FULL)}")
    for pol in policies:
        if pol not in POLICIES:
            p.error(f"--policies: {pol!r} is unknown; allowed: {', '.join(POLICIES)}")
    seeds = list(range(a.seeds or (1 if a.quick else 3)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if a.workdir:
        workdir = Path(a.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="dils-bench-search-")
        workdir = Path(tmp.name)
    units = []
    for s in seeds:  # seed-major: a late seed never waits behind all tasks of an early one
        for t in tasks:
            ov = json.loads(json.dumps(profiles.get(t, FULL.get(t, {}))))
            if a.n_trials:
                ov.setdefault("search", {})["n_trials"] = a.n_trials
            units.append((t, s, ov, policies, str(workdir)))
    # the slowest units first, so the two workers finish together
    units.sort(key=lambda u: ["mnist1d-cnn", "mnist1d-mlp", "synthetic", "digits-mlp"].index(u[0])
               if u[0] in ("mnist1d-cnn", "mnist1d-mlp", "synthetic", "digits-mlp") else 9)
    warm_up()
    start = time.perf_counter()
    if a.jobs > 1 and len(units) > 1:
        with mp.get_context("fork").Pool(a.jobs, maxtasksperchild=None) as pool:
            rows = [r for unit_rows in pool.imap_unordered(run_unit, units) for r in unit_rows]
    else:
        rows = [r for u in units for r in run_unit(u)]
    wall = time.perf_counter() - start
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    rows.sort(key=lambda r: (tasks.index(r["task"]), r["seed"], policies.index(r["policy"])))
    result = {
        "benchmark": "search",
        "command": "python scripts/bench_search.py" + (" --quick" if a.quick else "") + "".join(
            f" {k} {v}" for k, v in (("--tasks", a.tasks), ("--policies", a.policies), ("--seeds", a.seeds),
                                     ("--n-trials", a.n_trials), ("--jobs", a.jobs)) if v),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "jobs": a.jobs,
        "cpu_count": os.cpu_count(),
        "load_avg_end": os.getloadavg(),
        "margin": MARGIN,
        "profiles": {t: profiles.get(t, FULL.get(t)) for t in tasks},
        "seeds": seeds,
        "analysis": analyse(rows),
        "runs": rows,
    }
    text = json.dumps(result, indent=2)
    (out / "bench_search.json").write_text(text + "\n", encoding="utf-8")
    draw(lines(rows), out / "bench_search.html")
    # stdout: everything but the per-trial curves (those are in the JSON file)
    print(json.dumps({**result, "runs": [{k: v for k, v in r.items() if k != "curve"} for r in rows]}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
