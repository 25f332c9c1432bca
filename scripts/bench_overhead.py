"""Store overhead: the share of a study's wall time spent in the lineage store and the database,
and how long ``ls`` / ``show`` / ``report`` take on a 500-trial study, in SQLite and PostgreSQL.

Part 1 runs real studies (``run_study``, real store, real checkpoints) with timers wrapped around
the store's methods (nothing is mocked): ``LineageStore.get_or_train`` minus the time inside the
node's training function is the lineage store's share (lease/claim, row reads and commits,
serialising, writing + fsync, loading + sha256 check); every top-level ``RDBStorage`` call made
on the main thread is the Optuna database's share. Both are divided by the study's wall time.

Part 2 builds a 500-trial study with a tiny config (real trials, real nodes, one training epoch
each), then times the CLI as a user runs it (``python -m dils_search ls/show/report`` in a fresh
process, imports included) and the same work called in-process (no interpreter start-up).

PostgreSQL: ``--postgres URL`` (default the local CI server); a scratch database is created for the
run and dropped afterwards. ``--no-postgres`` skips it. Prints JSON; ``--out DIR`` also writes
``DIR/bench_overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

DEFAULT_PG = "postgresql+psycopg2://postgres:postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- timers (wrapping, not mocking)


class Timers:
    """Accumulates wall time of wrapped methods; only top-level calls on the main thread count."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._local = threading.local()
        self._undo: list[tuple[Any, str, Any]] = []
        self.loop_start: float | None = None
        self.at_loop_start: dict[str, float] = {}

    def wrap(self, owner: Any, name: str, label: str, exclusive: bool = True) -> None:
        orig = getattr(owner, name)
        timers = self
        group = "excl" if exclusive else label

        @functools.wraps(orig)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread() or getattr(timers._local, group, False):
                return orig(*args, **kwargs)
            setattr(timers._local, group, True)
            start = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                timers.seconds[label] += time.perf_counter() - start
                timers.calls[label] += 1
                setattr(timers._local, group, False)

        self._undo.append((owner, name, orig))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)
        self._undo.clear()


