"""The trial user attributes a study writes, in the order optuna-dashboard shows them.

Readable ones first (``path``, ``hidden``, ``depth``, ``params``, ``val_metric``, ``test_metric``,
``flops_spent``), the structured growth steps next, node-key hashes last. Studies written before
``steps`` existed kept the steps as a list under ``path``: ``steps_of`` reads both.
"""

from __future__ import annotations

from typing import Any

__all__ = ["steps_of", "path_text"]


def steps_of(user_attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The trial's growth steps as dicts (``position``, ``width``, ``init``)."""
    steps = user_attrs.get("steps")
    if steps is None and isinstance(user_attrs.get("path"), list):  # written before 'steps' existed
        steps = user_attrs["path"]
    return list(steps or [])


def path_text(steps: list[dict[str, Any]]) -> str:
    """``+WIDTH@POSITION:INIT`` per step, joined by arrows; ``(base only)`` for none."""
    if not steps:
        return "(base only)"
    return " -> ".join(f"+{s['width']}@{s['position']}:{s['init']}" for s in steps)
