"""Depth-search studies on Optuna: one trial follows one growth path over the lineage store."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

from ..config import ConfigError, StudyConfig, config_from_dict
from ..core.train import TrainingDiverged
from ..errors import InputError, RuntimeFailure
from ..store import LineageStore
from . import _optuna_compat as compat
from .attrs import BASE_SPEC, BUDGET_SPENT, FAIL_REASON, N_TRAIN, POLICY_DONE
from .budget import budget_guard, search_cap, spent
from .follow import growth_stalled
from .policies import Policy, make_policy
from .storage import (
    ARTIFACTS_ATTR,
    FINISHED_STATES,
    StudyListing,
    StudyNotFound,
    list_studies,
    open_storage,
    read_study,
    study_config,
)
from .storage import missing_study as _missing
from .trainers import Task, make_task
from .tree import GrowthTree

__all__ = [
    "GrowthPruner", "open_storage", "create_study", "load_study", "study_config", "optimize", "run_study",
    "resume_study", "list_studies", "StudyListing", "StudyNotFound", "FINISHED", "budget_reached", "finalize_if_done",
]

log = logging.getLogger("dils_search")
FINISHED = tuple(TrialState[name] for name in FINISHED_STATES)


class WorkersFailed(RuntimeFailure):
    """Workers spawned by ``--workers`` failed at run time (the CLI exits 1, not 2)."""


class GrowthPruner(BasePruner):
    """Stops a path when its latest growth step gained less than ``min_gain`` over its parent node."""

    def __init__(self, min_gain: float = 0.002) -> None:
        if min_gain < 0:
            raise InputError(f"min_gain={min_gain!r} must be >= 0")
        self.min_gain = min_gain

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        values = trial.intermediate_values
        step = trial.last_step
        if step is None or step == 0 or step - 1 not in values:
            return False
        return growth_stalled([values[step - 1], values[step]], self.min_gain)


def make_pruner(cfg: StudyConfig) -> BasePruner:
    s = cfg.search
    return {
        "none": lambda: optuna.pruners.NopPruner(),
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
        "sha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=s.max_steps + 1, reduction_factor=2),
        "growth": lambda: GrowthPruner(s.min_gain),
    }[s.pruner]()


def make_sampler(cfg: StudyConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    seed = cfg.seed if seed is None else seed
    policy_sampler = make_policy(cfg).sampler(seed)
    if policy_sampler is not None:
        return policy_sampler
    name = cfg.search.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    return optuna.samplers.NSGAIISampler(seed=seed)


def _directions(cfg: StudyConfig) -> Any:
    return ["maximize"] + (["minimize"] if "params" in cfg.search.objectives else [])


def create_study(cfg: StudyConfig, url: str, artifacts: str, name: str, task: Task | None = None) -> optuna.Study:
    """Create the study (or reopen it if it exists with the same config)."""
    storage = open_storage(url, cfg)
    try:
        existing = storage.get_study_id_from_name(name)
    except KeyError:
        existing = None
    if existing is not None:
        stored = read_study(url, name, with_trials=False).config_json
        before = config_from_dict(json.loads(stored)).to_dict() if stored is not None else None
        now = cfg.to_dict()
        if before is not None:  # the finalize stage and the budget may change; the search may not
            same = {**before, "final": now["final"], "search": {**before["search"], "budget_flops": now["search"]["budget_flops"]}}
            if same != now:  # refused before anything is written
                raise ConfigError(f"study-name={name!r} already exists in storage with a different config; "
                                  "use `dils-search resume` or pick another --study-name")
            if before != now:
                _put_config(url, name, cfg)
    study = optuna.create_study(
        storage=storage, study_name=name, directions=_directions(cfg), load_if_exists=True,
        sampler=make_sampler(cfg), pruner=make_pruner(cfg),
    )
    if existing is None:
        _put_config(url, name, cfg)
        study.set_user_attr(ARTIFACTS_ATTR, str(Path(artifacts).resolve()))  # any folder's `export` finds it
        task = task or make_task(cfg, "cpu")
        study.set_metric_names(metric_names(cfg, task.data.task))
        study.set_user_attr(BASE_SPEC, task.base.to_dict())
        study.set_user_attr(N_TRAIN, int(task.data.x_train.shape[0]))
    return study


def _put_config(url: str, name: str, cfg: StudyConfig) -> None:
    """The config goes to the lineage store's study table (the metric names to Optuna's study)."""
    store = LineageStore(url, create=False)
    try:
        store.put_study(name, config_json=cfg.to_json())
    finally:
        store.close()


def metric_names(cfg: StudyConfig, task_kind: str) -> list[str]:
    """What optuna-dashboard calls the objectives: the validation metric (and parameters)."""
    return ["val_accuracy" if task_kind == "classification" else "val_r2"] + (
        ["params"] if "params" in cfg.search.objectives else [])


def load_study(url: str, name: str, cfg: StudyConfig | None = None, seed_offset: int = 0) -> optuna.Study:
    """Open a study with its config's sampler; ``seed_offset`` keeps parallel workers from
    proposing the same paths (each worker process gets its own)."""
    if cfg is None:
        cfg, _ = study_config(url, name)
    storage = open_storage(url, cfg)
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(cfg, cfg.seed + seed_offset),
                                 pruner=make_pruner(cfg))
    except KeyError:
        raise _missing(url, name) from None


def finished_count(study: optuna.Study) -> int:
    return compat.count_trials(study, FINISHED)


def make_objective(cfg: StudyConfig, tree: GrowthTree, policy: Policy | None = None) -> Any:
    """The CLI's objective: the policy proposes a path, the tree trains it (``GrowthTree.train``, which
    reports each depth, prunes and writes the trial record); the value is the best node along the path."""
    policy = policy or make_policy(cfg)
    multi = len(cfg.search.objectives) > 1
    cap = search_cap(cfg)

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        affordable = budget_guard(cap, tree, trial, policy.mode, min(cfg.search.widths))  # search/budget.py
        steps = policy.propose(trial, tree.base)
        if steps is None:
            trial.study.stop()
            raise optuna.TrialPruned("policy finished")
        out = tree.train(steps, trial, mode=policy.mode, affordable=affordable).outcome
        assert out is not None
        if multi:
            return out.best_val, float(out.params[out.best_index])
        return out.best_val

    return objective


@dataclass
class _Budget:
    """Stops the study at ``target`` finished trials, when as many trials failed with a reason (every
    path keeps diverging: stop instead of retrying forever), or once the search's compute cap is spent
    (``search/budget.py``). Two COUNT queries per trial (other workers' trials count too); the FLOPs,
    only when capped, read the trials through Optuna's cache (which reads only new or running ones)."""

    target: int
    cap: float

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        finished, failed = compat.budget_counts(study, FINISHED, FAIL_REASON)
        if failed >= self.target:
            log.warning("study %s: %d trials failed with a reason; stopping", study.study_name, failed)
        if finished >= self.target or failed >= self.target or (self.cap and spent(study.get_trials(deepcopy=False)) >= self.cap):
            study.stop()


def optimize(
    url: str, name: str, artifacts: str | None = None, n_trials: int | None = None, timeout: float | None = None,
    progress: bool = True, device: str | None = None,
) -> optuna.Study:
    """Run trials of an existing study in this process until it has ``n_trials`` finished ones."""
    cfg, stored_artifacts = study_config(url, name)
    artifacts = artifacts or stored_artifacts
    target = n_trials or cfg.search.n_trials
    study = load_study(url, name, cfg, seed_offset=int(os.environ.get("DILS_WORKER_INDEX", "0")))
    if finished_count(study) >= target:
        return study
    tree = GrowthTree.from_config(cfg, url, artifacts, device=device)
    bar = _progress(study, target) if progress else None
    callbacks: list[Any] = [_Budget(target, search_cap(cfg))] + ([bar] if bar is not None else [])
    limit = timeout if timeout else (cfg.search.timeout or None)
    deadline = time.monotonic() + limit if limit else None
    inner = make_objective(cfg, tree)
    last: list[Any] = [None, None, False]  # this worker's latest trial: number, its objective's error, stale

    def objective(trial: optuna.Trial) -> Any:
        last[:] = [trial.number, None, False]
        try:
            return inner(trial)
        except (ValueError, RuntimeError) as exc:  # before Optuna fails the trial: was it failed already?
            last[1:] = [exc, compat.trial_was_finished_elsewhere(study, trial.number)]
            raise

    try:
        while True:
            try:
                study.optimize(
                    objective,
                    n_trials=None,
                    timeout=max(0.0, deadline - time.monotonic()) if deadline else None,
                    callbacks=callbacks,
                    catch=(TrainingDiverged,),
                    gc_after_trial=False,
                )
                break
            except (ValueError, RuntimeError) as exc:
                # Another worker failed our trial as stale (its heartbeat was late, e.g. on an overloaded
                # machine) and queued its retry; that retry will run, so this worker just goes on. Optuna
                # refuses our writes (UpdateFinishedTrialError, a RuntimeError) or our tell (ValueError):
                # told apart from other errors by the trial's state, never by the message.
                stale = last[2] if exc is last[1] else compat.trial_was_finished_elsewhere(study, last[0])
                if not stale:
                    raise
                log.warning("a trial of this worker was failed as stale by another worker (heartbeat older than "
                            "storage.grace_period=%ss) and queued again; going on", cfg.storage.grace_period)
                if finished_count(study) >= target or (deadline and time.monotonic() >= deadline):
                    break
    finally:
        if bar is not None:
            bar.close()
        tree.close()
    return study


class _progress:
    """A tqdm bar over finished trials, with the best value so far."""

    def __init__(self, study: optuna.Study, target: int) -> None:
        from ..progress import progress_bar

        self.bar = progress_bar(target, study.study_name, initial=min(target, finished_count(study)))
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))  # once; then trial by trial
        self.best = max((t.values[0] for t in done), default=None)
        if self.best is not None:
            self.bar.set_postfix(best=f"{self.best:.4f}")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.bar.n = min(self.bar.total, finished_count(study))
        if trial.state == TrialState.COMPLETE and trial.values:
            self.best = trial.values[0] if self.best is None else max(self.best, trial.values[0])
            self.bar.set_postfix(best=f"{self.best:.4f}")
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _spawn_workers(url: str, name: str, artifacts: str, n_trials: int, workers: int, timeout: float | None) -> None:
    # the storage URL (and its password) goes through the environment, never into argv, where `ps` shows it
    cmd = [sys.executable, "-m", "dils_search", "worker", f"--study-name={name}", f"--artifacts={artifacts}",
           f"--n-trials={n_trials}", "--quiet"]
    if timeout:
        cmd += [f"--timeout={timeout}"]
    import tempfile

    logs = [tempfile.TemporaryFile("w+") for _ in range(workers)]  # a pipe could fill up and block a worker
    procs = [subprocess.Popen(cmd, env={**os.environ, "DILS_WORKER_INDEX": str(i), "DILS_STORAGE": url}, stderr=logs[i], text=True)
             for i in range(workers)]
    from sqlalchemy.exc import SQLAlchemyError

    from ..progress import progress_bar

    try:
        study: optuna.Study | None = optuna.load_study(study_name=name, storage=open_storage(url))
    except SQLAlchemyError:
        study = None  # the workers report what went wrong; wait for them all the same
    with progress_bar(n_trials, f"{name} ({workers} workers)") as bar:
        while any(p.poll() is None for p in procs):
            try:
                bar.n = min(n_trials, finished_count(study)) if study is not None else bar.n
                bar.refresh()
            except SQLAlchemyError:
                study = None  # the database went away: the workers will stop on it; never leave them behind
            time.sleep(1.0)
    errors = []
    for p, log_file in zip(procs, logs, strict=True):
        log_file.seek(0)
        text = log_file.read()
        log_file.close()
        if text.strip() and p.returncode == 0:
            sys.stderr.write(text)  # warnings of a worker that went on
        errors.append((p.returncode, text.strip().splitlines()))
    bad = [(rc, lines) for rc, lines in errors if rc != 0]
    if bad:
        last = next((lines[-1] for _, lines in bad if lines), "")
        raise WorkersFailed(f"{len(bad)} of {workers} workers exited with an error (codes {[rc for rc, _ in bad]})"
                         + (f"; the first said: {last[:300]}" if last else ""))


