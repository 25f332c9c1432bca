"""Figure data of the report (tree, best-so-far curve, Pareto front, compute to target) and its HTML."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config

from dils_search.cli import main
from dils_search.report import (
    Curve,
    Point,
    StudyData,
    SummaryRow,
    best_at_compute,
    best_so_far,
    compute_to_target,
    load_study_data,
    node_points,
    pareto_front,
    summary_rows,
    tree_data,
    verdict,
    write_report,
)
from dils_search.search.study import run_study


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two real studies in one SQLite file: optuna (growing) and scratch, sharing nothing but the data."""
    torch.set_num_threads(1)  # module fixtures run before conftest's autouse one
    root = tmp_path_factory.mktemp("report")
    url, art = f"sqlite:///{root / 'r.db'}", str(root / "art")
    run_study(tiny_config(search={"n_trials": 5}), url, art, "grow", progress=False)
    run_study(tiny_config(search={"n_trials": 3, "policy": "scratch"}), url, art, "scratch", progress=False)
    return url, art


@pytest.fixture(scope="module")
def grow_data(studies: tuple[str, str]) -> StudyData:
    return load_study_data(studies[0], "grow")


def test_best_so_far_is_monotone_and_charges_each_node_once(grow_data: StudyData) -> None:
    c = best_so_far(grow_data)
    assert c.trials == [t.number for t in grow_data.trials] and len(c.trials) == 5
    for series in (c.best_val, c.flops, c.seconds, c.nodes):
        assert all(b >= a for a, b in zip(series, series[1:], strict=False))
    used = {k for t in grow_data.trials for k in t.user_attrs["node_keys"]}
    assert c.flops[-1] == sum(grow_data.nodes[k].own_flops for k in used)
    assert c.nodes[-1] == len(used)
    all_vals = [grow_data.nodes[k].metrics["val_metric"] for k in used]
    assert c.best_val[-1] == max(all_vals)
    best = grow_data.nodes[c.best_key[-1]].metrics
    assert (c.best_test[-1], c.best_params[-1]) == (best["test_metric"], best["params"])


def test_compute_to_target() -> None:
    c = Curve("a", "s", [0, 1, 2], [10.0, 20.0, 30.0], [1.0, 2.0, 3.0], [0.5, 0.7, 0.7], [0.5, 0.6, 0.6], [1, 2, 2],
              ["k", "k2", "k2"], [1, 2, 2])
    assert compute_to_target(c, 0.5) == (10.0, 1.0)
    assert compute_to_target(c, 0.6) == (20.0, 2.0)
    assert compute_to_target(c, 0.7) == (20.0, 2.0)
    assert compute_to_target(c, 0.71) == (None, None)
    assert [best_at_compute(c, f) for f in (5, 10, 19.9, 20, 1e9)] == [None, 0.5, 0.5, 0.7, 0.7]


def test_tree_data_is_a_tree_with_the_best_path_marked(grow_data: StudyData) -> None:
    tree = tree_data(grow_data)
    nodes = {n.key: n for n in tree.nodes}
    assert len(nodes) == len(tree.nodes) == len({k for t in grow_data.trials for k in t.user_attrs["node_keys"]})
    roots = [n for n in tree.nodes if n.parent is None]
    assert len(roots) == 1 and roots[0].depth == 0 and roots[0].step == "base"
    for parent, child, _ in tree.edges:
        assert nodes[child].depth == nodes[parent].depth + 1 and nodes[child].x == nodes[child].depth
    assert len(tree.edges) == len(tree.nodes) - 1
    # the best path runs from the node the delivered model was finalized from back to the root, and
    # only its edges are highlighted
    assert grow_data.final is not None and tree.best_key == grow_data.final["from_node"]
    path, k = [], tree.best_key
    while k is not None:
        path.append(k)
        k = nodes[k].parent
    assert {n.key for n in tree.nodes if n.best} == set(path)
    assert {(p, c) for p, c, best in tree.edges if best} == set(zip(path[1:], path[:-1], strict=True))
    leaves = [n for n in tree.nodes if not any(p == n.key for p, _, _ in tree.edges)]
    assert len({n.y for n in leaves}) == len(leaves)


def test_scratch_tree_has_no_inherited_edges(studies: tuple[str, str], tmp_path: Path) -> None:
    tree = tree_data(load_study_data(studies[0], "scratch"))
    assert tree.edges == [] and all(n.mode == "scratch" and n.init == "scratch" for n in tree.nodes)
    # even when one candidate's path is a prefix of another's, nothing was inherited between them
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_study(tiny_config(search={"policy": "scratch", "n_trials": 2, "max_steps": 3, "positions": "last", "widths": [8],
                                  "inits": ["dils-analytic"]}), url, str(tmp_path / "art"), "s", progress=False)
    data = load_study_data(url, "s")
    assert any(r.parent_key in data.nodes for r in data.nodes.values())
    tree = tree_data(data)
    assert tree.edges == [] and all(n.parent is None for n in tree.nodes)
    assert len({n.y for n in tree.nodes}) == len(tree.nodes)


