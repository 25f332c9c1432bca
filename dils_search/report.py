"""What studies did, as figure data (computed here and tested), and one self-contained HTML report.

Data functions read nothing but a :class:`StudyData` and return NamedTuples/dataclasses; the
``draw_*`` functions turn those into Plotly figures; :func:`render_html` embeds plotly.js once, so
the report opens offline (no CDN).

Compute is charged honestly per study: a node costs its own training FLOPs and seconds the first
time a study uses it, whoever trained it (another policy sharing the base node, or an earlier run
of the same study). Reuse *within* a study is free, which is the point of growing.
"""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import InputError
from .spec import flops_text
from .store import LineageStore, NodeRecord

if TYPE_CHECKING:
    from .config import StudyConfig
    from .search.storage import StoredTrial

__all__ = [
    "StudyData", "load_study_data", "Curve", "best_so_far", "compute_to_target", "TreeNode", "TreeData",
    "tree_data", "best_at_compute", "Point", "node_points", "pareto_front", "SummaryRow", "summary_rows", "verdict",
    "build_report", "write_report", "DEFAULT_MARGIN", "policies_of", "by_policy",
]

DEFAULT_MARGIN = 0.005  # 0.5 percentage points of accuracy (or of R^2)


@dataclass
class StudyData:
    """One study read back from storage with plain SQL (no Optuna, no torch): its finished trials
    (in order), the nodes they used and its delivered model."""

    name: str
    label: str
    config: StudyConfig
    study_attrs: dict[str, Any]
    directions: tuple[str, ...]
    trials: list[StoredTrial]
    nodes: dict[str, NodeRecord]
    final: dict[str, Any] | None = None  # the finalize stage's delivered model (show --json's "final")
    url: str = ""
    n_finished: int = 0

    @property
    def multi_objective(self) -> bool:
        return len(self.directions) > 1


def load_study_data(url: str, name: str, label: str | None = None, artifacts: str | None = None) -> StudyData:
    """Read study ``name`` and its ready nodes; raises ``StoreError`` naming the study if it is missing."""
    from .search.storage import FINISHED_STATES, read_study, study_config

    stored_study = read_study(url, name)  # plain SQL: `report` imports neither torch nor Optuna for this
    cfg, stored = study_config(url, name, stored_study)
    finished = [t for t in stored_study.trials if t.state in FINISHED_STATES]
    trials = [t for t in finished if t.user_attrs.get("node_keys")]
    keys = sorted({k for t in trials for k in t.user_attrs["node_keys"]})
    store = LineageStore(url, artifacts or stored, create=False)
    try:
        nodes = {r.key: r for r in store.nodes(keys) if r.status == "ready"}
    finally:
        store.close()
    return StudyData(name, label or name, cfg, stored_study.user_attrs, stored_study.directions, trials, nodes,
                     stored_study.final, url, len(finished))


# ---------------------------------------------------------------- best-so-far and compute


class Curve(NamedTuple):
    """Best-so-far validation metric after each finished trial, against cumulative compute."""

    label: str
    study: str
    trials: list[int]
    flops: list[float]
    seconds: list[float]
    best_val: list[float]
    best_test: list[float]
    best_params: list[int]
    best_key: list[str]
    nodes: list[int]


def best_so_far(data: StudyData) -> Curve:
    """The curve of ``data`` in trial order; every node a trial evaluated counts as a found model."""
    seen: set[str] = set()
    flops = seconds = 0.0
    best: tuple[float, float, int, str] | None = None
    c = Curve(data.label, data.name, [], [], [], [], [], [], [], [])
    for t in data.trials:
        for key in t.user_attrs["node_keys"]:
            node = data.nodes.get(key)
            if node is None:
                continue
            if key not in seen:
                seen.add(key)
                flops += node.own_flops
                seconds += node.own_seconds
            val = float(node.metrics["val_metric"])
            if best is None or val > best[0]:
                best = (val, float(node.metrics["test_metric"]), int(node.metrics["params"]), key)
        if best is None:
            continue
        c.trials.append(t.number)
        c.flops.append(flops)
        c.seconds.append(seconds)
        c.best_val.append(best[0])
        c.best_test.append(best[1])
        c.best_params.append(best[2])
        c.best_key.append(best[3])
        c.nodes.append(len(seen))
    return c


