"""The plugin API (search/tree.py): the issue's snippet as written, on SQLite and PostgreSQL, node
reuse across studies, recipe overrides in the key, custom loss/metric, threads, and Ray Tune."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

import dils_search as ds
from dils_search.core.threads import thread_count
from dils_search.errors import InputError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _arrays(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tiny seeded classification task (3 classes from a nonlinear rule on 6 features)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6))
    y = (np.sign(x[:, 0] * x[:, 1]) + (x[:, 2] > 0.5)).astype(np.int64).clip(0, 2)
    return x, y


def _local_data(x: np.ndarray, y: np.ndarray, task: str = "classification", seed: int = 0) -> ds.Dataset:
    return ds.Dataset.from_arrays(x, y, task=task, seed=seed, val_fraction=0.2, test_fraction=0.2)


def _snippet(url: str) -> tuple[Any, Any, Any, Any]:
    """The issue's snippet as written: only the sizes are tiny (epochs=2, n_trials=5) and x, y given."""
    x, y = _arrays()
    data = ds.Dataset.from_arrays(x, y, task="classification", seed=0)   # numpy or torch; splits seeded
    tree = ds.GrowthTree(base=ds.MLPSpec(data.in_features, [64], data.out_features), data=data,
                         recipe=ds.Recipe(epochs=2, lr=1e-3), storage=url, artifacts="my_art")
    space = ds.GrowthSpace(max_steps=3, widths=[64, 128], inits=["dils-analytic"], positions="any")

    def objective(trial):  # type: ignore[no-untyped-def]
        wd = trial.suggest_categorical("weight_decay", [0.0, 1e-4])   # the user's own params: a small set (README)
        path = tree.suggest(trial, space)            # define-by-run growth params, stable names
        node = tree.train(path, trial=trial, recipe_overrides={"weight_decay": wd})
        return node.val_metric                       # reports each depth to the trial; raises TrialPruned

    study = optuna.create_study(direction="maximize", storage=url)
    study.optimize(objective, n_trials=5)
    model = tree.finalize(study).model              # the finalize stage of the finalize issue
    return tree, study, objective, model


def _check_snippet(url: str) -> None:
    tree, study, objective, model = _snippet(url)
    try:
        assert isinstance(model, torch.nn.Module)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert done and all("node_keys" in t.user_attrs for t in done)  # the trial record every study has
        for t in done:  # one report per depth, the trial's value is its deepest node's
            assert sorted(t.intermediate_values) == list(range(len(t.user_attrs["node_keys"])))
            assert t.value == pytest.approx(t.user_attrs["vals"][-1])
        before = tree.store.training_counts()
        assert before and max(before.values()) == 1
        again = optuna.create_study(direction="maximize", storage=url)  # a second study on the same tree
        again.optimize(objective, n_trials=3)
        counts = tree.store.training_counts()
        assert max(counts.values()) == 1, "a node was trained twice"
        assert tree.finalize(study).trained is False  # finalizing again loads the stored node
        records = tree.store.nodes()
        assert {r.metrics["threads"] for r in records} == {1}
        assert {r.metrics["device"] for r in records} == {str(tree.device)}
    finally:
        tree.close()


def test_snippet_on_sqlite(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    _check_snippet("sqlite:///my.db")


@pytest.mark.postgres
def test_snippet_on_postgres(tmp_path: Any, monkeypatch: Any, request: Any) -> None:
    url = request.getfixturevalue("postgres_url")
    monkeypatch.chdir(tmp_path)
    _check_snippet(url)


def _tree(tmp_path: Any, storage: str | None = None, **kw: Any) -> ds.GrowthTree:
    data = _local_data(*_arrays())
    return ds.GrowthTree(base=ds.MLPSpec(data.in_features, [16], data.out_features), data=data,
                         recipe=ds.Recipe(epochs=1, lr=1e-2), storage=storage or f"sqlite:///{tmp_path / 't.db'}",
                         artifacts=str(tmp_path / "art"), **kw)


STEPS = (ds.GrowthStep(1, 8, "dils-analytic"),)


def test_second_seeded_study_trains_nothing(tmp_path: Any) -> None:
    tree = _tree(tmp_path)
    space = ds.GrowthSpace(max_steps=2, widths=[8, 16], inits=["dils-analytic", "identity"])

    def objective(trial: optuna.Trial) -> float:
        wd = trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
        return tree.train(tree.suggest(trial, space), trial=trial, recipe_overrides={"weight_decay": wd}).val_metric

    for _ in range(2):
        optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=3)).optimize(objective, n_trials=4)
        if _ == 0:
            first = tree.store.training_counts()
    assert first and tree.store.training_counts() == first  # the same paths again: every node reused
    tree.close()


