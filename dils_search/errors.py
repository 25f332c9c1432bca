"""Every error dils-search raises on purpose derives from :class:`DilsError`.

- :class:`InputError` (also a ``ValueError``): the user asked for something invalid. The CLI prints
  its one line and exits 2. ``ConfigError``, ``DataError``, ``SpecError`` and ``CheckpointError``
  are input errors.
- :class:`StoreError` (also a ``RuntimeError``): the storage or artifact folder the user gave cannot be
  used (unreachable, not a database, not writable, no such study): exit 2, before anything runs.
  :class:`RuntimeFailure`, a ``StoreError``, is a failure at run time (a checkpoint that cannot be
  saved, a full disk, a database that went away, workers that died): exit 1.
- :class:`TrainingDiverged`: a loss became NaN or infinite (a trial fails with the reason).
- :class:`MissingDependency` (also an ``ImportError``): an optional extra is not installed.

Anything else reaching the CLI is a bug in dils-search: one line says so (the traceback with ``-v``),
exit 1. This module imports nothing, so every layer may use it.
"""

from __future__ import annotations

__all__ = ["DilsError", "InputError", "ConfigError", "DataError", "SpecError", "CheckpointError", "StoreError",
           "RuntimeFailure", "TrainingDiverged", "MissingDependency"]


class DilsError(Exception):
    """Base of every error dils-search raises on purpose."""


class InputError(DilsError, ValueError):
    """Bad input: the message is one line naming the field, the value and what is allowed."""


class ConfigError(InputError):
    """A config is invalid."""


class DataError(InputError):
    """Data that cannot be used (missing file, NaN values, labels that are not 0..K-1, ...)."""


class SpecError(InputError):
    """An architecture spec or growth step that is impossible or over the documented limits."""


class CheckpointError(InputError):
    """A checkpoint file is unreadable, corrupt or not a dils-search checkpoint."""


class StoreError(DilsError, RuntimeError):
    """The store cannot do what was asked (unreachable database, unwritable folder, ...)."""


class RuntimeFailure(StoreError):
    """Something failed while running (workers that died, a database that went away): exit 1."""


class TrainingDiverged(DilsError, RuntimeError):
    """The loss became NaN or infinite."""


class MissingDependency(DilsError, ImportError):
    """An optional dependency (an extra such as ``[ray]`` or ``[postgres]``) is not installed."""
