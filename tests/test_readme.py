"""Every snippet of the README is extracted from README.md (never copied) and exercised:

- ``python`` blocks run, as written, in a fresh interpreter in a scratch folder holding the
  shipped ``studies/`` (slow: they train);
- ``toml`` blocks parse (a block with a ``[search]``/``[model]`` table validates as a config);
- every ``dils-search`` command line of a ``bash`` block parses with the real CLI parser, and the
  ones that only read (``--help``, ``ls``) run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks(lang: str) -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def _commands(block: str) -> list[list[str]]:
    """The ``dils-search`` invocations of a bash block (continuation lines joined, ``&&`` chains split)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] == "dils-search":
                out.append(words[1:])
    return out


PYTHON = _blocks("python")
TOML = _blocks("toml")
BASH = [(line, cmd) for line, block in _blocks("bash") for cmd in _commands(block)]


def test_readme_has_snippets() -> None:
    assert PYTHON and TOML and BASH, "the README lost its snippets (or this extractor broke)"


@pytest.mark.slow
@pytest.mark.parametrize("block", [pytest.param(b, marks=[pytest.mark.ray] if "from ray" in b else []) for _, b in PYTHON],
                         ids=[f"README.md:{n}" for n, _ in PYTHON])
def test_python_snippet_runs_as_written(block: str, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "studies", tmp_path / "studies")
    env = {**os.environ, "DILS_NUM_THREADS": os.environ.get("DILS_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("block", [b for _, b in TOML], ids=[f"README.md:{n}" for n, _ in TOML])
def test_toml_snippet_parses(block: str) -> None:
    raw = tomllib.loads(block)
    if {"model", "search"} & set(raw):
        from dils_search.config import config_from_dict

        config_from_dict(raw)


@pytest.mark.parametrize("argv", [c for _, c in BASH], ids=[f"README.md:{n}:{' '.join(c[:1])}" for n, c in BASH])
def test_cli_command_parses(argv: list[str]) -> None:
    from dils_search.cli import build_parser

    args = build_parser().parse_args([os.path.expandvars(a) for a in argv])
    assert args.command == argv[0]


def test_read_only_commands_run(tmp_path: Path) -> None:
    """``--help`` of every documented command runs, and ``ls`` on a missing storage says so in one line (exit 2)."""
    for command in sorted({c[0] for _, c in BASH}):
        out = subprocess.run([sys.executable, "-m", "dils_search", command, "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0 and "usage:" in out.stdout, (command, out.stderr)
    out = subprocess.run([sys.executable, "-m", "dils_search", "ls", "--storage", f"sqlite:///{tmp_path / 'x.db'}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