@contextlib.contextmanager
def instrumented() -> Iterator[Timers]:
    from optuna.storages import RDBStorage

    from dils_search.core import checkpoint as checkpoint_mod
    from dils_search.store import LineageStore

    timers = Timers()
    # the lineage store's verb: its time minus the training function's time is pure store time
    orig_get_or_train = LineageStore.get_or_train

    def get_or_train(self: LineageStore, meta: Any, train_fn: Callable[[], Any], **kwargs: Any) -> Any:
        def timed_train() -> Any:
            start = time.perf_counter()
            try:
                return train_fn()
            finally:
                timers.seconds["train_fn"] += time.perf_counter() - start
                timers.calls["train_fn"] += 1

        start = time.perf_counter()
        try:
            return orig_get_or_train(self, meta, timed_train, **kwargs)
        finally:
            timers.seconds["get_or_train"] += time.perf_counter() - start
            timers.calls["get_or_train"] += 1

    timers._undo.append((LineageStore, "get_or_train", orig_get_or_train))
    LineageStore.get_or_train = get_or_train  # type: ignore[method-assign]
    # a breakdown of the store's share (each part is disjoint from the others)
    for name, label in (("_claim", "store.claim_lease"), ("get", "store.get_row"), ("load_model", "store.load_checkpoint"),
                        ("_write_temp", "store.write_fsync"),
                        ("__init__", "store.open")):
        timers.wrap(LineageStore, name, label, exclusive=False)
    timers.wrap(checkpoint_mod, "to_bytes", "store.serialize", exclusive=False)  # store imports it per call
    # mark where the trial loop starts: what comes before (schema, study creation) is one-off set-up
    from dils_search.search import study as study_mod

    orig_make_objective = study_mod.make_objective

    def make_objective(*args: Any, **kwargs: Any) -> Any:
        objective = orig_make_objective(*args, **kwargs)

        def marked(trial: Any) -> Any:
            if timers.loop_start is None:
                timers.loop_start = time.perf_counter()
                timers.at_loop_start = dict(timers.seconds)
            return objective(trial)

        return marked

    timers._undo.append((study_mod, "make_objective", orig_make_objective))
    study_mod.make_objective = make_objective  # type: ignore[assignment]
    # the Optuna database: every public RDBStorage method (and its constructor), the private ones that
    # Optuna's cache calls (new trials, reading trials), and dils-search's own reads and writes of
    # Optuna's tables (search/_optuna_compat.py; older trees: the same functions elsewhere); top-level
    # calls only. (Before 2026-12-02 only the public methods counted: earlier figures are lower bounds.)
    private = ["_create_new_trial", "_get_trials", "__init__"]
    for name in [n for n in dir(RDBStorage) if not n.startswith("_") and callable(getattr(RDBStorage, n))] + private:
        if hasattr(RDBStorage, name):
            timers.wrap(RDBStorage, name, "optuna_db")
    import importlib

    for module, names in (("dils_search.search._optuna_compat", ("count_trials", "budget_counts", "write_trial_user_attrs")),
                          ("dils_search.search.study", ("count_trials", "set_user_attrs"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in names:
            if callable(getattr(mod, name, None)):
                timers.wrap(mod, name, "optuna_db")
    try:
        yield timers
    finally:
        timers.restore()


# ---------------------------------------------------------------- databases


@contextlib.contextmanager
def scratch_postgres(admin_url: str) -> Iterator[str]:
    """A fresh database on the server of ``admin_url``; dropped on exit."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"dils_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            ))
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def postgres_reachable(url: str) -> str | None:
    try:
        from sqlalchemy import create_engine, text

        eng = create_engine(url, connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        eng.dispose()
        return None
    except Exception as exc:  # report why, and skip that backend
        return str(exc).strip().splitlines()[0]


# ---------------------------------------------------------------- part 1: store share of study time


def study_share(cfg: Any, url: str, artifacts: str, name: str) -> dict[str, Any]:
    from dils_search.search.study import run_study
    from dils_search.search.summary import summarize
    from dils_search.search.trainers import make_task

    make_task(cfg, "cpu")  # data generation is memoised; keep it out of the timed study
    with instrumented() as timers:
        start = time.perf_counter()
        study = run_study(cfg, url, artifacts, name, progress=False, device="cpu")
        wall = time.perf_counter() - start
    trial_wall = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.get_trials(deepcopy=False)
                     if t.datetime_complete and t.datetime_start)
    s = summarize(url, name, artifacts)
    end = start + wall
    sec = dict(timers.seconds)
    before = timers.at_loop_start
    loop_wall = end - (timers.loop_start or start)

    def lineage(d: dict[str, float]) -> float:
        return d.get("get_or_train", 0.0) - d.get("train_fn", 0.0) + d.get("store.open", 0.0)

    loop_lineage = lineage(sec) - lineage(before)
    loop_db = sec.get("optuna_db", 0.0) - before.get("optuna_db", 0.0)
    parts = {k: round(v, 4) for k, v in sorted(sec.items()) if k.startswith("store.")}
    return {
        "study": name,
        "dataset": cfg.data.dataset,
        "n_trials": len(study.trials),
        "nodes": s.nodes,
        "nodes_trained": s.nodes_trained,
        "node_uses_reused": s.node_uses_reused,
        "run_wall_s": round(wall, 3),
        "setup_s": round(wall - loop_wall, 3),
        "trial_loop_wall_s": round(loop_wall, 3),
        "trial_wall_sum_s": round(trial_wall, 3),
        "training_s": round(sec.get("train_fn", 0.0), 3),
        "lineage_store_s": round(loop_lineage, 4),
        "optuna_db_s": round(loop_db, 4),
        "setup_store_and_db_s": round(lineage(before) + before.get("optuna_db", 0.0), 4),
        "optuna_db_calls": timers.calls.get("optuna_db", 0),
        "store_parts_s": parts,
        "store_calls": {k: v for k, v in sorted(timers.calls.items()) if k.startswith("store.")},
        "lineage_share": round(loop_lineage / loop_wall, 4),
        "optuna_db_share": round(loop_db / loop_wall, 4),
        "store_share": round((loop_lineage + loop_db) / loop_wall, 4),
        "store_share_incl_setup": round((lineage(sec) + sec.get("optuna_db", 0.0)) / wall, 4),
    }


def part1(url_for: Callable[[str], str], art: Path, quick: bool) -> list[dict[str, Any]]:
    from dils_search.config import load_config

    out = []
    # the README's main job (small data: the store's share is largest here), MNIST-1D as shipped and
    # the policy comparison's MNIST-1D study (20,000 samples: trials of a few seconds)
    plan = (("digits-mlp", 2),) if quick else (("digits-mlp", 12), ("mnist1d-mlp", 6), ("compare-mnist1d", 8))
    for config, n in plan:
        cfg = load_config(ROOT / "studies" / f"{config}.toml")
        if quick:
            cfg = cfg.replace(train={"base_epochs": 2, "epochs_per_step": 1})
        cfg = cfg.replace(search={"n_trials": n, "budget_flops": 0.0})  # trials, not a budget, end it
        url = url_for(config)
        out.append(study_share(cfg, url, str(art / config), f"overhead-{config}"))
    return out


# ---------------------------------------------------------------- part 2: ls/show/report on 500 trials


def tiny_config(n_trials: int) -> Any:
    from dils_search.config import config_from_dict

    return config_from_dict({
        "name": "overhead-500",
        "seed": 0,
        "data": {"dataset": "synthetic", "num_samples": 300, "task": "classification"},
        "model": {"kind": "mlp", "hidden": [8]},
        "train": {"base_epochs": 1, "epochs_per_step": 1, "batch_size": 256, "lr": 0.01},
        "grow": {"calib_size": 128},
        "search": {"max_steps": 3, "widths": [4, 8, 12, 16, 24, 32], "inits": ["dils-analytic", "random"],
                   "n_trials": n_trials, "sampler": "random", "pruner": "none"},
    })


def build_big_study(url: str, artifacts: str, n_trials: int) -> dict[str, Any]:
    from dils_search.search.study import run_study
    from dils_search.search.summary import summarize

    cfg = tiny_config(n_trials)
    start = time.perf_counter()
    run_study(cfg, url, artifacts, cfg.name, progress=False, device="cpu")
    built = time.perf_counter() - start
    s = summarize(url, cfg.name, artifacts)
    return {"build_s": round(built, 2), "trials": s.n_trials, "nodes": s.nodes}


def _median_time(fn: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), [round(t, 3) for t in times]


def cli_commands(url: str, artifacts: str, name: str, out_html: str) -> dict[str, list[str]]:
    from dils_search import cli

    cmds = {"ls": ["ls", "--storage", url], "show": ["show", "--storage", url, "--study-name", name, "--artifacts", artifacts]}
    cli.build_parser()  # registers the commands that live in their own modules
    if "report" in cli.COMMANDS:
        cmds["report"] = ["report", "--storage", url, "--study-name", name, "--artifacts", artifacts, "--out", out_html]
    return cmds


def time_cli(url: str, artifacts: str, name: str, tmp: Path, reps: int, in_process_only: tuple[str, ...] = ()) -> dict[str, Any]:
    from dils_search.cli import main as cli_main

    out: dict[str, Any] = {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for cmd, args in cli_commands(url, artifacts, name, str(tmp / "report.html")).items():

        def subproc(args: list[str] = args) -> None:
            subprocess.run([sys.executable, "-m", "dils_search", *args], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def inproc(args: list[str] = args) -> None:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
                rc = cli_main(args)
            if rc not in (0, None):
                raise RuntimeError(f"dils-search {' '.join(args)} returned {rc}")

        inproc()  # warm: first-import costs of plotly and friends belong to the process start-up figure
        in_med, in_all = _median_time(inproc, reps)
        out[cmd] = {"in_process_s_median": round(in_med, 3), "in_process_s": in_all}
        if cmd not in in_process_only:
            sub_med, sub_all = _median_time(subproc, reps)
            out[cmd].update(process_s_median=round(sub_med, 3), process_s=sub_all)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import dils_search.cli"], check=True)
    out["import_dils_search_cli_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    out["python_startup_s"] = round(time.perf_counter() - start, 3)
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: one tiny study, a 20-trial study instead of 500, `ls` the only subprocess")
    p.add_argument("--out", default=None, metavar="DIR", help="also write DIR/bench_overhead.json")
    p.add_argument("--postgres", default=os.environ.get("DILS_TEST_POSTGRES_URL", DEFAULT_PG), metavar="URL",
                   help="admin URL of a PostgreSQL server; a scratch database is created and dropped")
    p.add_argument("--no-postgres", action="store_true", help="SQLite only")
    p.add_argument("--cli-only", action="store_true", help="only part 2: ls/show/report on the big study")
    p.add_argument("--trials", type=int, default=None, help="trials of the big study (default 500; 20 with --quick)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per CLI command (default 5; 1 with --quick)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    # one-off: the first torch.optim optimizer imports torch._dynamo (seconds); keep it out of the timed loop
    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("dils_search").setLevel(logging.WARNING)
    n_big = a.trials or (20 if a.quick else 500)
    reps = a.reps or (1 if a.quick else 5)
    backends = ["sqlite"]
    pg_problem = None
    if not a.no_postgres:
        pg_problem = postgres_reachable(a.postgres)
        if pg_problem is None:
            backends.append("postgresql")
    result: dict[str, Any] = {
        "benchmark": "overhead",
        "command": "python scripts/bench_overhead.py" + (" --quick" if a.quick else ""),
        "torch_threads": torch.get_num_threads(),
        "backends": backends,
        "postgres_skipped": pg_problem,
        "study_share": {},
        "big_study": {},
    }
    with tempfile.TemporaryDirectory(prefix="dils-bench-overhead-") as tmpdir:
        tmp = Path(tmpdir)
        for backend in backends:
            with contextlib.ExitStack() as stack:
                if backend == "sqlite":
                    def url_for(tag: str, backend_dir: Path = tmp / "sqlite") -> str:
                        backend_dir.mkdir(exist_ok=True)
                        return f"sqlite:///{backend_dir / (tag + '.db')}"
                else:
                    pg_url = stack.enter_context(scratch_postgres(a.postgres))

                    def url_for(tag: str, pg_url: str = pg_url) -> str:
                        return pg_url
                art = tmp / backend / "artifacts"
                if not a.cli_only:
                    result["study_share"][backend] = part1(url_for, art, a.quick)
                big_url = url_for("big")
                big_art = str(tmp / backend / "artifacts-big")
                info = build_big_study(big_url, big_art, n_big)
                info["cli"] = time_cli(big_url, big_art, "overhead-500", tmp / backend, reps,
                                       ("show", "report") if a.quick else ())
                result["big_study"][backend] = info
    shares = [r["store_share"] for rs in result["study_share"].values() for r in rs]
    cli_ok = all(v[c]["process_s_median"] < 1.0 for v in (b["cli"] for b in result["big_study"].values())
                 for c in ("ls", "show") if "process_s_median" in v[c])
    cli_in_ok = all(v[c]["in_process_s_median"] < 1.0 for v in (b["cli"] for b in result["big_study"].values())
                    for c in ("ls", "show"))
    per_study = {f"{b}/{r['study']}": r["store_share"] for b, rs in result["study_share"].items() for r in rs}
    result["targets"] = {
        "store_share_max": max(shares) if shares else None,
        "store_share_met": bool(shares) and max(shares) <= 0.05,
        "store_share_met_by_study": {k: v <= 0.05 for k, v in per_study.items()},
        "ls_show_under_1s_process": cli_ok,
        "ls_show_under_1s_in_process": cli_in_ok,
        "report_under_2s_process": all(v["report"]["process_s_median"] < 2.0 for v in
                                       (b["cli"] for b in result["big_study"].values())
                                       if "process_s_median" in v.get("report", {})),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_overhead.json").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
