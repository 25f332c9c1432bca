"""Plotly figures drawn from the report's data (tree, curves, Pareto front, depth, Optuna's own plots)."""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..core.spec import flops_text

if TYPE_CHECKING:
    pass
from .data import (
    DEFAULT_MARGIN,
    Curve,
    Point,
    StudyData,
    TreeData,
    best_so_far,
    node_points,
    pareto_front,
    policies_of,
    seed_targets,
    tree_data,
)
from .metrics import SummaryRow, summary_rows

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
            "#7f7f7f"]


def _txt(text: str) -> str:
    """A study name or label as Plotly text: its markup (``<a href>``, ``<b>``, ...) shown, never rendered.
    Plotly reads only a few named entities (``&lt;``, ``&gt;``, ``&amp;``), so quotes stay as they are."""
    return html.escape(str(text), quote=False)


def _colors(labels: Sequence[str]) -> dict[str, str]:
    return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(dict.fromkeys(labels))}


_INIT_TAG = {"dils-analytic": "DA", "dils-approx": "DX", "identity": "ID", "random": "RND", "zero": "Z",
             "scratch": "S"}  # node labels: widths and the init of the step that made the node


#: a metric axis spans at least this (a fraction of its largest magnitude, at least 0.1 of it), so a
#: flat history looks flat instead of filling the plot with noise in the fourth decimal
MIN_SPAN = 0.02


