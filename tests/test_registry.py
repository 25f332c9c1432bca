"""The registries are the one source of truth: a toy init method, policy and dataset registered from
outside the package run end to end through a real study; unknown names fail in one line; the
README's tables list exactly the registered names."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from conftest import tiny_config
from optuna.trial import TrialState

import dils_search
from dils_search.config import ConfigError
from dils_search.core.inits import InitContext, InitMethod, allowed_inits, init_method
from dils_search.core.spec import GrowthStep, MLPSpec, Spec, check_step
from dils_search.errors import InputError, SpecError
from dils_search.registry import DATASETS, INITS, POLICIES, Registry
from dils_search.search.policies import OptunaPolicy, make_policy
from dils_search.search.study import run_study
from dils_search.store import LineageStore

README = Path(__file__).resolve().parents[1] / "README.md"


class ToyLastPolicy(OptunaPolicy):
    """A toy policy: the sampler's paths, but every step goes right before the head."""

    proposed = 0

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.space = dataclasses.replace(self.space, positions="last")

    def propose(self, trial: optuna.Trial, base: Spec) -> list[GrowthStep] | None:
        type(self).proposed += 1
        return super().propose(trial, base)


@pytest.fixture
def toys() -> Iterator[dict[str, int]]:
    """Register a toy dataset, init method and policy; unregister them afterwards."""
    calls = {"data": 0, "init": 0}

    def toy_blobs(*, seed: int, num_samples: int | None, options: dict[str, Any], **_: Any) -> Any:
        calls["data"] += 1
        rng = np.random.default_rng(seed)
        n = num_samples or 300
        y = rng.integers(0, 3, n)
        x = rng.standard_normal((n, 6)) + 2.0 * np.eye(3, 6)[y]
        return x, y.astype(np.int64), None

    def toy_init(ctx: InitContext) -> None:
        calls["init"] += 1  # a plain function applies everywhere; here it delegates to dils-analytic
        init_method("dils-analytic").function()(ctx)
        ctx.basis = "toy+" + ctx.basis

    ToyLastPolicy.proposed = 0
    DATASETS.register("toy-blobs", toy_blobs)
    INITS.register("toy-init", toy_init)
    POLICIES.register("toy-last", ToyLastPolicy)
    try:
        yield calls
    finally:
        for registry, name in ((DATASETS, "toy-blobs"), (INITS, "toy-init"), (POLICIES, "toy-last")):
            registry.unregister(name)


def test_toy_init_policy_and_dataset_run_end_to_end(toys: dict[str, int], sqlite_url: str, tmp_path: Path) -> None:
    cfg = tiny_config(data={"dataset": "toy-blobs", "num_samples": 300},
                      search={"policy": "toy-last", "inits": ["toy-init"], "max_steps": 2, "widths": [8], "n_trials": 2},
                      final={"epochs": 0})
    assert type(make_policy(cfg)) is ToyLastPolicy
    study = run_study(cfg, sqlite_url, str(tmp_path / "art"), "toys", progress=False)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    assert toys["data"] >= 1 and toys["init"] >= 1 and ToyLastPolicy.proposed == 2
    store = LineageStore(sqlite_url, tmp_path / "art")
    try:
        for t in done:
            steps = [GrowthStep.from_dict(d) for d in t.user_attrs["steps"]]
            assert steps and {s.init for s in steps} == {"toy-init"}
            depth = len(cfg.model.hidden)
            for s in steps:  # the policy's hook: every layer goes right before the head
                assert s.position == depth
                depth += 1
            nodes = store.nodes(t.user_attrs["node_keys"])
            assert len(nodes) == len(steps) + 1 and all(n.status == "ready" for n in nodes)
            by_key = {n.key: n for n in nodes}  # the stored nodes record the toy init as their step's init
            grown = [by_key[k] for k in t.user_attrs["node_keys"][1:]]
            assert [n.step["init"] if n.step else None for n in grown] == ["toy-init"] * len(steps)
    finally:
        store.close()


