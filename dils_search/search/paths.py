"""Growth paths, their node keys, and how one node is trained from its parent."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..config import StudyConfig, base_spec, largest_spec
from ..core.data import Dataset, load_dataset
from ..core.grow import GrowOptions, GrowthInfo, GrowthStep, grow, output_gap
from ..core.model import GrowableNet, build, count_params, forward_flops
from ..core.spec import Spec, spec_from_dict
from ..core.stream import StreamedDataset
from ..core.train import LossFn, MetricFn, Recipe, TrainingDiverged, TrainResult, evaluate_split, train
from ..store import LineageStore, NodeMeta, Trained
from .attrs import TrialRecord

__all__ = ["GrowthPath", "Task", "make_task", "PathOutcome", "run_path", "node_recipe", "growth_stalled",
           "RecipeSchema", "RECIPE_SCHEMA", "ALWAYS"]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class GrowthPath:
    """The base spec, the training recipe and the ordered steps; its canonical JSON gives the key."""

    base: Spec
    recipe: dict[str, Any]
    steps: tuple[GrowthStep, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "recipe": self.recipe, "steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        return _canonical(self.to_dict())

    @property
    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def depth(self) -> int:
        return len(self.steps)

    @property
    def parent(self) -> GrowthPath | None:
        return GrowthPath(self.base, self.recipe, self.steps[:-1]) if self.steps else None

    def prefixes(self) -> list[GrowthPath]:
        return [GrowthPath(self.base, self.recipe, self.steps[:i]) for i in range(len(self.steps) + 1)]

    @property
    def spec(self) -> Spec:
        spec = self.base
        for s in self.steps:
            spec = s.inserted_into(spec)
        return spec

    def meta(self) -> NodeMeta:
        parent = self.parent
        return NodeMeta(
            key=self.key,
            parent_key=parent.key if parent else None,
            depth=self.depth,
            spec_json=self.spec.to_json(),
            step_json=_canonical(self.steps[-1].to_dict()) if self.steps else None,
            recipe_json=_canonical(self.recipe),
        )

    @staticmethod
    def from_dict(data: dict[str, Any]) -> GrowthPath:
        return GrowthPath(spec_from_dict(data["base"]), data["recipe"], tuple(GrowthStep.from_dict(s) for s in data["steps"]))


class _Always:
    def __repr__(self) -> str:
        return "ALWAYS"


#: the "since-added default" of a field keyed from the start: it is never left out of the key
ALWAYS: Any = _Always()


@dataclass(frozen=True)
class RecipeSchema:
    """The config fields that decide a node's weights, so they are part of its key.

    ``fields[section][name]`` is the default the field had when it joined the key (``ALWAYS`` for
    the fields of version 1): a field at that default is left out, so adding an optional field at
    its default keeps every stored key. A field of a keyed section that is in neither ``fields``
    nor ``unkeyed`` (fields that do not change weights) is refused, so no field is forgotten.
    ``version`` is bumped when the same fields would now train different weights; it is written
    into the key only from 2 on, so version-1 keys are those stored before the schema existed.
    """

    version: int
    fields: dict[str, dict[str, Any]]
    unkeyed: dict[str, frozenset[str]] = field(default_factory=dict)

    def with_field(self, section: str, name: str, default: Any) -> RecipeSchema:
        """This schema with ``section.name`` added, left out of keys while it equals ``default``."""
        return RecipeSchema(self.version, {**self.fields, section: {**self.fields[section], name: default}}, self.unkeyed)

    def section(self, name: str, values: Any) -> dict[str, Any]:
        declared, unkeyed = self.fields[name], self.unkeyed.get(name, frozenset())
        out: dict[str, Any] = {}
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f.name in unkeyed:
                continue
            if f.name not in declared:
                raise RuntimeError(f"{name}.{f.name} is not in the node-key schema (search/paths.py RECIPE_SCHEMA): "
                                   "declare it with its default, or as unkeyed")
            default = declared[f.name]
            if default is ALWAYS or type(value) is not type(default) or value != default:
                out[f.name] = value
        return out


RECIPE_SCHEMA = RecipeSchema(
    version=1,
    fields={
        "data": dict.fromkeys(("dataset", "num_samples", "path", "task", "label_column", "val_fraction",
                               "test_fraction"), ALWAYS),
        "train": {
            **dict.fromkeys(("optimizer", "lr", "batch_size", "weight_decay", "base_epochs", "epochs_per_step",
                             "rewarmup_epochs", "patience"), ALWAYS),
            "schedule": "constant",  # added after version 1
        },
        "grow": dict.fromkeys(("calib_size", "ridge", "approx_tol", "approx_epochs"), ALWAYS),
    },
)


def node_recipe(cfg: StudyConfig, mode: str = "grow", schema: RecipeSchema = RECIPE_SCHEMA) -> dict[str, Any]:
    """Everything besides the spec and steps that decides a node's weights (so it belongs in the key)."""
    recipe: dict[str, Any] = {"mode": mode, "seed": cfg.seed}
    if schema.version > 1:
        recipe["version"] = schema.version
    for name in schema.fields:
        recipe[name] = schema.section(name, getattr(cfg, name))
    return recipe


