"""The delivered model and the files around it: the Optuna artifact registers only verified bytes and
only once, a relative artifacts folder is stored absolute, `export --out` never writes through a planted
link, a full artifacts disk is a run-time failure (exit 1), `show` counts finalized nodes, and a
finalize SIGKILLed mid-training is replaced at once by the next one."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import tiny_config
from test_cli_errors import tiny_toml

from dils_search.cli import main
from dils_search.search import finalize as fin
from dils_search.search.storage import ARTIFACTS_ATTR, read_study
from dils_search.search.study import run_study
from dils_search.search.summary import summarize
from dils_search.store import LineageStore, TrainingRow


def cli(args: list[str], cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dils_search", *args], capture_output=True, text=True, cwd=cwd, **kw)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def registered(url: str, name: str, art: Path) -> list[bytes]:
    """The bytes of every Optuna artifact of study ``name``."""
    from optuna.artifacts import get_all_artifact_meta

    study = optuna.load_study(study_name=name, storage=url)
    return [(art / "optuna-artifacts" / m.artifact_id).read_bytes() for m in get_all_artifact_meta(study)]


# ---------------------------------------------------------------- D2: only verified bytes are registered


@pytest.mark.parametrize("how", ["symlink-outside", "another-node"])
def test_the_artifact_holds_the_delivered_nodes_verified_bytes_whatever_was_swapped_in(
        how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap every finalized node's file after finalizing and before registering (the window the old
    code left open): a symbolic link to a private file outside the artifacts folder, or a copy of another
    node's checkpoint. The registered artifact must be the delivered node's own bytes, by sha256."""
    url, art = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "art"
    run_study(tiny_config(search={"n_trials": 3}, final={"epochs": 0}), url, str(art), "reg", progress=False)
    secret = tmp_path / "private.key"
    secret.write_bytes(b"-----BEGIN PRIVATE KEY----- not for the dashboard")
    real = fin._optuna_study

    def tamper_then_open(*args: Any) -> Any:  # called once the candidates are finalized, before registering
        store = LineageStore(url, art, create=False)
        searched = [r for r in store.nodes() if r.recipe.get("mode") != "final"]
        for r in store.nodes():
            if r.recipe.get("mode") == "final":
                path = store.artifact_path(r.key)
                path.unlink()
                if how == "symlink-outside":
                    path.symlink_to(secret)
                else:
                    path.write_bytes(store.artifact_path(searched[0].key).read_bytes())
        store.close()
        return real(*args)

    monkeypatch.setattr(fin, "_optuna_study", tamper_then_open)
    result = fin.finalize_study(url, "reg", epochs=1, progress=False)
    assert result is not None
    store = LineageStore(url, art, create=False)
    delivered = store.get(result.node_key)
    assert delivered is not None and delivered.sha256
    (artifact,) = registered(url, "reg", art)
    assert sha(artifact) == delivered.sha256, "the registered bytes are not the delivered node's"
    assert not store.artifact_path(result.node_key).is_symlink()  # the node was retrained in place of the swap
    assert sha(store.artifact_path(result.node_key).read_bytes()) == delivered.sha256
    assert read_study(url, "reg").final["artifact_id"]  # type: ignore[index]
    store.close()


# ---------------------------------------------------------------- D11: two finalize runs register once


