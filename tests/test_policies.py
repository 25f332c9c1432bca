"""Growth policies: one shared suite run over every registered policy, then greedy's own contract."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from conftest import tiny_config
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from dils_search.core.grow import GrowthStep, check_step
from dils_search.core.spec import MLPSpec
from dils_search.registry import POLICIES
from dils_search.search.policies import POLICY_REGISTRY, GreedyPolicy, make_policy
from dils_search.search.study import load_study, resume_study, run_study
from dils_search.search.trainers import make_task
from dils_search.store import LineageStore


def _steps(raw: list[dict[str, Any]]) -> list[GrowthStep]:
    return [GrowthStep.from_dict(d) for d in raw]


@pytest.mark.parametrize("policy", sorted(POLICIES.names()))
def test_every_policy_runs_paths_over_the_store(policy: str, sqlite_url: str, tmp_path: Any) -> None:
    cfg = tiny_config(search={"policy": policy, "n_trials": 2, "stack_width": 16})
    assert type(make_policy(cfg)) is POLICIES.get(policy) and POLICY_REGISTRY is POLICIES
    study = run_study(cfg, sqlite_url, str(tmp_path / "art"), "s", progress=False)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if policy == "plain":  # the base, trained once; then the policy says it is done
        assert len(done) == 1 and done[0].user_attrs["steps"] == [] and len(done[0].user_attrs["node_keys"]) == 1
        assert [t.user_attrs.get("policy_done") for t in study.trials] == [None, True]
        return
    assert len(done) == 2
    base = make_task(cfg, "cpu").base
    store = LineageStore(sqlite_url, tmp_path / "art")
    counts = store.training_counts()
    assert counts and set(counts.values()) == {1}, "a node was trained twice"
    for t in done:
        steps = _steps(t.user_attrs["steps"])
        assert 1 <= len(steps) <= cfg.search.max_steps
        spec = base
        for step in steps:
            check_step(spec, step)
            if policy == "stack":
                assert step.position == len(spec.hidden)
                assert step.width == (spec.hidden[-1] if step.init == "identity" else 16)
            spec = spec.with_hidden([*spec.hidden[: step.position], step.width, *spec.hidden[step.position :]])
        records = store.nodes(t.user_attrs["node_keys"])
        modes = {r.recipe["mode"] for r in records}
        if policy == "scratch":  # only the candidate itself, from random initialisation
            assert modes == {"scratch"} and len(t.user_attrs["node_keys"]) == 1
            assert "val_before" not in records[0].metrics
        else:
            assert modes == {"grow"} and len(t.user_attrs["node_keys"]) == len(steps) + 1
    store.close()


def test_greedy_candidates_cover_positions_widths_and_exact_identity() -> None:
    cfg = tiny_config(search={"policy": "greedy"})
    cands = GreedyPolicy(cfg).candidates(MLPSpec(16, [8], 4, "relu", False))
    assert cands == [
        GrowthStep(0, 8, "dils-analytic"), GrowthStep(0, 16, "dils-analytic"),
        GrowthStep(1, 8, "dils-analytic"), GrowthStep(1, 16, "dils-analytic"), GrowthStep(1, 8, "identity"),
    ]
    last = tiny_config(search={"policy": "greedy", "positions": "last", "inits": ["random"]})
    assert GreedyPolicy(last).candidates(MLPSpec(16, [8, 4], 4, "relu", False)) == [
        GrowthStep(2, 8, "random"), GrowthStep(2, 16, "random")]


def _done(study: optuna.Study, path: list[GrowthStep], vals: list[float], state: TrialState = TrialState.COMPLETE) -> None:
    study.add_trial(create_trial(
        state=state, value=max(vals) if state == TrialState.COMPLETE and vals else None,
        user_attrs={"greedy_path": [s.to_dict() for s in path], "vals": vals},
    ))


def test_greedy_keeps_the_best_step_and_stops_below_min_delta() -> None:
    """Decisions replayed from a real (in-memory) study's trials."""
    cfg = tiny_config(search={"policy": "greedy", "min_delta": 0.05, "inits": ["dils-analytic"], "widths": [8],
                              "positions": "last", "max_steps": 3})
    base = MLPSpec(16, [8], 4, "relu", False)
    policy = GreedyPolicy(cfg)
    a1, a2, a3 = GrowthStep(1, 8, "dils-analytic"), GrowthStep(2, 8, "dils-analytic"), GrowthStep(3, 8, "dils-analytic")
    study = optuna.create_study(direction="maximize")
    assert policy.propose(study.ask(), base) == [a1]  # nothing evaluated: the first candidate
    _done(study, [a1], [0.50, 0.60])  # +0.10 >= min_delta: keep it and go one deeper
    trial = study.ask()
    assert policy.propose(trial, base) == [a1, a2]
    assert trial.user_attrs["greedy_path"] == [a1.to_dict(), a2.to_dict()]
    _done(study, [a1, a2], [0.50, 0.60, 0.63])  # +0.03 < min_delta: stop
    trial = study.ask()
    assert policy.propose(trial, base) is None
    assert trial.user_attrs["policy_done"] is True
    # a path pruned before reaching its candidate counts as no gain, and so does a diverged one
    s2 = optuna.create_study(direction="maximize")
    _done(s2, [a1], [0.5], state=TrialState.PRUNED)
    assert policy.propose(s2.ask(), base) is None
    deep = tiny_config(search={**cfg.search.__dict__, "min_delta": 0.0})
    s3 = optuna.create_study(direction="maximize")
    _done(s3, [a1], [0.5, 0.6])
    _done(s3, [a1, a2], [0.5, 0.6, 0.7])
    s3.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"greedy_path": [s.to_dict() for s in (a1, a2, a3)],
                                                                    "fail_reason": "diverged"}))
    assert GreedyPolicy(deep).propose(s3.ask(), base) is None  # max_steps reached / diverged: done


