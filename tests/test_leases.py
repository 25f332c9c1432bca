"""Leases under real processes: a worker frozen (SIGSTOP) between training and publishing its file,
a holder SIGKILLed on this host, a live holder that is waited for (and said so), leases out of range."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dils_search.errors import InputError
from dils_search.store import LineageStore, NodeMeta, Trained

# One worker in its own process, with the store's default owner (host:pid:id:machine). Modes:
# "pause-write" prints WRITING when its checkpoint is about to be serialised and written (the test
# SIGSTOPs it there); "hang" trains forever; "slow:S" trains for S seconds. SEED picks the weights,
# so two workers' files for one node differ and an overwrite shows in the sha256.
CHILD = r"""
import os, sys, time, hashlib
import torch
torch.set_num_threads(1)
import dils_search.core.checkpoint as ck
from dils_search.core.model import build
from dils_search.core.spec import MLPSpec
from dils_search.store import LineageStore, NodeMeta, Trained
url, art, name, mode, lease, seed = sys.argv[1:7]
spec = MLPSpec(3, [4], 2, "relu", False)
meta = NodeMeta(hashlib.sha256(name.encode()).hexdigest(), None, 0, spec.to_json(), None, "{}")
store = LineageStore(url, art, lease_seconds=float(lease), poll_seconds=0.05)
print("OWNER", store.owner, flush=True)
def train():
    print("TRAINING", flush=True)
    if mode == "hang":
        time.sleep(3600)
    if mode.startswith("slow:"):
        time.sleep(float(mode[5:]))
    return Trained(build(spec, seed=int(seed)), {"val_metric": int(seed) / 100, "test_metric": 0.5, "params": 1}, 1, 0.0)
if mode == "pause-write":
    real = ck.to_bytes
    def writing(model, extra=None):
        print("WRITING", flush=True)
        time.sleep(1.0)  # the test stops this process here
        return real(model, extra)
    ck.to_bytes = writing
fetched = store.get_or_train(meta, train)
print("DONE", fetched.trained_here, fetched.record.status, fetched.record.metrics["val_metric"], flush=True)
"""


def spawn(url: str, art: Path, name: str, mode: str, lease: float, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, url, str(art), name, mode, str(lease), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen[str], prefix: str) -> str:
    """The child's first stdout line starting with ``prefix`` (the test's own timeout bounds the wait)."""
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} before {prefix!r}: {proc.stderr.read() if proc.stderr else ''}")


def node(name: str, seed: int) -> tuple[NodeMeta, Any]:
    from dils_search.core.model import build
    from dils_search.core.spec import MLPSpec

    spec = MLPSpec(3, [4], 2, "relu", False)
    meta = NodeMeta(hashlib.sha256(name.encode()).hexdigest(), None, 0, spec.to_json(), None, "{}")

    def train() -> Trained:
        return Trained(build(spec, seed=seed), {"val_metric": seed / 100, "test_metric": 0.5, "params": 1}, 1, 0.0)

    return meta, train


def file_sha(store: LineageStore, key: str) -> str:
    return hashlib.sha256(store.artifact_path(key).read_bytes()).hexdigest()


# ---------------------------------------------------------------- D1: a lease lost between the check and the commit


@pytest.mark.parametrize("taker_done", [True, False], ids=["taker-finished", "taker-still-training"])
def test_a_worker_frozen_before_writing_never_publishes_under_a_lost_lease(
        taker_done: bool, any_url: str, tmp_path: Path) -> None:
    """SIGSTOP a worker as it starts writing its checkpoint, past its 3 s lease; another worker takes the
    lease. Resumed, the frozen worker must not rename its file over the new owner's, must not log an
    ``ok`` training, and must hand back the new owner's ready node (not a row without metrics)."""
    art = tmp_path / "art"
    LineageStore(any_url, art).close()
    frozen = spawn(any_url, art, "race", "pause-write", lease=3.0, seed=1)
    wait_for(frozen, "WRITING")
    os.kill(frozen.pid, signal.SIGSTOP)
    key = hashlib.sha256(b"race").hexdigest()
    store = LineageStore(any_url, art, lease_seconds=30, poll_seconds=0.05)
    taker = None
    try:
        if taker_done:  # the new owner trains and publishes before the frozen worker wakes up
            meta, train = node("race", seed=2)
            fetched = store.get_or_train(meta, train)
            assert fetched.trained_here
        else:  # the new owner is still training when the frozen worker wakes up
            taker = spawn(any_url, art, "race", "slow:4", lease=3.0, seed=2)
            wait_for(taker, "TRAINING")
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    out, err = frozen.communicate()
    assert frozen.returncode == 0, err[-2000:]
    assert "DONE False ready 0.02" in out, out  # the new owner's node, with its metrics
    assert "lost its lease" in err
    if taker is not None:
        t_out, t_err = taker.communicate()
        assert taker.returncode == 0 and "DONE True ready 0.02" in t_out, t_err[-2000:]
    record = store.get(key)
    assert record is not None and record.status == "ready" and record.metrics["val_metric"] == 0.02
    assert file_sha(store, key) == record.sha256  # the new owner's file, never overwritten
    assert store.training_counts() == {key: 1}  # no "duplicate training"
    assert store.training_counts("lost-lease") == {key: 1} and store.training_counts("running") == {}
    assert list(art.glob(".*.tmp")) == []  # the lost attempt's temp file is gone
    store.close()


