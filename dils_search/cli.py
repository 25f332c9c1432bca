"""The ``dils-search`` command: run, resume, worker, ls, show, export, deepen (and more, see --help)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .errors import InputError

__all__ = ["main", "COMMANDS"]

DEFAULT_URL = "sqlite:///dils_studies.db"
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


def _check_study_name(name: str | None) -> None:
    if name is not None and (not name or len(name) > MAX_STUDY_NAME):
        raise InputError(f"study-name={name[:40]!r}{'...' if len(name) > 40 else ''} has {len(name)} characters; "
                         f"allowed: 1..{MAX_STUDY_NAME}")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _flops(x: float | None) -> str:
    from .spec import flops_text  # torch-free

    return flops_text(x)


def _storage_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--storage", default=None if required else DEFAULT_URL, required=required, metavar="URL",
                   help=f"SQLAlchemy database URL of the study storage (default: {DEFAULT_URL})")


def _study_args(p: argparse.ArgumentParser) -> None:
    """--storage, --study-name and --artifacts, as every command on one study takes them."""
    _storage_args(p)
    p.add_argument("--study-name", required=True, metavar="NAME", help="the study (see `dils-search ls`)")
    p.add_argument("--artifacts", default=None, metavar="DIR", help="checkpoint folder (default: the study's own)")


def _path_str(steps: list[dict[str, Any]]) -> str:
    from .search.attrs import path_text  # torch-free

    return path_text(steps)


# ---------------------------------------------------------------- run / resume / worker


def _print_finish(url: str, name: str, artifacts: str | None, s: Any = None, from_show: bool = False) -> None:
    from .search.summary import summarize

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
        print(f"delivered model (finalized, {f['epochs']} more epochs, best of top {f['top_k']}): hidden={f['hidden']}, "
              f"validation {_fmt(f['val_metric'])}, test metric {_fmt(f['test_metric'])}, {f['params']} parameters; "
              f"finalizing cost {_flops(f['flops'])}")
        print(f"  before finalizing, the search's best node stood at validation {_fmt(f['search_best_val'])}, "
              f"test {_fmt(f['search_best_test'])}; the delivered one came from a node at validation "
              f"{_fmt(f['search_val'])}, test {_fmt(f['search_test'])}")
        if f.get("stale"):
            print(f"  trials finished after it was finalized ({f['after_trials']} then): run `dils-search finalize` to renew it")
    print("next:")
    if not from_show:
        print(f"  dils-search show --storage {url} --study-name {name}")
    print(f"  dils-search export --storage {url} --study-name {name} --out model.pt")


def _write_study_report(a: argparse.Namespace, name: str) -> None:
    """The study's HTML report (``--report``, default ``dils_report/<study>.html``), unless ``--no-report``."""
    if a.no_report:
        return
    import re
    from pathlib import Path

    from .report import by_policy, load_study_data, write_report

    out = Path(a.report or f"dils_report/{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:100]}.html")
    groups = by_policy([load_study_data(a.storage, name, name, getattr(a, "artifacts", None))])
    write_report(str(out), groups, f"dils-search report: {name}", intro=f"Study {name}; storage {a.storage}.")
    print(f"report: {out} (open it in a browser; it works offline)")


def _report_args_of_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", default=None, metavar="FILE",
                   help="where to write the study's HTML report (default: dils_report/<study name>.html)")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")


def _run(a: argparse.Namespace) -> int:
    from .config import load_config
    from .search.study import run_study

    cfg = load_config(a.config)
    if a.seed is not None:
        cfg = cfg.replace(seed=a.seed)
    if a.backend == "ray":
        from .search.ray_backend import run_ray

        run_ray(cfg, a.storage, a.artifacts, a.study_name or cfg.name, a.n_trials, a.timeout,
                address=a.ray_address, max_concurrent=a.max_concurrent, progress=not a.quiet)
    else:
        run_study(cfg, a.storage, a.artifacts, a.study_name or cfg.name, a.n_trials, a.timeout, a.workers,
                  progress=not a.quiet)
    _print_finish(a.storage, a.study_name or cfg.name, a.artifacts)
    _write_study_report(a, a.study_name or cfg.name)
    return 0


