"""The finalize stage on real databases: the delivered model is a leased, sha256-checked node of the
lineage store (a child of its winner), `finalize` is idempotent, and a SIGKILL while finalizing is
repaired by `resume`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import raw_test_rows, tiny_config

import dils_search
from dils_search.cli import main
from dils_search.config import ConfigError
from dils_search.search.finalize import finalize_study
from dils_search.search.study import run_study
from dils_search.search.trainers import make_task
from dils_search.store import LineageStore

FINAL_KEYS = {"val_metric", "test_metric", "flops", "seconds", "hidden", "node_key", "from_node"}


def _final_nodes(store: LineageStore) -> list[Any]:
    return [r for r in store.nodes() if r.recipe.get("mode") == "final"]


def _show(url: str, name: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["show", "--storage", url, "--study-name", name, "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_run_finalizes_and_finalize_again_trains_nothing(any_url: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(search={"n_trials": 4}, final={"epochs": 3, "top_k": 2})
    art = tmp_path / "art"
    run_study(cfg, any_url, str(art), "fin", progress=False)
    shown = _show(any_url, "fin", capsys)
    final = shown["final"]
    assert FINAL_KEYS <= set(final) and not final["stale"]
    store = LineageStore(any_url, str(art))
    finals = _final_nodes(store)
    assert len(finals) == 2 and final["node_key"] in {r.key for r in finals}
    for r in finals:  # a child of its winner, intact on disk, keyed by the final recipe
        assert r.status == "ready" and r.parent_key is not None and store.get(r.parent_key) is not None
        assert hashlib.sha256(store.artifact_path(r.key).read_bytes()).hexdigest() == r.sha256
        assert r.recipe["epochs"] == 3 and r.recipe["schedule"] == "cosine"
    delivered = next(r for r in finals if r.key == final["node_key"])
    assert delivered.parent_key == final["from_node"]
    assert final["val_metric"] == max(float(r.metrics["val_metric"]) for r in finals)  # best by validation after
    assert final["flops"] == sum(r.own_flops for r in finals) > 0
    assert final["hidden"] == delivered.spec["hidden"]
    # the search's best architecture is always among the finalized ones
    assert final["search_best_node"] in {r.parent_key for r in finals}
    counts = store.training_counts()
    capsys.readouterr()
    assert main(["finalize", "--storage", any_url, "--study-name", "fin", "--quiet"]) == 0
    assert "0 trained now" in capsys.readouterr().out
    assert store.training_counts() == counts  # idempotent
    assert _show(any_url, "fin", capsys)["final"]["node_key"] == final["node_key"]
    # export writes the delivered model by default
    out = tmp_path / "m.pt"
    assert main(["export", "--storage", any_url, "--study-name", "fin", "--out", str(out)]) == 0
    task = make_task(cfg, "cpu")
    model = dils_search.load(out)  # it takes the raw test rows: the standardisation is inside it
    got = dils_search.evaluate(model, *raw_test_rows(cfg), task.data.task)["metric"]
    assert got == pytest.approx(final["test_metric"], abs=1e-6)
    assert dils_search.evaluate(model.net, task.data.x_test, task.data.y_test, task.data.task)["metric"] == got
    store.close()


def test_finalize_options_and_off_switch(sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(search={"n_trials": 3}, final={"epochs": 0})
    art = str(tmp_path / "art")
    run_study(cfg, sqlite_url, art, "off", progress=False)
    assert _show(sqlite_url, "off", capsys)["final"] is None  # epochs = 0 turns the stage off
    store = LineageStore(sqlite_url, art)
    assert _final_nodes(store) == []
    result = finalize_study(sqlite_url, "off", epochs=2, top_k=1, progress=False)  # on demand
    assert result is not None and result.top_k == 1 and len(_final_nodes(store)) == 1
    assert _show(sqlite_url, "off", capsys)["final"]["epochs"] == 2
    store.close()
    for bad in (["--top-k", "0"], ["--epochs", "-1"]):
        assert main(["finalize", "--storage", sqlite_url, "--study-name", "off", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is out of range; allowed: >=" in err, err


@pytest.mark.parametrize(("section", "message"), [
    ({"top_k": 0}, "final.top_k=0 must be > 0"),
    ({"schedule": "step"}, "final.schedule='step' is unknown"),
    ({"epochs": -1}, "final.epochs=-1 must be >= 0"),
    ({"warmup": 1}, "final.warmup is not a known key"),
])
def test_final_section_is_validated(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        tiny_config(final=section)


def test_stale_final_after_more_trials(sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(search={"n_trials": 2}, final={"epochs": 1, "top_k": 1})
    run_study(cfg, sqlite_url, str(tmp_path / "art"), "st", progress=False)
    run_study(cfg, sqlite_url, str(tmp_path / "art"), "st", n_trials=4, progress=False, finalize=False)
    assert _show(sqlite_url, "st", capsys)["final"]["stale"]
    assert main(["finalize", "--storage", sqlite_url, "--study-name", "st", "--quiet"]) == 0
    assert not _show(sqlite_url, "st", capsys)["final"]["stale"]


def _final_training(url: str, art: Path) -> bool:
    """Whether a finalized node is being trained (read-only: the run creates the storage itself)."""
    from sqlalchemy.exc import SQLAlchemyError

    from dils_search.store import StoreError

    if not art.is_dir() or not any(art.glob("*.pt")):  # the run has not trained a node yet: leave its files alone
        return False
    try:
        store = LineageStore(url, str(art), create=False)
        try:
            return any(r.status != "ready" for r in _final_nodes(store))
        finally:
            store.close()
    except (SQLAlchemyError, StoreError):  # not created yet
        return False


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_during_finalize_then_resume(backend: str, tmp_path: Path, request: pytest.FixtureRequest,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`run` is SIGKILLed while it trains a finalized node; `resume` takes the lease over once it
    expires, finishes the stage, and no node is trained twice to completion."""
    url = f"sqlite:///{tmp_path / 'k.db'}" if backend == "sqlite" else str(request.getfixturevalue("postgres_url"))
    art = tmp_path / "art"
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        'name = "k"\n[data]\ndataset = "synthetic"\nnum_samples = 2000\n[model]\nhidden = [16]\n'
        '[train]\nbase_epochs = 1\nepochs_per_step = 1\nbatch_size = 32\n'
        '[search]\nmax_steps = 1\nwidths = [16]\nn_trials = 2\nsampler = "random"\n'
        '[final]\nepochs = 400\ntop_k = 1\n[storage]\nheartbeat_interval = 1\ngrace_period = 3\nlease_seconds = 3.0\n',
        encoding="utf-8")
    run = subprocess.Popen([sys.executable, "-m", "dils_search", "run", str(cfg), "--storage", url,
                            "--artifacts", str(art), "--quiet"], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=open(tmp_path / "run.err", "w"))  # noqa: SIM115
    deadline = time.monotonic() + 120
    while not _final_training(url, art):
        assert run.poll() is None, (tmp_path / "run.err").read_text()
        assert time.monotonic() < deadline, "the finalize stage never started"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    # resume with a short decay phase would key a different node: keep the recipe, let it train
    assert main(["resume", "--storage", url, "--study-name", "k", "--quiet"]) == 0
    store = LineageStore(url, str(art))
    finals = _final_nodes(store)
    assert len(finals) == 1 and finals[0].status == "ready"
    assert hashlib.sha256(store.artifact_path(finals[0].key).read_bytes()).hexdigest() == finals[0].sha256
    assert set(store.training_counts().values()) == {1}  # every node trained to completion exactly once
    assert store.training_counts("abandoned").get(finals[0].key) == 1  # the killed holder's attempt
    store.close()
    shown = _show(url, "k", capsys)
    assert shown["final"]["node_key"] == finals[0].key


