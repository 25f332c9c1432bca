"""Numbers and sentences from the data: each study's answer, the summary rows per policy (search-best
and delivered), and the verdict lines against the scratch baseline."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ..core.spec import flops_text
from ..errors import InputError
from ..search.attrs import FLOPS_SPENT

if TYPE_CHECKING:
    pass
from .data import DEFAULT_MARGIN, Curve, StudyData, best_at_compute, best_so_far, compute_to_target, seed_targets


class Answer(NamedTuple):
    """What a study recommends: the delivered model (or, before finalizing, the search's best node)
    and the compute growing spent against training every evaluated node from scratch."""

    label: str
    study: str
    hidden: list[int]
    params: int
    val: float
    test: float
    finalized: bool
    search_test: float
    flops_spent: float
    scratch_flops: float
    scratch: bool = False  # the scratch baseline's study: it grows nothing
    budget: float | None = None  # search.budget_flops (search + finalize), None without one
    final_flops: float = 0.0  # what finalizing cost (delivered compute = flops_spent + final_flops)


def answer(data: StudyData) -> Answer | None:
    from ..search.summary import scratch_equivalent_flops

    curve = best_so_far(data)
    if not curve.best_key:
        return None
    best = data.nodes[curve.best_key[-1]]
    f = data.final
    m = best.metrics
    return Answer(
        data.label, data.name, list(f["hidden"] if f else best.spec.get("hidden", [])),
        int(f["params"] if f else m["params"]), float(f["val_metric"] if f else m["val_metric"]),
        float(f["test_metric"] if f else m["test_metric"]), f is not None, float(m["test_metric"]),
        float(sum(t.user_attrs.get(FLOPS_SPENT, 0) for t in data.trials)),
        float(scratch_equivalent_flops(data.setup, [t.user_attrs for t in data.trials])),
        data.setup.policy == "scratch",
        (data.setup.config.search.budget_flops or None) if data.setup.config else None, float(f["flops"]) if f else 0.0,
    )


@dataclass
class SummaryRow:
    """One policy, averaged over its seeds (``trials`` and ``nodes`` are totals over them).
    Compute-to-target is the median over seeds, a seed that never reached the target counting as
    infinite, so it is None unless more than half reached it. ``scratch_at_equal_flops`` is
    scratch's best-so-far metric at this policy's total FLOPs (same seed), None where undefined."""

    policy: str
    seeds: int
    best_val: float | None
    best_val_std: float | None
    best_test: float | None
    best_test_std: float | None
    target: float | None
    target_reached: int
    flops_to_target: float | None
    seconds_to_target: float | None
    total_flops: float
    total_seconds: float
    params: float | None
    trials: int
    nodes: int
    studies: list[str]
    scratch_at_equal_flops: float | None = None
    # the finalize stage (None unless every seed was finalized); delivered = search + finalizing
    final_val: float | None = None
    final_val_std: float | None = None
    final_test: float | None = None
    final_test_std: float | None = None
    final_flops: float | None = None
    final_flops_std: float | None = None
    delivered_flops: float | None = None
    delivered_flops_std: float | None = None
    delivered_seconds: float | None = None
    delivered_seconds_std: float | None = None
    # test metric of scratch's best finalized model whose delivered compute fits in this row's (compare)
    scratch_final_at_equal_flops: float | None = None
    base_policy: str = ""  # the config's search.policy (scratch is the baseline whatever its label)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _median_reached(xs: list[float], n: int) -> float | None:
    """Median over ``n`` seeds where the ``n - len(xs)`` seeds that never reached count as infinite:
    None unless more than half of them reached."""
    if n == 0:
        return None
    m = statistics.median([*xs, *[math.inf] * (n - len(xs))])
    return None if math.isinf(m) else m


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def _add_finals(row: SummaryRow, curves: list[Curve], finals: list[dict[str, Any] | None]) -> None:
    """The final_* and delivered_* columns of ``row``, when every seed of it was finalized."""
    if not curves or len(finals) != len(curves) or any(f is None for f in finals):
        return
    fs = [f for f in finals if f is not None]
    cols = {
        "final_val": [float(f["val_metric"]) for f in fs],
        "final_test": [float(f["test_metric"]) for f in fs],
        "final_flops": [float(f["flops"]) for f in fs],
        "delivered_flops": [(c.flops[-1] if c.flops else 0.0) + float(f["flops"]) for c, f in zip(curves, fs, strict=True)],
        "delivered_seconds": [(c.seconds[-1] if c.seconds else 0.0) + float(f["seconds"]) for c, f in zip(curves, fs, strict=True)],
    }
    for name, xs in cols.items():
        setattr(row, name, _mean(xs))
        setattr(row, f"{name}_std", _std(xs))


def summary_rows(groups: dict[str, list[Curve]], margin: float = DEFAULT_MARGIN,
                 finals: dict[str, list[dict[str, Any] | None]] | None = None,
                 policies: dict[str, str] | None = None) -> list[SummaryRow]:
    """One row per label; ``groups[label][i]`` is seed i. The target of seed i is the best final
    validation metric of any label on seed i minus ``margin``. ``finals[label][i]`` is seed i's
    finalize result (``StudyData.final``)."""
    if margin < 0:
        raise InputError(f"margin={margin!r} must be >= 0")
    targets = seed_targets(groups, margin)
    rows = []
    for label, curves in groups.items():
        finished = [c for c in curves if c.best_val]
        reached: list[tuple[float, float]] = []
        for i, c in enumerate(curves):
            tgt = targets[i]
            if tgt is not None:
                f, s = compute_to_target(c, tgt)
                if f is not None and s is not None:
                    reached.append((f, s))
        vals = [c.best_val[-1] for c in finished]
        tests = [c.best_test[-1] for c in finished]
        known = [t for t in targets[: len(curves)] if t is not None]
        rows.append(SummaryRow(
            policy=label, seeds=len(curves), best_val=_mean(vals), best_val_std=_std(vals), best_test=_mean(tests),
            best_test_std=_std(tests), target=_mean(known), target_reached=len(reached),
            flops_to_target=_median_reached([f for f, _ in reached], len(curves)),
            seconds_to_target=_median_reached([s for _, s in reached], len(curves)),
            total_flops=statistics.fmean([c.flops[-1] if c.flops else 0.0 for c in curves]) if curves else 0.0,
            total_seconds=statistics.fmean([c.seconds[-1] if c.seconds else 0.0 for c in curves]) if curves else 0.0,
            params=_mean([float(c.best_params[-1]) for c in finished]),
            trials=sum(len(c.trials) for c in curves), nodes=sum(c.nodes[-1] for c in finished),
            studies=[c.study for c in curves],
        ))
        _add_finals(rows[-1], curves, (finals or {}).get(label, []))
        rows[-1].base_policy = (policies or {}).get(label, "")
    base = next((r.policy for r in rows if _is_scratch(r)), None)
    for row in rows:
        if base is None or row.policy == base:
            continue
        at = [best_at_compute(s, c.flops[-1]) for c, s in zip(groups[row.policy], groups[base], strict=False) if c.flops]
        if at and len(at) == len(groups[row.policy]) and all(v is not None for v in at):
            row.scratch_at_equal_flops = statistics.fmean(v for v in at if v is not None)
    return rows


def _is_scratch(row: SummaryRow | str) -> bool:
    """The scratch baseline, known by its policy (the label is only a fallback for rows without one)."""
    if isinstance(row, SummaryRow) and row.base_policy:
        return row.base_policy == "scratch"
    label = row.policy if isinstance(row, SummaryRow) else row
    return label.split("/")[0] == "scratch"


_NO_SCRATCH = ("There is no scratch baseline here; the report's answer block compares the compute growing spent "
               "with training every evaluated node from scratch.")


def verdict(rows: Sequence[SummaryRow]) -> list[str]:
    """Plain sentences: which policy won, and how each growth policy fared against scratch. Delivered
    (finalized) models are compared when every row has one, else the search's best nodes. A growth
    policy that loses to scratch is said to lose."""
    done = [r for r in rows if r.best_val is not None]
    if not done:
        return ["No policy has a finished trial yet."]
    final = all(r.final_test is not None for r in done)
    if final:
        top = max(done, key=lambda r: (r.final_val or 0.0, r.final_test or 0.0))
        out = [f"Best delivered model by validation: {top.policy} (validation {_num(top.final_val)}, "
               f"test {_num(top.final_test)}, after finalizing)."]
    else:
        top = max(done, key=lambda r: (r.best_val or 0.0, r.best_test or 0.0))
        out = [f"Best validation metric: {top.policy} ({_num(top.best_val)}, test {_num(top.best_test)})."]
    plain = next((r for r in done if r.base_policy == "plain"), None)
    growing = [r for r in done if r is not plain and not _is_scratch(r)]
    if plain is not None:
        out += [_plain_line(r, plain) for r in growing]
    base = next((r for r in done if _is_scratch(r)), None)
    if base is None:
        return out if plain is not None else [*out, _NO_SCRATCH]
    return out + [(_delivered_line if final else _search_line)(r, base) for r in done if r is not base and r is not plain]


def _plain_line(r: SummaryRow, plain: SummaryRow) -> str:
    """A growing policy's delivered model against the plain network trained for the same budget."""
    if r.final_test is None or plain.final_test is None:
        return f"{r.policy}: not compared with the plain network yet (a delivered model is missing)."
    d = 100 * (r.final_test - plain.final_test)
    head = (f"DILS beats the plain network by {d:.2f} pp at equal compute" if d > 0 else
            f"DILS does not beat the plain network at equal compute ({d:+.2f} pp)")
    return (f"{r.policy}: {head}: delivered test {_num(r.final_test)} vs {_num(plain.final_test)}, "
            f"{flops_text(r.delivered_flops or 0.0)} vs {flops_text(plain.delivered_flops or 0.0)} delivered.")


def _search_line(r: SummaryRow, base: SummaryRow) -> str:
    dtest = 100 * ((r.best_test or 0.0) - (base.best_test or 0.0))
    if r.flops_to_target is not None and base.flops_to_target:
        cost = f"reached the target with {r.flops_to_target / base.flops_to_target:.2f}x scratch's training FLOPs"
    elif r.flops_to_target is not None:
        cost = "reached the target, which scratch did not"
    elif base.flops_to_target is not None:
        cost = "did not reach the target, which scratch did"
    else:
        cost = "neither reached the target"
    wins = dtest >= 0 and (r.flops_to_target is not None and (
        base.flops_to_target is None or r.flops_to_target <= base.flops_to_target))
    word = "beats" if wins else "does not beat"
    if r.scratch_at_equal_flops is not None and r.best_val is not None:
        ahead = ("ahead of" if r.best_val > r.scratch_at_equal_flops else
                 "level with" if r.best_val == r.scratch_at_equal_flops else "behind")
        same = (f"; at its own total of {flops_text(r.total_flops)} it was {ahead} scratch on validation "
                f"({r.best_val:.4f} vs {r.scratch_at_equal_flops:.4f} for scratch at that compute)")
    else:
        same = f"; scratch had not finished a trial within its {flops_text(r.total_flops)}"
    return f"{r.policy} {word} scratch: test metric {dtest:+.2f} pp vs scratch; {cost}{same}."


def _delivered_line(r: SummaryRow, base: SummaryRow) -> str:
    """Delivered (finalized) models, each at its delivered compute (search + finalizing)."""
    dtest = 100 * ((r.final_test or 0.0) - (base.final_test or 0.0))
    ratio = (r.delivered_flops or 0.0) / base.delivered_flops if base.delivered_flops else float("nan")
    word = "beats" if dtest >= 0 and ratio <= 1 else "does not beat"
    line = (f"{r.policy} {word} scratch: delivered test {_num(r.final_test)} vs scratch's {_num(base.final_test)} "
            f"({dtest:+.2f} pp), at {ratio:.2f}x scratch's delivered compute "
            f"({flops_text(r.delivered_flops or 0.0)} vs {flops_text(base.delivered_flops or 0.0)})")
    if r.scratch_final_at_equal_flops is not None:
        eq = 100 * ((r.final_test or 0.0) - r.scratch_final_at_equal_flops)
        line += (f"; at equal compute, scratch's best finalized model within {flops_text(r.delivered_flops or 0.0)} "
                 f"has test {_num(r.scratch_final_at_equal_flops)} ({eq:+.2f} pp for {r.policy})")
    return line + "."


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
