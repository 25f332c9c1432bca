"""Study commands: run, resume, worker, ls, show, finalize."""

from __future__ import annotations

import argparse
import json

from ..errors import InputError
from ..search.budget import BUDGET_HELP
from .common import (
    COUNT,
    DEFAULT_ARTIFACTS,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SECONDS,
    _flops,
    _print_finish,
    _printable,
    _report_args_of_run,
    _storage_args,
    _study_args,
    _write_study_report,
    command,
    handles,
    shown_url,
)


def _run(a: argparse.Namespace) -> int:
    from ..config import load_config
    from ..search.study import run_study

    cfg = load_config(a.config)
    if a.seed is not None:
        cfg = cfg.replace(seed=a.seed)
    if a.budget_flops is not None:
        cfg = cfg.replace(search={"budget_flops": a.budget_flops})
    if a.backend == "ray" and cfg.search.budget_flops:
        raise InputError(f"search.budget_flops={cfg.search.budget_flops:g} is not supported with --backend ray; "
                         "allowed: --backend optuna (or no budget)")
    if a.backend == "ray":
        from ..search.ray_backend import run_ray

        run_ray(cfg, a.storage, a.artifacts, a.study_name or cfg.name, a.n_trials, a.timeout,
                address=a.ray_address, max_concurrent=a.max_concurrent, progress=not a.quiet)
    else:
        run_study(cfg, a.storage, a.artifacts, a.study_name or cfg.name, a.n_trials, a.timeout, a.workers,
                  progress=not a.quiet)
    _print_finish(a.storage, a.study_name or cfg.name, a.artifacts)
    _write_study_report(a, a.study_name or cfg.name)
    return 0


