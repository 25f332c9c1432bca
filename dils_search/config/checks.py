"""The checks a config and the Python API share: coercion of values to a field's type and the one-line
``ConfigError``s that name the field, the value and what is allowed, the upper bounds, and the checks
of a growth space (``[search]`` and ``GrowthSpace``) and of a number (``GrowthTree``'s arguments)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from ..core.spec import MAX_DEPTH
from ..errors import ConfigError
from ..registry import INITS

# Upper bounds that keep a typo (an extra zero or three) from hanging a study or exhausting memory.
MAX_WIDTH = 65536
MAX_STEPS = 64
MAX_TRIALS = 1_000_000
MAX_EPOCHS = 100_000
MAX_SAMPLES = 10_000_000
MAX_KERNEL = 63
MAX_LR = 10.0
MAX_SECONDS = 86400  # heartbeats, grace periods and leases: a day at most


#: the types of a growth space's fields, as ``SearchConfig`` declares them
SPACE_TYPES: dict[str, Any] = {"max_steps": int, "widths": list[int], "inits": list[str], "positions": list[int] | str}


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to one short line, so that a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(key: Any) -> str:
    """A TOML key as written in a message: bare if it is a plain name, quoted otherwise."""
    plain = isinstance(key, str) and key.replace("_", "a").isalnum() and key.isascii() and len(key) <= 60
    return key if plain else _show(key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list,):
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


_MUST = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}={_show(value)} must be {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}={_show(value)} must be {_type_name(tp)}")
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={_show(value)} must be a table")
        return value
    if tp in _MUST:  # a bool is neither an integer nor a number here, and an integer is a number
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, int | float if tp is float else tp):
            raise ConfigError(f"{where}={_show(value)} must be {_MUST[tp]}")
        if tp is float and (value != value or value in (float("inf"), float("-inf"))):
            raise ConfigError(f"{where}={_show(value)} must be a finite number")
        return float(value) if tp is float else value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}={_show(data)} must be a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{_key(key)}" if prefix else _key(key)
            close = difflib.get_close_matches(str(key), names, n=1) if len(str(key)) <= 100 else []
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(names)}"
            raise ConfigError(f"{where} is not a known key{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _one_of(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}={_show(value)} is unknown{hint}; allowed: {', '.join(allowed)}")


def _positive(where: str, value: float, allow_zero: bool = False, at_most: float | None = None) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}={_show(value)} must be {'>= 0' if allow_zero else '> 0'}")
    if at_most is not None and value > at_most:
        raise ConfigError(f"{where}={_show(value)} is too large; allowed: at most {at_most:g}")


def check_space(max_steps: Any, widths: Any, inits: Any, positions: Any, prefix: str = "", *,
                min_steps: Any = 1) -> dict[str, Any]:
    """The growth space's checks, shared by ``[search]`` and ``GrowthSpace`` (fields named ``prefix +
    name``): at most ``MAX_STEPS`` steps (and ``min_steps`` in 0..``max_steps``), widths in 1..``MAX_WIDTH``,
    registered inits, and positions (in 0..``MAX_DEPTH - 1``)
    'any', 'last' or a list of layer indices. Returns the values, coerced like a config's."""
    raw = {"max_steps": max_steps, "widths": widths, "inits": inits, "positions": positions}
    v = {k: _coerce(list(x) if isinstance(x, tuple) else x, SPACE_TYPES[k], prefix + k) for k, x in raw.items()}
    _positive(f"{prefix}max_steps", v["max_steps"], at_most=MAX_STEPS)
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or not 0 <= min_steps <= v["max_steps"]:
        raise ConfigError(f"{prefix}min_steps={_show(min_steps)} must be an integer in 0..max_steps ({v['max_steps']})")
    if not v["widths"]:
        raise ConfigError(f"{prefix}widths=[] must list at least one width")
    for i, w in enumerate(v["widths"]):
        _positive(f"{prefix}widths[{i}]", w, at_most=MAX_WIDTH)
    if not v["inits"]:
        raise ConfigError(f"{prefix}inits=[] must list at least one init; allowed: {', '.join(INITS.names())}")
    for i, init in enumerate(v["inits"]):
        _one_of(f"{prefix}inits[{i}]", init, INITS.names())
    if isinstance(v["positions"], str):
        _one_of(f"{prefix}positions", v["positions"], ("any", "last"))
    elif not v["positions"]:
        raise ConfigError(f"{prefix}positions=[] must list at least one position, or be 'any' or 'last'")
    for i, p in enumerate(v["positions"] if isinstance(v["positions"], list) else []):
        if not 0 <= p < MAX_DEPTH:
            raise ConfigError(f"{prefix}positions[{i}]={p!r} is out of range; allowed: 0..{MAX_DEPTH - 1}")
    return v


def check_choice(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else a one-line ``ConfigError`` (with a did-you-mean)."""
    _one_of(where, value, allowed)
    return str(value)


def check_number(where: str, value: Any, kind: type, *, allow_zero: bool = False, at_most: float | None = None) -> Any:
    """``value`` coerced to ``kind`` (int or float, as a config field is) and > 0 (>= 0 with ``allow_zero``),
    at most ``at_most``; else a one-line ``ConfigError`` naming ``where``."""
    value = _coerce(value, kind, where)
    _positive(where, value, allow_zero=allow_zero, at_most=at_most)
    return value
