"""optuna-dashboard as the live view: a real dashboard server on 127.0.0.1 reads a finished study
through its HTTP API (metric names, user attributes, the Markdown note, the delivered model as an
artifact), headless Chromium renders its study page, and Optuna's own CLI agrees with `show` on the
best trial."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config

from dils_search.search.study import run_study
from dils_search.search.summary import summarize

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - 127.0.0.1 only (a poll, not a test limit)
        return json.loads(r.read()) if "json" in r.headers.get("Content-Type", "") else r.read()


@contextlib.contextmanager
def serve(url: str, artifact_dir: Path | None = None) -> Iterator[str]:
    """A real optuna-dashboard server on 127.0.0.1 over ``url``; yields its base address."""
    port = _free_port()
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).parent / "optuna-dashboard")
    extra = ["--artifact-dir", str(artifact_dir)] if artifact_dir is not None else []
    proc = subprocess.Popen([exe, url, "--host", "127.0.0.1", "--port", str(port), *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                _get(f"{base}/api/studies")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.3)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


@pytest.fixture
def dashboard(tmp_path: Path) -> Any:
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):  # the [test] extra installs it: missing in CI is a failure, not a skip
            pytest.fail("optuna-dashboard is not installed (pip install -e '.[test]')")
        pytest.skip("optuna-dashboard is not installed: pip install 'dils-search[dashboard]'")
    url, art = f"sqlite:///{tmp_path / 'd.db'}", tmp_path / "art"
    run_study(tiny_config(search={"n_trials": 4}, final={"epochs": 1}), url, str(art), "dash", progress=False)
    with serve(url, art / "optuna-artifacts") as base:
        yield base, url, art


def test_the_dashboard_reads_metric_names_attrs_note_and_artifact(dashboard: Any) -> None:
    base, url, _ = dashboard
    studies = _get(f"{base}/api/studies")["study_summaries"]
    sid = next(s["study_id"] for s in studies if s["study_name"] == "dash")
    assert not any(a["key"] == "dils_config" for s in studies for a in s["user_attrs"])  # no 1.5 kB config attr
    detail = _get(f"{base}/api/studies/{sid}?after=0")
    assert detail["objective_names"] == ["val_accuracy"]
    keys = {a["key"] for a in detail["trials"][0]["user_attrs"]}
    assert {"path", "hidden", "depth", "params", "val_metric", "test_metric", "flops_spent"} <= keys
    s = summarize(url, "dash")
    assert s.final is not None
    note = detail["note"]["body"]
    assert "Recommended architecture" in note and str(s.final["hidden"]) in note
    (artifact,) = detail["artifacts"]
    assert artifact["filename"] == f"{s.final['node_key']}.pt"
    body = _get(f"{base}/artifacts/{sid}/{artifact['artifact_id']}")
    assert body[:2] == b"PK"  # the checkpoint (a torch zip) downloads


def test_optuna_best_trial_agrees_with_show(dashboard: Any) -> None:
    _, url, _ = dashboard
    exe = shutil.which("optuna") or str(Path(sys.executable).parent / "optuna")
    out = subprocess.run([exe, "best-trial", "--study-name", "dash", "--storage", url, "-f", "json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["number"] == summarize(url, "dash").best_trial


def test_chromium_renders_the_dashboard_study_page(dashboard: Any, tmp_path: Path) -> None:
    from test_browser import FLAGS, chromium

    browser = chromium()
    if browser is None:
        if os.environ.get("DILS_REQUIRE_CHROMIUM") == "1":
            pytest.fail("DILS_REQUIRE_CHROMIUM=1 but chromium is not installed")
        pytest.skip("chromium is not installed")
    base, _, _ = dashboard
    flags = [f for f in FLAGS if not f.startswith("--host-resolver-rules")]
    proc = subprocess.run([browser, *flags, f"--user-data-dir={tmp_path / 'profile'}", f"{base}/dashboard/studies/1"],
                          capture_output=True, text=True)
    assert "dash" in proc.stdout and "val_accuracy" in proc.stdout, proc.stdout[-2000:]
