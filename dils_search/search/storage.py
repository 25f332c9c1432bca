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

from ..store import StoreError, check_reachable, safe_url, sqlite_path, sqlite_wal
from ..store.schema import SCHEMA_VERSIONS, schema_version
from . import _optuna_compat as compat
from .attrs import BASE_SPEC, N_TRAIN

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

    from ..config import StudyConfig

__all__ = [
    "ARTIFACTS_ATTR", "CONFIG_ATTR", "FINAL_ATTR", "FINISHED_STATES", "StoredStudy", "StoredTrial", "StudyListing", "StudyNotFound",
    "StudySetup", "list_studies", "open_storage", "read_study", "study_config", "study_setup", "absolute_storage",
    "same_database",
]

FINISHED_STATES = ("COMPLETE", "PRUNED")  # names of Optuna's TrialState members
CONFIG_ATTR = "dils_config"
FINAL_ATTR = "dils_final"  # the delivered model of the finalize stage (search/finalize.py)
ARTIFACTS_ATTR = "dils_artifacts"


class StudyNotFound(StoreError):
    pass


# the lineage store's own study table (store.StudyRow); absent from storages written before it existed
_DILS_STUDIES = table("dils_studies", column("name", String), column("config_json", Text), column("final_json", Text),
                      column("tree_json", Text))
_TREE_JSON_FROM = SCHEMA_VERSIONS.index("0002")  # the revision that added tree_json


def _dils_studies(conn: Any, name: str | None = None) -> dict[str, tuple[str | None, str | None, str | None]]:
    """name -> (config JSON, delivered-model JSON, GrowthTree JSON) from the lineage store's study table
    ({} if absent). A storage of a newer dils-search is refused in one line (``schema.NewerSchema``)."""
    version = schema_version(conn)
    c = _DILS_STUDIES.c
    tree = c.tree_json if version is not None and SCHEMA_VERSIONS.index(version) >= _TREE_JSON_FROM else None
    query = select(c.name, c.config_json, c.final_json, *([tree] if tree is not None else []))
    if name is not None:
        query = query.where(c.name == name)
    try:
        with conn.begin_nested():  # a missing table must not spoil the surrounding transaction (PostgreSQL)
            return {row[0]: (row[1], row[2], row[3] if tree is not None else None) for row in conn.execute(query)}
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
    tree: dict[str, Any] | None = None  # what a GrowthTree study (the Python API) ran on

    @property
    def policy(self) -> str:
        """The study's policy (and its one init method, if it has one), or "?" for a study dils-search did not make."""
        if self.config is None and self.tree is None:
            return "?"
        return _policy_label(self.config, self.tree)


