"""train/evaluate: deterministic on CPU, early stopping, lr re-warmup, compute accounting, divergence."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from dils_search import MLPSpec, build, forward_flops
from dils_search.core.data import Dataset, load_dataset
from dils_search.core.train import Recipe, TrainingDiverged, evaluate, train


@functools.cache
def _data(task: str = "classification") -> Dataset:
    return load_dataset("synthetic", seed=0, num_samples=400, options={"task": task, "in_features": 8})


def _model(data: Dataset, seed: int = 0):  # type: ignore[no-untyped-def]
    return build(MLPSpec(data.in_features, [16, 8], data.out_features), seed=seed)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_gives_identical_weights() -> None:
    data = _data()
    recipe = Recipe(epochs=3, batch_size=32, seed=5)
    a, b, c = _model(data), _model(data), _model(data)
    ra, rb = train(a, data, recipe), train(b, data, recipe)
    train(c, data, dataclasses.replace(recipe, seed=6))
    assert _same(a, b)
    assert ra.history == rb.history and ra.val_metric == rb.val_metric
    assert not _same(a, c)  # the seed drives the shuffling


def test_flops_are_three_forwards_per_sample_seen() -> None:
    data = _data()
    model = _model(data)
    res = train(model, data, Recipe(epochs=4, batch_size=64))
    n = data.x_train.shape[0]
    assert res.epochs_run == 4 and res.samples_seen == 4 * n
    assert res.flops == 3 * forward_flops(model.spec) * res.samples_seen
    assert res.seconds > 0 and len(res.history) == 4


def test_patience_stops_when_validation_stalls() -> None:
    data = _data()
    res = train(_model(data), data, Recipe(epochs=50, lr=1e-12, patience=3))
    assert res.best_epoch == 1
    assert res.epochs_run == 4  # epochs 2, 3, 4 did not improve on epoch 1
    assert res.samples_seen == 4 * data.x_train.shape[0]


def test_patience_restores_the_best_epoch_weights() -> None:
    data = _data()
    recipe = Recipe(epochs=40, lr=3e-2, batch_size=32, patience=4, seed=1)
    stopped = _model(data)
    res = train(stopped, data, recipe)
    metrics = [h["val_metric"] for h in res.history]
    assert res.best_epoch == metrics.index(max(metrics)) + 1
    assert res.val_metric == max(metrics)
    assert res.best_epoch < res.epochs_run  # it did stop after a worse stretch
    replay = _model(data)
    train(replay, data, dataclasses.replace(recipe, epochs=res.best_epoch, patience=None))
    assert _same(stopped, replay)
    assert evaluate(stopped, data.x_val, data.y_val, data.task)["metric"] == res.val_metric


def test_rewarmup_ramps_the_learning_rate_linearly() -> None:
    """SGD without momentum, one full-batch step: the update is lr * grad, so a 2-step warm-up halves it."""
    data = _data()
    n = data.x_train.shape[0]
    base = Recipe(optimizer="sgd", lr=0.1, momentum=0.0, epochs=1, batch_size=n)
    start = _model(data)
    plain, warm = _model(data), _model(data)
    train(plain, data, base)
    train(warm, data, dataclasses.replace(base, rewarmup_epochs=2))
    for (name, p0), p1, p2 in zip(start.named_parameters(), plain.parameters(), warm.parameters(), strict=True):
        assert torch.allclose(p2 - p0, 0.5 * (p1 - p0), rtol=1e-4, atol=1e-7), name


def test_cosine_schedule_decays_the_rate_to_zero_after_the_warmup() -> None:
    """SGD without momentum, full batch, 4 steps with a 2-step warm-up: replaying the steps at lr/2, lr,
    then lr * (1 + cos(pi k / 2)) / 2 for k = 0, 1 gives the same weights as ``schedule="cosine"``."""
    import math

    data = _data()
    n = data.x_train.shape[0]
    recipe = Recipe(optimizer="sgd", lr=0.1, momentum=0.0, epochs=4, batch_size=n, rewarmup_epochs=2,
                    schedule="cosine")
    cos = _model(data)
    train(cos, data, recipe)
    replay = _model(data)
    replay.train()
    rates = [0.05, 0.1] + [0.1 * 0.5 * (1 + math.cos(math.pi * k / 2)) for k in range(2)]
    for lr in rates:
        opt = torch.optim.SGD(replay.parameters(), lr=lr)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(replay(data.x_train), data.y_train).backward()
        opt.step()
    for p1, p2 in zip(cos.parameters(), replay.parameters(), strict=True):
        assert torch.allclose(p1, p2, rtol=1e-5, atol=1e-6)
    plain = _model(data)
    train(plain, data, dataclasses.replace(recipe, schedule="constant"))
    assert not all(torch.allclose(p1, p2) for p1, p2 in zip(cos.parameters(), plain.parameters(), strict=True))


def test_rewarmup_reaches_the_full_rate_after_warmup() -> None:
    """After the warm-up the rate is back to lr: step 3 of a 2-step warm-up equals a plain step."""
    data = _data()
    n = data.x_train.shape[0]
    base = Recipe(optimizer="sgd", lr=0.1, momentum=0.0, epochs=3, batch_size=n)
    warm = _model(data)
    res = train(warm, data, dataclasses.replace(base, rewarmup_epochs=2))
    assert res.epochs_run == 3
    # replay: two steps at lr/2 and lr, then one plain step at lr, must match
    replay = _model(data)
    for lr in (0.05, 0.1, 0.1):
        opt = torch.optim.SGD(replay.parameters(), lr=lr)
        replay.train()
        loss = torch.nn.functional.cross_entropy(replay(data.x_train), data.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p1, p2 in zip(warm.parameters(), replay.parameters(), strict=True):
        assert torch.allclose(p1, p2, rtol=1e-5, atol=1e-6)


def test_nan_data_raises_training_diverged() -> None:
    data = _data()
    x = data.x_train.clone()
    x[3, 2] = float("nan")
    bad = dataclasses.replace(data, x_train=x)
    with pytest.raises(TrainingDiverged, match=r"training loss became nan at epoch 1 \(lr=0.001\)"):
        train(_model(data), bad, Recipe(epochs=3))


def test_huge_learning_rate_raises_training_diverged() -> None:
    data = _data("regression")
    with pytest.raises(TrainingDiverged, match="training loss became"):
        train(_model(data), data, Recipe(optimizer="sgd", lr=1e6, epochs=5))


def test_zero_epochs_only_evaluates() -> None:
    data = _data()
    model = _model(data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train(model, data, Recipe(epochs=0))
    assert res.epochs_run == 0 and res.samples_seen == 0 and res.flops == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert math.isfinite(res.val_metric)


def test_evaluate_reports_accuracy_and_r2() -> None:
    cls, reg = _data(), _data("regression")
    m = _model(cls)
    acc = evaluate(m, cls.x_test, cls.y_test, cls.task)
    with torch.no_grad():
        expect = float((m(cls.x_test).argmax(1) == cls.y_test).float().mean())
    assert acc["accuracy"] == acc["metric"] == pytest.approx(expect)
    r = _model(reg)
    train(r, reg, Recipe(epochs=30, lr=3e-3))
    r2 = evaluate(r, reg.x_test, reg.y_test, reg.task)
    assert r2["r2"] == r2["metric"] and 0.0 < r2["r2"] < 1.0
    assert m.training  # evaluate restores the mode it found


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("optimizer", "rmsprop", "optimizer='rmsprop' is unknown; allowed: adam, sgd"),
        ("lr", 0.0, "lr=0.0 must be > 0"),
        ("batch_size", 0, "batch_size=0 must be > 0"),
        ("epochs", -1, "epochs=-1 must be >= 0"),
        ("weight_decay", -0.1, "weight_decay=-0.1 must be >= 0"),
        ("patience", 0, "patience=0 must be None or an integer >= 1"),
        ("rewarmup_epochs", -1.0, "rewarmup_epochs=-1.0 must be >= 0"),
        ("momentum", 1.5, "momentum=1.5 must be in [0, 1)"),
        ("schedule", "step", "schedule='step' is unknown; allowed: constant, cosine"),
    ],
)
def test_bad_recipes_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        Recipe(**{field: value})  # type: ignore[arg-type]
    assert message in str(err.value)


def test_recipe_and_grow_options_share_their_defaults_with_the_config() -> None:
    """Each default is declared once (core/defaults.py); where they differed the config's won."""
    from dils_search.config import GrowConfig, TrainConfig
    from dils_search.core.grow import GrowOptions

    def defaults(cls: type) -> dict[str, object]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    recipe, train_cfg = defaults(Recipe), defaults(TrainConfig)
    grow_opts, grow_cfg = defaults(GrowOptions), defaults(GrowConfig)
    for name in ("optimizer", "lr", "batch_size", "weight_decay", "schedule"):
        assert recipe[name] == train_cfg[name], name
    for name in ("ridge", "approx_tol", "approx_epochs"):
        assert grow_opts[name] == grow_cfg[name], name
    assert grow_cfg["approx_epochs"] == 100  # what the shipped studies ran with (and their node keys hold)
    # the same meaning in two spellings: no early stopping
    assert recipe["patience"] is None and train_cfg["patience"] == 0
    # not shared: the re-warmup after a growth step vs. that of a plain train() call
    assert train_cfg["rewarmup_epochs"] == 0.5 and recipe["rewarmup_epochs"] == 0.0
