"""Opening a study storage and reading it without torch, so ``dils-search ls`` and ``show`` start
fast. The readers (in ``_optuna_compat``, the one module that knows Optuna's tables) query them
with plain SQL and do not even import Optuna (0.3 s):
Optuna's own storage checks the schema version (importing alembic) and builds every trial as ORM
objects, which takes most of a second for a few hundred trials. Tests compare what they read
with what Optuna's storage reports."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, Text, column, create_engine, event, select, table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ..store import StoreError, check_reachable, safe_url, sqlite_wal
from . import _optuna_compat as compat

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

    from ..config import StudyConfig

__all__ = [
    "ARTIFACTS_ATTR", "CONFIG_ATTR", "FINAL_ATTR", "FINISHED_STATES", "StoredStudy", "StoredTrial", "StudyListing", "StudyNotFound",
    "list_studies", "open_storage", "read_study", "study_config",
]

FINISHED_STATES = ("COMPLETE", "PRUNED")  # names of Optuna's TrialState members
CONFIG_ATTR = "dils_config"
FINAL_ATTR = "dils_final"  # the delivered model of the finalize stage (search/finalize.py)
ARTIFACTS_ATTR = "dils_artifacts"


class StudyNotFound(StoreError):
    pass


# the lineage store's own study table (store.StudyRow); absent from storages written before it existed
_DILS_STUDIES = table("dils_studies", column("name", String), column("config_json", Text), column("final_json", Text))


def _dils_studies(conn: Any, name: str | None = None) -> dict[str, tuple[str, str | None]]:
    """name -> (config JSON, delivered-model JSON) from the lineage store's study table ({} if absent)."""
    c = _DILS_STUDIES.c
    query = select(c.name, c.config_json, c.final_json)
    if name is not None:
        query = query.where(c.name == name)
    try:
        with conn.begin_nested():  # a missing table must not spoil the surrounding transaction (PostgreSQL)
            return {n: (cfg, fin) for n, cfg, fin in conn.execute(query)}
    except SQLAlchemyError:
        return {}


def open_storage(url: str, cfg: StudyConfig | None = None) -> RDBStorage:
    """Optuna's RDB storage with heartbeats, so killed trials are failed and retried."""
    from optuna.storages import RDBStorage

    st = cfg.storage if cfg is not None else None
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        db = make_url(url).database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).parent.mkdir(parents=True, exist_ok=True)  # like --artifacts, a new folder is made
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    for attempt in range(6):
        try:
            storage = RDBStorage(
                url,
                heartbeat_interval=st.heartbeat_interval if st else 10,
                grace_period=st.grace_period if st else 30,
                **compat.stale_retry_kwargs(st.max_retry if st else 3),
                **kwargs,
            )
            if url.startswith("sqlite"):
                event.listen(storage.engine, "connect", sqlite_wal)
                storage.engine.dispose()  # pooled connections reopen with it
            return storage
        except (SQLAlchemyError, ValueError, ImportError, RuntimeError) as exc:  # RuntimeError: Optuna refuses the schema
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            # two processes creating Optuna's schema at once: the loser sees "already exists" or a
            # lock; the tables are there on the next try
            if attempt < 5 and ("already exists" in first or "locked" in first or "duplicate key" in first):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise StoreError(f"storage={safe_url(url)!r} cannot be opened: {first}") from None
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class StudyListing:
    """What ``ls`` shows of a study: counted in the database, no trial loaded."""

    study_name: str
    n_trials: int
    datetime_start: datetime | None  # when the first trial started
    user_attrs: dict[str, Any]
    config: dict[str, Any] | None = None  # the dils-search config, when the study has one


def list_studies(url: str) -> list[StudyListing]:
    """Every study with its trial count and start time: three queries on Optuna's tables, without
    Optuna's storage set-up (schema checks, an alembic import) or loading a single trial. A storage
    whose schema version ``_optuna_compat`` does not know is read through Optuna's public API."""
    check_reachable(url, must_exist=True)  # reading must never create an empty sqlite file
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = _dils_studies(conn)
            found = compat.list_studies(url, conn)
    except SQLAlchemyError as exc:
        raise _not_a_study_storage(url, exc) from None
    finally:
        engine.dispose()

    def config(name: str, attrs: dict[str, Any]) -> dict[str, Any] | None:
        text = rows[name][0] if name in rows else attrs.get(CONFIG_ATTR)
        return json.loads(text) if text else None

    return [StudyListing(name, n, start, user_attrs=user_attrs, config=config(name, user_attrs))
            for name, n, start, user_attrs in found]


def _not_a_study_storage(url: str, exc: SQLAlchemyError) -> StoreError:
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return StoreError(f"storage={safe_url(url)!r} is not a study storage ({cause}); "
                      "point --storage at a database that dils-search run created")


def missing_study(url: str, name: str) -> StudyNotFound:
    names = [s.study_name for s in list_studies(url)]
    have = ", ".join(names) if names else "none"
    return StudyNotFound(f"study-name={name!r} is not in storage={safe_url(url)!r}; studies there: {have}")


@dataclass(frozen=True)
class StoredTrial:
    """A trial as ``show`` needs it: number, state, first objective value and user attributes."""

    number: int
    state: str  # the name of Optuna's TrialState member, e.g. COMPLETE
    value: float | None
    user_attrs: dict[str, Any]


@dataclass(frozen=True)
class StoredStudy:
    study_name: str
    user_attrs: dict[str, Any]
    trials: list[StoredTrial]
    config_json: str | None = None  # from the lineage store's study table (else the old user attribute)
    final: dict[str, Any] | None = None  # the delivered model (finalize stage), None before finalizing
    directions: tuple[str, ...] = ("MAXIMIZE",)  # Optuna's study directions, by objective


def read_study(url: str, name: str, with_trials: bool = True) -> StoredStudy:
    """A study's attributes and (``with_trials``) its trials in order of number: four queries (or
    Optuna's public API for a schema version ``_optuna_compat`` does not know)."""
    check_reachable(url, must_exist=True)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            got = compat.read_study(url, conn, name, with_trials)
            if got is None:
                raise missing_study(url, name)
            user, trials, directions = got
            rows = [StoredTrial(*t) for t in trials]
            own = _dils_studies(conn, name).get(name)
    except SQLAlchemyError as exc:
        raise _not_a_study_storage(url, exc) from None
    finally:
        engine.dispose()
    config_json = own[0] if own else user.get(CONFIG_ATTR)
    final = json.loads(own[1]) if own and own[1] else user.get(FINAL_ATTR)
    return StoredStudy(name, user, rows, config_json, final or None, directions or ("MAXIMIZE",))


def study_config(url: str, name: str, study: StoredStudy | None = None) -> tuple[StudyConfig, str]:
    """The config and artifact folder a study was created with (read from ``study`` if given)."""
    from ..config import config_from_dict

    study = study or read_study(url, name, with_trials=False)
    if study.config_json is None:
        raise StoreError(f"study-name={name!r} was not created by dils-search (it has no dils-search config)")
    return config_from_dict(json.loads(study.config_json)), str(study.user_attrs.get(ARTIFACTS_ATTR, "dils_artifacts"))
