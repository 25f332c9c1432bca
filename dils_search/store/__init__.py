"""The lineage store: the ``dils_`` tables next to Optuna's (``schema``) and the nodes' checkpoint
files, written and leased by :class:`LineageStore` (``lineage``)."""

from __future__ import annotations

from ..errors import StoreError
from .lineage import LineageStore, default_owner
from .schema import (
    DEFAULT_ARTIFACTS,
    DEFAULT_URL,
    Fetched,
    NodeMeta,
    NodeRecord,
    NodeRow,
    StudyRow,
    Trained,
    TrainingRow,
    check_reachable,
    make_engine,
    retry_locked,
    safe_url,
    sqlite_path,
    sqlite_wal,
)

__all__ = [
    "DEFAULT_ARTIFACTS", "DEFAULT_URL", "Fetched", "LineageStore", "NodeMeta", "NodeRecord", "NodeRow", "StoreError",
    "StudyRow", "Trained", "TrainingRow", "check_reachable", "default_owner", "make_engine", "retry_locked",
    "safe_url", "sqlite_path", "sqlite_wal",
]
