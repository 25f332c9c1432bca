"""Depth-search studies on real storages: reuse, attrs, pruning, workers, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import raw_test_rows, tiny_config
from optuna.trial import TrialState

import dils_search
from dils_search.cli import main
from dils_search.search.paths import make_task, run_path
from dils_search.search.study import GrowthPruner, load_study, run_study
from dils_search.search.summary import summarize
from dils_search.store import LineageStore

ATTRS = {"path", "node_keys", "flops_spent", "flops_reused", "seconds_spent", "test_metric"}


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def test_every_node_trained_once_and_reused(any_url: str, tmp_path: Path) -> None:
    cfg = tiny_config(search={"n_trials": 8, "max_steps": 2, "widths": [8], "inits": ["dils-analytic", "identity"]})
    study = run_study(cfg, any_url, str(tmp_path / "art"), "reuse", progress=False)
    trials = _finished(study)
    assert len(trials) == 8
    for t in trials:
        assert ATTRS <= set(t.user_attrs)
        assert t.value == pytest.approx(max(t.user_attrs["vals"]))
    store = LineageStore(any_url, tmp_path / "art")
    keys = {k for t in trials for k in t.user_attrs["node_keys"]}
    rows = store.nodes(sorted(keys))
    counts = store.training_counts()
    assert {r.key for r in rows} == keys and all(r.status == "ready" for r in rows)
    assert all(counts[k] == 1 for k in keys), counts
    trained = [k for t in trials for k in t.user_attrs["trained_keys"]]
    assert sorted(trained) == sorted(keys)  # each unique node trained by exactly one trial
    base_key = trials[0].user_attrs["node_keys"][0]
    assert all(t.user_attrs["node_keys"][0] == base_key for t in trials)  # shared prefix
    assert sum(t.user_attrs["flops_reused"] for t in trials) > 0
    # a repeated path trains nothing
    task = make_task(cfg, "cpu")
    path = task.path([dils_search.GrowthStep(**s) for s in trials[0].user_attrs["steps"]])
    again = run_path(task, store, path)
    assert again.trained_keys == [] and again.flops_spent == 0
    assert store.training_counts() == counts
    s = summarize(any_url, "reuse")
    assert s.nodes == len(keys) and s.nodes_trained == len(keys) and s.duplicate_trainings == 0
    assert 0 < s.flops_spent < s.scratch_equivalent_flops
    store.close()


def test_node_records_inheritance_gap(sqlite_url: str, tmp_path: Path) -> None:
    cfg = tiny_config(search={"n_trials": 3, "inits": ["identity"], "max_steps": 1})
    study = run_study(cfg, sqlite_url, str(tmp_path / "art"), progress=False)
    store = LineageStore(sqlite_url, tmp_path / "art")
    child = store.get(_finished(study)[0].user_attrs["node_keys"][1])
    assert child is not None and child.parent_key is not None
    assert child.metrics["gap"] <= 1e-5  # identity is exact after a ReLU layer
    assert child.metrics["val_after_insert"] == pytest.approx(child.metrics["val_before"])


def test_growth_pruner_stops_paths_without_gain() -> None:
    study = optuna.create_study(direction="maximize", pruner=GrowthPruner(min_gain=0.05))
    trial = study.ask()
    trial.report(0.5, step=0)
    assert not trial.should_prune()
    trial.report(0.52, step=1)
    assert trial.should_prune()
    trial2 = study.ask()
    trial2.report(0.5, step=0)
    trial2.report(0.6, step=1)
    assert not trial2.should_prune()


def test_growth_pruner_in_a_study(sqlite_url: str, tmp_path: Path) -> None:
    cfg = tiny_config(search={"n_trials": 6, "pruner": "growth", "min_gain": 0.5, "max_steps": 2})
    study = run_study(cfg, sqlite_url, str(tmp_path / "art"), progress=False)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "a gain of 0.5 per step is impossible, so paths must be pruned"
    assert all(len(t.user_attrs["node_keys"]) == 2 for t in pruned)  # stopped right after the first step


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2"])
def test_samplers_run(sampler: str, sqlite_url: str, tmp_path: Path) -> None:
    cfg = tiny_config(search={"n_trials": 3, "sampler": sampler})
    study = run_study(cfg, sqlite_url, str(tmp_path / "art"), progress=False)
    assert len(_finished(study)) == 3


def test_multi_objective_metric_vs_params(sqlite_url: str, tmp_path: Path) -> None:
    cfg = tiny_config(search={"n_trials": 4, "sampler": "nsga2", "objectives": ["metric", "params"]})
    study = run_study(cfg, sqlite_url, str(tmp_path / "art"), progress=False)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4 and all(len(t.values) == 2 for t in trials)
    assert all(t.values[1] == t.user_attrs["params"] for t in trials)
    assert study.best_trials


def test_seeded_study_is_reproducible(tmp_path: Path) -> None:
    cfg = tiny_config(search={"n_trials": 4})
    values = []
    for i in range(2):
        url = f"sqlite:///{tmp_path / f'r{i}.db'}"
        study = run_study(cfg, url, str(tmp_path / f"art{i}"), progress=False)
        values.append([(t.params, t.value) for t in _finished(study)])
    assert values[0] == values[1]


@pytest.mark.slow
def test_two_worker_processes(any_url: str, tmp_path: Path) -> None:
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(
        """
