"""Upgrading the ``dils_`` tables in place, with alembic (installed with Optuna, which versions its own
tables the same way). ``upgrade`` runs when a storage is opened for writing (``LineageStore``); a
storage already at the head costs one query and imports no alembic. A storage written by a newer
dils-search is refused in one line (``schema.NewerSchema``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ..errors import StoreError
from .schema import SCHEMA_HEAD, is_locked, retry_locked, safe_url, schema_version, sqlite_path

__all__ = ["upgrade", "prepare", "MIGRATIONS"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_LOCK = threading.Lock()  # alembic's context is process-global: one upgrade at a time per process


def _current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return schema_version(conn)


def upgrade(engine: Engine, url: str) -> None:
    """Bring the ``dils_`` tables of ``engine`` to ``SCHEMA_HEAD`` (creating them in an empty database).

    Two processes may upgrade at once: PostgreSQL serialises them with an advisory lock; on SQLite the
    loser of a race sees "already exists" (or a lock), waits and finds the storage upgraded. Threads
    of one process take turns."""
    for attempt in range(8):
        if _current(engine) == SCHEMA_HEAD:
            return
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        try:
            with _LOCK, engine.begin() as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, SCHEMA_HEAD)
            return
        except SQLAlchemyError as exc:
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            if attempt < 7 and ("already exists" in first or "duplicate" in first.lower() or is_locked(exc)):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise StoreError(f"storage={safe_url(url)!r}: the dils_ tables cannot be upgraded to schema "
                             f"{SCHEMA_HEAD!r}: {first}") from None


def prepare(engine: Engine, url: str, write: bool) -> None:
    """A storage opened for writing is upgraded in place (``upgrade``); one opened for reading is only
    checked, so a newer dils-search's storage is refused either way (reading never creates a SQLite file)."""
    if write:
        try:
            retry_locked(lambda: upgrade(engine, url))
        except OperationalError as exc:
            raise StoreError(f"storage={safe_url(url)!r} is unreachable: {str(exc.orig).strip().splitlines()[0]}") from None
    elif (path := sqlite_path(url)) is None or path.is_file():
        _current(engine)
