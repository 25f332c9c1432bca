"""The one thread-count setting that the CLI, the Python API and Ray workers all use.

torch's CPU thread count changes results (float reductions are summed in another order), so a
study run from the CLI and one run through ``GrowthTree`` agree only on the same count. The count
is, in order: an explicit value (``--threads N`` or ``GrowthTree(threads=N)``; the last one given
in the process holds), the environment variable ``DILS_NUM_THREADS``, else 1 (small nets train
fastest on one thread; workers give the parallelism). ``train``, ``evaluate`` and
``evaluate_split`` apply it too (``set_threads()``), so ``ds.train`` trains as the CLI does. Every
trained node records the count and the device in its stored metrics (``threads``, ``device``).
"""

from __future__ import annotations

import os

from ..errors import InputError

__all__ = ["THREADS_ENV", "thread_count", "set_threads"]

THREADS_ENV = "DILS_NUM_THREADS"


def thread_count(explicit: int | None = None) -> int:
    """The thread count to use: ``explicit``, else ``$DILS_NUM_THREADS``, else 1."""
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 1:
            raise InputError(f"threads={explicit!r} must be an integer >= 1")
        return explicit
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{THREADS_ENV}={raw!r} must be an integer >= 1") from None
    if value < 1:
        raise InputError(f"{THREADS_ENV}={raw!r} must be an integer >= 1")
    return value


_chosen: int | None = None  # the last explicit count given to set_threads in this process


def set_threads(explicit: int | None = None) -> int:
    """Set torch's CPU thread count to ``thread_count(explicit)`` and return it. An explicit count is
    remembered: a later ``set_threads()`` (as ``train`` calls it) keeps it."""
    import torch

    global _chosen
    n = thread_count(explicit if explicit is not None else _chosen)
    if explicit is not None:
        _chosen = n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
