"""What a study did: best path, reuse figures and compute, read back from storage (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.spec import GrowthStep, forward_flops, spec_from_dict
from ..store import LineageStore
from .attrs import (
    BEST_DEPTH,
    FLOPS_REUSED,
    FLOPS_SPENT,
    MODE,
    NODE_KEYS,
    PARAMS,
    SECONDS_SPENT,
    TEST_METRIC,
    TRAINED_KEYS,
    VALS,
    steps_of,
)
from .budget import search_cap, spent
from .storage import FINISHED_STATES, StudySetup, read_study, study_setup

__all__ = ["StudySummary", "summarize", "scratch_equivalent_flops"]


@dataclass
class StudySummary:
    study_name: str
    policy: str
    n_trials: int
    states: dict[str, int]
    best_trial: int | None  # Optuna's study.best_trial: the COMPLETE trial with the highest value (first on ties)
    best_path: list[dict[str, Any]]
    best_val: float | None
    best_test: float | None
    best_params: int | None
    best_hidden: list[int]
    best_node_key: str | None  # the best node by validation of every finished trial (pruned ones' prefixes too)
    nodes: int
    nodes_trained: int
    node_uses_reused: int
    duplicate_trainings: int  # a node (searched or finalized) trained to completion twice (a retrain after damage is not one)
    flops_spent: int
    flops_reused: int
    seconds_spent: float
    scratch_equivalent_flops: int
    best_node_trial: int | None = None  # the first trial that evaluated the best node (it may have been pruned)
    retrained_after_damage: int = 0  # nodes (finalized ones too) whose checkpoint was missing, damaged or swapped, then retrained
    final: dict[str, Any] | None = None  # the delivered model (finalize stage); None before finalizing
    # the compute up to the delivered model against the budget (search/budget.py): budget_flops (None
    # without one), search_cap, search_flops, final_flops and delivered_flops (None before finalizing)
    budget: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scratch_cost(epochs: tuple[int, int], n_train: int, base: dict[str, Any], steps: list[dict[str, Any]], depth: int) -> int:
    """Training FLOPs (3 forward passes per sample) of the path's first ``depth`` prefixes, each
    trained from random init for the epochs it saw along the path (``epochs``: of a root, of a step)."""
    root, per_step = epochs
    spec = spec_from_dict(base)
    total = 3 * forward_flops(spec) * n_train * root
    for d, s in enumerate(steps[:depth], start=1):
        spec = GrowthStep.from_dict(s).inserted_into(spec)
        total += 3 * forward_flops(spec) * n_train * (root + d * per_step)
    return total


def scratch_equivalent_flops(setup: StudySetup, trial_attrs: list[dict[str, Any]]) -> int:
    """What training every node the finished trials evaluated from scratch, for the epochs it saw
    along its path, would have cost (``show`` and the report's answer block say the same)."""
    if setup.base is None:
        return 0
    total = 0
    for attrs in trial_attrs:
        scratch_mode = attrs.get(MODE) == "scratch"
        depth = len(steps_of(attrs)) if scratch_mode else len(attrs[NODE_KEYS]) - 1
        total += _scratch_cost(setup.epochs, setup.n_train, setup.base, steps_of(attrs), depth)
    return total


def _optuna_best(trials: list[Any], maximize: bool) -> int | None:
    """The number of Optuna's ``study.best_trial`` (the first objective's best), computed from the rows."""
    sign = 1.0 if maximize else -1.0
    complete = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    return max(complete, key=lambda t: (sign * t.value, -t.number)).number if complete else None


def _final(stored: dict[str, Any] | None, finished: int) -> dict[str, Any] | None:
    """The stored finalize result; ``stale`` when trials finished after it (``finalize`` renews it)."""
    if not stored:
        return None
    return {**stored, "stale": int(stored.get("after_trials", 0)) < finished}


def _final_keys(final: dict[str, Any] | None) -> set[str]:
    """The finalized nodes of a study's delivered-model record: the delivered one and every candidate."""
    if not final:
        return set()
    keys = {final.get("node_key")} | {c.get("node_key") for c in final.get("candidates", [])}
    return {k for k in keys if isinstance(k, str)}


def _budget(setup: StudySetup, trials: list[Any], final: dict[str, Any] | None) -> dict[str, Any]:
    cfg = setup.config
    searched = spent(trials)
    finalized = float(final["flops"]) if final else None
    return {"budget_flops": (cfg.search.budget_flops or None) if cfg else None,
            "search_cap": (search_cap(cfg) or None) if cfg else None, "search_flops": searched,
            "final_flops": finalized, "delivered_flops": None if finalized is None else searched + finalized}


def summarize(url: str, name: str, artifacts: str | None = None, with_trials: bool = False) -> StudySummary:
    study = read_study(url, name)
    setup = study_setup(url, name, study)
    sign = 1.0 if setup.maximize else -1.0
    trials = study.trials
    states: dict[str, int] = {}
    for t in trials:
        states[t.state] = states.get(t.state, 0) + 1
    done = [t for t in trials if t.state in FINISHED_STATES and NODE_KEYS in t.user_attrs]
    keys = sorted({k for t in done for k in t.user_attrs[NODE_KEYS]})
    store = LineageStore(url, artifacts or setup.artifacts, create=False)
    try:
        records = {r.key: r for r in store.nodes(keys)}
        counts = store.training_counts()
        replaced = store.training_counts("replaced")
    finally:
        store.close()
    trained = {k for t in done for k in t.user_attrs.get(TRAINED_KEYS, [])}
    reused_uses = sum(len(t.user_attrs[NODE_KEYS]) - len(t.user_attrs.get(TRAINED_KEYS, [])) for t in done)
    # a pruned trial still trained real nodes: its best node counts like a completed trial's
    scored = [t for t in done if t.user_attrs.get(VALS)]
    best = max(scored, key=lambda t: (max(sign * v for v in t.user_attrs[VALS]), -t.number)) if scored else None
    best_key = None
    best_hidden: list[int] = []
    best_path: list[dict[str, Any]] = []
    if best is not None:
        scratch_mode = best.user_attrs.get(MODE) == "scratch"
        depth = int(best.user_attrs.get(BEST_DEPTH, 0))
        best_key = best.user_attrs[NODE_KEYS][-1 if scratch_mode else depth]
        best_path = steps_of(best.user_attrs)
        best_path = best_path if scratch_mode else best_path[:depth]
        if best_key in records:
            best_hidden = list(records[best_key].spec.get("hidden", []))
    scratch = scratch_equivalent_flops(setup, [t.user_attrs for t in done])
    counted = set(keys) | _final_keys(study.final)  # the training log's figures cover the finalized nodes too
    summary = StudySummary(
        study_name=name,
        policy=setup.label,
        n_trials=len(trials),
        states=states,
        best_trial=_optuna_best(trials, setup.maximize),
        best_node_trial=best.number if best else None,
        best_path=best_path,
        best_val=float(best.user_attrs[VALS][int(best.user_attrs.get(BEST_DEPTH, 0))]) if best else None,
        best_test=float(best.user_attrs[TEST_METRIC]) if best else None,
        best_params=int(best.user_attrs[PARAMS]) if best else None,
        best_hidden=best_hidden,
        best_node_key=best_key,
        nodes=len(keys),
        nodes_trained=len(trained),
        node_uses_reused=reused_uses,
        duplicate_trainings=sum(max(0, counts.get(k, 0) - 1) for k in counted),
        flops_spent=int(sum(t.user_attrs.get(FLOPS_SPENT, 0) for t in done)),
        flops_reused=int(sum(t.user_attrs.get(FLOPS_REUSED, 0) for t in done)),
        seconds_spent=float(sum(t.user_attrs.get(SECONDS_SPENT, 0.0) for t in done)),
        scratch_equivalent_flops=int(scratch),
        retrained_after_damage=sum(1 for k in counted if replaced.get(k)),
        final=_final(study.final, sum(t.state in FINISHED_STATES for t in trials)),
        budget=_budget(setup, trials, study.final),
    )
    if with_trials:
        summary.trials = [
            {"number": t.number, "state": t.state, "value": t.value, **t.user_attrs}
            for t in trials
        ]
    return summary

