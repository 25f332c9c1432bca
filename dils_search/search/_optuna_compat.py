"""The one boundary to Optuna's and Ray's internals: every private attribute, and every read or write
of Optuna's tables with plain SQL, lives here and nowhere else.

Plain SQL on Optuna's tables is only used when the storage's schema version (the ``alembic_version``
table Optuna keeps) is one this module knows (``KNOWN_SCHEMA_VERSIONS``: the alembic heads that
Optuna 4.2 to 5.x ship). A storage with another version is read through Optuna's public API
instead (``optuna.load_study``, ``get_all_study_summaries``), and where the installed Optuna cannot
open it either, refused with one line that names the version found and the known ones.

Importing this module imports neither Optuna nor torch (``ls`` and ``show`` start fast).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Float, Integer, String, Text, column, func, insert, select, table, update
from sqlalchemy.exc import SQLAlchemyError

from ..store import StoreError, safe_url

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

__all__ = [
    "KNOWN_SCHEMA_VERSIONS", "UnknownSchema", "schema_version", "fast_path", "rdb_storage", "study_id_of",
    "list_studies", "read_study", "count_trials", "budget_counts", "write_trial_user_attrs", "running_without_heartbeat", "update_finished_error", "trial_was_finished_elsewhere",
    "stale_retry_kwargs", "stale_trial_callback", "ray_config",
]

# Optuna's alembic heads, newest last: 4.2 .. 5.0 all ship "v3.2.0.a" (optuna/storages/_rdb/alembic/versions)
KNOWN_SCHEMA_VERSIONS = ("v3.2.0.a",)

# The Optuna tables (schema v3.2) that ``ls``, ``show`` and the study loop read. Enums are stored by name.
STUDIES = table("studies", column("study_id", Integer), column("study_name", String))
STUDY_ATTRS = table("study_user_attributes", column("study_id", Integer), column("key", String),
                    column("value_json", Text))
TRIALS = table("trials", column("trial_id", Integer), column("number", Integer), column("study_id", Integer),
               column("state", String), column("datetime_start", DateTime))
VALUES = table("trial_values", column("trial_id", Integer), column("objective", Integer), column("value", Float),
               column("value_type", String))
DIRECTIONS = table("study_directions", column("study_id", Integer), column("direction", String),
                   column("objective", Integer))
TRIAL_ATTRS = table("trial_user_attributes", column("trial_user_attribute_id", Integer), column("trial_id", Integer),
                    column("key", String), column("value_json", Text))
HEARTBEATS = table("trial_heartbeats", column("trial_id", Integer), column("heartbeat", DateTime))
ALEMBIC = table("alembic_version", column("version_num", String))
INFINITE = {"INF_POS": float("inf"), "INF_NEG": float("-inf")}  # value is NULL for these value types


class UnknownSchema(StoreError):
    """The storage's Optuna schema is not one this version of dils-search knows, and the installed
    Optuna cannot read it either."""


def schema_version(conn: Any) -> str | None:
    """``alembic_version.version_num`` (None if the table is missing or empty)."""
    try:
        with conn.begin_nested():  # a missing table must not spoil the surrounding transaction (PostgreSQL)
            return conn.execute(select(ALEMBIC.c.version_num)).scalar()
    except SQLAlchemyError:
        return None


def fast_path(conn: Any) -> bool:
    """Whether plain SQL may read this storage: its schema version is a known one. A storage with no
    ``alembic_version`` table is no Optuna storage; the readers then fail on the missing tables."""
    version = schema_version(conn)
    return version is None or version in KNOWN_SCHEMA_VERSIONS


def unknown_schema(url: str, found: str | None, exc: BaseException) -> UnknownSchema:
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UnknownSchema(
        f"storage={safe_url(url)!r} has Optuna schema version {found!r}, which this dils-search does not know "
        f"(known: {', '.join(KNOWN_SCHEMA_VERSIONS)}) and the installed Optuna cannot read ({cause}); "
        "install the Optuna that wrote it, or upgrade dils-search")


# ---------------------------------------------------------------- reading a storage (``ls``, ``show``)

TrialRow = tuple[int, str, float | None, dict[str, Any]]  # number, state name, first value, user attributes
StudyRead = tuple[dict[str, Any], list[TrialRow], tuple[str, ...]]  # user attributes, trials, direction names


def list_studies(url: str, conn: Any) -> list[tuple[str, int, datetime | None, dict[str, Any]]]:
    """(name, trials, first start, user attributes) of every study in study order: three queries,
    or Optuna's public API for a schema version this module does not know."""
    if not fast_path(conn):
        return list_studies_public(url, conn)
    studies, attrs, trials = STUDIES.c, STUDY_ATTRS.c, TRIALS.c
    names = conn.execute(select(studies.study_id, studies.study_name).order_by(studies.study_id)).all()
    user: dict[int, dict[str, Any]] = {}
    for sid, key, value in conn.execute(select(attrs.study_id, attrs.key, attrs.value_json)):
        user.setdefault(sid, {})[key] = json.loads(value)
    query = select(trials.study_id, func.count(), func.min(trials.datetime_start)).group_by(trials.study_id)
    counts = {sid: (int(n), start) for sid, n, start in conn.execute(query)}
    return [(name, *counts.get(sid, (0, None)), user.get(sid, {})) for sid, name in names]


