"""The dils_ tables' schema version (alembic, store/migrations): a storage written by the release before
it (3badb71, committed in tests/fixtures/store-3badb71) is read as it is, upgraded in place when opened
for writing, and then `show`, `resume` and `finalize` work on it without retraining a stored node; a
storage of a newer dils-search is refused in one line; a fresh storage gets exactly the models' schema."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import dils_search as ds
from dils_search.cli import main
from dils_search.store import LineageStore, StoreError
from dils_search.store.migrate import MIGRATIONS, upgrade
from dils_search.store.schema import SCHEMA_HEAD, SCHEMA_VERSIONS, VERSION_TABLE, Base, make_engine

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "store-3badb71"


@pytest.fixture
def old_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A copy of the 3badb71 storage (its artifacts folder is relative: run from the copy)."""
    for name in ("old.db", "art", "study.toml", "show-before.json"):
        src = FIXTURE / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return "sqlite:///old.db"


def _version(url: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if VERSION_TABLE not in sa.inspect(conn).get_table_names():
                return None
            return conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    finally:
        engine.dispose()


def _show(url: str, name: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["show", "--storage", url, "--study-name", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_an_old_storage_is_read_as_it_is_then_upgraded_and_nothing_is_retrained(
        old_storage: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = old_storage
    before = json.loads(Path("show-before.json").read_text())
    shown = _show(url, "old", capsys)  # read-only: no upgrade, the old schema is read as it is
    assert _version(url) is None
    derived = {"trials", "scratch_equivalent_flops"}  # an estimate the current code recomputes (FLOPs of specs)
    assert {k: shown[k] for k in before if k not in derived} == {k: before[k] for k in before if k not in derived}
    counts = LineageStore(url, "art", create=False).training_counts()
    assert counts and set(counts.values()) == {1}

    assert main(["finalize", "--storage", url, "--study-name", "old", "--quiet"]) == 0  # opens for writing
    assert "0 trained now" in capsys.readouterr().out
    assert _version(url) == SCHEMA_HEAD
    assert main(["resume", "--storage", url, "--study-name", "old", "--quiet", "--no-report"]) == 0
    store = LineageStore(url, "art")
    assert store.training_counts() == counts, "a stored node was trained again"
    assert _show(url, "old", capsys)["final"]["node_key"] == before["final"]["node_key"]

    # more trials: new nodes are trained, every stored one is reused as it is
    assert main(["resume", "--storage", url, "--study-name", "old", "--n-trials", "5", "--quiet", "--no-report"]) == 0
    after = store.training_counts()
    assert all(after[k] == 1 for k in counts) and set(after.values()) == {1}
    assert _show(url, "old", capsys)["n_trials"] == 5
    store.close()


def test_an_old_plugin_tree_finds_its_nodes_and_finalizes_its_old_study(old_storage: str) -> None:
    sys.path.insert(0, str(FIXTURE))
    try:
        from make_plugin_part import SPACE, fixture_tree
    finally:
        sys.path.remove(str(FIXTURE))
    import optuna

    tree = fixture_tree(old_storage)  # opening it for writing upgrades the storage
    assert _version(old_storage) == SCHEMA_HEAD
    study = optuna.load_study(study_name="old-plugin", storage=old_storage)
    counts = tree.store.training_counts()
    for t in study.trials:  # the keys are the old ones: every node of every old trial is found, none trained
        steps = ds.GrowthSpace(**SPACE)  # (the trial's path, replayed from its params)
        from dils_search.search.space import Replay, sample_path

        path = tree.path(sample_path(Replay(t.params), steps, tree.base))
        assert path.key == t.user_attrs["dils_node_key"]
        assert tree.train(path).trained is False
    final = tree.finalize(study)  # its old trial records (dils_node_keys, dils_vals) are read too
    assert final.record.parent_key in {k for t in study.trials for k in t.user_attrs["dils_node_keys"]}
    assert {k: v for k, v in tree.store.training_counts().items() if k in counts} == counts
    tree.close()


def test_a_storage_of_a_newer_dils_search_is_refused_in_one_line(
        old_storage: str, capsys: pytest.CaptureFixture[str]) -> None:
    LineageStore(old_storage, "art").close()  # upgraded to the head
    engine = sa.create_engine(old_storage)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    for args in (["show", "--storage", old_storage, "--study-name", "old"], ["ls", "--storage", old_storage],
                 ["finalize", "--storage", old_storage, "--study-name", "old"]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "store schema '9999', newer than this dils-search knows" in err, err
    with pytest.raises(StoreError, match="newer than this dils-search"):
        LineageStore(old_storage, "art")


def _columns(engine: sa.Engine) -> dict[str, dict[str, bool]]:
    """table -> column -> nullable, of the dils_ tables."""
    insp = sa.inspect(engine)
    return {t: {c["name"]: bool(c["nullable"]) for c in insp.get_columns(t)}
            for t in insp.get_table_names() if t.startswith("dils_") and t != VERSION_TABLE}


def test_the_migrations_build_what_the_models_declare(any_url: str, tmp_path: Path) -> None:
    """A fresh storage, migrated from nothing, has the models' tables, columns and nullability; the
    migration scripts are the revisions SCHEMA_VERSIONS lists, in order."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    revisions = [s.revision for s in reversed(list(ScriptDirectory.from_config(config).walk_revisions()))]
    assert tuple(revisions) == SCHEMA_VERSIONS
    LineageStore(any_url, tmp_path / "art").close()
    assert _version(any_url) == SCHEMA_HEAD
    engine = make_engine(any_url)
    models = {t.name: {c.name: bool(c.nullable) for c in t.columns} for t in Base.metadata.sorted_tables}
    assert _columns(engine) == models
    upgrade(engine, any_url)  # at the head: a no-op
    engine.dispose()


def _open_at_once(url: str, art: Path) -> None:
    """Three processes and three threads open one fresh storage at the same moment: all succeed."""
    import subprocess

    code = f"from dils_search.store import LineageStore; LineageStore({url!r}, {str(art)!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            LineageStore(url, art).close()
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
    assert not errors and all(rc == 0 for rc, _ in outs), (errors, outs)
    assert _version(url) == SCHEMA_HEAD


def test_processes_and_threads_opening_a_fresh_storage_at_once(any_url: str, tmp_path: Path) -> None:
    _open_at_once(any_url, tmp_path / "art")
