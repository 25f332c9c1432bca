"""Model families: the built-ins are registered, specs find theirs, and a family added from outside works."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from dils_search.config import ModelConfig, StudyConfig, base_spec, config_from_dict
from dils_search.core.family import CONV, MLP, ConvFamily, MLPFamily
from dils_search.core.grow import GrowthStep, grow, output_gap
from dils_search.core.model import build
from dils_search.core.spec import ConvSpec, MLPSpec, family_of, forward_flops, param_count, spec_from_json
from dils_search.registry import FAMILIES


def test_builtin_families_are_registered_under_the_config_kinds():
    assert FAMILIES.names()[:2] == ("mlp", "conv")
    assert FAMILIES.get("mlp") is MLP and isinstance(MLP, MLPFamily)
    assert FAMILIES.get("conv") is CONV and isinstance(CONV, ConvFamily)
    for name in ("mlp", "conv"):  # every model.kind a config may name builds its base spec through its family
        cfg = dataclasses.replace(StudyConfig(), model=ModelConfig(kind=name, hidden=[4]))
        spec = base_spec(cfg, 16, 3)
        assert spec.kind == name and family_of(spec) is FAMILIES.get(name)


@pytest.mark.parametrize("spec, family", [
    (MLPSpec(5, [7], 3), MLP),
    (MLPSpec(5, [7, 6], 3, "tanh", True), MLP),
    (ConvSpec(1, 2, [9], [4], 3), CONV),
    (ConvSpec(2, 1, [4, 4], [3], 2, pooling="flatten", batchnorm=True), CONV),
])
def test_each_spec_type_maps_to_its_family(spec, family):
    assert family_of(spec) is family
    assert isinstance(spec, family.spec_cls)
    assert spec_from_json(spec.to_json()) == spec


@dataclass(frozen=True)
class _ToySpec(MLPSpec):
    kind: str = field(default="toy-mlp", init=False)  # type: ignore[assignment]


class _ToyFamily(MLPFamily):
    name = "toy-mlp"
    spec_cls = _ToySpec
    blocks = 0

    def make_block(self, spec, index, in_width):
        type(self).blocks += 1
        return super().make_block(spec, index, in_width)


@pytest.fixture
def toy():
    family = FAMILIES.register("toy-mlp", _ToyFamily())
    try:
        yield family
    finally:
        FAMILIES.unregister("toy-mlp")


def test_a_family_registered_from_outside_is_used(toy):
    assert FAMILIES.get("toy-mlp") is toy and "toy-mlp" in FAMILIES.names()
    spec = _ToySpec(4, [6], 2)
    assert family_of(spec) is toy
    assert spec_from_json(spec.to_json()) == spec  # the kind names the family, the family the spec class
    plain = MLPSpec(4, [6], 2)
    assert (param_count(spec), forward_flops(spec)) == (param_count(plain), forward_flops(plain))
    net = build(spec, seed=0)
    assert toy.blocks == 1
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    new = grow(net, GrowthStep(1, 8, "dils-analytic"), x)
    assert toy.blocks == 2 and isinstance(new.spec, _ToySpec) and new.spec.hidden == [6, 8]
    assert output_gap(net, new, x) < 1e-6
    cfg = config_from_dict({"model": {"kind": "toy-mlp", "hidden": [6]}})  # a config may name it as model.kind
    assert base_spec(cfg, 4, 2) == spec
