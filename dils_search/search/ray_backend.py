"""The Ray Tune backend: the same studies, search space and lineage store, run by Ray Tune.

One Tune trial follows one growth path and one Tune iteration is one growth step: the config's
``GrowthTree`` (``GrowthTree.from_config``, sent to every worker) fetches or trains each node along
the path through the shared ``LineageStore`` (so its leases hold across every Ray worker), with the
follower the Optuna backend uses too, then reports it with ``tune.report`` and a tiny checkpoint
(the path's progress; the weights live in the store). The trainable is the tree's own
(``ray_trial.py``, the plugin's too). ``OptunaSearch`` runs in memory with the same define-by-run
space (the policy's ``GrowthSpace``) and sampler as the Optuna backend, and Tune owns resume.
Every finished Tune trial is mirrored into the project's Optuna study, with the same params and
user attrs, so ``ls``, ``show``, ``report`` and ``export`` read both backends alike.

Ray is optional: this module imports without it and every entry point says how to install it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..config import StudyConfig
from ..core.spec import Spec, spec_from_dict
from ..errors import InputError, MissingDependency
from ..registry import POLICIES
from ..store import LineageStore
from .attrs import BASE_SPEC, FAIL_REASON, VALS
from .policies import make_policy, policy_class
from .space import DefineByRun, Replay, sample_path
from .study import create_study, finalize_if_done, finished_count, load_study, make_sampler, study_config
from .trainers import make_task
from .tree import GrowthTree

try:  # Ray is an extra: ``pip install 'dils-search[ray]'``
    from ray import tune
    from ray.tune import Callback as _TuneCallback

    _RAY_IMPORT_ERROR: ImportError | None = None
except ImportError as _exc:  # pragma: no cover - exercised only where ray is absent
    tune = None  # type: ignore[assignment]
    _TuneCallback = object  # type: ignore[misc,assignment]
    _RAY_IMPORT_ERROR = _exc

__all__ = ["run_ray", "resume_ray", "require_ray", "INSTALL_HINT", "EXPERIMENT_ATTR"]

log = logging.getLogger("dils_search.ray")

INSTALL_HINT = "pip install 'dils-search[ray]'"
EXPERIMENT_ATTR = "dils_ray_experiment"


def require_ray() -> None:
    """Raise a one-line ``MissingDependency`` naming the install command when Ray Tune is missing."""
    if _RAY_IMPORT_ERROR is not None:
        missing = getattr(_RAY_IMPORT_ERROR, "name", None) or "ray"
        raise MissingDependency(f"--backend ray needs Ray Tune ({missing} is not installed); install it with: {INSTALL_HINT}")


# ---------------------------------------------------------------- mirroring into the Optuna study


def _mirror_trial(
    study: optuna.Study, cfg: StudyConfig, base: Spec, experiment: str, trial_id: str, params: dict[str, Any],
    result: dict[str, Any] | None, errored: bool, failures: int = 0,
) -> bool:
    """Add one finished Tune trial to ``study`` unless it is already there; True if added."""
    result = result or {}
    failed_in_trial = bool(result.get("failed"))
    if errored or failed_in_trial or "attrs" not in result:
        state = TrialState.FAIL
    elif result.get("final") and not result.get("growth_stop"):
        state = TrialState.COMPLETE
    else:
        state = TrialState.PRUNED  # stopped by the scheduler, the growth rule or the time budget
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("ray_trial_id") == trial_id and a.get("ray_experiment") == experiment:
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or state == TrialState.FAIL:
                return False
    replay = Replay(params)
    sample_path(replay, make_policy(cfg).space, base)
    user_attrs: dict[str, Any] = json.loads(result["attrs"]) if state != TrialState.FAIL else {}
    user_attrs.update(
        ray_trial_id=trial_id, ray_experiment=experiment, ray_failures=int(failures),
        **{k: result[k] for k in ("ray_node_id", "hostname", "pid") if k in result},
    )
    if state == TrialState.FAIL:
        user_attrs[FAIL_REASON] = str(result.get("failed") or "the Ray trial errored")
    values = None
    if state == TrialState.COMPLETE:
        values = [float(result["val_metric"])]
        if len(cfg.search.objectives) > 1:
            values.append(float(result["params"]))
    vals = user_attrs.get(VALS, [])
    trial = optuna.trial.create_trial(
        state=state, values=values, params={k: params[k] for k in replay.distributions},
        distributions=replay.distributions, user_attrs=user_attrs,
        intermediate_values={d: v for d, v in enumerate(vals)} if len(cfg.search.objectives) == 1 else None,
    )
    study.add_trial(trial)
    return True


class MirrorCallback(_TuneCallback):  # type: ignore[misc,valid-type]
    """Adds each finished Tune trial to the project's Optuna study, once per Tune trial id."""

    def __init__(self, url: str, study_name: str, experiment: str, target: int, progress: bool = False) -> None:
        self.url = url
        self.study_name = study_name
        self.experiment = experiment
        self.target = target
        self.progress = progress
        self._study: optuna.Study | None = None
        self._bar: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment
        return {**self.__dict__, "_study": None, "_bar": None}

    def _open(self) -> tuple[optuna.Study, StudyConfig, Spec]:
        if self._study is None:
            self._study = load_study(self.url, self.study_name)
        cfg = study_config(self.url, self.study_name)[0]
        return self._study, cfg, spec_from_dict(self._study.user_attrs[BASE_SPEC])

    def mirror(self, trial_id: str, params: dict[str, Any], result: dict[str, Any] | None, errored: bool,
               failures: int = 0) -> None:
        study, cfg, base = self._open()
        if _mirror_trial(study, cfg, base, self.experiment, trial_id, params, result, errored, failures):
            self._tick(study)

    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        if self.progress and self._bar is None:
            from ..progress import progress_bar

            study = self._open()[0]
            self._bar = progress_bar(self.target, f"{self.study_name} (ray)",
                                     initial=min(self.target, finished_count(study)))

    def _tick(self, study: optuna.Study) -> None:
        if self._bar is not None:
            self._bar.n = min(self.target, finished_count(study))
            self._bar.refresh()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.mirror(trial.trial_id, dict(trial.config), trial.last_result, errored=False, failures=trial.num_failures)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.mirror(trial.trial_id, dict(trial.config), trial.last_result, errored=True, failures=trial.num_failures)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------- Ray session


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return os.path.isfile(token_path)