def budget_reached(study: optuna.Study, cfg: StudyConfig, target: int) -> bool:
    """Whether the study's search is over: ``target`` finished trials, its policy said it is done,
    or its compute cap is spent (``search/budget.py``; a timeout alone does not end it)."""
    if finished_count(study) >= target:
        return True
    done = study.get_trials(deepcopy=False, states=FINISHED)
    if any(t.user_attrs.get(POLICY_DONE) or t.user_attrs.get(BUDGET_SPENT) for t in done):
        return True
    cap = search_cap(cfg)
    return bool(cap) and spent(study.get_trials(deepcopy=False)) >= cap


def finalize_if_done(url: str, name: str, artifacts: str | None, target: int, progress: bool = True,
                     device: str | None = None) -> None:
    """The finalize stage, once the study's budget is reached (``run`` and ``resume`` end with it)."""
    from .finalize import finalize_study

    cfg, _ = study_config(url, name)
    if cfg.final.epochs == 0:
        return
    if not budget_reached(load_study(url, name, cfg), cfg, target):
        log.warning("study %s: trial budget not reached, so not finalized yet; `dils-search finalize` does it "
                    "on demand", name)
        return
    finalize_study(url, name, artifacts, device=device, progress=progress)


def run_study(
    cfg: StudyConfig, url: str, artifacts: str, name: str | None = None, n_trials: int | None = None,
    timeout: float | None = None, workers: int = 1, progress: bool = True, device: str | None = None,
    finalize: bool = True,
) -> optuna.Study:
    """Create (or continue) the study for ``cfg``, run it to ``n_trials`` finished trials, then
    (``finalize``) deliver its model with the finalize stage."""
    name = name or cfg.name
    target = n_trials or cfg.search.n_trials
    task = make_task(cfg, "cpu")  # validate the data against the spec before anything is written
    make_sampler(cfg)  # and the search settings
    make_pruner(cfg)
    LineageStore(url, artifacts).close()  # schema first: first-time creation races between workers
    create_study(cfg, url, artifacts, name, task)
    if workers > 1:
        _spawn_workers(url, name, artifacts, target, workers, timeout)
    else:
        optimize(url, name, artifacts, target, timeout, progress, device)
    if finalize:
        finalize_if_done(url, name, artifacts, target, progress, device)
    return load_study(url, name, cfg)


