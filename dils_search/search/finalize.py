"""The finalize stage: train the search's best architectures on with a decay phase, deliver the best.

A depth search exists to hand over a model. Growth-time nodes get ``epochs_per_step`` epochs at
their final size, so the search's best node is under-trained. Finalizing takes the ``top_k`` best
distinct architectures by validation (every node any finished trial evaluated, pruned trials'
prefixes included), trains each ``final.epochs`` more epochs with ``final.schedule`` (cosine by
default) and delivers the best of them by validation *after* finalizing.

A finalized model is a node of the lineage store: the child of its winner, keyed by the winner's
key and the final recipe. It is trained once, under a lease, checked by sha256 when loaded, and
reused by every later ``finalize`` of the same study (so finalizing twice trains nothing new).
The delivered model's summary is kept in the study's ``dils_final`` user attribute.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import StudyConfig
from ..core.model import GrowableNet
from ..core.spec import GrowthStep
from ..core.train import Recipe
from ..errors import InputError, RuntimeFailure
from ..store import Fetched, LineageStore, NodeMeta, StoreError, Trained
from .attrs import MODE, NODE_KEYS, VALS, path_text, steps_of
from .paths import GrowthPath, Task, fit_final, make_task, seed_of, train_node
from .storage import FINAL_ATTR, FINISHED_STATES, StoredStudy, open_storage, read_study, study_config

__all__ = ["FinalResult", "finalize_study", "finalize_node", "ensure_node", "final_recipe", "final_meta", "fetch_node", "FINAL_ATTR"]

log = logging.getLogger("dils_search")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def final_recipe(cfg: StudyConfig, epochs: int | None = None) -> dict[str, Any]:
    """Everything that decides a finalized model's weights besides its winner (part of its key)."""
    f, t = cfg.final, cfg.train
    return {
        "mode": "final", "epochs": f.epochs if epochs is None else epochs, "lr": f.lr or t.lr, "schedule": f.schedule,
        "rewarmup_epochs": f.rewarmup_epochs, "optimizer": t.optimizer, "batch_size": t.batch_size,
        "weight_decay": t.weight_decay,
    }


def final_meta(winner: GrowthPath, recipe: dict[str, Any]) -> NodeMeta:
    """The finalized node of ``winner``: its child in the lineage store, keyed by both."""
    key = hashlib.sha256(_canonical({"from": winner.key, "final": recipe}).encode()).hexdigest()
    return NodeMeta(key=key, parent_key=winner.key, depth=winner.depth, spec_json=winner.spec.to_json(),
                    step_json=None, recipe_json=_canonical(recipe))


def fetch_node(task: Task, store: LineageStore, path: GrowthPath) -> Fetched:
    """The node of ``path``, loaded, or (re)trained with every prefix it needs when missing or damaged."""
    prefixes = path.prefixes() if path.recipe["mode"] != "scratch" else [path]
    parent: GrowableNet | None = None
    fetched: Fetched | None = None
    for node_path in prefixes:
        fetched = store.get_or_train(node_path.meta(), functools.partial(train_node, task, node_path, parent))
        parent = fetched.model.to(task.device)
    assert fetched is not None
    return fetched


def train_final(task: Task, store: LineageStore, winner: GrowthPath, recipe: dict[str, Any], key: str) -> Trained:
    """Train ``winner``'s model ``recipe['epochs']`` more epochs (its weights are never changed in place)."""
    model = copy.deepcopy(fetch_node(task, store, winner).model).to(task.device)
    return fit_final(model, task.data, task.device, winner, Recipe(
        optimizer=recipe["optimizer"], lr=recipe["lr"], epochs=recipe["epochs"], batch_size=recipe["batch_size"],
        weight_decay=recipe["weight_decay"], rewarmup_epochs=recipe["rewarmup_epochs"], schedule=recipe["schedule"],
        seed=seed_of(key)), key)


@dataclass
class FinalResult:
    """The delivered model of a study and what finalizing cost (``flops``/``seconds``: all ``top_k``)."""

    node_key: str
    from_node: str
    val_metric: float
    test_metric: float
    flops: int
    seconds: float
    hidden: list[int]
    params: int
    search_val: float
    search_test: float
    search_best_node: str
    search_best_val: float
    search_best_test: float
    epochs: int
    top_k: int
    after_trials: int
    trained: int = 0
    path: str = ""  # the growth path of the delivered architecture, +WIDTH@POSITION:INIT per step
    candidates: list[dict[str, Any]] = field(default_factory=list)
    model: GrowableNet | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model")
        return out


