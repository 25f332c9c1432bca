"""Reports: what studies did, computed as plain data (``data``, ``metrics``), drawn (``figures``) and
written as one self-contained HTML page (``page``); ``compare`` runs policies over seeds."""

from __future__ import annotations

from .data import (
    DEFAULT_MARGIN,
    Curve,
    DrawnNode,
    Point,
    StudyData,
    TreeData,
    best_at_compute,
    best_so_far,
    by_policy,
    compute_to_target,
    load_study_data,
    node_points,
    pareto_front,
    policies_of,
    tree_data,
)
from .figures import Figure, build_report
from .metrics import Answer, SummaryRow, answer, summary_rows, verdict
from .page import render_html, write_report

__all__ = [
    "DEFAULT_MARGIN", "Answer", "Curve", "Figure", "Point", "StudyData", "SummaryRow", "TreeData", "DrawnNode", "answer",
    "best_at_compute", "best_so_far", "build_report", "by_policy", "compute_to_target", "load_study_data",
    "node_points", "pareto_front", "policies_of", "render_html", "summary_rows", "tree_data", "verdict",
    "write_report",
]
