"""The lineage store on real SQLite files and a real PostgreSQL server: leases, atomic files, locks."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text

from dils_search.core.model import build
from dils_search.core.spec import MLPSpec
from dils_search.store import LineageStore, NodeMeta, StoreError, Trained, retry_locked, safe_url


def meta_for(name: str, width: int = 4) -> NodeMeta:
    spec = MLPSpec(3, [width], 2, "relu", False)
    return NodeMeta(hashlib.sha256(name.encode()).hexdigest(), None, 0, spec.to_json(), None, "{}")


def trained(meta: NodeMeta, calls: list[str] | None = None, sleep: float = 0.0) -> Trained:
    if calls is not None:
        calls.append(meta.key)
    if sleep:
        time.sleep(sleep)
    from dils_search.core.spec import spec_from_json

    model = build(spec_from_json(meta.spec_json), seed=int(meta.key[:8], 16))
    return Trained(model=model, metrics={"val_metric": 0.5, "test_metric": 0.5, "params": 1}, flops=10, seconds=0.0)


def test_train_once_then_load(any_url: str, tmp_path: Path) -> None:
    store = LineageStore(any_url, tmp_path / "art")
    meta = meta_for("a")
    calls: list[str] = []
    first = store.get_or_train(meta, lambda: trained(meta, calls))
    second = store.get_or_train(meta, lambda: trained(meta, calls))
    assert first.trained_here and not second.trained_here and calls == [meta.key]
    assert first.record == second.record == store.get(meta.key)  # what training returns is what is stored
    assert first.record.status == "ready" and first.record.sha256 == hashlib.sha256(
        (tmp_path / "art" / f"{meta.key}.pt").read_bytes()).hexdigest()
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert store.training_counts() == {meta.key: 1}
    assert not list((tmp_path / "art").glob(".*tmp"))  # no temp file left behind
    store.close()


def test_failed_training_leaves_failed_row_and_no_file(any_url: str, tmp_path: Path) -> None:
    store = LineageStore(any_url, tmp_path / "art")
    meta = meta_for("boom")

    def boom() -> Trained:
        raise RuntimeError("out of luck")

    with pytest.raises(RuntimeError, match="out of luck"):
        store.get_or_train(meta, boom)
    record = store.get(meta.key)
    assert record is not None and record.status == "failed"
    assert not (tmp_path / "art" / f"{meta.key}.pt").exists()
    # the next attempt takes the failed node over and trains it
    assert store.get_or_train(meta, lambda: trained(meta)).trained_here
    assert store.training_counts() == {meta.key: 1} and store.training_counts("failed") == {meta.key: 1}
    store.close()


def test_lease_blocks_other_owner_until_it_expires(any_url: str, tmp_path: Path) -> None:
    """Two owners (as two workers would be): the second waits, then takes over an expired lease."""
    a = LineageStore(any_url, tmp_path / "art", lease_seconds=0.6, owner="worker-a")
    b = LineageStore(any_url, tmp_path / "art", lease_seconds=0.6, owner="worker-b")
    meta = meta_for("leased")
    assert a._claim(meta).state == "acquired"
    assert b._claim(meta).state == "wait"
    time.sleep(0.8)  # a never renews: it behaves like a dead worker
    assert b._claim(meta).state == "acquired"
    assert a._claim(meta).state == "wait"  # b's lease is live now
    a.close()
    b.close()


def test_only_one_of_two_racing_takeovers_wins(any_url: str, tmp_path: Path) -> None:
    """The compare-and-set: two workers that both saw the same expired lease cannot both take it."""
    dead = LineageStore(any_url, tmp_path / "art", lease_seconds=0.2, owner="dead")
    meta = meta_for("race")
    assert dead._claim(meta).state == "acquired"
    time.sleep(0.3)
    results: list[str] = []
    barrier = threading.Barrier(4)
    stores = [LineageStore(any_url, tmp_path / "art", lease_seconds=30, owner=f"w{i}") for i in range(4)]

    def go(s: LineageStore) -> None:
        barrier.wait()
        results.append(s._claim(meta).state)

    threads = [threading.Thread(target=go, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["acquired", "wait", "wait", "wait"]
    for s in [dead, *stores]:
        s.close()


def test_retry_locked_waits_out_a_real_sqlite_lock(tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    con = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    con.execute("CREATE TABLE t (x INTEGER)")
    con.execute("BEGIN EXCLUSIVE")
    con.execute("INSERT INTO t VALUES (1)")
    released = threading.Timer(0.6, lambda: con.execute("COMMIT"))
    engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 0, "check_same_thread": False})
    attempts: list[float] = []

    def write() -> None:
        attempts.append(time.monotonic())
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (2)"))

    released.start()
    start = time.monotonic()
    retry_locked(write, attempts=12, base=0.05)
    released.join()
    assert len(attempts) > 1, "the lock was never hit"
    assert time.monotonic() - start >= 0.5
    with engine.connect() as conn:
        assert sorted(r[0] for r in conn.execute(text("SELECT x FROM t"))) == [1, 2]
    engine.dispose()
    con.close()


def _stress_worker(url: str, art: str, names: list[str], out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(1)
    store = LineageStore(url, art, lease_seconds=5, poll_seconds=0.05)
    trained_here = []
    for name in names:
        meta = meta_for(name)
        fetched = store.get_or_train(meta, lambda m=meta: trained(m, sleep=0.05))
        if fetched.trained_here:
            trained_here.append(name)
    store.close()
    out.put(trained_here)


@pytest.mark.parametrize("workers", [2, 4])
def test_concurrent_processes_on_sqlite_lose_nothing(workers: int, tmp_path: Path) -> None:
    """2-4 real processes hammer one sqlite file: locks are waited out, every node is trained once."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    LineageStore(url, tmp_path / "art").close()  # schema first, as run_study does
    names = [f"n{i}" for i in range(12)]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_stress_worker, args=(url, str(tmp_path / "art"), names[i:] + names[:i], out))
             for i in range(workers)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    all_trained = sorted(n for r in results for n in r)
    assert all_trained == sorted(names), "a node was trained twice or not at all"
    store = LineageStore(url, tmp_path / "art")
    assert store.training_counts() == {meta_for(n).key: 1 for n in names}
    assert all(r.status == "ready" for r in store.nodes())
    store.close()


def test_store_refuses_bad_places_before_writing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is not a folder"):
        LineageStore(f"sqlite:///{tmp_path / 's.db'}", tmp_path / "file" / "art")
    with pytest.raises(StoreError, match="does not exist"):
        LineageStore(f"sqlite:///{tmp_path / 'no' / 's.db'}", tmp_path / "art")
    with pytest.raises(StoreError, match="unreachable"):
        LineageStore("postgresql+psycopg2://u:pw@127.0.0.1:1/x", tmp_path / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_safe_url_masks_passwords() -> None:
    assert safe_url("postgresql+psycopg2://me:hunter2@db:5432/x") == "postgresql+psycopg2://me:***@db:5432/x"
    assert "hunter2" not in safe_url("weird://me:hunter2@db/x")
    assert safe_url("sqlite:///a.db") == "sqlite:///a.db"
