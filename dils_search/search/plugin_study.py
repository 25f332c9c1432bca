"""A study made with a GrowthTree in the user's own objective, as a first-class study: its study row.

``register`` (called by ``GrowthTree.train`` on the first trial of each study) records in the
lineage store's study table what the tree ran on: the base spec, the ``Recipe`` and the other
settings that key its nodes, the loss and metric by name, the last ``GrowthSpace`` (its policy is
"optuna": the user's sampler picks the paths) and the finalize stage's settings. It also saves the
tree's in-memory data in the artifacts folder (once per dataset, checked by sha256), so that
``dils-search finalize`` and ``export`` can train this study's nodes from the command line
(``rebuild_tree``): the loss and metric must then be importable by the name they were keyed with.
Only a study in the tree's own storage gets a row (``ls`` reads one storage).
"""

from __future__ import annotations

import hashlib
import pkgutil
from typing import TYPE_CHECKING, Any

from ..core.data import Dataset
from ..core.grow import GrowOptions
from ..core.spec import spec_from_dict
from ..core.train import Recipe
from ..errors import InputError
from ..store import LineageStore, StoreError
from . import _optuna_compat as compat
from .storage import StudySetup, same_database
from .trainers import data_from_bytes, data_to_bytes

if TYPE_CHECKING:
    import torch

    from .tree import GrowthTree

__all__ = ["register", "describe", "rebuild_tree"]


def _data_key(data_id: str) -> str:
    """The artifact key of a tree's data snapshot (a sha256 hex key, as the store's keys are)."""
    return hashlib.sha256(f"dils-search data {data_id}".encode()).hexdigest()


def describe(tree: GrowthTree) -> dict[str, Any]:
    """What ``rebuild_tree`` needs, and what the readers show, of a plugin tree (JSON-ready)."""
    plan = tree.plan.describe()  # type: ignore[union-attr]  # an ApiPlan: plugin trees only
    return {"policy": "optuna", "base": tree.base.to_dict(), "root_key": tree.path(()).key,
            "n_train": int(tree.data.x_train.shape[0]), "space": tree.space.to_dict() if tree.space else None,
            "artifacts": tree.artifacts, **plan}


def register(tree: GrowthTree, study: Any) -> None:
    """Give ``study`` (an ``optuna.Study`` in the tree's storage) its study row and the data snapshot."""
    rdb = compat.rdb_storage(study)
    if rdb is None or not same_database(rdb.engine.url.render_as_string(hide_password=False), tree.storage):
        return  # an in-memory study, or one in another database: `ls` could not list it with this row
    desc = describe(tree)
    if isinstance(tree.data, Dataset):  # streamed data cannot be copied: finalize it in Python
        raw = data_to_bytes(tree.data.to("cpu"))
        key = _data_key(desc["data_id"])
        sha = hashlib.sha256(raw).hexdigest()
        if tree.store.load_blob(key, sha) is None:
            tree.store.save_blob(key, raw)
        desc["data_sha256"] = sha
    tree.store.put_study(study.study_name, tree=desc)


def _callable(name: str, what: str, study: str) -> Any:
    if name == "default":
        return None
    try:
        return pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError):
        raise InputError(f"study {study!r} was keyed with {what}={name!r}, which cannot be imported here; finalize "
                         "it in Python with tree.finalize(study), or give the function a module-level home") from None


def rebuild_tree(cls: type[GrowthTree], setup: StudySetup, url: str, artifacts: str,
                 device: str | torch.device | None) -> GrowthTree:
    """The GrowthTree that plugin study ``setup`` ran on, rebuilt from its study row and data snapshot."""
    desc = setup.tree or {}
    if "data_sha256" not in desc:
        raise InputError(f"study {setup.name!r} ran on data that was not copied to the store (streamed data); "
                         "finalize it in Python with tree.finalize(study)")
    store = LineageStore(url, artifacts, create=False)
    try:
        raw = store.load_blob(_data_key(desc["data_id"]), desc["data_sha256"])
    finally:
        store.close()
    if raw is None:
        raise StoreError(f"study {setup.name!r}: its data snapshot under artifacts={artifacts!r} is missing or damaged")
    final = desc.get("final", {})
    tree = cls(spec_from_dict(desc["base"]), data_from_bytes(raw), Recipe(**desc["recipe"]), url, artifacts,
               step_epochs=desc["step_epochs"], grow=GrowOptions(**desc["grow"]), calib_size=desc["calib_size"],
               loss=_callable(desc["loss"], "loss", setup.name), metric=_callable(desc["metric"], "metric", setup.name),
               direction=desc["direction"], device=device, data_id=desc["data_id"])
    tree.plan.final_top_k = int(final.get("top_k", 1))  # type: ignore[union-attr]
    tree.plan.final_schedule = str(final.get("schedule", "cosine"))  # type: ignore[union-attr]
    if tree.path(()).key != desc["root_key"]:
        raise InputError(f"study {setup.name!r}: the rebuilt tree keys its root {tree.path(()).key[:12]}, not "
                         f"{desc['root_key'][:12]} as stored; finalize it in Python with tree.finalize(study)")
    return tree