def read_study(url: str, conn: Any, name: str, with_trials: bool) -> StudyRead | None:
    """A study's user attributes, (``with_trials``) trials in order of number and directions; None
    if there is no such study. Four queries, or Optuna's public API for an unknown schema version."""
    if not fast_path(conn):
        return read_study_public(url, conn, name, with_trials)
    return _read_tables(conn, name, with_trials)


def _read_tables(conn: Any, name: str, with_trials: bool) -> StudyRead | None:
    """Plain SQL on Optuna's tables (a known schema version): attributes, trials, directions."""
    studies, study_attrs, trials, values, attrs = STUDIES.c, STUDY_ATTRS.c, TRIALS.c, VALUES.c, TRIAL_ATTRS.c
    study_id = conn.execute(select(studies.study_id).where(studies.study_name == name)).scalar()
    if study_id is None:
        return None
    user = {k: json.loads(v) for k, v in conn.execute(
        select(study_attrs.key, study_attrs.value_json).where(study_attrs.study_id == study_id))}
    rows: list[TrialRow] = []
    if with_trials:
        in_study = select(trials.trial_id).where(trials.study_id == study_id).scalar_subquery()
        trial_attrs: dict[int, dict[str, Any]] = {}
        for tid, key, value in conn.execute(
                select(attrs.trial_id, attrs.key, attrs.value_json).where(attrs.trial_id.in_(in_study))):
            trial_attrs.setdefault(tid, {})[key] = json.loads(value)
        first = {tid: INFINITE.get(kind, v) for tid, v, kind in conn.execute(
            select(values.trial_id, values.value, values.value_type)
            .where(values.trial_id.in_(in_study), values.objective == 0))}
        query = select(trials.trial_id, trials.number, trials.state).where(trials.study_id == study_id)
        rows = [(number, state, first.get(tid), trial_attrs.get(tid, {}))
                for tid, number, state in conn.execute(query.order_by(trials.number))]
    d = DIRECTIONS.c
    directions = tuple(str(row[0]) for row in conn.execute(
        select(d.direction).where(d.study_id == study_id).order_by(d.objective)))
    return user, rows, directions


# ---------------------------------------------------------------- the public-API fallback readers


def _public_storage(url: str, conn: Any) -> Any:
    import optuna

    found = schema_version(conn)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # Optuna refuses the schema (RuntimeError) or alembic cannot place it
        raise unknown_schema(url, found, exc) from None


def list_studies_public(url: str, conn: Any) -> list[tuple[str, int, datetime | None, dict[str, Any]]]:
    """(name, trials, first start, user attributes) of every study, through Optuna's public API."""
    import optuna

    storage = _public_storage(url, conn)
    try:
        out = []
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
            trials = optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
            out.append((s.study_name, len(trials), s.datetime_start, dict(s.user_attrs)))
        return out
    finally:
        storage.engine.dispose()


