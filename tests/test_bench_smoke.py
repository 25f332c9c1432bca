"""Every benchmark script's ``--quick`` mode, run as a real subprocess: it must exit 0, print JSON,
and write its files. Slow (tens of seconds each); CI runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

pytestmark = pytest.mark.slow


def run_quick(script: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--quick", "--out", str(out), *extra],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_bench_train_loop_quick(tmp_path: Path) -> None:
    out = run_quick("bench_train_loop.py", tmp_path)
    assert out["benchmark"] == "train_loop"
    assert out["threads"] == 1
    for r in out["results"]:
        assert r["train_epoch_s_median"] > 0 and r["bare_epoch_s_median"] > 0
        assert r["ratio_median"] > 0
    assert (tmp_path / "bench_train_loop.json").is_file()


def test_bench_stability_quick(tmp_path: Path) -> None:
    out = run_quick("bench_stability.py", tmp_path)
    (entry,) = out["summary"]
    for arm in ("scratch", "grown"):
        assert entry[arm]["diverged"] + len([t for t in entry[arm]["tests"] if t is not None]) == entry["seeds"]
    for run in out["runs"]:  # equal compute: scratch gets at least the grown arm's FLOPs, less than one epoch more
        assert run["scratch"]["flops"] >= run["grown"]["flops"]
    html = (tmp_path / "bench_stability.html").read_text(encoding="utf-8")
    assert "plotly" in html and 'src="https://cdn.plot.ly' not in html


def test_bench_search_quick(tmp_path: Path) -> None:
    out = run_quick("bench_search.py", tmp_path)
    policies = {r["policy"] for r in out["runs"]}
    assert policies == {"optuna/dils-analytic", "optuna/dils-approx", "optuna/identity", "optuna/random", "scratch"}
    for r in out["runs"]:
        assert r["duplicate_trainings"] == 0
        assert r["best_test"] is not None
    assert out["analysis"]["synthetic"]["dils_target"] is not None
    full = json.loads((tmp_path / "bench_search.json").read_text(encoding="utf-8"))
    for r in full["runs"]:  # the curves are cumulative
        flops = [p["flops"] for p in r["curve"]]
        assert flops == sorted(flops)
    assert (tmp_path / "bench_search.html").stat().st_size > 100_000  # plotly.js embedded


def test_bench_overhead_quick(tmp_path: Path) -> None:
    pg = os.environ.get("DILS_TEST_POSTGRES_URL")
    extra = ["--postgres", pg] if pg else ["--no-postgres"]
    out = run_quick("bench_overhead.py", tmp_path, *extra)
    if os.environ.get("DILS_REQUIRE_POSTGRES"):
        assert "postgresql" in out["backends"]
    for backend in out["backends"]:
        (share,) = out["study_share"][backend]
        assert 0 <= share["store_share"] < 1
        assert share["training_s"] > 0
        big = out["big_study"][backend]
        assert big["trials"] == 20
        assert big["cli"]["ls"]["process_s_median"] > 0
    assert (tmp_path / "bench_overhead.json").is_file()


def test_bench_inherit_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_inherit.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows and {"task", "init", "position", "width", "gap", "acc_before", "acc_after", "acc_finetuned"} <= set(rows[0])
    exact = [r for r in rows if r["init"] == "dils-analytic" and r["width"] >= r["incoming"] and r["basis"] == "channel"]
    assert exact and all(r["gap"] < 1e-4 and r["acc_after"] == r["acc_before"] for r in exact)
    for name in ("results.json", "summary.md", "inherit.html"):
        assert (tmp_path / name).is_file()


def test_bench_finetune_quick(tmp_path: Path) -> None:
    """The fine-tune benchmark on the digits tasks (784-pixel and 64-pixel MLPs, residual): every
    inherited case is summarised against the parent and the random insertion, and none ends at chance."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_finetune.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows, summary = [r for r in lines if "task" in r], lines[-1]
    assert {r["task"] for r in rows} == {"digits784", "digits-mlp", "digits-residual"}
    assert {"before", "right_after", "after_1", "after_3", "after_5"} <= set(rows[0])
    assert summary["inherited_cases"] > 0 and summary["at_chance"] == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert all({"delta_pp", "reference", "meets"} <= set(c) for c in result["cases"])
    for name in ("summary.md", "finetune.html"):
        assert (tmp_path / name).is_file()


def test_bench_budget_tiny(tmp_path: Path) -> None:
    """bench_budget on a tiny synthetic config, one seed: a row per policy, the plain one within budget."""
    config = tmp_path / "tiny.toml"
    config.write_text('name = "tiny"\n[data]\ndataset = "synthetic"\nnum_samples = 600\ntask = "classification"\n'
                      '[model]\nhidden = [16]\n[train]\nbase_epochs = 2\nepochs_per_step = 1\n'
                      '[search]\nmax_steps = 1\nwidths = [16]\nsampler = "random"\n')
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_budget.py"), str(config), "--plain-epochs", "2",
                           "--seeds", "1", "--n-trials", "8", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows, summary = lines[:-1], lines[-1]
    assert [r["policy"] for r in rows] == ["optuna/dils-analytic", "plain"]
    assert all(r["final_test"] is not None and r["over_budget"] <= 1.10 for r in rows)
    assert "delta_pp_vs_plain" in summary and any("plain network" in v for v in summary["verdict"])
    assert (tmp_path / "out" / "budget.html").is_file() and (tmp_path / "out" / "results.json").is_file()
