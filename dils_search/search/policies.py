"""Growth policies: how the next path is chosen. Each is a small class behind one interface."""

from __future__ import annotations

import abc
from typing import Any

import optuna

from ..config import StudyConfig
from ..grow import GrowthStep
from ..spec import Spec
from .space import sample_steps

__all__ = ["Policy", "POLICY_REGISTRY", "make_policy"]


class Policy(abc.ABC):
    """Proposes the steps of one trial's growth path.

    ``mode`` is ``"grow"`` (nodes inherit from their parent) or ``"scratch"`` (every candidate is
    trained from random initialisation). ``propose`` returns None when the policy is done.
    """

    mode = "grow"

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler | None:
        """The Optuna sampler this policy wants, or None for the config's sampler."""
        return None

    @abc.abstractmethod
    def propose(self, trial: optuna.Trial, base: Spec) -> list[GrowthStep] | None: ...


class OptunaPolicy(Policy):
    """Sampler-driven define-by-run paths (the default)."""

    def propose(self, trial: optuna.Trial, base: Spec) -> list[GrowthStep] | None:
        return sample_steps(trial, self.cfg, base)


class RandomPolicy(OptunaPolicy):
    """Uniformly random paths."""

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler | None:
        return optuna.samplers.RandomSampler(seed=seed)


class StackPolicy(OptunaPolicy):
    """Progressive stacking: always insert right before the head (at ``stack_width`` if set)."""


class ScratchPolicy(OptunaPolicy):
    """The honest baseline: the same candidates, each trained from random initialisation."""

    mode = "scratch"


POLICY_REGISTRY: dict[str, type[Policy]] = {
    "optuna": OptunaPolicy,
    "random": RandomPolicy,
    "stack": StackPolicy,
    "scratch": ScratchPolicy,
}


def make_policy(cfg: StudyConfig) -> Policy:
    try:
        cls = POLICY_REGISTRY[cfg.search.policy]
    except KeyError:
        raise ValueError(
            f"search.policy={cfg.search.policy!r} is not available; allowed: {', '.join(POLICY_REGISTRY)}"
        ) from None
    return cls(cfg)


def _unused(_: Any) -> None:  # pragma: no cover
    pass