def _evaluated(study: StoredStudy, task: Task) -> Iterator[tuple[int, float, GrowthPath]]:
    """``(trial number, val, path)`` of every node a finished trial evaluated, in trial order."""
    for t in study.trials:
        attrs = t.user_attrs
        if t.state not in FINISHED_STATES or not attrs.get(VALS) or NODE_KEYS not in attrs:
            continue
        steps = [GrowthStep.from_dict(s) for s in steps_of(attrs)]
        mode = attrs.get(MODE, "grow")
        paths = [task.path(steps, mode)] if mode == "scratch" else [task.path(steps[:i], mode) for i in range(len(attrs[VALS]))]
        for path, key, val in zip(paths, attrs[NODE_KEYS], attrs[VALS], strict=False):
            if path.key != key:  # stored by another version of the config: not ours to rebuild
                log.warning("trial %d: node %s does not match its path under this config; skipped", t.number, key[:12])
                continue
            yield t.number, float(val), path


def _candidates(study: StoredStudy, task: Task) -> list[tuple[float, GrowthPath]]:
    """The best evaluated node per architecture as ``(val, path)``, best first (ties: the earlier trial)."""
    best: dict[str, tuple[float, int, GrowthPath]] = {}
    for number, val, path in _evaluated(study, task):
        arch = path.spec.to_json()
        if arch not in best or val > best[arch][0]:
            best[arch] = (val, number, path)
    return [(v, p) for v, _, p in sorted(best.values(), key=lambda c: (-c[0], c[1]))]


def _path_of(url: str, name: str, node_key: str, task: Task, store: LineageStore | None = None) -> GrowthPath:
    """The growth path of a node: from the lineage store's parent chain (grown nodes), else from the
    study's trials (scratch nodes, whose parents were never stored)."""
    if store is not None:
        chain = []
        record = store.get(node_key)
        while record is not None:
            chain.append(record)
            record = store.get(record.parent_key) if record.parent_key else None
        root = chain[-1] if chain else None
        steps = [r.step for r in reversed(chain[:-1])]
        if root is not None and root.depth == 0 and all(steps):
            grown = GrowthPath(task.base, root.recipe, tuple(GrowthStep.from_dict(st) for st in steps if st))
            if grown.key == node_key:
                return grown
    found = next((p for _, _, p in _evaluated(read_study(url, name), task) if p.key == node_key), None)
    if found is None:
        raise StoreError(f"node {node_key[:12]} was not evaluated by a finished trial of study {name!r}")
    return found


def finalize_node(url: str, name: str, node_key: str, artifacts: str | None = None, epochs: int | None = None,
                  device: str | torch.device | None = None, recipe: dict[str, Any] | None = None) -> Fetched:
    """The finalized child of one evaluated node of study ``name`` (trained once, then reused): what
    ``compare`` uses to finalize scratch's best node within another policy's delivered compute."""
    cfg, stored = study_config(url, name)
    task = make_task(cfg, device)
    path = _path_of(url, name, node_key, task)
    recipe = recipe or final_recipe(cfg, epochs)
    meta = final_meta(path, recipe)
    store = LineageStore(url, artifacts or stored, lease_seconds=cfg.storage.lease_seconds)
    try:
        return store.get_or_train(meta, functools.partial(train_final, task, store, path, recipe, meta.key))
    finally:
        store.close()


def ensure_node(url: str, name: str, node_key: str, artifacts: str | None = None) -> Fetched:
    """Node ``node_key`` of study ``name``: loaded, or retrained (with whatever it grew from) when its
    checkpoint is missing or damaged. ``export`` uses it, so a damaged best node never blocks it."""
    cfg, stored = study_config(url, name)
    store = LineageStore(url, artifacts or stored, lease_seconds=cfg.storage.lease_seconds, create=False)
    try:
        record = store.get(node_key)
        if record is not None and record.recipe.get("mode") == "final" and record.parent_key:
            return finalize_node(url, name, record.parent_key, artifacts, recipe=record.recipe)
        task = make_task(cfg)
        return fetch_node(task, store, _path_of(url, name, node_key, task, store))
    finally:
        store.close()