@dataclass
class Task:
    """A config's data, base spec and calibration inputs, ready on ``device``."""

    config: StudyConfig
    data: Dataset
    base: Spec
    calib: torch.Tensor
    device: torch.device

    def path(self, steps: tuple[GrowthStep, ...] | list[GrowthStep] = (), mode: str = "grow") -> GrowthPath:
        return GrowthPath(self.base, node_recipe(self.config, mode), tuple(steps))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DESCRIBED: set[str] = set()  # once per process, however often the task is built


def make_task(cfg: StudyConfig, device: torch.device | str | None = None) -> Task:
    d = cfg.data
    data = load_dataset(
        d.dataset, seed=cfg.seed, num_samples=d.num_samples, path=d.path or None, val_fraction=d.val_fraction,
        test_fraction=d.test_fraction, label_column=d.label_column or None,
        options={"task": d.task} if d.dataset == "synthetic" else None, task=d.task if d.dataset == "file" else None,
    )
    if d.dataset == "file" and (line := data.describe()) not in _DESCRIBED:  # user data: say what was inferred
        _DESCRIBED.add(line)
        print(line, file=sys.stderr)
    spec = base_spec(cfg, data.in_features, data.out_features, data.sample_shape)
    largest_spec(cfg, spec)  # the deepest candidate must fit the limits too
    data = data.reshaped(spec.input_shape)
    dev = torch.device(device) if device is not None else default_device()
    data = data.to(dev)
    return Task(cfg, data, spec, data.x_train[: cfg.grow.calib_size], dev)


def seed_of(key: str) -> int:
    return int(key[:8], 16)


def train_node(task: Task, path: GrowthPath, parent: GrowableNet | None) -> Trained:
    """Train the node of ``path``: grow it from ``parent`` (mode grow) or from scratch (mode scratch)."""
    cfg = task.config
    t, g = cfg.train, cfg.grow
    seed = seed_of(path.key)

    def recipe(epochs: int, rewarmup: float = 0.0) -> Recipe:
        return Recipe(optimizer=t.optimizer, lr=t.lr, epochs=epochs, batch_size=t.batch_size,
                      weight_decay=t.weight_decay, patience=t.patience or None, rewarmup_epochs=rewarmup,
                      schedule=t.schedule, seed=seed)

    scratch = path.recipe["mode"] == "scratch"
    return fit_node(
        path, None if scratch else parent, task.data, task.calib, task.device,
        recipe(t.base_epochs + path.depth * t.epochs_per_step), recipe(t.epochs_per_step, t.rewarmup_epochs),
        GrowOptions(ridge=g.ridge, approx_tol=g.approx_tol, approx_epochs=g.approx_epochs, seed=seed),
    )


GAP_SAMPLES = 8192  # validation inputs the output gap after an insertion is measured on (at most)


def fit_node(
    path: GrowthPath, parent: GrowableNet | None, data: Dataset | StreamedDataset, calib: torch.Tensor, device: torch.device,
    root_recipe: Recipe, step_recipe: Recipe, options: GrowOptions, *,
    loss: LossFn | None = None, metric: MetricFn | None = None, maximize: bool = True,
) -> Trained:
    """The one node trainer of the CLI's studies and of ``GrowthTree``: build ``path.spec`` and train
    it with ``root_recipe`` when there is no ``parent``, else grow ``parent`` by the path's last step
    (``options``, calibrated on ``calib``) and train it with ``step_recipe``; then score it."""
    start = time.perf_counter()
    metrics: dict[str, Any] = {"depth": path.depth, "mode": path.recipe["mode"]}
    insert_flops = 0

    def score(model: GrowableNet, split: str) -> dict[str, float]:
        return evaluate_split(model, data, split, loss=loss, metric=metric)

    def fit(model: GrowableNet, recipe: Recipe) -> TrainResult:
        return train(model, data, recipe, loss=loss, metric=metric, maximize=maximize)

    if parent is None:
        model = build(path.spec, seed=root_recipe.seed).to(device)
        result = fit(model, root_recipe)
    else:
        model = grow(parent, path.steps[-1], calib, options)
        info = cast(GrowthInfo, model.growth_info)
        insert_flops = info.flops
        metrics.update(
            gap=output_gap(parent, model, data.inputs("val", GAP_SAMPLES)), calib_gap=info.calib_gap, val_before=score(parent, "val")["metric"],
            val_after_insert=score(model, "val")["metric"], insert_flops=info.flops, insert_seconds=info.seconds,
            basis=info.basis,
        )
        result = fit(model, step_recipe)
    test, val = score(model, "test"), score(model, "val")
    metrics.update(
        val_metric=val["metric"], val_loss=val["loss"], test_metric=test["metric"], test_loss=test["loss"],
        params=count_params(model), hidden=list(path.spec.hidden), epochs=result.epochs_run,
        train_flops=result.flops, forward_flops=forward_flops(path.spec),
        threads=torch.get_num_threads(), device=str(device),  # results can differ on another count or device
    )
    if not math.isfinite(val["metric"]):
        raise TrainingDiverged(f"node {path.key[:12]} has a non-finite validation metric")
    return Trained(model=model, metrics=metrics, flops=result.flops + insert_flops, seconds=time.perf_counter() - start)


