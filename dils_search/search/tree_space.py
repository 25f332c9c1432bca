"""The plugin API's search space (``GrowthSpace``, its define-by-run sampling and replay) and helpers.

``sample_path(trial, space, base)`` suggests, with names that never change between trials (so any
Optuna sampler can learn): ``n_steps`` (when ``max_steps > 1``), then per step ``init_i`` (when
there is more than one init), ``pos_i`` (a relative position in [0, 1] mapped onto the allowed
positions, when there is more than one) and ``width_i`` (when there is more than one width; never
for an init that keeps the incoming width, such as identity). These are the names the config-driven
space (``search/space.py``) uses too. Also here: what names a loss/metric and a dataset in node
keys (``callable_id``, ``data_digest``), and the Ray Tune side of ``GrowthTree`` (``_DefineByRun``,
the ``OptunaSearch`` space, and ``_tune_follow``, the trainable).
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ..config import MAX_STEPS
from ..core.data import Dataset
from ..core.spec import MAX_DEPTH, MAX_WIDTH, GrowthStep, Spec, check_step
from ..core.stream import StreamedDataset
from ..core.train import Recipe
from ..errors import InputError, MissingDependency
from ..registry import INITS
from ..store import sqlite_path
from .space import Replay, Suggester, draw_steps, positions_on

__all__ = ["GrowthSpace", "sample_path", "Replay", "callable_id", "data_digest", "count_root", "not_below_base",
           "ray_run_config"]

_RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


def _positive_int(name: str, value: Any, at_most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= at_most:
        raise InputError(f"{name}={value!r} must be an integer in 1..{at_most}")


@dataclass(frozen=True)
class GrowthSpace:
    """Which growth paths a trial may take.

    ``min_steps`` (default 0) to ``max_steps``: how many layers a path inserts; with ``min_steps=0``
    the base itself is a candidate (``n_steps`` = 0), so a study whose insertions all hurt can still
    deliver its base; ``min_steps=1`` makes every trial grow. ``widths``: the widths a new layer may have;
    ``inits``: init method names (``registry.INITS``: dils-analytic, dils-approx, identity, zero,
    random, or one registered by a plugin); ``positions``: ``"any"`` (anywhere), ``"last"`` (just
    before the head) or a list of hidden-layer indices.
    """

    max_steps: int
    widths: tuple[int, ...] | list[int]
    inits: tuple[str, ...] | list[str] = ("dils-analytic",)
    positions: str | tuple[int, ...] | list[int] = "any"
    min_steps: int = 0

    def __post_init__(self) -> None:  # the config's limits: max_steps <= 64, widths <= 65536, positions < 256
        _positive_int("max_steps", self.max_steps, MAX_STEPS)
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or not 0 <= self.min_steps <= self.max_steps:
            raise InputError(f"min_steps={self.min_steps!r} must be an integer in 0..max_steps ({self.max_steps})")
        for name in ("widths", "inits"):
            value = getattr(self, name)
            if isinstance(value, str | bytes) or not isinstance(value, list | tuple) or not value:
                raise InputError(f"{name}={value!r} must be a non-empty list")
            object.__setattr__(self, name, tuple(value))
        for w in self.widths:
            _positive_int("widths", w, MAX_WIDTH)
        for init in self.inits:
            INITS.check(init, "inits")
        p = self.positions
        if isinstance(p, str):
            if p not in ("any", "last"):
                raise InputError(f"positions={p!r} is unknown; allowed: 'any', 'last', or a list of layer indices")
        elif isinstance(p, list | tuple) and p:
            for i in p:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_DEPTH:
                    raise InputError(f"positions={list(p)!r} must hold integers in 0..{MAX_DEPTH - 1}")
            object.__setattr__(self, "positions", tuple(p))
        else:
            raise InputError(f"positions={p!r} must be 'any', 'last' or a non-empty list of layer indices")

    def allowed_positions(self, spec: Spec) -> list[int]:
        """Where a step may go on ``spec``."""
        return positions_on(spec, self.positions)

    def to_dict(self) -> dict[str, Any]:
        return {"min_steps": self.min_steps, "max_steps": self.max_steps, "widths": list(self.widths), "inits": list(self.inits),
                "positions": self.positions if isinstance(self.positions, str) else list(self.positions)}


def sample_path(trial: Suggester, space: GrowthSpace, base: Spec) -> tuple[GrowthStep, ...]:
    """Suggest a growth path on ``base`` define-by-run (``space.draw_steps`` with the GrowthSpace's values)."""
    if not space.allowed_positions(base):  # every path would be empty: the root alone, again and again
        raise InputError(f"positions={space.to_dict()['positions']!r} allows no position on the base "
                         f"(hidden={list(base.hidden)}); allowed: positions up to {len(base.hidden)}")
    return tuple(draw_steps(trial, base, max_steps=space.max_steps, inits=space.inits, widths=space.widths,
                            positions=space.allowed_positions, min_steps=space.min_steps))


def check_path(base: Spec, steps: tuple[GrowthStep, ...]) -> Spec:
    """The deepest spec of ``steps`` on ``base``, every step checked (position, init, the documented
    limits) before anything is trained: an ``InputError`` naming the step otherwise."""
    spec = base
    for i, step in enumerate(steps):
        if not isinstance(step, GrowthStep):
            raise InputError(f"path step {step!r} is not a GrowthStep; get paths from tree.suggest(trial, space)")
        try:
            check_step(spec, step)
            spec = step.inserted_into(spec)
        except ValueError as exc:  # SpecError (an InputError) or a limit of the spec
            raise InputError(f"path step {i} ({step.position}:{step.width}:{step.init}): {str(exc).splitlines()[0]}") from None
    return spec


def callable_id(fn: Callable[..., Any] | None) -> str:
    """What names a loss or metric in a node key: ``fn.dils_name``, else ``module:qualname``."""
    if fn is None:
        return "default"
    named = getattr(fn, "dils_name", None)
    if isinstance(named, str) and named:
        return named
    if isinstance(fn, functools.partial):
        return f"partial({callable_id(fn.func)},{fn.args!r},{sorted(fn.keywords.items())!r})"
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def data_digest(data: Dataset | StreamedDataset) -> str:
    """The sha256 of a dataset's six split tensors, its task and its output count. Streamed data is
    read once, batch by batch, for it (give ``GrowthTree(data_id=...)`` to skip that pass)."""
    h = hashlib.sha256(f"{data.task}|{data.out_features}".encode())
    if isinstance(data, StreamedDataset):
        h.update(f"|streamed:{list(data.sample_shape)}".encode())
        for split in ("train", "val", "test"):
            h.update(f"|{split}:{data.size(split)}|".encode())
            for x, y in data.batches(split, device="cpu"):
                h.update(x.contiguous().numpy().tobytes())
                h.update(y.contiguous().numpy().tobytes())
        return h.hexdigest()
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        t = getattr(data, name).detach().cpu().contiguous()
        h.update(f"|{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value  # numpy / torch scalars -> Python


class _DefineByRun:
    def __init__(self, base: Spec, space: GrowthSpace, extra: Callable[[Any], Any] | None) -> None:
        self.base, self.space, self.extra = base, space, extra

    def __call__(self, trial: Any) -> None:
        if self.extra is not None:
            self.extra(trial)
        sample_path(trial, self.space, self.base)


def _tune_follow(config: dict[str, Any], tree: Any, space: GrowthSpace) -> None:
    """The trainable of ``GrowthTree.trainable``: one ``tune.report`` per node along the config's path."""
    from ray import tune

    steps = sample_path(Replay(config), space, tree.base)
    path = tree.path(steps, {k: v for k, v in config.items() if k in _RECIPE_FIELDS})

    def report(node: Any) -> bool:
        tune.report({"val_metric": node.val_metric, "test_metric": node.test_metric, "depth": node.depth,
                     "node_key": node.key, "trained": node.trained})
        return False

    tree._follow(path, report)


def absolute_storage(url: str) -> str:
    """``url`` with a relative SQLite file made absolute (other URLs as they are)."""
    db = sqlite_path(url)
    if db is None or db.is_absolute():
        return url
    return make_url(url).set(database=str(db.resolve())).render_as_string(hide_password=False)


def count_root(roots: dict[str, set[str]], trial: Any, key: str, limit: int) -> None:
    """Note root ``key`` used by ``trial``'s study; warn once per study when more than ``limit`` were used."""
    study = getattr(getattr(trial, "study", None), "study_name", None)
    if study is None:
        return
    used = roots.setdefault(study, set())
    before = len(used)
    used.add(key)
    if before == limit and len(used) > before:  # once: when the count first passes the limit
        warnings.warn(
            f"GrowthTree: study {study!r} has used {len(used)} roots: every distinct recipe_overrides value is its "
            "own tree, trained from scratch, so trials with different values share no node; draw your own params "
            "from a small set (trial.suggest_categorical) to reuse nodes", UserWarning, stacklevel=3)


def not_below_base(store: Any, winner: Any, direction: str) -> Any:
    """``winner`` (a ``GrowthPath``), or its root (the base) when the base scored better on validation:
    ``GrowthTree.finalize`` never delivers below the study's own base."""
    root = winner.prefixes()[0]
    got, base = store.get(winner.key), store.get(root.key)
    if not winner.steps or got is None or base is None:
        return winner
    sign = 1.0 if direction == "maximize" else -1.0
    if sign * float(base.metrics["val_metric"]) > sign * float(got.metrics["val_metric"]):
        warnings.warn(f"GrowthTree.finalize: the best trial's node has validation metric {got.metrics['val_metric']:.4f}, "
                      f"worse than its base's {base.metrics['val_metric']:.4f}; finalizing the base instead",
                      UserWarning, stacklevel=3)
        return root
    return winner


def ray_run_config(artifacts: str, name: str | None, kwargs: dict[str, Any]) -> Any:
    """``tune.RunConfig(name=name, **kwargs)`` with ``storage_path`` defaulting to ``<artifacts>/ray_experiments``."""
    try:
        from ray import tune
    except ImportError:
        raise MissingDependency("tree.run_config needs Ray Tune; install it with: pip install 'dils-search[ray]'") from None
    kwargs = {"storage_path": str(Path(artifacts) / "ray_experiments"), **kwargs}
    return tune.RunConfig(name=name, **kwargs)