@pytest.mark.parametrize("same", [True, False])
def test_the_before_finalizing_line_names_a_node_once(same: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """The delivered model's source node is named only when it is not the search's best node."""
    from types import SimpleNamespace

    from dils_search.cli.common import _print_finish

    final = {"epochs": 5, "top_k": 2, "hidden": [32], "val_metric": 0.97, "test_metric": 0.96, "params": 100,
             "flops": 1e9, "search_best_node": "a" * 64, "search_best_val": 0.95, "search_best_test": 0.94,
             "from_node": "a" * 64 if same else "b" * 64, "search_val": 0.95 if same else 0.93, "search_test": 0.9}
    s = SimpleNamespace(n_trials=3, states={"COMPLETE": 3}, best_node_key="a" * 64, best_node_trial=1, best_trial=1,
                        best_path=[], best_hidden=[32], best_val=0.95, best_test=0.94, best_params=100, nodes=3,
                        nodes_trained=3, node_uses_reused=0, flops_spent=1e9, scratch_equivalent_flops=2e9, final=final,
                        budget={"budget_flops": None, "search_cap": None, "search_flops": 1e9, "final_flops": 1e9,
                                "delivered_flops": 2e9})
    _print_finish("sqlite:///x.db", "s", None, s)
    line = next(x for x in capsys.readouterr().out.splitlines() if "before finalizing" in x)
    assert line.count("validation") == (1 if same else 2)
    assert ("came from another node, at validation 0.9300, test 0.9000" in line) is not same
