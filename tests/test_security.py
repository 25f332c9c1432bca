"""Hostile files and names: checkpoints never execute code, nothing is written outside the artifact folder,
configs are data."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_config
from sqlalchemy import update

import dils_search
from dils_search.cli import main
from dils_search.core.checkpoint import CheckpointError, from_bytes, to_bytes
from dils_search.core.model import build
from dils_search.core.spec import MLPSpec
from dils_search.store import LineageStore, NodeMeta, NodeRow, StoreError, Trained

PACKAGE = Path(dils_search.__file__).resolve().parent


class Evil:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def hostile_torch_file(marker: Path) -> bytes:
    spec = MLPSpec(3, [4], 2, "relu", False)
    buf = io.BytesIO()
    torch.save({"format": "dils-search/1", "spec": spec.to_json(), "state_dict": Evil(marker)}, buf)
    return buf.getvalue()


def hostile_raw_pickle(marker: Path) -> bytes:
    return pickle.dumps({"spec": "{}", "state_dict": Evil(marker)})


PAYLOADS = {"torch-zip": hostile_torch_file, "raw-pickle": hostile_raw_pickle}


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_payload_is_really_hostile(kind: str, tmp_path: Path) -> None:
    """Prove the payload would run code if it were unpickled unsafely (in a throwaway process)."""
    marker = tmp_path / "proof"
    data = PAYLOADS[kind](marker)
    loader = "import torch, io, sys; torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False)"
    subprocess.run([sys.executable, "-c", loader], input=data, check=False, capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_hostile_checkpoint_bytes_are_refused(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(CheckpointError, match="refused: not a safe dils-search checkpoint"):
        from_bytes(PAYLOADS[kind](marker), source="evil.pt")
    assert not marker.exists()


def test_hostile_node_with_matching_sha256_is_refused_and_retrained(
    any_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An attacker who can write the artifact folder and the row (so the sha256 matches) still runs nothing."""
    marker = tmp_path / "pwned"
    store = LineageStore(any_url, tmp_path / "art")
    spec = MLPSpec(3, [4], 2, "relu", False)
    meta = NodeMeta(hashlib.sha256(b"victim").hexdigest(), None, 0, spec.to_json(), None, "{}")

    def train() -> Trained:
        return Trained(model=build(spec, seed=1), metrics={"val_metric": 0.5}, flops=1, seconds=0.0)

    store.get_or_train(meta, train)
    evil = hostile_torch_file(marker)
    store.artifact_path(meta.key).write_bytes(evil)
    store._tx(lambda s: s.execute(update(NodeRow).where(NodeRow.key == meta.key)
                                  .values(sha256=hashlib.sha256(evil).hexdigest())))
    fetched = store.get_or_train(meta, train)
    assert fetched.trained_here, "the hostile file must be treated as missing and the node retrained"
    assert not marker.exists()
    assert "refused" in caplog.text and meta.key[:12] in caplog.text
    assert from_bytes(store.artifact_path(meta.key).read_bytes())  # a clean checkpoint again
    store.close()


def test_cli_refuses_a_hostile_model_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(hostile_torch_file(marker))
    rc = main(["deepen", str(evil), "--insert", "1:8:dils-analytic", "--data", "digits", "--out", str(tmp_path / "o.pt")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "refused: not a safe dils-search checkpoint" in err[0], err
    with pytest.raises(CheckpointError):
        dils_search.load(evil)
    assert not marker.exists() and not (tmp_path / "o.pt").exists()


def test_data_files_with_pickled_objects_are_refused(tmp_path: Path) -> None:
    from dils_search.core.data import load_dataset

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w") as z:  # an .npz whose 'x' is an object array: loading it would unpickle
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.array([Evil(marker)], dtype=object), allow_pickle=True)
        z.writestr("x.npy", buf.getvalue())
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.arange(1))
        z.writestr("y.npy", buf.getvalue())
    with pytest.raises(ValueError, match="evil.npz.*could not be read"):
        load_dataset("file", path=str(path))
    assert not marker.exists()


