"""GrowthTree: the one engine. The CLI (a TOML study), compare, the Ray backend and the plugin API
(growth inside your own Optuna objective or Ray Tune run, on your own data) all drive it.

README.md's "Python API" shows it at work (inside an Optuna objective, and under Ray Tune); its
snippets run in the test suite.

**Reuse.** Every distinct value of ``recipe_overrides`` is its own tree (its own root, trained from
scratch): draw your own training params from a small set (``suggest_categorical``), not a range, or
every trial trains its own root and nothing is shared; ``train`` warns once per study past
``ROOTS_WARNING`` roots.

**Nodes.** The root is ``base`` trained ``recipe.epochs`` epochs; each grown node is its parent with
one more layer (set by its init method so the deeper net computes what the parent did), trained
``step_epochs`` epochs (default ``recipe.epochs``) with ``recipe.rewarmup_epochs`` of lr warm-up.
Every node is stored in the lineage store (``storage`` + ``artifacts``) under its key, trained once
under a lease and reused by every later trial, worker, study and process that reaches it.
``GrowthTree.from_config(cfg)`` builds a TOML study's tree instead: its plan is the config's
(``search/trainers.py``) and its keys are the CLI's pinned keys.

**Node key**: ``search/paths.py`` (``tree_recipe``): the base spec, the steps, the data's digest (or
``data_id``), the keyed ``Recipe`` fields after ``recipe_overrides``, ``step_epochs``, the
``GrowOptions``, ``calib_size``, the loss and metric (``module:qualname``, or ``fn.dils_name``) and
the direction. Two different callables with one qualified name (two lambdas in one module) would
share nodes: give them distinct names, or set ``fn.dils_name``.

**Studies.** A trial passed to ``train`` gets the trial record every study has (``search/attrs.py``);
a study in the tree's own storage also gets a study row (with a copy of the data in the artifacts
folder), so ``dils-search ls``, ``show``, ``report``, ``export`` and ``finalize`` work on it.

**Threads.** ``threads`` (default ``$DILS_NUM_THREADS``, else 1, as the CLI's ``--threads``: see
``core/threads.py``) is applied before each training; each node's metrics record ``threads`` and
``device``.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from ..config import MAX_EPOCHS, MAX_SAMPLES, MAX_SECONDS, StudyConfig, check_choice, check_number
from ..core.checkpoint import save
from ..core.data import Dataset
from ..core.grow import GrowOptions
from ..core.model import GrowableNet
from ..core.preprocess import Predictor
from ..core.spec import GrowthStep, Spec, spec_from_dict
from ..core.stream import StreamedDataset
from ..core.threads import set_threads, thread_count
from ..core.train import LossFn, MetricFn, Recipe, TrainingDiverged
from ..errors import InputError, MissingDependency
from ..store import DEFAULT_ARTIFACTS, DEFAULT_URL, Fetched, LineageStore, NodeRecord, Trained, safe_url
from .attrs import FAIL_REASON, MODE, NODE_KEYS, TrialRecord, steps_of
from .follow import PathOutcome, follow
from .paths import GrowthPath, data_digest, seed_of
from .plugin_study import count_root
from .space import DefineByRun, GrowthSpace, check_path, sample_path
from .storage import absolute_storage
from .trainers import ApiPlan, ConfigPlan, default_device, fit_final, fit_node, make_task

__all__ = ["GrowthTree", "GrowthSpace", "TreeNode"]

log = logging.getLogger("dils_search")
DIRECTIONS = ("maximize", "minimize")


class TreeNode:
    """One trained node: ``key``, ``spec``, ``depth``, ``steps``, ``val_metric``, ``test_metric``,
    ``metrics`` (everything stored), ``trained`` (trained by this call, not reused), ``model`` (loaded
    from the store on first use) and, from ``train``, ``outcome`` (what following its path did)."""

    def __init__(self, tree: GrowthTree, record: NodeRecord, steps: tuple[GrowthStep, ...],
                 model: GrowableNet | None = None, trained: bool = False, outcome: PathOutcome | None = None) -> None:
        self.tree, self.record, self.steps, self.trained, self.outcome = tree, record, steps, trained, outcome
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
                model = self.tree.fetch(self.tree.path_of(self.record.key)).model
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
    """A growth tree over ``base`` on ``data``: see the module doc for nodes, keys, studies and threads.

    ``loss(output, target) -> scalar tensor`` and ``metric(output, target) -> float`` replace the
    task's own (cross-entropy and accuracy, or MSE and R^2); ``direction`` says whether a higher
    (``"maximize"``, the default) or lower ``metric`` is better. ``grow`` holds the init methods'
    knobs, ``calib_size`` the number of training samples an insertion is fitted on. ``data`` is a
    ``Dataset`` or a ``StreamedDataset`` (``Dataset.from_torch``; the task's own loss and metric only).
    The arguments are checked as a config's fields are (``config/checks.py``).
    """

    config: StudyConfig | None = None  # the TOML study this tree was built from (``from_config``)
    ROOTS_WARNING = 4  # train() warns once per study when it has used more distinct roots than this

    def __init__(
        self, base: Spec, data: Dataset | StreamedDataset, recipe: Recipe | None = None, storage: str = DEFAULT_URL,
        artifacts: str = DEFAULT_ARTIFACTS, *, step_epochs: int | None = None, grow: GrowOptions | None = None,
        calib_size: int = 512, loss: LossFn | None = None, metric: MetricFn | None = None,
        direction: str = "maximize", threads: int | None = None, device: str | torch.device | None = None,
        data_id: str | None = None, lease_seconds: float = 60.0,
    ) -> None:
        recipe = recipe if recipe is not None else Recipe()
        if not isinstance(recipe, Recipe):
            raise InputError(f"recipe={recipe!r} must be a dils_search.Recipe")
        steps = recipe.epochs if step_epochs is None else check_number("step_epochs", step_epochs, int, allow_zero=True,
                                                                       at_most=MAX_EPOCHS)
        check_choice("direction", direction, DIRECTIONS)
        if metric is None and direction != "maximize":
            raise InputError("direction='minimize' needs a metric=; the default metrics (accuracy, R^2) are higher-is-better")
        for name, fn in (("loss", loss), ("metric", metric)):
            if fn is not None and not callable(fn):
                raise InputError(f"{name}={fn!r} must be a callable (output, target)")
        check_number("calib_size", calib_size, int, at_most=MAX_SAMPLES)
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
        plan = ApiPlan(recipe, steps, grow or GrowOptions(), calib_size, loss, metric, direction, data_id or data_digest(data))
        self._setup(base, data, plan, storage, artifacts, threads, device, lease_seconds)

    @classmethod
    def from_config(cls, cfg: StudyConfig, storage: str = DEFAULT_URL, artifacts: str = DEFAULT_ARTIFACTS, *,
                    device: str | torch.device | None = None, threads: int | None = None) -> GrowthTree:
        """The tree of a TOML study: its data, base spec and plan, keyed by the CLI's pinned keys."""
        task = make_task(cfg, device)
        tree = cls.__new__(cls)
        tree.config = cfg
        tree._setup(task.base, task.data, ConfigPlan(cfg), storage, artifacts, threads, task.device,
                    cfg.storage.lease_seconds)
        return tree

    @classmethod
    def of_study(cls, url: str, name: str, artifacts: str | None = None, *,
                 device: str | torch.device | None = None) -> GrowthTree:
        """The tree that study ``name`` ran on: built from its config, or rebuilt from what a plugin
        study recorded (its data from the artifacts folder, its loss and metric imported by name)."""
        from .plugin_study import rebuild_tree
        from .storage import study_setup

        setup = study_setup(url, name)
        if setup.config is not None:
            return cls.from_config(setup.config, url, artifacts or setup.artifacts, device=device)
        return rebuild_tree(cls, setup, url, artifacts or setup.artifacts, device)

    def _setup(self, base: Spec, data: Dataset | StreamedDataset, plan: ApiPlan | ConfigPlan, storage: str, artifacts: str,
               threads: int | None, device: str | torch.device | None, lease_seconds: float) -> None:
        self.base, self.plan = base, plan
        self.threads = thread_count(threads)
        self._device_arg = None if device is None else str(device)
        self.device = torch.device(self._device_arg) if self._device_arg else default_device()
        self.data = data.reshaped(base.input_shape).to(self.device)
        # absolute, so that Ray workers (which run in their own folders) open the same file and folder
        self.storage, self.artifacts = absolute_storage(storage), str(Path(artifacts).resolve())
        self.lease_seconds = check_number("lease_seconds", lease_seconds, float, at_most=MAX_SECONDS)
        self.token = uuid.uuid4().hex  # the same tree after pickling (Ray workers keep one per token)
        self.space: GrowthSpace | None = None  # the last space paths were suggested from
        self._registered: set[str] = set()
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

    recipe = property(lambda self: getattr(self.plan, "recipe", None), doc="The plugin tree's ``Recipe`` (None from a config).")
    step_epochs = property(lambda self: getattr(self.plan, "step_epochs", None))
    direction = property(lambda self: self.plan.direction)
    maximize = property(lambda self: self.plan.direction == "maximize")

    @property
    def tune_mode(self) -> str:
        """``direction`` as Ray Tune spells it (its ``mode``): "max" or "min"."""
        return "max" if self.maximize else "min"

    # ------------------------------------------------------------------ paths and keys
    def path(self, steps: Sequence[GrowthStep] | GrowthPath = (), recipe_overrides: dict[str, Any] | None = None,
             *, mode: str | None = None) -> GrowthPath:
        """The growth path of ``steps`` on this tree (its ``.key`` is the node key). ``mode`` is how its
        nodes are trained: the tree's own ("tree", or "grow" from a config) or "scratch"."""
        if isinstance(steps, GrowthPath):
            steps = steps.steps
        steps = tuple(steps)
        check_path(self.base, steps)  # GrowthSteps, and the deepest spec within the limits, before any training
        own = self.plan.default_mode
        check_choice("mode", mode or own, (own, "scratch"))
        return GrowthPath(self.base, self.plan.node_recipe(mode or own, recipe_overrides), steps)

    def suggest(self, trial: Any, space: GrowthSpace) -> tuple[GrowthStep, ...]:
        """A growth path suggested define-by-run on ``trial`` (params ``n_steps``, ``init_i``, ``pos_i``,
        ``width_i``; see ``search/space.py``)."""
        if not isinstance(space, GrowthSpace):
            raise InputError(f"space={space!r} must be a dils_search.GrowthSpace")
        space.check_base(self.base)
        self.space = space
        return sample_path(trial, space, self.base)

    # ------------------------------------------------------------------ training
    def _train_node(self, path: GrowthPath, parent: GrowableNet | None) -> Trained:
        seed = seed_of(path.key)
        root, step, options = self.plan.recipes(path, seed)
        trained = fit_node(path, None if path.mode == "scratch" else parent, self.data,
                           self.data.head(self.plan.calib_size), self.device, root, step, options,
                           loss=self.plan.loss, metric=self.plan.metric, maximize=self.maximize)
        if self.config is None:
            trained.metrics.update(loss=path.recipe["loss"], metric=path.recipe["metric"])
        return trained

    def follow(self, path: GrowthPath, report: Callable[[PathOutcome], bool] | None = None,
               outcome: PathOutcome | None = None, affordable: Callable[[PathOutcome, GrowthPath], bool] | None = None) -> PathOutcome:
        """Get or train every node along ``path`` (``search/follow.py``): the one path follower."""
        set_threads(self.threads)
        return follow(self.store, path, self._train_node, self.device, report,
                      outcome if outcome is not None else PathOutcome(path, maximize=self.maximize), affordable)

    def fetch(self, path: GrowthPath) -> Fetched:
        """The node of ``path``, loaded, or (re)trained with every prefix it needs."""
        last = self.follow(path).last
        assert last is not None
        return last

    def train(self, path: Sequence[GrowthStep] | GrowthPath, trial: Any = None,
              recipe_overrides: dict[str, Any] | None = None, *, mode: str | None = None,
              affordable: Callable[[PathOutcome, GrowthPath], bool] | None = None) -> TreeNode:
        """Get or train every node along ``path`` and return the deepest (``.outcome`` says what the path did).

        With ``trial`` (an ``optuna.Trial``), each depth's validation metric is reported as
        ``trial.report(value, depth)``; when ``trial.should_prune()`` the path stops there and
        ``optuna.TrialPruned`` is raised. The trial gets the trial record every study has
        (``search/attrs.py``: path, metrics, compute, node keys), which ``finalize``, ``show`` and
        ``report`` read. ``recipe_overrides`` replace ``Recipe`` fields (e.g. ``weight_decay``) for
        every node of the path, and so are part of their keys. ``affordable`` (``search/follow.py``) may
        stop the path before a node the budget cannot pay for (the trial is then pruned there).
        """
        gp = self.path(path, recipe_overrides, mode=mode)
        report_depths = trial is not None and len(getattr(getattr(trial, "study", None), "directions", [None])) == 1

        def report(out: PathOutcome) -> bool:
            if not report_depths:
                return False
            trial.report(out.vals[-1], out.depth)
            return bool(trial.should_prune())  # even at the last depth, as Optuna's own objectives do

        try:
            out = self.follow(gp, report, affordable=affordable)
        except TrainingDiverged as exc:
            if trial is not None:
                trial.set_user_attr(FAIL_REASON, str(exc))
                log.warning("trial %d failed: %s", trial.number, exc)
            raise
        if trial is not None and out.node_keys:
            TrialRecord.of(out).write(trial)  # one transaction, not one commit per attribute
            self._register(trial)
            count_root(self._roots, trial, gp.prefixes()[0].key, self.ROOTS_WARNING)
        if out.pruned:
            import optuna

            raise optuna.TrialPruned("search budget spent" if out.budget_spent else f"pruned at depth {out.depth}")
        assert out.last is not None
        return TreeNode(self, out.last.record, gp.steps[: out.depth] if gp.mode != "scratch" else gp.steps,
                        out.last.model, out.trained_last, out)

    def _register(self, trial: Any) -> None:
        """Give a plugin study in this tree's storage its study row, once per study."""
        name = str(getattr(getattr(trial, "study", None), "study_name", ""))
        if self.config is None and name and name not in self._registered:
            from .plugin_study import register

            self._registered.add(name)
            register(self, trial.study)

    # ------------------------------------------------------------------ reading nodes back
    def path_of(self, key: str, trials: Iterable[dict[str, Any]] = ()) -> GrowthPath:
        """The growth path of stored node ``key``: from its parent chain in the store, else (a scratch
        node, whose parents were never stored) from the trial records ``trials``. Refuses another tree's node."""
        record = self.store.get(key)
        if record is None:
            raise InputError(f"node {str(key)[:12]} is not in storage={safe_url(self.storage)!r}")
        chain = [record]
        while chain[-1].parent_key and (parent := self.store.get(chain[-1].parent_key)) is not None:
            chain.append(parent)
        root, mine = chain[-1], self.path(()).recipe
        if root.recipe.get("mode") == "final":
            raise InputError(f"node {key[:12]} is a finalized node; its winner is node {str(root.parent_key)[:12]}")
        steps = [r.step for r in reversed(chain[:-1])]
        if root.depth == 0 and all(steps):
            overridable = {"train"} if self.config is None else set()
            differ = [k for k in [*mine, *(k for k in root.recipe if k not in mine)]
                      if k not in overridable and k != "mode" and root.recipe.get(k) != mine.get(k)]
            path = GrowthPath(self.base, root.recipe, tuple(GrowthStep.from_dict(s) for s in steps if s))
            if differ or path.key != key:
                why = f" ({', '.join(differ)} differ)" if differ else ""
                raise InputError(f"node {key[:12]} was not grown by this tree{why}")
            return path
        for attrs in trials:  # a scratch node: rebuilt from the steps of a trial that evaluated it
            if key in attrs.get(NODE_KEYS, []):
                path = self.path([GrowthStep.from_dict(s) for s in steps_of(attrs)], mode=attrs.get(MODE))
                found = next((p for p in ([path] if path.mode == "scratch" else path.prefixes()) if p.key == key), None)
                if found is not None:
                    return found
        raise InputError(f"node {key[:12]} was not grown by this tree (no stored parent chain, no trial that evaluated it)")

    def node(self, key: str) -> TreeNode:
        """The stored node ``key`` (its model is loaded on first use)."""
        path = self.path_of(key)
        record = self.store.get(key)
        assert record is not None
        return TreeNode(self, record, path.steps)

    # ------------------------------------------------------------------ finalize and Ray
    def train_final(self, winner: GrowthPath, recipe: dict[str, Any], key: str) -> Trained:
        """Train a copy of ``winner``'s model as its finalized node ``key`` (node recipe ``recipe``)."""
        model = copy.deepcopy(self.fetch(winner).model).to(self.device)
        return fit_final(model, self.data, self.device, winner, self.plan.final_training(recipe, seed_of(key)), key,
                         loss=self.plan.loss, metric=self.plan.metric, maximize=self.maximize)

    def finalize(self, source: Any, epochs: int | None = None, lr: float | None = None, schedule: str | None = None,
                 top_k: int = 1) -> TreeNode:
        """The finalize stage (``search/finalize.py``, the CLI's own): the ``top_k`` best distinct
        architectures by validation among the nodes ``source`` evaluated are trained ``epochs`` (default
        ``recipe.epochs``) more epochs at ``lr`` (default their own) with a ``schedule`` (default cosine)
        decay; the best of them by validation is returned (``.model``, ``.val_metric``, ``.test_metric``).

        ``source``: an ``optuna.Study`` whose objective called ``train`` (a study in this tree's storage
        also gets its delivered model recorded, its note and its artifact, as a CLI study), a Ray Tune
        ``ResultGrid`` from ``trainable``, a ``TreeNode`` or a node key. A finalized node is a stored
        node too (the child of its winner, keyed by both), so finalizing again loads it.
        """
        from .finalize import finalize_source

        return finalize_source(self, source, epochs=epochs, lr=lr, schedule=schedule, top_k=top_k)

    def run_config(self, name: str | None = None, **kwargs: Any) -> Any:
        """``tune.RunConfig(name=name, **kwargs)`` writing to ``<artifacts>/ray_experiments/<name>``, not ~/ray_results."""
        from .ray_trial import run_config

        return run_config(self.artifacts, name, kwargs)

    def search_space(self, space: GrowthSpace, extra: Callable[[Any], Any] | None = None) -> DefineByRun:
        """A define-by-run space for Ray Tune's ``OptunaSearch``: ``extra(trial)`` (your own params) and
        then the growth params of ``suggest``. Picklable when ``extra`` is."""
        if not isinstance(space, GrowthSpace):
            raise InputError(f"space={space!r} must be a dils_search.GrowthSpace")
        space.check_base(self.base)
        self.space = space
        return DefineByRun(self.base, space, extra)

    def trainable(self, space: GrowthSpace, *, mode: str | None = None, min_gain: float | None = None) -> Any:
        """The Ray Tune function trainable that follows the path in each Tune config on this tree (the
        one trainable of the CLI's Ray backend and of the plugin: ``search/ray_trial.py``).

        Each depth is one ``tune.report`` with ``val_metric`` (the best so far along the path: the
        trial's value), ``node_val_metric``, ``node_test_metric``, ``depth``, ``node_key`` and
        ``trained``, and a checkpoint from which a restored trial takes up its path; so any scheduler
        can stop a path between depths (``time_attr="depth"``). ``min_gain`` stops a path whose latest
        step gained less (the growth pruner). Config keys that are ``Recipe`` fields (e.g.
        ``weight_decay``) become ``recipe_overrides`` (README.md, "The same tree under Ray Tune").

        The tree travels to the workers through Ray's object store (``tune.with_parameters``); each
        worker reopens the store, so ``storage`` must be reachable from every worker.
        """
        try:
            from ray import tune
        except ImportError:
            raise MissingDependency("tree.trainable needs Ray Tune; install it with: pip install 'dils-search[ray]'") from None
        if not isinstance(space, GrowthSpace):
            raise InputError(f"space={space!r} must be a dils_search.GrowthSpace")
        from .ray_trial import tree_trainable

        self.space = space
        return tune.with_parameters(tree_trainable, tree=self, space=space, mode=mode, min_gain=min_gain)
