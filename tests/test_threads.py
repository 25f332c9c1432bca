"""The thread count is one setting (``--threads`` / ``$DILS_NUM_THREADS`` / ``GrowthTree(threads=)``):
a study resumed on another thread count reuses every stored node, and each node records the
thread count and device it was trained with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    out = subprocess.run([sys.executable, "-m", "dils_search", *args], capture_output=True, text=True, cwd=cwd)
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
