"""The Ray Tune backend on real Ray: a local instance, a two-node cluster on 127.0.0.1 with
PostgreSQL, the Optuna backend side by side, a SIGKILLed trial worker and a SIGKILLed driver.

Every Ray process a test starts is stopped by pid (a SIGKILLed driver can leave agents behind).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import tiny_config
from optuna.trial import TrialState
from sqlalchemy import create_engine, text

from dils_search.config import StudyConfig
from dils_search.search.study import load_study, open_storage, run_study
from dils_search.search.summary import summarize
from dils_search.store import LineageStore

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ATTRS = {"path", "node_keys", "trained_keys", "flops_spent", "flops_reused", "seconds_spent", "test_metric",
         "best_depth", "params", "vals", "mode"}
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


Proc = tuple[int, str]  # (pid, start time): a pid alone may have been reused by the time we kill


def _procs() -> dict[Proc, tuple[int, str]]:
    """Every live process as (pid, start time) -> (parent pid, command line)."""
    out: dict[Proc, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError, ValueError):
            continue
        if stat[0] != "Z":  # zombies are already dead
            out[(int(entry), stat[19])] = (int(stat[1]), cmd)
    return out


def _tree(roots: set[int], procs: dict[Proc, tuple[int, str]]) -> set[Proc]:
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for (pid, _), (ppid, _) in procs.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return {p for p in procs if p[0] in found}


def ray_pids(needle: str) -> set[Proc]:
    """Processes whose command line names ``needle`` (a Ray temp dir), with all their descendants."""
    procs = _procs()
    return _tree({p for (p, _), (_, cmd) in procs.items() if needle in cmd and p != os.getpid()}, procs)


def kill_pids(started: set[Proc]) -> None:
    """SIGKILL those of ``started`` that still run (same pid and start time)."""
    for pid, _start in started & set(_procs()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def short_tmp(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # Ray's unix sockets need a short path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_toml(cfg: StudyConfig, path: Path) -> Path:
    lines = [f"name = {json.dumps(cfg.name)}", f"seed = {cfg.seed}"]
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def check_reuse(url: str, artifacts: Path, trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """Every node of these trials is ready and was trained exactly once, by exactly one trial."""
    store = LineageStore(url, artifacts, create=False)
    try:
        keys = {k for t in trials for k in t.user_attrs["node_keys"]}
        counts = store.training_counts()
        assert all(counts.get(k) == 1 for k in keys), counts
        assert all(r.status == "ready" for r in store.nodes(sorted(keys)))
    finally:
        store.close()
    trained = [k for t in trials for k in t.user_attrs["trained_keys"]]
    assert len(trained) == len(set(trained))
    return counts


def env_without_ray_auth() -> dict[str, str]:
    # ray.init() in this process sets RAY_AUTH_MODE=token; children must find out for themselves
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "DILS_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """One local Ray with 2 CPUs for the module (starting Ray costs seconds); yields its GCS address."""
    import ray

    temp = short_tmp("dray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level=logging.WARNING)
    started = ray_pids(temp) | {p for p in _tree({os.getpid()}, _procs()) if p[0] != os.getpid()}
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
        kill_pids(started | ray_pids(temp))
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------- without a Ray instance


def test_replayed_space_matches_optuna_trials() -> None:
    """The trainable rebuilds path, params and distributions from a Tune config exactly."""
    from dils_search.search.policies import make_policy
    from dils_search.search.space import DefineByRun, Replay, sample_path
    from dils_search.search.trainers import make_task

    cfg = tiny_config(search={"max_steps": 3, "widths": [8, 16], "inits": ["dils-analytic", "identity", "random"]})
    task, space = make_task(cfg, "cpu"), make_policy(cfg).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        steps = sample_path(trial, space, task.base)
        replay = Replay(dict(trial.params))
        assert sample_path(replay, space, task.base) == steps
        assert replay.distributions == trial.distributions
        DefineByRun(task.base, space)(study.ask())  # the define-by-run space samples the same names


def test_mirror_is_idempotent_by_tune_trial_id(sqlite_url: str, tmp_path: Path) -> None:
    from dils_search.search.ray_backend import MirrorCallback
    from dils_search.search.study import create_study

    cfg = tiny_config()
    LineageStore(sqlite_url, tmp_path / "art").close()
    create_study(cfg, sqlite_url, str(tmp_path / "art"), "mirror")
    params = {"n_steps": 1, "init_0": "identity"}
    attrs = {"path": [{"position": 1, "width": 8, "init": "identity"}], "node_keys": ["a" * 64, "b" * 64],
             "trained_keys": ["b" * 64], "flops_spent": 10, "flops_reused": 5, "seconds_spent": 0.1,
             "test_metric": 0.5, "best_depth": 1, "params": 100, "vals": [0.4, 0.6], "mode": "grow"}
    result = {"depth": 1, "final": True, "val_metric": 0.6, "params": 100, "attrs": json.dumps(attrs), "pid": 1}
    cb = MirrorCallback(sqlite_url, "mirror", "exp", target=2)
    for _ in range(2):
        cb.mirror("t_00000", params, result, errored=False)
    cb.mirror("t_00001", params, {**result, "final": False, "depth": 0}, errored=False)  # stopped by a scheduler
    cb.mirror("t_00002", params, None, errored=True)
    cb.mirror("t_00002", params, None, errored=True)
    trials = load_study(sqlite_url, "mirror").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].value == 0.6 and trials[0].params == params and trials[0].intermediate_values == {0: 0.4, 1: 0.6}
    assert ATTRS <= set(trials[0].user_attrs) and trials[0].user_attrs["ray_trial_id"] == "t_00000"
    s = summarize(sqlite_url, "mirror")
    assert s.n_trials == 3 and s.best_val == 0.6


def test_without_ray_one_line_error_and_optuna_backend_works(tmp_path: Path) -> None:
    """With ray unimportable: ``import dils_search`` and the Optuna backend work; --backend ray exits 2."""
    toml = write_toml(tiny_config(search={"n_trials": 1, "max_steps": 1}), tmp_path / "tiny.toml")
    url = f"sqlite:///{tmp_path / 's.db'}"
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"  # makes `import ray` fail as if it were not installed
        "import dils_search\n"
        "from dils_search.cli import main\n"
        "assert 'ray' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        f"base = ['run', {str(toml)!r}, '--storage', {url!r}, '--artifacts', {str(tmp_path / 'art')!r}, '--quiet']\n"
        "assert main(base) == 0\n"
        "sys.exit(main(base + ['--backend', 'ray', '--study-name', 'r']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env_without_ray_auth(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'dils-search[ray]'" in err[0], err


# ---------------------------------------------------------------- on a local Ray instance


@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_trials_reuse_nodes(local_ray: str, sqlite_url: str, tmp_path: Path) -> None:
    """Two concurrent trials at a time, ASHA over growth steps; every node trained once and shared."""
    from dils_search.search.ray_backend import run_ray

    cfg = tiny_config(search={"n_trials": 6, "pruner": "sha"})
    study = run_ray(cfg, sqlite_url, str(tmp_path / "art"), "local", max_concurrent=2, progress=False)
    trials = finished(study)
    assert len(trials) == 6 and len(study.trials) == 6
    for t in trials:
        assert ATTRS <= set(t.user_attrs) and t.user_attrs["ray_trial_id"]
        assert t.intermediate_values == dict(enumerate(t.user_attrs["vals"]))
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(max(t.user_attrs["vals"]))
    assert len({t.user_attrs["pid"] for t in trials}) >= 2  # two trial workers ran side by side
    check_reuse(sqlite_url, tmp_path / "art", trials)
    base_key = trials[0].user_attrs["node_keys"][0]
    assert all(t.user_attrs["node_keys"][0] == base_key for t in trials)
    assert sum(t.user_attrs["flops_reused"] for t in trials) > 0
    s = summarize(sqlite_url, "local")
    assert s.duplicate_trainings == 0 and s.nodes == s.nodes_trained and s.node_uses_reused >= 5
    assert s.best_val is not None and 0 < s.flops_spent < s.scratch_equivalent_flops
    # the driver finalized once Tune was done: the delivered model is a child of an evaluated node
    assert s.final is not None and s.final["from_node"] in {k for t in trials for k in t.user_attrs["node_keys"]}
    store = LineageStore(sqlite_url, tmp_path / "art", create=False)
    final = store.get(s.final["node_key"])
    store.close()
    assert final is not None and final.status == "ready" and final.parent_key == s.final["from_node"]


# same paths on both backends: identical node keys; metrics within this tolerance (the nodes are
# seeded from their keys and trained on one CPU thread, so in practice they match exactly)
METRIC_TOL = 1e-6


@pytest.mark.ray
@pytest.mark.slow
def test_same_paths_same_keys_and_metrics_as_optuna(local_ray: str, tmp_path: Path) -> None:
    from dils_search.search.ray_backend import run_ray

    cfg = tiny_config(search={"n_trials": 3})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    opt = finished(run_study(cfg, url, str(tmp_path / "art"), "opt", progress=False))
    points = [dict(t.params) for t in opt]
    # 1) a separate store: Ray trains every node itself, and gets the same keys and metrics
    url2 = f"sqlite:///{tmp_path / 'ray.db'}"
    own = finished(run_ray(cfg, url2, str(tmp_path / "art2"), "ray", len(points), points_to_evaluate=points,
                           progress=False))
    by_params = {json.dumps(t.params, sort_keys=True): t for t in own}
    for t in opt:
        twin = by_params[json.dumps(t.params, sort_keys=True)]
        assert twin.user_attrs["node_keys"] == t.user_attrs["node_keys"]
        assert twin.user_attrs["vals"] == pytest.approx(t.user_attrs["vals"], abs=METRIC_TOL)
        assert twin.user_attrs["trained_keys"]  # trained there, not copied
    assert summarize(url2, "ray").best_val == pytest.approx(summarize(url, "opt").best_val, abs=METRIC_TOL)
    # 2) the Optuna study's own store: the same paths reuse every Optuna-trained node
    counts = LineageStore(url, tmp_path / "art").training_counts()
    again = finished(run_ray(cfg, url, str(tmp_path / "art"), "ray-reuse", len(points), points_to_evaluate=points,
                             progress=False))
    assert len(again) == len(points)
    assert all(t.user_attrs["trained_keys"] == [] and t.user_attrs["flops_spent"] == 0 for t in again)
    assert LineageStore(url, tmp_path / "art").training_counts() == counts


def _kill_first_training_worker(url: str, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the Ray worker that is training a depth >= 1 node (its pid is in the lease owner)."""
    engine = create_engine(url)
    query = text("SELECT t.owner FROM dils_trainings t JOIN dils_nodes n ON n.key = t.key "
                 "WHERE t.status = 'running' AND n.depth >= 1")
    try:
        while not stop.is_set() and not killed:
            try:
                with engine.connect() as conn:
                    owners = [row[0] for row in conn.execute(query)]
            except Exception:  # tables not created yet, or a locked sqlite file
                owners = []
            for owner in owners:
                pid = int(owner.split(":")[1])
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
                if pid != os.getpid() and cmd.startswith(b"ray::"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.02)
    finally:
        engine.dispose()


