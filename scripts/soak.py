"""Soak test: a study with several `dils-search worker` processes while workers are SIGKILLed at random.

Runs a tiny depth-search study (synthetic data) with N workers on sqlite and/or PostgreSQL, kills a
random worker every few seconds (SIGKILL, no warning) and starts a new one in its place. Once the
study has its trials, it recovers what the last kills left RUNNING (`dils-search resume`) and checks:

- no trial lost: the requested number of trials finished, none is left RUNNING, and every trial a
  kill left behind was failed and retried with the same parameters;
- no node trained twice (the store's training log);
- every `ready` node's checkpoint file matches its sha256;
- the counts printed by `dils-search show --json` agree with the storage.

With ``--tamper S`` it also damages a random ready node's checkpoint every S seconds (truncates it,
copies another node's file over it, replaces it with a symbolic link to another node's file, or
with a text file) while the workers run. Workers must notice (sha256, spec check, links refused)
and retrain what they need; afterwards every node still damaged (or left mid-retrain by a killed
worker) is repaired the way `export` does (``ensure_node``), and the study must end with every node intact: a regular file, its sha256, and
a model whose spec is the node's.

Prints one JSON object per backend (and a final summary line); exits 1 if any check fails.

    python scripts/soak.py --backend both --trials 200 --workers 3     # the full soak
    python scripts/soak.py --quick                                      # what CI runs (sqlite, < 1 min)
    python scripts/soak.py --quick --tamper 2                           # ... while checkpoints are tampered with

PostgreSQL: --postgres-url (or $DILS_TEST_POSTGRES_URL) names a server database with the right to
create databases; the soak creates a fresh database there and drops it afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONFIG = """\
name = "soak"
seed = 0

[data]
dataset = "synthetic"
num_samples = 600
task = "classification"

[model]
kind = "mlp"
hidden = [8]

[train]
base_epochs = 2
epochs_per_step = {epochs_per_step}
batch_size = 64
lr = 0.01

[grow]
calib_size = 256

[search]
sampler = "random"
max_steps = 3
widths = [8, 12, 16, 24]
inits = ["dils-analytic", "identity"]
n_trials = {trials}

[storage]
heartbeat_interval = 1
grace_period = 3
max_retry = {max_retry}
lease_seconds = 5.0
"""


MAX_RETRY = 5  # storage.max_retry of the soak's study


@dataclass
class SoakResult:
    backend: str
    trials_requested: int
    workers: int
    trials_finished: int = 0
    trials_total: int = 0
    trials_running_left: int = 0
    trials_failed_by_kill: int = 0
    killed_trials_retried: int = 0
    killed_trials_not_retried: list[int] = field(default_factory=list)
    killed_out_of_retries: list[int] = field(default_factory=list)  # killed max_retry times in a row: failed by design
    retries_with_other_params: int = 0
    diverged_trials: int = 0
    kills: int = 0
    kills_with_trial_running: int = 0
    worker_starts: int = 0
    worker_errors: int = 0
    nodes_ready: int = 0
    nodes_trained_twice: int = 0
    sha256_mismatches: int = 0
    show_consistent: bool = False
    show_problems: list[str] = field(default_factory=list)
    tampered: dict[str, int] = field(default_factory=dict)
    repaired_after: int = 0
    not_intact_at_end: int = 0
    wall_seconds: float = 0.0
    ok: bool = False


def _worker_cmd(url: str, art: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "dils_search", "worker", "--storage", url, "--study-name", "soak",
            "--artifacts", str(art), "--n-trials", str(trials), "--quiet"]


def _study(url: str) -> Any:
    import optuna

    from dils_search.search.study import open_storage

    return optuna.load_study(study_name="soak", storage=open_storage(url))


def _counts(url: str) -> tuple[int, int]:
    """(finished trials, trials ever started)."""
    from dils_search.search.study import FINISHED

    trials = _study(url).get_trials(deepcopy=False)
    return sum(t.state in FINISHED for t in trials), len(trials)


def running_now(url: str) -> int:
    from optuna.trial import TrialState

    return len(_study(url).get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _tamper(url: str, art: Path, rng: random.Random, res: SoakResult) -> None:
    """Damage one ready node's file in one of four ways (never writing through a link)."""
    from dils_search.store import LineageStore

    store = LineageStore(url, art, create=False)
    try:
        ready = [r for r in store.nodes() if r.status == "ready"]
    finally:
        store.close()
    if len(ready) < 2:
        return
    victim, other = rng.sample(ready, 2)
    path, src = art / f"{victim.key}.pt", art / f"{other.key}.pt"
    how = rng.choice(["truncate", "swap", "symlink", "text"])
    try:
        data = path.read_bytes() if how == "truncate" else b""
        path.unlink(missing_ok=True)
        if how == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif how == "swap":
            path.write_bytes(src.read_bytes())
        elif how == "symlink":
            os.symlink(src, path)
        else:
            path.write_text("not a checkpoint\n")
    except OSError:
        return  # a worker renamed a file in between: try again next time
    res.tampered[how] = res.tampered.get(how, 0) + 1