def fit_final(model: GrowableNet, data: Dataset | StreamedDataset, device: torch.device, winner: GrowthPath, recipe: Recipe, key: str, *,
              loss: LossFn | None = None, metric: MetricFn | None = None, maximize: bool = True) -> Trained:
    """The finalize stage's trainer (CLI and ``GrowthTree``): train ``model`` (a copy of ``winner``'s)
    with ``recipe`` and score it as the finalized node ``key``."""
    start = time.perf_counter()
    result = train(model, data, recipe, loss=loss, metric=metric, maximize=maximize)
    val, test = (evaluate_split(model, data, s, loss=loss, metric=metric) for s in ("val", "test"))
    if not math.isfinite(val["metric"]):
        raise TrainingDiverged(f"finalized node {key[:12]} has a non-finite validation metric")
    metrics = {
        "mode": "final", "depth": winner.depth, "from_node": winner.key, "val_metric": val["metric"],
        "val_loss": val["loss"], "test_metric": test["metric"], "test_loss": test["loss"],
        "params": count_params(model), "hidden": list(winner.spec.hidden), "epochs": result.epochs_run,
        "train_flops": result.flops, "forward_flops": forward_flops(winner.spec),
        "threads": torch.get_num_threads(), "device": str(device),
    }
    return Trained(model=model, metrics=metrics, flops=result.flops, seconds=time.perf_counter() - start)


@dataclass
class PathOutcome:
    """What following one path did; becomes the trial's user attrs."""

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
    depth: int = -1  # of the node being fetched or trained last (where a failure happened)

    def progress(self) -> dict[str, Any]:
        """What was followed so far, as JSON-ready data (the Ray backend's checkpoint); see ``restore``."""
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
        return max(range(len(self.vals)), key=lambda i: (self.vals[i], -i))

    @property
    def best_val(self) -> float:
        return self.vals[self.best_index]

    def attrs(self) -> dict[str, Any]:
        """The trial's user attributes (``search/attrs.py``'s ``TrialRecord``): readable first, hashes last."""
        return TrialRecord.of(self).to_attrs()


#: the fields of ``PathOutcome`` that ``progress`` saves and ``restore`` takes up
_PROGRESS = tuple(f.name for f in dataclasses.fields(PathOutcome) if f.name not in ("path", "pruned", "depth"))


def growth_stalled(vals: list[float], min_gain: float) -> bool:
    """The growth pruner's rule: the latest growth step gained less than ``min_gain`` over its parent."""
    return len(vals) > 1 and vals[-1] - vals[-2] < min_gain


def run_path(
    task: Task,
    store: LineageStore,
    path: GrowthPath,
    report: Callable[[int, float], bool] | None = None,
    outcome: PathOutcome | None = None,
) -> PathOutcome:
    """Get or train every node along ``path``; ``report(depth, val)`` returning True stops early.

    ``outcome``, if given, is filled in place and may hold restored progress (``PathOutcome.restore``):
    its nodes are fetched again only as parents, neither recorded nor reported twice. Both the
    Optuna and the Ray backend follow paths here.
    """
    out = outcome if outcome is not None else PathOutcome(path)
    done = len(out.node_keys)
    parent: GrowableNet | None = None
    prefixes = path.prefixes()
    if path.recipe["mode"] == "scratch":
        prefixes = prefixes[-1:]  # only the candidate itself, trained from scratch
    for i, node_path in enumerate(prefixes):
        start = time.perf_counter()
        out.depth = node_path.depth
        fetched = store.get_or_train(node_path.meta(), functools.partial(train_node, task, node_path, parent))
        if fetched.trained_here:
            out.trained_keys.append(node_path.key)
            out.flops_spent += fetched.record.own_flops
            out.seconds_spent += time.perf_counter() - start
        elif i >= done:
            out.flops_reused += fetched.record.own_flops
        parent = fetched.model.to(task.device)
        if i < done:  # recorded and reported before the restore: needed only as the next node's parent
            continue
        m = fetched.record.metrics
        out.node_keys.append(node_path.key)
        out.vals.append(float(m["val_metric"]))
        out.tests.append(float(m["test_metric"]))
        out.params.append(int(m["params"]))
        if report is not None and report(node_path.depth, float(m["val_metric"])):
            out.pruned = True
            break
    return out