@pytest.mark.ray
@pytest.mark.slow
def test_sigkilled_trial_worker_is_retried(local_ray: str, sqlite_url: str, tmp_path: Path) -> None:
    """A trial whose worker process is SIGKILLed mid-training is restored from its checkpoint."""
    from dils_search.search.ray_backend import run_ray

    cfg = tiny_config(data={"num_samples": 2000}, train={"base_epochs": 3, "epochs_per_step": 6},
                      search={"n_trials": 3, "max_steps": 2, "inits": ["dils-analytic"]})
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_training_worker, args=(sqlite_url, killed, stop), daemon=True)
    killer.start()
    try:
        study = run_ray(cfg, sqlite_url, str(tmp_path / "art"), "killed", max_concurrent=2, progress=False)
    finally:
        stop.set()
        killer.join(5)
    assert killed, "no training worker was caught mid-training"
    trials = finished(study)
    assert len(trials) == 3
    assert sum(t.user_attrs["ray_failures"] for t in trials) >= 1
    check_reuse(sqlite_url, tmp_path / "art", trials)
    for t in trials:  # restored trials still report their whole path
        assert len(t.user_attrs["node_keys"]) == len(t.user_attrs["steps"]) + 1


@pytest.mark.ray
@pytest.mark.slow
def test_cli_driver_sigkill_then_resume(local_ray: str, sqlite_url: str, tmp_path: Path) -> None:
    """`run --backend ray` killed with SIGKILL, then `resume --backend ray`: Tune restores the
    experiment, the study reaches its count, no trial is mirrored twice and no node trained twice."""
    cfg = tiny_config(search={"n_trials": 4})
    toml = write_toml(cfg, tmp_path / "tiny.toml")
    common = ["--storage", sqlite_url, "--ray-address", local_ray, "--quiet"]
    # the schema first, so that polling the study below never races the driver creating it
    LineageStore(sqlite_url, tmp_path / "art").close()
    open_storage(sqlite_url)
    run = subprocess.Popen([sys.executable, "-m", "dils_search", "run", str(toml), "--backend", "ray", "--study-name",
                            "crash", "--artifacts", str(tmp_path / "art"), "--max-concurrent", "2", *common],
                           env=env_without_ray_auth(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    before = 0
    while time.time() < deadline and run.poll() is None:
        try:
            before = len(finished(load_study(sqlite_url, "crash")))
        except Exception:
            before = 0
        if before >= 1:
            break
        time.sleep(0.2)
    if run.poll() is not None:
        pytest.fail(f"the driver ended before it could be killed: {run.stderr.read()[-2000:] if run.stderr else ''}")
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    assert before < 4
    resume = subprocess.run([sys.executable, "-m", "dils_search", "resume", "--backend", "ray", "--study-name",
                             "crash", *common], env=env_without_ray_auth(), cwd=tmp_path, capture_output=True,
                            text=True)
    assert resume.returncode == 0, resume.stderr[-3000:]
    study = load_study(sqlite_url, "crash")
    trials = finished(study)
    assert len(trials) >= 4
    ids = [(t.user_attrs["ray_experiment"], t.user_attrs["ray_trial_id"]) for t in trials]
    assert len(ids) == len(set(ids))
    assert trials[0].user_attrs["ray_experiment"] == "crash"  # the interrupted experiment was restored
    assert sum(t.user_attrs["ray_experiment"] == "crash" for t in trials) > before
    check_reuse(sqlite_url, tmp_path / "art", trials)
    assert "best node" in resume.stdout


# ---------------------------------------------------------------- a two-node cluster on 127.0.0.1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.postgres
def test_two_node_cluster_with_postgres(postgres_url: str, tmp_path: Path) -> None:
    """`ray start --head` + `ray start --address` (1 CPU each), the driver via --ray-address, PostgreSQL
    storage: trials run on both nodes, no node is trained twice, and `show` reads the study."""
    temp = short_tmp("dclu")
    port = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    token = secrets.token_hex(32)
    node_env = env_without_ray_auth() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    started: set[Proc] = set()
    try:
        subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                        "--disable-usage-stats", f"--temp-dir={temp}"], env=node_env, check=True, capture_output=True)
        started |= ray_pids(temp)
        subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats"],
                       env=node_env, check=True, capture_output=True)
        started |= ray_pids(temp)
        cfg = tiny_config(search={"n_trials": 4})
        toml = write_toml(cfg, tmp_path / "tiny.toml")
        # only the token: the driver turns RAY_AUTH_MODE=token on by itself
        driver_env = env_without_ray_auth() | {"RAY_AUTH_TOKEN": token}
        proc = subprocess.run(
            [sys.executable, "-m", "dils_search", "run", str(toml), "--backend", "ray", "--ray-address",
             f"127.0.0.1:{port}", "--storage", postgres_url, "--artifacts", str(tmp_path / "art"), "--study-name",
             "cluster", "--max-concurrent", "2", "--quiet"],
            env=driver_env, cwd=tmp_path, capture_output=True, text=True,
        )
        started |= ray_pids(temp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        trials = finished(load_study(postgres_url, "cluster"))
        assert len(trials) == 4
        assert len({t.user_attrs["ray_node_id"] for t in trials}) == 2, [t.user_attrs["ray_node_id"] for t in trials]
        check_reuse(postgres_url, tmp_path / "art", trials)
        show = subprocess.run([sys.executable, "-m", "dils_search", "show", "--storage", postgres_url, "--study-name",
                               "cluster", "--json"], env=driver_env, capture_output=True, text=True)
        assert show.returncode == 0, show.stderr[-2000:]
        s = json.loads(show.stdout)
        assert s["n_trials"] == 4 and s["duplicate_trainings"] == 0 and s["best_val"] is not None
    finally:
        kill_pids(started | ray_pids(temp))
        shutil.rmtree(temp, ignore_errors=True)
