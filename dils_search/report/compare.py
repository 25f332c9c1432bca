"""Compare growth policies on the same data, seeds and budget (``dils-search compare``).

Each ``[[compare]]`` entry of a config, on each seed, is its own study in one storage, named
``<config name>--<label>--s<seed>``; running the comparison again continues those studies instead
of restarting them, and nodes already in the lineage store are reused, never retrained.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PLAIN_HIDDEN, ConfigError, StudyConfig
from ..core.spec import flops_text
from ..errors import InputError
from ..search.attrs import POLICY_DONE
from . import (
    DEFAULT_MARGIN,
    Curve,
    StudyData,
    SummaryRow,
    best_so_far,
    load_study_data,
    policies_of,
    summary_rows,
    write_report,
)
from .page import reached_text

__all__ = ["CompareEntry", "compare_entries", "entry_config", "study_name", "run_compare", "summarize_compare",
           "write_outputs", "format_table", "ROW_FIELDS"]

log = logging.getLogger("dils_search")

ROW_FIELDS = ["policy", "seeds", "best_val", "best_val_std", "best_test", "best_test_std", "target", "target_reached",
              "flops_to_target", "seconds_to_target", "total_flops", "total_seconds", "params", "trials", "nodes",
              "scratch_at_equal_flops", "final_val", "final_val_std", "final_test", "final_test_std", "final_flops",
              "final_flops_std", "delivered_flops", "delivered_flops_std", "delivered_seconds", "delivered_seconds_std",
              "scratch_final_at_equal_flops", "studies"]


@dataclass(frozen=True)
class CompareEntry:
    """One ``[[compare]]`` table: a policy, optionally restricted to one init method and one sampler."""

    label: str
    policy: str
    init: str | None = None
    sampler: str | None = None
    hidden: tuple[int, ...] | None = None  # the plain policy's network (default: PLAIN_HIDDEN of the family)


def compare_entries(cfg: StudyConfig) -> list[CompareEntry]:
    """The config's entries with their labels (default ``policy`` or ``policy/init``); labels are unique."""
    if not cfg.compare:
        raise ConfigError("compare=[] must list the policies to compare, e.g. [[compare]] policy = \"scratch\"; "
                          "allowed keys: policy, init, label, sampler")
    out: list[CompareEntry] = []
    for i, e in enumerate(cfg.compare):
        policy = str(e.get("policy", "optuna"))
        init = e.get("init")
        label = str(e.get("label") or (f"{policy}/{init}" if init else policy))
        if not label.strip() or not re.fullmatch(r"[A-Za-z0-9._/+-]+", label):
            raise ConfigError(f"compare[{i}].label={label!r} must be non-empty and use only letters, digits and . _ / + -")
        if any(o.label == label for o in out):
            raise ConfigError(f"compare[{i}].label={label!r} is used twice; give each entry its own label")
        out.append(CompareEntry(label, policy, str(init) if init else None, e.get("sampler"),
                                tuple(e["hidden"]) if e.get("hidden") else None))
    return out


def entry_config(cfg: StudyConfig, entry: CompareEntry, seed: int) -> StudyConfig:
    """The study config of ``entry`` on ``seed``: the shared config with that policy (and init restriction)."""
    search: dict[str, Any] = {"policy": entry.policy}
    if entry.init:
        search["inits"] = [entry.init]
    if entry.sampler:
        search["sampler"] = entry.sampler
    try:
        return cfg.replace(seed=seed, compare=[], search=search)
    except ConfigError as exc:
        raise ConfigError(f"compare entry {entry.label!r}: {exc}") from None


def plain_config(cfg: StudyConfig, entry: CompareEntry, seed: int, budget: float) -> StudyConfig:
    """The study config of a ``plain`` entry: the plain network (``entry.hidden``, else the family's
    usual size) as the base, trained once from scratch with a cosine lr for the whole epochs ``budget``
    FLOPs pay for (``search/budget.py``), and delivered as trained."""
    from ..search.budget import epoch_flops, plain_epochs
    from ..search.trainers import make_task

    hidden = list(entry.hidden or PLAIN_HIDDEN.get(cfg.model.kind, PLAIN_HIDDEN["mlp"]))
    try:
        probe = cfg.replace(seed=seed, compare=[], model={"hidden": hidden}, search={
            "policy": "plain", "positions": "any", "n_trials": 1, "max_flops": 0.0, "budget_flops": budget})
        task = make_task(probe, "cpu")
        epochs = plain_epochs(budget, task.base, task.data.size("train"))
        if epoch_flops(task.base, task.data.size("train")) > budget:
            log.warning("compare entry %r: one epoch of the plain network hidden=%s costs more than the budget (%s); "
                        "it trains one epoch all the same", entry.label, hidden, flops_text(budget))
        return probe.replace(train={"base_epochs": epochs, "schedule": "cosine", "patience": 0})
    except ConfigError as exc:
        raise ConfigError(f"compare entry {entry.label!r}: {exc}") from None


