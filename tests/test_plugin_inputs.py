"""The plugin API's inputs get the limits the CLI applies: arrays that are not real numbers or overflow,
a single class, a GrowthSpace without upper bounds, and a path over the limits refused before training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

import dils_search as ds
from dils_search.errors import DataError, InputError


def _xy(n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3))
    return x, (x[:, 0] > 0).astype(np.int64)


def test_object_arrays_are_checked_like_float_ones_and_complex_ones_are_refused() -> None:
    x, y = _xy()
    with_nan = x.astype(object)
    with_nan[5, 1] = float("nan")
    with pytest.raises(DataError, match="1 NaN or inf values in its inputs"):
        ds.Dataset.from_arrays(with_nan, y)
    with pytest.raises(DataError, match="complex inputs"):
        ds.Dataset.from_arrays(x + 1j, y)
    with pytest.raises(DataError, match="complex targets"):
        ds.Dataset.from_arrays(x, y + 0j, task="regression")
    words = x.astype(object)
    words[0, 0] = "seven"
    with pytest.raises(DataError, match="inputs of dtype object that are not all numbers"):
        ds.Dataset.from_arrays(words, y)
    ok = ds.Dataset.from_arrays(x.astype(object), y)  # an object array of numbers is fine
    assert ok.x_train.dtype.is_floating_point and bool(ok.x_train.isfinite().all())


def test_values_that_overflow_when_standardised_are_refused_not_turned_into_nan() -> None:
    x, y = _xy()
    x[:, 2] = np.where(x[:, 2] > 0, 1e308, -1e308)
    with pytest.raises(DataError, match="input feature 2 .*overflows when standardised"):
        ds.Dataset.from_arrays(x, y)
    x, _ = _xy()
    with pytest.raises(DataError, match="targets too large for float32"):
        ds.Dataset.from_arrays(x, np.full(len(x), 1e300), task="regression")


def test_a_single_class_is_refused() -> None:
    x, _ = _xy()
    with pytest.raises(DataError, match="single class .*at least 2 classes"):
        ds.Dataset.from_arrays(x, np.zeros(len(x), dtype=np.int64))


@pytest.mark.parametrize(("kw", "message"), [  # in the words of a config's [search] (config.check_space)
    ({"widths": [8, 10**9]}, r"widths\[1\]=1000000000 is too large; allowed: at most 65536"),
    ({"max_steps": 10**6}, r"max_steps=1000000 is too large; allowed: at most 64"),
    ({"positions": [0, 10**9]}, r"positions\[1\]=1000000000 is out of range; allowed: 0\.\.255"),
])
def test_growth_space_has_the_configs_upper_bounds(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        ds.GrowthSpace(**{"max_steps": 2, "widths": [8], **kw})


def _tree(tmp_path: Path) -> Any:
    x, y = _xy()
    data = ds.Dataset.from_arrays(x, y, seed=0)
    return ds.GrowthTree(ds.MLPSpec(3, [4], 2), data, ds.Recipe(epochs=1, batch_size=64),
                         storage=f"sqlite:///{tmp_path / 't.db'}", artifacts=str(tmp_path / "art"))


def test_positions_that_miss_the_base_are_refused_instead_of_giving_empty_paths(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    space = ds.GrowthSpace(max_steps=2, widths=[4], positions=[7])  # the base has 1 hidden layer
    study = optuna.create_study()
    with pytest.raises(InputError, match=r"positions=\[7\] allows no position on the base \(hidden=\[4\]\)"):
        tree.suggest(study.ask(), space)
    tree.close()


@pytest.mark.parametrize("steps", [
    [(1, 8, "dils-analytic"), (2, 20000, "random"), (3, 20000, "random")],  # 4e8 parameters at step 2
    [(1, 8, "dils-analytic"), (0, 8, "random"), (9, 8, "random")],  # position 9 on 3 hidden layers
    [(1, 2, "random")] * 300,  # 301 hidden layers
], ids=["parameters", "position", "depth"])
def test_a_path_over_the_limits_is_refused_before_any_node_is_trained(steps: list[Any], tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    path = [ds.GrowthStep(*s) for s in steps]
    with pytest.raises(InputError, match=r"path step \d+ \("):
        tree.train(path)
    assert tree.store.nodes() == []  # nothing trained, nothing stored
    tree.close()
