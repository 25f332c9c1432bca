"""One self-contained HTML page: plotly.js is embedded once, so the report opens offline (no CDN)."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..core.spec import flops_text

if TYPE_CHECKING:
    pass
from .data import DEFAULT_MARGIN, StudyData
from .figures import Figure, build_report
from .metrics import Answer, SummaryRow, _num, answer, verdict


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
        delivered = a.flops_spent + a.final_flops
        if a.budget:
            saved += (f"; budget {flops_text(a.budget)}, spent {flops_text(delivered)} up to the "
                      f"{'delivered model' if a.finalized else 'search so far'} ({100 * delivered / a.budget:.0f}%)")
        items.append(
            f'<li data-study="{html.escape(a.study)}"><b>{html.escape(a.label)}</b>: recommended architecture '
            f'<b class="hidden">hidden {html.escape(str(a.hidden))}</b> ({len(a.hidden)} hidden layers, '
            f"{a.params:,} parameters); {what}: validation {a.val:.4f}, <b>test {a.test:.4f}</b>{before}; "
            f"{html.escape(saved)}.</li>")
    return f'<section id="answer"><h2>Answer</h2><ul>{"".join(items)}</ul></section>' if items else ""


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