def read_study_public(url: str, conn: Any, name: str, with_trials: bool) -> StudyRead | None:
    """A study's user attributes, trials (number, state name, first value, user attributes) and
    direction names through Optuna's public API; None if it has no such study."""
    import optuna

    storage = _public_storage(url, conn)
    try:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return None
        trials = [(t.number, t.state.name, t.values[0] if t.values else None, dict(t.user_attrs))
                  for t in study.get_trials(deepcopy=False)] if with_trials else []
        return dict(study.user_attrs), trials, tuple(d.name for d in study.directions)
    finally:
        storage.engine.dispose()


# ---------------------------------------------------------------- a live study's storage


def rdb_storage(storage_or_study: Any) -> RDBStorage | None:
    """The RDB storage under a study (or under Optuna's cache around it); None for other storages."""
    from optuna.storages import RDBStorage

    storage = getattr(storage_or_study, "_storage", storage_or_study)  # a Study keeps its storage here
    storage = getattr(storage, "_backend", storage)  # Optuna wraps RDBStorage in a cache
    return storage if isinstance(storage, RDBStorage) else None


def study_id_of(study: optuna.Study) -> int:
    sid = getattr(study, "_study_id", None)
    if isinstance(sid, int):
        return sid
    return int(study._storage.get_study_id_from_name(study.study_name))  # pragma: no cover


_known: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()  # engine -> schema known (checked once)


def _rdb_fast(storage: RDBStorage) -> bool:
    engine = storage.engine
    if engine not in _known:
        with engine.connect() as conn:
            _known[engine] = schema_version(conn) in KNOWN_SCHEMA_VERSIONS
    return _known[engine]


def count_trials(study: optuna.Study, states: Iterable[TrialState] | None = None) -> int:
    """How many trials (in ``states``) a study has: one COUNT query on an RDB storage of a known
    schema (Optuna's own ``get_n_trials`` loads every trial with its params and attributes)."""
    rdb = rdb_storage(study)
    if rdb is None or not _rdb_fast(rdb):
        return len(study.get_trials(deepcopy=False, states=tuple(states) if states is not None else None))
    c = TRIALS.c
    query = select(func.count()).where(c.study_id == study_id_of(study))
    if states is not None:
        query = query.where(c.state.in_([s.name for s in states]))
    with rdb.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def budget_counts(study: optuna.Study, finished: Iterable[TrialState], reason_key: str) -> tuple[int, int]:
    """(finished trials, FAIL trials that carry ``reason_key``): two COUNT queries on an RDB storage
    of a known schema, else one ``get_trials`` (what the budget callback asks after each trial)."""
    from optuna.trial import TrialState

    finished = tuple(finished)
    rdb = rdb_storage(study)
    if rdb is None or not _rdb_fast(rdb):
        trials = study.get_trials(deepcopy=False, states=(*finished, TrialState.FAIL))
        return (sum(t.state in finished for t in trials),
                sum(t.state == TrialState.FAIL and reason_key in t.user_attrs for t in trials))
    t, a = TRIALS.c, TRIAL_ATTRS.c
    sid = study_id_of(study)
    with rdb.engine.connect() as conn:
        n_finished = conn.execute(select(func.count()).where(
            t.study_id == sid, t.state.in_([s.name for s in finished]))).scalar_one()
        n_failed = conn.execute(select(func.count()).select_from(TRIALS.join(TRIAL_ATTRS, a.trial_id == t.trial_id))
                                .where(t.study_id == sid, t.state == "FAIL", a.key == reason_key)).scalar_one()
    return int(n_finished), int(n_failed)


