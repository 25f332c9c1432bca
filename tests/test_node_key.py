"""Node identity: the studies as they shipped keep their node keys, whatever fields the configs grow.

The keys below were computed on the code before the recipe schema existed (commit 0fcccd1, where
``node_recipe`` hashed every config field with an exception for ``schedule``). Stored studies reuse
nodes by these keys, so a change that alters any of them must come with a migration.
The configs are the shipped ones as of release 3badb71, kept in ``tests/fixtures/pinned_studies``:
the shipped studies have since chosen other bases (issue 23), which makes them other studies, not
another key schema. No data is loaded: the base spec comes from the datasets' known shapes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dils_search.config import StudyConfig, base_spec, load_config
from dils_search.core.spec import GrowthStep
from dils_search.search.paths import RECIPE_SCHEMA, GrowthPath, RecipeSchema, node_recipe

STUDIES = Path(__file__).resolve().parent / "fixtures" / "pinned_studies"
#: (in_features, out_features) of each dataset the shipped studies use
DIMS = {"digits": (64, 10), "mnist1d": (40, 10), "synthetic": (16, 1)}

#: study -> keys of: the base node; one step; two steps (grow mode); the two-step candidate in scratch mode.
#: Steps append the config's first width with its first init: (n, w, init) then (n + 1, w, init).
PINNED = {
    "compare-mnist1d": (
        "5afac6dda8109d0bdf6447e366123f9e47b3f083453ae97373a4ab4ce371c745",
        "d736386720fcec4391c33ecb8b2627b3c2e2f713d19187cf4c743d20a1a60ba9",
        "9b22e87b73ef92af9bc6b69fe328a0d77df06c525d6567984c1e5dac4ef0d58e",
        "eae8bdc39c9f224258264a8ec00046f502c175905f08b96e15356acadc0f1468",
    ),
    "digits-mlp": (
        "c70428b3aedf490a77e886c1c32f123f7695bb48f5fba4ec1ee2f9f4359d2f49",
        "73625e8611427f1d83fd6eca33c9d3e6e7e14460e4f0221959466ccb4c083ded",
        "49c537a4ed63ad5be9a94e4b81711798ba27037dcfe06fa5d0779d903ae2d09b",
        "28acb82caa7364c37532de1db5d890beb523822193be0d70e13b421e4b2f43c0",
    ),
    "mnist1d-cnn": (
        "501fe57f593ab6e29968d025cab529281cb7e29d9ce9b72ec73cfdbc4f84ae14",
        "df8ab7c0bbfd451eabf6f060a95061276ec88576d48322e2a3cd1b0945c24f51",
        "54d1c4166f66b6e519239c6e69dfc69a57ed783ee8c1a1c795ba4f26c4fb0f4c",
        "49996a89dc0d570a7c385ec4ec41a1eb140c8ad1177d60b04b0f44fb27a3c120",
    ),
    "mnist1d-mlp": (
        "ef1fe06c3036eba6e9004fc19d201df7a95e0657006d5da98ed8053a03c4fc20",
        "0af066227ad22f1d264bf5ccab441d90d8f5fb90b0d38aa298f74a5610a3268c",
        "0e88489e26530d3d7fce100267fd81926a7745d3915d5051f153847afb7c552e",
        "c417bc2d7accc30cd4fcf9a507d37e84729ebd31bba1f1514c5342a1baf18b31",
    ),
    "synthetic": (
        "39a3598a776d90b482e4fb571c3fa0d17c61fee594b0c5d4ac4102cf50182f79",
        "668936ff0376f9e0d608b4502796c70f9bb1d661574fc9252e9fadf446c14d6e",
        "4251de7293a5d7e6c37490fb45a6cc7a6bbfb8594fae28c185fbccd463eed83a",
        "a177e3c3d33c4e935cecfc6ed3a16c06527233e6a9ce17956fe25b66a03cc3e0",
    ),
}
#: digits-mlp with train.schedule = "cosine": a non-default schedule is part of the key
DIGITS_COSINE_BASE = "87bb78799e17d00ee1a7aa6617bf73110caa50af3f021373647b8e9bf144d12c"


def _keys(cfg: StudyConfig, schema: RecipeSchema = RECIPE_SCHEMA) -> tuple[str, ...]:
    base = base_spec(cfg, *DIMS[cfg.data.dataset])
    w, init, n = cfg.search.widths[0], cfg.search.inits[0], len(base.hidden)
    one = (GrowthStep(n, w, init),)
    two = (*one, GrowthStep(n + 1, w, init))
    grow, scratch = node_recipe(cfg, schema=schema), node_recipe(cfg, "scratch", schema)
    return (GrowthPath(base, grow).key, GrowthPath(base, grow, one).key, GrowthPath(base, grow, two).key,
            GrowthPath(base, scratch, two).key)


def test_every_shipped_study_is_pinned() -> None:
    assert sorted(p.stem for p in STUDIES.glob("*.toml")) == sorted(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_studies_keep_their_node_keys(name: str) -> None:
    assert _keys(load_config(STUDIES / f"{name}.toml")) == PINNED[name]


def test_a_non_default_schedule_keeps_its_key() -> None:
    cfg = load_config(STUDIES / "digits-mlp.toml").replace(train={"schedule": "cosine"})
    assert _keys(cfg)[0] == DIGITS_COSINE_BASE


def _with_new_train_field(cfg: StudyConfig, value: float) -> StudyConfig:
    """``cfg`` whose train section has one more optional field, ``label_smoothing`` (default 0.0)."""
    train_cls = dataclasses.make_dataclass("TrainConfigNext", [("label_smoothing", float, 0.0)],
                                           bases=(type(cfg.train),), frozen=True)
    return dataclasses.replace(cfg, train=train_cls(**dataclasses.asdict(cfg.train), label_smoothing=value))


def test_a_new_optional_field_at_its_default_keeps_every_key() -> None:
    schema = RECIPE_SCHEMA.with_field("train", "label_smoothing", 0.0)
    for name, keys in PINNED.items():
        cfg = load_config(STUDIES / f"{name}.toml")
        assert _keys(_with_new_train_field(cfg, 0.0), schema) == keys
        changed = _keys(_with_new_train_field(cfg, 0.1), schema)
        assert all(a != b for a, b in zip(changed, keys, strict=True))
        assert node_recipe(_with_new_train_field(cfg, 0.1), schema=schema)["train"]["label_smoothing"] == 0.1


def test_an_undeclared_field_is_refused() -> None:
    cfg = load_config(STUDIES / "digits-mlp.toml")
    with pytest.raises(RuntimeError, match="train.label_smoothing is not in the node-key schema"):
        node_recipe(_with_new_train_field(cfg, 0.0))
    unkeyed = dataclasses.replace(RECIPE_SCHEMA, unkeyed={"train": frozenset({"label_smoothing"})})
    assert _keys(_with_new_train_field(cfg, 0.3), unkeyed) == PINNED["digits-mlp"]


def test_the_schema_covers_every_field_of_the_keyed_sections() -> None:
    cfg = StudyConfig()
    for section, declared in RECIPE_SCHEMA.fields.items():
        names = {f.name for f in dataclasses.fields(getattr(cfg, section))}
        assert names == set(declared) | RECIPE_SCHEMA.unkeyed.get(section, frozenset()), section


def test_the_version_enters_the_key_only_from_2_on() -> None:
    cfg = load_config(STUDIES / "digits-mlp.toml")
    assert "version" not in node_recipe(cfg)
    v2 = dataclasses.replace(RECIPE_SCHEMA, version=2)
    assert node_recipe(cfg, schema=v2)["version"] == 2
    assert _keys(cfg, v2)[0] != PINNED["digits-mlp"][0]