def compute_to_target(curve: Curve, target: float) -> tuple[float | None, float | None]:
    """Cumulative (FLOPs, seconds) when the best-so-far metric first reached ``target``; Nones if never."""
    for i, v in enumerate(curve.best_val):
        if v >= target - 1e-12:
            return curve.flops[i], curve.seconds[i]
    return None, None


def best_at_compute(curve: Curve, flops: float) -> float | None:
    """The best-so-far metric once ``flops`` training FLOPs were spent (trials finished within it); None if none."""
    best = None
    for f, v in zip(curve.flops, curve.best_val, strict=True):
        if f > flops * (1 + 1e-12):
            break
        best = v
    return best


# ---------------------------------------------------------------- growth tree


class TreeNode(NamedTuple):
    key: str
    parent: str | None
    depth: int
    x: float
    y: float
    val: float
    test: float
    params: int
    flops: int
    seconds: float
    step: str
    init: str
    gap: float | None
    mode: str
    hidden: list[int]
    best: bool


class TreeData(NamedTuple):
    """Nodes laid out by depth (x) and leaf order (y); ``edges`` are (parent, child, on_best_path)."""

    study: str
    label: str
    nodes: list[TreeNode]
    edges: list[tuple[str, str, bool]]
    best_key: str | None


def _step_text(step: dict[str, Any] | None) -> str:
    return "base" if not step else f"+{step['width']}@{step['position']}"


def tree_data(data: StudyData) -> TreeData:
    """The study's growth tree. Scratch nodes inherit nothing, so each is its own root (no edges)."""
    keys = list(dict.fromkeys(k for t in data.trials for k in t.user_attrs["node_keys"] if k in data.nodes))
    recs = {k: data.nodes[k] for k in keys}
    children: dict[str, list[str]] = {k: [] for k in keys}
    roots = []
    for k in keys:
        parent = recs[k].parent_key if recs[k].recipe.get("mode") != "scratch" else None
        if parent in recs:
            children[parent].append(k)  # type: ignore[index]
        else:
            roots.append(k)

    def order(k: str) -> tuple[Any, ...]:
        r = recs[k]
        s = r.step or {}
        return (r.depth, s.get("position", -1), s.get("width", 0), s.get("init", ""), r.spec.get("hidden", []), k)

    y: dict[str, float] = {}
    leaf = 0

    def place(k: str) -> float:
        nonlocal leaf
        kids = sorted(children[k], key=order)
        if not kids:
            y[k] = float(leaf)
            leaf += 1
        else:
            y[k] = sum(place(c) for c in kids) / len(kids)
        return y[k]

    for r in sorted(roots, key=order):
        place(r)
    curve = best_so_far(data)
    best_key = curve.best_key[-1] if curve.best_key else None
    on_path: set[str] = set()
    k = best_key
    while k is not None and k in recs:
        on_path.add(k)
        k = recs[k].parent_key
    nodes = []
    for k in keys:
        r = recs[k]
        m = r.metrics
        nodes.append(TreeNode(
            key=k, parent=r.parent_key if r.parent_key in recs and k not in roots else None, depth=r.depth,
            x=float(r.depth), y=y[k],
            val=float(m["val_metric"]), test=float(m["test_metric"]), params=int(m["params"]),
            flops=int(r.own_flops), seconds=float(r.own_seconds), step=_step_text(r.step),
            init=(r.step or {}).get("init", "-") if r.recipe.get("mode") != "scratch" else "scratch",
            gap=float(m["gap"]) if m.get("gap") is not None else None, mode=str(r.recipe.get("mode", "grow")),
            hidden=list(r.spec.get("hidden", [])), best=k in on_path,
        ))
    edges = [(n.parent, n.key, n.best and n.parent in on_path) for n in nodes if n.parent is not None]
    return TreeData(data.name, data.label, nodes, edges, best_key)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the answer: how deep, and what growing saved


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