def _policy_label(config: dict[str, Any] | None, tree: dict[str, Any] | None) -> str:
    search = (config or {}).get("search") or (tree or {}).get("space") or {}
    policy = (config or {}).get("search", {}).get("policy") or (tree or {}).get("policy", "optuna")
    inits = search.get("inits", [])
    return str(policy) + (f"/{inits[0]}" if len(inits) == 1 else "")


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

    def tree(name: str) -> dict[str, Any] | None:
        text = rows[name][2] if name in rows else None
        return json.loads(text) if text else None

    return [StudyListing(name, n, start, user_attrs=user_attrs, config=config(name, user_attrs), tree=tree(name))
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
    tree: dict[str, Any] | None = None  # what a GrowthTree study (the Python API) ran on


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
    config_json = own[0] if own and own[0] else user.get(CONFIG_ATTR)
    final = json.loads(own[1]) if own and own[1] else user.get(FINAL_ATTR)
    tree = json.loads(own[2]) if own and own[2] else None
    return StoredStudy(name, user, rows, config_json, final or None, directions or ("MAXIMIZE",), tree)


@dataclass(frozen=True)
class StudySetup:
    """How a study was made, as every reader needs it: a TOML ``config`` (the CLI) or a GrowthTree
    description ``tree`` (the Python API: ``search/plugin_study.py``), and its artifacts folder."""

    name: str
    config: StudyConfig | None
    tree: dict[str, Any] | None
    artifacts: str
    base: dict[str, Any] | None  # the base spec
    n_train: int  # training samples, for the from-scratch compute

    @property
    def policy(self) -> str:
        """The policy's name: ``search.policy``, or "optuna" for a GrowthTree study."""
        return self.config.search.policy if self.config is not None else str((self.tree or {}).get("policy", "optuna"))

    @property
    def label(self) -> str:
        """The policy, with its one init method if it has one (``ls`` and the report's groups)."""
        return _policy_label(self.config.to_dict() if self.config is not None else None, self.tree)

    @property
    def maximize(self) -> bool:
        return self.config is not None or (self.tree or {}).get("direction", "maximize") == "maximize"

    @property
    def epochs(self) -> tuple[int, int]:
        """(epochs of a root node, epochs of each growth step)."""
        if self.config is not None:
            return self.config.train.base_epochs, self.config.train.epochs_per_step
        tree = self.tree or {}
        return int(tree["recipe"]["epochs"]), int(tree["step_epochs"])

    @property
    def final(self) -> dict[str, Any]:
        """The finalize stage's settings: ``top_k`` and ``epochs``."""
        if self.config is not None:
            return {"top_k": self.config.final.top_k, "epochs": self.config.final.epochs}
        return dict((self.tree or {})["final"])


def study_setup(url: str, name: str, study: StoredStudy | None = None) -> StudySetup:
    """The setup of study ``name`` (read from ``study`` if given); a study that neither ``dils-search run``
    nor a ``GrowthTree`` made is refused in one line."""
    from ..config import config_from_dict

    study = study or read_study(url, name, with_trials=False)
    artifacts = str(study.user_attrs.get(ARTIFACTS_ATTR, "dils_artifacts"))
    if study.config_json is not None:
        return StudySetup(name, config_from_dict(json.loads(study.config_json)), None, artifacts,
                          study.user_attrs.get(BASE_SPEC), int(study.user_attrs.get(N_TRAIN, 0)))
    if study.tree is not None:
        return StudySetup(name, None, study.tree, str(study.tree.get("artifacts", artifacts)), study.tree["base"],
                          int(study.tree["n_train"]))
    raise StoreError(f"study-name={name!r} was made neither by dils-search run nor with a GrowthTree in its storage "
                     "(it has no dils-search study row)")


def study_config(url: str, name: str, study: StoredStudy | None = None) -> tuple[StudyConfig, str]:
    """The config and artifact folder of a TOML study (read from ``study`` if given). A GrowthTree study
    is refused in one line: what needs a config (``resume``, ``worker``) cannot run its user's objective."""
    setup = study_setup(url, name, study)
    if setup.config is None:
        raise StoreError(f"study-name={name!r} was made with a GrowthTree in Python, not from a config: continue it "
                         "with your own objective (show, report, export and finalize work on it)")
    return setup.config, setup.artifacts


def absolute_storage(url: str) -> str:
    """``url`` with a relative SQLite file made absolute (other URLs as they are)."""
    db = sqlite_path(url)
    if db is None or db.is_absolute():
        return url
    return make_url(url).set(database=str(db.resolve())).render_as_string(hide_password=False)


def same_database(a: str, b: str) -> bool:
    """Whether two URLs name the same database (SQLite: the same file; else backend, host, port, database)."""
    try:
        ua, ub = make_url(absolute_storage(a)), make_url(absolute_storage(b))
    except Exception:
        return False
    if ua.get_backend_name() == "sqlite" or ub.get_backend_name() == "sqlite":
        pa, pb = sqlite_path(str(ua)), sqlite_path(str(ub))
        return pa is not None and pb is not None and pa.resolve() == pb.resolve()
    return (ua.get_backend_name(), ua.host, ua.port or 5432, ua.database) == (ub.get_backend_name(), ub.host,
                                                                                ub.port or 5432, ub.database)
