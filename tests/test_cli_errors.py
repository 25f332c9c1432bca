"""Bad input through the real CLI: exit code 2, one line on stderr, nothing written, nothing lost."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_config

from dils_search.cli import main
from dils_search.search.study import load_study, run_study
from dils_search.store import LineageStore

DEAD_PG = "postgresql+psycopg2://dils:secret-pw@127.0.0.1:1/x"  # nothing listens on port 1


def to_toml(data: dict[str, Any]) -> str:
    """Enough of a TOML writer for study configs (scalars, lists of scalars, one level of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict) and k != "compare"]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def tiny_toml(**sections: Any) -> str:
    data = tiny_config().to_dict()
    data.pop("compare")
    for key, val in sections.items():
        data[key] = {**data[key], **val} if isinstance(val, dict) else val
    return to_toml(data)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (the sqlite WAL/SHM files change on reads; skip them)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(("-wal", "-shm")):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_toml_error_through_a_real_process(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text('name = "x"\n[search\nmax_steps = 2\n')
    proc = subprocess.run(
        [sys.executable, "-m", "dils_search", "run", str(cfg), "--storage", f"sqlite:///{tmp_path / 's.db'}",
         "--artifacts", str(tmp_path / "art"), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dils-search run: error: config=") and "line 2, column 8" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["broken.toml"]


def _npz(tmp_path: Path, name: str, x: np.ndarray, y: np.ndarray) -> str:
    p = tmp_path / name
    np.savez(p, x=x, y=y)
    return str(p)


def _nan_file(tmp_path: Path, bad: float) -> str:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6))
    x[7, 2] = bad
    return _npz(tmp_path, f"bad{bad}.npz", x, rng.integers(0, 2, 120))


def _object_file(tmp_path: Path) -> str:
    p = tmp_path / "objects.npz"
    np.savez(p, x=np.array([{"a": 1}] * 50, dtype=object), y=np.arange(50) % 2)
    return str(p)


def _garbage_file(tmp_path: Path) -> str:
    p = tmp_path / "garbage.npz"
    p.write_bytes(b"\x80\x04 this is not an npz archive")
    return str(p)


def _txt_file(tmp_path: Path) -> str:
    (tmp_path / "data.txt").write_text("1,2\n3,4\n")
    return str(tmp_path / "data.txt")


def _dir_file(tmp_path: Path) -> str:
    (tmp_path / "folder.npz").mkdir()
    return str(tmp_path / "folder.npz")


# (config sections, or a callable making them from tmp_path) -> fragments the one error line must hold
CONFIG_CASES: dict[str, tuple[Any, list[str]]] = {
    "unknown-key": ({"search": {"max_step": 2}}, ["search.max_step", "did you mean 'max_steps'"]),
    "wrong-type": ({"search": {"n_trials": "many"}}, ["search.n_trials='many'", "must be an integer"]),
    "width-zero": ({"search": {"widths": [8, 0]}}, ["search.widths[1]=0", "> 0"]),
    "hidden-negative": ({"model": {"hidden": [-3]}}, ["model.hidden[0]=-3", "> 0"]),
    "position-range": ({"search": {"positions": [0, 7]}}, ["search.positions[1]=7", "allowed: 0..2"]),
    "empty-widths": ({"search": {"widths": []}}, ["search.widths=[]"]),
    "empty-inits": ({"search": {"inits": []}}, ["search.inits=[]", "allowed: dils-analytic"]),
    "init": ({"search": {"inits": ["netmorph"]}}, ["search.inits[0]='netmorph'", "allowed: dils-analytic"]),
    "policy": ({"search": {"policy": "evolution"}}, ["search.policy='evolution'", "allowed: optuna"]),
    "sampler": ({"search": {"sampler": "cmaes"}}, ["search.sampler='cmaes'", "allowed: tpe"]),
    "pruner": ({"search": {"pruner": "asha"}}, ["search.pruner='asha'", "allowed: none"]),
    "dataset": ({"data": {"dataset": "imagenet"}}, ["data.dataset='imagenet'", "allowed: digits"]),
    "activation": ({"model": {"activation": "relu6"}}, ["model.activation='relu6'", "did you mean 'relu'", "allowed:"]),
    "shape-mismatch": (
        {"model": {"kind": "conv", "dims": 1, "in_channels": 3, "hidden": [4]}, "search": {"inits": ["dils-analytic"]}},
        ["16 features per sample", "input shape [3, 5] needs 15"],
    ),
    "nan-inputs": (lambda d: {"data": {"dataset": "file", "path": _nan_file(d, float("nan"))}},
                   ["1 NaN or inf values in its inputs"]),
    "inf-inputs": (lambda d: {"data": {"dataset": "file", "path": _nan_file(d, float("inf"))}},
                   ["1 NaN or inf values in its inputs"]),
    "missing-file": (lambda d: {"data": {"dataset": "file", "path": str(d / "nope.npz")}},
                     ["data path=", "nope.npz", "does not exist"]),
    "folder-not-file": (lambda d: {"data": {"dataset": "file", "path": _dir_file(d)}}, ["folder.npz", "not a file"]),
    "garbage-file": (lambda d: {"data": {"dataset": "file", "path": _garbage_file(d)}},
                     ["garbage.npz", "not an .npz archive"]),
    "pickled-objects": (lambda d: {"data": {"dataset": "file", "path": _object_file(d)}},
                        ["objects.npz", "could not be read", "allow_pickle=False"]),
    "wrong-suffix": (lambda d: {"data": {"dataset": "file", "path": _txt_file(d)}}, ["data.txt", "allowed: .npz, .csv"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_rejected_config_writes_nothing(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sections, fragments = CONFIG_CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    if callable(sections):
        sections = sections(inputs)
    cfg = tmp_path / "study.toml"
    cfg.write_text(tiny_toml(**sections))
    before = sorted(os.listdir(tmp_path))
    rc, lines = run_cli(["run", str(cfg), "--storage", f"sqlite:///{tmp_path / 'studies.db'}",
                         "--artifacts", str(tmp_path / "art"), "--quiet"], capsys)
    assert rc == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("dils-search run: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert sorted(os.listdir(tmp_path)) == before, "a rejected config wrote something"


@pytest.mark.parametrize(
    ("storage", "artifacts", "fragments"),
    [
        (DEAD_PG, None, ["storage='postgresql+psycopg2://dils:***@127.0.0.1:1/x' is unreachable", "refused"]),
        ("not a url", None, ["storage='not a url' is not a usable database URL"]),
        ("nosuchdb://x/y", None, ["storage='nosuchdb://x/y' is not a usable database URL"]),
        ("sqlite:///{tmp}/missing/dir/s.db", None, ["is in a folder that does not exist", "missing/dir"]),
        ("sqlite:///{tmp}", None, ["which is not a file"]),
        (None, "{tmp}/a-file/art", ["artifacts=", "a-file' is not a folder"]),
        (None, "/proc/dils-nope/art", ["artifacts='/proc/dils-nope/art' is not a writable folder"]),
    ],
    ids=["unreachable-postgres", "invalid-url", "unknown-dialect", "sqlite-missing-folder", "sqlite-is-folder",
         "artifacts-under-file", "artifacts-under-proc"],
)
def test_bad_storage_writes_nothing(
    storage: str | None, artifacts: str | None, fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "study.toml"
    cfg.write_text(tiny_toml())
    (tmp_path / "a-file").write_text("I am a file")
    storage = (storage or f"sqlite:///{tmp_path / 'studies.db'}").format(tmp=tmp_path)
    artifacts = (artifacts or str(tmp_path / "art")).format(tmp=tmp_path)
    before = snapshot(tmp_path)
    rc, lines = run_cli(["run", str(cfg), "--storage", storage, "--artifacts", artifacts, "--quiet"], capsys)
    assert rc == 2 and len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "secret-pw" not in lines[0]
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def existing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real stored study that every bad command below must leave exactly as it was."""
    root = tmp_path_factory.mktemp("existing")
    url = f"sqlite:///{root / 'studies.db'}"
    run_study(tiny_config(search={"n_trials": 2}), url, str(root / "art"), "kept", progress=False)
    return {"root": root, "url": url, "art": str(root / "art")}


def _state(existing: dict[str, Any]) -> tuple[Any, ...]:
    study = load_study(existing["url"], "kept")
    store = LineageStore(existing["url"], existing["art"], create=False)
    try:
        nodes = sorted((n.key, n.status, n.sha256) for n in store.nodes())
        counts = store.training_counts()
    finally:
        store.close()
    trials = [(t.number, t.state.name, t.params) for t in study.get_trials()]
    files = snapshot(Path(existing["art"]))
    return trials, nodes, counts, files


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["resume", "--study-name", "ghost"], ["study-name='ghost' is not in storage", "studies there: kept"]),
        (["show", "--study-name", "ghost"], ["study-name='ghost'", "studies there: kept"]),
        (["export", "--study-name", "ghost", "--out", "{root}/o.pt"], ["study-name='ghost'", "studies there: kept"]),
        (["worker", "--study-name", "ghost"], ["study-name='ghost'", "studies there: kept"]),
        (["report", "--study-name", "ghost", "--out", "{root}/r.html"], ["study-name='ghost'", "studies there: kept"]),
        (["export", "--study-name", "kept", "--out", "{root}/kept.toml/best.pt"], ["is in a folder that does not exist", "kept.toml"]),
        (["run", "{root}/kept.toml", "--study-name", "kept"], ["study-name='kept' already exists", "different config"]),
        (["run", "{root}/bad.toml", "--study-name", "kept"], ["search.widths[0]=0"]),
    ],
    ids=["resume", "show", "export", "worker", "report", "export-out-under-a-file", "run-other-config", "run-bad-config"],
)
def test_bad_commands_lose_nothing(
    args: list[str], fragments: list[str], existing: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root = existing["root"]
    (root / "kept.toml").write_text(tiny_toml(search={"n_trials": 2, "widths": [16]}))
    (root / "bad.toml").write_text(tiny_toml(search={"widths": [0]}))
    before = _state(existing)
    argv = [args[0], *(a.format(root=root) for a in args[1:]), "--storage", existing["url"]]
    if args[0] == "run":
        argv += ["--artifacts", existing["art"], "--quiet"]
    rc, lines = run_cli(argv, capsys)
    assert rc == 2 and len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert _state(existing) == before
    assert not (root / "o.pt").exists() and not (root / "r.html").exists()


def test_reading_commands_never_create_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'typo.db'}"
    for argv in (["ls"], ["show", "--study-name", "x"], ["resume", "--study-name", "x"]):
        rc, lines = run_cli([argv[0], "--storage", url, *argv[1:]], capsys)
        assert rc == 2 and len(lines) == 1 and "does not exist" in lines[0], lines
    assert os.listdir(tmp_path) == []


@pytest.mark.postgres
def test_unknown_study_on_postgres_lists_studies(postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_study(tiny_config(search={"n_trials": 1}), postgres_url, str(tmp_path / "art"), "pg-kept", progress=False)
    rc, lines = run_cli(["show", "--storage", postgres_url, "--study-name", "pg-ghost"], capsys)
    assert rc == 2 and len(lines) == 1
    assert "studies there: pg-kept" in lines[0] and "postgres:***@" in lines[0]


def test_ls_of_a_foreign_database_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table notes (body text)")
    before = db.read_bytes()
    rc, lines = run_cli(["ls", "--storage", f"sqlite:///{db}"], capsys)
    assert rc == 2 and len(lines) == 1 and "is not a study storage" in lines[0], lines
    assert db.read_bytes() == before  # no Optuna tables were created in someone else's database


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """`dils-search ls | head -1`: the reader closing early is no error to report."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    run_study(tiny_config(search={"n_trials": 1}), url, str(tmp_path / "art"), "piped", progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "dils_search", "ls", "--storage", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before ls has written anything
    err = proc.stderr.read().decode()
    assert proc.wait() == 1 and err == "", err


def test_a_bug_is_reported_as_a_bug_not_as_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a DilsError is "bad input" (exit 2). A ValueError from inside our code or a library is a bug:
    one line that says so (exit 1), and the traceback under -v."""
    import dils_search.search.summary as summary
    from dils_search import ConfigError, DilsError

    url = f"sqlite:///{tmp_path / 's.db'}"
    run_study(tiny_config(search={"n_trials": 1}, final={"epochs": 0}), url, str(tmp_path / "art"), "b", progress=False)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("operands could not be broadcast together")  # as numpy would

    monkeypatch.setattr(summary, "summarize", broken)
    rc, err = run_cli(["show", "--storage", url, "--study-name", "b"], capsys)
    assert rc == 1 and len(err) == 1 and "internal error (a bug in dils-search" in err[0] and "-v" in err[0]
    rc, err = run_cli(["-v", "show", "--storage", url, "--study-name", "b"], capsys)
    assert rc == 1 and any(line.startswith("Traceback") for line in err)
    assert issubclass(ConfigError, DilsError) and issubclass(ConfigError, ValueError)
