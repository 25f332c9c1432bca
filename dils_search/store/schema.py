"""The lineage store's tables (``dils_nodes``, ``dils_studies``, ``dils_trainings``), their schema
version, the records read from them, and the engine: one SQLAlchemy engine per URL, SQLite in WAL
mode, reachability checks that write nothing, and retries while SQLite is locked.

The ``dils_`` tables are versioned with alembic (``store/migrations``, version table
``dils_alembic_version``, beside Optuna's own ``alembic_version``): ``store/migrate.py`` upgrades a
storage in place when it is opened for writing. ``SCHEMA_VERSIONS`` lists the revisions this code
knows, oldest first; readers check the version with one plain query (no alembic import)."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from sqlalchemy import BigInteger, Float, Integer, String, Text, column, create_engine, event, select, table
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..errors import StoreError

if TYPE_CHECKING:  # torch is imported when a model is loaded or saved, so `ls` never pays for it
    from ..core.model import GrowableNet


log = logging.getLogger("dils_search.store")


DEFAULT_URL = "sqlite:///dils_studies.db"


DEFAULT_ARTIFACTS = "dils_artifacts"


_KEY = re.compile(r"^[0-9a-f]{64}$")


T = TypeVar("T")


#: the alembic revisions of the ``dils_`` tables, oldest first (``store/migrations/versions``): "0001" is
#: the schema every storage had before it was versioned, "0002" lets a study row describe a GrowthTree
SCHEMA_VERSIONS = ("0001", "0002")
SCHEMA_HEAD = SCHEMA_VERSIONS[-1]
VERSION_TABLE = "dils_alembic_version"
_VERSION = table(VERSION_TABLE, column("version_num", String))


class NewerSchema(StoreError):
    """The storage's ``dils_`` tables were written by a newer dils-search."""


def schema_version(conn: Any) -> str | None:
    """The ``dils_`` tables' revision (None: not versioned yet, i.e. "0001" or no tables at all); one
    plain query. A revision this code does not know (a newer dils-search wrote it) is refused in one line."""
    try:
        with conn.begin_nested():  # a missing table must not spoil the surrounding transaction (PostgreSQL)
            version = conn.execute(select(_VERSION.c.version_num)).scalar()
    except SQLAlchemyError:
        return None
    if version is not None and version not in SCHEMA_VERSIONS:
        url = safe_url(conn.engine.url.render_as_string(hide_password=False))
        raise NewerSchema(f"storage={url!r} has dils-search store schema {version!r}, newer than this dils-search "
                          f"knows (up to {SCHEMA_HEAD!r}); upgrade dils-search to use it")
    return str(version) if version is not None else None


class Base(DeclarativeBase):
    pass


class NodeRow(Base):
    __tablename__ = "dils_nodes"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent_key: Mapped[str | None] = mapped_column(String(64), index=True)
    depth: Mapped[int] = mapped_column(Integer, default=0)
    spec_json: Mapped[str] = mapped_column(Text)
    step_json: Mapped[str | None] = mapped_column(Text)
    recipe_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    metrics_json: Mapped[str | None] = mapped_column(Text)
    own_flops: Mapped[int] = mapped_column(BigInteger, default=0)
    own_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    artifact_uri: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)


class StudyRow(Base):
    """A study's config (or its GrowthTree's description) and its delivered model, next to the nodes
    (not in Optuna's user attributes, where a 1.5 kB config would fill every row of ``optuna studies``)."""

    __tablename__ = "dils_studies"

    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    config_json: Mapped[str | None] = mapped_column(Text)  # a TOML study's config (CLI), or
    tree_json: Mapped[str | None] = mapped_column(Text)  # what a GrowthTree study ran on (plugin; revision 0002)
    final_json: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float)


class TrainingRow(Base):
    """One row per training attempt: proves (or disproves) that no node was trained twice. ``status``:
    running, then ok, failed, lost-lease (another worker took over and finished first) or abandoned
    (closed by the worker that took over the expired lease of a dead or frozen holder)."""

    __tablename__ = "dils_trainings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    owner: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))


@dataclass(frozen=True)
class NodeRecord:
    key: str
    parent_key: str | None
    depth: int
    spec: dict[str, Any]
    step: dict[str, Any] | None
    recipe: dict[str, Any]
    status: str
    metrics: dict[str, Any]
    own_flops: int
    own_seconds: float
    artifact_uri: str | None
    sha256: str | None

    @staticmethod
    def of(row: NodeRow) -> NodeRecord:
        return NodeRecord(
            key=row.key,
            parent_key=row.parent_key,
            depth=row.depth,
            spec=json.loads(row.spec_json),
            step=json.loads(row.step_json) if row.step_json else None,
            recipe=json.loads(row.recipe_json),
            status=row.status,
            metrics=json.loads(row.metrics_json) if row.metrics_json else {},
            own_flops=int(row.own_flops or 0),
            own_seconds=float(row.own_seconds or 0.0),
            artifact_uri=row.artifact_uri,
            sha256=row.sha256,
        )


