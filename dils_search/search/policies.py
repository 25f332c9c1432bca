"""Growth policies: how the next path is chosen. Each is a small class behind one interface, registered
in ``registry.POLICIES``; a policy proposes the steps of each trial's path to the tree."""

from __future__ import annotations

import abc
from typing import ClassVar

import optuna
from optuna.trial import TrialState

from ..config import StudyConfig
from ..core.inits import allowed_inits, step_width
from ..core.spec import GrowthStep, Spec
from ..errors import InputError
from ..registry import POLICIES
from .attrs import FAIL_REASON, GREEDY_PATH, POLICY_DONE, VALS
from .space import GrowthSpace, sample_path

__all__ = ["Policy", "POLICY_REGISTRY", "make_policy", "policy_class"]


class Policy(abc.ABC):
    """Proposes the steps of one trial's growth path (``propose``; None when the policy is done).

    ``mode``: how the path's nodes are trained, ``"grow"`` (each inherits from its parent) or
    ``"scratch"`` (only the candidate, from random initialisation). ``samples_paths``: True when
    ``propose`` is exactly ``sample_path`` on ``space`` (the Ray backend replays such paths from
    Tune configs, so it runs only these policies). ``space``: the config's ``[search]`` as this
    policy narrows it. ``sampler``: the Optuna sampler it wants, or None for the config's.
    """

    mode: ClassVar[str] = "grow"
    samples_paths: ClassVar[bool] = False

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        s = cfg.search
        self.space = GrowthSpace(max_steps=s.max_steps, widths=s.widths, inits=s.inits, positions=s.positions,
                                 min_steps=1)  # every trial of a config's study grows

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler | None:
        """The Optuna sampler this policy wants, or None for the config's sampler."""
        return None

    @abc.abstractmethod
    def propose(self, trial: optuna.Trial, base: Spec) -> list[GrowthStep] | None: ...


class OptunaPolicy(Policy):
    """Sampler-driven define-by-run paths (the default)."""

    samples_paths = True

    def propose(self, trial: optuna.Trial, base: Spec) -> list[GrowthStep] | None:
        return list(sample_path(trial, self.space, base))


class RandomPolicy(OptunaPolicy):
    """Uniformly random paths."""

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler | None:
        return optuna.samplers.RandomSampler(seed=seed)


class StackPolicy(OptunaPolicy):
    """Progressive stacking: always insert right before the head (at ``stack_width`` if set)."""

    def __init__(self, cfg: StudyConfig) -> None:
        super().__init__(cfg)
        s = cfg.search
        self.space = GrowthSpace(max_steps=s.max_steps, widths=[s.stack_width] if s.stack_width else s.widths,
                                 inits=s.inits, positions="last", min_steps=1)


class ScratchPolicy(OptunaPolicy):
    """The honest baseline: the same candidates, each trained from random initialisation."""

    mode = "scratch"


class PlainPolicy(Policy):
    """What a user would do without the tool: train the base once, from random initialisation, for
    ``train.base_epochs`` with ``train.schedule``, grow nothing, and deliver it as trained. ``compare``'s
    ``policy = "plain"`` entries make the base the plain network (``hidden``) and derive the epochs from
    the budget (``report/compare.py``)."""

    DONE_ATTR = POLICY_DONE

    def propose(self, trial: optuna.Trial, base: Spec) -> list[GrowthStep] | None:
        if any(t.state == TrialState.COMPLETE for t in trial.study.get_trials(deepcopy=False)):
            trial.set_user_attr(self.DONE_ATTR, True)
            return None
        return []


class GreedyPolicy(Policy):
    """AutoGrow-like: at each depth try every candidate step on the incumbent path, keep the best,
    and stop once it gains less than ``search.min_delta`` over its parent (or at ``max_steps``).

    Its state is replayed from the study's trials on every call, so a resumed or multi-worker study
    continues where it stopped; every candidate follows the incumbent's nodes, which are reused.
    Candidates whose trial was pruned before reaching them, or diverged, count as no gain.
    """

    PATH_ATTR = GREEDY_PATH
    DONE_ATTR = POLICY_DONE

    def candidates(self, spec: Spec) -> list[GrowthStep]:
        """Every step the config allows on ``spec``: positions x inits x widths (identity at its forced width)."""
        s = self.cfg.search
        widths = list(dict.fromkeys(int(w) for w in s.widths))
        out: list[GrowthStep] = []
        for position in self.space.allowed_positions(spec):
            ok = allowed_inits(spec, position)
            for init in dict.fromkeys(s.inits):
                if init not in ok:
                    continue
                for width in dict.fromkeys(step_width(spec, position, init, w) for w in widths):
                    out.append(GrowthStep(position, width, init))
        return out

    def _history(self, study: optuna.Study, exclude: int) -> tuple[dict[tuple[GrowthStep, ...], float], dict[tuple[GrowthStep, ...], float], set[tuple[GrowthStep, ...]]]:
        done: dict[tuple[GrowthStep, ...], float] = {}
        node_val: dict[tuple[GrowthStep, ...], float] = {}
        running: set[tuple[GrowthStep, ...]] = set()
        for t in study.get_trials(deepcopy=False):
            raw = t.user_attrs.get(self.PATH_ATTR)
            if raw is None or t.number == exclude:
                continue
            path = tuple(GrowthStep.from_dict(d) for d in raw)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                vals = [float(v) for v in t.user_attrs.get(VALS, [])]
                for i, v in enumerate(vals[: len(path) + 1]):
                    node_val[path[:i]] = v
                last = vals[len(path)] if len(vals) > len(path) else float("-inf")
                done[path] = max(done.get(path, float("-inf")), last)
            elif t.state == TrialState.FAIL and FAIL_REASON in t.user_attrs:
                done.setdefault(path, float("-inf"))
            elif t.state == TrialState.RUNNING:
                running.add(path)
        return done, node_val, running

    def propose(self, trial: optuna.Trial, base: Spec) -> list[GrowthStep] | None:
        done, node_val, running = self._history(trial.study, trial.number)
        incumbent: tuple[GrowthStep, ...] = ()
        spec = base
        while len(incumbent) < self.cfg.search.max_steps:
            level = [(*incumbent, c) for c in self.candidates(spec)]
            if not level:
                break
            todo = [p for p in level if p not in done]
            if todo:
                # a candidate another worker is training is proposed again only when nothing else is
                # left: its nodes are then waited for and reused, never trained twice
                pick = next((p for p in todo if p not in running), todo[0])
                trial.set_user_attr(self.PATH_ATTR, [s.to_dict() for s in pick])
                return list(pick)
            best = max(level, key=lambda p: done[p])  # the first of equals, in candidate order
            if not done[best] - node_val.get(incumbent, float("-inf")) >= self.cfg.search.min_delta:
                break
            incumbent = best
            step = best[-1]
            spec = step.inserted_into(spec)
        trial.set_user_attr(self.DONE_ATTR, True)
        return None


#: the policy registry (``registry.POLICIES``), under its former name
POLICY_REGISTRY = POLICIES


def policy_class(name: str, field: str = "search.policy") -> type[Policy]:
    """The ``Policy`` subclass registered as ``name`` (one-line ``InputError`` if unknown or not a Policy)."""
    cls = POLICIES.get(name, field)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise InputError(f"{field}={name!r} is registered as {cls!r}, which is not a dils_search Policy subclass")
    return cls


def make_policy(cfg: StudyConfig) -> Policy:
    """The policy ``cfg.search.policy`` names (an unknown name is a one-line ``InputError``)."""
    return policy_class(cfg.search.policy)(cfg)