def answer(data: StudyData) -> Answer | None:
    from .search.summary import scratch_equivalent_flops

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
        float(sum(t.user_attrs.get("flops_spent", 0) for t in data.trials)),
        float(scratch_equivalent_flops(data.config, data.study_attrs, [t.user_attrs for t in data.trials])),
        data.config.search.policy == "scratch",
    )


def answer_html(answers: Sequence[Answer]) -> str:
    """The block at the top of every report: recommended architecture, delivered metric, saving."""
    items = []
    for a in answers:
        what = "delivered (finalized) model" if a.finalized else "search's best node (not finalized yet)"
        verb = "searching (every candidate from scratch) spent" if a.scratch else "growing spent"
        saved = (f"{verb} {flops_text(a.flops_spent)} against {flops_text(a.scratch_flops)} to train every "
                 f"evaluated node from scratch ({a.flops_spent / a.scratch_flops:.2f}x)" if a.scratch_flops
                 else f"{verb} {flops_text(a.flops_spent)}")
        before = f"; the search's best node had test {a.search_test:.4f}" if a.finalized else ""
        items.append(
            f'<li data-study="{html.escape(a.study)}"><b>{html.escape(a.label)}</b>: recommended architecture '
            f'<b class="hidden">hidden {html.escape(str(a.hidden))}</b> ({len(a.hidden)} hidden layers, '
            f"{a.params:,} parameters); {what}: validation {a.val:.4f}, <b>test {a.test:.4f}</b>{before}; "
            f"{html.escape(saved)}.</li>")
    return f'<section id="answer"><h2>Answer</h2><ul>{"".join(items)}</ul></section>' if items else ""


# ---------------------------------------------------------------- Pareto front and depth


class Point(NamedTuple):
    label: str
    key: str
    depth: int
    params: int
    val: float
    test: float


def node_points(data: StudyData) -> list[Point]:
    """Every node the study's trials evaluated, once."""
    keys = dict.fromkeys(k for t in data.trials for k in t.user_attrs["node_keys"] if k in data.nodes)
    out = []
    for k in keys:
        m = data.nodes[k].metrics
        out.append(Point(data.label, k, int(data.nodes[k].depth), int(m["params"]), float(m["val_metric"]),
                         float(m["test_metric"])))
    return out


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both axes (higher metric, fewer parameters), by parameters."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.params, -p.val)):
        if not front or p.val > front[-1].val:
            front.append(p)
    return front


# ---------------------------------------------------------------- summary rows and the verdict


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
    n_seeds = max((len(v) for v in groups.values()), default=0)
    targets: list[float | None] = []
    for i in range(n_seeds):
        ends = [c[i].best_val[-1] for c in groups.values() if len(c) > i and c[i].best_val]
        targets.append(max(ends) - margin if ends else None)
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
    base = next((r for r in done if _is_scratch(r)), None)
    if base is None:
        return [*out, _NO_SCRATCH]
    return out + [(_delivered_line if final else _search_line)(r, base) for r in done if r is not base]


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


# ---------------------------------------------------------------- drawing

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
            "#7f7f7f"]


def _colors(labels: Sequence[str]) -> dict[str, str]:
    return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(dict.fromkeys(labels))}


_INIT_TAG = {"dils-analytic": "DA", "dils-approx": "DX", "identity": "ID", "random": "RND", "zero": "Z",
             "scratch": "S"}  # node labels: widths and the init of the step that made the node


