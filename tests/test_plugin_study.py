"""A study made with a GrowthTree in the user's own Optuna objective is a first-class study: `ls` (with
its policy), `show` and `show --json` (with "final" and the compute summary), `report`, `export`,
`finalize` and compare's readers work on it as on a CLI study, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch

import dils_search as ds
from dils_search.cli import main

optuna.logging.set_verbosity(optuna.logging.WARNING)


def error_rate(output: torch.Tensor, target: torch.Tensor) -> float:
    """A lower-is-better metric, importable by name (so `dils-search finalize` can rebuild the tree)."""
    return float((output.argmax(1) != target).float().mean())


def _plugin_study(url: str, art: Path, name: str, n_trials: int = 4, **kw: Any) -> tuple[ds.GrowthTree, optuna.Study]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 6))
    y = (np.sign(x[:, 0] * x[:, 1]) + (x[:, 2] > 0.5)).astype(np.int64).clip(0, 2)
    data = ds.Dataset.from_arrays(x, y, task="classification", seed=0)
    tree = ds.GrowthTree(base=ds.MLPSpec(6, [8], 3), data=data, recipe=ds.Recipe(epochs=1, lr=1e-2), storage=url,
                         artifacts=str(art), **kw)
    space = ds.GrowthSpace(max_steps=2, widths=[8, 16], inits=["dils-analytic"])

    def objective(trial: optuna.Trial) -> float:
        wd = trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
        return tree.train(tree.suggest(trial, space), trial=trial, recipe_overrides={"weight_decay": wd}).val_metric

    study = optuna.create_study(direction=tree.direction, storage=url, study_name=name,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=n_trials)
    return tree, study


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    assert main(list(args)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_a_plugin_study_works_with_every_command(any_url: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "art"
    tree, study = _plugin_study(any_url, art, "plug")
    listed = {s["study_name"]: s for s in _json(capsys, "ls", "--storage", any_url, "--json")}
    assert listed["plug"]["policy"] == "optuna/dils-analytic" and listed["plug"]["made_by"] == "GrowthTree"
    capsys.readouterr()
    assert main(["ls", "--storage", any_url]) == 0
    assert "optuna/dils-analytic" in capsys.readouterr().out

    shown = _json(capsys, "show", "--storage", any_url, "--study-name", "plug", "--json")
    keys = {k for t in study.trials for k in t.user_attrs["node_keys"]}
    assert shown["policy"] == "optuna/dils-analytic" and shown["final"] is None
    assert shown["nodes"] == len(keys) and shown["nodes_trained"] == len(keys) and shown["duplicate_trainings"] == 0
    assert 0 < shown["flops_spent"] < shown["scratch_equivalent_flops"] and shown["best_val"] is not None
    capsys.readouterr()
    assert main(["show", "--storage", any_url, "--study-name", "plug"]) == 0
    assert "compute spent / from-scratch compute" in capsys.readouterr().out

    # the CLI's finalize on it (the tree rebuilt from its study row and data snapshot), then the plugin's
    assert main(["finalize", "--storage", any_url, "--study-name", "plug", "--quiet"]) == 0
    assert "1 trained now" in capsys.readouterr().out
    final = _json(capsys, "show", "--storage", any_url, "--study-name", "plug", "--json")["final"]
    assert final["top_k"] == 1 and final["artifact_id"] and final["stale"] is False
    counts = tree.store.training_counts()
    again = tree.finalize(study)
    assert again.key == final["node_key"] and again.trained is False and tree.store.training_counts() == counts

    out = tmp_path / "m.pt"
    assert main(["export", "--storage", any_url, "--study-name", "plug", "--out", str(out)]) == 0
    model = ds.load(out)
    got = ds.evaluate(model, tree.data.x_test, tree.data.y_test, tree.data.task)["metric"]
    assert got == pytest.approx(final["test_metric"], abs=1e-6)

    report = tmp_path / "r.html"
    assert main(["report", "--storage", any_url, "--study-name", "plug", "--out", str(report)]) == 0
    assert "plug" in report.read_text()

    from dils_search.report import best_so_far, load_study_data, summary_rows

    data = load_study_data(any_url, "plug")  # compare's readers
    curve = best_so_far(data)
    rows = summary_rows({"plug": [curve]}, 0.01, {"plug": [data.final]}, {"plug": data.setup.policy})
    assert curve.best_val[-1] == shown["best_val"] and rows[0].final_test == pytest.approx(final["test_metric"])

    capsys.readouterr()  # what needs the user's objective is refused in one line
    assert main(["resume", "--storage", any_url, "--study-name", "plug"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "was made with a GrowthTree in Python" in err
    tree.close()


def test_a_minimizing_plugin_study_ranks_by_its_direction(sqlite_url: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    tree, study = _plugin_study(sqlite_url, tmp_path / "art", "low", metric=error_rate, direction="minimize")
    shown = _json(capsys, "show", "--storage", sqlite_url, "--study-name", "low", "--json")
    vals = [v for t in study.trials for v in t.user_attrs["vals"]]
    assert shown["best_val"] == pytest.approx(min(vals))
    assert shown["best_trial"] == study.best_trial.number
    assert main(["finalize", "--storage", sqlite_url, "--study-name", "low", "--quiet", "--top-k", "2"]) == 0
    final = _json(capsys, "show", "--storage", sqlite_url, "--study-name", "low", "--json")["final"]
    assert final["val_metric"] == min(c["val_metric"] for c in final["candidates"])
    tree.close()


def test_only_a_study_in_the_trees_storage_gets_a_row(sqlite_url: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    data = ds.Dataset.from_arrays(rng.standard_normal((120, 4)), rng.integers(0, 2, 120), task="classification")
    tree = ds.GrowthTree(base=ds.MLPSpec(4, [4], 2), data=data, recipe=ds.Recipe(epochs=1), storage=sqlite_url,
                         artifacts=str(tmp_path / "art"))
    other = f"sqlite:///{tmp_path / 'other.db'}"
    for storage in (None, other):  # in memory, and in another database
        study = optuna.create_study(storage=storage, study_name="elsewhere", direction="maximize")
        study.optimize(lambda t: tree.train((), trial=t).val_metric, n_trials=1)
        assert study.trials[0].user_attrs["node_keys"]  # the trial record is written all the same
    listed = _json(capsys, "ls", "--storage", other, "--json")
    assert listed[0]["policy"] == "?" and listed[0]["made_by"] is None
    assert tree.finalize(study).val_metric >= 0  # the plugin's finalize needs no row
    tree.close()
