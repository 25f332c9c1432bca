"""The one Ray Tune trainable: a GrowthTree following the path of one Tune config, with checkpoints.

``tree_trainable`` serves the CLI's Ray backend (``ray_backend.py``, a tree built from the config)
and the plugin's ``GrowthTree.trainable`` alike. The path comes from the Tune config by replaying the
define-by-run space (``space.Replay``); ``GrowthTree.follow`` gets or trains each node through the
lineage store, and each node is reported with ``tune.report`` and a tiny checkpoint: the path's
progress (``PathOutcome.progress``), from which a restored trial takes up. Ray itself is imported
only inside the functions that run on a Ray worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.train import TrainingDiverged
from ..errors import MissingDependency
from .follow import PathOutcome, growth_stalled
from .space import GrowthSpace, Replay, sample_path
from .trainers import RECIPE_FIELDS

if TYPE_CHECKING:
    from .tree import GrowthTree

__all__ = ["tree_trainable", "run_config"]

log = logging.getLogger("dils_search.ray")

_TREES: dict[str, GrowthTree] = {}  # per worker process (Tune reuses actors): one open store per tree


def _worker_tree(tree: GrowthTree) -> GrowthTree:
    """The tree this worker already holds under ``tree.token`` (else ``tree``, kept for the next trial)."""
    if tree.token not in _TREES:
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per step
        _TREES[tree.token] = tree
    return _TREES[tree.token]


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


def tree_trainable(config: dict[str, Any], tree: GrowthTree, space: GrowthSpace, mode: str | None = None,
                   min_gain: float | None = None) -> None:
    """Tune function trainable: ``tree.follow`` on the path in ``config``, one ``tune.report`` per node.

    ``val_metric`` is the best validation metric along the path so far (the trial's value if it
    stopped there, as in the Optuna backend); ``node_val_metric`` is the node's own. ``mode`` is how
    the nodes are trained (the tree's own, or "scratch"); ``min_gain`` stops a path whose latest step
    gained less (the growth pruner). Config keys that are ``Recipe`` fields become recipe overrides
    (a plugin tree's only).
    """
    tree = _worker_tree(tree)
    steps = sample_path(Replay(config), space, tree.base)
    overrides = {k: v for k, v in config.items() if k in RECIPE_FIELDS} if tree.config is None else None
    path = tree.path(steps, overrides, mode=mode)
    out = PathOutcome(path, maximize=tree.maximize)
    _restore_progress(out)
    where = _where()

    def report(o: PathOutcome) -> bool:
        stop = min_gain is not None and growth_stalled(o.vals, min_gain)
        _report(o, where, final=o.node_keys[-1] == path.key, growth_stop=stop)  # pruned even at the end, as in Optuna
        return stop

    try:
        tree.follow(path, report, out)
    except TrainingDiverged as exc:
        _report(out, where, final=True, failed=str(exc))


def _report(out: PathOutcome, where: dict[str, Any], *, final: bool, failed: str = "", growth_stop: bool = False) -> None:
    metrics: dict[str, Any] = {"depth": out.depth, "final": final, "growth_stop": growth_stop, **where}
    if out.vals and not failed:
        b = out.best_index
        metrics.update(
            val_metric=out.vals[b], test_metric=out.tests[b], params=out.params[b], best_node_key=out.node_keys[b],
            node_val_metric=out.vals[-1], node_test_metric=out.tests[-1], node_params=out.params[-1],
            node_key=out.node_keys[-1], trained=out.trained_last, attrs=json.dumps(out.attrs()),
        )
    else:
        metrics.update(val_metric=float("nan"), params=float("nan"), failed=failed or "no node")
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="dils-ckpt-") as d:
        (Path(d) / "progress.json").write_text(json.dumps(out.progress()))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def run_config(artifacts: str, name: str | None, kwargs: dict[str, Any]) -> Any:
    """``tune.RunConfig(name=name, **kwargs)`` with ``storage_path`` defaulting to ``<artifacts>/ray_experiments``."""
    try:
        from ray import tune
    except ImportError:
        raise MissingDependency("tree.run_config needs Ray Tune; install it with: pip install 'dils-search[ray]'") from None
    return tune.RunConfig(name=name, **{"storage_path": str(Path(artifacts) / "ray_experiments"), **kwargs})