@command("run", "run a depth-search study from a TOML config")
@handles(_run)
def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study config (TOML), e.g. studies/digits-mlp.toml")
    _storage_args(p)
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, metavar="DIR",
                   help=f"folder for node checkpoints, shared by all workers (default: {DEFAULT_ARTIFACTS})")
    p.add_argument("--study-name", default=None, metavar="NAME", help="study name (default: the config's name)")
    p.add_argument("--n-trials", type=POSITIVE_INT, default=None, metavar="N", help="run until the study has N finished trials")
    p.add_argument("--timeout", type=SECONDS, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--seed", type=COUNT, default=None, metavar="S", help="override the config's seed")
    p.add_argument("--workers", type=POSITIVE_INT, default=1, metavar="N", help="worker processes on this machine (default 1)")
    p.add_argument("--backend", choices=("optuna", "ray"), default="optuna", help="execution backend (default optuna)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="Ray cluster: auto or ray://host:port")
    p.add_argument("--max-concurrent", type=POSITIVE_INT, default=2, metavar="N", help="Ray backend: concurrent trials")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _report_args_of_run(p)


def _resume(a: argparse.Namespace) -> int:
    from .search.study import resume_study

    if a.backend == "ray":
        from .search.ray_backend import resume_ray

        resume_ray(a.storage, a.study_name, a.n_trials, a.artifacts, address=a.ray_address, timeout=a.timeout,
                   progress=not a.quiet)
    else:
        resume_study(a.storage, a.study_name, a.n_trials, a.artifacts, a.timeout, a.workers, progress=not a.quiet)
    _print_finish(a.storage, a.study_name, a.artifacts)
    _write_study_report(a, a.study_name)
    return 0


@command("resume", "continue a study from its storage after a stop or a crash")
@handles(_resume)
def _resume_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--n-trials", type=POSITIVE_INT, default=None, metavar="N",
                   help="run until the study has N finished trials (default: the config's n_trials)")
    p.add_argument("--timeout", type=SECONDS, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--workers", type=POSITIVE_INT, default=1, metavar="N", help="worker processes on this machine (default 1)")
    p.add_argument("--backend", choices=("optuna", "ray"), default="optuna", help="execution backend (default optuna)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="Ray cluster: auto or ray://host:port")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _report_args_of_run(p)


def _worker(a: argparse.Namespace) -> int:
    from .search.study import optimize

    optimize(a.storage, a.study_name, a.artifacts, a.n_trials, a.timeout, progress=not a.quiet)
    return 0


@command("worker", "join a running study as one more worker (any machine that reaches the storage)")
@handles(_worker)
def _worker_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--n-trials", type=POSITIVE_INT, default=None, metavar="N", help="run until the study has N finished trials")
    p.add_argument("--timeout", type=SECONDS, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- ls / show / export


def _ls(a: argparse.Namespace) -> int:
    from .search.storage import list_studies

    rows = list_studies(a.storage)
    if a.json:
        print(json.dumps([{"study_name": s.study_name, "n_trials": s.n_trials, "policy": _policy(s.config),
                           "user_attrs": {k: v for k, v in s.user_attrs.items() if k != "dils_config"}}
                          for s in rows], indent=2))
        return 0
    if not rows:
        print(f"no studies in {a.storage}")
        return 0
    w = max(30, *(len(_printable(s.study_name)) for s in rows))
    print(f"{'study':{w}s} {'trials':>7s}  {'policy':18s} started")
    for s in rows:
        policy = _policy(s.config)
        started = s.datetime_start.strftime("%Y-%m-%d %H:%M") if s.datetime_start else "-"
        print(f"{_printable(s.study_name):{w}s} {s.n_trials:7d}  {_printable(str(policy)):18s} {started}")
    return 0


def _policy(cfg: dict[str, Any] | None) -> str:
    search = (cfg or {}).get("search", {})
    inits = search.get("inits", [])
    return str(search.get("policy", "?")) + (f"/{inits[0]}" if len(inits) == 1 else "")


@command("ls", "list the studies in a storage")
@handles(_ls)
def _ls_args(p: argparse.ArgumentParser) -> None:
    _storage_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _show(a: argparse.Namespace) -> int:
    from .search.summary import summarize

    s = summarize(a.storage, a.study_name, a.artifacts, with_trials=a.json)
    if a.json:
        print(json.dumps(s.to_dict(), indent=2))
        return 0
    _print_finish(a.storage, a.study_name, a.artifacts, s, from_show=True)
    ratio = s.flops_spent / s.scratch_equivalent_flops if s.scratch_equivalent_flops else float("nan")
    print(f"compute spent / from-scratch compute: {ratio:.3f}; reused {_flops(s.flops_reused)}; "
          f"wall seconds training {s.seconds_spent:.1f}; duplicate trainings {s.duplicate_trainings}; "
          f"retrained after damage {s.retrained_after_damage}")
    return 0


@command("show", "best path, its metrics, reuse and compute of one study")
@handles(_show)
def _show_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _export(a: argparse.Namespace) -> int:
    from .checkpoint import save
    from .search.study import study_config
    from .search.summary import summarize
    from .store import LineageStore, StoreError

    s = summarize(a.storage, a.study_name, a.artifacts)
    if s.best_node_key is None:
        raise StoreError(f"study-name={a.study_name!r} has no completed trial to export yet")
    final = s.final is not None and not a.no_final
    key = s.final["node_key"] if final and s.final is not None else s.best_node_key
    store = LineageStore(a.storage, a.artifacts or study_config(a.storage, a.study_name)[1], create=False)
    record = store.get(key)
    model = store.load_model(record) if record else None
    store.close()
    if model is None:  # missing or damaged: retrain it here (and what it grew from, if need be)
        from .search.finalize import ensure_node

        print(f"node {key[:12]} has no intact checkpoint; retraining it", file=sys.stderr)
        fetched = ensure_node(a.storage, a.study_name, key, a.artifacts)
        model, record = fetched.model, fetched.record
    if record is None:
        raise StoreError(f"node {key[:12]} is not in the lineage store of study {a.study_name!r}")
    cfg = study_config(a.storage, a.study_name)[0]
    data_record = {"dataset": cfg.data.dataset, "seed": cfg.seed, "num_samples": cfg.data.num_samples,
                   "path": cfg.data.path, "val_fraction": cfg.data.val_fraction,
                   "test_fraction": cfg.data.test_fraction, "label_column": cfg.data.label_column,
                   "task": cfg.data.task}
    out = save(model, a.out, extra={"study": a.study_name, "node_key": key, "final": final, "metrics": record.metrics,
                                    "data": data_record}, make_parents=False)
    what = "delivered (finalized) model" if final else "search's best node, not finalized"
    print(f"wrote {out}: the {what}, hidden={model.spec.hidden}, val {_fmt(record.metrics.get('val_metric'))}, "
          f"test {_fmt(record.metrics.get('test_metric'))}")
    print(f"load it with dils_search.load({str(out)!r}) or `dils-search deepen {out} ...`")
    return 0


@command("export", "write the delivered model of a study (or its search's best node) as spec + state_dict")
@handles(_export)
def _export_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="checkpoint to write, e.g. model.pt")
    p.add_argument("--no-final", action="store_true",
                   help="write the search's best node instead of the finalized (delivered) model")


def _finalize(a: argparse.Namespace) -> int:
    from .search.finalize import finalize_study

    result = finalize_study(a.storage, a.study_name, a.artifacts, top_k=a.top_k, epochs=a.epochs, progress=not a.quiet)
    if result is None:
        print(f"study {a.study_name!r}: nothing to finalize (final.epochs is 0, or no trial finished yet)")
        return 0
    print(f"finalized {len(result.candidates)} architecture(s), {result.trained} trained now, "
          f"{len(result.candidates) - result.trained} already in the lineage store")
    _print_finish(a.storage, a.study_name, a.artifacts)
    return 0


@command("finalize", "train the study's best architectures on with a decay phase and deliver the best")
@handles(_finalize)
def _finalize_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--top-k", type=POSITIVE_INT, default=None, metavar="K",
                   help="finalize the K best distinct architectures (default: the config's final.top_k)")
    p.add_argument("--epochs", type=COUNT, default=None, metavar="N",
                   help="epochs of the decay phase (default: the config's final.epochs)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


# ---------------------------------------------------------------- deepen


def _deepen_data(a: argparse.Namespace, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The data to calibrate and measure on: what the checkpoint records, unless --data says otherwise
    (then the same split is required, or --other-data)."""
    if a.data is None:
        if not recorded:
            raise InputError("deepen needs --data (digits, mnist1d, synthetic or file with --data-path): this "
                             "checkpoint does not record the data it was trained on")
        return {**recorded, "seed": recorded.get("seed", 0) if a.seed is None else a.seed}
    given = {"dataset": a.data, "seed": 0 if a.seed is None else a.seed, "path": a.data_path or "",
             "num_samples": a.num_samples or (recorded or {}).get("num_samples", 4000)}
    if recorded and not a.other_data:
        for k in ("dataset", "seed", "path", "num_samples"):
            if k in recorded and recorded[k] != given[k] and not (k == "seed" and a.seed is None):
                raise InputError(f"--data: the checkpoint was trained on {k}={recorded[k]!r}, not {given[k]!r}, so its "
                                 "'before' test metric would be measured on another split (maybe on rows it trained "
                                 "on); leave --data out to use the recorded data, or pass --other-data")
        given["seed"] = recorded.get("seed", given["seed"]) if a.seed is None else a.seed
    return {**(recorded or {}), **given}


def _deepen(a: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load, load_extra, save
    from .data import load_dataset
    from .grow import GrowOptions, grow, output_gap
    from .spec import stream_widths
    from .train import Recipe, evaluate, train

    model = load(a.model)
    d = _deepen_data(a, load_extra(a.model).get("data"))
    data = load_dataset(d["dataset"], seed=int(d["seed"]), num_samples=d.get("num_samples"), path=d.get("path") or None,
                        val_fraction=d.get("val_fraction", 0.15), test_fraction=d.get("test_fraction", 0.15),
                        label_column=d.get("label_column") or None,
                        options={"task": d["task"]} if d["dataset"] == "synthetic" and d.get("task") else None,
                        ).reshaped(model.spec.input_shape)
    if data.out_features != model.spec.out_features:
        raise InputError(f"data={d['dataset']!r} has {data.out_features} outputs but the model has {model.spec.out_features}")
    calib = data.x_train[: a.calib_size]
    steps = [_parse_step(s) for s in a.insert]
    seed = int(d["seed"])

    def metric(m: torch.nn.Module) -> float:
        return evaluate(m, data.x_test, data.y_test, data.task)["metric"]

    before = metric(model)
    new = model
    exact_widths = []
    for i, step in enumerate(steps):
        exact_widths.append((step, stream_widths(new.spec)[step.position]))
        new = grow(new, step, calib, GrowOptions(seed=seed + i))
    calib_gap = output_gap(model, new, calib)
    if calib_gap > a.max_gap:
        hints = "; ".join(f"{s.position}:{max(s.width, w)}:dils-analytic is exact" for s, w in exact_widths if s.width < w)
        message = (f"the insertion changes the outputs on the calibration data by {calib_gap:.2e} (relative), over "
                   f"--max-gap={a.max_gap:g}" + (f"; {hints}" if hints else "; dils-approx may come closer"))
        if a.strict:
            raise InputError(f"--strict: {message}")
        print(f"dils-search deepen: warning: {message}", file=sys.stderr)
    gap = output_gap(model, new, data.x_test)
    after = metric(new)
    tuned = None
    if a.epochs > 0:
        train(new, data, Recipe(epochs=a.epochs, lr=a.lr, seed=seed, rewarmup_epochs=a.rewarmup_epochs))
        tuned = metric(new)
    save(new, a.out, extra={"data": d, "deepened_from": str(a.model)}, make_parents=False)
    result = {"hidden_before": model.spec.hidden, "hidden_after": new.spec.hidden, "metric_before": before,
              "metric_after_insert": after, "metric_after_finetune": tuned, "output_gap": gap,
              "calib_gap": calib_gap, "out": str(a.out), "data": d}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"hidden {model.spec.hidden} -> {new.spec.hidden}; largest relative output gap: calibration "
              f"{calib_gap:.2e}, test {gap:.2e} ({d['dataset']}, seed {seed})")
        tail = f", after {a.epochs} fine-tune epochs {_fmt(tuned)}" if tuned is not None else " (no fine-tuning: --epochs 0)"
        print(f"test metric: before {before:.4f}, right after insertion {after:.4f}{tail}")
        print(f"wrote {a.out}")
    return 0


def _parse_step(text: str) -> Any:
    from .grow import INIT_METHODS, GrowthStep

    parts = text.split(":")
    if len(parts) != 3:
        raise InputError(f"--insert={text!r} must look like POSITION:WIDTH:INIT, e.g. 1:64:dils-analytic")
    try:
        position, width = int(parts[0]), int(parts[1])
    except ValueError:
        raise InputError(f"--insert={text!r}: POSITION and WIDTH must be integers, e.g. 1:64:dils-analytic") from None
    if parts[2] not in INIT_METHODS:
        raise InputError(f"--insert={text!r}: init {parts[2]!r} is unknown; allowed: {', '.join(INIT_METHODS)}")
    return GrowthStep(position, width, parts[2])


@command("deepen", "insert layers into a trained model without losing what it knows (system upgrade)")
@handles(_deepen)
def _deepen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint written by `dils-search export`, `deepen` or dils_search.save")
    p.add_argument("--insert", action="append", required=True, metavar="POS:WIDTH:INIT",
                   help="a layer to insert, e.g. 1:64:dils-analytic (repeat for several, applied in order)")
    p.add_argument("--data", default=None,
                   help="dataset for calibration and metrics: digits, mnist1d, synthetic, file (default: the data, "
                        "seed and split the checkpoint records; `export` records them)")
    p.add_argument("--data-path", default=None, help="the .npz/.csv file when --data file")
    p.add_argument("--num-samples", type=POSITIVE_INT, default=None, help="mnist1d/synthetic samples (default 4000)")
    p.add_argument("--other-data", action="store_true",
                   help="use --data even though the checkpoint records other data or another seed")
    p.add_argument("--max-gap", type=_number(float, 0.0), default=1e-3, metavar="G",
                   help="warn when the relative output gap on the calibration data exceeds G (default 1e-3)")
    p.add_argument("--strict", action="store_true", help="refuse (write nothing) when the gap exceeds --max-gap")
    p.add_argument("--calib-size", type=POSITIVE_INT, default=1024, help="calibration samples (default 1024)")
    p.add_argument("--epochs", type=COUNT, default=0, help="fine-tune epochs after insertion (default 0)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3, help="fine-tune learning rate (default 1e-3)")
    p.add_argument("--rewarmup-epochs", type=_number(float, 0.0), default=0.5, help="epochs of linear lr re-warmup (default 0.5)")
    p.add_argument("--seed", type=COUNT, default=None,
                   help="seed of the data split and the insertion (default: the checkpoint's, else 0)")
    p.add_argument("--out", required=True, help="where to write the deeper checkpoint")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


# ---------------------------------------------------------------- entry point


def _load_plugins() -> None:
    """Commands that live in their own modules register themselves on import."""
    for mod in ("dils_search.report_cli",):
        try:
            __import__(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = _Parser(
        prog="dils-search",
        description="Search a network's depth by growing it: every inserted layer inherits what the "
        "shallower network knew (DILS). Studies run on Optuna (or Ray Tune) over a lineage store "
        "where each node of the growth tree is trained once and reused.",
        epilog="Start with: dils-search run studies/digits-mlp.toml",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, metavar="N",
                        help="torch CPU threads per process (default: $DILS_NUM_THREADS or 1; small nets train "
                        "fastest on one thread, and workers give the parallelism)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add_args, handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
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
            import torch

            torch.set_num_threads(max(1, a.threads or int(os.environ.get("DILS_NUM_THREADS", "1"))))
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # Optuna logs a failed trial as a warning with its whole traceback; dils-search says why in one line
        # (a diverged path below, anything else as the command's error): tracebacks only under -v
        optuna.logging.set_verbosity(optuna.logging.INFO if a.verbose else optuna.logging.ERROR)
    from sqlalchemy.exc import SQLAlchemyError

    from .errors import DilsError, RuntimeFailure, TrainingDiverged
    from .store import safe_url

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
              "`dils-search resume` once it is fixed" if a.command in ("run", "resume", "worker", "compare", "finalize")
              else f"dils-search {a.command}: error: {where}: {text[:300]}", file=sys.stderr)
        return 1 if isinstance(cause, SQLAlchemyError) or a.command in ("run", "resume", "worker") else 2


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


if __name__ == "__main__":
    sys.exit(main())
