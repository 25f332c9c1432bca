"""Who holds a node's lease: the owner string, a dead holder on this machine, and what a waiting worker says.

An owner is ``HOST:PID:ID:MACHINE``: the host name, the process id, a random id (one per store, so
threads of one process are distinct owners) and a tag of this boot and PID namespace. A lease whose
holder ran on this machine (same host name and tag) and whose process is gone is dead: it is taken
at once instead of after it expires. Holders elsewhere, or owners written another way, are waited for
until their lease expires (a live holder renews it every third of its length).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path

from ..errors import InputError

log = logging.getLogger("dils_search.store")

MAX_LEASE_SECONDS = 86400.0  # a day, as the config's storage.lease_seconds


def check_seconds(name: str, value: object, at_most: float = MAX_LEASE_SECONDS) -> float:
    """``value`` as a float in (0, ``at_most``], or an ``InputError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= at_most or math.isnan(value):
        raise InputError(f"{name}={value!r} must be a number of seconds > 0 and at most {at_most:g}")
    return float(value)


def _machine_tag() -> str:
    """8 hex digits naming this boot of this machine and this PID namespace ('' when unknown)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}|{ns}".encode()).hexdigest()[:8]


_HOST = socket.gethostname()[:64]
_TAG = _machine_tag()


def default_owner() -> str:
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{_TAG}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is dead too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "Z"
    except (OSError, ValueError, IndexError):
        return False


def holder_is_dead(owner: str | None) -> bool:
    """Whether ``owner`` ran on this machine (host name and machine tag) in a process that is gone."""
    parts = (owner or "").split(":")
    if len(parts) != 4 or not _TAG or parts[0] != _HOST or parts[3] != _TAG or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid > 0 and pid != os.getpid() and _process_gone(pid)


class WaitNotes:
    """Says, on the ``dils_search.store`` logger, which lease a worker has been waiting for and until
    when: first after ``first`` seconds, then every minute."""

    def __init__(self, key: str, first: float) -> None:
        self.key, self.first = key, first
        self.since: float | None = None
        self.due = 0.0

    def waiting(self, holder: str | None, until: float | None) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since, self.due = now, now + self.first
        if now < self.due:
            return
        self.due = now + 60.0
        left = max(0.0, (until or 0.0) - time.time())
        log.warning("node %s: waiting %.0f s so far for the worker that is training it (lease owner %s, lease "
                    "expires in %.0f s); a live worker renews its lease, a dead one on another host is replaced "
                    "once it expires", self.key[:12], now - self.since, holder, left)