@dataclass(frozen=True)
class NodeMeta:
    """What identifies a node before it is trained."""

    key: str
    parent_key: str | None
    depth: int
    spec_json: str
    step_json: str | None
    recipe_json: str


@dataclass
class Trained:
    """What a training function hands back to the store."""

    model: GrowableNet
    metrics: dict[str, Any]
    flops: int
    seconds: float


class _Claim(NamedTuple):
    state: str  # acquired | ready | wait
    record: NodeRecord | None = None  # with ready
    training_id: int | None = None  # with acquired: the dils_trainings row opened with the lease
    holder: str | None = None  # with wait: who holds the lease, and until when
    until: float | None = None


@dataclass
class Fetched:
    record: NodeRecord
    model: GrowableNet
    trained_here: bool


def sqlite_wal(dbapi_conn: Any, _record: Any = None) -> None:
    """Connect hook for every SQLite engine on a study file (the store's and Optuna's): WAL journal
    with NORMAL sync, where a killed process loses nothing (only a power cut can undo the last
    commits) and a commit costs half of a FULL sync's."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_pragmas(dbapi_conn: Any, record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
    sqlite_wal(dbapi_conn, record)


def safe_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide beyond what the user typed
        return re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", url)


def make_engine(url: str) -> Engine:
    """An engine for ``url``: WAL + busy timeout on SQLite, ``pool_pre_ping`` elsewhere."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as exc:  # e.g. postgresql:// picks psycopg2 (or psycopg), not installed
        raise StoreError(f"storage={safe_url(url)!r} needs a database driver that is not installed ({exc}); for "
                         "PostgreSQL: pip install 'dils-search[postgres]' and use postgresql+psycopg2://") from None
    except Exception as exc:  # bad URL syntax
        raise StoreError(f"storage={safe_url(url)!r} is not a usable database URL: {str(exc).splitlines()[0]}") from None
    return engine


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except Exception:  # malformed URL: make_engine reports it
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _in_memory(url: str) -> bool:
    try:
        u = make_url(url)
    except Exception:
        return False
    database = u.database or ""
    return u.get_backend_name() == "sqlite" and (database in ("", ":memory:") or "mode=memory" in url)


def check_reachable(url: str, engine: Engine | None = None, *, must_exist: bool = False) -> None:
    """Refuse, with one line, a database that cannot be used, without writing anything to it.

    A SQLite file is never created here: its folder must exist (and, with ``must_exist``,
    the file too). Other databases are connected to once and left untouched.
    """
    if _in_memory(url):
        raise StoreError(f"storage={safe_url(url)!r} is an in-memory database: its study would vanish with this "
                         "process and workers could not share it; allowed: sqlite:///FILE or a server URL")
    path = sqlite_path(url)
    if path is not None:
        if path.exists() and not path.is_file():
            raise StoreError(f"storage={safe_url(url)!r} names {str(path)!r}, which is not a file")
        if path.exists() and path.stat().st_size > 0:
            # through SQLite itself: a plain open()/close() of the file would drop this process's locks on it
            import sqlite3

            try:
                uri = f"{path.resolve().as_uri()}?mode=ro"
                with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
                    conn.execute("PRAGMA schema_version").fetchone()
            except sqlite3.DatabaseError as exc:
                if "not a database" in str(exc) or "malformed" in str(exc):
                    raise StoreError(f"storage={safe_url(url)!r} names {str(path)!r}, which is not a SQLite "
                                     f"database ({exc})") from None
        if must_exist and not path.exists():
            raise StoreError(f"storage={safe_url(url)!r} does not exist (no file {str(path)!r}); nothing to read there")
        if not path.parent.is_dir():
            raise StoreError(f"storage={safe_url(url)!r} is in a folder that does not exist: {str(path.parent)!r}")
        return
    own = engine is None
    engine = engine or make_engine(url)
    try:
        retry_locked(lambda: engine.connect().close())
    except Exception as exc:  # DBAPI errors: refused connection, bad password, unknown database, ...
        orig = getattr(exc, "orig", None) or exc
        first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        raise StoreError(f"storage={safe_url(url)!r} is unreachable: {first}") from None
    finally:
        if own:
            engine.dispose()


def is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text or "deadlock" in text


def retry_locked(fn: Callable[[], T], attempts: int = 12, base: float = 0.05) -> T:
    """Run ``fn``, retrying with jittered exponential backoff while SQLite reports a lock."""
    for i in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if not is_locked(exc) or i == attempts - 1:
                raise
            time.sleep(base * (2**i) * (0.5 + random.random()))
    raise AssertionError("unreachable")