def _enable_token_auth() -> None:
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray reads the mode once, at import: refresh it the way ray.init does for a new local cluster
        from ._optuna_compat import ray_config

        ray_config().initialize("")
    except (ImportError, AttributeError):  # pragma: no cover - another Ray version
        log.warning("could not refresh Ray's config; set RAY_AUTH_MODE=token before starting dils-search")


@contextmanager
def ray_session(address: str | None = None, num_cpus: int = 2) -> Iterator[None]:
    """Connect to ``address`` (``auto``, ``host:port`` or ``ray://host:port``) or start a local Ray.

    A local Ray gets exactly ``num_cpus`` CPUs, no dashboard and no usage stats, and is shut down
    afterwards. Ray 2.60 clusters use token authentication: an explicit address only sends the
    token when ``RAY_AUTH_MODE=token``, so that is set whenever a token is at hand and the mode is
    not chosen already. A Ray already initialised in this process is used as it is and left running.
    """
    require_ray()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # every growth step checkpoints (a few bytes); Tune's warning about frequent snapshots is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Tune tables: the progress bar says it in one line
    if ray.is_initialized():
        yield
        return
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True)
    else:
        if "RAY_AUTH_MODE" not in os.environ and _token_available():
            _enable_token_auth()
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as exc:  # ConnectionError, AuthenticationError, ValueError on a bad address
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = ""
            if "auth" in first.lower() or "token" in first.lower():
                hint = ("; copy the cluster's token (`ray get-auth-token` on the head node) into ~/.ray/auth_token "
                        "or RAY_AUTH_TOKEN, with RAY_AUTH_MODE=token")
            raise InputError(f"ray-address={address!r}: cannot connect: {first[:300]}{hint}") from None
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- tuner