def delivered_flops(url: str, name: str) -> float | None:
    """The training FLOPs up to study ``name``'s delivered model (search + finalize); None before finalizing."""
    from ..search.budget import spent
    from ..search.storage import read_study

    study = read_study(url, name)
    return None if study.final is None else spent(t.user_attrs for t in study.trials) + float(study.final["flops"])


def study_name(cfg: StudyConfig, entry: CompareEntry, seed: int) -> str:
    return f"{cfg.name}--{entry.label.replace('/', '_')}--s{seed}"


BUDGET_FIELDS = ("search.n_trials", "search.timeout", "search.budget_flops")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _existing(url: str, name: str) -> tuple[StudyConfig | None, bool, int]:
    """The config study ``name`` was created with (None if there is no such study), whether a
    greedy policy already said it is done (so a rerun does not add another empty trial), and its
    number of finished trials."""
    import optuna

    from ..search.study import FINISHED, open_storage, study_config

    storage = open_storage(url)
    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return None, False, 0
    trials = storage.get_all_trials(sid, deepcopy=False)
    done = any(t.user_attrs.get(POLICY_DONE) for t in trials if t.state == optuna.trial.TrialState.PRUNED)
    return study_config(url, name)[0], done, sum(t.state in FINISHED for t in trials)


def _config_to_run(name: str, wanted: StudyConfig, stored: StudyConfig | None) -> StudyConfig:
    """``wanted``, or the stored config when only the budget changed (the new budget is passed
    explicitly); anything else would mix incomparable results, so it is refused."""
    if stored is None:
        return wanted
    diff = _differences(stored.to_dict(), wanted.to_dict())
    if not diff:
        return wanted
    other = [d for d in diff if d not in BUDGET_FIELDS]
    if other:
        raise ConfigError(
            f"study {name!r} already exists in this storage with {other[0]}={_lookup(stored, other[0])!r}, "
            f"but the config now says {_lookup(wanted, other[0])!r}; only search.n_trials, search.timeout and "
            "search.budget_flops may change between runs (use another --storage or config name)"
        )
    return stored if "search.budget_flops" not in diff else stored.replace(search={"budget_flops": wanted.search.budget_flops})


def _lookup(cfg: StudyConfig, dotted: str) -> Any:
    value: Any = cfg.to_dict()
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def run_compare(
    cfg: StudyConfig, url: str, artifacts: str, n_trials: int | None = None, seeds: int = 1, progress: bool = True,
    device: str | None = None, timeout: float | None = None,
) -> dict[str, list[str]]:
    """Run (or continue) every entry on every seed; returns label -> study names, one per seed."""
    from ..search.study import finalize_if_done, run_study

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise InputError(f"seeds={seeds!r} must be an integer >= 1")
    if n_trials is not None and n_trials < 1:
        raise InputError(f"n-trials={n_trials!r} must be >= 1")
    entries = compare_entries(cfg)
    dils = next((e for e in entries if e.policy not in ("plain", "scratch")), None)
    if any(e.policy == "plain" for e in entries) and not cfg.search.budget_flops and dils is None:
        raise ConfigError("compare: a policy='plain' entry trains for search.budget_flops, or for the delivered compute "
                          "of the first growing policy; there is neither (set search.budget_flops)")
    # plain entries last: without a budget they train for the first growing policy's delivered compute
    plan = sorted([(e, cfg.seed + k) for e in entries for k in range(seeds)], key=lambda p: p[0].policy == "plain")
    runs: list[tuple[CompareEntry, int, str, StudyConfig | None, StudyConfig | None, bool, int]] = []
    for e, seed in plan:  # check every study before training any
        name = study_name(cfg, e, seed)
        if e.policy == "plain":  # its study (and name) is known once its budget is: below
            runs.append((e, seed, name, None, None, False, 0))
            continue
        own = entry_config(cfg, e, seed)
        stored, done, finished = _existing(url, name)
        runs.append((e, seed, name, own, _config_to_run(name, own, stored), done, finished))
    groups: dict[str, list[str]] = {e.label: [] for e in entries}
    for i, (e, seed, name, wanted, to_run, done, finished) in enumerate(runs, 1):
        if wanted is None:  # plain: its budget is known now; a study per epoch count, so a new budget is a new study
            budget = cfg.search.budget_flops or (delivered_flops(url, study_name(cfg, dils, seed)) if dils else None)
            if not budget:
                raise ConfigError(f"compare entry {e.label!r}: {dils.label if dils else 'the growing policy'} delivered "
                                  f"no model on seed {seed}, so the plain network has no budget to train for")
            wanted = plain_config(cfg, e, seed, budget)
            name = f"{name}--e{wanted.train.base_epochs}"
            stored, done, finished = _existing(url, name)
            to_run = _config_to_run(name, wanted, stored)
        groups[e.label].append(name)
        assert to_run is not None
        target = 1 if e.policy == "plain" else n_trials or wanted.search.n_trials
        if done or finished >= target:
            if progress:
                print(f"[{i}/{len(plan)}] {e.label}, seed {seed}: study {name} already has {finished} finished "
                      f"trial(s){' (its policy stopped)' if done else ''}; nothing to search", file=sys.stderr)
            finalize_if_done(url, name, artifacts, target, progress, device)  # nothing trained if already final
            continue
        if progress:
            resumed = f", resuming at {finished}/{target} trials" if finished else ""
            print(f"[{i}/{len(plan)}] {e.label}, seed {seed}: study {name}{resumed}", file=sys.stderr)
        run_study(to_run, url, artifacts, name, target,
                  timeout or wanted.search.timeout or None, progress=progress, device=device)
    return groups