def test_greedy_skips_candidates_other_workers_are_training() -> None:
    cfg = tiny_config(search={"policy": "greedy", "inits": ["dils-analytic"], "widths": [8, 16], "positions": "last"})
    base = MLPSpec(16, [8], 4, "relu", False)
    policy = GreedyPolicy(cfg)
    study = optuna.create_study(direction="maximize")
    other = study.ask({"x": FloatDistribution(0, 1)})
    assert policy.propose(other, base) == [GrowthStep(1, 8, "dils-analytic")]  # still RUNNING
    mine = study.ask()
    assert policy.propose(mine, base) == [GrowthStep(1, 16, "dils-analytic")]
    # all taken: propose a running one again (its node is then waited for and reused, not retrained)
    assert policy.propose(study.ask(), base) in ([GrowthStep(1, 8, "dils-analytic")], [GrowthStep(1, 16, "dils-analytic")])


def test_greedy_study_stops_at_min_delta_and_reuses_nodes(sqlite_url: str, tmp_path: Any) -> None:
    cfg = tiny_config(search={"policy": "greedy", "min_delta": 1.0, "n_trials": 20, "pruner": "none"})
    art = str(tmp_path / "art")
    study = run_study(cfg, sqlite_url, art, "g", progress=False)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    n_cands = len(GreedyPolicy(cfg).candidates(make_task(cfg, "cpu").base))
    assert len(complete) == n_cands == 5  # one level tried; no step can gain 1.0, so it stopped there
    assert all(len(t.user_attrs["steps"]) == 1 for t in complete)
    assert study.trials[-1].state == TrialState.PRUNED and study.trials[-1].user_attrs["policy_done"]
    assert len({t.user_attrs["node_keys"][0] for t in complete}) == 1  # every candidate grew from one base node
    store = LineageStore(sqlite_url, art)
    counts = store.training_counts()
    final = {r.key for r in store.nodes() if r.recipe["mode"] == "final"}
    assert len(final) == cfg.final.top_k  # the finalize stage ran once the greedy policy was done
    assert len(set(counts) - final) == n_cands + 1 and set(counts.values()) == {1}
    resume_study(sqlite_url, "g", n_trials=20, progress=False)  # continues, finds greedy finished
    assert store.training_counts() == counts
    assert len([t for t in load_study(sqlite_url, "g").trials if t.state == TrialState.COMPLETE]) == n_cands
    store.close()