@command("run", "run a depth-search study from a TOML config")
@handles(_run)
def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study config (TOML), e.g. studies/digits-mlp.toml")
    _storage_args(p)
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, metavar="DIR",
                   help=f"folder for node checkpoints, shared by all workers (default: {DEFAULT_ARTIFACTS})")
    p.add_argument("--study-name", default=None, metavar="NAME", help="study name (default: the config's name)")
    p.add_argument("--n-trials", type=POSITIVE_INT, default=None, metavar="N", help="run until the study has N finished trials")
    p.add_argument("--timeout", type=SECONDS, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--seed", type=COUNT, default=None, metavar="S", help="override the config's seed")
    p.add_argument("--budget-flops", type=POSITIVE_FLOAT, default=None, metavar="F", help=BUDGET_HELP)
    p.add_argument("--workers", type=POSITIVE_INT, default=1, metavar="N", help="worker processes on this machine (default 1)")
    p.add_argument("--backend", choices=("optuna", "ray"), default="optuna", help="execution backend (default optuna)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="Ray cluster: auto or ray://host:port")
    p.add_argument("--max-concurrent", type=POSITIVE_INT, default=2, metavar="N", help="Ray backend: concurrent trials")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _report_args_of_run(p)


def _resume(a: argparse.Namespace) -> int:
    from ..search.budget import set_budget
    from ..search.study import resume_study

    if a.budget_flops is not None:
        if a.backend == "ray":
            raise InputError(f"--budget-flops={a.budget_flops:g} is not supported with --backend ray; allowed: --backend optuna")
        set_budget(a.storage, a.study_name, a.budget_flops)
    if a.backend == "ray":
        from ..search.ray_backend import resume_ray

        resume_ray(a.storage, a.study_name, a.n_trials, a.artifacts, address=a.ray_address, timeout=a.timeout,
                   progress=not a.quiet)
    else:
        resume_study(a.storage, a.study_name, a.n_trials, a.artifacts, a.timeout, a.workers, progress=not a.quiet)
    _print_finish(a.storage, a.study_name, a.artifacts)
    _write_study_report(a, a.study_name)
    return 0


@command("resume", "continue a study from its storage after a stop or a crash")
@handles(_resume)
def _resume_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--n-trials", type=POSITIVE_INT, default=None, metavar="N",
                   help="run until the study has N finished trials (default: the config's n_trials)")
    p.add_argument("--timeout", type=SECONDS, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--budget-flops", type=POSITIVE_FLOAT, default=None, metavar="F",
                   help=BUDGET_HELP + " (stored with the study: later runs keep it)")
    p.add_argument("--workers", type=POSITIVE_INT, default=1, metavar="N", help="worker processes on this machine (default 1)")
    p.add_argument("--backend", choices=("optuna", "ray"), default="optuna", help="execution backend (default optuna)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="Ray cluster: auto or ray://host:port")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _report_args_of_run(p)


def _worker(a: argparse.Namespace) -> int:
    from ..search.study import optimize

    optimize(a.storage, a.study_name, a.artifacts, a.n_trials, a.timeout, progress=not a.quiet)
    return 0


@command("worker", "join a running study as one more worker (any machine that reaches the storage)")
@handles(_worker)
def _worker_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--n-trials", type=POSITIVE_INT, default=None, metavar="N", help="run until the study has N finished trials")
    p.add_argument("--timeout", type=SECONDS, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _ls(a: argparse.Namespace) -> int:
    from ..search.storage import list_studies

    rows = list_studies(a.storage)
    if a.json:
        print(json.dumps([{"study_name": s.study_name, "n_trials": s.n_trials, "policy": s.policy,
                           "made_by": "config" if s.config else "GrowthTree" if s.tree else None,
                           "user_attrs": {k: v for k, v in s.user_attrs.items() if k != "dils_config"}}
                          for s in rows], indent=2))
        return 0
    if not rows:
        print(f"no studies in {shown_url(a.storage)}")
        return 0
    w = max(30, *(len(_printable(s.study_name)) for s in rows))
    print(f"{'study':{w}s} {'trials':>7s}  {'policy':18s} started")
    for s in rows:
        policy = s.policy
        started = s.datetime_start.strftime("%Y-%m-%d %H:%M") if s.datetime_start else "-"
        print(f"{_printable(s.study_name):{w}s} {s.n_trials:7d}  {_printable(str(policy)):18s} {started}")
    return 0


@command("ls", "list the studies in a storage")
@handles(_ls)
def _ls_args(p: argparse.ArgumentParser) -> None:
    _storage_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _show(a: argparse.Namespace) -> int:
    from ..search.summary import summarize

    s = summarize(a.storage, a.study_name, a.artifacts, with_trials=a.json)
    if a.json:
        print(json.dumps(s.to_dict(), indent=2))
        return 0
    _print_finish(a.storage, a.study_name, a.artifacts, s, from_show=True)
    ratio = s.flops_spent / s.scratch_equivalent_flops if s.scratch_equivalent_flops else float("nan")
    print(f"compute spent / from-scratch compute: {ratio:.3f}; reused {_flops(s.flops_reused)}; "
          f"wall seconds training {s.seconds_spent:.1f}; duplicate trainings {s.duplicate_trainings}; "
          f"retrained after damage {s.retrained_after_damage}")
    return 0


@command("show", "best path, its metrics, reuse and compute of one study")
@handles(_show)
def _show_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _finalize(a: argparse.Namespace) -> int:
    from ..search.finalize import finalize_study

    result = finalize_study(a.storage, a.study_name, a.artifacts, top_k=a.top_k, epochs=a.epochs, progress=not a.quiet)
    if result is None:
        print(f"study {a.study_name!r}: nothing to finalize (final.epochs is 0, or no trial finished yet)")
        return 0
    print(f"finalized {len(result.candidates)} architecture(s), {result.trained} trained now, "
          f"{len(result.candidates) - result.trained} already in the lineage store")
    _print_finish(a.storage, a.study_name, a.artifacts)
    return 0


@command("finalize", "train the study's best architectures on with a decay phase and deliver the best")
@handles(_finalize)
def _finalize_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--top-k", type=POSITIVE_INT, default=None, metavar="K",
                   help="finalize the K best distinct architectures (default: the config's final.top_k)")
    p.add_argument("--epochs", type=COUNT, default=None, metavar="N",
                   help="epochs of the decay phase (default: the config's final.epochs)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
