"""Opening a study storage and reading it without torch, so ``dils-search ls`` and ``show`` start
fast. The readers query Optuna's tables with plain SQL and do not even import Optuna (0.3 s):
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

from sqlalchemy import DateTime, Float, Integer, String, Text, column, create_engine, event, func, select, table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ..store import StoreError, check_reachable, safe_url, sqlite_wal

if TYPE_CHECKING:
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    from ..config import StudyConfig

__all__ = [
    "ARTIFACTS_ATTR", "CONFIG_ATTR", "FINAL_ATTR", "FINISHED_STATES", "StoredStudy", "StoredTrial", "StudyListing", "StudyNotFound",
    "count_trials", "list_studies", "open_storage", "read_study", "study_config",
]

FINISHED_STATES = ("COMPLETE", "PRUNED")  # names of Optuna's TrialState members
CONFIG_ATTR = "dils_config"
FINAL_ATTR = "dils_final"  # the delivered model of the finalize stage (search/finalize.py)
ARTIFACTS_ATTR = "dils_artifacts"


class StudyNotFound(StoreError):
    pass


# The Optuna tables (schema v3 and later) that ``ls`` and ``show`` read. Enums are stored by name.
_STUDIES = table("studies", column("study_id", Integer), column("study_name", String))
_STUDY_ATTRS = table("study_user_attributes", column("study_id", Integer), column("key", String),
                     column("value_json", Text))
_TRIALS = table("trials", column("trial_id", Integer), column("number", Integer), column("study_id", Integer),
                column("state", String), column("datetime_start", DateTime))
_VALUES = table("trial_values", column("trial_id", Integer), column("objective", Integer), column("value", Float),
                column("value_type", String))
_DIRECTIONS = table("study_directions", column("study_id", Integer), column("direction", String),
                    column("objective", Integer))
_TRIAL_ATTRS = table("trial_user_attributes", column("trial_id", Integer), column("key", String),
                     column("value_json", Text))
_INFINITE = {"INF_POS": float("inf"), "INF_NEG": float("-inf")}  # value is NULL for these value types
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
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

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
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=st.max_retry if st else 3),
                **kwargs,
            )
            if url.startswith("sqlite"):
                event.listen(storage.engine, "connect", sqlite_wal)
                storage.engine.dispose()  # pooled connections reopen with it
            return storage
        except (SQLAlchemyError, ValueError, ImportError, ModuleNotFoundError) as exc:
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


def count_trials(storage: Any, study_id: int, states: tuple[TrialState, ...] | None = None) -> int:
    """How many trials (in ``states``) a study has: one COUNT query on an RDB storage (Optuna's own
    ``get_n_trials`` loads every trial with its params and attributes, and it runs after each trial)."""
    from optuna.storages import RDBStorage

    storage = getattr(storage, "_backend", storage)  # a study's storage is Optuna's cache around the RDB one
    if not isinstance(storage, RDBStorage):
        return int(storage.get_n_trials(study_id, states))
    c = _TRIALS.c
    query = select(func.count()).where(c.study_id == study_id)
    if states is not None:
        query = query.where(c.state.in_([s.name for s in states]))
    with storage.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def list_studies(url: str) -> list[StudyListing]:
    """Every study with its trial count and start time: three queries on Optuna's tables, without
    Optuna's storage set-up (schema checks, an alembic import) or loading a single trial."""
    check_reachable(url, must_exist=True)  # reading must never create an empty sqlite file
    studies, attrs, trials = _STUDIES.c, _STUDY_ATTRS.c, _TRIALS.c
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            names = conn.execute(select(studies.study_id, studies.study_name).order_by(studies.study_id)).all()
            user: dict[int, dict[str, Any]] = {}
            for sid, key, value in conn.execute(select(attrs.study_id, attrs.key, attrs.value_json)):
                user.setdefault(sid, {})[key] = json.loads(value)
            query = select(trials.study_id, func.count(), func.min(trials.datetime_start)).group_by(trials.study_id)
            counts = {sid: (int(n), start) for sid, n, start in conn.execute(query)}
            rows = _dils_studies(conn)
    except SQLAlchemyError as exc:
        raise _not_a_study_storage(url, exc) from None
    finally:
        engine.dispose()

    def config(name: str, attrs: dict[str, Any]) -> dict[str, Any] | None:
        text = rows[name][0] if name in rows else attrs.get(CONFIG_ATTR)
        return json.loads(text) if text else None

    return [StudyListing(name, *counts.get(sid, (0, None)), user_attrs=user.get(sid, {}),
                         config=config(name, user.get(sid, {}))) for sid, name in names]


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
    """A study's attributes and (``with_trials``) its trials in order of number: four queries."""
    check_reachable(url, must_exist=True)
    studies, study_attrs, trials, values, attrs = _STUDIES.c, _STUDY_ATTRS.c, _TRIALS.c, _VALUES.c, _TRIAL_ATTRS.c
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            study_id = conn.execute(select(studies.study_id).where(studies.study_name == name)).scalar()
            if study_id is None:
                raise missing_study(url, name)
            user = {k: json.loads(v) for k, v in conn.execute(
                select(study_attrs.key, study_attrs.value_json).where(study_attrs.study_id == study_id))}
            rows: list[StoredTrial] = []
            if with_trials:
                in_study = select(trials.trial_id).where(trials.study_id == study_id).scalar_subquery()
                trial_attrs: dict[int, dict[str, Any]] = {}
                for tid, key, value in conn.execute(
                        select(attrs.trial_id, attrs.key, attrs.value_json).where(attrs.trial_id.in_(in_study))):
                    trial_attrs.setdefault(tid, {})[key] = json.loads(value)
                first = {tid: _INFINITE.get(kind, v) for tid, v, kind in conn.execute(
                    select(values.trial_id, values.value, values.value_type)
                    .where(values.trial_id.in_(in_study), values.objective == 0))}
                query = select(trials.trial_id, trials.number, trials.state).where(trials.study_id == study_id)
                rows = [StoredTrial(number, state, first.get(tid), trial_attrs.get(tid, {}))
                        for tid, number, state in conn.execute(query.order_by(trials.number))]
            own = _dils_studies(conn, name).get(name)
            d = _DIRECTIONS.c
            directions = tuple(str(row[0]) for row in conn.execute(
                select(d.direction).where(d.study_id == study_id).order_by(d.objective)))
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
