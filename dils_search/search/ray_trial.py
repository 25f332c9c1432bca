"""One Ray Tune trial: the trainable that follows one growth path, and the search space it replays.

The path comes from the Tune config through ``sample_steps`` (the Optuna backend's define-by-run
space, replayed by ``_Replay``); ``run_path`` (the follower both backends share) gets or trains each
node through the ``LineageStore``, and each node is reported with ``tune.report`` and a tiny
checkpoint: the path's progress (``PathOutcome.progress``), from which a restored trial takes up.
Ray itself is imported only inside the functions that run on a Ray worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from ..config import StudyConfig, config_from_dict
from ..core.spec import Spec
from ..core.threads import set_threads
from ..core.train import TrainingDiverged
from ..store import LineageStore
from .paths import PathOutcome, Task, growth_stalled, make_task, run_path
from .policies import make_policy
from .space import Replay, sample_steps

__all__ = ["PathSpace", "follow_path"]

log = logging.getLogger("dils_search.ray")


# ---------------------------------------------------------------- search space


_Replay = Replay  # the Suggester that replays a Tune config (search/space.py)


class PathSpace:
    """``OptunaSearch``'s define-by-run space: exactly the Optuna backend's ``sample_steps``."""

    def __init__(self, cfg: StudyConfig, base: Spec) -> None:
        self.cfg = cfg
        self.base = base

    def __call__(self, trial: Any) -> None:
        sample_steps(trial, self.cfg, self.base)


# ---------------------------------------------------------------- the trainable


class _Setup:
    """What every Ray worker needs to rebuild the task and open the shared store (small, picklable)."""

    def __init__(self, cfg: StudyConfig, url: str, artifacts: str) -> None:
        self.config_json = cfg.to_json()
        self.url = url
        self.artifacts = str(Path(artifacts).resolve())


_WORKER_CACHE: dict[tuple[str, str, str], tuple[Task, LineageStore, str]] = {}


def _context(setup: _Setup) -> tuple[Task, LineageStore, str]:
    """The task, store and node mode of ``setup``, built once per worker process (actors are reused)."""
    key = (setup.config_json, setup.url, setup.artifacts)
    if key not in _WORKER_CACHE:
        set_threads()  # $DILS_NUM_THREADS, else 1: the setting the CLI and GrowthTree use
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per step
        cfg = config_from_dict(json.loads(setup.config_json))
        store = LineageStore(setup.url, setup.artifacts, lease_seconds=cfg.storage.lease_seconds)
        _WORKER_CACHE[key] = (make_task(cfg), store, make_policy(cfg).mode)
    return _WORKER_CACHE[key]


def _restore_progress(out: PathOutcome) -> None:
    """Take up where a restored trial's last checkpoint left its path."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "progress.json").read_text())
    if not out.restore(state):  # a checkpoint of another path is never trusted
        log.warning("ignoring a checkpoint of path %s in a trial of path %s", str(state.get("key"))[:12], out.path.key[:12])


def _where() -> dict[str, Any]:
    import ray

    return {"ray_node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(), "pid": os.getpid()}


def follow_path(config: dict[str, Any], setup: _Setup) -> None:
    """Tune function trainable: ``run_path`` on the path in ``config``, one ``tune.report`` per node.

    ``val_metric`` is the best validation metric along the path so far (the trial's value if it
    stopped there, as in the Optuna backend); ``node_val_metric`` is the node's own.
    """
    task, store, mode = _context(setup)
    cfg = task.config
    path = task.path(sample_steps(_Replay(config), cfg, task.base), mode=mode)
    out = PathOutcome(path)
    _restore_progress(out)
    growth_pruner = cfg.search.pruner == "growth" and len(cfg.search.objectives) == 1
    where = _where()

    def report(depth: int, val: float) -> bool:
        stop = growth_pruner and growth_stalled(out.vals, cfg.search.min_gain)
        # pruned even at the end, as in Optuna
        _report(out, depth, where, final=out.node_keys[-1] == path.key, growth_stop=stop)
        return stop

    try:
        run_path(task, store, path, report, out)
    except TrainingDiverged as exc:
        _report(out, out.depth, where, final=True, failed=str(exc))


def _report(out: PathOutcome, depth: int, where: dict[str, Any], *, final: bool, failed: str = "",
            growth_stop: bool = False) -> None:
    metrics: dict[str, Any] = {"depth": depth, "final": final, "growth_stop": growth_stop, **where}
    if out.vals and not failed:
        b = out.best_index
        metrics.update(
            val_metric=out.vals[b], params=out.params[b], node_val_metric=out.vals[-1], node_test_metric=out.tests[-1],
            node_params=out.params[-1], node_key=out.node_keys[-1], attrs=json.dumps(out.attrs()),
        )
    else:
        metrics.update(val_metric=float("nan"), params=float("nan"), failed=failed or "no node")
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="dils-ckpt-") as d:
        (Path(d) / "progress.json").write_text(json.dumps(out.progress()))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