name = "workers"
[data]
dataset = "synthetic"
num_samples = 600
task = "classification"
[model]
hidden = [8]
[train]
base_epochs = 2
epochs_per_step = 1
batch_size = 64
lr = 0.01
[grow]
calib_size = 256
[search]
sampler = "random"
max_steps = 2
widths = [8, 16]
inits = ["dils-analytic", "identity"]
n_trials = 10
[storage]
heartbeat_interval = 1
grace_period = 3
lease_seconds = 5.0
"""
    )
    art = tmp_path / "art"
    proc = subprocess.run(
        [sys.executable, "-m", "dils_search", "run", str(cfg_path), "--storage", any_url, "--artifacts", str(art),
         "--workers", "2", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    study = load_study(any_url, "workers")
    finished = _finished(study)
    assert len(finished) >= 10
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.FAIL))
    store = LineageStore(any_url, art)
    keys = {k for t in finished for k in t.user_attrs["node_keys"]}
    counts = store.training_counts()
    assert all(counts[k] == 1 for k in keys), "a node was trained twice"
    assert len({t.system_attrs.get("dils_worker", t.number) for t in finished}) >= 1
    store.close()


def test_cli_show_export_load_deepen(sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(search={"n_trials": 3})
    art = str(tmp_path / "art")
    run_study(cfg, sqlite_url, art, "cli", progress=False)
    assert main(["ls", "--storage", sqlite_url]) == 0
    assert "cli" in capsys.readouterr().out
    assert main(["show", "--storage", sqlite_url, "--study-name", "cli", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["nodes_trained"] == shown["nodes"] and shown["best_val"] is not None
    task = make_task(cfg, "cpu")
    searched = tmp_path / "searched.pt"
    assert main(["export", "--storage", sqlite_url, "--study-name", "cli", "--out", str(searched), "--no-final"]) == 0
    model = dils_search.load(searched)
    assert list(model.spec.hidden) == shown["best_hidden"]
    metric = dils_search.evaluate(model, *raw_test_rows(cfg), task.data.task)["metric"]  # raw inputs
    assert metric == pytest.approx(shown["best_test"], abs=1e-6)
    out = tmp_path / "best.pt"  # by default: the delivered (finalized) model
    assert main(["export", "--storage", sqlite_url, "--study-name", "cli", "--out", str(out)]) == 0
    model = dils_search.load(out)
    assert list(model.spec.hidden) == shown["final"]["hidden"]
    metric = dils_search.evaluate(model, *raw_test_rows(cfg), task.data.task)["metric"]
    assert metric == pytest.approx(shown["final"]["test_metric"], abs=1e-6)
    # deepen needs data of the same shape: write the tiny synthetic task to an npz file
    npz = tmp_path / "data.npz"
    from dils_search.core.data import synthetic

    x, y = synthetic(num_samples=600, seed=0, task="classification")
    import numpy as np

    np.savez(npz, x=x, y=y)
    deeper = tmp_path / "deeper.pt"
    insert = f"{len(model.spec.hidden)}:32:dils-analytic"
    # the checkpoint records the data it was trained on: another file is refused unless --other-data
    rc = main(["deepen", str(out), "--insert", insert, "--data", "file", "--data-path", str(npz), "--out", str(deeper)])
    assert rc == 2 and "--other-data" in capsys.readouterr().err and not deeper.exists()
    rc = main(["deepen", str(out), "--insert", insert, "--epochs", "1", "--out", str(deeper), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["data"]["dataset"] == "synthetic" and res["data"]["seed"] == cfg.seed
    assert res["metric_before"] == pytest.approx(shown["final"]["test_metric"], abs=1e-6)  # the same test split
    assert res["output_gap"] < 1e-4 and abs(res["metric_after_insert"] - res["metric_before"]) <= 0.005
    rc = main(["deepen", str(out), "--insert", insert, "--data", "file", "--data-path", str(npz), "--other-data",
               "--out", str(tmp_path / "other.pt")])
    assert rc == 0
    assert len(dils_search.load(deeper).spec.hidden) == len(model.spec.hidden) + 1
    assert torch.equal(dils_search.load(out).net.head.affine.weight, model.net.head.affine.weight)  # original untouched


def test_trial_attrs_in_one_transaction_and_counts_without_loading(any_url: str) -> None:
    """write_trial_user_attrs writes every attribute (in one transaction, not one call per key) and
    count_trials/list_studies count in the database what Optuna would count by loading trials."""
    from dils_search.search._optuna_compat import (
        count_trials,
        rdb_storage,
        update_finished_error,
        write_trial_user_attrs,
    )
    from dils_search.search.storage import list_studies, open_storage
    from dils_search.search.study import FINISHED

    study = optuna.create_study(study_name="attrs", storage=open_storage(any_url), direction="maximize")
    backend = rdb_storage(study)
    assert backend is not None
    per_key: list[str] = []
    original = backend.set_trial_user_attr
    backend.set_trial_user_attr = lambda tid, key, value: (per_key.append(key), original(tid, key, value))  # type: ignore[method-assign]
    attrs = {"vals": [0.5, 0.75], "path": [{"position": 0, "width": 8, "init": "random"}], "flops_spent": 12}
    for value in (0.5, None):
        trial = study.ask()
        write_trial_user_attrs(trial, {"vals": [0.0]})
        write_trial_user_attrs(trial, attrs)  # an update and two inserts
        assert trial.user_attrs == attrs
        study.tell(trial, value, state=None if value is not None else optuna.trial.TrialState.PRUNED)
    study.ask()  # one left running
    assert per_key == []
    loaded = optuna.load_study(study_name="attrs", storage=any_url)
    assert [t.user_attrs for t in loaded.trials[:2]] == [attrs, attrs]
    assert count_trials(study) == 3 == len(loaded.trials)
    assert count_trials(study, FINISHED) == 2
    with pytest.raises(update_finished_error()):  # like Optuna's own writer
        write_trial_user_attrs(optuna.Trial(study, loaded.trials[0]._trial_id), attrs)
    (listing,) = list_studies(any_url)
    assert (listing.study_name, listing.n_trials) == ("attrs", 3)
    assert listing.datetime_start == loaded.trials[0].datetime_start


def test_show_reads_the_tables_without_torch_and_agrees_with_optuna(any_url: str, tmp_path: Path) -> None:
    """`show` reads Optuna's tables itself (no torch, no ORM): every trial's number, state, value
    and attributes must be what Optuna's own storage reports, failed and running trials included."""
    cfg = tiny_config(search={"n_trials": 3})
    run_study(cfg, any_url, str(tmp_path / "art"), "direct", progress=False)
    study = load_study(any_url, "direct")
    study.ask()  # left running
    failed = study.ask()
    failed.set_user_attr("note", {"nested": [1, 2.5, None]})
    study.tell(failed, state=TrialState.FAIL)
    code = ("import sys; from dils_search.cli import main; "
            "rc = main(['show', '--storage', sys.argv[1], '--study-name', 'direct', '--json']); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, any_url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "torch not imported"
    shown = json.loads(proc.stdout)
    assert shown["n_trials"] == 5 and shown["states"] == {"COMPLETE": 3, "RUNNING": 1, "FAIL": 1}
    trials = summarize(any_url, "direct", with_trials=True).trials
    expected = [{"number": t.number, "state": t.state.name, "value": t.values[0] if t.values else None, **t.user_attrs}
                for t in load_study(any_url, "direct").get_trials()]
    assert trials == expected
    best = max((t for t in study.get_trials(states=(TrialState.COMPLETE,))), key=lambda t: max(t.user_attrs["vals"]))
    assert shown["best_trial"] == best.number and shown["best_val"] == pytest.approx(max(best.user_attrs["vals"]))


def test_run_path_takes_up_restored_progress(sqlite_url: str, tmp_path: Path) -> None:
    """The follower both backends share: a run restored from a checkpoint of its first node reports
    and records only the rest, and counts the reuse of no node twice (the Ray backend's resume)."""
    from dils_search.search.paths import PathOutcome, growth_stalled

    cfg = tiny_config()
    task = make_task(cfg, "cpu")
    store = LineageStore(sqlite_url, tmp_path / "art")
    path = task.path([dils_search.GrowthStep(1, 8, "dils-analytic"), dils_search.GrowthStep(2, 8, "identity")])
    full = run_path(task, store, path)
    first = run_path(task, store, path, lambda depth, val: True)  # stops after the base node
    assert first.pruned and first.node_keys == full.node_keys[:1] and first.depth == 0
    seen: list[int] = []
    resumed = PathOutcome(path)
    assert resumed.restore(json.loads(json.dumps(first.progress())))
    out = run_path(task, store, path, lambda depth, val: bool(seen.append(depth)), resumed)
    assert out is resumed and seen == [1, 2] and not out.pruned
    assert out.node_keys == full.node_keys and out.vals == full.vals and out.trained_keys == []
    assert out.flops_reused == sum(r.own_flops for r in store.nodes(full.node_keys))
    assert not PathOutcome(task.path()).restore(first.progress())  # another path's progress is refused
    assert growth_stalled([0.5, 0.52], 0.05) and not growth_stalled([0.5, 0.6], 0.05) and not growth_stalled([0.5], 1)
    store.close()
