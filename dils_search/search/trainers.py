"""How a tree trains its nodes: the node and finalize trainers, and the two plans that say with what.

A *plan* is what differs between a tree built from a TOML config (``ConfigPlan``) and one built in
Python (``ApiPlan``): the node recipe that keys its nodes (``search/paths.py``), the training
``Recipe`` of a root (or scratch) node and of a growth step, the ``GrowOptions``, the finalized
nodes' recipe, and the loss, metric and direction. ``GrowthTree`` does everything else the same way.
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch

from ..config import StudyConfig, base_spec, largest_spec
from ..core.data import Dataset, load_dataset
from ..core.grow import GrowOptions, GrowthInfo, grow, output_gap
from ..core.model import GrowableNet, build, count_params, forward_flops
from ..core.spec import Spec
from ..core.stream import StreamedDataset
from ..core.train import LossFn, MetricFn, Recipe, TrainingDiverged, TrainResult, evaluate_split, train
from ..errors import InputError
from ..store import Trained
from .paths import (
    GrowthPath,
    callable_id,
    final_recipe,
    node_recipe,
    tree_final_recipe,
    tree_recipe,
)

__all__ = ["Task", "make_task", "default_device", "fit_node", "fit_final", "ConfigPlan", "ApiPlan", "RECIPE_FIELDS",
           "data_to_bytes", "data_from_bytes"]

#: the ``Recipe`` fields, which a plugin tree's ``recipe_overrides`` (and Ray Tune configs) may set
RECIPE_FIELDS = tuple(Recipe.__dataclass_fields__)


@dataclass
class Task:
    """A config's data and base spec, ready on ``device``."""

    config: StudyConfig
    data: Dataset
    base: Spec
    device: torch.device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DESCRIBED: set[str] = set()  # once per process, however often the task is built


def make_task(cfg: StudyConfig, device: torch.device | str | None = None) -> Task:
    """Load the config's data and build its base spec (checked against the limits, with the deepest candidate)."""
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
    dev = torch.device(device) if device is not None else default_device()
    return Task(cfg, data.reshaped(spec.input_shape).to(dev), spec, dev)


GAP_SAMPLES = 8192  # validation inputs the output gap after an insertion is measured on (at most)


def fit_node(
    path: GrowthPath, parent: GrowableNet | None, data: Dataset | StreamedDataset, calib: torch.Tensor, device: torch.device,
    root_recipe: Recipe, step_recipe: Recipe, options: GrowOptions, *,
    loss: LossFn | None = None, metric: MetricFn | None = None, maximize: bool = True,
) -> Trained:
    """The one node trainer: build ``path.spec`` and train it with ``root_recipe`` when there is no
    ``parent``, else grow ``parent`` by the path's last step (``options``, calibrated on ``calib``) and
    train it with ``step_recipe``; then score it."""
    start = time.perf_counter()
    metrics: dict[str, Any] = {"depth": path.depth, "mode": path.mode}
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
            gap=output_gap(parent, model, data.inputs("val", GAP_SAMPLES)), calib_gap=info.calib_gap,
            val_before=score(parent, "val")["metric"],
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


def fit_final(model: GrowableNet, data: Dataset | StreamedDataset, device: torch.device, winner: GrowthPath, recipe: Recipe,
              key: str, *,
              loss: LossFn | None = None, metric: MetricFn | None = None, maximize: bool = True) -> Trained:
    """The finalize stage's trainer: train ``model`` (a copy of ``winner``'s) with ``recipe`` and score
    it as the finalized node ``key``."""
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