def test_pareto_front_is_non_dominated(grow_data: StudyData) -> None:
    pts = node_points(grow_data)
    front = pareto_front(pts)
    assert front and [p.params for p in front] == sorted(p.params for p in front)
    for p in front:
        assert not any(q.params <= p.params and q.val >= p.val and (q.params, q.val) != (p.params, p.val) for q in pts)
    for q in pts:  # everything off the front is dominated by something on it
        if q not in front:
            assert any(p.params <= q.params and p.val >= q.val for p in front)
    hand = [Point("a", k, 0, n, v, v) for k, n, v in [("a", 10, 0.5), ("b", 20, 0.5), ("c", 20, 0.7), ("d", 5, 0.4),
                                                       ("e", 30, 0.6)]]
    assert [p.key for p in pareto_front(hand)] == ["d", "a", "c"]


def _curve(label: str, study: str, vals: list[float], flops: list[float]) -> Curve:
    n = len(vals)
    return Curve(label, study, list(range(n)), flops, [f / 10 for f in flops], vals, vals, [100] * n, ["k"] * n,
                 list(range(1, n + 1)))


def test_summary_rows_targets_per_seed_and_null_when_not_reached() -> None:
    groups = {
        "optuna/dils-analytic": [_curve("o", "o0", [0.6, 0.8], [10, 20]), _curve("o", "o1", [0.7, 0.9], [10, 30])],
        "scratch": [_curve("s", "s0", [0.5, 0.797], [40, 80]), _curve("s", "s1", [0.8, 0.85], [50, 90])],
    }
    rows = {r.policy: r for r in summary_rows(groups, margin=0.005)}
    o, s = rows["optuna/dils-analytic"], rows["scratch"]
    assert o.target == pytest.approx((0.795 + 0.895) / 2)
    assert (o.target_reached, o.flops_to_target, o.seconds_to_target) == (2, 25.0, 2.5)
    assert s.target_reached == 1 and s.flops_to_target is None and s.seconds_to_target is None  # seed 1 missed
    assert o.best_val == pytest.approx(0.85) and o.best_val_std == pytest.approx(0.0707107, rel=1e-5)
    assert (o.total_flops, o.params, o.trials, o.studies) == (25.0, 100.0, 4, ["o0", "o1"])
    assert o.scratch_at_equal_flops is None and s.scratch_at_equal_flops is None  # scratch's first trial cost more
    cheap = {**groups, "scratch": [_curve("s", "s0", [0.5, 0.6], [5, 80]), _curve("s", "s1", [0.7, 0.8], [20, 90])]}
    assert summary_rows(cheap)[0].scratch_at_equal_flops == pytest.approx((0.5 + 0.7) / 2)
    with pytest.raises(ValueError, match="margin"):
        summary_rows(groups, margin=-1)


def _row(policy: str, test: float, flops: float | None) -> SummaryRow:
    return SummaryRow(policy, 1, test, None, test, None, 0.8, int(flops is not None), flops, flops, 1.0, 1.0, 10.0, 3, 3,
                      [policy])


def test_verdict_says_when_growth_loses_to_scratch() -> None:
    lines = verdict([_row("optuna/dils-analytic", 0.80, None), _row("optuna/identity", 0.90, 5.0),
                     _row("scratch", 0.85, 10.0)])
    assert "optuna/identity (0.9000" in lines[0]
    assert any(line.startswith("optuna/dils-analytic does not beat scratch: test metric -5.00 pp") for line in lines)
    assert any(line.startswith("optuna/identity beats scratch") and "0.50x" in line for line in lines)
    assert "no scratch baseline" in verdict([_row("optuna", 0.8, 1.0)])[1]
    ahead = _row("optuna/identity", 0.80, None)
    ahead.scratch_at_equal_flops = 0.7
    assert "it was ahead of scratch on validation (0.8000 vs 0.7000" in verdict([ahead, _row("scratch", 0.85, 10.0)])[1]


def test_report_html_is_self_contained(studies: tuple[str, str], tmp_path: Path) -> None:
    url, _ = studies
    groups = {n: [load_study_data(url, n)] for n in ("grow", "scratch")}
    out = tmp_path / "r.html"
    rows, n_figs = write_report(str(out), groups, "t")
    text = out.read_text()
    assert int(re.search(r'data-figures="(\d+)"', text).group(1)) == n_figs  # type: ignore[union-attr]
    assert len(re.findall(r'<div id="dils-fig-\d+"', text)) == n_figs
    # curves, Pareto, depth, 2 trees, Optuna history, importances of the optuna study (scratch varies too)
    assert n_figs >= 6
    assert not re.search(r"<(script|link)[^>]+(src|href)=", text)  # nothing fetched (the browser test blocks the network)
    assert text.count("plotly.js v") >= 1 and len(text) > 3_000_000  # the library itself is inlined
    assert "Growth tree: grow" in text and "Scratch nodes inherit nothing" in text
    assert [r.policy for r in rows] == ["grow", "scratch"]