def draw_tree(tree: TreeData) -> Any:
    import plotly.graph_objects as go

    pos = {n.key: n for n in tree.nodes}
    fig = go.Figure()
    for on_best in (False, True):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for parent, child, best in tree.edges:
            if best == on_best:
                xs += [pos[parent].x, pos[child].x, None]
                ys += [pos[parent].y, pos[child].y, None]
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=on_best,
                                     name="best path", line={"color": "#d62728" if on_best else "#b0b0b0",
                                                             "width": 4 if on_best else 1.2}))
    biggest = max((n.params for n in tree.nodes), default=1)
    hover = [
        f"{n.step} {n.init}<br>hidden {n.hidden}<br>val {n.val:.4f} test {n.test:.4f}<br>{n.params:,} params"
        f"<br>own compute {flops_text(n.flops)}, {n.seconds:.2f} s"
        + (f"<br>gap after insertion {n.gap:.2e}" if n.gap is not None else "")
        for n in tree.nodes
    ]
    fig.add_trace(go.Scatter(
        x=[n.x for n in tree.nodes], y=[n.y for n in tree.nodes], mode="markers+text", name="node", showlegend=False,
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>", textposition="top center",
        text=["-".join(map(str, n.hidden)) + (f" {_INIT_TAG.get(n.init, n.init)}" if n.init not in ("-", "") else "")
              for n in tree.nodes],
        textfont={"size": 9, "color": "#333"},
        marker={"color": [n.val for n in tree.nodes], "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": {"text": "val"}},
                "size": [8 + 22 * math.sqrt(n.params / biggest) for n in tree.nodes],
                "line": {"color": ["#d62728" if n.best else "#333" for n in tree.nodes],
                         "width": [3 if n.best else 0.5 for n in tree.nodes]}},
    ))
    fig.update_layout(title=f"Growth tree: {tree.label}", xaxis_title="depth (growth steps)", height=460,
                      legend={"orientation": "h", "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},
                      yaxis={"showticklabels": False, "title": ""}, margin={"t": 50, "l": 40, "r": 20, "b": 40})
    fig.update_xaxes(dtick=1)
    return fig


def draw_curves(groups: dict[str, list[Curve]], targets: Sequence[float | None]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colors = _colors(list(groups))
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("vs cumulative training FLOPs", "vs cumulative training seconds"))
    for label, curves in groups.items():
        for i, c in enumerate(curves):
            for col, xs in ((1, c.flops), (2, c.seconds)):
                fig.add_trace(go.Scatter(
                    x=xs, y=c.best_val, mode="lines+markers", line_shape="hv", name=label, legendgroup=label,
                    showlegend=(i == 0 and col == 1), line={"color": colors[label]}, marker={"size": 4},
                    customdata=c.trials, hovertemplate=f"{c.study}<br>trial %{{customdata}}<br>best val %{{y:.4f}}<extra></extra>",
                ), row=1, col=col)
    known = [t for t in targets if t is not None]
    if known:
        fig.add_hline(y=statistics.fmean(known), line_dash="dot", line_color="#555", row=1, col=1,  # type: ignore[arg-type]
                      annotation_text="target")
        fig.add_hline(y=statistics.fmean(known), line_dash="dot", line_color="#555", row=1, col=2)  # type: ignore[arg-type]
    fig.update_xaxes(type="log", dtick="D2", tickformat="~s", exponentformat="SI", title_text="training FLOPs",
                     row=1, col=1)  # ticks at 1, 2, 5 x 10^k, labelled 2G, 5G, 10G
    fig.update_xaxes(title_text="training seconds", row=1, col=2)
    fig.update_yaxes(title_text="best validation metric so far", row=1, col=1)
    fig.update_layout(title="Best-so-far metric vs compute", height=440, margin={"t": 70, "l": 60, "r": 20, "b": 40})
    return fig


def draw_pareto(points: dict[str, list[Point]]) -> Any:
    import plotly.graph_objects as go

    colors = _colors(list(points))
    fig = go.Figure()
    for label, pts in points.items():
        fig.add_trace(go.Scatter(
            x=[p.params for p in pts], y=[p.val for p in pts], mode="markers", name=label, legendgroup=label,
            marker={"color": colors[label], "opacity": 0.35, "size": 6}, customdata=[p.depth for p in pts],
            hovertemplate="%{x:,} params<br>val %{y:.4f}<br>depth %{customdata}<extra>" + html.escape(label) + "</extra>",
        ))
        front = pareto_front(pts)
        fig.add_trace(go.Scatter(
            x=[p.params for p in front], y=[p.val for p in front], mode="lines+markers", line_shape="hv",
            name=f"{label} front", legendgroup=label, showlegend=False, line={"color": colors[label], "width": 2},
            marker={"size": 8}, hovertemplate="front: %{x:,} params, val %{y:.4f}<extra></extra>",
        ))
    fig.update_layout(title="Pareto front: validation metric vs parameters (all evaluated nodes)", height=440,
                      xaxis={"title": "parameters", "type": "log", "dtick": "D2", "tickformat": "~s"},
                      yaxis_title="validation metric",
                      margin={"t": 50, "l": 60, "r": 20, "b": 40})
    return fig


def draw_depth(points: dict[str, list[Point]]) -> Any:
    import plotly.graph_objects as go

    colors = _colors(list(points))
    labels = list(points)
    fig = go.Figure()
    for j, (label, pts) in enumerate(points.items()):
        off = (j - (len(labels) - 1) / 2) * 0.08
        fig.add_trace(go.Scatter(
            x=[p.depth + off for p in pts], y=[p.val for p in pts], mode="markers", name=label, legendgroup=label,
            marker={"color": colors[label], "opacity": 0.45, "size": 6},
            hovertemplate="val %{y:.4f}<extra>" + html.escape(label) + "</extra>",
        ))
        best: dict[int, float] = {}
        for p in pts:
            best[p.depth] = max(best.get(p.depth, -math.inf), p.val)
        depths = sorted(best)
        fig.add_trace(go.Scatter(x=depths, y=[best[d] for d in depths], mode="lines", legendgroup=label,
                                 showlegend=False, line={"color": colors[label]}, hoverinfo="skip"))
    fig.update_layout(title="Validation metric vs depth (line: best per depth)", height=420,
                      xaxis={"title": "depth (growth steps)", "dtick": 1}, yaxis_title="validation metric",
                      margin={"t": 50, "l": 60, "r": 20, "b": 40})
    return fig


# ---------------------------------------------------------------- the HTML file


class Figure(NamedTuple):
    title: str
    caption: str
    figure: Any


def _history(datas: Sequence[StudyData]) -> Any:
    """Each study's trial values (first objective) and its best so far, as Optuna's history plot shows them."""
    import plotly.graph_objects as go

    fig = go.Figure()
    colors = _colors([d.label for d in datas])
    for d in datas:
        done = [t for t in d.trials if t.state == "COMPLETE" and t.value is not None]
        best: list[float] = []
        for t in done:
            best.append(max(best[-1], float(t.value)) if best else float(t.value))  # type: ignore[arg-type]
        fig.add_trace(go.Scatter(x=[t.number for t in done], y=[t.value for t in done], mode="markers",
                                 name=f"{d.label}: objective", marker={"color": colors[d.label], "size": 6}))
        fig.add_trace(go.Scatter(x=[t.number for t in done], y=best, mode="lines", line_shape="hv",
                                 name=f"{d.label}: best so far", line={"color": colors[d.label]}))
    fig.update_layout(height=440, xaxis_title="trial", yaxis_title="objective value (validation metric)",
                      margin={"t": 40, "l": 60, "r": 20, "b": 40})
    return fig


def _importances(d: StudyData) -> tuple[dict[str, float], str] | None:
    """Parameter importances from Optuna's default evaluator: the values the finalize stage stored,
    while no trial finished since; else computed now (the one place `report` imports Optuna)."""
    cached = (d.final or {}).get("importances")
    if cached and cached.get("after_trials") == d.n_finished:
        return dict(cached["values"]), str(cached["evaluator"])
    import optuna

    from .search.importance import default_evaluator, param_importances
    from .search.storage import open_storage

    study = optuna.load_study(study_name=d.name, storage=open_storage(d.url, d.config))
    values = param_importances(study)
    return (values, default_evaluator()) if values is not None else None


def _optuna_figures(datas: Sequence[StudyData]) -> tuple[list[Figure], list[str]]:
    import plotly.graph_objects as go

    figs: list[Figure] = []
    notes: list[str] = []
    single = [d for d in datas if not d.multi_objective and any(t.state == "COMPLETE" for t in d.trials)]
    if single:
        figs.append(Figure("Optimisation history", "Each trial's objective (its best validation metric) and the "
                           "best so far, per study, as Optuna's history plot shows them.", _history(single)))
    for d in datas:
        found = _importances(d)
        if found is None:
            notes.append(f"{d.label}: no parameter importances (they need a single objective, at least 2 completed "
                         "trials and parameters that vary).")
            continue
        values, evaluator = found
        names = sorted(values, key=lambda k: values[k])
        fig = go.Figure(go.Bar(x=[values[k] for k in names], y=names, orientation="h",
                               text=[f"{values[k]:.2f}" for k in names], textposition="outside"))
        fig.update_layout(title=f"Parameter importances: {d.label}", height=360, xaxis_title="importance",
                          margin={"t": 50, "l": 120, "r": 40, "b": 40})
        figs.append(Figure(f"Parameter importances: {d.label}", f"Importances of the sampled path parameters for "
                           f"the trial value, from Optuna's default evaluator ({evaluator}), the one "
                           "optuna-dashboard shows.", fig))
    return figs, notes


def by_policy(datas: list[StudyData]) -> dict[str, list[StudyData]]:
    """One group per study, labelled by its policy (and its name, when two studies share a policy)."""
    groups: dict[str, list[StudyData]] = {}
    for d in datas:
        s = d.config.search
        d.label = s.policy + (f"/{s.inits[0]}" if len(s.inits) == 1 else "")
        if sum(e.config.search == s for e in datas) > 1 or d.label in groups:
            d.label = f"{d.label} ({d.name})"
        groups[d.label] = [d]
    return groups


def policies_of(groups: dict[str, list[StudyData]]) -> dict[str, str]:
    """label -> the config's search.policy of its first study."""
    return {label: ds[0].config.search.policy for label, ds in groups.items() if ds}


def build_report(
    groups: dict[str, list[StudyData]], rows: Sequence[SummaryRow] | None = None, margin: float = DEFAULT_MARGIN,
) -> tuple[list[SummaryRow], list[Figure], list[str]]:
    """Rows, figures and notes for ``groups`` (label -> one StudyData per seed). Trees and importances
    use each label's first seed."""
    curves = {label: [best_so_far(d) for d in ds] for label, ds in groups.items()}
    rows = list(rows) if rows is not None else summary_rows(
        curves, margin, {label: [d.final for d in ds] for label, ds in groups.items()}, policies_of(groups))
    n_seeds = max((len(v) for v in curves.values()), default=0)
    targets = []
    for i in range(n_seeds):
        finals = [c[i].best_val[-1] for c in curves.values() if len(c) > i and c[i].best_val]
        targets.append(max(finals) - margin if finals else None)
    firsts = [ds[0] for ds in groups.values() if ds]
    points = {label: [p for d in ds for p in node_points(d)] for label, ds in groups.items()}
    figs = [
        Figure("Best-so-far metric vs compute", "One line per study (one colour per policy; seeds share it). "
               f"The dotted line is the target: the best final validation metric of any policy minus "
               f"{100 * margin:.1f} pp. Compute is training FLOPs (3 x forward FLOPs x samples, plus insertion "
               "cost) and training seconds of every node the study used, charged on first use.",
               draw_curves(curves, targets if len(curves) > 1 else [])),
        Figure("Pareto front", "Every evaluated node; the line is each policy's non-dominated front "
               "(higher metric with fewer parameters).", draw_pareto(points)),
        Figure("Metric vs depth", "Every evaluated node by its depth (number of growth steps).", draw_depth(points)),
    ]
    for d in firsts:
        tree = tree_data(d)
        figs.append(Figure(f"Growth tree: {d.label}", f"Study {d.name}: {len(tree.nodes)} nodes, coloured by "
                           "validation metric, sized by parameters; the best path is red. Hover for step, init, "
                           "metric and compute." + (" Scratch nodes inherit nothing, so they have no edges."
                                                    if d.config.search.policy == "scratch" else ""), draw_tree(tree)))
    opt_figs, notes = _optuna_figures(firsts)
    return rows, figs + opt_figs, notes


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.caption{color:#555;font-size:14px}
.verdict li{margin:.2em 0}#answer{background:#f5f9ff;border:1px solid #c9dcf5;padding:.2em 1em;margin:1em 0}.notes{color:#777;font-size:13px}"""


def reached_text(row: SummaryRow, value: float | None, fmt: Callable[[float], str]) -> str:
    """A compute-to-target cell: the value (or "not reached"), and how many seeds reached it when some did not."""
    text = "not reached" if value is None else fmt(value)
    if row.seeds > 1 and row.target_reached < row.seeds:
        text += f" ({row.target_reached}/{row.seeds} seeds)"
    return text


def _table_html(rows: Sequence[SummaryRow]) -> str:
    head = ["policy", "seeds", "search-best val", "search-best test", "delivered val", "delivered test",
            "FLOPs to target", "seconds to target", "search FLOPs", "finalize FLOPs", "delivered FLOPs",
            "total seconds", "params (best)", "trials"]

    def pm(x: float | None, s: float | None) -> str:
        return _num(x) + (f" ± {s:.4f}" if s is not None else "")

    body = []
    for r in rows:
        cells = [r.policy, str(r.seeds), pm(r.best_val, r.best_val_std), pm(r.best_test, r.best_test_std),
                 pm(r.final_val, r.final_val_std), pm(r.final_test, r.final_test_std),
                 reached_text(r, r.flops_to_target, flops_text) if len(rows) > 1 else "- (one policy)",
                 reached_text(r, r.seconds_to_target, lambda x: f"{x:.1f}") if len(rows) > 1 else "-",
                 flops_text(r.total_flops), "-" if r.final_flops is None else flops_text(r.final_flops),
                 "-" if r.delivered_flops is None else flops_text(r.delivered_flops),
                 f"{r.delivered_seconds if r.delivered_seconds is not None else r.total_seconds:.1f}",
                 "-" if r.params is None else f"{r.params:,.0f}", str(r.trials)]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table>")


def render_html(title: str, rows: Sequence[SummaryRow], figures: Sequence[Figure], notes: Sequence[str] = (),
                intro: str = "", answers: Sequence[Answer] = ()) -> str:
    """One HTML page; plotly.js is inlined once (before the first figure), so it works offline."""
    import plotly.io as pio

    parts = []
    for i, f in enumerate(figures):
        div = pio.to_html(f.figure, full_html=False, include_plotlyjs=(i == 0), div_id=f"dils-fig-{i}",
                          config={"displaylogo": False, "responsive": True})
        parts.append(f'<section class="dils-figure"><h2>{html.escape(f.title)}</h2>'
                     f'<p class="caption">{html.escape(f.caption)}</p>{div}</section>')
    verdict_html = "".join(f"<li>{html.escape(s)}</li>" for s in verdict(rows))
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<style>{_CSS}</style></head><body data-figures="{len(figures)}"><h1>{html.escape(title)}</h1>'
        f'{f"<p>{html.escape(intro)}</p>" if intro else ""}{answer_html(answers)}'
        f'<h2>Summary</h2>{_table_html(rows)}<p class="caption">Target: the best final validation metric of any '
        'policy on the same seed minus the margin; compute to target is the median over seeds (a seed that '
        'never reached it counts as infinite), with the number of seeds that reached it. "Search-best" is the '
        'best node the search found, before finalizing; "delivered" is the model the study hands over after '
        'its finalize stage, and delivered FLOPs count everything up to it (search + finalizing).</p>'
        f'<ul class="verdict">{verdict_html}</ul>{"".join(parts)}'
        f'{f"<h2>Notes</h2><ul class=notes>{notes_html}</ul>" if notes else ""}</body></html>'
    )


def write_report(path: str, groups: dict[str, list[StudyData]], title: str, rows: Sequence[SummaryRow] | None = None,
                 margin: float = DEFAULT_MARGIN, intro: str = "") -> tuple[list[SummaryRow], int]:
    """Write the report to ``path``; returns the rows and the number of figures."""
    from pathlib import Path

    rows, figs, notes = build_report(groups, rows, margin)
    answers = [a for a in (answer(ds[0]) for ds in groups.values() if ds) if a is not None]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(title, rows, figs, notes, intro, answers), encoding="utf-8")
    return rows, len(figs)