def test_a_toy_init_with_rules_is_checked_by_the_core_and_the_config(toys: dict[str, int]) -> None:
    def needs_residual(spec: Spec, step: GrowthStep) -> None:
        if not spec.residual:
            raise SpecError("init='toy-res' needs a residual spec; use dils-analytic")

    INITS.register("toy-res", InitMethod(lambda *a: None, needs_residual))
    try:
        plain = MLPSpec(4, [8], 2)
        assert "toy-init" in allowed_inits(plain, 1) and "toy-res" not in allowed_inits(plain, 1)
        with pytest.raises(SpecError, match="init='toy-res' needs a residual spec"):
            check_step(plain, GrowthStep(1, 8, "toy-res"))
        with pytest.raises(ConfigError, match=r"search.inits\[0\]='toy-res' is impossible here: init='toy-res' needs"):
            tiny_config(search={"inits": ["toy-res"]})
        assert tiny_config(model={"residual": True}, search={"inits": ["toy-res"]}).search.inits == ["toy-res"]
    finally:
        INITS.unregister("toy-res")


@pytest.mark.parametrize(
    ("registry", "field"), [(INITS, "search.inits[0]"), (POLICIES, "search.policy"), (DATASETS, "data.dataset")]
)
def test_unknown_name_is_one_line_naming_field_value_and_allowed(registry: Registry[Any], field: str) -> None:
    with pytest.raises(InputError) as err:
        registry.check("nope", field)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{field}='nope'") and "allowed: " + ", ".join(registry.names()) in msg
    section, _, key = field.partition(".")
    value: Any = ["nope"] if key.startswith("inits") else "nope"
    with pytest.raises(ConfigError) as cfg_err:  # the config reads the same registry
        tiny_config(**{section: {key.split("[")[0]: value}})
    assert str(cfg_err.value).startswith(f"{field}='nope'") and ", ".join(registry.names()) in str(cfg_err.value)


def test_registered_names_reach_config_and_core_and_leave_with_unregister(toys: dict[str, int]) -> None:
    assert "toy-blobs" in str(_config_error(data={"dataset": "cifar"}))  # the allowed list is the registry's
    with pytest.raises(InputError, match="init='nope' is unknown; allowed: .*toy-init"):
        check_step(MLPSpec(4, [8], 2), GrowthStep(1, 8, "nope"))
    INITS.unregister("toy-init")
    assert "toy-init" not in INITS.names() and "toy-init" not in INITS
    with pytest.raises(ConfigError, match=r"search.inits\[0\]='toy-init'"):
        tiny_config(search={"inits": ["toy-init"]})
    INITS.unregister("toy-init")  # twice is harmless


def test_duplicate_register_needs_replace(toys: dict[str, int]) -> None:
    with pytest.raises(InputError, match="'toy-blobs' is already registered; pass replace=True"):
        DATASETS.register("toy-blobs", lambda **_: None)
    with pytest.raises(InputError, match="'digits' is already registered"):
        DATASETS.register("digits", lambda **_: None)
    other = DATASETS.get("toy-blobs")
    DATASETS.register("toy-blobs", other, replace=True)
    assert DATASETS.get("toy-blobs") is other and DATASETS.names().count("toy-blobs") == 1


def test_builtins_are_lazy_and_exported() -> None:
    assert INITS.names() == ("dils-analytic", "dils-approx", "identity", "zero", "random")
    assert POLICIES.names() == ("optuna", "random", "greedy", "stack", "scratch", "plain")
    assert DATASETS.names() == ("digits", "mnist1d", "synthetic", "file")
    assert dils_search.INITS is INITS and dils_search.POLICIES is POLICIES and dils_search.DATASETS is DATASETS
    assert init_method("identity").same_width and not init_method("random").same_width
    assert [n for n in POLICIES.names() if POLICIES.get(n).samples_paths] == ["optuna", "random", "stack", "scratch"]


def test_readme_tables_list_the_registered_names() -> None:
    text = README.read_text(encoding="utf-8")
    row = re.search(r"^\| init method \| (.+?) — ", text, re.M)
    assert row is not None and re.findall(r"`([^`]+)`", row.group(1)) == list(INITS.names())
    table = text.split("| policy | what it does |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"^\| `([^`]+)` \|", table, re.M) == list(POLICIES.names())
    datasets = re.search(r"`dataset` = ([^;]+);", text)
    assert datasets is not None
    assert re.split(r",\s*|\s+or\s+", " ".join(datasets.group(1).split())) == list(DATASETS.names())


def _config_error(**sections: Any) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        tiny_config(**sections)
    return err.value
