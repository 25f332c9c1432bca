"""Opening a study storage and listing its studies: Optuna and SQLAlchemy only, no torch, so
``dils-search ls`` starts fast."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ..store import StoreError, check_reachable, safe_url

if TYPE_CHECKING:
    from ..config import StudyConfig

__all__ = ["StudyListing", "count_trials", "list_studies", "open_storage"]


def open_storage(url: str, cfg: StudyConfig | None = None) -> RDBStorage:
    """Optuna's RDB storage with heartbeats, so killed trials are failed and retried."""
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
            return RDBStorage(
                url,
                heartbeat_interval=st.heartbeat_interval if st else 10,
                grace_period=st.grace_period if st else 30,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=st.max_retry if st else 3),
                **kwargs,
            )
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


def count_trials(storage: Any, study_id: int, states: tuple[TrialState, ...] | None = None) -> int:
    """How many trials (in ``states``) a study has: one COUNT query on an RDB storage (Optuna's own
    ``get_n_trials`` loads every trial with its params and attributes, and it runs after each trial)."""
    storage = getattr(storage, "_backend", storage)  # a study's storage is Optuna's cache around the RDB one
    if not isinstance(storage, RDBStorage):
        return int(storage.get_n_trials(study_id, states))
    from optuna.storages._rdb import models

    c = models.TrialModel.__table__.c
    query = select(func.count()).where(c.study_id == study_id)
    if states is not None:
        query = query.where(c.state.in_(states))
    with storage.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def list_studies(url: str) -> list[StudyListing]:
    """Every study with its trial count and start time: three queries on Optuna's tables, without
    Optuna's storage set-up (schema checks, an alembic import) or loading a single trial."""
    check_reachable(url, must_exist=True)  # reading must never create an empty sqlite file
    from optuna.storages._rdb import models

    studies, attrs, trials = (m.__table__.c for m in (models.StudyModel, models.StudyUserAttributeModel,
                                                      models.TrialModel))
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            names = conn.execute(select(studies.study_id, studies.study_name).order_by(studies.study_id)).all()
            user: dict[int, dict[str, Any]] = {}
            for sid, key, value in conn.execute(select(attrs.study_id, attrs.key, attrs.value_json)):
                user.setdefault(sid, {})[key] = json.loads(value)
            query = select(trials.study_id, func.count(), func.min(trials.datetime_start)).group_by(trials.study_id)
            counts = {sid: (int(n), start) for sid, n, start in conn.execute(query)}
    except SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StoreError(f"storage={safe_url(url)!r} is not a study storage ({cause}); "
                         "point --storage at a database that dils-search run created") from None
    finally:
        engine.dispose()
    return [StudyListing(name, *counts.get(sid, (0, None)), user_attrs=user.get(sid, {})) for sid, name in names]