def finalize_study(
    url: str, name: str, artifacts: str | None = None, top_k: int | None = None, epochs: int | None = None,
    device: str | torch.device | None = None, progress: bool = True, task: Task | None = None,
) -> FinalResult | None:
    """Finalize study ``name`` (see the module doc); None when ``final.epochs`` is 0 or no trial finished.

    Already finalized nodes are loaded, not retrained; a damaged winner is retrained first.
    """
    study = read_study(url, name)
    cfg, stored = study_config(url, name, study)
    k = cfg.final.top_k if top_k is None else top_k
    n_epochs = cfg.final.epochs if epochs is None else epochs
    for where, value in (("top-k", k), ("epochs", n_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if where == "top-k" else 0):
            raise InputError(f"{where}={value!r} must be an integer >= {1 if where == 'top-k' else 0}")
    if n_epochs == 0:
        return None
    task = task or make_task(cfg, device)
    ranked = _candidates(study, task)
    finished = sum(t.state in FINISHED_STATES for t in study.trials)
    if not ranked:
        return None
    recipe = final_recipe(cfg, n_epochs)
    store = LineageStore(url, artifacts or stored, lease_seconds=cfg.storage.lease_seconds)
    try:
        result = _finalize(store, task, name, ranked, k, recipe, finished, progress)
        optuna_study = _optuna_study(url, name, cfg)  # loaded once for the artifact, the importances and the note
        record = result.to_dict()
        record["importances"] = _importances(optuna_study, finished)
        winner = next(p for _, p in ranked if p.key == result.from_node)
        meta = final_meta(winner, recipe)
        record["artifact_id"] = _register_artifact(optuna_study, store, meta, functools.partial(
            train_final, task, store, winner, recipe, meta.key))
        store.put_study(name, config_json=cfg.to_json(), final=record)  # (moves an older study's config over too)
    finally:
        store.close()
    _save_note(optuna_study, name, cfg, result)
    return result


def _optuna_study(url: str, name: str, cfg: StudyConfig) -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(url, cfg))


def _finalize(store: LineageStore, task: Task, name: str, ranked: list[tuple[float, GrowthPath]], k: int,
              recipe: dict[str, Any], finished: int, progress: bool) -> FinalResult:
    """Finalize the ``k`` best of ``ranked`` (trained once, then loaded) and pick the delivered one."""
    import sys

    done: list[tuple[Fetched, GrowthPath, float]] = []
    searched = {r.key: r for r in store.nodes([p.key for _, p in ranked[:k]])}
    for i, (val, winner) in enumerate(ranked[:k], 1):
        meta = final_meta(winner, recipe)
        if progress:
            print(f"finalize {name!r}: {i}/{min(k, len(ranked))} hidden={list(winner.spec.hidden)} "
                  f"(search val {val:.4f}), {recipe['epochs']} epochs {recipe['schedule']}", file=sys.stderr)
        fetched = store.get_or_train(meta, functools.partial(train_final, task, store, winner, recipe, meta.key))
        done.append((fetched, winner, val))

    def search_test(path: GrowthPath) -> float:
        record = searched.get(path.key)
        return float(record.metrics.get("test_metric", float("nan"))) if record else float("nan")

    best_i = max(range(len(done)), key=lambda i: (float(done[i][0].record.metrics["val_metric"]), -i))
    fetched, winner, val = done[best_i]
    m = fetched.record.metrics
    top_val, top_path = ranked[0]
    return FinalResult(
        node_key=fetched.record.key, from_node=winner.key, val_metric=float(m["val_metric"]),
        test_metric=float(m["test_metric"]), flops=int(sum(f.record.own_flops for f, *_ in done)),
        seconds=float(sum(f.record.own_seconds for f, *_ in done)), hidden=list(winner.spec.hidden),
        params=int(m["params"]), search_val=val, search_test=search_test(winner), search_best_node=top_path.key,
        search_best_val=top_val, search_best_test=search_test(top_path), epochs=recipe["epochs"], top_k=k, after_trials=finished,
        trained=sum(f.trained_here for f, *_ in done),
        path=path_text([st.to_dict() for st in winner.steps]),
        candidates=[{"node_key": f.record.key, "from_node": w.key, "hidden": list(w.spec.hidden), "search_val": v,
                     "val_metric": float(f.record.metrics["val_metric"]),
                     "test_metric": float(f.record.metrics["test_metric"]), "flops": f.record.own_flops}
                    for f, w, v in done],
        model=fetched.model,
    )


