"""The one path follower: get or train every node along a growth path, in order, through the store.

``follow`` serves ``GrowthTree.follow`` and with it everything that runs a path: the CLI's Optuna
objective and the plugin's ``train`` (``GrowthTree.train``), the Ray Tune trainable (which passes
the progress restored from its checkpoint) and the finalize stage (which needs a winner's model).
In scratch mode only the path's own node is trained, from random initialisation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .attrs import TrialRecord
from .paths import GrowthPath

if TYPE_CHECKING:
    import torch

    from ..core.model import GrowableNet
    from ..store import Fetched, LineageStore, Trained

__all__ = ["PathOutcome", "follow", "growth_stalled"]


@dataclass
class PathOutcome:
    """What following one path did; ``TrialRecord.of`` makes it the trial's user attrs. ``last`` is the
    deepest node fetched so far (its record and model); ``maximize`` says which validation metric is best."""

    path: GrowthPath
    node_keys: list[str] = field(default_factory=list)
    vals: list[float] = field(default_factory=list)
    tests: list[float] = field(default_factory=list)
    params: list[int] = field(default_factory=list)
    trained_keys: list[str] = field(default_factory=list)
    flops_spent: int = 0
    flops_reused: int = 0
    seconds_spent: float = 0.0
    pruned: bool = False
    budget_spent: bool = False  # stopped before a node the search budget could no longer pay for
    depth: int = -1  # of the node being fetched or trained last (where a failure happened)
    maximize: bool = True
    last: Fetched | None = field(default=None, repr=False)

    def progress(self) -> dict[str, Any]:
        """What was followed so far, as JSON-ready data (a Ray Tune checkpoint); see ``restore``."""
        return {"key": self.path.key, **{name: getattr(self, name) for name in _PROGRESS}}

    def restore(self, progress: dict[str, Any]) -> bool:
        """Take up the ``progress`` of an earlier run of this path; False (nothing taken) if it is another path's."""
        if progress.get("key") != self.path.key:
            return False
        for name in _PROGRESS:
            value = getattr(self, name)
            if isinstance(value, list):
                value.extend(progress[name])
            else:
                setattr(self, name, type(value)(progress[name]))
        return True

    @property
    def best_index(self) -> int:
        """The best node along the path (the first of equals)."""
        sign = 1.0 if self.maximize else -1.0
        return max(range(len(self.vals)), key=lambda i: (sign * self.vals[i], -i))

    @property
    def best_val(self) -> float:
        return self.vals[self.best_index]

    @property
    def trained_last(self) -> bool:
        """Whether the deepest node so far was trained by this run (not reused)."""
        return bool(self.node_keys) and bool(self.trained_keys) and self.trained_keys[-1] == self.node_keys[-1]

    def attrs(self) -> dict[str, Any]:
        """The trial's user attributes (``search/attrs.py``'s ``TrialRecord``): readable first, hashes last."""
        return TrialRecord.of(self).to_attrs()


#: the fields of ``PathOutcome`` that ``progress`` saves and ``restore`` takes up
_PROGRESS = tuple(f.name for f in dataclasses.fields(PathOutcome)
                  if f.name not in ("path", "pruned", "budget_spent", "depth", "maximize", "last"))


def growth_stalled(vals: list[float], min_gain: float) -> bool:
    """The growth pruner's rule: the latest growth step gained less than ``min_gain`` over its parent."""
    return len(vals) > 1 and vals[-1] - vals[-2] < min_gain


def follow(
    store: LineageStore,
    path: GrowthPath,
    train: Callable[[GrowthPath, GrowableNet | None], Trained],
    device: torch.device,
    report: Callable[[PathOutcome], bool] | None = None,
    outcome: PathOutcome | None = None,
    affordable: Callable[[PathOutcome, GrowthPath], bool] | None = None,
) -> PathOutcome:
    """Get (or ``train(node_path, parent)``) every node along ``path``; ``report(outcome)``, called once
    per new node, returning True stops early (``outcome.pruned``). ``affordable(outcome, node_path)``
    is asked before each node: False, unless the node is stored (loading it costs nothing), stops the
    path there (``outcome.pruned`` and ``outcome.budget_spent``).

    ``outcome``, if given, is filled in place and may hold restored progress (``PathOutcome.restore``):
    its nodes are fetched again only as parents, neither recorded nor reported twice.
    """
    out = outcome if outcome is not None else PathOutcome(path)
    done = len(out.node_keys)
    parent: GrowableNet | None = None
    prefixes = [path] if path.mode == "scratch" else path.prefixes()  # scratch: only the candidate itself
    for i, node_path in enumerate(prefixes):
        start = time.perf_counter()
        out.depth = node_path.depth
        if affordable is not None and i >= done and not store.is_ready(node_path.key) and not affordable(out, node_path):
            out.pruned = out.budget_spent = True
            break
        fetched = store.get_or_train(node_path.meta(), functools.partial(train, node_path, parent))
        if fetched.trained_here:
            out.trained_keys.append(node_path.key)
            out.flops_spent += fetched.record.own_flops
            out.seconds_spent += time.perf_counter() - start
        elif i >= done:
            out.flops_reused += fetched.record.own_flops
        parent = fetched.model.to(device)
        out.last = fetched
        if i < done:  # recorded and reported before the restore: needed only as the next node's parent
            continue
        m = fetched.record.metrics
        out.node_keys.append(node_path.key)
        out.vals.append(float(m["val_metric"]))
        out.tests.append(float(m["test_metric"]))
        out.params.append(int(m["params"]))
        if report is not None and report(out):
            out.pruned = True
            break
    return out
