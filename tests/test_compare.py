"""``dils-search compare``: outputs, study names, resumability (no node retrained) and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config

from dils_search.cli import main
from dils_search.config import ConfigError
from dils_search.report.compare import ROW_FIELDS, compare_entries, entry_config, study_name
from dils_search.search.study import list_studies, load_study, study_config
from dils_search.store import LineageStore

ENTRIES = [{"policy": "optuna", "init": "dils-analytic"}, {"policy": "scratch", "init": "random", "label": "scratch"}]
REQUIRED = ["policy", "best_val", "best_test", "flops_to_target", "seconds_to_target", "total_flops", "total_seconds",
            "params"]


def _write_config(path: Path, entries: list[dict[str, Any]] = ENTRIES, n_trials: int = 3) -> Path:
    cfg = tiny_config(search={"n_trials": n_trials, "max_steps": 1})
    lines = [f'name = "{cfg.name}"', "seed = 0",
             '[data]\ndataset = "synthetic"\nnum_samples = 600',
             "[model]\nhidden = [8]",
             "[train]\nbase_epochs = 2\nepochs_per_step = 1\nbatch_size = 64\nlr = 0.01",
             "[grow]\ncalib_size = 256\napprox_epochs = 5",
             f'[search]\nmax_steps = 1\nwidths = [8, 16]\ninits = ["dils-analytic", "identity"]\nn_trials = {n_trials}\n'
             'sampler = "random"',
             "[storage]\nheartbeat_interval = 1\ngrace_period = 3\nlease_seconds = 5.0"]
    for e in entries:
        lines.append("[[compare]]\n" + "\n".join(f'{k} = "{v}"' for k, v in e.items()))
    path.write_text("\n\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)  # module fixtures run before conftest's autouse one
    root = tmp_path_factory.mktemp("compare")
    config = _write_config(root / "cmp.toml")
    args: list[str] = ["compare", str(config), "--out", str(root / "out"), "--storage", f"sqlite:///{root / 'c.db'}",
            "--artifacts", str(root / "art"), "--quiet"]
    assert main(args) == 0
    return {"root": root, "args": args, "url": f"sqlite:///{root / 'c.db'}", "art": root / "art", "out": root / "out",
            "config": config}


def test_outputs_have_the_documented_columns(first_run: dict[str, Any]) -> None:
    out = first_run["out"]
    rows = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in rows] == ["optuna/dils-analytic", "scratch"]
    for r in rows:
        assert set(REQUIRED) <= set(r) and r["seeds"] == 1 and r["trials"] == 3
        assert (r["flops_to_target"] is None) == (r["seconds_to_target"] is None) == (r["target_reached"] == 0)
        assert r["total_flops"] > 0 and r["params"] > 0 and 0 <= r["best_test"] <= 1
    winner = max(rows, key=lambda r: r["best_val"])
    assert winner["target_reached"] == 1 and winner["flops_to_target"] <= winner["total_flops"]
    assert rows[0]["target"] == pytest.approx(winner["best_val"] - 0.005)
    with open(out / "summary.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ROW_FIELDS
        csv_rows = list(reader)
    for c, j in zip(csv_rows, rows, strict=True):
        assert c["policy"] == j["policy"]
        assert c["flops_to_target"] == ("" if j["flops_to_target"] is None else str(j["flops_to_target"]))
    html = (out / "report.html").read_text()
    assert "Growth tree: optuna/dils-analytic" in html and "Growth tree: scratch" in html
    assert "scratch:" in html or "beat scratch" in html


def test_each_policy_and_seed_is_its_own_named_study(first_run: dict[str, Any]) -> None:
    names = sorted(s.study_name for s in list_studies(first_run["url"]))
    assert names == ["tiny--optuna_dils-analytic--s0", "tiny--scratch--s0"]
    scratch = load_study(first_run["url"], "tiny--scratch--s0")
    assert study_config(first_run["url"], scratch.study_name)[0].search.policy == "scratch"


def test_rerun_continues_and_never_retrains(first_run: dict[str, Any], capsys: Any) -> None:
    url, art, args = first_run["url"], first_run["art"], first_run["args"]
    store = LineageStore(url, art)
    before = store.training_counts()
    assert main([a for a in args if a != "--quiet"]) == 0  # same budget: nothing to do
    assert store.training_counts() == before
    assert capsys.readouterr().err.count("already has 3 finished trial(s); nothing to search") == 2
    _write_config(first_run["config"], n_trials=4)  # a larger budget in the config is allowed...
    assert main([*args, "--seeds", "2"]) == 0  # ...and continues s0, and adds a new seed s1
    after = store.training_counts()
    assert set(after.values()) == {1}, "a node was trained twice"
    assert {k: after[k] for k in before} == before
    for name in ("tiny--optuna_dils-analytic--s0", "tiny--scratch--s0", "tiny--scratch--s1"):
        assert len([t for t in load_study(url, name).trials if t.state.is_finished()]) == 4
    rows = json.loads((first_run["out"] / "summary.json").read_text())
    assert all(r["seeds"] == 2 and r["trials"] == 8 and r["best_val_std"] is not None for r in rows)
    printed = capsys.readouterr().out
    assert "| policy" in printed and "optuna/dils-analytic" in printed and "wrote" in printed
    store.close()


def test_rerun_refuses_a_changed_recipe(first_run: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    changed = first_run["config"].read_text().replace("lr = 0.01", "lr = 0.02")
    (tmp_path / "cmp.toml").write_text(changed)
    args = [a if not a.endswith("cmp.toml") else str(tmp_path / "cmp.toml") for a in first_run["args"]]
    store = LineageStore(first_run["url"], first_run["art"])
    before = store.training_counts()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists in this storage with train.lr=0.01" in err and "0.02" in err
    assert store.training_counts() == before
    store.close()


def test_entries_labels_and_configs() -> None:
    cfg = tiny_config(compare=[{"policy": "optuna", "init": "identity"}, {"policy": "scratch"},
                               {"policy": "greedy", "label": "autogrow", "sampler": "tpe"}])
    entries = compare_entries(cfg)
    assert [e.label for e in entries] == ["optuna/identity", "scratch", "autogrow"]
    c = entry_config(cfg, entries[0], 3)
    assert (c.seed, c.search.policy, c.search.inits, c.compare) == (3, "optuna", ["identity"], [])
    assert entry_config(cfg, entries[2], 0).search.sampler == "tpe"
    assert study_name(cfg, entries[0], 3) == "tiny--optuna_identity--s3"
    with pytest.raises(ConfigError, match=r"compare=\[\] must list"):
        compare_entries(tiny_config())
    with pytest.raises(ConfigError, match=r"compare\[1\].label='scratch' is used twice"):
        compare_entries(tiny_config(compare=[{"policy": "scratch"}, {"policy": "scratch"}]))


@pytest.mark.parametrize(
    "entries, extra, message",
    [
        ([], [], "compare=[] must list the policies"),
        ([{"policy": "grid"}], [], "compare[0].policy='grid' is unknown"),
        ([{"policy": "optuna", "init": "zero"}], [], "compare entry 'optuna/zero': search.inits[0]='zero' is impossible here"),
        (ENTRIES, ["--seeds", "0"], "argument --seeds: '0' is out of range; allowed: >= 1"),
        (ENTRIES, ["--n-trials", "0"], "argument --n-trials: '0' is out of range; allowed: >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: Any, entries: list[dict[str, Any]],
                                          extra: list[str], message: str) -> None:
    config = _write_config(tmp_path / "bad.toml", entries)
    code = main(["compare", str(config), "--out", str(tmp_path / "o"), "--storage", f"sqlite:///{tmp_path / 'b.db'}",
                 "--artifacts", str(tmp_path / "art"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "o").exists()
