"""The thread count is one setting (``--threads`` / ``$DILS_NUM_THREADS`` / ``GrowthTree(threads=)``):
a study resumed on another thread count reuses every stored node, and each node records the
thread count and device it was trained with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from dils_search.store import LineageStore

CONFIG = """
name = "threads"
seed = 0
[data]
dataset = "synthetic"
num_samples = 600
task = "classification"
[model]
hidden = [8]
[train]
base_epochs = 2
epochs_per_step = 1
batch_size = 64
lr = 0.01
[grow]
calib_size = 256
approx_epochs = 5
[search]
max_steps = 2
widths = [8, 16]
inits = ["dils-analytic", "identity"]
n_trials = 3
sampler = "random"
[final]
top_k = 1
epochs = 1
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "dils_search", *args], capture_output=True, text=True, cwd=cwd,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_resume_on_another_thread_count_reuses_every_node(tmp_path: Path) -> None:
    (tmp_path / "threads.toml").write_text(CONFIG)
    url, art = f"sqlite:///{tmp_path / 's.db'}", str(tmp_path / "art")
    common = ("--storage", url, "--artifacts", art, "--no-report", "--quiet")
    _cli("--threads", "1", "run", "threads.toml", *common, cwd=tmp_path)
    store = LineageStore(url, art)
    first = {r.key: r.metrics for r in store.nodes()}
    assert first and {m["threads"] for m in first.values()} == {1}
    assert {m["device"] for m in first.values()} == {"cpu"}

    _cli("--threads", "2", "resume", "--study-name", "threads", "--n-trials", "6", *common, cwd=tmp_path)
    counts = store.training_counts()
    assert max(counts.values()) == 1, "a node was trained again after resuming on another thread count"
    after = {r.key: r.metrics for r in store.nodes()}
    assert all(after[k] == m for k, m in first.items()), "a reused node's stored metrics changed"
    new = [m for k, m in after.items() if k not in first]
    assert all(m["threads"] == 2 for m in new)


def test_threads_after_the_command_too() -> None:
    from dils_search.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "cfg.toml", "--threads", "3"]).threads == 3
    assert parser.parse_args(["--threads", "2", "run", "cfg.toml"]).threads == 2  # before it, as before
    assert parser.parse_args(["run", "cfg.toml"]).threads is None
    assert parser.parse_args(["finalize", "--study-name", "s", "--threads", "4"]).threads == 4


def test_ds_train_and_evaluate_apply_the_one_thread_setting(monkeypatch: Any) -> None:
    """Not torch's default count: $DILS_NUM_THREADS, else 1, else the last explicit setting."""
    import torch

    import dils_search as ds
    from dils_search.core import threads

    monkeypatch.setattr(threads, "_chosen", None)
    monkeypatch.delenv("DILS_NUM_THREADS", raising=False)
    seen: list[int] = []

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return torch.nn.functional.cross_entropy(out, y)

    data = ds.load_dataset("digits", seed=0)
    model = ds.build(ds.MLPSpec(64, [8], 10), seed=0)
    torch.set_num_threads(2)  # as torch's default would be on a bigger machine
    ds.train(model, data, ds.Recipe(epochs=1), loss=loss)
    assert set(seen) == {1}
    monkeypatch.setenv("DILS_NUM_THREADS", "2")
    torch.set_num_threads(1)
    ds.evaluate(model, data.x_test, data.y_test, data.task, loss=loss)
    assert seen[-1] == 2
    threads.set_threads(1)  # an explicit setting (GrowthTree(threads=1), --threads 1) holds over the variable
    ds.train(model, data, ds.Recipe(epochs=1), loss=loss)
    assert seen[-1] == 1
