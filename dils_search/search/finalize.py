"""The finalize stage, one for the CLI and the plugin: train the search's best architectures on with a
decay phase, deliver the best.

A depth search exists to hand over a model. Growth-time nodes get few epochs at their final size, so
the search's best node is under-trained. Finalizing takes the ``top_k`` best distinct architectures
by validation (every node any finished trial evaluated, pruned trials' prefixes included), trains
each some more epochs with a decay schedule (cosine by default) and delivers the best of them by
validation *after* finalizing. ``finalize_study`` does it for a stored study (``dils-search
finalize``, the end of ``run``, and ``GrowthTree.finalize`` of a study in the tree's storage);
``finalize_source`` for whatever else ``GrowthTree.finalize`` is given.

A finalized model is a node of the lineage store: the child of its winner, keyed by the winner's
key and the final recipe. It is trained once, under a lease, checked by sha256 when loaded, and
reused by every later finalize of the same study (so finalizing twice trains nothing new). The
delivered model's summary is kept in the study's row of the lineage store (``dils_studies.final_json``,
which ``show --json`` prints as ``"final"``), with the id of the Optuna artifact that holds its
checkpoint and, where optuna-dashboard is installed, a note on the study.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.model import GrowableNet
from ..core.spec import GrowthStep
from ..errors import InputError, RuntimeFailure
from ..store import Fetched, LineageStore, NodeMeta, Trained
from . import _optuna_compat as compat
from .attrs import MODE, evaluated, path_text, steps_of
from .budget import budget_patience, final_epochs, spent
from .paths import GrowthPath, final_meta
from .storage import FINISHED_STATES, open_storage, read_study, same_database, study_setup

if TYPE_CHECKING:
    from ..config import StudyConfig
    from .tree import GrowthTree, TreeNode

__all__ = ["FinalResult", "finalize_study", "finalize_source", "finalize_node", "ensure_node", "candidates", "deliver"]

log = logging.getLogger("dils_search")


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
    delivered: Fetched | None = field(default=None, repr=False)  # the delivered node, as fetched
    winner: GrowthPath | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("model", "delivered", "winner"):
            out.pop(name)
        return out


def candidates(tree: GrowthTree, trials: Iterable[dict[str, Any]]) -> list[tuple[float, GrowthPath]]:
    """The best evaluated node per architecture of the trial records ``trials`` (in trial order) as
    ``(val, path)``, best first (ties: the earlier trial). Nodes another tree grew are skipped."""
    records = list(trials)
    best: dict[str, tuple[float, int, GrowthPath]] = {}
    sign = 1.0 if tree.maximize else -1.0
    for number, attrs in enumerate(records):
        keys, vals = evaluated(attrs)
        steps = [GrowthStep.from_dict(s) for s in steps_of(attrs)]
        mode = attrs.get(MODE) if attrs.get(MODE) in ("scratch", tree.plan.default_mode) else None
        try:
            rebuilt = tree.path(steps, mode=mode)
        except InputError:
            rebuilt = None
        guesses = {p.key: p for p in ([rebuilt] if rebuilt.mode == "scratch" else rebuilt.prefixes())} if rebuilt else {}
        for key, val in zip(keys, vals, strict=False):
            try:  # rebuilt from the steps (no query), else from the store's parent chain (e.g. recipe overrides)
                path = guesses.get(key) or tree.path_of(key, records)
            except InputError:
                log.warning("node %s does not belong to this study's tree; skipped", key[:12])
                continue
            arch = path.spec.to_json()
            if arch not in best or sign * val > sign * best[arch][0]:
                best[arch] = (val, number, path)
    return [(v, p) for v, _, p in sorted(best.values(), key=lambda c: (-sign * c[0], c[1]))]


def deliver(tree: GrowthTree, ranked: list[tuple[float, GrowthPath]], k: int,
            recipe_of: Callable[[GrowthPath], dict[str, Any] | None], *, name: str = "", finished: int = 0,
            progress: bool = False) -> FinalResult:
    """Finalize the ``k`` best of ``ranked`` (trained once, then loaded) and pick the delivered one. A
    candidate whose ``recipe_of`` is None is taken as it was trained (the ``plain`` policy's network,
    or a budget with nothing left to finalize with)."""
    done: list[tuple[Fetched, GrowthPath, float, dict[str, Any] | None]] = []
    searched = {r.key: r for r in tree.store.nodes([p.key for _, p in ranked[:k]])}
    for i, (val, winner) in enumerate(ranked[:k], 1):
        recipe = recipe_of(winner)
        train = {"epochs": 0, "schedule": "as trained"} if recipe is None else recipe.get("train", recipe)
        if progress:
            print(f"finalize {name!r}: {i}/{min(k, len(ranked))} hidden={list(winner.spec.hidden)} "
                  f"(search val {val:.4f}), {train['epochs']} epochs {train['schedule']}", file=sys.stderr)
        if recipe is None:
            fetched = tree.fetch(winner)
        else:
            meta = final_meta(winner, recipe)
            fetched = tree.store.get_or_train(meta, functools.partial(tree.train_final, winner, recipe, meta.key))
        done.append((fetched, winner, val, recipe))

    def search_test(path: GrowthPath) -> float:
        record = searched.get(path.key)
        return float(record.metrics.get("test_metric", float("nan"))) if record else float("nan")

    sign = 1.0 if tree.maximize else -1.0
    best_i = max(range(len(done)), key=lambda i: (sign * float(done[i][0].record.metrics["val_metric"]), -i))
    fetched, winner, val, recipe = done[best_i]
    m = fetched.record.metrics
    top_val, top_path = ranked[0]
    return FinalResult(
        node_key=fetched.record.key, from_node=winner.key, val_metric=float(m["val_metric"]),
        test_metric=float(m["test_metric"]), flops=int(sum(f.record.own_flops for f, _, _, r in done if r is not None)),
        seconds=float(sum(f.record.own_seconds for f, _, _, r in done if r is not None)), hidden=list(winner.spec.hidden),
        params=int(m["params"]), search_val=val, search_test=search_test(winner), search_best_node=top_path.key,
        search_best_val=top_val, search_best_test=search_test(top_path),
        epochs=0 if recipe is None else int(recipe.get("train", recipe)["epochs"]),
        top_k=k, after_trials=finished, trained=sum(f.trained_here for f, _, _, r in done if r is not None),
        path=path_text([st.to_dict() for st in winner.steps]),
        candidates=[{"node_key": f.record.key, "from_node": w.key, "hidden": list(w.spec.hidden), "search_val": v,
                     "val_metric": float(f.record.metrics["val_metric"]),
                     "test_metric": float(f.record.metrics["test_metric"]), "flops": f.record.own_flops if r else 0}
                    for f, w, v, r in done],
        model=fetched.model, delivered=fetched, winner=winner,
    )


def _check(where: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{where}={value!r} must be an integer >= {low}")


def finalize_study(
    url: str, name: str, artifacts: str | None = None, top_k: int | None = None, epochs: int | None = None,
    device: str | torch.device | None = None, progress: bool = True, tree: GrowthTree | None = None,
    lr: float | None = None, schedule: str | None = None,
) -> FinalResult | None:
    """Finalize stored study ``name`` (see the module doc); None when its epochs are 0 or no trial finished.

    ``top_k`` and ``epochs`` default to the study's (``[final]``, or a GrowthTree study's: 1 and its
    ``recipe.epochs``). Already finalized nodes are loaded, not retrained; a damaged winner is retrained first.
    """
    from .tree import GrowthTree

    study = read_study(url, name)
    setup = study_setup(url, name, study)
    k = setup.final["top_k"] if top_k is None else top_k
    n_epochs = setup.final["epochs"] if epochs is None else epochs
    _check("top-k", k, 1)
    _check("epochs", n_epochs, 0)
    finished = [t.user_attrs for t in study.trials if t.state in FINISHED_STATES]
    if n_epochs == 0 or not any(evaluated(a)[0] for a in finished):
        return None
    own = tree is None
    tree = tree or GrowthTree.of_study(url, name, artifacts, device=device)
    try:
        ranked = candidates(tree, finished)
        if not ranked:
            return None
        recipe_of, k = _recipes(tree, setup.config, study.trials, ranked, k, n_epochs if epochs is not None else None,
                                lr, schedule)
        result = deliver(tree, ranked, k, recipe_of, name=name, finished=len(finished), progress=progress)
        optuna_study = _optuna_study(url, name)  # loaded once for the artifact, the importances and the note
        record = result.to_dict()
        record["importances"] = _importances(optuna_study, len(finished))
        assert result.winner is not None
        record["artifact_id"] = _register_artifact(optuna_study, tree.store, *_producer(tree, result.winner, recipe_of))
        # (moves an older study's config, kept in a user attribute, over to the study row too)
        tree.store.put_study(name, config_json=setup.config.to_json() if setup.config else None, final=record)
    finally:
        if own:
            tree.close()
    _save_note(optuna_study, name, setup.label, result)
    return result


def _recipes(tree: GrowthTree, cfg: StudyConfig | None, trials: list[Any], ranked: list[tuple[float, GrowthPath]], k: int,
             epochs: int | None, lr: float | None, schedule: str | None) -> tuple[Callable[[GrowthPath], dict[str, Any] | None], int]:
    """The finalized recipe of each candidate and how many candidates: the plan's own, or for a study
    with ``search.budget_flops`` (and no ``epochs`` given) the epochs the rest of the budget pays for
    (``search/budget.py``); the ``plain`` policy's network is delivered as it was trained."""
    plan = tree.plan
    if cfg is not None and cfg.search.policy == "plain":
        return (lambda w: None), 1
    if cfg is None or not cfg.search.budget_flops or epochs is not None:
        return (lambda w: plan.final_recipe(w, epochs, lr, schedule)), k
    remaining = cfg.search.budget_flops - spent(trials)
    fits = final_epochs(remaining, [p.spec for _, p in ranked[:k]], tree.data.size("train"))
    if not fits:
        log.warning("the search spent the whole budget; delivering its best node as it was trained")
        return (lambda w: None), 1
    by_key = {p.key: n for (_, p), n in zip(ranked, fits, strict=False)}

    def recipe_of(w: GrowthPath) -> dict[str, Any]:  # early stopping, so a long finalize cannot overfit
        recipe = plan.final_recipe(w, by_key[w.key], lr, schedule)
        return {**recipe, "patience": cfg.final.patience or budget_patience(by_key[w.key])}

    return recipe_of, len(fits)