def _repair_and_check(url: str, art: Path, res: SoakResult) -> None:
    """Repair what is still damaged (as `export` would), or was left mid-retrain by a killed worker after
    its checkpoint was damaged, then count nodes that are not intact."""
    from dils_search.core.spec import spec_from_dict
    from dils_search.search.finalize import ensure_node
    from dils_search.store import LineageStore

    store = LineageStore(url, art, create=False)
    try:
        for r in store.nodes():
            # damaged, or left mid-retrain by a killed worker after its file was damaged (its lease has expired)
            if (r.status == "ready" and store.load_model(r) is None) or r.status != "ready":
                ensure_node(url, "soak", r.key, str(art))
                res.repaired_after += 1
        for r in store.nodes():
            if r.status != "ready":
                continue
            path = store.artifact_path(r.key)
            model = store.load_model(r)
            if (path.is_symlink() or not path.is_file() or model is None
                    or model.spec.to_json() != spec_from_dict(r.spec).to_json()):
                res.not_intact_at_end += 1
    finally:
        store.close()


def soak(url: str, backend: str, work: Path, trials: int, workers: int, kill_every: float, epochs_per_step: int,
         timeout: float, rng: random.Random, min_age: float = 8.0, tamper_every: float = 0.0) -> SoakResult:
    import optuna
    from optuna.trial import TrialState

    from dils_search.config import load_config
    from dils_search.search.study import create_study, load_study
    from dils_search.store import LineageStore

    res = SoakResult(backend, trials, workers)
    start = time.monotonic()
    art = work / "art"
    cfg_path = work / "soak.toml"
    cfg_path.write_text(CONFIG.format(trials=trials, epochs_per_step=epochs_per_step, max_retry=MAX_RETRY))
    cfg = load_config(cfg_path)
    LineageStore(url, art).close()  # schema and study first: first-time creation races between workers
    create_study(cfg, url, str(art), "soak")

    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    born: dict[int, float] = {}
    killed_pids: set[int] = set()

    def start_worker() -> None:
        log = open(logs / f"worker-{res.worker_starts}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(_worker_cmd(url, art, trials), stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        born[proc.pid] = time.monotonic()
        res.worker_starts += 1

    for _ in range(workers):
        start_worker()
    next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
    next_tamper = time.monotonic() + tamper_every
    started_at_kill = 0
    deadline = start + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if tamper_every and time.monotonic() >= next_tamper:
            _tamper(url, art, rng, res)
            next_tamper = time.monotonic() + tamper_every * rng.uniform(0.5, 1.5)
        for p in list(procs):
            if p.poll() is None:
                continue
            procs.remove(p)
            if p.pid not in killed_pids and p.returncode != 0:
                res.worker_errors += 1  # a worker died on its own: a bug the soak exists to find
                start_worker()
        done, started = _counts(url)
        if done >= trials and not procs:
            break
        if done < trials and not procs:
            start_worker()  # every worker finished but the study is short (should not happen): go on
        # victims are workers past their start-up (importing torch takes seconds), so that kills land
        # in trials, node trainings, checkpoint writes and commits rather than in imports
        grown = [p for p in procs if p.poll() is None and time.monotonic() - born[p.pid] >= min_age]
        # and at most one kill per trial started since the last one, so the study moves on under any load
        if time.monotonic() >= next_kill and done < trials and grown and started > started_at_kill:
            started_at_kill = started
            res.kills_with_trial_running += running_now(url) > 0
            victim = rng.choice(grown)
            killed_pids.add(victim.pid)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            procs.remove(victim)
            res.kills += 1
            start_worker()
            next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
    for p in procs:  # only on timeout
        p.kill()
        p.wait()

    # what the last kills left RUNNING: failed and queued again by resume (which waits out their heartbeat)
    subprocess.run([sys.executable, "-m", "dils_search", "resume", "--storage", url, "--study-name", "soak",
                    "--n-trials", str(trials), "--quiet"], check=False, capture_output=True, timeout=600)
    study = load_study(url, "soak")
    all_trials = study.get_trials(deepcopy=False)
    res.trials_total = len(all_trials)
    finished = [t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    res.trials_finished = len(finished)
    res.trials_running_left = sum(t.state == TrialState.RUNNING for t in all_trials)
    # Optuna's retry of trial T carries T in its retry_history ("failed_trial" names the first of a chain)
    retries: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in all_trials:
        history = t.system_attrs.get("retry_history", [])
        if history:
            retries.setdefault(int(history[-1]), []).append(t)
    for t in all_trials:
        if t.state != TrialState.FAIL:
            continue
        if "fail_reason" in t.user_attrs:
            res.diverged_trials += 1
            continue
        res.trials_failed_by_kill += 1
        again = retries.get(t.number, [])
        if again:
            res.killed_trials_retried += 1
            # a trial killed mid-way has only the params it had sampled so far: its retry must agree on those
            res.retries_with_other_params += sum(any(r.params.get(k) != v for k, v in t.params.items()) for r in again)
        elif len(t.system_attrs.get("retry_history", [])) >= MAX_RETRY:  # Optuna retries a stale trial max_retry times
            res.killed_out_of_retries.append(t.number)
        else:
            res.killed_trials_not_retried.append(t.number)

    if tamper_every:
        _repair_and_check(url, art, res)
    store = LineageStore(url, art, create=False)
    try:
        counts = store.training_counts()
        res.nodes_trained_twice = sum(c > 1 for c in counts.values())
        ready = [r for r in store.nodes() if r.status == "ready"]
        res.nodes_ready = len(ready)
        ready_keys = {r.key for r in ready}
        for r in ready:
            path = store.artifact_path(r.key)
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != r.sha256:
                res.sha256_mismatches += 1
    finally:
        store.close()

    show = subprocess.run([sys.executable, "-m", "dils_search", "show", "--storage", url, "--study-name", "soak", "--json"],
                          capture_output=True, text=True, timeout=300)
    problems = res.show_problems
    if show.returncode != 0:
        problems.append(f"show exited {show.returncode}: {show.stderr.strip()[-200:]}")
    else:
        s = json.loads(show.stdout)
        states = s["states"]
        keys = {k for t in finished for k in t.user_attrs.get("node_keys", [])}
        trained = {k for t in finished for k in t.user_attrs.get("trained_keys", [])}
        checks = {
            "n_trials == trials in storage": s["n_trials"] == res.trials_total,
            "sum of states == n_trials": sum(states.values()) == s["n_trials"],
            "COMPLETE + PRUNED == finished": states.get("COMPLETE", 0) + states.get("PRUNED", 0) == res.trials_finished,
            "FAIL == failed trials": states.get("FAIL", 0) == res.trials_failed_by_kill + res.diverged_trials,
            "duplicate_trainings == 0": s["duplicate_trainings"] == 0,
            "nodes == distinct nodes of finished trials": s["nodes"] == len(keys),
            "nodes_trained == nodes trained by finished trials <= nodes":
                s["nodes_trained"] == len(trained) <= s["nodes"],
            "every node of a finished trial was trained exactly once": all(counts.get(k) == 1 for k in keys),
            "every node of a finished trial is ready": keys <= ready_keys,
        }
        problems.extend(name for name, good in checks.items() if not good)
    res.show_consistent = not problems
    res.wall_seconds = round(time.monotonic() - start, 1)
    res.ok = (
        res.trials_finished >= trials and res.trials_running_left == 0 and not res.killed_trials_not_retried
        and res.retries_with_other_params == 0 and res.nodes_trained_twice == 0 and res.sha256_mismatches == 0
        and res.worker_errors == 0 and res.show_consistent and res.not_intact_at_end == 0
    )
    return res


def _postgres_database(admin: str) -> tuple[str, Any]:
    from sqlalchemy import create_engine, text

    name = f"dils_soak_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with engine.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        engine.dispose()

    return f"{admin.rpartition('/')[0]}/{name}", drop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--postgres-url", default=os.environ.get("DILS_TEST_POSTGRES_URL"), metavar="URL",
                   help="server database allowed to CREATE DATABASE (default: $DILS_TEST_POSTGRES_URL)")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kill-every", type=float, default=4.0, metavar="S", help="mean seconds between kills (default 4)")
    p.add_argument("--min-age", type=float, default=8.0, metavar="S",
                   help="only kill workers that have run at least S seconds (default 8: past start-up)")
    p.add_argument("--epochs-per-step", type=int, default=4, help="training per growth node (longer: more kills mid-training)")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S", help="give up after S seconds per backend")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of victims and kill times")
    p.add_argument("--tamper", type=float, default=0.0, metavar="S",
                   help="damage, swap or symlink a random node's checkpoint every S seconds (default 0: off)")
    p.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="the CI version: sqlite, 16 trials, 2 workers, 40 epochs per step, a kill every 3 s")
    a = p.parse_args(argv)
    if a.quick:
        trials = a.trials if a.trials != p.get_default("trials") else 16  # --trials N still chooses
        a.backend, a.trials, a.workers, a.kill_every, a.epochs_per_step, a.timeout = "sqlite", trials, 2, 3.0, 40, 420.0
        a.min_age = 4.0
    backends = ["sqlite", "postgres"] if a.backend == "both" else [a.backend]
    if "postgres" in backends and not a.postgres_url:
        p.error("--backend postgres needs --postgres-url or $DILS_TEST_POSTGRES_URL")
    os.environ.setdefault("DILS_NUM_THREADS", "1")
    rng = random.Random(a.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="dils-soak-") as tmp:
        root = Path(a.workdir or tmp)
        for backend in backends:
            work = root / backend
            work.mkdir(parents=True, exist_ok=True)
            drop = None
            if backend == "sqlite":
                url = f"sqlite:///{work / 'soak.db'}"
            else:
                url, drop = _postgres_database(a.postgres_url)
            try:
                res = soak(url, backend, work, a.trials, a.workers, a.kill_every, a.epochs_per_step, a.timeout, rng,
                           a.min_age, a.tamper)
            finally:
                if drop is not None:
                    drop()
            print(json.dumps(asdict(res)), flush=True)
            results.append(res)
    print(json.dumps({"ok": all(r.ok for r in results), "backends": [r.backend for r in results],
                      "kills": sum(r.kills for r in results), "trials_finished": sum(r.trials_finished for r in results)}))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