def test_threads_of_one_process_share_nodes(tmp_path: Any) -> None:
    tree = _tree(tmp_path)
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: tree.train(STEPS, trial=t).val_metric, n_trials=4, n_jobs=2)  # the same path, 2 threads
    assert len(tree.store.training_counts()) == 2 and max(tree.store.training_counts().values()) == 1
    tree.close()


def test_recipe_overrides_change_keys(tmp_path: Any) -> None:
    tree = _tree(tmp_path)
    keys = {tree.path(STEPS, o).key for o in ({"weight_decay": 1e-4}, {"weight_decay": 1e-3}, {"lr": 0.05}, None)}
    assert len(keys) == 4
    assert tree.path(STEPS, {"weight_decay": np.float64(1e-4)}).key == tree.path(STEPS, {"weight_decay": 1e-4}).key
    a = tree.train(STEPS, recipe_overrides={"weight_decay": 1e-4})
    b = tree.train(STEPS, recipe_overrides={"weight_decay": 1e-3})
    assert a.key != b.key and a.trained and b.trained
    assert tree.train(STEPS, recipe_overrides={"weight_decay": 1e-4}).trained is False
    assert tree.node(a.key).val_metric == a.val_metric
    with pytest.raises(InputError, match="recipe_overrides has 'dropout', which is not a Recipe field"):
        tree.path(STEPS, {"dropout": 0.1})
    with pytest.raises(InputError, match="weight_decay=-1"):
        tree.path(STEPS, {"weight_decay": -1})
    tree.close()


LOSS_CALLS: list[int] = []


def smooth_ce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    LOSS_CALLS.append(1)
    return F.cross_entropy(output, target, label_smoothing=0.1)


def error_rate(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output.argmax(1) != target).float().mean())


def test_custom_loss_and_metric(tmp_path: Any) -> None:
    LOSS_CALLS.clear()
    tree = _tree(tmp_path, loss=smooth_ce, metric=error_rate, direction="minimize")
    node = tree.train(STEPS)
    assert LOSS_CALLS
    d = tree.data
    assert node.val_metric == pytest.approx(error_rate(node.model(d.x_val), d.y_val))
    assert node.metrics["metric"] == f"{__name__}:error_rate" and node.metrics["loss"] == f"{__name__}:smooth_ce"
    assert node.key != _tree(tmp_path).path(STEPS).key  # another loss/metric: another node
    assert tree.tune_mode == "min"

    def objective(trial: optuna.Trial) -> float:
        return tree.train(tree.suggest(trial, ds.GrowthSpace(max_steps=1, widths=[8])), trial=trial).val_metric

    study = optuna.create_study(direction=tree.direction)
    study.optimize(objective, n_trials=2)
    assert tree.finalize(study, epochs=1).val_metric <= 1.0
    with pytest.raises(InputError, match="direction='minimize' needs a metric="):
        _tree(tmp_path, direction="minimize")
    tree.close()


def test_trial_pruned_at_a_depth(tmp_path: Any) -> None:
    class Always(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: Any) -> bool:
            return True

    tree = _tree(tmp_path)
    study = optuna.create_study(direction="maximize", pruner=Always())
    study.optimize(lambda t: tree.train(STEPS, trial=t).val_metric, n_trials=1)
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.PRUNED
    assert list(t.intermediate_values) == [0] and len(t.user_attrs["node_keys"]) == 1
    # as in a CLI study, a pruned trial's nodes were evaluated: finalize delivers the root it reached
    assert tree.finalize(study).record.parent_key == t.user_attrs["node_keys"][0]
    empty = optuna.create_study(direction="maximize")
    with pytest.raises(InputError, match="no evaluated node to finalize"):
        tree.finalize(empty)
    tree.close()