def _producer(tree: GrowthTree, winner: GrowthPath, recipe_of: Callable[[GrowthPath], dict[str, Any] | None]
              ) -> tuple[NodeMeta, Callable[[], Trained]]:
    """The delivered node's meta, and what retrains it should its checkpoint be damaged."""
    recipe = recipe_of(winner)
    if recipe is None:
        def retrain() -> Trained:
            grown = winner.steps and winner.mode != "scratch"
            return tree._train_node(winner, tree.fetch(winner.prefixes()[-2]).model if grown else None)

        return winner.meta(), retrain
    meta = final_meta(winner, recipe)
    return meta, functools.partial(tree.train_final, winner, recipe, meta.key)


def finalize_source(tree: GrowthTree, source: Any, *, epochs: int | None = None, lr: float | None = None,
                    schedule: str | None = None, top_k: int = 1) -> TreeNode:
    """``GrowthTree.finalize``: the delivered node of ``source`` (a study, a Ray Tune ``ResultGrid``, a
    ``TreeNode`` or a node key)."""
    from .tree import TreeNode

    _check("top_k", top_k, 1)
    name = str(getattr(source, "study_name", ""))
    rdb = compat.rdb_storage(source) if name else None
    if rdb is not None and same_database(rdb.engine.url.render_as_string(hide_password=False), tree.storage) and (
            read_study(tree.storage, name, with_trials=False).tree is not None):
        result = finalize_study(tree.storage, name, top_k=top_k, epochs=epochs, progress=False, tree=tree, lr=lr,
                                schedule=schedule)
    else:
        if isinstance(source, TreeNode | str):
            key = source.key if isinstance(source, TreeNode) else source
            path = tree.path_of(key)  # refuses a key that is not stored
            ranked = [(float(tree.node(key).val_metric), path)]
        elif hasattr(source, "get_best_result"):  # a Ray Tune ResultGrid of tree.trainable
            ranked = candidates(tree, [json.loads(r.metrics["attrs"]) for r in source if (r.metrics or {}).get("attrs")])
        else:
            from optuna.trial import TrialState

            ranked = candidates(tree, [t.user_attrs for t in source.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))])
        result = deliver(tree, ranked, top_k, lambda w: tree.plan.final_recipe(w, epochs, lr, schedule)) if ranked else None
    if result is None or result.delivered is None or result.winner is None:
        raise InputError("there is no evaluated node to finalize: no trial finished a node of this tree")
    if not result.winner.steps:
        _warn_if_base_beat_the_best_trial(tree, source, result)
    return TreeNode(tree, result.delivered.record, result.winner.steps, result.delivered.model, result.delivered.trained_here)


