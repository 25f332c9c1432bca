"""Opening a study storage and listing its studies: Optuna and SQLAlchemy only, no torch, so
``dils-search ls`` starts fast."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ..store import StoreError, check_reachable, safe_url

if TYPE_CHECKING:
    from ..config import StudyConfig

__all__ = ["StudyListing", "count_trials", "list_studies", "open_storage"]


def open_storage(url: str, cfg: StudyConfig | None = None, read_only: bool = False) -> RDBStorage:
    """Optuna's RDB storage with heartbeats, so killed trials are failed and retried. ``read_only``
    (``ls``) skips creating tables and Optuna's schema-version check (an alembic import)."""
    st = cfg.storage if cfg is not None else None
    kwargs: dict[str, Any] = {"skip_table_creation": True, "skip_compatibility_check": True} if read_only else {}
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
        except StorageInternalError as exc:  # read-only open of a database without Optuna's tables
            cause = str(getattr(exc.__cause__, "orig", None) or exc.__cause__ or exc).strip().splitlines()[0]
            raise StoreError(f"storage={safe_url(url)!r} is not a study storage ({cause}); "
                             "point --storage at a database that dils-search run created") from None
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
    """Every study with its trial count and start time, without loading a single trial."""
    check_reachable(url, must_exist=True)  # reading must never create an empty sqlite file
    storage = open_storage(url, read_only=True)
    from optuna.storages._rdb import models

    c = models.TrialModel.__table__.c
    query = select(c.study_id, func.count(), func.min(c.datetime_start)).group_by(c.study_id)
    with storage.engine.connect() as conn:
        counts = {sid: (int(n), start) for sid, n, start in conn.execute(query)}
    return [StudyListing(s.study_name, *counts.get(s._study_id, (0, None)), user_attrs=s.user_attrs)
            for s in storage.get_all_studies()]