def test_threads_setting(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("DILS_NUM_THREADS", "2")
    assert thread_count() == 2 and thread_count(3) == 3
    tree = _tree(tmp_path)
    assert tree.threads == 2
    node = tree.train(())
    assert node.metrics["threads"] == 2 and node.metrics["device"] == "cpu"
    monkeypatch.setenv("DILS_NUM_THREADS", "many")
    with pytest.raises(InputError, match="DILS_NUM_THREADS='many' must be an integer >= 1"):
        thread_count()
    with pytest.raises(InputError, match="threads=0"):
        thread_count(0)
    tree.close()


@pytest.mark.parametrize("kw, message", [  # the checks of a config's [search] (config.check_space)
    ({"max_steps": 0}, "max_steps=0 must be > 0"),
    ({"max_steps": 10**6}, "max_steps=1000000 is too large; allowed: at most 64"),
    ({"max_steps": "2"}, "max_steps='2' must be an integer"),
    ({"widths": []}, "widths=\\[\\] must list at least one width"),
    ({"widths": [8, -1]}, "widths\\[1\\]=-1 must be > 0"),
    ({"widths": [10**9]}, "widths\\[0\\]=1000000000 is too large"),
    ({"inits": ["nope"]}, "inits\\[0\\]='nope' is unknown; allowed: dils-analytic"),
    ({"positions": "first"}, "positions='first' is unknown"),
    ({"positions": [0, -2]}, "positions\\[1\\]=-2 is out of range; allowed: 0..255"),
])
def test_growth_space_refusals(kw: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"max_steps": 2, "widths": [8], **kw}
    with pytest.raises(InputError, match=message) as info:
        ds.GrowthSpace(**args)
    assert "\n" not in str(info.value)


def test_positions_last_and_list(tmp_path: Any) -> None:
    tree = _tree(tmp_path)
    for positions, allowed in (("last", {1}), ([0], {0})):
        space = ds.GrowthSpace(max_steps=1, widths=[8], positions=positions)
        study = optuna.create_study()
        for _ in range(3):
            trial = study.ask()
            assert {s.position for s in tree.suggest(trial, space)} <= allowed
    tree.close()


def wd_param(trial: Any) -> None:
    trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_ray_tune_version(tmp_path: Any, request: Any, db: str) -> None:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from dils_search.search.ray_backend import ray_session

    tree = _tree(tmp_path, request.getfixturevalue("postgres_url") if db == "postgres" else None)
    space = ds.GrowthSpace(max_steps=2, widths=[8, 16], inits=["dils-analytic"])
    name = f"rt-{uuid.uuid4().hex[:8]}"
    with ray_session(num_cpus=2):
        searcher = OptunaSearch(space=tree.search_space(space, extra=wd_param), metric="val_metric", mode=tree.tune_mode,
                                sampler=optuna.samplers.TPESampler(seed=0))
        tuner = tune.Tuner(tree.trainable(space),
                           tune_config=tune.TuneConfig(search_alg=searcher, num_samples=3, max_concurrent_trials=2),
                           run_config=tree.run_config(name, verbose=0))
        results = tuner.fit()
    assert not results.errors
    # Tune's files sit beside the tree's artifacts, not in ~/ray_results
    assert (tmp_path / "art" / "ray_experiments" / name / "tuner.pkl").is_file()
    assert not (Path.home() / "ray_results" / name).exists()
    for r in results:
        assert r.metrics["depth"] == r.config.get("n_steps", 1)  # one report per depth, to the end
        assert tree.node(r.metrics["node_key"]).spec.hidden  # a node of this tree
    assert max(tree.store.training_counts().values()) == 1
    final = tree.finalize(results)
    assert isinstance(final.model, torch.nn.Module)
    tree.close()


def test_cli_shares_the_thread_setting(monkeypatch: Any, capsys: Any, tmp_path: Any) -> None:
    from conftest import tiny_config

    from dils_search.cli.main import main

    monkeypatch.setenv("DILS_NUM_THREADS", "0")
    assert main(["run", "no-such.toml"]) == 2
    assert capsys.readouterr().err.strip() == "dils-search run: error: DILS_NUM_THREADS='0' must be an integer >= 1"
    monkeypatch.setenv("DILS_NUM_THREADS", "1")
    tree = ds.GrowthTree.from_config(tiny_config(), f"sqlite:///{tmp_path / 'c.db'}", str(tmp_path / "c"), device="cpu")
    node = tree.train(())  # the CLI's nodes record threads and device too
    assert node.metrics["threads"] == 1 and node.metrics["device"] == "cpu"
    tree.close()


def test_tree_refusals(tmp_path: Any) -> None:
    data = _local_data(*_arrays())
    with pytest.raises(InputError, match="base has out_features=5, but the data has 3 outputs"):
        ds.GrowthTree(base=ds.MLPSpec(data.in_features, [8], 5), data=data, storage=f"sqlite:///{tmp_path / 'a.db'}",
                      artifacts=str(tmp_path / "a"))
    with pytest.raises(InputError, match="direction='up' is unknown"):
        _tree(tmp_path, direction="up")
    tree = _tree(tmp_path)
    with pytest.raises(InputError, match="is not in storage"):
        tree.node("0" * 64)
    other = _tree(tmp_path, metric=error_rate, direction="minimize")
    with pytest.raises(InputError, match="was not grown by this tree \\(metric, direction differ\\)"):
        tree.node(other.train(()).key)
    tree.close()
    other.close()


def test_streamed_data_trains_and_finalizes_as_arrays_do(tmp_path: Any) -> None:
    """GrowthTree takes Dataset.from_torch data: the same tensors streamed give the same nodes' metrics."""
    from torch.utils.data import TensorDataset

    mem = _local_data(*_arrays())
    streamed = ds.Dataset.from_torch(*(TensorDataset(getattr(mem, f"x_{s}"), getattr(mem, f"y_{s}"))
                                       for s in ("train", "val", "test")), batch_size=64)
    trees = [ds.GrowthTree(base=ds.MLPSpec(mem.in_features, [16], mem.out_features), data=d,
                           recipe=ds.Recipe(epochs=2, lr=1e-2), storage=f"sqlite:///{tmp_path / f'{i}.db'}",
                           artifacts=str(tmp_path / f"art{i}"), data_id="same-tensors")
             for i, d in enumerate((mem, streamed))]
    a, b = (t.finalize(t.train(STEPS)) for t in trees)
    assert a.key == b.key and a.spec.hidden == b.spec.hidden == [16, 8]
    assert b.val_metric == pytest.approx(a.val_metric, abs=1e-5) and b.test_metric == pytest.approx(a.test_metric, abs=1e-5)
    assert b.model is not None and b.predictor.preprocess.is_identity  # streamed inputs are not standardised
    with pytest.raises(InputError, match="loss= and metric= need in-memory data"):
        ds.GrowthTree(base=trees[1].base, data=streamed, metric=error_rate, direction="minimize",
                      storage=f"sqlite:///{tmp_path / 'x.db'}", artifacts=str(tmp_path / "x"))
    for t in trees:
        t.close()


def test_the_base_is_a_candidate_and_never_beaten_by_a_worse_node(tmp_path: Any) -> None:
    # a well-trained base; a grown node is not trained after its insertion
    data = _local_data(*_arrays())
    tree = ds.GrowthTree(base=ds.MLPSpec(data.in_features, [16], data.out_features), data=data,
                         recipe=ds.Recipe(epochs=40, lr=1e-2), storage=f"sqlite:///{tmp_path / 't.db'}",
                         artifacts=str(tmp_path / "art"), step_epochs=0)
    assert ds.GrowthSpace(max_steps=2, widths=[8]).min_steps == 0  # the default: the base is a candidate
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    steps = tree.suggest(trial, ds.GrowthSpace(max_steps=2, widths=[8]))
    assert trial.distributions["n_steps"].low == 0 and len(steps) == trial.params["n_steps"]
    assert tree.train((), trial=trial).depth == 0
    # every trial must grow (min_steps=1), and a random 1-wide bottleneck right after the input, untrained, hurts
    hurt = ds.GrowthSpace(max_steps=1, min_steps=1, widths=[1], inits=["random"], positions=[0])
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: tree.train(tree.suggest(t, hurt), trial=t).val_metric, n_trials=1)
    base = tree.train(())
    assert study.best_value < base.val_metric  # the search's best trial is below its own base
    with pytest.warns(UserWarning, match="worse than its base's .*; finalizing the base instead"):
        final = tree.finalize(study)
    assert final.steps == () and final.spec.hidden == [16]
    with pytest.raises(InputError, match=r"min_steps=3 must be an integer in 0..max_steps \(2\)"):
        ds.GrowthSpace(max_steps=2, widths=[8], min_steps=3)
    tree.close()


def test_train_warns_once_per_study_when_every_trial_grows_its_own_root(tmp_path: Any) -> None:
    import warnings

    tree = _tree(tmp_path)
    space = ds.GrowthSpace(max_steps=1, min_steps=1, widths=[8])

    def run(draw: Any, n: int) -> list[str]:
        def objective(trial: optuna.Trial) -> float:
            overrides = {"weight_decay": draw(trial)}
            return tree.train(tree.suggest(trial, space), trial=trial, recipe_overrides=overrides).val_metric

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0)).optimize(
                objective, n_trials=n)
        return [str(w.message) for w in caught if "roots" in str(w.message)]

    continuous = run(lambda t: t.suggest_float("weight_decay", 1e-6, 1e-3, log=True), 7)
    assert len(continuous) == 1 and "has used 5 roots" in continuous[0] and "suggest_categorical" in continuous[0]
    assert run(lambda t: t.suggest_categorical("weight_decay", [0.0, 1e-4]), 7) == []  # reuse: no warning
    tree.close()
