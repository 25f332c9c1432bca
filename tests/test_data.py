"""Data loaders: seeded splits, train-only standardisation, user files, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dils_search.core.data import load_dataset, synthetic


def _splits(d):  # type: ignore[no-untyped-def]
    return [d.x_train, d.y_train, d.x_val, d.y_val, d.x_test, d.y_test]


def test_digits_splits_are_seeded() -> None:
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(_splits(a), _splits(b), strict=True))
    assert not torch.equal(a.y_train, c.y_train)
    assert a.task == "classification" and a.out_features == 10 and a.in_features == 64
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    n = sum(x.shape[0] for x in (a.x_train, a.x_val, a.x_test))
    assert n == 1797 and a.x_val.shape[0] == round(0.15 * 1797) == a.x_test.shape[0]


def test_standardisation_uses_training_statistics_only(tmp_path: Path) -> None:
    """Column 0 holds each row's index, which lets the test find every row's split and raw values."""
    rng = np.random.default_rng(0)
    n = 200
    raw = np.column_stack([np.arange(n, dtype=np.float64), rng.normal(5.0, 3.0, (n, 3)), np.full(n, 7.0)])
    y = rng.integers(0, 3, n)
    np.savez(tmp_path / "d.npz", x=raw, y=y)
    d = load_dataset("file", path=str(tmp_path / "d.npz"), seed=1)
    z0 = torch.cat([d.x_train[:, 0], d.x_val[:, 0], d.x_test[:, 0]]).double()
    step = float(z0.sort().values.diff().mean())  # the standardised values are (k - mean) / std, k = 0..n-1
    lo = float(z0.min())
    idx = {name: ((getattr(d, name)[:, 0].double() - lo) / step).round().long().numpy() for name in ("x_train", "x_val", "x_test")}
    assert sorted(np.concatenate(list(idx.values())).tolist()) == list(range(n))
    train = raw[idx["x_train"]]
    mean, std = train.mean(0), train.std(0)
    std[std < 1e-8] = 1.0  # a constant column is centred, not scaled
    for name in ("x_train", "x_val", "x_test"):
        expect = (raw[idx[name]] - mean) / std
        assert np.allclose(getattr(d, name).numpy(), expect, atol=1e-5), name
    assert torch.allclose(d.x_train[:, 1:4].mean(0), torch.zeros(3), atol=1e-5)
    assert not torch.allclose(d.x_val[:, 1:4].mean(0), torch.zeros(3), atol=1e-3)
    assert torch.equal(d.x_val[:, 4], torch.zeros(d.x_val.shape[0]))  # the constant column
    # labels follow their rows
    assert np.array_equal(d.y_val.numpy(), y[idx["x_val"]])


def test_mnist1d_leaves_numpy_global_rng_alone() -> None:
    np.random.seed(123)
    state = np.random.get_state()
    d = load_dataset("mnist1d", num_samples=200, seed=0)
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]
    assert d.x_train.shape[0] + d.x_val.shape[0] + d.x_test.shape[0] == 200
    assert d.in_features == 40 and d.out_features == 10
    again = load_dataset("mnist1d", num_samples=200, seed=0)
    assert torch.equal(d.x_train, again.x_train)


def test_synthetic_tasks_are_seeded() -> None:
    x1, y1 = synthetic(num_samples=100, seed=0)
    x2, y2 = synthetic(num_samples=100, seed=0)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    _, yc = synthetic(num_samples=300, task="classification", classes=4, seed=0)
    assert yc.dtype == np.int64 and set(np.unique(yc)) <= {0, 1, 2, 3}
    reg = load_dataset("synthetic", num_samples=300, seed=0)
    assert reg.task == "regression" and reg.y_train.dtype == torch.float32 and reg.y_train.shape[1] == 1


def test_npz_with_its_own_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(50, 4)), y=rng.integers(0, 2, 50),
             x_test=rng.normal(size=(9, 4)), y_test=rng.integers(0, 2, 9))
    d = load_dataset("file", path=str(tmp_path / "d.npz"))
    assert d.x_test.shape == (9, 4) and d.x_train.shape[0] + d.x_val.shape[0] == 50
    assert d.task == "classification" and d.out_features == 2


def test_csv_label_column_by_name_index_and_default(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    rows = ["a,b,label,c"] + [f"{i},{i * 2 % 7},{i % 3},{i * 0.5}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    by_name = load_dataset("file", path=str(path), label_column="label")
    by_index = load_dataset("file", path=str(path), label_column=2)
    assert by_name.task == "classification" and by_name.out_features == 3 and by_name.in_features == 3
    assert torch.equal(by_name.y_train, by_index.y_train)
    last = load_dataset("file", path=str(path))  # default: the last column, here float -> regression
    assert last.task == "regression" and last.in_features == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_npz_with_nan_or_inf_is_refused(tmp_path: Path, bad: float) -> None:
    x = np.ones((20, 3))
    x[4, 1] = bad
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 2)
    with pytest.raises(ValueError, match=r"has 1 NaN or inf values in its inputs; clean the file first"):
        load_dataset("file", path=str(tmp_path / "d.npz"))


def test_csv_with_a_missing_or_inf_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n1,2,0\n3,,1\n5,inf,0\n" + "".join(f"{i},{i},{i % 2}\n" for i in range(20)))
    with pytest.raises(ValueError, match=r"has 2 NaN or inf values in its inputs"):
        load_dataset("file", path=str(path))


def test_nan_targets_are_refused(tmp_path: Path) -> None:
    y = np.linspace(0, 1, 20)
    y[0] = np.nan
    np.savez(tmp_path / "d.npz", x=np.ones((20, 2)), y=y)
    with pytest.raises(ValueError, match="NaN or inf values in its targets"):
        load_dataset("file", path=str(tmp_path / "d.npz"))


def test_reshaped_refuses_a_shape_that_does_not_fit() -> None:
    d = load_dataset("digits")
    assert d.reshaped((1, 8, 8)).x_train.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match=r"data 'digits' has 64 features per sample, but the spec's input shape \[1, 7, 7\] needs 49"):
        d.reshaped((1, 7, 7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "cifar"}, "dataset='cifar' is unknown; allowed: digits, mnist1d, synthetic, file"),
        ({"name": "file"}, "data name='file' needs a path to an .npz or .csv file"),
        ({"name": "file", "path": "/nonexistent/d.npz"}, "does not exist or is not a file"),
    ],
)
def test_bad_requests_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset(**kwargs)  # type: ignore[arg-type]


def test_file_with_wrong_suffix_or_arrays(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"has suffix '.txt'; allowed: .npz, .csv"):
        load_dataset("file", path=str(tmp_path / "d.txt"))
    np.savez(tmp_path / "e.npz", inputs=np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"must hold arrays 'x' and 'y' \(found: inputs\)"):
        load_dataset("file", path=str(tmp_path / "e.npz"))
    np.savez(tmp_path / "f.npz", x=np.ones((10, 2)), y=np.ones(9, dtype=np.int64))
    with pytest.raises(ValueError, match="has 10 inputs but 9 targets"):
        load_dataset("file", path=str(tmp_path / "f.npz"))


# ---------------------------------------------------------------- data the way users have it (issue 13)


def _blobs(n: int = 120, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return rng.normal(size=(n, 5)) + y[:, None], y


def test_from_arrays_takes_numpy_or_torch_and_splits_seeded() -> None:
    from dils_search.core.data import Dataset

    x, y = _blobs()
    a = Dataset.from_arrays(x, y, seed=2)
    b = Dataset.from_arrays(torch.from_numpy(x), torch.from_numpy(y), seed=2)
    c = Dataset.from_arrays(x, y, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(_splits(a), _splits(b), strict=True))
    assert not torch.equal(a.y_train, c.y_train)
    assert a.task == "classification" and a.inferred and a.out_features == 3 and a.sample_shape == (5,)
    assert (a.size("train"), a.size("val"), a.size("test")) == (84, 18, 18)
    assert a.describe() == ("data arrays: task classification (inferred: whole-number labels are classes; set task to choose), "
                            "metric accuracy, 3 classes, input shape [5], train/val/test 84/18/18")
    explicit = Dataset.from_arrays(x, y.astype(np.float64), task="classification", name="mine")
    assert explicit.y_train.dtype == torch.int64 and not explicit.inferred  # integral floats are cast
    assert explicit.describe().startswith("data mine: task classification, metric accuracy, 3 classes")
    reg = Dataset.from_arrays(x, y, task="regression")
    assert reg.task == "regression" and reg.y_train.dtype == torch.float32 and "metric r2, 1 output(s)" in reg.describe()


@pytest.mark.parametrize(
    ("y", "task", "message"),
    [
        (np.array([0, 1, 5] * 40), None, r"data 'arrays' has class labels 0, 1, 5; labels must be the integers 0..K-1"),
        (np.array([-1, 0, 1] * 40), None, r"negative class labels \(labels found: -1, 0, 1\)"),
        (np.array([0.0, 0.5, 1.0] * 40), "classification", r"non-integer labels \(0.5\).*set task='regression'"),
        (np.array([3, 7] * 60), None, r"class labels 3, 7; labels must be the integers 0..K-1"),
    ],
)
def test_user_labels_must_be_0_to_k_minus_1(y: np.ndarray, task: str | None, message: str) -> None:
    from dils_search.core.data import Dataset

    x = np.random.default_rng(0).normal(size=(len(y), 3))
    with pytest.raises(ValueError, match=message) as info:
        Dataset.from_arrays(x, y, task=task)
    assert "\n" not in str(info.value)


def test_a_class_absent_from_the_training_split_is_a_warning() -> None:
    from dils_search.core.data import Dataset

    x, y = _blobs(200)
    y = np.where(np.arange(200) == 7, 3, y)  # class 3: one sample, in the test split below
    test_x, test_y = x[:10], y[:10].copy()
    test_y[0] = 3
    train_y = np.where(y == 3, 0, y)
    with pytest.warns(UserWarning, match=r"class label\(s\) 3 are absent from the training split"):
        d = Dataset.from_arrays(x, train_y, test=(test_x, test_y))
    assert d.out_features == 4


def test_float_labels_from_a_file_are_never_a_silent_regression(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 3)), y=rng.normal(size=60))
    path = str(tmp_path / "d.npz")
    # the config's default task is classification: a one-line error that says what to set
    with pytest.raises(ValueError, match=r"non-integer labels .*set task='regression'"):
        load_dataset("file", path=path, task="classification")
    reg = load_dataset("file", path=path, task="regression")
    assert reg.task == "regression" and not reg.inferred and f"data {path}: task regression, metric r2" in reg.describe()
    inferred = load_dataset("file", path=path)  # the API without a task: an explicit line says so
    assert inferred.task == "regression" and "task regression (inferred" in inferred.describe()
    np.savez(tmp_path / "i.npz", x=rng.normal(size=(60, 3)), y=(np.arange(60) % 2).astype(np.float32))
    cast = load_dataset("file", path=str(tmp_path / "i.npz"), task="classification")
    assert cast.task == "classification" and cast.out_features == 2 and cast.y_train.dtype == torch.int64


def test_the_config_task_applies_to_file_data(tmp_path: Path) -> None:
    from dils_search.config import config_from_dict
    from dils_search.search.paths import make_task

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 3)), y=rng.normal(size=60))
    data = {"dataset": "file", "path": str(tmp_path / "d.npz")}
    with pytest.raises(ValueError, match=r"non-integer labels .*\[data\] task = \"regression\" in a config"):
        make_task(config_from_dict({"data": data}), "cpu")  # the default task is classification
    task = make_task(config_from_dict({"data": {**data, "task": "regression"}}), "cpu")
    assert task.data.task == "regression" and task.base.out_features == 1


def test_builtin_datasets_keep_their_classes() -> None:
    # a synthetic teacher may leave a class empty: built-ins keep K = largest label + 1, no error
    d = load_dataset("synthetic", num_samples=300, options={"task": "classification", "classes": 4})
    assert d.task == "classification" and not d.inferred and d.out_features == int(d.y_train.max()) + 1


def _conv_cfg(path: str, **model: object):  # type: ignore[no-untyped-def]
    from dils_search.config import config_from_dict

    return config_from_dict({"data": {"dataset": "file", "path": path},
                             "model": {"kind": "conv", "hidden": [4], **model},
                             "search": {"inits": ["dils-analytic"], "widths": [4], "max_steps": 1}})


def test_conv_infers_channels_and_size_from_the_array(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sklearn.datasets import load_digits

    from dils_search.search.paths import make_task

    d = load_digits()
    np.savez(tmp_path / "img.npz", x=d.images[:, None, :, :], y=d.target)  # N x 1 x 8 x 8
    task = make_task(_conv_cfg(str(tmp_path / "img.npz"), dims=2), "cpu")
    assert (task.base.in_channels, task.base.input_size, task.base.pooling) == (1, [8, 8], "max")
    assert task.data.x_train.shape[1:] == (1, 8, 8)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"data {tmp_path / 'img.npz'}: task classification, metric accuracy, 10 classes, input shape "
                   "[1, 8, 8], train/val/test 1257/270/270"]
    np.savez(tmp_path / "seq.npz", x=d.images.reshape(-1, 2, 32), y=d.target)  # N x 2 x 32
    seq = make_task(_conv_cfg(str(tmp_path / "seq.npz"), dims=1), "cpu")
    assert (seq.base.in_channels, seq.base.input_size) == (2, [32])
    explicit = make_task(_conv_cfg(str(tmp_path / "seq.npz"), dims=1, in_channels=4, input_size=[16]), "cpu")
    assert (explicit.base.in_channels, explicit.base.input_size) == (4, [16])  # explicit values still win
    assert make_task(_conv_cfg(str(tmp_path / "seq.npz"), dims=2), "cpu").base.input_size == [2, 32]  # N x H x W
    with pytest.raises(ValueError, match=r"samples have shape \[1, 8, 8\], which does not give dims=1"):
        make_task(_conv_cfg(str(tmp_path / "img.npz"), dims=1), "cpu")


@pytest.mark.parametrize(
    ("dims", "channels", "size", "features", "shape", "expect"),
    [
        (1, 0, [], 40, (), (1, [40])),
        (1, 2, [], 80, (80,), (2, [40])),
        (1, 0, [], 120, (3, 40), (3, [40])),
        (2, 0, [], 64, (8, 8), (1, [8, 8])),
        (2, 0, [], 192, (3, 8, 8), (3, [8, 8])),
        (2, 0, [8, 8], 128, (128,), (2, [8, 8])),
        (2, 1, [8, 8], 64, (1, 8, 8), (1, [8, 8])),
    ],
)
def test_conv_input_geometry(dims: int, channels: int, size: list[int], features: int, shape: tuple[int, ...],
                             expect: tuple[int, list[int]]) -> None:
    from dils_search.core.family import ConvFamily

    assert ConvFamily.input_geometry(dims, channels, size, features, shape) == expect


def test_one_label_rule_whole_number_floats_are_classes_on_every_path(tmp_path: Path) -> None:
    """Arrays, files and streamed data read labels alike: whole-number labels (3.0 too) are classes,
    never a silent regression; other floats are regression, and describe() says it was inferred."""
    from torch.utils.data import TensorDataset

    from dils_search.core.data import Dataset

    x, y = _blobs()
    floats = y.astype(np.float64)  # 0.0, 1.0, 2.0: what pandas or a CSV reader hands over
    arrays = Dataset.from_arrays(x, floats, seed=0)
    np.savez(tmp_path / "f.npz", x=x, y=floats)
    from_file = load_dataset("file", path=str(tmp_path / "f.npz"))
    t = TensorDataset(torch.from_numpy(x).float(), torch.from_numpy(floats))
    streamed = Dataset.from_torch(t, t, t)
    for d in (arrays, from_file, streamed):
        assert (d.task, d.inferred, d.out_features) == ("classification", True, 3), d.describe()
        assert "task classification (inferred: whole-number labels are classes" in d.describe()
    noisy = floats + np.random.default_rng(0).normal(0, 0.1, size=len(floats))
    t = TensorDataset(torch.from_numpy(x).float(), torch.from_numpy(noisy))
    for d in (Dataset.from_arrays(x, noisy, seed=0), Dataset.from_torch(t, t, t)):
        assert (d.task, d.inferred) == ("regression", True)
    prices = 100.0 * (y + 1)  # whole numbers that are not 0..K-1: a one-line error that says how to choose
    with pytest.raises(ValueError, match=r"labels must be the integers 0..K-1.*set task='regression'"):
        Dataset.from_arrays(x, prices)
    assert Dataset.from_arrays(x, prices, task="regression").task == "regression"
