"""The plugin API: growth inside your own Optuna objective or Ray Tune run, on your own data.

```python
import optuna, dils_search as ds
data = ds.Dataset.from_arrays(x, y, task="classification", seed=0)
tree = ds.GrowthTree(base=ds.MLPSpec(data.in_features, [64], data.out_features), data=data,
                     recipe=ds.Recipe(epochs=10, lr=1e-3), storage="sqlite:///my.db", artifacts="my_art")
space = ds.GrowthSpace(max_steps=3, widths=[64, 128], inits=["dils-analytic"], positions="any")

def objective(trial):
    wd = trial.suggest_categorical("weight_decay", [0.0, 1e-4])   # the user's own params: a small set
    path = tree.suggest(trial, space)            # define-by-run growth params, stable names
    node = tree.train(path, trial=trial, recipe_overrides={"weight_decay": wd})
    return node.val_metric                       # reports each depth to the trial; raises TrialPruned

study = optuna.create_study(direction=tree.direction, storage="sqlite:///my.db")
study.optimize(objective, n_trials=30)
final = tree.finalize(study)
final.save("model.pt")                           # takes raw inputs: dils_search.load("model.pt")(x_raw)
```

**Reuse.** Every distinct value of ``recipe_overrides`` is its own tree (its own root, trained from
scratch): draw your own training params from a small set (``suggest_categorical``), not a range, or
every trial trains its own root and nothing is shared; ``train`` warns once per study past
``ROOTS_WARNING`` roots.

**Nodes.** The root is ``base`` trained ``recipe.epochs`` epochs; each grown node is its parent with
one more layer (set by its init method so the deeper net computes what the parent did), trained
``step_epochs`` epochs (default ``recipe.epochs``) with ``recipe.rewarmup_epochs`` of lr warm-up.
Every node is stored in the lineage store (``storage`` + ``artifacts``) under a key, trained once
under a lease and reused by every later trial, worker, study and process that reaches it.

**Node key** (see ``GrowthTree.recipe_dict``): the sha256 of the canonical JSON of the base spec,
the steps and this recipe: ``mode`` ("tree"), ``api`` (1), ``data`` (the sha256 of the six split
tensors, the task and the class count, or the ``data_id`` given), ``train`` (every ``Recipe`` field
after ``recipe_overrides``), ``step_epochs``, ``grow`` (every ``GrowOptions`` field but ``seed``),
``calib_size``, ``loss`` and ``metric`` (``module:qualname`` of the callable, or "default") and
``direction``. So different override values, data, loss or metric never share a node. Two
different callables with one qualified name (two lambdas in one module) would: give them
distinct names, or set ``fn.dils_name``. The keys differ from the CLI's (``search/paths.py``).

**Threads.** ``threads`` (default ``$DILS_NUM_THREADS``, else 1, as the CLI's ``--threads``: see
``core/threads.py``) is applied before each training; each node's metrics record ``threads`` and
``device``. A node reused on another thread count or device keeps the metrics it was trained
with; a node trained anew there can differ in the last float digits.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

import torch

from ..core.checkpoint import save
from ..core.data import Dataset
from ..core.grow import GrowOptions
from ..core.model import GrowableNet
from ..core.preprocess import Predictor
from ..core.spec import GrowthStep, Spec, spec_from_dict
from ..core.stream import StreamedDataset
from ..core.threads import set_threads, thread_count
from ..core.train import LossFn, MetricFn, Recipe
from ..errors import InputError, MissingDependency
from ..store import DEFAULT_ARTIFACTS, DEFAULT_URL, LineageStore, NodeRecord, Trained, safe_url
from .attrs import TREE_NODE_KEY, TREE_NODE_KEYS, TREE_VALS
from .finalize import final_meta
from .paths import GrowthPath, default_device, fit_final, fit_node, seed_of
from .tree_space import (
    _RECIPE_FIELDS,
    GrowthSpace,
    _DefineByRun,
    _plain,
    _tune_follow,
    absolute_storage,
    callable_id,
    check_path,
    count_root,
    data_digest,
    not_below_base,
    ray_run_config,
    sample_path,
)

__all__ = ["GrowthTree", "GrowthSpace", "TreeNode"]

_DIRECTIONS = ("maximize", "minimize")


class TreeNode:
    """One trained node: ``key``, ``spec``, ``depth``, ``steps``, ``val_metric``, ``test_metric``,
    ``metrics`` (everything stored), ``trained`` (trained by this call, not reused) and ``model``
    (loaded from the store on first use)."""

    def __init__(self, tree: GrowthTree, record: NodeRecord, steps: tuple[GrowthStep, ...],
                 model: GrowableNet | None = None, trained: bool = False) -> None:
        self.tree = tree
        self.record = record
        self.steps = steps
        self.trained = trained
        self._model = model

    key = property(lambda self: self.record.key)
    depth = property(lambda self: self.record.depth)
    metrics = property(lambda self: self.record.metrics)
    val_metric = property(lambda self: float(self.record.metrics["val_metric"]))
    test_metric = property(lambda self: float(self.record.metrics["test_metric"]))

    @property
    def spec(self) -> Spec:
        return spec_from_dict(self.record.spec)

    @property
    def model(self) -> GrowableNet:
        if self._model is None:
            model = self.tree.store.load_model(self.record)
            if model is None:  # missing or damaged checkpoint: retrain it (and what it grew from)
                model = self.tree._refetch(self.record.key)
            self._model = model
        return self._model

    @property
    def predictor(self) -> Predictor:
        """The model behind the data's preprocessing (``core/preprocess.py``): it takes raw inputs."""
        data = self.tree.data
        return Predictor(self.model, data.preprocess(self.spec.input_shape), data.task).to(self.tree.device)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``predictor`` as a checkpoint (``dils_search.load``, ``deepen``, ``dils_search.export``)."""
        return save(self.predictor, path, extra={"node_key": self.key, "metrics": self.metrics})

    def __repr__(self) -> str:
        return (f"TreeNode(key={self.key[:12]!r}, hidden={self.record.spec.get('hidden')}, "
                f"val_metric={self.val_metric:.4f}, test_metric={self.test_metric:.4f})")


class GrowthTree:
    """A growth tree over ``base`` on ``data``: see the module doc for nodes, keys and threads.

    ``loss(output, target) -> scalar tensor`` and ``metric(output, target) -> float`` replace the
    task's own (cross-entropy and accuracy, or MSE and R^2); ``direction`` says whether a higher
    (``"maximize"``, the default) or lower ``metric`` is better. ``grow`` holds the init methods'
    knobs, ``calib_size`` the number of training samples an insertion is fitted on. ``data`` is a
    ``Dataset`` or a ``StreamedDataset`` (``Dataset.from_torch``; the task's own loss and metric only).
    """

    ROOTS_WARNING = 4  # train() warns once per study when it has used more distinct roots than this

    def __init__(
        self, base: Spec, data: Dataset | StreamedDataset, recipe: Recipe | None = None, storage: str = DEFAULT_URL,
        artifacts: str = DEFAULT_ARTIFACTS, *, step_epochs: int | None = None, grow: GrowOptions | None = None,
        calib_size: int = 512, loss: LossFn | None = None, metric: MetricFn | None = None,
        direction: str = "maximize", threads: int | None = None, device: str | torch.device | None = None,
        data_id: str | None = None, lease_seconds: float = 60.0,
    ) -> None:
        self.recipe = recipe if recipe is not None else Recipe()
        if not isinstance(self.recipe, Recipe):
            raise InputError(f"recipe={recipe!r} must be a dils_search.Recipe")
        self.step_epochs = self.recipe.epochs if step_epochs is None else step_epochs
        if isinstance(self.step_epochs, bool) or not isinstance(self.step_epochs, int) or self.step_epochs < 0:
            raise InputError(f"step_epochs={step_epochs!r} must be an integer >= 0")
        if direction not in _DIRECTIONS:
            raise InputError(f"direction={direction!r} is unknown; allowed: {', '.join(_DIRECTIONS)}")
        if metric is None and direction != "maximize":
            raise InputError("direction='minimize' needs a metric=; the default metrics (accuracy, R^2) are higher-is-better")
        for name, fn in (("loss", loss), ("metric", metric)):
            if fn is not None and not callable(fn):
                raise InputError(f"{name}={fn!r} must be a callable (output, target)")
        if isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1:
            raise InputError(f"calib_size={calib_size!r} must be an integer >= 1")
        if not isinstance(data, Dataset | StreamedDataset):
            raise InputError(f"data={type(data).__name__} must be a dils_search.Dataset (Dataset.from_arrays(x, y) "
                             "or Dataset.from_torch(train, val, test))")
        if isinstance(data, StreamedDataset) and (loss is not None or metric is not None):
            raise InputError("loss= and metric= need in-memory data (Dataset.from_arrays); streamed data "
                             "(Dataset.from_torch) trains with the task's own")
        if getattr(base, "out_features", None) != data.out_features:
            raise InputError(f"base has out_features={getattr(base, 'out_features', None)!r}, but the data has "
                             f"{data.out_features} outputs ({data.task})")
        if data_id is not None and (not isinstance(data_id, str) or not data_id):
            raise InputError(f"data_id={data_id!r} must be a non-empty string")
        self.base, self.grow, self.calib_size = base, grow or GrowOptions(), calib_size
        self.loss, self.metric, self.direction = loss, metric, direction
        self.threads = thread_count(threads)
        self._device_arg = None if device is None else str(device)
        self.device = torch.device(self._device_arg) if self._device_arg else default_device()
        self.data_id = data_id or data_digest(data)
        self.data = data.reshaped(base.input_shape).to(self.device)
        # absolute, so that Ray workers (which run in their own folders) open the same file and folder
        self.storage, self.artifacts = absolute_storage(storage), str(Path(artifacts).resolve())
        self.lease_seconds = lease_seconds
        self._roots: dict[str, set[str]] = {}  # study name -> the root keys train() used in it
        self._local = threading.local()
        self._opened: list[LineageStore] = []
        self.store  # noqa: B018  (open it now: a bad storage URL or artifacts folder fails here, in one line)

    # ------------------------------------------------------------------ plumbing
    @property
    def store(self) -> LineageStore:
        """The lineage store, one per thread (each its own lease owner, so ``study.optimize(n_jobs=2)``
        never trains a node twice), opened on first use and again in each process the tree is sent to."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = LineageStore(self.storage, self.artifacts, lease_seconds=self.lease_seconds)
            self._local.store = store
            self._opened.append(store)
        return cast(LineageStore, store)

    def __getstate__(self) -> dict[str, Any]:  # for Ray: the store is reopened where the tree lands
        state = self.__dict__.copy()
        del state["_local"]
        state["_opened"] = []
        state["data"] = self.data.to("cpu")
        state["device"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self.device = torch.device(self._device_arg) if self._device_arg else default_device()
        self.data = self.data.to(self.device)

    def close(self) -> None:
        """Close every store this tree opened (a later call opens a new one)."""
        while self._opened:
            self._opened.pop().close()
        self._local = threading.local()

    @property
    def mode(self) -> str:
        """``direction`` as Ray Tune spells it: "max" or "min"."""
        return "max" if self.direction == "maximize" else "min"

    # ------------------------------------------------------------------ paths and keys
    def recipe_dict(self, recipe_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The recipe part of every node key of this tree (see the module doc)."""
        overrides = {k: _plain(v) for k, v in (recipe_overrides or {}).items()}
        unknown = sorted(set(overrides) - set(_RECIPE_FIELDS))
        if unknown:
            raise InputError(f"recipe_overrides has {unknown[0]!r}, which is not a Recipe field; allowed: "
                             f"{', '.join(_RECIPE_FIELDS)}")
        recipe = replace(self.recipe, **overrides)  # validated by Recipe itself
        grow_opts = {k: v for k, v in asdict(self.grow).items() if k != "seed"}
        return {"mode": "tree", "api": 1, "data": self.data_id, "train": recipe.to_dict(), "step_epochs": self.step_epochs,
                "grow": grow_opts, "calib_size": self.calib_size, "loss": callable_id(self.loss),
                "metric": callable_id(self.metric), "direction": self.direction}

    def path(self, steps: Sequence[GrowthStep] | GrowthPath = (), recipe_overrides: dict[str, Any] | None = None) -> GrowthPath:
        """The growth path of ``steps`` on this tree (its ``.key`` is the node key)."""
        if isinstance(steps, GrowthPath):
            steps = steps.steps
        steps = tuple(steps)
        check_path(self.base, steps)  # GrowthSteps, and the deepest spec within the limits, before any training
        return GrowthPath(self.base, self.recipe_dict(recipe_overrides), steps)

    def suggest(self, trial: Any, space: GrowthSpace) -> tuple[GrowthStep, ...]:
        """A growth path suggested define-by-run on ``trial`` (params ``n_steps``, ``init_i``, ``pos_i``,
        ``width_i``; see ``search/tree_space.py``)."""
        if not isinstance(space, GrowthSpace):
            raise InputError(f"space={space!r} must be a dils_search.GrowthSpace")
        return sample_path(trial, space, self.base)

    # ------------------------------------------------------------------ training
    def _train_node(self, path: GrowthPath, parent: GrowableNet | None) -> Trained:
        seed = seed_of(path.key)
        recipe = Recipe(**path.recipe["train"])
        trained = fit_node(
            path, parent, self.data, self.data.head(self.calib_size), self.device,
            replace(recipe, rewarmup_epochs=0.0, seed=seed), replace(recipe, epochs=path.recipe["step_epochs"], seed=seed),
            replace(self.grow, seed=seed), loss=self.loss, metric=self.metric, maximize=self.direction == "maximize",
        )
        trained.metrics.update(loss=path.recipe["loss"], metric=path.recipe["metric"])
        return trained

    def _follow(self, path: GrowthPath, report: Callable[[TreeNode], bool] | None = None) -> list[TreeNode]:
        """Get or train every prefix node of ``path`` in order; ``report(node)`` returning True stops."""
        set_threads(self.threads)
        nodes: list[TreeNode] = []
        parent: GrowableNet | None = None
        for prefix in path.prefixes():
            fetched = self.store.get_or_train(prefix.meta(), functools.partial(self._train_node, prefix, parent))
            parent = fetched.model.to(self.device)
            if nodes:
                nodes[-1]._model = None  # only the deepest node keeps its model in memory
            nodes.append(TreeNode(self, fetched.record, prefix.steps, parent, fetched.trained_here))
            if report is not None and report(nodes[-1]):
                break
        return nodes

    def train(self, path: Sequence[GrowthStep] | GrowthPath, trial: Any = None,
              recipe_overrides: dict[str, Any] | None = None) -> TreeNode:
        """Get or train every node along ``path`` and return the deepest.

        With ``trial`` (an ``optuna.Trial``), each depth's validation metric is reported as
        ``trial.report(value, depth)``; when ``trial.should_prune()`` the path stops there and
        ``optuna.TrialPruned`` is raised. The trial's user attrs get ``dils_node_key`` (the node the
        trial reached), ``dils_node_keys`` and ``dils_vals`` (one per depth), which ``finalize`` reads.
        ``recipe_overrides`` replace ``Recipe`` fields (e.g. ``weight_decay``) for every node of the
        path, and so are part of their keys.
        """
        gp = self.path(path, recipe_overrides)
        report_depths = trial is not None and len(getattr(getattr(trial, "study", None), "directions", [None])) == 1
        pruned = False

        def report(node: TreeNode) -> bool:
            nonlocal pruned
            if not report_depths:
                return False
            trial.report(node.val_metric, node.depth)
            pruned = bool(trial.should_prune())  # even at the last depth, as Optuna's own objectives do
            return pruned

        nodes = self._follow(gp, report)
        count_root(self._roots, trial, nodes[0].key, self.ROOTS_WARNING)
        last = nodes[-1]
        if trial is not None:
            trial.set_user_attr(TREE_NODE_KEY, last.key)
            trial.set_user_attr(TREE_NODE_KEYS, [n.key for n in nodes])
            trial.set_user_attr(TREE_VALS, [n.val_metric for n in nodes])
        if pruned:
            import optuna

            raise optuna.TrialPruned(f"pruned at depth {last.depth}")
        return last

    # ------------------------------------------------------------------ reading nodes back
    def path_of(self, key: str) -> GrowthPath:
        """The growth path of stored node ``key`` (its parent chain); refuses another tree's node."""
        chain: list[NodeRecord] = []
        record = self.store.get(key)
        if record is None:
            raise InputError(f"node {str(key)[:12]} is not in storage={safe_url(self.storage)!r}")
        while record is not None:
            chain.append(record)
            record = self.store.get(record.parent_key) if record.parent_key else None
        root = chain[-1]
        mine = self.recipe_dict()
        differ = [k for k in ("mode", "api", "data", "loss", "metric", "direction") if root.recipe.get(k) != mine[k]]
        steps = tuple(GrowthStep.from_dict(r.step) for r in reversed(chain[:-1]) if r.step)
        path = GrowthPath(self.base, root.recipe, steps)
        if differ or path.key != key:
            why = f" ({', '.join(differ)} differ)" if differ else ""
            raise InputError(f"node {key[:12]} was not grown by this tree{why}")
        return path

    def node(self, key: str) -> TreeNode:
        """The stored node ``key`` (its model is loaded on first use)."""
        path = self.path_of(key)
        record = self.store.get(key)
        assert record is not None
        return TreeNode(self, record, path.steps)

    def _refetch(self, key: str) -> GrowableNet:
        return self._follow(self.path_of(key))[-1].model

    # ------------------------------------------------------------------ finalize and Ray
    def finalize(self, source: Any, epochs: int | None = None, lr: float | None = None,
                 schedule: str = "cosine") -> TreeNode:
        """Train the best node further and return it (``.model``, ``.val_metric``, ``.test_metric``).

        ``source``: an ``optuna.Study`` whose objective called ``train`` (its best trial's node), a Ray
        Tune ``ResultGrid`` from ``trainable`` (its best result's last node; for both, the base if that
        scored better, with a warning), a ``TreeNode`` or a node key; trained ``epochs`` (default
        ``recipe.epochs``) more epochs at ``lr`` (default the node's) with a ``schedule`` decay. The
        result is a stored node too (the child of its winner, keyed by both): finalizing again loads it.
        """
        winner = self.path_of(self._best_key(source))
        if not isinstance(source, TreeNode | str):
            winner = not_below_base(self.store, winner, self.direction)
        train_recipe = {**winner.recipe["train"], "epochs": self.recipe.epochs if epochs is None else epochs,
                        "schedule": schedule, "rewarmup_epochs": 0.0, "patience": None}
        if lr is not None:
            train_recipe["lr"] = lr
        Recipe(**train_recipe)  # validate before anything is stored
        recipe = {"mode": "final", "api": 1, "train": train_recipe}
        meta = final_meta(winner, recipe)
        set_threads(self.threads)

        def train_final() -> Trained:
            model = copy.deepcopy(self._follow(winner)[-1].model).to(self.device)
            return fit_final(model, self.data, self.device, winner, Recipe(**{**train_recipe, "seed": seed_of(meta.key)}),
                             meta.key, loss=self.loss, metric=self.metric, maximize=self.direction == "maximize")

        fetched = self.store.get_or_train(meta, train_final)
        return TreeNode(self, fetched.record, winner.steps, fetched.model.to(self.device), fetched.trained_here)

    def run_config(self, name: str | None = None, **kwargs: Any) -> Any:
        """``tune.RunConfig`` writing to ``<artifacts>/ray_experiments/<name>``, not ~/ray_results (see tree_space)."""
        return ray_run_config(self.artifacts, name, kwargs)

    def _best_key(self, source: Any) -> str:
        if isinstance(source, TreeNode):
            return source.key
        if isinstance(source, str):
            return source
        if hasattr(source, "get_best_result"):  # a Ray Tune ResultGrid
            best = source.get_best_result(metric="val_metric", mode=self.mode, scope="last")
            key = (best.metrics or {}).get("node_key")
            if not key:
                raise InputError("the Ray Tune results hold no node_key; run tune.Tuner(tree.trainable(space), ...)")
            return str(key)
        try:
            best_trial = source.best_trial
        except ValueError:
            raise InputError("the study has no completed trial to finalize") from None
        key = best_trial.user_attrs.get(TREE_NODE_KEY)
        if not key:
            raise InputError(f"trial {best_trial.number} has no dils_node_key; its objective must call tree.train(path, trial=trial)")
        return str(key)

    def search_space(self, space: GrowthSpace, extra: Callable[[Any], Any] | None = None) -> Callable[[Any], None]:
        """A define-by-run space for Ray Tune's ``OptunaSearch``: ``extra(trial)`` (your own params) and
        then the growth params of ``suggest``. Picklable when ``extra`` is."""
        if not isinstance(space, GrowthSpace):
            raise InputError(f"space={space!r} must be a dils_search.GrowthSpace")
        return _DefineByRun(self.base, space, extra)

    def trainable(self, space: GrowthSpace) -> Any:
        """A Ray Tune function trainable that follows the path in each Tune config on this tree.

        Each depth is one ``tune.report`` with ``val_metric``, ``test_metric``, ``depth``, ``node_key``
        and ``trained``, so any scheduler can stop a path between depths (``time_attr="depth"``).
        Config keys that are ``Recipe`` fields (e.g. ``weight_decay``) become ``recipe_overrides``::

            from ray import tune
            from ray.tune.search.optuna import OptunaSearch

            wd = lambda t: t.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
            searcher = OptunaSearch(space=tree.search_space(space, extra=wd), metric="val_metric", mode=tree.mode)
            tuner = tune.Tuner(tree.trainable(space), tune_config=tune.TuneConfig(search_alg=searcher, num_samples=30))
            results = tuner.fit()
            model = tree.finalize(results).model

        The tree travels to the workers through Ray's object store (``tune.with_parameters``); each
        worker reopens the store, so ``storage`` must be reachable from every worker.
        """
        try:
            from ray import tune
        except ImportError:
            raise MissingDependency("tree.trainable needs Ray Tune; install it with: pip install 'dils-search[ray]'") from None
        if not isinstance(space, GrowthSpace):
            raise InputError(f"space={space!r} must be a dils_search.GrowthSpace")
        return tune.with_parameters(_tune_follow, tree=self, space=space)
