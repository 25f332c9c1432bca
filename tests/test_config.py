"""Config loading: every bad config is one clear ConfigError line; fuzzed input never gives a traceback."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dils_search.config import (
    ConfigError,
    StudyConfig,
    config_from_dict,
    config_from_toml,
    load_config,
)

STUDIES = sorted(Path(__file__).resolve().parents[1].glob("studies/*.toml"))


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name and cfg.search.n_trials > 0
    assert config_from_dict(cfg.to_dict()) == cfg  # round trip: TOML maps one to one onto the dataclasses


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        ({"search": {"max_step": 2}}, ["search.max_step", "did you mean 'max_steps'"]),
        ({"nme": "x"}, ["nme", "did you mean 'name'"]),
        ({"serch": {}}, ["serch", "did you mean 'search'"]),
        ({"search": {"max_steps": "two"}}, ["search.max_steps='two'", "integer"]),
        ({"search": {"max_steps": True}}, ["search.max_steps=True", "integer"]),
        ({"train": {"lr": "fast"}}, ["train.lr='fast'", "number"]),
        ({"model": {"residual": 1}}, ["model.residual=1", "boolean"]),
        ({"search": {"widths": [16, 0]}}, ["search.widths[1]=0", "> 0"]),
        ({"search": {"widths": [-4]}}, ["search.widths[0]=-4", "> 0"]),
        ({"model": {"hidden": [0]}}, ["model.hidden[0]=0", "> 0"]),
        ({"model": {"hidden": []}}, ["model.hidden=[]"]),
        ({"search": {"positions": [9]}}, ["search.positions[0]=9", "out of range", "0..3"]),
        ({"search": {"positions": [-1]}}, ["search.positions[0]=-1", "out of range"]),
        ({"search": {"positions": "middle"}}, ["search.positions='middle'", "any, last"]),
        ({"search": {"positions": []}}, ["search.positions=[]"]),
        ({"search": {"widths": []}}, ["search.widths=[]"]),
        ({"search": {"inits": []}}, ["search.inits=[]", "dils-analytic"]),
        ({"search": {"inits": ["dils-analitic"]}}, ["search.inits[0]='dils-analitic'", "did you mean 'dils-analytic'", "allowed:"]),
        ({"search": {"policy": "greed"}}, ["search.policy='greed'", "allowed: optuna"]),
        ({"search": {"sampler": "tpee"}}, ["search.sampler='tpee'", "did you mean 'tpe'", "allowed:"]),
        ({"search": {"pruner": "medain"}}, ["search.pruner='medain'", "did you mean 'median'", "allowed:"]),
        ({"data": {"dataset": "cifar"}}, ["data.dataset='cifar'", "allowed: digits"]),
        ({"model": {"activation": "swish"}}, ["model.activation='swish'", "allowed: relu"]),
        ({"model": {"kind": "transformer"}}, ["model.kind='transformer'", "allowed: mlp, conv"]),
        ({"train": {"optimizer": "lion"}}, ["train.optimizer='lion'", "allowed: adam"]),
        ({"search": {"max_steps": 10**17}}, ["search.max_steps=", "too large", "at most 64"]),
        ({"search": {"widths": [10**9]}}, ["search.widths[0]=", "too large"]),
        ({"seed": -1}, ["seed=-1", "out of range"]),
        ({"train": {"lr": float("nan")}}, ["train.lr=nan", "finite"]),
        ({"data": {"val_fraction": 0.7}}, ["data.val_fraction=0.7", "between 0 and 0.5"]),
        ({"data": {"dataset": "file"}}, ["data.path=''", ".npz or .csv"]),
        ({"name": "../evil"}, ["name='../evil'", "without '/'"]),
        ({"name": "a/b"}, ["name='a/b'"]),
        ({"search": 3}, ["search=3", "must be a table"]),
        ({"search": {"inits": ["zero"]}}, ["search.inits[0]='zero'", "impossible"]),
        ({"search": {"objectives": ["params"]}}, ["search.objectives=['params']", "must start with 'metric'"]),
        ({"search": {"objectives": ["metric", "params"], "pruner": "median"}}, ["search.pruner='median'", "allowed: 'none'"]),
        ({"storage": {"heartbeat_interval": 10, "grace_period": 5}}, ["storage.grace_period=5", "> storage.heartbeat_interval=10"]),
        ({"compare": [{"polcy": "random"}]}, ["compare[0].polcy", "allowed: policy"]),
        ({"compare": [{"policy": "nope"}]}, ["compare[0].policy='nope'", "allowed:"]),
        ({"compare": [1]}, ["compare[0]=1", "table"]),
        ({"search": {"bad\nkey": 1}}, ["search.'bad\\nkey' is not a known key"]),
    ],
)
def test_bad_config_names_field_value_and_allowed(data: dict[str, Any], expect: list[str]) -> None:
    message = _error(data)
    for fragment in expect:
        assert fragment in message, (fragment, message)


def test_long_values_are_cut_to_one_short_line() -> None:
    message = _error({"search": {"widths": list(range(1, 10_000)) + ["x"]}})
    assert len(message) < 200 and "search.widths[9999]='x'" in message


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text('name = "x"\n[search\nmax_steps = 2\n')
    with pytest.raises(ConfigError, match=r"broken.toml.*not valid TOML.*line 2, column 8"):
        load_config(p)


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda d: d / "missing.toml", "does not exist"),
        (lambda d: d, "cannot be read"),  # a directory
        (lambda d: (d / "latin1.toml").write_bytes(b'name = "caf\xe9"\n') and d / "latin1.toml", "cannot be read"),
        (lambda d: (d / "deep.toml").write_text("a = " + "[" * 50_000) and d / "deep.toml", "nested too deeply"),
    ],
    ids=["missing", "directory", "not-utf8", "deeply-nested"],
)
def test_unreadable_config_files(tmp_path: Path, make: Any, expect: str) -> None:
    with pytest.raises(ConfigError, match=expect):
        load_config(make(tmp_path))


def test_config_is_data_never_code(tmp_path: Path) -> None:
    """Strings that look like code are only ever compared against fixed names."""
    marker = tmp_path / "pwned"
    for text in (
        f'[data]\ndataset = "__import__(\'os\').system(\'touch {marker}\')"\n',
        f'[search]\npolicy = "os.system(\'touch {marker}\')"\n',
        '[search]\nsampler = "optuna.samplers.TPESampler"\n',
        '[model]\nactivation = "torch.nn.SiLU"\n',
    ):
        with pytest.raises(ConfigError, match="allowed:"):
            config_from_toml(text)
    assert not marker.exists()


# ---------------------------------------------------------------- fuzzing

_NAMES = ["relu", "tanh", "gelu", "identity", "zero", "random", "dils-approx", "dils-analytic", "any", "last", "file",
          "conv", "mlp", "params", "metric", "tpe", "nsga2", "gp", "growth", "hyperband", "median", "synthetic",
          "digits", "mnist1d", "regression", "classification", "adam", "sgd", "max", "flatten", "stack", "scratch"]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 70), st.floats(allow_nan=True),
    st.floats(-2, 2), st.text(max_size=10), st.sampled_from(_NAMES),
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _typed(tp: Any) -> st.SearchStrategy[Any]:
    """Values of the right type (so that fuzzing reaches the deep checks), or anything at all."""
    if tp in (int, "int"):
        return st.integers(-3, 70) | st.integers(-(2**64), 2**64)
    if tp in (float, "float"):
        return st.floats(-1, 200) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2, 5)
    if tp in (bool, "bool"):
        return st.booleans()
    if tp in (str, "str"):
        return st.sampled_from(_NAMES) | st.text(max_size=8)
    if isinstance(tp, str) and tp.startswith("list[int]"):
        return st.lists(st.integers(-2, 40), max_size=4) | st.sampled_from(["any", "last", "x"])
    if isinstance(tp, str) and tp.startswith("list[str]"):
        return st.lists(st.sampled_from(_NAMES) | st.text(max_size=4), max_size=4)
    return _values


def _section(cls: Any) -> st.SearchStrategy[dict[str, Any]]:
    fields = {f.name: st.one_of(_typed(f.type), _values) for f in dataclasses.fields(cls)}
    return st.fixed_dictionaries({}, optional={**fields, "bogus_key": _values})


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(StudyConfig) if dataclasses.is_dataclass(f.default_factory)}
_configs = st.fixed_dictionaries(
    {},
    optional={
        **{name: _section(cls) | _values for name, cls in _SECTIONS.items()},
        "name": st.sampled_from(["tiny", "a/b", ".x", ""]) | st.text(max_size=8),
        "seed": _typed(int),
        "compare": st.lists(st.dictionaries(st.sampled_from(["policy", "init", "label", "sampler", "x"]), _values, max_size=3),
                            max_size=2) | _values,
    },
)


def _check(make: Any) -> None:
    try:
        cfg = make()
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert isinstance(cfg, StudyConfig)
    assert config_from_dict(cfg.to_dict()) == cfg


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_configs)
def test_fuzz_config_from_dict(data: dict[str, Any]) -> None:
    _check(lambda: config_from_dict(data))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(_values)
def test_fuzz_config_from_anything(data: Any) -> None:
    _check(lambda: config_from_dict(data))


def _toml_line(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key} = {str(value).lower()}"
    if isinstance(value, str):
        return f"{key} = {value!r}".replace("\\", "\\\\") if "'" not in value else f'{key} = "x"'
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return f"{key} = {value}"
    return f"{key} = {value}"


_toml_texts = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.one_of(
            st.sampled_from(["[search]", "[model]", "[data]", "[train]", "[grow]", "[storage]", "[[compare]]", "[search",
                             "name = 'x'", "seed = 1", "= 3", "[[search]]", "a.b.c = 1", "\x00"]),
            st.builds(_toml_line, st.sampled_from(["max_steps", "widths", "inits", "policy", "hidden", "lr", "dataset",
                                                   "positions", "n_trials", "activation", "name", "x"]),
                      st.integers(-3, 99) | st.booleans() | st.sampled_from(_NAMES) | st.lists(st.integers(-1, 9), max_size=3)),
        ),
        max_size=12,
    ).map("\n".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_toml_texts)
def test_fuzz_toml_text(text: str) -> None:
    _check(lambda: config_from_toml(text, "fuzz"))


def test_fuzz_strategy_reaches_valid_configs() -> None:
    """The TOML fuzz is not only exercising the parser: sane texts do pass."""
    cfg = config_from_toml("[search]\nmax_steps = 2\nwidths = [8]\n[model]\nhidden = [4]\n", "fuzz")
    assert cfg.search.max_steps == 2 and cfg.name == "fuzz"
    assert tomllib.loads(_toml_line("inits", "identity")) == {"inits": "identity"}
