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
import warnings
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

__all__ = ["register", "describe", "rebuild_tree", "stored_data", "raw_test_rows", "count_root"]


def _data_key(data_id: str) -> str:
    """The artifact key of a tree's data snapshot (a sha256 hex key, as the store's keys are)."""
    return hashlib.sha256(f"dils-search data {data_id}".encode()).hexdigest()


def describe(tree: GrowthTree) -> dict[str, Any]:
    """What ``rebuild_tree`` needs, and what the readers show, of a plugin tree (JSON-ready)."""
    plan = tree.plan.describe()  # type: ignore[union-attr]  # an ApiPlan: plugin trees only
    return {"policy": "optuna", "base": tree.base.to_dict(), "root_key": tree.path(()).key,
            "n_train": int(tree.data.size("train")), "space": tree.space.to_dict() if tree.space else None,
            "artifacts": tree.artifacts, "task": tree.data.task, "sample_shape": list(tree.data.sample_shape), **plan}


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


def count_root(roots: dict[str, set[str]], trial: Any, key: str, limit: int) -> None:
    """Note root ``key`` used by ``trial``'s study; warn once per study when more than ``limit`` were used
    (every distinct ``recipe_overrides`` value is its own tree, sharing no node with the others)."""
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
            "from a small set (trial.suggest_categorical) to reuse nodes", UserWarning, stacklevel=4)


def _callable(name: str, what: str, study: str) -> Any:
    if name == "default":
        return None
    try:
        return pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError):
        raise InputError(f"study {study!r} was keyed with {what}={name!r}, which cannot be imported here; finalize "
                         "it in Python with tree.finalize(study), or give the function a module-level home") from None


def stored_data(setup: StudySetup, url: str, artifacts: str) -> Dataset | None:
    """The copy of plugin study ``setup``'s data in the store (None: it trained on streamed data)."""
    desc = setup.tree or {}
    if "data_sha256" not in desc:
        return None
    store = LineageStore(url, artifacts, create=False)
    try:
        raw = store.load_blob(_data_key(desc["data_id"]), desc["data_sha256"])
    finally:
        store.close()
    if raw is None:
        raise StoreError(f"study {setup.name!r}: its data snapshot under artifacts={artifacts!r} is missing or damaged")
    return data_from_bytes(raw)


def raw_test_rows(data: Dataset) -> tuple[Any, Any]:
    """The test split as raw inputs (the standardisation undone), numpy, and its labels."""
    x = data.x_test.reshape(data.x_test.shape[0], -1).double()
    if data.input_mean is not None and data.input_std is not None:
        x = x * data.input_std + data.input_mean
    return x.reshape(x.shape[0], *(data.sample_shape or (data.in_features,))).numpy(), data.y_test.numpy()


def rebuild_tree(cls: type[GrowthTree], setup: StudySetup, url: str, artifacts: str,
                 device: str | torch.device | None) -> GrowthTree:
    """The GrowthTree that plugin study ``setup`` ran on, rebuilt from its study row and data snapshot."""
    desc = setup.tree or {}
    data = stored_data(setup, url, artifacts)
    if data is None:
        raise InputError(f"study {setup.name!r} ran on data that was not copied to the store (streamed data); "
                         "finalize it in Python with tree.finalize(study)")
    final = desc.get("final", {})
    tree = cls(spec_from_dict(desc["base"]), data, Recipe(**desc["recipe"]), url, artifacts,
               step_epochs=desc["step_epochs"], grow=GrowOptions(**desc["grow"]), calib_size=desc["calib_size"],
               loss=_callable(desc["loss"], "loss", setup.name), metric=_callable(desc["metric"], "metric", setup.name),
               direction=desc["direction"], device=device, data_id=desc["data_id"])
    tree.plan.final_top_k = int(final.get("top_k", 1))  # type: ignore[union-attr]
    tree.plan.final_schedule = str(final.get("schedule", "cosine"))  # type: ignore[union-attr]
    if tree.path(()).key != desc["root_key"]:
        raise InputError(f"study {setup.name!r}: the rebuilt tree keys its root {tree.path(()).key[:12]}, not "
                         f"{desc['root_key'][:12]} as stored; finalize it in Python with tree.finalize(study)")
    return tree
