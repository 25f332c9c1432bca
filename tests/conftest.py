"""Shared fixtures: real SQLite files, a real PostgreSQL database per test, tiny seeded configs.

The ``postgres`` and ``ray`` markers are real: a test that uses a PostgreSQL database (the
``postgres_url`` fixture, or ``any_url``'s postgres case) is marked ``postgres`` at collection, and
the tests that need Ray Tune are marked ``ray``. Without the server (``DILS_TEST_POSTGRES_URL``) or
without ``ray[tune]`` they skip with the reason; with ``DILS_REQUIRE_POSTGRES=1`` or
``DILS_REQUIRE_RAY=1`` (CI sets both, see ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import importlib.util
import os
import random
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from dils_search.config import StudyConfig, config_from_dict

RAY_INSTALL = "pip install 'dils-search[ray]'"


@pytest.hookimpl(optionalhook=True)  # (a run without pytest-xdist has no such hook)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, plus one: many tests wait (on heartbeats, leases, child
    processes, Ray) rather than compute, and the extra worker runs another test meanwhile (plus two
    was slower on 2 cores: 677 s against 506 s)."""
    return (os.cpu_count() or 1) + 1


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # one xdist worker runs every Ray test, one after the other: the shared local Ray, and the tests
        # that start a Ray of their own (two at once on 2 cores made each much slower)
        if "local_ray" in getattr(item, "fixturenames", ()) or item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("local_ray"))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("any_url", "postgres") == "postgres" and (
                "postgres_url" in getattr(item, "fixturenames", ()) or params.get("any_url") == "postgres"):
            item.add_marker(pytest.mark.postgres)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or, where CI requires them, fail) ``postgres`` and ``ray`` tests whose service is missing."""
    if item.get_closest_marker("postgres") and not _postgres_admin_url():
        _missing("DILS_REQUIRE_POSTGRES", "no PostgreSQL server: set DILS_TEST_POSTGRES_URL (CI does)")
    if item.get_closest_marker("ray") and importlib.util.find_spec("ray") is None:
        _missing("DILS_REQUIRE_RAY", f"ray[tune] is not installed: {RAY_INSTALL}")


def _missing(require: str, reason: str) -> None:
    if os.environ.get(require) == "1":
        pytest.fail(f"{require}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)


def tiny_config(**sections: Any) -> StudyConfig:
    """A config that trains in well under a second per node (synthetic classification data)."""
    base: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "synthetic", "num_samples": 600, "task": "classification"},
        "model": {"kind": "mlp", "hidden": [8]},
        "train": {"base_epochs": 2, "epochs_per_step": 1, "batch_size": 64, "lr": 0.01},
        "grow": {"calib_size": 256, "approx_epochs": 5},
        "search": {"max_steps": 2, "widths": [8, 16], "inits": ["dils-analytic", "identity"], "n_trials": 6,
                   "sampler": "random"},
        "storage": {"heartbeat_interval": 1, "grace_period": 3, "lease_seconds": 5.0},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(base)


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def _postgres_admin_url() -> str | None:
    return os.environ.get("DILS_TEST_POSTGRES_URL")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL server named by DILS_TEST_POSTGRES_URL (dropped afterwards).

    Without that variable the test is skipped, visibly (the ``postgres`` marker, added at collection);
    CI sets DILS_REQUIRE_POSTGRES=1 so that a missing server fails instead of skipping.
    """
    admin = _postgres_admin_url()
    assert admin, "postgres tests are marked `postgres` and skipped without DILS_TEST_POSTGRES_URL"
    from sqlalchemy import create_engine, text

    name = f"dils_test_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = admin.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with engine.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def any_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Both real backends: a SQLite file and a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    return str(request.getfixturevalue("postgres_url"))


def raw_test_rows(cfg: StudyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The study's test rows as the loader gave them, before standardisation (what an exported model takes)."""
    from dils_search.core.data import raw_rows

    d = cfg.data
    x, y = raw_rows(d.dataset, "test", seed=cfg.seed, num_samples=d.num_samples, path=d.path or None,
                    val_fraction=d.val_fraction, test_fraction=d.test_fraction, label_column=d.label_column or None,
                    options={"task": d.task} if d.dataset == "synthetic" else None)
    return torch.as_tensor(x), torch.as_tensor(y)
