"""What every ``dils-search`` command shares: the command registry, one-line argparse errors, typed
number arguments, storage/study arguments and the lines a finished study prints."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import InputError

DEFAULT_URL = "sqlite:///dils_studies.db"


STORAGE_ENV = "DILS_STORAGE"  # --storage's default when set: keeps a password out of argv (`ps`) and shell history


def default_storage() -> str:
    return os.environ.get(STORAGE_ENV) or DEFAULT_URL


TORCH_FREE = ("ls", "show", "report")  # commands that only read: no torch (ls and show: no Optuna either)


DEFAULT_ARTIFACTS = "dils_artifacts"


Handler = Callable[[argparse.Namespace], int]


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable[[argparse.ArgumentParser], None]]:
    """Register ``dils-search NAME``: the decorated function adds arguments; ``handler`` runs it."""

    def wrap(add_args: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
        COMMANDS[name] = (add_args, add_args.handler, help)  # type: ignore[attr-defined]
        return add_args

    return wrap


def handles(fn: Handler) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable[[argparse.ArgumentParser], None]]:
    def wrap(add_args: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
        add_args.handler = fn  # type: ignore[attr-defined]
        return add_args

    return wrap


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``dils-search CMD: error: ...``, exit 2) instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def _number(kind: type, low: float, *, above: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` that is >= ``low`` (> ``low`` with ``above``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; allowed: {'>' if above else '>='} {low:g}")
        return value

    return parse


POSITIVE_INT = _number(int, 1)


COUNT = _number(int, 0)


POSITIVE_FLOAT = _number(float, 0.0, above=True)


SECONDS = _number(float, 0.0, above=True)


MAX_STUDY_NAME = 512  # Optuna's study_name column


def _printable(text: str) -> str:
    """``text`` with control and escape characters shown escaped, so a name cannot drive the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def shell_word(text: str) -> str:
    """``text`` as one shell word that can be copied into a command line: ``shlex.quote``, or bash's
    ``$'...'`` with control and escape characters written as ``\\xHH``, so a name cannot drive the terminal."""
    if text.isprintable():
        return shlex.quote(text)
    out = []
    for c in text:
        o = ord(c)
        if c in "\\'":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "$'" + "".join(out) + "'"


def shown_url(url: str) -> str:
    """A storage URL as every message and page shows it: its password masked (``***``)."""
    from ..store import safe_url

    return safe_url(url)


def _check_study_name(name: str | None) -> None:
    if name is not None and (not name or len(name) > MAX_STUDY_NAME):
        raise InputError(f"study-name={name[:40]!r}{'...' if len(name) > 40 else ''} has {len(name)} characters; "
                         f"allowed: 1..{MAX_STUDY_NAME}")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _flops(x: float | None) -> str:
    from ..core.spec import flops_text  # torch-free

    return flops_text(x)


def _storage_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--storage", default=None if required else default_storage(), required=required, metavar="URL",
                   help=f"SQLAlchemy database URL of the study storage (default: ${STORAGE_ENV}, else {DEFAULT_URL})")


def _study_args(p: argparse.ArgumentParser) -> None:
    """--storage, --study-name and --artifacts, as every command on one study takes them."""
    _storage_args(p)
    p.add_argument("--study-name", required=True, metavar="NAME", help="the study (see `dils-search ls`)")
    p.add_argument("--artifacts", default=None, metavar="DIR", help="checkpoint folder (default: the study's own)")


def _path_str(steps: list[dict[str, Any]]) -> str:
    from ..search.attrs import path_text  # torch-free

    return path_text(steps)


