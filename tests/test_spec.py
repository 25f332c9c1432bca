"""Specs: exact JSON round-trips and one-line errors naming the field, the value and what is allowed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dils_search import ConvSpec, MLPSpec, build, spec_from_json
from dils_search.core.spec import ACTIVATIONS, POOLINGS, spec_from_dict

widths = st.lists(st.integers(1, 64), max_size=5)


@settings(max_examples=60, deadline=None)
@given(
    in_features=st.integers(1, 100),
    hidden=widths,
    out=st.integers(1, 20),
    act=st.sampled_from(ACTIVATIONS),
    residual=st.booleans(),
)
def test_mlp_json_round_trip_is_exact(in_features: int, hidden: list[int], out: int, act: str, residual: bool) -> None:
    if residual and not hidden:
        hidden = [4]
    spec = MLPSpec(in_features, hidden, out, activation=act, residual=residual)
    text = spec.to_json()
    again = MLPSpec.from_json(text)  # type: ignore[attr-defined]
    assert again == spec and type(again) is MLPSpec
    assert again.to_json() == text
    assert json.loads(text)["kind"] == "mlp"


@settings(max_examples=60, deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    channels=st.integers(1, 4),
    size=st.integers(1, 12),
    hidden=widths,
    kernel=st.sampled_from([1, 3, 5]),
    batchnorm=st.booleans(),
    pooling=st.sampled_from(POOLINGS),
    residual=st.booleans(),
    act=st.sampled_from(ACTIVATIONS),
)
def test_conv_json_round_trip_is_exact(
    dims: int, channels: int, size: int, hidden: list[int], kernel: int, batchnorm: bool, pooling: str, residual: bool, act: str
) -> None:
    if residual and not hidden:
        hidden = [2]
    spec = ConvSpec(dims, channels, [size] * dims, hidden, 3, kernel, batchnorm, pooling, residual, act)
    text = spec.to_json()
    again = spec_from_json(text)
    assert again == spec and isinstance(again, ConvSpec)
    assert again.to_json() == text


def test_tuples_are_normalised_so_the_round_trip_stays_exact() -> None:
    spec = ConvSpec(2, 1, (8, 8), (4, 6), 10)  # type: ignore[arg-type]
    assert spec.input_size == [8, 8] and spec.hidden == [4, 6]
    assert spec_from_json(spec.to_json()) == spec
    assert MLPSpec(3, (5,), 2).hidden == [5]  # type: ignore[arg-type]


def test_to_json_is_canonical() -> None:
    a = MLPSpec(4, [8], 2)
    b = spec_from_dict(json.loads(json.dumps(dict(reversed(list(a.to_dict().items()))))))
    assert a.to_json() == b.to_json()


def test_build_carries_the_spec() -> None:
    spec = ConvSpec(1, 2, [10], [3, 4], 5, batchnorm=True, residual=True)
    assert build(spec, seed=0).spec == spec


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MLPSpec(0, [4], 2), "in_features=0 must be an integer > 0"),
        (lambda: MLPSpec(4, [4, 0], 2), "hidden=[4, 0]: width 0 is out of range; allowed: 1..65536"),
        (lambda: MLPSpec(4, [4.5], 2), "hidden=[4.5] must be a list of integers"),  # type: ignore[list-item]
        (lambda: MLPSpec(4, [4], 0), "out_features=0 is out of range; allowed: 1..100000"),
        (lambda: MLPSpec(4, [4], 2, activation="swish"), "activation='swish' is unknown; allowed: relu, leaky_relu, tanh, sigmoid, gelu"),
        (lambda: MLPSpec(4, [], 2, residual=True), "residual=True needs at least one hidden layer (the stem)"),
        (lambda: MLPSpec(4, [4], 2, residual="yes"), "residual='yes' must be true or false"),  # type: ignore[arg-type]
        (lambda: ConvSpec(3, 1, [4, 4, 4], [2], 2), "dims=3 is not allowed; allowed: 1, 2"),
        (lambda: ConvSpec(2, 0, [4, 4], [2], 2), "in_channels=0 must be an integer > 0"),
        (lambda: ConvSpec(2, 1, [4], [2], 2), "input_size=[4] must be 2 positive integers"),
        (lambda: ConvSpec(1, 1, [4], [2], 2, kernel_size=4), "kernel_size=4 must be a positive odd integer"),
        (lambda: ConvSpec(1, 1, [4], [2], 2, pooling="sum"), "pooling='sum' is unknown; allowed: avg, max, flatten"),
        (lambda: ConvSpec(1, 1, [4], [2], 2, batchnorm=1), "batchnorm=1 must be true or false"),  # type: ignore[arg-type]
    ],
)
def test_invalid_specs_name_the_field_value_and_allowed(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"kind": "transformer"}', "spec kind='transformer' is unknown; allowed: mlp, conv"),
        ('{"in_features": 3, "hidden": [2], "out_features": 1}', "spec kind=None is unknown"),
        ('{"kind": "mlp", "in_features": 3, "hidden": [2], "out_features": 1, "depth": 4}', "invalid mlp spec"),
        ('{"kind": "conv", "dims": 1}', "invalid conv spec"),
        ("[1, 2]", "spec JSON must be an object"),
        ("{not json", "spec JSON is not valid JSON"),
    ],
)
def test_bad_spec_json_is_refused_with_a_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        spec_from_json(text)
    assert message in str(err.value)


def test_package_imports_lazily_without_torch_and_exports_functions() -> None:
    """`import dils_search` (what `dils-search ls` pays) does not import torch; the exported names
    resolve on first use, and grow/train are the functions even once their submodules are loaded."""
    import subprocess
    import sys

    code = ("import sys, dils_search, dils_search.store, dils_search.search.storage; assert 'torch' not in sys.modules, 'torch'; "
            "import dils_search.core.grow, dils_search.core.train; from dils_search import grow, train, build, GrowthStep; "
            "assert callable(grow) and callable(train) and not isinstance(grow, type(sys)), (grow, train); "
            "assert dils_search.grow is dils_search.core.grow.grow is grow and dils_search.train is dils_search.core.train.train is train; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
