"""An inherited layer fine-tunes like a normal one, and its offset buffer travels with the model.

docs/inheritance.md ("What happens when training continues") explains the offset: dils-analytic puts
a new unit in its activation's linear range with a large shift, and without the offset the next
layer saw that shift as a common mode that Adam moved coherently (a narrow position-0 insertion
fell several points below its parent while fine-tuning).
"""

from __future__ import annotations

import copy
import functools
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import raw_test_rows, tiny_config

import dils_search
from dils_search import GrowOptions, GrowthStep, MLPSpec, build, grow, output_gap
from dils_search.cli import main
from dils_search.core.checkpoint import from_bytes, save, to_bytes
from dils_search.core.data import Dataset, load_dataset
from dils_search.core.spec import ConvSpec, forward_flops
from dils_search.core.train import Recipe, evaluate, train
from dils_search.search.study import run_study
from dils_search.search.summary import summarize


def _digits784(seed: int) -> Dataset:
    """The digits upscaled to 28 x 28: 784 inputs, wider than any layer inserted at position 0."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.nn.functional.interpolate(torch.tensor(d.images, dtype=torch.float32).unsqueeze(1), size=(28, 28),
                                        mode="bilinear", align_corners=False)
    return Dataset.from_arrays(x.reshape(len(x), -1).numpy(), d.target, task="classification", seed=seed)


def _metric(model: torch.nn.Module, data: Dataset) -> float:
    """Accuracy on validation and test together (540 digits): half the noise of either split alone."""
    x, y = torch.cat([data.x_val, data.x_test]), torch.cat([data.y_val, data.y_test])
    return evaluate(model, x, y, data.task)["accuracy"]


@functools.cache
def _parent(task: str, seed: int) -> tuple[torch.nn.Module, Dataset]:
    if task.startswith("digits-"):  # the digits MLP with another activation
        data = load_dataset("digits", seed=seed)
        model = build(MLPSpec(64, [32], 10, activation=task.split("-", 1)[1]), seed=seed)
        train(model, data, Recipe(epochs=20, batch_size=64, seed=seed))
    elif task == "digits":
        data = load_dataset("digits", seed=seed)
        model = build(MLPSpec(64, [32], 10), seed=seed)
        train(model, data, Recipe(epochs=20, batch_size=64, seed=seed))
    else:
        data = _digits784(seed)
        model = build(MLPSpec(784, [64], 10), seed=seed)
        train(model, data, Recipe(epochs=10, seed=seed))
    return model, data


def _fine_tuned(task: str, seed: int, width: int | None, options: GrowOptions) -> float:
    """Metric after 5 epochs (Adam, 0.5-epoch re-warmup) of the parent (``width=None``) or of a child
    with a ``width``-unit dils-analytic layer at position 0."""
    parent, data = _parent(task, seed)
    model = copy.deepcopy(parent) if width is None else grow(parent, GrowthStep(0, width, "dils-analytic"),
                                                              data.x_train[:1024], options)
    train(model, data, Recipe(epochs=5, batch_size=128 if task == "digits784" else 64, rewarmup_epochs=0.5, seed=seed))
    return _metric(model, data)


@pytest.mark.parametrize(("task", "width"), [("digits", 32), ("digits", 16), ("digits784", 64), ("digits-tanh", 32),
                                             ("digits-sigmoid", 32)])
def test_narrow_position0_insertion_fine_tunes_like_its_parent(task: str, width: int) -> None:
    """A dils-analytic layer narrower than the input (64 or 784 features), inserted at position 0 and
    fine-tuned 5 epochs, ends no more than 0.5 pp below its parent trained the same 5 epochs (mean of
    2 seeds), with ReLU, tanh or sigmoid. The construction of before this was fixed (no offset, no
    target rows, no gain) ends more than 1 pp below on the same runs, so this check has teeth."""
    seeds = (0, 1)
    parent = sum(_fine_tuned(task, s, None, GrowOptions()) for s in seeds) / len(seeds)
    child = sum(_fine_tuned(task, s, width, GrowOptions(seed=s)) for s in seeds) / len(seeds)
    assert child >= parent - 0.005, (child, parent)
    old = GrowOptions(recentre=False, target_basis=False, gain=False)
    before_fix = sum(_fine_tuned(task, s, width, GrowOptions(**{**vars(old), "seed": s})) for s in seeds) / len(seeds)
    assert before_fix < parent - 0.01, (before_fix, parent)


def _offset_child() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    parent = build(MLPSpec(12, [8, 6], 3), seed=0).eval()
    x = torch.randn(256, 12)
    child = grow(parent, GrowthStep(0, 12, "dils-analytic"), x, GrowOptions(seed=0)).eval()
    return parent, child, x


def test_the_offset_holds_the_shift_and_keeps_the_function() -> None:
    parent, child, x = _offset_child()
    offset = child.blocks[0].offset
    assert offset.shape == (12,) and float(offset.abs().min()) > 1.0  # the principal rows' shift
    assert all(float(b.offset.abs().max()) == 0 for b in parent.blocks)
    with torch.no_grad():
        h = child.blocks[0](x)
    assert float(h.mean(0).abs().max()) < 0.5 * float(h.std(0).mean())  # centred: no common mode left
    assert output_gap(parent, child, torch.randn(128, 12)) <= 1e-4


def test_the_offset_round_trips_and_old_checkpoints_still_load(tmp_path: Path) -> None:
    _, child, x = _offset_child()
    again = dils_search.load(save(child, tmp_path / "c.pt"))
    assert torch.equal(again.blocks[0].offset, child.blocks[0].offset)
    assert torch.equal(again.eval()(x), child(x))
    tanh = build(MLPSpec(12, [8], 3, activation="tanh"), seed=0).eval()
    grown = grow(tanh, GrowthStep(0, 12, "dils-analytic"), x, GrowOptions(seed=0)).eval()
    assert float(grown.blocks[0].scale.max()) < 0.01  # the linear-range gain lives in the buffer
    loaded = dils_search.load(save(grown, tmp_path / "t.pt")).eval()
    assert torch.equal(loaded.blocks[0].scale, grown.blocks[0].scale) and torch.equal(loaded(x), grown(x))
    # a format-1 file (before Dense.offset existed) loads with zero offsets
    plain = build(MLPSpec(12, [8, 6], 3), seed=1).eval()
    state = {k: v for k, v in plain.state_dict().items() if not k.endswith((".offset", ".scale"))}
    buf = io.BytesIO()
    torch.save({"format": "dils-search/1", "spec": plain.spec.to_json(), "state_dict": state}, buf)
    old = from_bytes(buf.getvalue()).eval()
    assert all(float(b.offset.abs().max()) == 0 and float((b.scale - 1).abs().max()) == 0 for b in old.blocks)
    assert torch.equal(old(x), plain(x))
    assert torch.load(io.BytesIO(to_bytes(plain)), weights_only=True)["format"] == "dils-search/2"


def test_a_conv_offset_keeps_zero_padding_exact() -> None:
    """Before a conv layer the shifted principal basis used to be inexact (the next conv pads with
    zeros, which the shift broke); with the offset subtracted it is exact on held-out data."""
    torch.manual_seed(0)
    parent = build(ConvSpec(1, 2, [10], [4, 6], 3, pooling="avg"), seed=0).double().eval()
    calib, held = torch.randn(192, 2, 10, dtype=torch.float64), torch.randn(192, 2, 10, dtype=torch.float64)
    child = grow(parent, GrowthStep(0, 3, "dils-analytic"), calib, GrowOptions(seed=0))
    assert child.growth_info.basis == "principal+shift" and float(child.blocks[0].offset[:2].abs().min()) > 1.0
    assert output_gap(parent, child, held) <= 1e-6
    unfixed = grow(parent, GrowthStep(0, 3, "dils-analytic"), calib, GrowOptions(seed=0, recentre=False))
    assert output_gap(parent, unfixed, held) > 1e-3


def test_forward_flops_count_the_offset_subtraction() -> None:
    assert forward_flops(MLPSpec(4, [3], 2)) == 2 * 4 * 3 + 3 * 3 + 2 * 3 * 2
    conv = ConvSpec(1, 1, [5], [2], 3, pooling="avg")
    assert forward_flops(conv) == 2 * 1 * 2 * 3 * 5 + 3 * 2 * 5 + 2 * 2 * 3
    residual = MLPSpec(4, [3, 5], 2, residual=True)  # a residual block has no offset
    assert forward_flops(residual) == 2 * 4 * 3 + 3 * 3 + 2 * 2 * 3 * 5 + 2 * 3 * 2


def test_the_offset_survives_deepen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = load_dataset("digits", seed=0)
    model = build(MLPSpec(64, [32], 10), seed=0)
    train(model, data, Recipe(epochs=5, batch_size=64, seed=0))
    src = save(model, tmp_path / "m.pt", extra={"data": {"dataset": "digits", "seed": 0}})
    out = tmp_path / "deeper.pt"
    assert main(["deepen", str(src), "--insert", "0:16:dils-analytic", "--epochs", "1", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    deeper = dils_search.load(out)
    assert deeper.spec.hidden == [16, 32] and float(deeper.blocks[0].offset.abs().max()) > 0
    assert evaluate(deeper, data.x_test, data.y_test, data.task)["metric"] == pytest.approx(result["metric_after_finetune"])
    again = tmp_path / "twice.pt"  # deepening a deepened model keeps the first offset and adds another
    assert main(["deepen", str(out), "--insert", "0:16:dils-analytic", "--out", str(again)]) == 0
    twice = dils_search.load(again)
    assert torch.equal(twice.blocks[1].offset, deeper.blocks[0].offset) and float(twice.blocks[0].offset.abs().max()) > 0


def test_the_offset_survives_finalize_and_export(sqlite_url: str, tmp_path: Path) -> None:
    """A study whose only growth step is a narrow position-0 dils-analytic layer: the finalized node and
    the exported file carry the offset, and the exported model scores the study's delivered metric."""
    cfg = tiny_config(search={"n_trials": 2, "max_steps": 1, "widths": [8], "inits": ["dils-analytic"],
                              "positions": [0]}, final={"top_k": 1, "epochs": 1})
    run_study(cfg, sqlite_url, str(tmp_path / "art"), "offset", progress=False)
    final = summarize(sqlite_url, "offset").final
    assert final is not None and len(final["hidden"]) == 2
    out = tmp_path / "model.pt"
    assert main(["export", "--storage", sqlite_url, "--study-name", "offset", "--out", str(out)]) == 0
    model = dils_search.load(out)
    assert float(model.blocks[0].offset.abs().max()) > 0
    from dils_search.search.paths import make_task

    task = make_task(cfg, "cpu")
    metric = evaluate(model, *raw_test_rows(cfg), task.data.task)["metric"]  # it takes raw inputs (issue 25)
    assert metric == pytest.approx(final["test_metric"], abs=1e-6)
