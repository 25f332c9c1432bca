"""Study configs: TOML files mapped one to one onto validated dataclasses.

Every problem is reported as ``ConfigError`` with one line naming the field, the value and
what is allowed. Configs are data: nothing in them is evaluated or imported.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import defaults
from ..core.inits import refusal
from ..core.spec import (
    ACTIVATIONS,
    MAX_DEPTH,
    OPTIMIZERS,
    POOLINGS,
    SCHEDULES,
    Spec,
)
from ..errors import ConfigError
from ..registry import DATASETS, FAMILIES, INITS, POLICIES
from .checks import (
    MAX_EPOCHS,
    MAX_KERNEL,
    MAX_LR,
    MAX_SAMPLES,
    MAX_SECONDS,
    MAX_STEPS,
    MAX_TRIALS,
    MAX_WIDTH,
    _build,
    _key,
    _one_of,
    _positive,
    _show,
    check_choice,
    check_number,
    check_space,
)

# names come from the core's tuples and the registries; neither imports torch (``show`` stays fast)

__all__ = [
    "ConfigError", "StudyConfig", "DataConfig", "ModelConfig", "TrainConfig", "GrowConfig", "SearchConfig", "FinalConfig",
    "StorageConfig",
    "load_config", "config_from_dict", "config_from_toml", "largest_spec", "check_space", "check_number", "check_choice", "SAMPLERS",
    "PRUNERS", "POLICIES", "SHARE", "PLAIN_HIDDEN",
]

SAMPLERS = ("tpe", "random", "gp", "nsga2")
PRUNERS = ("none", "median", "sha", "hyperband", "growth")
OBJECTIVES = ("metric", "params")
#: the finalize stage's default part of ``search.budget_flops`` (docs/benchmarks.md, "A compute budget")
SHARE = 0.5
#: the ``plain`` policy's default architecture per model family: what a user would write by hand
#: (two 256-unit layers; three 32-channel conv layers with the config's kernel, BatchNorm and pooling)
PLAIN_HIDDEN = {"mlp": [256, 256], "conv": [32, 32, 32]}
__all__ += ["MAX_EPOCHS", "MAX_KERNEL", "MAX_LR", "MAX_SAMPLES", "MAX_SECONDS", "MAX_STEPS", "MAX_TRIALS", "MAX_WIDTH"]


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    num_samples: int = 4000
    path: str = ""
    task: str = "classification"
    label_column: str = ""
    val_fraction: float = 0.15
    test_fraction: float = 0.15


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [32])
    activation: str = "relu"
    residual: bool = False
    dims: int = 1
    in_channels: int = 0  # 0: from the data (N x C x ... arrays; 1 for flat data)
    input_size: list[int] = field(default_factory=list)  # []: from the data
    kernel_size: int = 3
    batchnorm: bool = False
    pooling: str = defaults.POOLING


@dataclass(frozen=True)
class TrainConfig:
    # the defaults shared with core.train.Recipe are declared once, in core/defaults.py
    optimizer: str = defaults.OPTIMIZER
    lr: float = defaults.LR
    batch_size: int = defaults.BATCH_SIZE
    weight_decay: float = defaults.WEIGHT_DECAY
    base_epochs: int = 10
    epochs_per_step: int = 5
    rewarmup_epochs: float = 0.5
    patience: int = 0
    schedule: str = defaults.SCHEDULE  # lr within each node's training: constant, or cosine decay to 0


@dataclass(frozen=True)
class GrowConfig:
    # the defaults shared with core.grow.GrowOptions are declared once, in core/defaults.py
    calib_size: int = 1024
    ridge: float = defaults.RIDGE
    approx_tol: float = defaults.APPROX_TOL
    approx_epochs: int = defaults.APPROX_EPOCHS


@dataclass(frozen=True)
class SearchConfig:
    policy: str = "optuna"
    sampler: str = "tpe"
    pruner: str = "none"
    min_gain: float = 0.002
    min_delta: float = 0.002
    max_steps: int = 3
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    inits: list[str] = field(default_factory=lambda: ["dils-analytic"])
    positions: list[int] | str = "any"
    objectives: list[str] = field(default_factory=lambda: ["metric"])
    n_trials: int = 20
    timeout: float = 0.0
    max_flops: float = 0.0  # a cap on the search alone; budget_flops is the one for search + finalize
    budget_flops: float = 0.0  # training FLOPs up to the delivered model (search + finalize); 0 = none
    stack_width: int = 0


@dataclass(frozen=True)
class FinalConfig:
    """The finalize stage: the ``top_k`` best distinct architectures of the search are trained
    ``epochs`` more epochs with a decay schedule; the best of them by validation is delivered.
    ``lr = 0`` means ``train.lr``; ``epochs = 0`` turns the stage off. With ``search.budget_flops``,
    the stage gets ``share`` of the budget (what the search left of it) and the epochs are derived
    from it; ``patience > 0`` stops a candidate early once validation stops improving."""

    epochs: int = 5
    lr: float = 0.0
    schedule: str = "cosine"
    rewarmup_epochs: float = 0.5
    top_k: int = 2
    share: float = SHARE
    patience: int = 0


@dataclass(frozen=True)
class StorageConfig:
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 3
    lease_seconds: float = 120.0


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    compare: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **sections: Any) -> StudyConfig:
        """A copy with fields of sections replaced, e.g. ``replace(search={"n_trials": 3})``; re-validated."""
        data = self.to_dict()
        for key, value in sections.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        return config_from_dict(data)


def largest_spec(cfg: StudyConfig, base: Spec) -> Spec:
    """The base spec with ``search.max_steps`` layers of the widest ``search.widths`` appended:
    what the search may build at most. ``make_task`` checks it against the limits, before any write."""
    wide = max(cfg.search.widths)
    try:
        return base.with_hidden([*base.hidden, *[wide] * cfg.search.max_steps])
    except ValueError as exc:
        raise ConfigError(f"search.widths/search.max_steps: the deepest candidate is too large: {exc}") from None


def base_spec(cfg: StudyConfig, in_features: int, out_features: int, sample_shape: tuple[int, ...] = ()) -> Spec:
    """The base spec of ``cfg`` for data of ``in_features`` inputs (shaped ``sample_shape``) and ``out_features`` outputs."""
    try:
        return FAMILIES.get(cfg.model.kind).spec_from_config(cfg.model, in_features, out_features, sample_shape)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def _validate(cfg: StudyConfig) -> None:
    """Check every section, one function each (in this order), then the compare entries."""
    if not cfg.name or any(c in cfg.name for c in "/\\\0") or cfg.name.startswith("."):
        raise ConfigError(f"name={cfg.name!r} must be a non-empty name without '/', '\\' or a leading '.'")
    for section in (_data, _model, _training, _storage, _search, _positions, _inits, _compare):
        section(cfg)


def _data(cfg: StudyConfig) -> None:
    d = cfg.data
    _one_of("data.dataset", d.dataset, DATASETS.names())
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed!r} is out of range; allowed: 0..{2**32 - 1}")
    _positive("data.num_samples", d.num_samples, at_most=MAX_SAMPLES)
    _one_of("data.task", d.task, ("classification", "regression"))
    if d.dataset == "file" and not d.path:
        raise ConfigError("data.path='' must name an .npz or .csv file when data.dataset='file'")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(d, name)
        if not 0 < v < 0.5:
            raise ConfigError(f"data.{name}={v!r} must be between 0 and 0.5")


def _model(cfg: StudyConfig) -> None:
    m = cfg.model
    _one_of("model.kind", m.kind, FAMILIES.names())
    _one_of("model.activation", m.activation, ACTIVATIONS)
    _one_of("model.pooling", m.pooling, POOLINGS)
    if not m.hidden:
        raise ConfigError("model.hidden=[] must list at least one hidden width")
    for i, h in enumerate(m.hidden):
        _positive(f"model.hidden[{i}]", h, at_most=MAX_WIDTH)
    if m.kind == "conv":
        _positive("model.in_channels", m.in_channels, allow_zero=True, at_most=MAX_WIDTH)
        _positive("model.kernel_size", m.kernel_size, at_most=MAX_KERNEL)
        for i, size in enumerate(m.input_size):
            _positive(f"model.input_size[{i}]", size, at_most=MAX_SAMPLES)
        if m.dims not in (1, 2):
            raise ConfigError(f"model.dims={m.dims!r} is not allowed; allowed: 1, 2")
        if m.input_size and len(m.input_size) != m.dims:
            raise ConfigError(f"model.input_size={m.input_size!r} must give {m.dims} size(s) for dims={m.dims}, or none (from the data)")


def _training(cfg: StudyConfig) -> None:
    t, g, f = cfg.train, cfg.grow, cfg.final
    _one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    _one_of("train.schedule", t.schedule, SCHEDULES)
    _positive("train.lr", t.lr, at_most=MAX_LR)
    _positive("train.batch_size", t.batch_size, at_most=MAX_SAMPLES)
    _positive("train.weight_decay", t.weight_decay, allow_zero=True, at_most=MAX_LR)
    _positive("train.base_epochs", t.base_epochs, at_most=MAX_EPOCHS)
    _positive("train.epochs_per_step", t.epochs_per_step, at_most=MAX_EPOCHS)
    _positive("train.rewarmup_epochs", t.rewarmup_epochs, allow_zero=True, at_most=MAX_EPOCHS)
    _positive("train.patience", t.patience, allow_zero=True, at_most=MAX_EPOCHS)
    _positive("grow.calib_size", g.calib_size, at_most=MAX_SAMPLES)
    _positive("grow.ridge", g.ridge, allow_zero=True, at_most=1e6)
    _positive("grow.approx_tol", g.approx_tol)
    _positive("grow.approx_epochs", g.approx_epochs, allow_zero=True, at_most=MAX_EPOCHS)
    _positive("final.epochs", f.epochs, allow_zero=True, at_most=MAX_EPOCHS)
    _positive("final.lr", f.lr, allow_zero=True, at_most=MAX_LR)
    _one_of("final.schedule", f.schedule, SCHEDULES)
    _positive("final.rewarmup_epochs", f.rewarmup_epochs, allow_zero=True, at_most=MAX_EPOCHS)
    _positive("final.top_k", f.top_k, at_most=MAX_TRIALS)
    _positive("final.patience", f.patience, allow_zero=True, at_most=MAX_EPOCHS)
    if not 0 < f.share < 1:
        raise ConfigError(f"final.share={f.share!r} must be between 0 and 1 (the finalize stage's part of search.budget_flops)")


def _storage(cfg: StudyConfig) -> None:
    st = cfg.storage
    _positive("storage.heartbeat_interval", st.heartbeat_interval, at_most=MAX_SECONDS)
    _positive("storage.grace_period", st.grace_period, at_most=MAX_SECONDS)
    _positive("storage.max_retry", st.max_retry, allow_zero=True, at_most=1000)
    _positive("storage.lease_seconds", st.lease_seconds, at_most=MAX_SECONDS)
    if st.grace_period <= st.heartbeat_interval:
        raise ConfigError(f"storage.grace_period={st.grace_period!r} must be > storage.heartbeat_interval={st.heartbeat_interval}")


def _search(cfg: StudyConfig) -> None:
    s, m = cfg.search, cfg.model
    _one_of("search.policy", s.policy, POLICIES.names())
    _one_of("search.sampler", s.sampler, SAMPLERS)
    _one_of("search.pruner", s.pruner, PRUNERS)
    _positive("search.min_gain", s.min_gain, allow_zero=True)
    _positive("search.min_delta", s.min_delta, allow_zero=True)
    check_space(s.max_steps, s.widths, s.inits, s.positions, "search.")
    if len(m.hidden) + s.max_steps > MAX_DEPTH:
        raise ConfigError(f"model.hidden has {len(m.hidden)} layers and search.max_steps={s.max_steps}; allowed: at most "
                          f"{MAX_DEPTH} hidden layers in all")
    _positive("search.n_trials", s.n_trials, at_most=MAX_TRIALS)
    _positive("search.timeout", s.timeout, allow_zero=True)
    _positive("search.max_flops", s.max_flops, allow_zero=True)
    _positive("search.budget_flops", s.budget_flops, allow_zero=True)
    if s.max_flops and s.budget_flops:
        raise ConfigError(f"search.max_flops={s.max_flops!r} cannot be set with search.budget_flops={s.budget_flops!r}: "
                          "budget_flops covers the search and the finalize stage (the search stops at "
                          "(1 - final.share) of it); allowed: one of the two")
    _positive("search.stack_width", s.stack_width, allow_zero=True, at_most=MAX_WIDTH)
    if not s.objectives or s.objectives[0] != "metric":
        raise ConfigError(f"search.objectives={s.objectives!r} must start with 'metric'; allowed: ['metric'], ['metric', 'params']")
    for i, o in enumerate(s.objectives):
        _one_of(f"search.objectives[{i}]", o, OBJECTIVES)
    if len(s.objectives) > 1 and s.pruner != "none":
        raise ConfigError(f"search.pruner={s.pruner!r} cannot prune a multi-objective study; allowed: 'none'")


def _positions(cfg: StudyConfig) -> None:
    s, m = cfg.search, cfg.model
    if isinstance(s.positions, str):
        return
    limit = len(m.hidden) + s.max_steps - 1
    for i, p in enumerate(s.positions):
        if not 0 <= p <= limit:
            raise ConfigError(f"search.positions[{i}]={p!r} is out of range; allowed: 0..{limit}")
    if min(s.positions) > len(m.hidden):
        raise ConfigError(f"search.positions={s.positions!r}: at least one must be <= {len(m.hidden)} (the base depth)")


def _inits(cfg: StudyConfig) -> None:
    """Every init is registered and possible somewhere on the base spec, by ``check_step``'s own rules."""
    s = cfg.search
    try:  # a small stand-in input: the rules depend on the layers, not on the input's size
        spec = base_spec(cfg, 64, 2, (1, 64) if cfg.model.dims == 1 else (1, 8, 8))
    except ConfigError:  # over the limits: make_task refuses the real spec in one line
        return
    for i, init in enumerate(s.inits):
        if (error := refusal(spec, init, s.widths[0])) is not None:
            raise ConfigError(f"search.inits[{i}]={init!r} is impossible here: {error}")


