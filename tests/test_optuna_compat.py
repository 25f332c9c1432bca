"""The Optuna boundary (search/_optuna_compat.py): plain SQL only on a known schema version; an
unknown one is read through Optuna's public API, or refused with one line naming both versions."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from dils_search.cli import main
from dils_search.search import _optuna_compat as compat
from dils_search.search.storage import list_studies, open_storage, read_study


def _study_file(tmp_path: Path) -> Path:
    """A real Optuna SQLite storage: two studies, finished, pruned, failed and running trials."""
    path = tmp_path / "real.db"
    storage = open_storage(f"sqlite:///{path}")
    study = optuna.create_study(study_name="a", storage=storage, direction="maximize")
    study.set_user_attr("dils_artifacts", "art")
    for i, state in enumerate((optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                               optuna.trial.TrialState.FAIL)):
        trial = study.ask()
        trial.set_user_attr("vals", [0.5, 0.5 + i / 10])
        if state == optuna.trial.TrialState.FAIL:
            trial.set_user_attr("fail_reason", "diverged")
        study.tell(trial, 0.5 + i / 10 if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    study.ask()
    optuna.create_study(study_name="b", storage=storage, directions=["maximize", "minimize"])
    storage.engine.dispose()
    return path


def _set_version(path: Path, version: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (version,))


def test_known_version_is_the_installed_optunas_head(tmp_path: Path) -> None:
    path = _study_file(tmp_path)
    with sqlite3.connect(path) as conn:
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert version in compat.KNOWN_SCHEMA_VERSIONS, f"Optuna {optuna.__version__} writes schema {version}"


def test_unknown_version_falls_back_to_optunas_public_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``ls``/``show`` read through Optuna's public API equals what plain SQL reads."""
    url = f"sqlite:///{_study_file(tmp_path)}"
    fast_ls, fast_a, fast_b = list_studies(url), read_study(url, "a"), read_study(url, "b")
    monkeypatch.setattr(compat, "KNOWN_SCHEMA_VERSIONS", ())
    seen: list[str] = []
    public = compat.read_study_public
    monkeypatch.setattr(compat, "read_study_public", lambda *a: (seen.append("read"), public(*a))[1])
    assert list_studies(url) == fast_ls
    assert read_study(url, "a") == fast_a and read_study(url, "b") == fast_b
    assert seen == ["read", "read"]
    assert [t.state for t in fast_a.trials] == ["COMPLETE", "PRUNED", "FAIL", "RUNNING"]
    assert fast_b.directions == ("MAXIMIZE", "MINIMIZE")


def test_bogus_version_is_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of a real study with a schema version nobody knows: refused, naming what was found
    and what is known, by the API and by the CLI (one line, no traceback)."""
    copy = tmp_path / "copy.db"
    shutil.copy(_study_file(tmp_path), copy)
    _set_version(copy, "v9.9.9.z")
    url = f"sqlite:///{copy}"
    for read in (lambda: list_studies(url), lambda: read_study(url, "a")):
        with pytest.raises(compat.UnknownSchema) as info:
            read()
        assert "'v9.9.9.z'" in str(info.value) and "v3.2.0.a" in str(info.value)
    for args in (["ls", "--storage", url], ["show", "--storage", url, "--study-name", "a"]):
        assert main(args) in (1, 2)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "v9.9.9.z" in err[0] and "Traceback" not in err[0], err


def test_ls_stays_free_of_optuna_on_a_known_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{_study_file(tmp_path)}"
    code = ("import sys; from dils_search.search.storage import list_studies, read_study; "
            f"list_studies({url!r}); read_study({url!r}, 'a'); print('optuna' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_budget_counts_agree_with_optuna(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget callback's COUNT queries count what Optuna's trials say (and the fallback too)."""
    from dils_search.search.study import FINISHED

    url = f"sqlite:///{_study_file(tmp_path)}"
    study = optuna.load_study(study_name="a", storage=open_storage(url))
    assert compat.budget_counts(study, FINISHED, "fail_reason") == (2, 1)
    assert compat.count_trials(study) == 4 and compat.count_trials(study, FINISHED) == 2
    monkeypatch.setattr(compat, "_rdb_fast", lambda storage: False)
    assert compat.budget_counts(study, FINISHED, "fail_reason") == (2, 1)
    assert compat.count_trials(study) == 4 and compat.count_trials(study, FINISHED) == 2
