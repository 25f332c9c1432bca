"""Progress over finished trials: a tqdm bar on a terminal, plain lines every few seconds elsewhere.

A log file or a CI console gets ``study: 12/30 trials (best=0.9611)`` at most every
``PLAIN_EVERY`` seconds and once at the end, instead of hundreds of carriage-return frames.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["progress_bar", "PLAIN_EVERY"]

PLAIN_EVERY = 10.0


class _Plain:
    """The part of tqdm's interface the studies use, printing one plain line at a time."""

    def __init__(self, total: int, initial: int, desc: str, file: Any) -> None:
        self.total, self.n, self.desc, self.file = total, initial, desc, file
        self.postfix = ""
        self._last = 0.0
        self._shown: tuple[int, str] | None = None

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        state = (self.n, self.postfix)
        if state == self._shown or (not force and now - self._last < PLAIN_EVERY):
            return
        self._last, self._shown = now, state
        print(f"{self.desc}: {self.n}/{self.total} trials" + (f" ({self.postfix})" if self.postfix else ""),
              file=self.file, flush=True)

    def close(self) -> None:
        self.refresh(force=True)

    def __enter__(self) -> _Plain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int, desc: str, initial: int = 0, file: Any = None) -> Any:
    """A tqdm bar when ``file`` (default stderr) is a terminal, else plain lines. Control characters in
    ``desc`` (a study name) are shown escaped, so a name cannot drive the terminal."""
    file = file or sys.stderr
    desc = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in desc)
    if hasattr(file, "isatty") and file.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="trial", file=file, dynamic_ncols=True)
    return _Plain(total, initial, desc, file)
