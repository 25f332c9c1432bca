"""The ``dils-search`` entry point: parse, run one command, and turn every failure into one line and an exit code.

One rule: exit 2 when the command is refused for what it was given (config, flags, data, a storage URL
or folder that cannot be used, an unknown study), before it runs; exit 1 for a failure at run time (a
checkpoint that cannot be saved, a full disk, a database that goes away, workers that died, a study
whose every path diverges) and for a bug, which says so."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import model, report, study  # noqa: F401  (each registers its commands)
from .common import COMMANDS, POSITIVE_INT, TORCH_FREE, _check_study_name, _Parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dils-search",
        description="Search a network's depth by growing it: every inserted layer inherits what the "
        "shallower network knew (DILS). Studies run on Optuna (or Ray Tune) over a lineage store "
        "where each node of the growth tree is trained once and reused.",
        epilog="Start with: dils-search run studies/digits-mlp.toml",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    threads_help = ("torch CPU threads per process (default: $DILS_NUM_THREADS or 1, as for GrowthTree; small nets "
                    "train fastest on one thread, and workers give the parallelism); before or after the command")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, metavar="N", help=threads_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add_args, handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        if name not in TORCH_FREE:  # after the command too; SUPPRESS keeps a value given before it
            p.add_argument("--threads", type=POSITIVE_INT, default=argparse.SUPPRESS, metavar="N", help=threads_help)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line usage error (2), already printed
        return int(exc.code or 0)
    if not getattr(a, "handler", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.command not in ("ls", "show"):  # ls and show read the tables with SQLAlchemy alone
        import warnings

        import optuna

        if a.command not in TORCH_FREE:
            from ..core.threads import set_threads, thread_count
            from ..errors import InputError

            try:  # the one thread setting, shared with GrowthTree and ds.train (core/threads.py)
                set_threads(thread_count(a.threads))
            except InputError as exc:
                print(f"dils-search {a.command}: error: {exc}", file=sys.stderr)
                return 2
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # Optuna logs a failed trial as a warning with its whole traceback; dils-search says why in one line
        # (a diverged path below, anything else as the command's error): tracebacks only under -v
        optuna.logging.set_verbosity(optuna.logging.INFO if a.verbose else optuna.logging.ERROR)
    from sqlalchemy.exc import SQLAlchemyError

    from ..errors import DilsError, RuntimeFailure, TrainingDiverged
    from ..store import safe_url

    def storage() -> str:
        return f" (storage={safe_url(a.storage)!r})" if getattr(a, "storage", None) else ""

    try:
        _check_study_name(getattr(a, "study_name", None))
        rc = int(a.handler(a) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return rc
    except DilsError as exc:  # bad input (exit 2) or a failure at run time (exit 1), in one line
        print(f"dils-search {a.command}: error: {str(exc).splitlines()[0][:1000] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 1 if isinstance(exc, RuntimeFailure | TrainingDiverged) else 2
    except BrokenPipeError:  # `dils-search ls | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush stays quiet
        return 1
    except KeyboardInterrupt:
        print(f"dils-search {a.command}: interrupted; continue with `dils-search resume`", file=sys.stderr)
        return 130
    except Exception as exc:
        # a database or file-system failure mid-command, even when a library's own clean-up masked it
        # (Optuna's trial bookkeeping can raise UnboundLocalError or AssertionError on top of it)
        cause = _root_failure(exc, SQLAlchemyError) or _root_failure(exc, OSError)
        if cause is None:  # anything else is a bug of ours: say so, the traceback with -v
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            print(f"dils-search {a.command}: internal error (a bug in dils-search, please report it): "
                  f"{type(exc).__name__}: {first}" + ("" if a.verbose else "; run with -v for the traceback"),
                  file=sys.stderr)
            if a.verbose:
                import traceback

                traceback.print_exc()
            return 1
        orig = getattr(cause, "orig", None) or cause
        text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        where = f"database{storage()}" if isinstance(cause, SQLAlchemyError) else "file system"
        print(f"dils-search {a.command}: error: {where}: {text[:300]}; nothing stored was lost, continue with "
              "`dils-search resume` once it is fixed" if a.command in _RUNNING
              else f"dils-search {a.command}: error: {where}: {text[:300]}", file=sys.stderr)
        return 1 if isinstance(cause, SQLAlchemyError) or a.command in _RUNNING else 2


_RUNNING = ("run", "resume", "worker", "compare", "finalize")  # a file-system failure in these is a run-time one


def _root_failure(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` in ``exc``'s chain of causes and contexts, or None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