def metric_range(values: Sequence[float], min_span: float = MIN_SPAN) -> list[float] | None:
    """A y-axis range for metric ``values``: their own range (5% padding) when it is wide enough, else
    one of ``min_span x max(|v|, 0.1)`` centred on them; None (autorange) when there is no value."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    pad = 0.05 * (hi - lo)
    span = min_span * max(max(abs(lo), abs(hi)), 0.1)
    if hi - lo + 2 * pad >= span:
        return [lo - pad, hi + pad]
    mid = (lo + hi) / 2
    return [mid - span / 2, mid + span / 2]


#: vertical room per leaf of the growth tree, in pixels: a label (9 px font) and the biggest marker fit
_LEAF_PX = 34


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
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>", textposition="middle right",
        text=["-".join(map(str, n.hidden)) + (f" {_INIT_TAG.get(n.init, n.init)}" if n.init not in ("-", "") else "")
              for n in tree.nodes],
        textfont={"size": 9, "color": "#333"},
        marker={"color": [n.val for n in tree.nodes], "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": {"text": "val"}},
                "size": [8 + 16 * math.sqrt(n.params / biggest) for n in tree.nodes],
                "line": {"color": ["#d62728" if n.best else "#333" for n in tree.nodes],
                         "width": [3 if n.best else 0.5 for n in tree.nodes]}},
    ))
    # labels sit right of their node: one leaf row each, and room for the deepest labels on the right
    leaves = max((n.y for n in tree.nodes), default=0) + 1
    depth = max((n.x for n in tree.nodes), default=0)
    fig.update_layout(title=f"Growth tree: {_txt(tree.label)}", xaxis_title="depth (growth steps)",
                      height=int(max(460, 110 + _LEAF_PX * leaves)),
                      legend={"orientation": "h", "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},
                      yaxis={"showticklabels": False, "title": "", "range": [-0.7, leaves - 0.3]},
                      margin={"t": 50, "l": 40, "r": 20, "b": 40})
    fig.update_xaxes(dtick=1, range=[-0.3, depth + 0.9])
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
                    x=xs, y=c.best_val, mode="lines+markers", line_shape="hv", name=_txt(label), legendgroup=label,
                    showlegend=(i == 0 and col == 1), line={"color": colors[label]}, marker={"size": 4},
                    customdata=c.trials, hovertemplate=f"{_txt(c.study)}<br>trial %{{customdata}}<br>best val %{{y:.4f}}<extra></extra>",
                ), row=1, col=col)
    known = [t for t in targets if t is not None]
    if known:
        fig.add_hline(y=statistics.fmean(known), line_dash="dot", line_color="#555", row=1, col=1,  # type: ignore[arg-type]
                      annotation_text="target")
        fig.add_hline(y=statistics.fmean(known), line_dash="dot", line_color="#555", row=1, col=2)  # type: ignore[arg-type]
    fig.update_xaxes(type="log", dtick="D2", tickformat="~s", exponentformat="SI", title_text="training FLOPs",
                     row=1, col=1)  # ticks at 1, 2, 5 x 10^k, labelled 2G, 5G, 10G
    fig.update_xaxes(title_text="training seconds", row=1, col=2)
    fig.update_yaxes(title_text="best validation metric so far", row=1, col=1,
                     range=metric_range([v for cs in groups.values() for c in cs for v in c.best_val] + list(known)))
    fig.update_layout(title="Best-so-far metric vs compute", height=440, margin={"t": 70, "l": 60, "r": 20, "b": 40})
    return fig


def draw_pareto(points: dict[str, list[Point]]) -> Any:
    import plotly.graph_objects as go

    colors = _colors(list(points))
    fig = go.Figure()
    for label, pts in points.items():
        fig.add_trace(go.Scatter(
            x=[p.params for p in pts], y=[p.val for p in pts], mode="markers", name=_txt(label), legendgroup=label,
            marker={"color": colors[label], "opacity": 0.35, "size": 6}, customdata=[p.depth for p in pts],
            hovertemplate="%{x:,} params<br>val %{y:.4f}<br>depth %{customdata}<extra>" + _txt(label) + "</extra>",
        ))
        front = pareto_front(pts)
        fig.add_trace(go.Scatter(
            x=[p.params for p in front], y=[p.val for p in front], mode="lines+markers", line_shape="hv",
            name=f"{_txt(label)} front", legendgroup=label, showlegend=False, line={"color": colors[label], "width": 2},
            marker={"size": 8}, hovertemplate="front: %{x:,} params, val %{y:.4f}<extra></extra>",
        ))
    fig.update_layout(title="Pareto front: validation metric vs parameters (all evaluated nodes)", height=440,
                      xaxis={"title": "parameters", "type": "log", "dtick": "D2", "tickformat": "~s"},
                      yaxis={"title": "validation metric", "range": metric_range([p.val for ps in points.values() for p in ps])},
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
            x=[p.depth + off for p in pts], y=[p.val for p in pts], mode="markers", name=_txt(label), legendgroup=label,
            marker={"color": colors[label], "opacity": 0.45, "size": 6},
            hovertemplate="val %{y:.4f}<extra>" + _txt(label) + "</extra>",
        ))
        best: dict[int, float] = {}
        for p in pts:
            best[p.depth] = max(best.get(p.depth, -math.inf), p.val)
        depths = sorted(best)
        fig.add_trace(go.Scatter(x=depths, y=[best[d] for d in depths], mode="lines", legendgroup=label,
                                 showlegend=False, line={"color": colors[label]}, hoverinfo="skip"))
    fig.update_layout(title="Validation metric vs depth (line: best per depth)", height=420,
                      xaxis={"title": "depth (growth steps)", "dtick": 1},
                      yaxis={"title": "validation metric", "range": metric_range([p.val for ps in points.values() for p in ps])},
                      margin={"t": 50, "l": 60, "r": 20, "b": 40})
    return fig


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
                                 name=f"{_txt(d.label)}: objective", marker={"color": colors[d.label], "size": 6}))
        fig.add_trace(go.Scatter(x=[t.number for t in done], y=best, mode="lines", line_shape="hv",
                                 name=f"{_txt(d.label)}: best so far", line={"color": colors[d.label]}))
    values = [float(t.value) for d in datas for t in d.trials if t.state == "COMPLETE" and t.value is not None]
    fig.update_layout(height=440, xaxis_title="trial",
                      yaxis={"title": "objective value (validation metric)", "range": metric_range(values)},
                      margin={"t": 40, "l": 60, "r": 20, "b": 40})
    return fig


def _importances(d: StudyData) -> tuple[dict[str, float], str] | None:
    """Parameter importances from Optuna's default evaluator: the values the finalize stage stored,
    while no trial finished since; else computed now (the one place `report` imports Optuna)."""
    cached = (d.final or {}).get("importances")
    if cached and cached.get("after_trials") == d.n_finished:
        return dict(cached["values"]), str(cached["evaluator"])
    import optuna

    from ..search.importance import default_evaluator, param_importances
    from ..search.storage import open_storage

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
        fig = go.Figure(go.Bar(x=[values[k] for k in names], y=[_txt(k) for k in names], orientation="h",
                               text=[f"{values[k]:.2f}" for k in names], textposition="outside"))
        fig.update_layout(title=f"Parameter importances: {_txt(d.label)}", height=360, xaxis_title="importance",
                          margin={"t": 50, "l": 120, "r": 40, "b": 40})
        figs.append(Figure(f"Parameter importances: {d.label}", f"Importances of the sampled path parameters for "
                           f"the trial value, from Optuna's default evaluator ({evaluator}), the one "
                           "optuna-dashboard shows.", fig))
    return figs, notes


def build_report(
    groups: dict[str, list[StudyData]], rows: Sequence[SummaryRow] | None = None, margin: float = DEFAULT_MARGIN,
) -> tuple[list[SummaryRow], list[Figure], list[str]]:
    """Rows, figures and notes for ``groups`` (label -> one StudyData per seed). Trees and importances
    use each label's first seed."""
    curves = {label: [best_so_far(d) for d in ds] for label, ds in groups.items()}
    rows = list(rows) if rows is not None else summary_rows(
        curves, margin, {label: [d.final for d in ds] for label, ds in groups.items()}, policies_of(groups))
    targets = seed_targets(curves, margin)
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
                           "validation metric, sized by parameters; the red path leads to the delivered architecture (the node it was "
                           "finalized from; before finalizing, the best node). Hover for step, init, "
                           "metric and compute." + (" Scratch nodes inherit nothing, so they have no edges."
                                                    if d.setup.policy == "scratch" else ""), draw_tree(tree)))
    opt_figs, notes = _optuna_figures(firsts)
    return rows, figs + opt_figs, notes