# ---------------------------------------------------------------- D6: leases out of range


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), 1e300, True, "60"])
def test_a_lease_out_of_range_is_refused_by_the_store_and_the_tree(bad: Any, tmp_path: Path) -> None:
    import dils_search as ds

    url = f"sqlite:///{tmp_path / 'l.db'}"
    with pytest.raises(InputError, match=r"lease_seconds=.* must be a number of seconds > 0"):
        LineageStore(url, tmp_path / "art", lease_seconds=bad)
    x = np.random.default_rng(0).standard_normal((60, 3))
    data = ds.Dataset.from_arrays(x, (x[:, 0] > 0).astype(np.int64), seed=0)
    with pytest.raises(InputError, match=r"lease_seconds="):
        ds.GrowthTree(ds.MLPSpec(3, [4], 2), data, storage=url, artifacts=str(tmp_path / "art"), lease_seconds=bad)
    with pytest.raises(InputError, match=r"poll_seconds="):
        LineageStore(url, tmp_path / "art", poll_seconds=-1)
    assert not (tmp_path / "l.db").exists() and not (tmp_path / "art").exists()  # nothing written


# ---------------------------------------------------------------- D12: dead holders on this host, live ones waited for


@pytest.mark.timeout(150)  # the dead holder's lease has 300 s left: waiting it out fails the test
@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_holder_killed_on_this_host_is_replaced_without_waiting_out_its_lease(
        reaped: bool, any_url: str, tmp_path: Path) -> None:
    art = tmp_path / "art"
    LineageStore(any_url, art).close()
    holder = spawn(any_url, art, "dead", "hang", lease=300.0, seed=1)
    wait_for(holder, "TRAINING")
    os.kill(holder.pid, signal.SIGKILL)
    if reaped:
        holder.wait()
    else:  # killed but not reaped yet: a zombie, as a parent that has not polled it leaves it
        deadline = time.monotonic() + 30
        while Path(f"/proc/{holder.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    try:
        taker = spawn(any_url, art, "dead", "slow:0", lease=300.0, seed=2)
        out, err = taker.communicate()  # the dead holder's lease has 300 s left (the test's timeout)
    finally:
        holder.wait()
    assert taker.returncode == 0 and "DONE True ready 0.02" in out, err[-2000:]
    store = LineageStore(any_url, art)
    key = hashlib.sha256(b"dead").hexdigest()
    assert store.training_counts() == {key: 1} and store.training_counts("abandoned") == {key: 1}
    assert file_sha(store, key) == store.get(key).sha256  # type: ignore[union-attr]
    store.close()


def test_a_live_holder_is_waited_for_and_the_waiter_says_whom_it_waits_for(
        sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    art = tmp_path / "art"
    LineageStore(sqlite_url, art).close()
    holder = spawn(sqlite_url, art, "live", "slow:6", lease=3.0, seed=1)
    owner = wait_for(holder, "OWNER").split()[1]
    wait_for(holder, "TRAINING")
    store = LineageStore(sqlite_url, art, lease_seconds=3.0, poll_seconds=0.05)
    meta, train = node("live", seed=2)
    with caplog.at_level(logging.WARNING, logger="dils_search.store"):
        fetched = store.get_or_train(meta, train)
    out, err = holder.communicate()
    assert holder.returncode == 0 and "DONE True" in out, err[-2000:]
    assert not fetched.trained_here and fetched.record.metrics["val_metric"] == 0.01  # the holder's node
    notes = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert notes and owner in notes[0] and "lease expires in" in notes[0], caplog.text
    assert store.training_counts() == {meta.key: 1} and store.training_counts("abandoned") == {}
    store.close()


def test_only_a_holder_on_this_machine_whose_process_is_gone_counts_as_dead() -> None:
    from dils_search.store.leases import default_owner, holder_is_dead

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, _, rid, tag = default_owner().split(":")
    assert holder_is_dead(f"{host}:{gone.pid}:{rid}:{tag}")
    assert not holder_is_dead(f"{host}:{os.getpid()}:{rid}:{tag}")  # alive (this process)
    assert not holder_is_dead(f"{host}:{os.getppid()}:{rid}:{tag}")
    assert not holder_is_dead(f"another-{host}:{gone.pid}:{rid}:{tag}")  # another host: wait for its lease
    assert not holder_is_dead(f"{host}:{gone.pid}:{rid}:{'0' * 8 if tag != '0' * 8 else '1' * 8}")  # other boot or namespace
    assert not holder_is_dead(f"{host}:{gone.pid}:{rid}")  # owners written before the machine tag
    for odd in (None, "", "worker-a", f"{host}:-1:{rid}:{tag}", f"{host}:0:{rid}:{tag}", f"{host}:x:{rid}:{tag}"):
        assert not holder_is_dead(odd)
    assert len(default_owner()) <= 128  # fits dils_nodes.lease_owner
