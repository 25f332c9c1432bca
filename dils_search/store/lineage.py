"""The lineage store: one row per trained node plus content-checked checkpoint files.

Only this module touches checkpoint files. A node becomes ``ready`` only after its file is
fsynced and renamed into place; a file whose sha256 does not match is treated as missing.
A lease makes sure two workers never train the same node at once."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import RuntimeFailure, StoreError

if TYPE_CHECKING:  # torch is imported when a model is loaded or saved, so `ls` never pays for it
    from ..core.model import GrowableNet
from .leases import WaitNotes, check_seconds, default_owner, holder_is_dead
from .migrate import prepare
from .schema import (
    _KEY,
    DEFAULT_ARTIFACTS,
    DEFAULT_URL,
    Fetched,
    NodeMeta,
    NodeRecord,
    NodeRow,
    StudyRow,
    T,
    Trained,
    TrainingRow,
    _Claim,
    check_reachable,
    log,
    make_engine,
    retry_locked,
)

__all__ = ["LineageStore", "default_owner"]


class LineageStore:
    """Nodes in ``dils_`` tables next to the Optuna tables, checkpoints under ``artifacts``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        artifacts: str | os.PathLike[str] = DEFAULT_ARTIFACTS,
        *,
        lease_seconds: float = 60.0,
        poll_seconds: float = 0.5,
        owner: str | None = None,
        create: bool = True,
    ) -> None:
        self.url = url
        self.root = Path(artifacts).resolve()
        self.lease_seconds = check_seconds("lease_seconds", lease_seconds)
        self.poll_seconds = check_seconds("poll_seconds", poll_seconds, at_most=3600.0)
        self.owner = owner or default_owner()
        self.engine = make_engine(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            # Check both places before writing to either, so that a refused store leaves no trace.
            check_reachable(url, self.engine)
            self._check_artifacts()
        prepare(self.engine, url, create)  # the dils_ tables: created or upgraded in place, else only checked

    # ------------------------------------------------------------------ plumbing
    def _check_artifacts(self) -> None:
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StoreError(f"artifacts={str(self.root)!r} is not a writable folder: {str(existing)!r} is not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"artifacts={str(self.root)!r} is not a writable folder: {exc.strerror or exc}") from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error."""
        with self._session() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def _tx(self, fn: Callable[[Session], T]) -> T:
        def run() -> T:
            with self.session() as s:
                return fn(s)

        return retry_locked(run)

    def artifact_path(self, key: str) -> Path:
        """``<root>/<key>.pt``; refuses anything that is not a sha256 hex key. Never resolved: a
        link placed there is read as damage (``_read``) and replaced by the rename that writes it."""
        if not isinstance(key, str) or not _KEY.match(key):
            raise StoreError(f"node key={key!r} is not a sha256 hex digest")
        return self.root / f"{key}.pt"

    @staticmethod
    def _read(path: Path) -> bytes:
        """The bytes of a regular file at ``path`` itself: a symbolic link or a non-file raises OSError."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path} is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return fh.read()
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ queries
    def get(self, key: str) -> NodeRecord | None:
        row = self._tx(lambda s: s.get(NodeRow, key))
        return NodeRecord.of(row) if row else None

    def is_ready(self, key: str) -> bool:
        """Whether node ``key`` is stored and ready (loading it trains nothing, unless its file is damaged)."""
        return (record := self.get(key)) is not None and record.status == "ready"

    def nodes(self, keys: list[str] | None = None) -> list[NodeRecord]:
        def q(s: Session) -> list[NodeRow]:
            stmt = select(NodeRow)
            if keys is not None:
                stmt = stmt.where(NodeRow.key.in_(keys))
            return list(s.scalars(stmt))

        if keys is not None and len(keys) > 500:
            out: list[NodeRecord] = []
            for i in range(0, len(keys), 500):
                out.extend(self.nodes(keys[i : i + 500]))
            return out
        return [NodeRecord.of(r) for r in self._tx(q)]

    def training_counts(self, status: str = "ok") -> dict[str, int]:
        """How many finished trainings each node had (more than 1 means a node was trained twice)."""
        rows = self._tx(lambda s: list(s.execute(select(TrainingRow.key).where(TrainingRow.status == status))))
        counts: dict[str, int] = {}
        for (key,) in rows:
            counts[key] = counts.get(key, 0) + 1
        return counts

    # ------------------------------------------------------------------ studies
    def put_study(self, name: str, config_json: str | None = None, final: dict[str, Any] | None = None,
                  tree: dict[str, Any] | None = None) -> None:
        """Record (or update) study ``name``'s config (a TOML study) or ``tree`` (what a GrowthTree study
        ran on), and/or its delivered model."""

        def fn(s: Session) -> None:
            row = s.get(StudyRow, name)
            if row is None:
                if config_json is None and tree is None:
                    raise StoreError(f"study-name={name!r} has no study row to attach a delivered model to")
                row = StudyRow(name=name, config_json=None, tree_json=None, final_json=None, updated_at=time.time())
                s.add(row)
            if config_json is not None:
                row.config_json = config_json
            if tree is not None:
                row.tree_json = json.dumps(tree, sort_keys=True)
            if final is not None:
                row.final_json = json.dumps(final, sort_keys=True)
            row.updated_at = time.time()

        try:
            self._tx(fn)
        except IntegrityError:  # another process added the row first: update it
            self._tx(fn)

    def save_blob(self, key: str, data: bytes) -> str:
        """Write ``data`` as the artifact ``key`` (a sha256 hex key; atomically, fsynced); its sha256."""
        self._rename_into_place(key, self._write_temp(key, data))
        return hashlib.sha256(data).hexdigest()

    def load_blob(self, key: str, sha256: str) -> bytes | None:
        """The artifact ``key`` if it is a regular file whose sha256 is ``sha256``, else None."""
        try:
            data = self._read(self.artifact_path(key))
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha256 else None

    # ------------------------------------------------------------------ files
    def _write_temp(self, key: str, data: bytes) -> Path:
        """``data`` fsynced into a new ``.<key>.pt.<id>.tmp`` (created exclusively, never through a link),
        which no reader ever looks at; ``_publish`` renames it into place."""
        path = self.artifact_path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._save_failed(key, exc) from None
        return tmp

    def _save_failed(self, key: str, exc: OSError) -> RuntimeFailure:
        """A checkpoint that cannot be saved (disk full, a folder in its place): a failure at run time."""
        return RuntimeFailure(f"could not save node {key[:12]} under artifacts={str(self.root)!r}: {exc.strerror or exc}")

    def _rename_into_place(self, key: str, tmp: Path) -> None:
        try:
            os.replace(tmp, self.artifact_path(key))
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise self._save_failed(key, exc) from None

    def load_model(self, record: NodeRecord) -> GrowableNet | None:
        """The node's model, or None (with a warning) if its file is missing or fails the sha256 check."""
        checked = self.load_checked(record)
        return None if checked is None else checked[0]

    def load_checked(self, record: NodeRecord) -> tuple[GrowableNet, bytes] | None:
        """The node's model and the bytes it was read from: a regular file (never read through a link)
        that matches the row's sha256 and holds the row's spec. None, with a warning, otherwise."""
        path = self.artifact_path(record.key)
        try:
            data = self._read(path)
        except OSError as exc:
            why = "is a symbolic link" if path.is_symlink() else "is missing or not a file"
            log.warning("node %s: checkpoint %s %s (%s); it will be retrained", record.key[:12], path, why,
                        exc.strerror or exc)
            return None
        if hashlib.sha256(data).hexdigest() != record.sha256:
            log.warning("node %s: checkpoint %s fails its sha256 check; it will be retrained", record.key[:12], path)
            return None
        from ..core.checkpoint import CheckpointError, from_bytes
        from ..core.spec import spec_from_dict

        try:
            model = from_bytes(data, source=str(path))
            if model.spec.to_json() != spec_from_dict(record.spec).to_json():
                raise CheckpointError(f"checkpoint {path} holds hidden={list(model.spec.hidden)}, not the node's "
                                      f"spec (hidden={record.spec.get('hidden')})")
        except (CheckpointError, ValueError) as exc:
            log.warning("node %s: %s; it will be retrained", record.key[:12], exc)
            return None
        return model, data

    # ------------------------------------------------------------------ leases
    def _claim(self, meta: NodeMeta, force_from_ready: bool = False) -> _Claim:
        """Try to take the lease, in one transaction: 'acquired' (with the training-log row it
        opened), 'ready' (with the node's record) or 'wait'."""
        now = time.time()
        until = now + self.lease_seconds

        def log_training(s: Session) -> _Claim:
            row = TrainingRow(key=meta.key, owner=self.owner, started_at=now, status="running")
            s.add(row)
            s.flush()
            return _Claim("acquired", training_id=int(row.id))

        def fn(s: Session) -> _Claim:
            row = s.get(NodeRow, meta.key)
            if row is None:
                s.add(
                    NodeRow(
                        key=meta.key, parent_key=meta.parent_key, depth=meta.depth, spec_json=meta.spec_json,
                        step_json=meta.step_json, recipe_json=meta.recipe_json, status="training",
                        created_at=now, updated_at=now, lease_owner=self.owner, lease_until=until, attempts=1,
                    )
                )
                s.flush()
                return log_training(s)
            if row.status == "ready" and not force_from_ready:
                return _Claim("ready", record=NodeRecord.of(row))
            live = row.status == "training" and (row.lease_until or 0) > now and row.lease_owner != self.owner
            if live and not holder_is_dead(row.lease_owner):  # (a holder gone from this machine is not waited for)
                return _Claim("wait", holder=row.lease_owner, until=row.lease_until)
            # compare-and-set on everything that changes hands, so that two workers that both saw an
            # expired lease cannot both take it, and a renewal in between makes the takeover fail
            expired_holder = row.lease_owner if row.status == "training" else None  # (the update refreshes row)
            was_ready = row.status == "ready"
            res = s.execute(
                update(NodeRow)
                .where(NodeRow.key == meta.key, NodeRow.status == row.status, NodeRow.updated_at == row.updated_at,
                       NodeRow.lease_owner == row.lease_owner, NodeRow.lease_until == row.lease_until)
                .values(status="training", lease_owner=self.owner, lease_until=until, updated_at=now,
                        attempts=NodeRow.attempts + 1, error=None)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return _Claim("wait")
            if was_ready:  # a forced retrain after damage: the earlier training no longer stands
                s.execute(update(TrainingRow).where(TrainingRow.key == meta.key, TrainingRow.status == "ok")
                          .values(status="replaced"))
            if expired_holder is not None:
                # the lease expired (its holder died or froze) or its holder is gone: its open training-log row ends here
                s.execute(update(TrainingRow)
                          .where(TrainingRow.key == meta.key, TrainingRow.owner == expired_holder,
                                 TrainingRow.status == "running")
                          .values(status="abandoned", finished_at=now))
            return log_training(s)

        try:
            return self._tx(fn)
        except IntegrityError:
            return _Claim("wait")  # another worker inserted the row first

    def _renew(self, key: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_seconds / 3):
            try:
                self._tx(
                    lambda s: s.execute(
                        update(NodeRow)
                        .where(NodeRow.key == key, NodeRow.lease_owner == self.owner, NodeRow.status == "training")
                        .values(lease_until=time.time() + self.lease_seconds)
                    )
                )
            except Exception as exc:  # a missed renewal only shortens the lease
                log.debug("lease renewal for %s failed: %s", key[:12], exc)

    def _finish_training(self, tid: int, status: str) -> None:
        self._tx(
            lambda s: s.execute(
                update(TrainingRow).where(TrainingRow.id == tid).values(status=status, finished_at=time.time())
            )
        )

    # ------------------------------------------------------------------ the verb
    def get_or_train(
        self,
        meta: NodeMeta,
        train_fn: Callable[[], Trained],
    ) -> Fetched:
        """The node for ``meta``: loaded if ready and intact, otherwise trained here exactly once
        (under a lease; other workers wait for it, or take over once the lease expires)."""
        if not _KEY.match(meta.key):
            raise StoreError(f"node key={meta.key!r} is not a sha256 hex digest")
        force = False
        notes = WaitNotes(meta.key, first=min(10.0, self.lease_seconds / 2))
        while True:
            claim = self._claim(meta, force_from_ready=force)
            force = False
            if claim.state == "ready":
                assert claim.record is not None
                model = self.load_model(claim.record)
                if model is not None:
                    return Fetched(claim.record, model, trained_here=False)
                force = True
                continue
            if claim.state == "wait":
                notes.waiting(claim.holder, claim.until)
                time.sleep(self.poll_seconds * (0.5 + random.random()))
                continue
            assert claim.training_id is not None
            return self._train_here(meta, train_fn, claim.training_id)

    def _train_here(self, meta: NodeMeta, train_fn: Callable[[], Trained], tid: int) -> Fetched:
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(meta.key, stop), daemon=True)
        renewer.start()
        from ..core.checkpoint import to_bytes

        try:
            result = train_fn()
            record = self._publish(meta, result, to_bytes(result.model), tid)
        except BaseException as exc:
            stop.set()
            self._fail(meta.key, tid, exc)
            raise
        stop.set()
        if record is None:
            # another worker took over once our lease expired: its file and row win, never overwrite them
            log.warning("node %s: lost its lease while training; using the other worker's result", meta.key[:12])
            return self.get_or_train(meta, train_fn)
        return Fetched(record, result.model, trained_here=True)

    def _publish(self, meta: NodeMeta, result: Trained, data: bytes, tid: int) -> NodeRecord | None:
        """Make ``data`` the node's checkpoint and its row ``ready``, only while this worker holds the lease;
        None (nothing renamed, the attempt logged ``lost-lease``) once another worker has taken it.

        The bytes go to a temp file first. Then, in one transaction, the row is marked ready by a
        compare-and-set on owner and status (which keeps it locked until the commit, so no takeover can
        come in between), the file is renamed to ``<key>.pt`` and the transaction commits. A failed
        rename rolls the row back; a taker that read the row before sees the commit and waits."""
        tmp = self._write_temp(meta.key, data)
        sha = hashlib.sha256(data).hexdigest()
        uri = str(self.artifact_path(meta.key))
        metrics_json = json.dumps(result.metrics, sort_keys=True, default=float)

        def commit(s: Session) -> bool:
            now = time.time()
            res = s.execute(
                update(NodeRow)
                .where(NodeRow.key == meta.key, NodeRow.lease_owner == self.owner, NodeRow.status == "training")
                .values(status="ready", metrics_json=metrics_json, own_flops=int(result.flops),
                        own_seconds=float(result.seconds), artifact_uri=uri, sha256=sha,
                        updated_at=now, lease_owner=None, lease_until=None, error=None)
            )
            won = res.rowcount == 1  # type: ignore[attr-defined]
            if won:
                self._rename_into_place(meta.key, tmp)
            s.execute(update(TrainingRow).where(TrainingRow.id == tid)
                      .values(status="ok" if won else "lost-lease", finished_at=now))
            return won

        try:
            if not self._tx(commit):
                return None
        finally:
            tmp.unlink(missing_ok=True)  # gone once renamed; a lost or failed attempt leaves nothing behind
        return NodeRecord(
            key=meta.key, parent_key=meta.parent_key, depth=meta.depth, spec=json.loads(meta.spec_json),
            step=json.loads(meta.step_json) if meta.step_json else None, recipe=json.loads(meta.recipe_json),
            status="ready", metrics=json.loads(metrics_json), own_flops=int(result.flops),
            own_seconds=float(result.seconds), artifact_uri=uri, sha256=sha,
        )

    def _fail(self, key: str, tid: int, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"[:2000]
        try:
            self._tx(
                lambda s: s.execute(
                    update(NodeRow)
                    .where(NodeRow.key == key, NodeRow.lease_owner == self.owner)
                    .values(status="failed", error=message, lease_owner=None, lease_until=None, updated_at=time.time())
                )
            )
            self._finish_training(tid, "failed")
        except Exception as db_exc:  # the original error matters more
            log.warning("could not mark node %s failed: %s", key[:12], db_exc)

    def close(self) -> None:
        self.engine.dispose()