def _compare(cfg: StudyConfig) -> None:
    for i, entry in enumerate(cfg.compare):
        where = f"compare[{i}]"
        extra = sorted(_key(k) for k in set(entry) - {"policy", "init", "label", "sampler", "hidden"})
        if extra:
            raise ConfigError(f"{where}.{extra[0]} is not a known key; allowed: policy, init, label, sampler, hidden")
        if not isinstance(entry.get("label", ""), str):
            raise ConfigError(f"{where}.label={_show(entry['label'])} must be a string")
        _one_of(f"{where}.policy", entry.get("policy", "optuna"), POLICIES.names())
        if "init" in entry:
            _one_of(f"{where}.init", entry["init"], INITS.names())
        if "sampler" in entry:
            _one_of(f"{where}.sampler", entry["sampler"], SAMPLERS)
        if "hidden" in entry:
            hidden = entry["hidden"]
            if entry.get("policy") != "plain":
                raise ConfigError(f"{where}.hidden is only for policy='plain' (the plain network's layers); "
                                  f"the policy here is {_show(entry.get('policy', 'optuna'))}")
            if not isinstance(hidden, list) or not hidden or not all(isinstance(h, int) and not isinstance(h, bool) for h in hidden):
                raise ConfigError(f"{where}.hidden={_show(hidden)} must be a non-empty list of layer widths (channels)")
            for j, h in enumerate(hidden):
                _positive(f"{where}.hidden[{j}]", h, at_most=MAX_WIDTH)


def config_from_dict(data: dict[str, Any]) -> StudyConfig:
    cfg = _build(StudyConfig, data, "")
    cfg = dataclasses.replace(
        cfg,
        **{k: _build(type(getattr(cfg, k)), dataclasses.asdict(getattr(cfg, k)), k) for k in ("data", "model", "train", "grow", "search", "final", "storage")},
    )
    _validate(cfg)
    return typing.cast(StudyConfig, cfg)


def config_from_toml(text: str, name: str = "study", source: str = "<text>") -> StudyConfig:
    """Parse and validate TOML ``text`` (``name`` is used when the text has none); raises ``ConfigError``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line L, column C)"
        raise ConfigError(f"config={source!r} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config={source!r} is not valid TOML: arrays or tables nested too deeply") from None
    raw.setdefault("name", name)
    return config_from_dict(raw)


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a TOML study config; raises ``ConfigError`` with one clear line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config={str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config={str(path)!r} cannot be read: {exc}") from None
    return config_from_toml(text, p.stem, str(path))