def test_two_concurrent_finalize_runs_register_the_delivered_model_once(tmp_path: Path) -> None:
    url, art = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "art"
    run_study(tiny_config(search={"n_trials": 3}, final={"epochs": 0}), url, str(art), "twice", progress=False)
    args = ["finalize", "--storage", url, "--study-name", "twice", "--epochs", "30", "--top-k", "2", "--quiet"]
    procs = [subprocess.Popen([sys.executable, "-m", "dils_search", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
    blobs = registered(url, "twice", art)
    assert len(blobs) == 1, f"{len(blobs)} registrations of one delivered model"
    final = read_study(url, "twice").final
    assert final is not None
    store = LineageStore(url, art, create=False)
    assert sha(blobs[0]) == store.get(final["node_key"]).sha256  # type: ignore[union-attr]
    assert max(store.training_counts().values()) == 1  # each finalized node trained once
    store.close()


# ---------------------------------------------------------------- D4: a relative artifacts folder


def test_a_relative_artifacts_folder_is_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    monkeypatch.chdir(first)
    run_study(tiny_config(search={"n_trials": 3}, final={"epochs": 1}), url, "art", "rel", progress=False)
    assert read_study(url, "rel", with_trials=False).user_attrs[ARTIFACTS_ATTR] == str(first / "art")
    monkeypatch.chdir(other)
    assert main(["export", "--storage", url, "--study-name", "rel", "--out", "m.pt"]) == 0
    assert (other / "m.pt").is_file() and not (other / "art").exists()  # nothing retrained into this folder
    s = summarize(url, "rel")
    assert (s.retrained_after_damage, s.duplicate_trainings) == (0, 0)
    store = LineageStore(url, first / "art", create=False)
    assert store.training_counts("replaced") == {} and max(store.training_counts().values()) == 1
    store.close()


# ---------------------------------------------------------------- D5: export --out never writes through a link


def test_save_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    from dils_search.core.checkpoint import load, save
    from dils_search.core.model import build
    from dils_search.core.spec import MLPSpec

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "m.pt"
    for name in (f".{out.name}.tmp-{os.getpid()}", f".{out.name}.tmp"):  # the names a predictable temp file takes
        (tmp_path / name).symlink_to(victim)
    model = build(MLPSpec(3, [4], 2), seed=0)
    save(model, out)
    assert victim.read_text() == "precious"
    assert out.is_file() and not out.is_symlink() and load(out).spec == model.spec
    out.unlink()
    out.symlink_to(victim)  # a link at the target itself is replaced, never followed
    save(model, out)
    assert victim.read_text() == "precious" and not out.is_symlink()


def test_export_formats_never_write_through_a_planted_link(tmp_path: Path) -> None:
    from dils_search.core.export import export
    from dils_search.core.model import build
    from dils_search.core.spec import MLPSpec

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "m.pt2"
    (tmp_path / f".{out.stem}.tmp-{os.getpid()}{out.suffix}").symlink_to(victim)
    export(build(MLPSpec(3, [4], 2), seed=0), out, format="torch.export")
    assert victim.read_text() == "precious" and out.is_file() and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == ["m.pt2", "victim.txt"]  # no temp left


# ---------------------------------------------------------------- D13: a full artifacts disk exits 1


@pytest.mark.postgres
def test_a_full_artifacts_disk_is_a_run_time_failure_exit_1(postgres_url: str, tmp_path: Path) -> None:
    """The study lives in PostgreSQL, so only checkpoint files meet RLIMIT_FSIZE (EFBIG, as a full disk)."""
    art = tmp_path / "art"
    run_study(tiny_config(search={"n_trials": 2}, final={"epochs": 0}), postgres_url, str(art), "full", progress=False)
    store = LineageStore(postgres_url, art, create=False)
    best = summarize(postgres_url, "full").best_node_key
    assert best is not None
    store.artifact_path(best).unlink()  # export must retrain it, and cannot save it

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    proc = cli(["export", "--storage", postgres_url, "--study-name", "full", "--out", "m.pt"], tmp_path,
               preexec_fn=full_disk, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert lines[-1].startswith("dils-search export: error: could not save node") and "File too large" in lines[-1]
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.pt").exists()
    store.close()


# ---------------------------------------------------------------- D12: show counts finalized nodes


def test_show_counts_finalized_nodes_in_its_damage_and_duplicate_figures(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, art = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "art"
    run_study(tiny_config(search={"n_trials": 3}, final={"epochs": 1}), url, str(art), "fin", progress=False)
    s = summarize(url, "fin")
    assert s.final is not None and (s.retrained_after_damage, s.duplicate_trainings) == (0, 0)
    store = LineageStore(url, art, create=False)
    delivered = store.artifact_path(s.final["node_key"])
    delivered.write_bytes(delivered.read_bytes()[:100])  # damaged: export retrains it ("replaced")
    assert main(["export", "--storage", url, "--study-name", "fin", "--out", str(tmp_path / "m.pt")]) == 0
    assert store.training_counts("replaced") == {s.final["node_key"]: 1}
    assert summarize(url, "fin").retrained_after_damage == 1
    with store.session() as session:  # a second finished training of the delivered node, as a lost lease once logged
        session.add(TrainingRow(key=s.final["node_key"], owner="late", started_at=time.time(), status="ok"))
    capsys.readouterr()
    assert main(["show", "--storage", url, "--study-name", "fin"]) == 0
    assert "duplicate trainings 1; retrained after damage 1" in capsys.readouterr().out
    store.close()


# ---------------------------------------------------------------- D12: finalize after a SIGKILL


@pytest.mark.slow
@pytest.mark.timeout(280)  # the dead holder's lease has 300 s: waiting it out fails the test
def test_finalize_after_a_sigkilled_finalize_takes_over_at_once(tmp_path: Path) -> None:
    """The killed finalize held a 300 s lease on the node it was training; the next one on this host sees
    that its holder is gone and takes over instead of waiting the lease out."""
    (tmp_path / "c.toml").write_text(tiny_toml(search={"n_trials": 2}, final={"epochs": 0},
                                               storage={"lease_seconds": 300.0}))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert cli(["run", "c.toml", "--storage", url, "--quiet", "--no-report"], tmp_path).returncode == 0
    args = ["finalize", "--storage", url, "--study-name", "tiny", "--epochs", "400", "--top-k", "1", "--quiet"]
    first = subprocess.Popen([sys.executable, "-m", "dils_search", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    store = LineageStore(url, tmp_path / "dils_artifacts", create=False)
    deadline = time.monotonic() + 120
    while not any(r.recipe.get("mode") == "final" and r.status == "training" for r in store.nodes()):
        assert first.poll() is None and time.monotonic() < deadline, "the first finalize never started training"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = cli(args, tmp_path)  # the dead holder's lease has about 300 s left: the test's timeout
    assert second.returncode == 0, second.stderr[-2000:]
    final = [r for r in store.nodes() if r.recipe.get("mode") == "final"]
    assert [r.status for r in final] == ["ready"]
    assert store.training_counts()[final[0].key] == 1 and store.training_counts("abandoned") == {final[0].key: 1}
    store.close()