def _scheduler(cfg: StudyConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    s = cfg.search
    max_t = max(1, s.max_steps)
    if s.pruner == "sha":
        return ASHAScheduler(time_attr="depth", metric="val_metric", mode="max", max_t=max_t, grace_period=1,
                             reduction_factor=2)
    if s.pruner == "hyperband":
        return HyperBandScheduler(time_attr="depth", metric="val_metric", mode="max", max_t=max_t, reduction_factor=2)
    if s.pruner == "median":
        return MedianStoppingRule(time_attr="depth", metric="val_metric", mode="max", grace_period=1,
                                  min_samples_required=3)
    return FIFOScheduler()  # "none", and "growth", which each trial applies to its own path


def _searcher(cfg: StudyConfig, base: Spec, study: optuna.Study, max_concurrent: int,
              points_to_evaluate: list[dict[str, Any]] | None) -> Any:
    """In-memory ``OptunaSearch`` over ``PathSpace``, warm-started with the study's finished trials."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    multi = len(cfg.search.objectives) > 1
    storage = optuna.storages.InMemoryStorage()
    memory = optuna.create_study(storage=storage, study_name="dils", directions=study.directions)
    memory.add_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    searcher = OptunaSearch(
        space=DefineByRun(base, make_policy(cfg).space),
        metric=["val_metric", "params"] if multi else "val_metric",  # always given, so Tune never reads a missing metric
        mode=["max", "min"] if multi else "max",
        sampler=make_sampler(cfg),  # seeded with the config's seed
        storage=storage,
        study_name="dils",
        points_to_evaluate=points_to_evaluate,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def _experiment_dir(artifacts: str, study_name: str) -> Path:
    root = Path(artifacts).resolve() / "ray_experiments"
    for i in range(1, 10_000):
        candidate = root / (study_name if i == 1 else f"{study_name}-{i}")
        if not candidate.exists():
            return candidate
    raise InputError(f"artifacts={artifacts!r} has too many Ray experiments of study {study_name!r}")


def _trainable(cfg: StudyConfig, url: str, artifacts: str) -> Any:
    """The config's tree's trainable (no device given: each worker trains where it runs, on CUDA if it has one)."""
    policy = make_policy(cfg)
    tree = GrowthTree.from_config(cfg, url, str(Path(artifacts).resolve()))
    min_gain = cfg.search.min_gain if cfg.search.pruner == "growth" and len(cfg.search.objectives) == 1 else None
    try:
        return tree.trainable(policy.space, mode=policy.mode, min_gain=min_gain)
    finally:
        tree.close()


def _sweep(callback: MirrorCallback, results: Any) -> None:
    """Mirror any finished trial the callback missed (e.g. a driver that died right after it)."""
    for r in results:
        m = r.metrics or {}
        if "trial_id" in m:  # trials that never reported have nothing to mirror
            callback.mirror(m["trial_id"], dict(r.config or {}), m, errored=r.error is not None)


def _fit(cfg: StudyConfig, url: str, artifacts: str, name: str, target: int, timeout: float | None,
         max_concurrent: int, points_to_evaluate: list[dict[str, Any]] | None, progress: bool) -> None:
    """Run one new Tune experiment that adds ``target - finished`` trials to the study."""
    study = load_study(url, name, cfg)
    todo = target - finished_count(study)
    if todo <= 0:
        return
    base = spec_from_dict(study.user_attrs[BASE_SPEC])
    exp_dir = _experiment_dir(artifacts, name)
    study.set_user_attr(EXPERIMENT_ATTR, str(exp_dir))
    callback = MirrorCallback(url, name, exp_dir.name, target, progress)
    tuner = tune.Tuner(
        _trainable(cfg, url, artifacts),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(cfg, base, study, max_concurrent, points_to_evaluate),
            scheduler=_scheduler(cfg),
            num_samples=todo,
            time_budget_s=timeout or cfg.search.timeout or None,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=exp_dir.name,
            storage_path=str(exp_dir.parent),
            failure_config=tune.FailureConfig(max_failures=max(1, cfg.storage.max_retry)),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[callback],
            verbose=0,
        ),
    )
    _sweep(callback, tuner.fit())


def _check(cfg: StudyConfig, max_concurrent: int) -> None:
    require_ray()
    allowed = [n for n in POLICIES.names() if policy_class(n).samples_paths]  # replayable from a Tune config
    if cfg.search.policy not in allowed:
        raise InputError(
            f"search.policy={cfg.search.policy!r} is not available with --backend ray; allowed: {', '.join(allowed)}"
        )
    if max_concurrent < 1:
        raise InputError(f"max-concurrent={max_concurrent!r} must be >= 1")


def run_ray(
    cfg: StudyConfig, url: str, artifacts: str, study_name: str | None = None, n_trials: int | None = None,
    timeout: float | None = None, *, address: str | None = None, max_concurrent: int = 2, num_cpus: int | None = None,
    points_to_evaluate: list[dict[str, Any]] | None = None, progress: bool = True,
) -> optuna.Study:
    """Create (or continue) the study for ``cfg`` and run it under Ray Tune to ``n_trials`` finished trials.

    ``address`` None starts a local Ray with ``num_cpus`` (default ``max_concurrent``) CPUs;
    ``points_to_evaluate`` are param dicts (as stored on Optuna trials) to try first.
    """
    _check(cfg, max_concurrent)
    name = study_name or cfg.name
    target = n_trials or cfg.search.n_trials
    task = make_task(cfg, "cpu")  # validate the data against the spec before anything is written
    LineageStore(url, artifacts).close()  # schema first: workers must not race to create it
    create_study(cfg, url, artifacts, name, task)
    with ray_session(address, num_cpus or max_concurrent):
        _fit(cfg, url, artifacts, name, target, timeout, max_concurrent, points_to_evaluate, progress)
    finalize_if_done(url, name, artifacts, target, progress)  # the driver finalizes once Tune is done
    return load_study(url, name, cfg)


def resume_ray(
    url: str, study_name: str, n_trials: int | None = None, artifacts: str | None = None, *,
    address: str | None = None, max_concurrent: int = 2, num_cpus: int | None = None, timeout: float | None = None,
    progress: bool = True,
) -> optuna.Study:
    """Continue a study's latest Ray experiment with ``Tuner.restore`` (errored trials too), then, if
    the study still has fewer than ``n_trials`` finished trials, run a new experiment for the rest."""
    cfg, stored = study_config(url, study_name)
    _check(cfg, max_concurrent)
    artifacts = artifacts or stored
    target = n_trials or cfg.search.n_trials
    LineageStore(url, artifacts).close()
    experiment = load_study(url, study_name, cfg).user_attrs.get(EXPERIMENT_ATTR)
    with ray_session(address, num_cpus or max_concurrent):
        if experiment and tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(experiment, trainable=_trainable(cfg, url, artifacts),
                                       resume_errored=True)
            _sweep(MirrorCallback(url, study_name, Path(experiment).name, target), tuner.fit())
        _fit(cfg, url, artifacts, study_name, target, timeout, max_concurrent, None, progress)
    finalize_if_done(url, study_name, artifacts, target, progress)
    return load_study(url, study_name, cfg)