def summarize_compare(
    url: str, groups: dict[str, list[str]], artifacts: str | None = None, margin: float = DEFAULT_MARGIN,
) -> tuple[list[SummaryRow], dict[str, list[StudyData]]]:
    datas = {label: [load_study_data(url, n, label, artifacts) for n in names] for label, names in groups.items()}
    curves = {label: [best_so_far(d) for d in ds] for label, ds in datas.items()}
    rows = summary_rows(curves, margin, {label: [d.final for d in ds] for label, ds in datas.items()}, policies_of(datas))
    base = next((r.policy for r in rows if r.base_policy == "scratch"), None)
    for row in rows:
        if base is None or row.policy == base or row.delivered_flops is None:
            continue
        at = [_scratch_final_within(url, s, sc, (c.flops[-1] if c.flops else 0.0) + float(d.final["flops"]), artifacts)
              for d, c, s, sc in zip(datas[row.policy], curves[row.policy], datas[base], curves[base], strict=False)
              if d.final is not None]
        if at and len(at) == len(datas[row.policy]) and all(v is not None for v in at):
            row.scratch_final_at_equal_flops = statistics.fmean(v for v in at if v is not None)
    return rows, datas


def _scratch_final_within(url: str, scratch: StudyData, curve: Curve, budget: float, artifacts: str | None) -> float | None:
    """Test metric of scratch's best finalized model whose delivered compute (search so far plus
    finalizing) fits in ``budget``: scratch's own delivered model if it fits, else its best-so-far node
    at the largest compute that leaves room to finalize it (finalized here once, then reused)."""
    from ..core.spec import forward_flops, spec_from_dict
    from ..search.finalize import finalize_node

    final = scratch.final
    if final is not None and curve.flops and curve.flops[-1] + float(final["flops"]) <= budget * (1 + 1e-9):
        return float(final["test_metric"])
    n_train = int(scratch.study_attrs.get("dils_n_train", 0))
    for i in range(len(curve.flops) - 1, -1, -1):
        node = scratch.nodes.get(curve.best_key[i])
        if node is None:
            continue
        estimate = 3 * forward_flops(spec_from_dict(node.spec)) * n_train * scratch.setup.final["epochs"]
        if curve.flops[i] + estimate > budget:
            continue
        record = finalize_node(url, scratch.name, node.key, artifacts).record
        if curve.flops[i] + record.own_flops <= budget * (1 + 1e-9):
            return float(record.metrics["test_metric"])
    return None


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, list):
        return ";".join(map(str, v))
    return v


def write_outputs(
    out_dir: str | Path, rows: list[SummaryRow], datas: dict[str, list[StudyData]], title: str,
    margin: float = DEFAULT_MARGIN, intro: str = "",
) -> dict[str, Path]:
    """``report.html``, ``summary.csv`` and ``summary.json`` under ``out_dir``."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"out={str(out_dir)!r} is not a writable folder: {exc.strerror or exc}") from None
    paths = {"report": out / "report.html", "csv": out / "summary.csv", "json": out / "summary.json"}
    dicts = [r.to_dict() for r in rows]
    paths["json"].write_text(json.dumps(dicts, indent=2) + "\n", encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=ROW_FIELDS)
        w.writeheader()
        for d in dicts:
            w.writerow({k: _csv_value(d[k]) for k in ROW_FIELDS})
    write_report(str(paths["report"]), datas, title, rows, margin, intro)
    return paths


def _flops(x: float | None) -> str:
    return flops_text(x, none="not reached")


def format_table(rows: list[SummaryRow]) -> str:
    """A fixed-width text table (Markdown-compatible) of the rows."""

    def pm(x: float | None, s: float | None) -> str:
        if x is None:
            return "-"
        return f"{x:.4f}" + (f" ± {s:.4f}" if s is not None else "")

    head = ["policy", "seeds", "search-best test", "delivered val", "delivered test", "FLOPs to target",
            "search FLOPs", "delivered FLOPs", "delivered s", "params"]
    body = [[r.policy, str(r.seeds), pm(r.best_test, r.best_test_std), pm(r.final_val, r.final_val_std),
             pm(r.final_test, r.final_test_std), reached_text(r, r.flops_to_target, _flops), _flops(r.total_flops),
             "-" if r.delivered_flops is None else _flops(r.delivered_flops),
             f"{r.delivered_seconds if r.delivered_seconds is not None else r.total_seconds:.1f}",
             "-" if r.params is None else f"{r.params:,.0f}"]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])