def write_trial_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """``trial.set_user_attr`` for every item, in one transaction on an RDB storage of a known schema
    (Optuna commits each call on its own: a dozen commits per trial); else one public call per item."""
    rdb = rdb_storage(trial.study)
    trial_id = getattr(trial, "_trial_id", None)
    if rdb is None or not isinstance(trial_id, int) or not _rdb_fast(rdb):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    c = TRIAL_ATTRS.c
    rows = {key: json.dumps(value) for key, value in attrs.items()}
    with rdb.engine.begin() as conn:
        state = conn.execute(select(TRIALS.c.state).where(TRIALS.c.trial_id == trial_id)).scalar()
        if state != "RUNNING":
            raise update_finished_error()(f"trial {trial.number} is {state}, not RUNNING")
        have = set(conn.execute(select(c.key).where(c.trial_id == trial_id, c.key.in_(list(rows)))).scalars())
        for key in have:
            conn.execute(update(TRIAL_ATTRS).where(c.trial_id == trial_id, c.key == key).values(value_json=rows[key]))
        new = [{"trial_id": trial_id, "key": k, "value_json": v} for k, v in rows.items() if k not in have]
        if new:
            conn.execute(insert(TRIAL_ATTRS), new)
    cached = getattr(trial, "_cached_frozen_trial", None)  # what trial.user_attrs returns
    if cached is not None:
        cached.user_attrs.update(attrs)


def running_without_heartbeat(storage: RDBStorage, study: optuna.Study, cutoff: datetime) -> list[int]:
    """Trial ids of ``study``'s RUNNING trials that started before ``cutoff`` and never beat."""
    t, b = TRIALS.c, HEARTBEATS.c
    with storage.engine.connect() as conn:
        if schema_version(conn) not in KNOWN_SCHEMA_VERSIONS:
            return []  # Optuna's own stale check still runs; only this extra one is skipped
        return [row[0] for row in conn.execute(
            select(t.trial_id).where(
                t.study_id == study_id_of(study), t.state == "RUNNING", t.datetime_start < cutoff,
                ~t.trial_id.in_(select(b.trial_id)),
            ))]


def update_finished_error() -> type[Exception]:
    """What Optuna raises on a write to a finished trial: ``UpdateFinishedTrialError`` (a RuntimeError)
    in Optuna 5, a plain RuntimeError before."""
    import optuna

    return getattr(optuna.exceptions, "UpdateFinishedTrialError", RuntimeError)


def trial_was_finished_elsewhere(study: optuna.Study, number: int | None) -> bool:
    """Whether trial ``number``, which this worker is running, is FAIL in the storage: another worker
    failed it as stale (its heartbeat was late), so Optuna refuses this worker's writes and tell."""
    from optuna.trial import TrialState

    if number is None:
        return False
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return trial is not None and trial.state == TrialState.FAIL


def stale_retry_kwargs(max_retry: int) -> dict[str, Any]:
    """``RDBStorage`` arguments that queue a heartbeat-stale trial again (up to ``max_retry`` times).
    Optuna 4.9 renamed both the callback (``RetryFailedTrialCallback`` ->
    ``RetryHeartbeatStaleTrialCallback``) and the argument (``failed_trial_callback`` ->
    ``heartbeat_stale_trial_callback``); the old names are deprecated and go in Optuna 6."""
    import inspect

    from optuna import storages

    new = getattr(storages, "RetryHeartbeatStaleTrialCallback", None)
    if new is not None and "heartbeat_stale_trial_callback" in inspect.signature(storages.RDBStorage).parameters:
        return {"heartbeat_stale_trial_callback": new(max_retry=max_retry)}
    return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=max_retry)}


def stale_trial_callback(storage: RDBStorage) -> Any:
    """The storage's callback for a stale trial (see ``stale_retry_kwargs``), or None."""
    get = getattr(storage, "get_heartbeat_stale_trial_callback", None) or storage.get_failed_trial_callback
    return get()


# ---------------------------------------------------------------- Ray


def ray_config() -> Any:
    """Ray's internal config object (``ray._raylet.Config``), to refresh the auth mode it read at import."""
    from ray._raylet import Config  # type: ignore[attr-defined]

    return Config