def _print_finish(url: str, name: str, artifacts: str | None, s: Any = None, from_show: bool = False) -> None:
    from ..search.summary import summarize

    s = s or summarize(url, name, artifacts)
    print(f"study {name!r}: {s.n_trials} trials ({', '.join(f'{k.lower()} {v}' for k, v in sorted(s.states.items()))})")
    if s.best_node_key is None:
        print("no trial completed yet")
        return
    where = f"trial {s.best_node_trial}" + ("" if s.best_node_trial == s.best_trial else
                                             f"'s prefix, a pruned trial; Optuna's best_trial is trial {s.best_trial}")
    print(f"best node {str(s.best_node_key)[:12]} (from {where}): {_path_str(s.best_path)}  hidden={s.best_hidden}")
    print(f"best validation metric {_fmt(s.best_val)}, test metric {_fmt(s.best_test)}, {s.best_params} parameters")
    print(f"nodes: {s.nodes} in its tree, {s.nodes_trained} trained, {s.node_uses_reused} reuses; "
          f"compute {_flops(s.flops_spent)} vs {_flops(s.scratch_equivalent_flops)} training every node from scratch")
    f = s.final
    if f is None:
        print("delivered model: not finalized yet (dils-search finalize trains the best architectures on)")
    else:
        how = f"finalized, {f['epochs']} more epochs, best of top {f['top_k']}" if f["epochs"] else "as trained, not finalized"
        print(f"delivered model ({how}): hidden={f['hidden']}, "
              f"validation {_fmt(f['val_metric'])}, test metric {_fmt(f['test_metric'])}, {f['params']} parameters; "
              f"finalizing cost {_flops(f['flops'])}")
        other = f.get("from_node") != f.get("search_best_node")  # else the same node would be named twice
        print(f"  before finalizing, the search's best node stood at validation {_fmt(f['search_best_val'])}, "
              f"test {_fmt(f['search_best_test'])}" + (f"; the delivered one came from another node, at validation "
                                                       f"{_fmt(f['search_val'])}, test {_fmt(f['search_test'])}"
                                                       if other else ""))
        if f.get("stale"):
            print(f"  trials finished after it was finalized ({f['after_trials']} then): run `dils-search finalize` to renew it")
    print(_budget_line(s.budget))
    print("next:")  # copyable commands: the name shell-quoted, the password masked
    where = f"--storage {shell_word(shown_url(url))} --study-name {shell_word(name)}"
    if not from_show:
        print(f"  dils-search show {where}")
    print(f"  dils-search export {where} --out model.pt")


def _budget_line(b: dict[str, Any]) -> str:
    """Budget, spent and delivered compute, in one line."""
    spent = f"spent {_flops(b['search_flops'])} searching" + (
        "" if b["final_flops"] is None else f" + {_flops(b['final_flops'])} finalizing = {_flops(b['delivered_flops'])} "
                                            "up to the delivered model")
    if not b.get("budget_flops"):
        return f"compute: {spent}" + (f" (search cap {_flops(b['search_cap'])})" if b.get("search_cap") else "")
    used = b["delivered_flops"] if b["delivered_flops"] is not None else b["search_flops"]
    return (f"budget: {_flops(b['budget_flops'])} (search up to {_flops(b['search_cap'])}); {spent} "
            f"({100 * used / b['budget_flops']:.0f}% of the budget)")


def _write_study_report(a: argparse.Namespace, name: str) -> None:
    """The study's HTML report (``--report``, default ``dils_report/<study>.html``), unless ``--no-report``."""
    if a.no_report:
        return
    from pathlib import Path

    from ..report import by_policy, load_study_data, write_report

    out = Path(a.report or f"dils_report/{report_file_name(name)}")
    groups = by_policy([load_study_data(a.storage, name, name, getattr(a, "artifacts", None))])
    write_report(str(out), groups, f"dils-search report: {name}", intro=f"Study {name}; storage {shown_url(a.storage)}.")
    print(f"report: {shell_word(str(out))} (open it in a browser; it works offline)")


def report_file_name(name: str) -> str:
    """``<name>.html`` for a plain study name; a name with other characters (squashed to ``_``) gets 8
    digits of its sha256 too, so ``exp:1`` and ``exp?1`` never write the same file."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100].lstrip(".") or "_"
    if plain == name:
        return f"{name}.html"
    return f"{plain}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.html"


def _report_args_of_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", default=None, metavar="FILE",
                   help="where to write the study's HTML report (default: dils_report/<study name>.html)")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")