# ---------------------------------------------------------------- the source itself


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute):
        return f"{_name_of(f.value)}.{f.attr}"
    return _name_of(f)


def _name_of(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name_of(node.value)}.{node.attr}"
    return "?"


SOURCES = sorted(PACKAGE.rglob("*.py"))


def _is_fixed_table_lookup(tree: ast.Module, arg: ast.expr) -> bool:
    """``f".{TABLE[name]}"`` where TABLE is a module-level dict literal of string constants."""
    if not (isinstance(arg, ast.JoinedStr) and len(arg.values) == 2 and isinstance(arg.values[0], ast.Constant)
            and arg.values[0].value == "." and isinstance(arg.values[1], ast.FormattedValue)):
        return False
    sub = arg.values[1].value
    if not (isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name)):
        return False
    tables = [n.value for n in tree.body if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == sub.value.id for t in n.targets)]
    return len(tables) == 1 and isinstance(tables[0], ast.Dict) and all(
        isinstance(v, ast.Constant) and isinstance(v.value, str)
        and all(part.isidentifier() for part in v.value.split(".")) for v in tables[0].values)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_source_loads_only_safe_data(path: Path) -> None:
    """Every torch.load passes weights_only=True; nothing evals, execs or unpickles; imports use fixed names."""
    tree = ast.parse(path.read_text(), str(path))
    for call in _calls(tree):
        name = _name(call)
        where = f"{path.name}:{call.lineno}"
        if name.endswith("torch.load") or name == "load" and any(k.arg == "weights_only" for k in call.keywords):
            kw = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value is True, where
        assert name not in {"eval", "exec", "compile", "pickle.load", "pickle.loads", "marshal.loads", "dill.load"}, where
        if name in {"np.load", "numpy.load"}:
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, where
        if name in {"__import__", "importlib.import_module", "import_module"}:
            # only names written in the source (a fixed tuple of plugin modules, or a lazy export
            # table of literal module names), never from a config
            if _is_fixed_table_lookup(tree, call.args[0]):
                continue
            assert isinstance(call.args[0], ast.Constant | ast.Name), where
            if isinstance(call.args[0], ast.Name):
                loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and isinstance(n.target, ast.Name)
                         and n.target.id == call.args[0].id]
                assert loops and all(isinstance(n.iter, ast.Tuple) and all(isinstance(e, ast.Constant) for e in n.iter.elts)
                                     for n in loops), where


def test_config_strings_are_only_looked_up_in_fixed_tables() -> None:
    """A config cannot name a class or function to load: unknown names are refused, known ones map to code here."""
    from dils_search.config import ConfigError, config_from_dict

    for section, field in [("search", "sampler"), ("search", "pruner"), ("search", "policy"), ("data", "dataset"),
                           ("model", "activation"), ("train", "optimizer")]:
        with pytest.raises(ConfigError, match="allowed:"):
            config_from_dict({section: {field: "subprocess.Popen"}})


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "key",
    ["../x", "../" + "a" * 61, "/etc/passwd", "a" * 63, "A" * 64, "a" * 63 + "/", "a" * 64 + "\0", "..", "",
     "a" * 32 + "/../" + "a" * 28, "a" * 65],
)
def test_node_keys_cannot_leave_the_artifact_folder(key: str, tmp_path: Path, sqlite_url: str) -> None:
    store = LineageStore(sqlite_url, tmp_path / "art")
    with pytest.raises(StoreError, match="not a sha256 hex digest"):
        store.artifact_path(key)
    meta = NodeMeta(key, None, 0, MLPSpec(3, [4], 2, "relu", False).to_json(), None, "{}")
    with pytest.raises(StoreError):
        store.get_or_train(meta, lambda: pytest.fail("never trains under a bad key"))  # type: ignore[arg-type, return-value]
    assert store.nodes() == []
    store.close()