class ConfigPlan:
    """A TOML study's plan: node recipes of ``node_recipe(cfg)`` (the pinned CLI keys), a root trained
    ``base_epochs`` (a scratch node ``base_epochs + depth * epochs_per_step``), each step
    ``epochs_per_step`` after ``rewarmup_epochs`` of warm-up; finalized nodes by ``[final]``."""

    default_mode = "grow"
    loss: LossFn | None = None
    metric: MetricFn | None = None
    direction = "maximize"

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self.calib_size = cfg.grow.calib_size

    def node_recipe(self, mode: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        if overrides:
            raise InputError(f"recipe_overrides={overrides!r}: a tree built from a config takes its recipe from the config")
        return node_recipe(self.cfg, mode)

    def recipes(self, path: GrowthPath, seed: int) -> tuple[Recipe, Recipe, GrowOptions]:
        """The training ``Recipe`` of a root (or scratch) node of ``path``'s depth, of a growth step, and the grow options."""
        t, g = self.cfg.train, self.cfg.grow

        def recipe(epochs: int, rewarmup: float = 0.0) -> Recipe:
            return Recipe(optimizer=t.optimizer, lr=t.lr, epochs=epochs, batch_size=t.batch_size,
                          weight_decay=t.weight_decay, patience=t.patience or None, rewarmup_epochs=rewarmup,
                          schedule=t.schedule, seed=seed)

        return (recipe(t.base_epochs + path.depth * t.epochs_per_step), recipe(t.epochs_per_step, t.rewarmup_epochs),
                GrowOptions(ridge=g.ridge, approx_tol=g.approx_tol, approx_epochs=g.approx_epochs, seed=seed))

    def final_recipe(self, winner: GrowthPath, epochs: int | None = None, lr: float | None = None,
                     schedule: str | None = None) -> dict[str, Any]:
        recipe = final_recipe(self.cfg, epochs)
        return {**recipe, **({"lr": lr} if lr is not None else {}), **({"schedule": schedule} if schedule else {})}

    @staticmethod
    def final_training(recipe: dict[str, Any], seed: int) -> Recipe:
        """The training ``Recipe`` of a finalized node with node recipe ``recipe``."""
        return Recipe(optimizer=recipe["optimizer"], lr=recipe["lr"], epochs=recipe["epochs"],
                      batch_size=recipe["batch_size"], weight_decay=recipe["weight_decay"],
                      rewarmup_epochs=recipe["rewarmup_epochs"], schedule=recipe["schedule"], seed=seed,
                      patience=recipe.get("patience"))

    def final_settings(self) -> dict[str, Any]:
        return {"top_k": self.cfg.final.top_k, "epochs": self.cfg.final.epochs}


class ApiPlan:
    """A ``GrowthTree`` of the Python API: node recipes of ``tree_recipe``, a root trained with
    ``recipe``, each step ``step_epochs`` with ``recipe.rewarmup_epochs`` of warm-up; finalized nodes
    train ``epochs`` (default ``recipe.epochs``) more with a decay ``schedule``."""

    default_mode = "tree"

    def __init__(self, recipe: Recipe, step_epochs: int, grow: GrowOptions, calib_size: int, loss: LossFn | None,
                 metric: MetricFn | None, direction: str, data_id: str, final_top_k: int = 1,
                 final_schedule: str = "cosine") -> None:
        self.recipe, self.step_epochs, self.grow, self.calib_size = recipe, step_epochs, grow, calib_size
        self.loss, self.metric, self.direction, self.data_id = loss, metric, direction, data_id
        self.final_top_k, self.final_schedule = final_top_k, final_schedule

    def node_recipe(self, mode: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        overrides = {k: v.item() if hasattr(v, "item") else v for k, v in (overrides or {}).items()}  # numpy/torch scalars
        unknown = sorted(set(overrides) - set(RECIPE_FIELDS))
        if unknown:
            raise InputError(f"recipe_overrides has {unknown[0]!r}, which is not a Recipe field; allowed: "
                             f"{', '.join(RECIPE_FIELDS)}")
        return tree_recipe(mode=mode, data=self.data_id, train=replace(self.recipe, **overrides),  # validated by Recipe
                           step_epochs=self.step_epochs, grow=self.grow, calib_size=self.calib_size,
                           loss=callable_id(self.loss), metric=callable_id(self.metric), direction=self.direction)

    def recipes(self, path: GrowthPath, seed: int) -> tuple[Recipe, Recipe, GrowOptions]:
        recipe = Recipe(**path.recipe["train"])
        step_epochs = int(path.recipe["step_epochs"])
        return (replace(recipe, epochs=recipe.epochs + path.depth * step_epochs, rewarmup_epochs=0.0, seed=seed),
                replace(recipe, epochs=step_epochs, seed=seed), replace(self.grow, seed=seed))

    def final_recipe(self, winner: GrowthPath, epochs: int | None = None, lr: float | None = None,
                     schedule: str | None = None) -> dict[str, Any]:
        recipe = tree_final_recipe(winner, self.recipe.epochs if epochs is None else epochs, lr,
                                   schedule or self.final_schedule)
        Recipe(**recipe["train"])  # validate before anything is stored
        return recipe

    @staticmethod
    def final_training(recipe: dict[str, Any], seed: int) -> Recipe:
        return Recipe(**{**recipe["train"], "seed": seed})

    def final_settings(self) -> dict[str, Any]:
        return {"top_k": self.final_top_k, "epochs": self.recipe.epochs, "schedule": self.final_schedule}

    def describe(self) -> dict[str, Any]:
        """What rebuilds this plan (``GrowthTree.of_study``), JSON-ready."""
        return {"recipe": self.recipe.to_dict(), "step_epochs": self.step_epochs, "grow": asdict(self.grow),
                "calib_size": self.calib_size, "loss": callable_id(self.loss), "metric": callable_id(self.metric),
                "direction": self.direction, "data_id": self.data_id, "final": self.final_settings()}


_DATA_FIELDS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def data_to_bytes(data: Dataset) -> bytes:
    """An in-memory dataset as bytes (its six split tensors, the statistics its inputs were standardised
    with, and what describes them), for the lineage store."""
    buf = io.BytesIO()
    torch.save({"format": "dils-search-data/1", "name": data.name, "task": data.task, "out_features": data.out_features,
                "sample_shape": list(data.sample_shape), "input_mean": data.input_mean, "input_std": data.input_std,
                **{k: getattr(data, k).detach().cpu().contiguous() for k in _DATA_FIELDS}}, buf)
    return buf.getvalue()


def data_from_bytes(raw: bytes) -> Dataset:
    """The dataset ``data_to_bytes`` wrote (read with ``weights_only=True``: plain tensors and values only)."""
    d = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or d.get("format") != "dils-search-data/1":
        raise InputError("the stored data snapshot is not in the format dils-search-data/1")
    return Dataset(name=str(d["name"]), task=str(d["task"]), out_features=int(d["out_features"]),
                   sample_shape=tuple(int(s) for s in d["sample_shape"]), input_mean=d.get("input_mean"),
                   input_std=d.get("input_std"), **{k: d[k] for k in _DATA_FIELDS})
