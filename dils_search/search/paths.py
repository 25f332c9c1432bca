"""Growth paths and their node keys: the one versioned key schema of the CLI's and the plugin's trees.

A node key is the sha256 of the canonical JSON of ``{"base", "recipe", "steps"}``. The *node recipe*
is everything besides the base spec and the steps that decides a node's weights. It is built from
``RECIPE_SCHEMA``: for a config (``node_recipe``) from its ``data``, ``train`` and ``grow`` sections,
for a ``GrowthTree`` of the Python API (``tree_recipe``) from its ``Recipe`` and ``GrowOptions``.
A finalized node is the child of its winner, keyed by both (``final_meta``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import StudyConfig
from ..core.spec import GrowthStep, Spec, spec_from_dict
from ..store import NodeMeta

if TYPE_CHECKING:
    from ..core.data import Dataset
    from ..core.grow import GrowOptions
    from ..core.stream import StreamedDataset
    from ..core.train import Recipe

__all__ = ["GrowthPath", "RecipeSchema", "RECIPE_SCHEMA", "ALWAYS", "node_recipe", "tree_recipe", "final_recipe",
           "tree_final_recipe", "final_meta", "seed_of", "callable_id", "data_digest", "canonical"]


def canonical(obj: Any) -> str:
    """The canonical JSON that keys hash: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class GrowthPath:
    """The base spec, the node recipe and the ordered steps; its canonical JSON gives the key."""

    base: Spec
    recipe: dict[str, Any]
    steps: tuple[GrowthStep, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "recipe": self.recipe, "steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        return canonical(self.to_dict())

    @property
    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def depth(self) -> int:
        return len(self.steps)

    @property
    def mode(self) -> str:
        """How its nodes are trained: grown from their parent ("grow", "tree") or from scratch ("scratch")."""
        return str(self.recipe["mode"])

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
            step_json=canonical(self.steps[-1].to_dict()) if self.steps else None,
            recipe_json=canonical(self.recipe),
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
    """The fields that decide a node's weights, so they are part of its key.

    ``fields[section][name]`` (a config's sections) and ``tree[section][name]`` (a ``GrowthTree``'s:
    ``train`` holds the ``Recipe`` fields, ``grow`` the ``GrowOptions`` fields) is the default the
    field had when it joined the key (``ALWAYS`` for the fields of version 1): a field at that
    default is left out, so adding an optional field at its default keeps every stored key. A field
    in neither the schema nor ``unkeyed`` (fields that do not change weights; a tree's sections are
    named ``tree.train`` and ``tree.grow`` there) is refused, so no field is forgotten. ``version``
    is bumped when the same fields would now train different weights; it is written into the key
    only from 2 on, so version-1 keys are those stored before the schema existed.
    """

    version: int
    fields: dict[str, dict[str, Any]]
    unkeyed: dict[str, frozenset[str]] = field(default_factory=dict)
    tree: dict[str, dict[str, Any]] = field(default_factory=dict)

    def with_field(self, section: str, name: str, default: Any, *, tree: bool = False) -> RecipeSchema:
        """This schema with ``section.name`` (of a tree's sections with ``tree``) added, left out of
        keys while it equals ``default``."""
        if tree:
            return dataclasses.replace(self, tree={**self.tree, section: {**self.tree[section], name: default}})
        return dataclasses.replace(self, fields={**self.fields, section: {**self.fields[section], name: default}})

    def section(self, name: str, values: Any, *, tree: bool = False) -> dict[str, Any]:
        """The keyed fields of ``values`` (a dataclass) as section ``name``."""
        where = f"tree.{name}" if tree else name
        declared, unkeyed = (self.tree if tree else self.fields)[name], self.unkeyed.get(where, frozenset())
        out: dict[str, Any] = {}
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f.name in unkeyed:
                continue
            if f.name not in declared:
                raise RuntimeError(f"{where}.{f.name} is not in the node-key schema (search/paths.py RECIPE_SCHEMA): "
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
    unkeyed={"tree.grow": frozenset({"seed"})},  # a tree's node seeds come from their keys
    tree={
        "train": dict.fromkeys(("optimizer", "lr", "epochs", "batch_size", "weight_decay", "momentum", "patience",
                                "rewarmup_epochs", "schedule", "seed"), ALWAYS),
        "grow": {
            **dict.fromkeys(("ridge", "approx_tol", "approx_epochs", "approx_lr", "approx_init", "linear_range"), ALWAYS),
            "recentre": True, "target_basis": True, "fresh_scale": True, "gain": True,  # added after version 1 (issue 22)
        },
    },
)


def node_recipe(cfg: StudyConfig, mode: str = "grow", schema: RecipeSchema = RECIPE_SCHEMA) -> dict[str, Any]:
    """The node recipe of a config's tree; ``mode`` is "grow" or "scratch" (how the nodes are trained)."""
    recipe: dict[str, Any] = {"mode": mode, "seed": cfg.seed}
    if schema.version > 1:
        recipe["version"] = schema.version
    for name in schema.fields:
        recipe[name] = schema.section(name, getattr(cfg, name))
    return recipe


def tree_recipe(*, mode: str, data: str, train: Recipe, step_epochs: int, grow: GrowOptions, calib_size: int, loss: str,
                metric: str, direction: str, schema: RecipeSchema = RECIPE_SCHEMA) -> dict[str, Any]:
    """The node recipe of a ``GrowthTree`` of the Python API: ``mode`` ("tree", or "scratch"), ``api``
    (1), the data's digest (or its ``data_id``), the keyed ``Recipe`` fields after the user's overrides,
    ``step_epochs``, the keyed ``GrowOptions`` fields, ``calib_size``, the loss and metric callables'
    names and the direction. So different overrides, data, loss or metric never share a node."""
    recipe: dict[str, Any] = {"mode": mode, "api": 1, "data": data, "train": schema.section("train", train, tree=True),
                              "step_epochs": step_epochs, "grow": schema.section("grow", grow, tree=True),
                              "calib_size": calib_size, "loss": loss, "metric": metric, "direction": direction}
    if schema.version > 1:
        recipe["version"] = schema.version
    return recipe


def final_recipe(cfg: StudyConfig, epochs: int | None = None) -> dict[str, Any]:
    """The node recipe of a config's finalized nodes (besides the winner, which keys them too)."""
    f, t = cfg.final, cfg.train
    return {
        "mode": "final", "epochs": f.epochs if epochs is None else epochs, "lr": f.lr or t.lr, "schedule": f.schedule,
        "rewarmup_epochs": f.rewarmup_epochs, "optimizer": t.optimizer, "batch_size": t.batch_size,
        "weight_decay": t.weight_decay, **({"patience": f.patience} if f.patience else {}),  # keys without it unchanged
    }


def tree_final_recipe(winner: GrowthPath, epochs: int, lr: float | None = None, schedule: str = "cosine") -> dict[str, Any]:
    """The node recipe of a tree's finalized node: the winner's ``Recipe`` fields with ``epochs``, ``lr``
    (default the winner's) and a ``schedule`` decay, no warm-up and no early stopping."""
    train = {**winner.recipe["train"], "epochs": epochs, "schedule": schedule, "rewarmup_epochs": 0.0, "patience": None}
    if lr is not None:
        train["lr"] = lr
    return {"mode": "final", "api": 1, "train": train}


def final_meta(winner: GrowthPath, recipe: dict[str, Any]) -> NodeMeta:
    """The finalized node of ``winner``: its child in the lineage store, keyed by both."""
    key = hashlib.sha256(canonical({"from": winner.key, "final": recipe}).encode()).hexdigest()
    return NodeMeta(key=key, parent_key=winner.key, depth=winner.depth, spec_json=winner.spec.to_json(),
                    step_json=None, recipe_json=canonical(recipe))


def seed_of(key: str) -> int:
    """A node's training seed: the first 32 bits of its key."""
    return int(key[:8], 16)


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
    from ..core.stream import StreamedDataset

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