def _warn_if_base_beat_the_best_trial(tree: GrowthTree, source: Any, result: FinalResult) -> None:
    """Say so when the base is delivered although the best trial (or Tune result) ended on a grown node."""
    try:
        if hasattr(source, "get_best_result"):
            best = source.get_best_result(metric="val_metric", mode=tree.tune_mode, scope="last").metrics or {}
            key, val = best.get("node_key"), best.get("node_val_metric")
        else:
            keys, vals = evaluated(source.best_trial.user_attrs)
            key, val = (keys[-1], vals[-1]) if keys else (None, None)
    except (AttributeError, ValueError, RuntimeError):  # no best trial (none complete), or not a study
        return
    if key and result.winner is not None and key != result.winner.key and val is not None:
        warnings.warn(f"GrowthTree.finalize: the best trial's node has validation metric {float(val):.4f}, worse than "
                      f"its base's {result.search_val:.4f}; finalizing the base instead", UserWarning, stacklevel=4)


def finalize_node(url: str, name: str, node_key: str, artifacts: str | None = None, epochs: int | None = None,
                  device: str | torch.device | None = None, recipe: dict[str, Any] | None = None) -> Fetched:
    """The finalized child of one evaluated node of study ``name`` (trained once, then reused): what
    ``compare`` uses to finalize scratch's best node within another policy's delivered compute."""
    from .tree import GrowthTree

    tree = GrowthTree.of_study(url, name, artifacts, device=device)
    try:
        path = tree.path_of(node_key, [t.user_attrs for t in read_study(url, name).trials])
        recipe = recipe or tree.plan.final_recipe(path, epochs)
        meta = final_meta(path, recipe)
        return tree.store.get_or_train(meta, functools.partial(tree.train_final, path, recipe, meta.key))
    finally:
        tree.close()


def ensure_node(url: str, name: str, node_key: str, artifacts: str | None = None) -> Fetched:
    """Node ``node_key`` of study ``name``: loaded, or retrained (with whatever it grew from) when its
    checkpoint is missing or damaged. ``export`` uses it, so a damaged best node never blocks it."""
    from .tree import GrowthTree

    tree = GrowthTree.of_study(url, name, artifacts)
    try:
        record = tree.store.get(node_key)
        if record is not None and record.recipe.get("mode") == "final" and record.parent_key:
            tree.close()
            return finalize_node(url, name, record.parent_key, artifacts, recipe=record.recipe)
        return tree.fetch(tree.path_of(node_key, [t.user_attrs for t in read_study(url, name).trials]))
    finally:
        tree.close()


def _optuna_study(url: str, name: str) -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(url))


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


def _save_note(study: Any, name: str, policy: str, result: FinalResult) -> None:
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
        f"Policy `{policy}`; growth path of the delivered architecture: `{result.path}`.",
        "The delivered checkpoint is this study's artifact; `dils-search export` writes it too.",
    ]
    save_note(study, "\n\n".join(lines))
