"""The compute budget (``search.budget_flops``, ``search/budget.py``) and the ``plain`` policy, on real
storages: the search stops at ``(1 - final.share)`` of the budget, the finalize stage spends the rest,
a study never ends more than one node over, a SIGKILLed run resumes with its budget, and ``compare``'s
plain network trains for the same budget and shows in the summary and the verdict."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import tiny_config
from test_cli_errors import to_toml

from dils_search.config import PLAIN_HIDDEN, ConfigError, StudyConfig
from dils_search.report.compare import run_compare, summarize_compare
from dils_search.search.attrs import BUDGET_SPENT
from dils_search.search.budget import epoch_flops, final_epochs, plain_epochs, search_cap
from dils_search.search.storage import read_study, study_config
from dils_search.search.study import run_study
from dils_search.search.summary import summarize
from dils_search.search.trainers import make_task
from dils_search.store import LineageStore


def _epoch(cfg: StudyConfig) -> int:
    """Training FLOPs of one epoch of the base of ``cfg``."""
    task = make_task(cfg, "cpu")
    return epoch_flops(task.base, task.data.size("train"))


def _budgeted(budget_epochs: float, **sections: Any) -> StudyConfig:
    """The tiny config with a budget of ``budget_epochs`` base epochs and room for many trials."""
    cfg = tiny_config(search={"n_trials": 200}, **sections)
    return cfg.replace(search={"budget_flops": float(budget_epochs * _epoch(cfg))})


def _largest_node(url: str, art: Path, name: str) -> int:
    store = LineageStore(url, str(art), create=False)
    try:
        keys = {k for t in read_study(url, name).trials for k in t.user_attrs.get("trained_keys", [])}
        return max(r.own_flops for r in store.nodes(sorted(keys)))
    finally:
        store.close()


def test_budget_refusals_name_the_field() -> None:
    cfg = tiny_config()
    cases = [({"search": {"budget_flops": -1.0}}, "search.budget_flops=-1.0 must be >= 0"),
             ({"final": {"share": 0.0}}, "final.share=0.0 must be between 0 and 1"),
             ({"final": {"share": 1.5}}, "final.share=1.5 must be between 0 and 1"),
             ({"search": {"budget_flops": 1e9, "max_flops": 1e9}}, "cannot be set with search.budget_flops"),
             ({"compare": [{"policy": "optuna", "hidden": [8]}]}, "compare[0].hidden is only for policy='plain'"),
             ({"compare": [{"policy": "plain", "hidden": [0]}]}, "compare[0].hidden[0]=0 must be > 0"),
             ({"compare": [{"policy": "plain", "hidden": "wide"}]}, "compare[0].hidden='wide' must be a non-empty list")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            cfg.replace(**change)


def test_final_epochs_split_what_is_left() -> None:
    spec = make_task(tiny_config(), "cpu").base
    one = epoch_flops(spec, 100)
    assert final_epochs(7.5 * one, [spec, spec], 100) == [3, 3]
    assert final_epochs(1.5 * one, [spec, spec], 100) == [1]  # too little for two: the best one alone
    assert final_epochs(0.5 * one, [spec], 100) == []  # not one epoch: delivered as trained
    assert plain_epochs(9.99 * one, spec, 100) == 9


@pytest.mark.slow
def test_budget_caps_search_and_finalize(any_url: str, tmp_path: Path) -> None:
    """SQLite and PostgreSQL: the search stops at its share, finalizing spends the rest, all within budget."""
    cfg = _budgeted(40)
    art = tmp_path / "art"
    run_study(cfg, any_url, str(art), progress=False)
    study = read_study(any_url, cfg.name)
    trials = study.trials
    assert len(trials) < cfg.search.n_trials  # the budget ended the search (its last trial says so, or the cap is met)
    s = summarize(any_url, cfg.name)
    b, budget, cap = s.budget, cfg.search.budget_flops, search_cap(cfg)
    assert b["budget_flops"] == budget and b["search_cap"] == pytest.approx(0.5 * budget)
    largest = _largest_node(any_url, art, cfg.name)
    assert b["search_flops"] <= cap + largest  # at most one node over
    assert b["search_flops"] > cap - largest  # and it did use its share
    assert b["search_flops"] >= cap or any(t.user_attrs.get(BUDGET_SPENT) for t in trials)
    final = study.final
    assert final is not None and final["epochs"] >= 1
    left = budget - b["search_flops"]
    assert b["final_flops"] == final["flops"] <= left
    delivered = make_task(cfg.replace(model={"hidden": final["hidden"]}), "cpu")
    per = epoch_flops(delivered.base, delivered.data.size("train"))
    assert final["epochs"] == min(int(left / final["top_k"] // per), 100_000)  # derived from the budget
    assert b["delivered_flops"] <= 1.10 * budget


@pytest.mark.slow
def test_sigkilled_budget_run_resumes_with_its_budget(tmp_path: Path) -> None:
    cfg = _budgeted(40)
    config = tmp_path / "tiny.toml"
    data = cfg.to_dict()
    data.pop("compare")
    data["search"]["budget_flops"] = 0.0  # the budget comes from the command line, and is stored
    config.write_text(to_toml(data))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    cmd = [sys.executable, "-m", "dils_search"]
    proc = subprocess.Popen([*cmd, "run", str(config), "--storage", url, "--artifacts", str(tmp_path / "art"),
                             "--budget-flops", repr(cfg.search.budget_flops), "--quiet", "--no-report"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it once a trial has finished, mid-search
        try:
            done = [t for t in optuna.load_study(study_name=cfg.name, storage=url).trials if t.state.is_finished()]
        except Exception:  # the study is not created yet
            done = []
        if done:
            break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert study_config(url, cfg.name)[0].search.budget_flops == cfg.search.budget_flops
    assert read_study(url, cfg.name).final is None
    out = subprocess.run([*cmd, "resume", "--storage", url, "--study-name", cfg.name, "--quiet", "--no-report"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = json.loads(subprocess.run([*cmd, "show", "--storage", url, "--study-name", cfg.name, "--json"],
                                      cwd=tmp_path, capture_output=True, text=True, check=True).stdout)
    b = shown["budget"]
    assert b["budget_flops"] == cfg.search.budget_flops and shown["final"] is not None
    assert b["delivered_flops"] <= 1.10 * cfg.search.budget_flops
    assert shown["n_trials"] < cfg.search.n_trials  # the budget, not the trial count, ended it
    assert "budget:" in subprocess.run([*cmd, "show", "--storage", url, "--study-name", cfg.name], cwd=tmp_path,
                                       capture_output=True, text=True, check=True).stdout


def test_resume_budget_is_checked_before_it_is_stored(sqlite_url: str, tmp_path: Path) -> None:
    from dils_search.cli import main

    cfg = tiny_config(search={"n_trials": 1, "max_flops": 1e12})
    run_study(cfg, sqlite_url, str(tmp_path / "art"), progress=False, finalize=False)
    before = study_config(sqlite_url, cfg.name)[0]
    rc = main(["resume", "--storage", sqlite_url, "--study-name", cfg.name, "--budget-flops", "1e9", "--quiet",
               "--no-report"])
    assert rc == 2 and study_config(sqlite_url, cfg.name)[0] == before


@pytest.mark.slow
def test_plain_policy_trains_one_network_for_the_budget(sqlite_url: str, tmp_path: Path) -> None:
    """With a budget: the plain network trains once for the epochs the budget pays for, is delivered
    as trained, and shows in summary.json and the verdict."""
    cfg = _budgeted(40, compare=[{"policy": "optuna", "init": "dils-analytic"}, {"policy": "plain", "hidden": [16, 16]}])
    art = str(tmp_path / "art")
    groups = run_compare(cfg, sqlite_url, art, progress=False)
    rows, _ = summarize_compare(sqlite_url, groups, art)
    plain = next(r for r in rows if r.policy == "plain")
    (name,) = groups["plain"]
    stored = study_config(sqlite_url, name)[0]
    assert list(stored.model.hidden) == [16, 16] and stored.train.schedule == "cosine"
    task = make_task(stored, "cpu")
    epochs = plain_epochs(cfg.search.budget_flops, task.base, task.data.size("train"))
    assert stored.train.base_epochs == epochs
    study = read_study(sqlite_url, name)
    assert [t.state for t in study.trials] == ["COMPLETE"]
    final = study.final
    assert final is not None and final["epochs"] == 0 and final["flops"] == 0  # delivered as trained
    node = LineageStore(sqlite_url, art, create=False).get(final["node_key"])
    assert node is not None and node.metrics["epochs"] == epochs and node.depth == 0
    assert plain.final_test == pytest.approx(final["test_metric"])
    assert plain.delivered_flops is not None and plain.delivered_flops <= cfg.search.budget_flops
    from dils_search.report import verdict

    lines = verdict(rows)
    assert any(line.startswith("optuna/dils-analytic: DILS ") and "the plain network" in line for line in lines)


@pytest.mark.slow
def test_plain_policy_without_a_budget_takes_the_first_growing_policys(sqlite_url: str, tmp_path: Path) -> None:
    cfg = tiny_config(search={"n_trials": 3}, compare=[{"policy": "plain"}, {"policy": "optuna", "init": "dils-analytic"}])
    art = str(tmp_path / "art")
    groups = run_compare(cfg, sqlite_url, art, progress=False)
    from dils_search.report.compare import delivered_flops

    dils = delivered_flops(sqlite_url, groups["optuna/dils-analytic"][0])
    stored = study_config(sqlite_url, groups["plain"][0])[0]
    assert dils and stored.search.budget_flops == dils and list(stored.model.hidden) == PLAIN_HIDDEN["mlp"]
    summary = json.loads(json.dumps([r.to_dict() for r in summarize_compare(sqlite_url, groups, art)[0]]))
    row = next(r for r in summary if r["policy"] == "plain")
    assert row["final_test"] is not None and row["delivered_flops"] > 0
    assert stored.train.base_epochs == 1  # 256x256 on this tiny task: not even one epoch fits; it gets one, said in a warning


def test_a_study_takes_a_new_budget_but_not_a_new_search(sqlite_url: str, tmp_path: Path) -> None:
    """`run`/`compare` with another --budget-flops continue the study with it stored; another search is refused."""
    from dils_search.search.study import create_study

    cfg = tiny_config(search={"budget_flops": 1e9})
    LineageStore(sqlite_url, str(tmp_path / "art")).close()  # the schema, as run_study makes it first
    create_study(cfg, sqlite_url, str(tmp_path / "art"), "s")
    create_study(cfg.replace(search={"budget_flops": 2e9}), sqlite_url, str(tmp_path / "art"), "s")
    assert study_config(sqlite_url, "s")[0].search.budget_flops == 2e9
    with pytest.raises(ConfigError, match="different config"):
        create_study(cfg.replace(search={"budget_flops": 3e9, "max_steps": 1}), sqlite_url, str(tmp_path / "art"), "s")
    assert study_config(sqlite_url, "s")[0].search.budget_flops == 2e9  # nothing written by the refused one
