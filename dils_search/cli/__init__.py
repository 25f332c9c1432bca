"""The ``dils-search`` command line. ``common`` holds the command registry; ``study``, ``model`` and
``report`` register their commands on import; ``main`` parses and runs one."""

from __future__ import annotations

import sys

from .common import COMMANDS
from .main import build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
