"""``dils-search compare`` and ``dils-search report``; registered with the CLI on import."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from ..search.budget import BUDGET_HELP
from .common import (
    DEFAULT_ARTIFACTS,
    DEFAULT_URL,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SECONDS,
    STORAGE_ENV,
    _number,
    command,
    default_storage,
    handles,
    shown_url,
)

__all__: list[str] = []

DEFAULT_MARGIN_PP = 0.5  # == 100 * report.DEFAULT_MARGIN; report is imported only when a command runs


def _margin(a: argparse.Namespace) -> float:
    if not a.margin >= 0:
        raise InputError(f"--margin={a.margin!r} must be >= 0 (percentage points)")
    return float(a.margin) / 100.0


def _compare(a: argparse.Namespace) -> int:
    from ..config import load_config
    from ..report import verdict
    from ..report.compare import format_table, run_compare, summarize_compare, write_outputs

    cfg = load_config(a.config)
    if a.budget_flops is not None:
        cfg = cfg.replace(search={"budget_flops": a.budget_flops})
    margin = _margin(a)
    out = a.out or f"{cfg.name}-compare"
    groups = run_compare(cfg, a.storage, a.artifacts, a.n_trials, a.seeds, progress=not a.quiet, timeout=a.timeout)
    rows, datas = summarize_compare(a.storage, groups, a.artifacts, margin)
    budget = f"{a.n_trials or cfg.search.n_trials} trials per study"
    if cfg.search.max_flops:
        budget += f", at most {cfg.search.max_flops:.3g} training FLOPs of search"
    if cfg.search.budget_flops:
        budget += (f", at most {cfg.search.budget_flops:.3g} training FLOPs up to the delivered model "
                   f"({100 * (1 - cfg.final.share):.0f}% search, {100 * cfg.final.share:.0f}% finalize)")
    if a.timeout or cfg.search.timeout:
        budget += f", at most {a.timeout or cfg.search.timeout:g} s"
    intro = (f"Config {a.config} ({cfg.data.dataset}, base hidden {list(cfg.model.hidden)}); {a.seeds} seed(s) "
             f"from {cfg.seed}; budget {budget}; storage {shown_url(a.storage)}.")
    paths = write_outputs(out, rows, datas, f"dils-search compare: {cfg.name}", margin, intro)
    print(format_table(rows))
    print()
    for line in verdict(rows):
        print(line)
    print(f"target: best validation metric of any policy minus {100 * margin:.1f} pp, per seed")
    print(f"wrote {paths['report']}, {paths['csv']}, {paths['json']}")
    return 0


@command("compare", "compare growth policies (the config's [[compare]] list) on the same data, seeds and budget")
@handles(_compare)
def _compare_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run every [[compare]] entry of CONFIG (a policy, optionally restricted to one init) on the same data, "
        "seeds and budget. Each policy x seed is its own study in one storage, named "
        "<config name>--<label>--s<seed>, so running the same command again continues instead of restarting. "
        "Prints a table and writes DIR/report.html, DIR/summary.csv and DIR/summary.json."
    )
    p.add_argument("config", help="study config (TOML) with [[compare]] entries, e.g. studies/compare-mnist1d.toml")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <config name>-compare)")
    p.add_argument("--storage", default=default_storage(), metavar="URL",
                   help=f"study storage URL (default: ${STORAGE_ENV}, else {DEFAULT_URL})")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, metavar="DIR",
                   help=f"folder for node checkpoints (default: {DEFAULT_ARTIFACTS})")
    p.add_argument("--n-trials", type=POSITIVE_INT, default=None, metavar="N",
                   help="finished trials per policy and seed (default: the config's search.n_trials)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1, metavar="K",
                   help="run seeds seed..seed+K-1 and report means (and std) over them (default 1)")
    p.add_argument("--timeout", type=SECONDS, default=None, metavar="S",
                   help="wall seconds per study run (default: the config's search.timeout, 0 = none)")
    p.add_argument("--budget-flops", type=POSITIVE_FLOAT, default=None, metavar="F",
                   help=BUDGET_HELP + "; the plain policy trains for it too")
    p.add_argument("--margin", type=_number(float, 0.0), default=DEFAULT_MARGIN_PP, metavar="PP",
                   help="the target is the best metric of any policy minus PP percentage points (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _report(a: argparse.Namespace) -> int:
    from ..report import by_policy, load_study_data, write_report

    margin = _margin(a)
    names = list(dict.fromkeys(a.study_name))
    groups = by_policy([load_study_data(a.storage, n, n, a.artifacts) for n in names])
    rows, n_figs = write_report(a.out, groups, a.title or f"dils-search report: {', '.join(names)}", margin=margin,
                                intro=f"Storage {shown_url(a.storage)}.")
    print(f"wrote {a.out}: {n_figs} figures for {len(names)} stud{'y' if len(names) == 1 else 'ies'}", file=sys.stdout)
    return 0


@command("report", "write a self-contained HTML report (growth tree, compute curves, Pareto front) of studies")
@handles(_report)
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=default_storage(), metavar="URL",
                   help=f"study storage URL (default: ${STORAGE_ENV}, else {DEFAULT_URL})")
    p.add_argument("--study-name", required=True, action="append", metavar="NAME",
                   help="a study to include (repeat for several; each gets its own line and tree)")
    p.add_argument("--out", default="report.html", metavar="FILE", help="HTML file to write (default: report.html)")
    p.add_argument("--artifacts", default=None, metavar="DIR", help="checkpoint folder (default: the study's own)")
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--margin", type=_number(float, 0.0), default=DEFAULT_MARGIN_PP, metavar="PP",
                   help="target = best metric of any study minus PP percentage points (default 0.5)")