def test_importances_are_skipped_with_a_note_when_they_do_not_fit(tmp_path: Path) -> None:
    url, art = f"sqlite:///{tmp_path / 'one.db'}", str(tmp_path / "art")
    run_study(tiny_config(search={"n_trials": 1, "max_steps": 1, "inits": ["dils-analytic"], "widths": [8],
                                  "positions": "last"}), url, art, "one", progress=False)
    out = tmp_path / "one.html"
    _, n_figs = write_report(str(out), {"one": [load_study_data(url, "one")]}, "one")
    text = out.read_text()
    assert "no parameter importances" in text and "Parameter importances" not in text
    assert n_figs == 5  # curves, Pareto, depth, tree, history


def test_report_cli(studies: tuple[str, str], tmp_path: Path, capsys: Any) -> None:
    url, _ = studies
    out = tmp_path / "cli.html"
    assert main(["report", "--storage", url, "--study-name", "grow", "--study-name", "scratch", "--out", str(out)]) == 0
    assert out.is_file() and "2 studies" in capsys.readouterr().out
    assert main(["report", "--storage", url, "--study-name", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study-name='nope'" in err and "grow" in err
    assert main(["report", "--storage", url, "--study-name", "grow", "--margin", "-1"]) == 2
    assert "argument --margin: '-1' is out of range; allowed: >= 0" in capsys.readouterr().err


def test_cli_margin_default_matches_the_report() -> None:
    from dils_search.cli.report import DEFAULT_MARGIN_PP
    from dils_search.report import DEFAULT_MARGIN

    assert DEFAULT_MARGIN_PP == pytest.approx(100 * DEFAULT_MARGIN)


def test_report_imports_no_torch_and_uses_the_stored_importances(studies: tuple[str, str], tmp_path: Path) -> None:
    """`report` reads the study with plain SQL; on a finished study the importances come from its
    finalize stage (Optuna's default evaluator), so neither torch nor Optuna's importance module loads."""
    import subprocess
    import sys

    url, _ = studies
    out = tmp_path / "r.html"
    code = ("import sys; from dils_search.cli import main; "
            "rc = main(['report', '--storage', sys.argv[1], '--study-name', 'grow', '--out', sys.argv[2]]); "
            "print(sorted(m for m in ('torch', 'optuna.importance', 'sklearn') if m in sys.modules), file=sys.stderr); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, url, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
    html = out.read_text(encoding="utf-8")
    assert 'id="answer"' in html and "Parameter importances: optuna" in html and "ImportanceEvaluator)" in html


def test_the_red_path_ends_at_the_delivered_architecture(grow_data: StudyData) -> None:
    """The answer block recommends the delivered model's architecture; the tree's red path leads there,
    even when the search's best node (by validation before finalizing) is another one."""
    import dataclasses

    best = best_so_far(grow_data).best_key[-1]
    other = next(k for t in grow_data.trials for k in t.user_attrs["node_keys"] if k != best and grow_data.nodes[k].depth)
    data = dataclasses.replace(grow_data, final={**(grow_data.final or {}), "from_node": other})
    tree = tree_data(data)
    nodes = {n.key: n for n in tree.nodes}
    assert tree.best_key == other and {n.key for n in tree.nodes if n.best} == _ancestors(nodes, other)
    assert nodes[best].best == (best in _ancestors(nodes, other))
    unfinalized = tree_data(dataclasses.replace(grow_data, final=None))  # before finalizing: the best node
    assert unfinalized.best_key == best


def _ancestors(nodes: dict[str, Any], key: str | None) -> set[str]:
    out = set()
    while key is not None:
        out.add(key)
        key = nodes[key].parent
    return out


def test_metric_axes_have_a_minimum_span(grow_data: StudyData) -> None:
    from dils_search.report.figures import MIN_SPAN, draw_curves, draw_depth, metric_range

    lo, hi = metric_range([0.9274, 0.9286])  # the flat history of the issue: not a plot of noise
    assert hi - lo == pytest.approx(MIN_SPAN * 0.9286) and lo < 0.9274 and hi > 0.9286
    lo, hi = metric_range([0.5, 0.9])  # a real spread keeps its own range
    assert lo == pytest.approx(0.48) and hi == pytest.approx(0.92)
    assert metric_range([]) is None
    flat = Curve("a", "s", [0, 1], [1.0, 2.0], [1.0, 2.0], [0.9274, 0.9286], [0.9, 0.9], [1, 1], ["k", "k"], [1, 1])
    y = draw_curves({"a": [flat]}, []).layout.yaxis.range
    assert y[1] - y[0] >= MIN_SPAN * 0.9
    points = {"a": node_points(grow_data)[:1]}
    y = draw_depth(points).layout.yaxis.range
    assert y[1] - y[0] >= MIN_SPAN * 0.1