def _importances(study: Any, finished: int) -> dict[str, Any] | None:
    """Optuna's default parameter importances now, kept for ``report`` (valid while no trial finishes)."""
    from .importance import default_evaluator, param_importances

    values = param_importances(study)
    return None if values is None else {"values": values, "evaluator": default_evaluator(), "after_trials": finished}


def _register_artifact(study: Any, store: LineageStore, meta: NodeMeta, retrain: Callable[[], Trained]) -> str:
    """The delivered checkpoint as an Optuna artifact of the study (``optuna.artifacts``, a file store
    under ``<artifacts>/optuna-artifacts``), so optuna-dashboard lists it and can download it.

    Once per delivered node, under a lock on that folder (two ``finalize`` runs register it once): an
    earlier registration whose bytes still match the node's sha256 is kept. Otherwise the bytes just
    read from the node's file (a regular file, never a link) and checked against its sha256 and spec are
    uploaded from a private copy, so nothing swapped into the artifacts folder meanwhile is registered.
    A node damaged since it was finalized is retrained first, as ``export`` would."""
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

    folder = store.root / "optuna-artifacts"
    folder.mkdir(exist_ok=True)
    backend = FileSystemArtifactStore(str(folder))
    filename = f"{meta.key}.pt"
    with _locked(folder / ".register.lock"):
        data = _verified_bytes(store, meta, retrain)
        sha = hashlib.sha256(data).hexdigest()
        for earlier in get_all_artifact_meta(study):
            if earlier.filename == filename and _artifact_sha256(backend, earlier.artifact_id) == sha:
                return str(earlier.artifact_id)
        with tempfile.TemporaryDirectory() as private:
            copy_path = Path(private) / filename
            copy_path.write_bytes(data)
            return str(upload_artifact(artifact_store=backend, study_or_trial=study, file_path=str(copy_path),
                                       mimetype="application/octet-stream"))


def _verified_bytes(store: LineageStore, meta: NodeMeta, retrain: Callable[[], Trained], tries: int = 3) -> bytes:
    for _ in range(tries):
        record = store.get(meta.key)
        checked = store.load_checked(record) if record is not None and record.status == "ready" else None
        if checked is not None:
            return checked[1]
        store.get_or_train(meta, retrain)  # retrains a missing or damaged checkpoint
    raise RuntimeFailure(f"node {meta.key[:12]}: its checkpoint was damaged again while it was being registered; "
                     "run `dils-search finalize` again")


def _artifact_sha256(backend: Any, artifact_id: str) -> str | None:
    try:
        with backend.open_reader(artifact_id) as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except Exception:  # removed or unreadable: not a registration to keep
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed, never through a link) for the ``with`` block."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def md_code(text: str) -> str:
    """``text`` as a Markdown code span: shown as typed (control characters escaped), never a link, an
    image or HTML, whatever it holds (the fence is longer than any run of backticks in it)."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def _save_note(study: Any, name: str, cfg: StudyConfig, result: FinalResult) -> None:
    """A Markdown note on the study for optuna-dashboard (``dils-search[dashboard]``), when installed."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    lines = [
        f"## dils-search: {md_code(name)}",
        f"**Recommended architecture:** hidden {result.hidden} ({len(result.hidden)} hidden layers, "
        f"{result.params:,} parameters).",
        f"**Delivered model** (finalized {result.epochs} more epochs, best of the top {result.top_k} architectures): "
        f"validation {result.val_metric:.4f}, **test {result.test_metric:.4f}**; node `{result.node_key[:12]}`, "
        f"from node `{result.from_node[:12]}`.",
        f"Before finalizing, the search's best node stood at validation {result.search_best_val:.4f}, "
        f"test {result.search_best_test:.4f}. Finalizing cost {result.flops / 1e9:.2f} GFLOP.",
        f"Policy `{cfg.search.policy}`, inits {cfg.search.inits}; growth path of the delivered architecture: "
        f"`{result.path}`.",
        "The delivered checkpoint is this study's artifact; `dils-search export` writes it too.",
    ]
    save_note(study, "\n\n".join(lines))