def test_tampered_rows_cannot_redirect_reads_or_writes(sqlite_url: str, tmp_path: Path) -> None:
    """The row's artifact_uri is informative only; files are always <root>/<key>.pt."""
    store = LineageStore(sqlite_url, tmp_path / "art")
    spec = MLPSpec(3, [4], 2, "relu", False)
    meta = NodeMeta(hashlib.sha256(b"n").hexdigest(), None, 0, spec.to_json(), None, "{}")
    outside = tmp_path / "outside.pt"
    outside.write_bytes(to_bytes(build(spec, seed=99)))
    store.get_or_train(meta, lambda: Trained(model=build(spec, seed=1), metrics={}, flops=1, seconds=0.0))
    store._tx(lambda s: s.execute(update(NodeRow).where(NodeRow.key == meta.key).values(artifact_uri=str(outside))))
    record = store.get(meta.key)
    assert record is not None
    model = store.load_model(record)
    assert model is not None
    trained, planted = build(spec, seed=1).state_dict(), build(spec, seed=99).state_dict()
    got = model.state_dict()
    assert all(torch.equal(got[k], trained[k]) for k in got)
    assert not all(torch.equal(got[k], planted[k]) for k in got)
    store.close()


def test_study_names_with_slashes_never_make_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--study-name is only a database value: '../..' or '/' in it create no file anywhere."""
    work = tmp_path / "work"
    work.mkdir()
    cfg = tmp_path / "work" / "s.toml"
    from test_cli_errors import tiny_toml

    cfg.write_text(tiny_toml(search={"n_trials": 1}))
    before_parent = set(os.listdir(tmp_path))
    url = f"sqlite:///{work / 'studies.db'}"
    for name in ("../../escape", "/etc/escape", "a/../../b"):
        assert main(["run", str(cfg), "--storage", url, "--artifacts", str(work / "art"), "--study-name", name, "--quiet",
                     "--report", str(work / "report.html")]) == 0
    capsys.readouterr()
    assert set(os.listdir(tmp_path)) == before_parent
    assert not Path("/etc/escape").exists()
    optuna_artifacts = work / "art" / "optuna-artifacts"  # the delivered models, as Optuna artifacts (uuid names)
    for p in work.rglob("*"):
        assert (p.name in {"s.toml", "art", "report.html"} or p.name.startswith("studies.db")
                or p.parent in (work / "art", optuna_artifacts)), p
    for p in (work / "art").iterdir():
        assert p == optuna_artifacts or (len(p.name) == len("a" * 64 + ".pt") and p.suffix == ".pt"), p


def test_config_name_with_path_characters_is_refused() -> None:
    from dils_search.config import ConfigError

    for name in ("../x", "a/b", "a\\b", ".hidden", "nul\0byte"):
        with pytest.raises(ConfigError, match="name="):
            tiny_config(name=name)


def test_the_audit_sees_the_loads_it_checks() -> None:
    """Guard against a vacuous audit: the checkpoint and data loaders are found and checked."""
    names = {_name(c) for p in SOURCES for c in _calls(ast.parse(p.read_text()))}
    assert "torch.load" in names and "np.load" in names


# ---------------------------------------------------------------- tampered node files (reliability, round two)


def _finished_study(tmp_path: Path) -> tuple[str, Path, str, str]:
    """A tiny finished, finalized study: its URL, artifacts, best node key B and base node key K."""
    from dils_search.search.study import run_study
    from dils_search.search.summary import summarize

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    art = tmp_path / "art"
    cfg = tiny_config(search={"n_trials": 3, "max_steps": 1, "widths": [16], "inits": ["dils-analytic"]},
                      final={"epochs": 1, "top_k": 1})
    run_study(cfg, url, str(art), "t", progress=False)
    s = summarize(url, "t")
    store = LineageStore(url, art)
    base = next(r.key for r in store.nodes() if r.depth == 0 and r.recipe.get("mode") != "final")
    store.close()
    assert s.best_node_key is not None and s.best_node_key != base
    return url, art, s.best_node_key, base


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_symlink_in_the_artifacts_folder_never_destroys_another_node(tmp_path: Path) -> None:
    url, art, best, base = _finished_study(tmp_path)
    store = LineageStore(url, art)
    best_sha = store.get(best).sha256  # type: ignore[union-attr]
    (art / f"{base}.pt").unlink()
    os.symlink(art / f"{best}.pt", art / f"{base}.pt")  # ln -sf B.pt K.pt
    assert main(["resume", "--storage", url, "--study-name", "t", "--n-trials", "5", "--quiet"]) == 0
    assert not (art / f"{base}.pt").is_symlink()  # the link was replaced by the retrained base's own file
    assert _sha(art / f"{best}.pt") == best_sha  # and B's file was never written through it
    for r in store.nodes():
        if r.status == "ready":
            assert _sha(store.artifact_path(r.key)) == r.sha256
    assert main(["export", "--storage", url, "--study-name", "t", "--out", str(tmp_path / "m.pt"), "--no-final"]) == 0
    store.close()


def test_a_swapped_checkpoint_with_a_matching_sha256_is_refused_and_retrained(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, text

    url, art, best, base = _finished_study(tmp_path)
    shutil.copy(art / f"{base}.pt", art / f"{best}.pt")  # K's weights behind B's row ...
    engine = create_engine(url)
    with engine.begin() as conn:  # ... with B's sha256 updated to match
        conn.execute(text("UPDATE dils_nodes SET sha256 = :s WHERE key = :k"), {"s": _sha(art / f"{best}.pt"), "k": best})
    engine.dispose()
    store = LineageStore(url, art)
    record = store.get(best)
    assert record is not None and store.load_model(record) is None  # the spec check catches it
    out = tmp_path / "m.pt"
    assert main(["export", "--storage", url, "--study-name", "t", "--out", str(out), "--no-final"]) == 0
    assert dils_search.load(out).spec.hidden == record.spec["hidden"]  # B's architecture, retrained
    store.close()


def test_a_text_file_behind_a_node_is_retrained_not_a_crash(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, text

    url, art, best, base = _finished_study(tmp_path)
    (art / f"{base}.pt").write_text("this is not a checkpoint\n" * 10)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE dils_nodes SET sha256 = :s WHERE key = :k"), {"s": _sha(art / f"{base}.pt"), "k": base})
    engine.dispose()
    for _ in range(2):  # a stuck study would fail the same way every time
        assert main(["resume", "--storage", url, "--study-name", "t", "--n-trials", "5", "--quiet"]) == 0
    store = LineageStore(url, art)
    record = store.get(base)
    assert record is not None and store.load_model(record) is not None
    store.close()


def test_a_damaged_best_checkpoint_is_retrained_by_export_once_the_budget_is_met(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url, art, best, _ = _finished_study(tmp_path)
    (art / f"{best}.pt").write_bytes(b"\x00" * 100)
    assert main(["export", "--storage", url, "--study-name", "t", "--out", str(tmp_path / "a.pt"), "--no-final"]) == 0
    assert main(["show", "--storage", url, "--study-name", "t"]) == 0
    out = capsys.readouterr().out
    assert "duplicate trainings 0; retrained after damage 1" in out  # a repair is not a duplicate
    final = LineageStore(url, art).get(json.loads(_show_json(url, capsys))["final"]["node_key"])
    assert final is not None
    (art / f"{final.key}.pt").write_bytes(b"junk")  # the delivered model too: export retrains it
    assert main(["export", "--storage", url, "--study-name", "t", "--out", str(tmp_path / "b.pt")]) == 0


def _show_json(url: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["show", "--storage", url, "--study-name", "t", "--json"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("content", [b"hello\n", b"\x80\x02]q\x00(K\x01e."])
def test_deepen_and_load_refuse_non_checkpoints_in_one_line(content: bytes, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError):
        dils_search.load(bad)
    capsys.readouterr()
    rc = main(["deepen", str(bad), "--insert", "1:8:dils-analytic", "--data", "digits", "--out", str(tmp_path / "o.pt")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "checkpoint" in err[0], err
    assert not (tmp_path / "o.pt").exists()
