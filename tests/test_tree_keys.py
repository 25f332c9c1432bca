"""GrowthTree's node keys come from the versioned key schema (search/paths.py RECIPE_SCHEMA) and are
pinned: the keys below were computed with dils-search 3badb71 (before the schema covered trees), so
every node a plugin user stored is found again. A tree built from a config keys its nodes exactly as
the CLI does (tests/test_node_key.py pins those), and its finalized nodes keep their keys too."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dils_search as ds
from dils_search.config import base_spec, load_config
from dils_search.core.train import Recipe
from dils_search.search.paths import RECIPE_SCHEMA, GrowthPath, final_meta, node_recipe, tree_recipe
from dils_search.search.trainers import ConfigPlan

STUDIES = Path(__file__).resolve().parent / "fixtures" / "pinned_studies"  # as shipped at 3badb71 (test_node_key.py)
DIMS = {"digits": (64, 10), "mnist1d": (40, 10), "synthetic": (16, 1)}

#: tree -> keys of: the root; one step; two steps; one step with weight_decay=1e-4; the two-step
#: node's finalized child with the default finalize settings (computed on 3badb71)
PINNED_TREE = {
    "default": (
        "a85d8debfca770b001c86156c53aa90e46ea4feb4a78b2286f6063bab3e0bde1",
        "71bef4d743b0040257d5a27ac5db51372bdedff2c256b14664106bca9feec4d9",
        "bd298ff09ccfb16d5978bd5c40be57d86eb54efa2b2c5a59344de11d98920589",
        "2b7b789aa232ff0fc6a89420af571b0cf0385395410fd1dca6bd4c5d265473c1",
        "7a4bbd952a78c540551238e5fbee98d60de0a1beecf64306f906be73dd709f8c",
    ),
    "custom": (
        "f2b47d1fdeaf2ba3db97e81f5b0ca070bda9215ef2dafe3851319b5163812f69",
        "414c3ef503f51cfbe2e3db474331e80fbc64dbc6e0b1015a0488e8eb2f554685",
        "3ca12e4fbd0ec398c6260fee290fc20c29dd69d1e25eecfd85aa0947501ece30",
        "9b6d40e5e0400e1a85ca29d9b5abbb0a1ee898d3358493443a769e5354ca3e43",
        "f407cc9e72c54eb9b453f5ea6be3172eb215511520f9653a18a2e8be3e6077a3",
    ),
}
#: study -> the finalized child (the config's [final]) of its two-step grow and scratch nodes (3badb71)
PINNED_FINAL = {
    "compare-mnist1d": ("1f6f72a7a2755f1964b3196b5934842588528d51ad99ec2954f11ad2334552d3",
                        "e082077c1ff0c8710b3fdf52b141504019f88f6d93587fe66f805705a09040e4"),
    "digits-mlp": ("5f98ac11a133e69581b08d1ff44fa28407dbba61039c8e69ee8bfe29fd806d1a",
                   "30067b7c335a09d5ad3679267088df1581561ec70bfde8e693185cb3962be967"),
    "mnist1d-cnn": ("6cb15ae7514efa6147e1344fb1a71e9556792217f7d81aee929dbca005ffd372",
                    "d6cf28beeeca300aa8cee88c9886a82852435e7fd3f41a3269cd39557ea1d6d7"),
    "mnist1d-mlp": ("a93435c8db3e8896a02b061b2f7a2d5f5c464a146c7cca01677fe1e2ec9d78cc",
                    "6ece93ce10c281b74ec48acbb80a9f38c9316472ebd04b73f0454944c240f857"),
    "synthetic": ("e033abec1a8acc72e2f7595dea17e731b03aa8cf7664df594097cb948da5e047",
                  "15019dac665602191e759acd6a7477292f7a3bdb8a6a67daa8ff289867bc1b38"),
}


def smooth(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def err(output: torch.Tensor, target: torch.Tensor) -> float:
    return 0.0


smooth.dils_name = "pinned-loss"  # type: ignore[attr-defined]
err.dils_name = "pinned-metric"  # type: ignore[attr-defined]
TREES: dict[str, dict[str, Any]] = {
    "default": {},
    "custom": {"step_epochs": 3, "grow": ds.GrowOptions(ridge=1e-3), "calib_size": 64, "loss": smooth, "metric": err,
               "direction": "minimize"},
}
ONE = (ds.GrowthStep(1, 8, "dils-analytic"),)
TWO = (*ONE, ds.GrowthStep(2, 16, "identity"))


def _tree(tmp_path: Path, **kw: Any) -> ds.GrowthTree:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 6))
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    data = ds.Dataset.from_arrays(x, y, task="classification", seed=0)
    return ds.GrowthTree(base=ds.MLPSpec(6, [16], 3), data=data, recipe=ds.Recipe(epochs=2, lr=1e-2),
                         storage=f"sqlite:///{tmp_path / 'k.db'}", artifacts=str(tmp_path / "k"),
                         data_id="pinned-data", **kw)


@pytest.mark.parametrize("name", sorted(PINNED_TREE))
def test_tree_keys_are_pinned(name: str, tmp_path: Path) -> None:
    tree = _tree(tmp_path, **TREES[name])
    winner = GrowthPath(tree.base, tree.path(()).recipe, TWO)  # (the pinned step 2 is one tree.path now refuses)
    keys = (tree.path(()).key, tree.path(ONE).key, winner.key, tree.path(ONE, {"weight_decay": 1e-4}).key,
            final_meta(winner, tree.plan.final_recipe(winner)).key)
    tree.close()
    assert keys == PINNED_TREE[name]


@pytest.mark.parametrize("name", sorted(PINNED_FINAL))
def test_final_keys_of_shipped_configs_are_pinned(name: str) -> None:
    cfg = load_config(STUDIES / f"{name}.toml")
    base = base_spec(cfg, *DIMS[cfg.data.dataset])
    w, init, n = cfg.search.widths[0], cfg.search.inits[0], len(base.hidden)
    two = (ds.GrowthStep(n, w, init), ds.GrowthStep(n + 1, w, init))
    plan = ConfigPlan(cfg)
    keys = tuple(final_meta(p, plan.final_recipe(p)).key
                 for p in (GrowthPath(base, node_recipe(cfg, mode), two) for mode in ("grow", "scratch")))
    assert keys == PINNED_FINAL[name]


def test_a_config_tree_keys_its_nodes_as_the_cli_does(tmp_path: Path) -> None:
    from conftest import tiny_config

    cfg = tiny_config()
    tree = ds.GrowthTree.from_config(cfg, f"sqlite:///{tmp_path / 'c.db'}", str(tmp_path / "c"), device="cpu")
    steps = (ds.GrowthStep(1, 8, "dils-analytic"),)
    for mode in ("grow", "scratch"):
        assert tree.path(steps, mode=mode).key == GrowthPath(tree.base, node_recipe(cfg, mode), steps).key
    with pytest.raises(ds.InputError, match="mode='tree' is unknown; allowed: grow, scratch"):
        tree.path(steps, mode="tree")
    tree.close()


def test_a_new_recipe_field_is_refused_until_declared_and_keeps_keys_at_its_default() -> None:
    """Adding a field to Recipe no longer re-keys every plugin node silently."""
    next_recipe = dataclasses.make_dataclass("RecipeNext", [("label_smoothing", float, 0.0)], bases=(Recipe,), frozen=True)
    args: dict[str, Any] = {"mode": "tree", "data": "d", "step_epochs": 1, "grow": ds.GrowOptions(), "calib_size": 8,
                            "loss": "default", "metric": "default", "direction": "maximize"}
    plain = tree_recipe(train=Recipe(), **args)
    with pytest.raises(RuntimeError, match="tree.train.label_smoothing is not in the node-key schema"):
        tree_recipe(train=next_recipe(), **args)
    schema = RECIPE_SCHEMA.with_field("train", "label_smoothing", 0.0, tree=True)
    assert tree_recipe(train=next_recipe(), schema=schema, **args) == plain
    assert tree_recipe(train=next_recipe(label_smoothing=0.1), schema=schema, **args)["train"]["label_smoothing"] == 0.1
    v2 = dataclasses.replace(RECIPE_SCHEMA, version=2)
    assert "version" not in plain and tree_recipe(train=Recipe(), schema=v2, **args)["version"] == 2


def test_the_tree_schema_covers_every_recipe_and_grow_option_field() -> None:
    for section, cls in (("train", Recipe), ("grow", ds.GrowOptions)):
        names = {f.name for f in dataclasses.fields(cls)}
        assert names == set(RECIPE_SCHEMA.tree[section]) | RECIPE_SCHEMA.unkeyed.get(f"tree.{section}", frozenset())