def _fail_without_heartbeat(storage: optuna.storages.RDBStorage, study: optuna.Study, grace: float) -> int:
    """Fail (and queue again) RUNNING trials that never recorded a heartbeat and started over ``grace`` s ago.

    A worker killed between creating a trial and its first heartbeat (milliseconds later) leaves such
    a trial; Optuna's stale check skips trials without a heartbeat, so it would stay RUNNING forever.
    A live worker records its first heartbeat at once, so after ``grace`` seconds none is alive.
    """
    import copy
    import datetime

    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    callback = compat.stale_trial_callback(storage)
    failed = 0
    for trial_id in compat.running_without_heartbeat(storage, study, cutoff):
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except compat.update_finished_error():
            continue
        failed += 1
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))
    return failed


def recover_stale(url: str, name: str, cfg: StudyConfig, wait: bool = True) -> int:
    """Fail trials left RUNNING by a dead worker and queue their params again.

    Optuna's heartbeat tells dead from live: a trial is stale once its heartbeat is older than
    the grace period. Waits at most one grace period for that; live workers are left alone.
    """
    storage = open_storage(url, cfg)
    study = optuna.load_study(study_name=name, storage=storage)
    deadline = time.time() + cfg.storage.grace_period + cfg.storage.heartbeat_interval + 1
    before = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    while True:
        optuna.storages.fail_stale_trials(study)
        _fail_without_heartbeat(storage, study, cfg.storage.grace_period)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or not wait or time.time() > deadline:
            break
        print(f"waiting for {len(running)} running trial(s): their heartbeat goes stale within "
              f"{cfg.storage.grace_period}s if their worker is dead", file=sys.stderr)
        time.sleep(min(2.0, cfg.storage.heartbeat_interval))
    return before - len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def resume_study(
    url: str, name: str, n_trials: int | None = None, artifacts: str | None = None, timeout: float | None = None,
    workers: int = 1, progress: bool = True, device: str | None = None,
) -> optuna.Study:
    cfg, stored = study_config(url, name)
    artifacts = artifacts or stored
    LineageStore(url, artifacts).close()
    recover_stale(url, name, cfg)
    target = n_trials or cfg.search.n_trials
    if workers > 1:
        _spawn_workers(url, name, artifacts, target, workers, timeout)
    else:
        optimize(url, name, artifacts, target, timeout, progress, device)
    finalize_if_done(url, name, artifacts, target, progress, device)
    return load_study(url, name, cfg)
