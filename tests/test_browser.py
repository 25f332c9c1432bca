"""The HTML report in a real headless Chromium, offline: every figure renders and no JavaScript error is logged.

Chromium loads a copy of the report with a probe script injected first in <head>. The probe
records window errors, unhandled rejections and console.error calls, and after load it marks
which figure divs became Plotly plots with an SVG inside. ``--dump-dom`` prints the DOM back.
Name resolution is mapped to nothing, so any CDN fetch would fail and show up as an error.

Without Chromium the test skips, visibly; with ``DILS_REQUIRE_CHROMIUM=1`` (CI) it fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import tiny_config

from dils_search.cli import main
from dils_search.search.study import run_study

pytestmark = pytest.mark.slow

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
    "--virtual-time-budget=20000", "--dump-dom",
]

PROBE = """<script>(function(){
var errors=[];var root=document.documentElement;root.setAttribute('data-js-errors','[]');
function record(m){errors.push(String(m));root.setAttribute('data-js-errors',JSON.stringify(errors));}
window.addEventListener('error',function(e){record('error: '+(e.message||('failed to load '+((e.target&&(e.target.src||e.target.href))||e.type))));},true);
window.addEventListener('unhandledrejection',function(e){record('unhandled rejection: '+((e.reason&&e.reason.message)||e.reason));});
var ce=console.error;console.error=function(){record('console.error: '+Array.prototype.join.call(arguments,' '));return ce.apply(console,arguments);};
window.addEventListener('load',function(){setTimeout(function(){
  var divs=document.querySelectorAll('div[id^="dils-fig-"]');var ok=[],bad=[];
  for(var i=0;i<divs.length;i++){var d=divs[i];
    var fine=d.classList.contains('js-plotly-plot')&&d.querySelector('svg.main-svg')&&d._fullLayout;
    (fine?ok:bad).push(d.id);}
  root.setAttribute('data-rendered',String(ok.length));root.setAttribute('data-not-rendered',JSON.stringify(bad));
  root.setAttribute('data-probe-done','1');},2000);});
})();</script>"""


def chromium() -> str | None:
    return os.environ.get("DILS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser() -> str:
    path = chromium()
    if path is None:
        if os.environ.get("DILS_REQUIRE_CHROMIUM") == "1":
            pytest.fail("DILS_REQUIRE_CHROMIUM=1 but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed: the browser check of the HTML report did not run")
    return path


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root: dict[str, str | None] = {}
        self.plots = 0
        self.svgs = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "html":
            self.root = a
        self.plots += "js-plotly-plot" in classes
        self.svgs += tag == "svg" and "main-svg" in classes


class Rendered(NamedTuple):
    expected: int
    rendered: int
    not_rendered: list[str]
    plots: int
    svgs: int
    errors: list[str]
    console: list[str]
    probe_done: bool


def render(browser: str, html: Path, work: Path) -> Rendered:
    """Open ``html`` (with the probe injected) in headless Chromium and read back what happened."""
    text = html.read_text(encoding="utf-8")
    expected = int(re.search(r'data-figures="(\d+)"', text).group(1))  # type: ignore[union-attr]
    page = work / "probed.html"
    page.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    proc = subprocess.Popen(
        [browser, *FLAGS, f"--user-data-dir={work / 'profile'}", page.resolve().as_uri()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the browser and the helpers it started, nothing else
        proc.communicate()
        pytest.fail(f"chromium did not finish rendering {html} within 180 s")
    dom = _Dom()
    dom.feed(out)
    r = dom.root
    console = [line for line in err.splitlines() if "CONSOLE" in line and re.search(r"error|uncaught", line, re.I)]
    return Rendered(
        expected=expected, rendered=int(r.get("data-rendered") or 0),
        not_rendered=json.loads(r.get("data-not-rendered") or "[]"), plots=dom.plots, svgs=dom.svgs,
        errors=json.loads(r.get("data-js-errors") or '["probe never ran"]'), console=console,
        probe_done=r.get("data-probe-done") == "1",
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("browser")
    url, art = f"sqlite:///{root / 'b.db'}", str(root / "art")
    run_study(tiny_config(search={"n_trials": 4}), url, art, "grow", progress=False)
    run_study(tiny_config(search={"n_trials": 2, "policy": "scratch"}), url, art, "scratch", progress=False)
    out = root / "report.html"
    assert main(["report", "--storage", url, "--study-name", "grow", "--study-name", "scratch", "--out", str(out)]) == 0
    return out


def test_every_figure_renders_offline_without_js_errors(browser: str, report: Path, tmp_path: Path) -> None:
    r = render(browser, report, tmp_path)
    assert r.probe_done, "the page never finished loading"
    assert r.errors == [] and r.console == [], (r.errors, r.console)
    assert r.expected >= 6
    assert (r.rendered, r.plots) == (r.expected, r.expected), r.not_rendered
    assert r.svgs >= r.expected


def test_the_check_catches_a_broken_report(browser: str, tmp_path: Path) -> None:
    """Control: a figure whose plotly.js never loads (here: a CDN script, unreachable) must fail the check."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><script src="https://cdn.plot.ly/plotly-3.0.0.min.js">'
        '</script></head><body data-figures="1"><div id="dils-fig-0"></div>'
        "<script>Plotly.newPlot('dils-fig-0', [{y: [1, 2]}]);</script></body></html>"
    )
    r = render(browser, page, tmp_path)
    assert r.probe_done and r.rendered == 0 and r.plots == 0 and r.not_rendered == ["dils-fig-0"]
    assert any("Plotly is not defined" in e for e in r.errors), r.errors
    assert any("failed to load https://cdn.plot.ly" in e for e in r.errors), r.errors




def test_the_compare_report_renders_every_figure(browser: str, tmp_path: Path) -> None:
    """``dils-search compare`` writes the same report for all its policies; it must pass the same check."""
    from test_compare import _write_config

    torch.set_num_threads(1)
    config = _write_config(tmp_path / "cmp.toml", n_trials=2)
    out = tmp_path / "out"
    assert main(["compare", str(config), "--out", str(out), "--storage", f"sqlite:///{tmp_path / 'c.db'}",
                 "--artifacts", str(tmp_path / "art"), "--quiet"]) == 0
    r = render(browser, out / "report.html", tmp_path)
    assert r.probe_done, "the page never finished loading"
    assert r.errors == [] and r.console == [], (r.errors, r.console)
    assert r.expected >= 6
    assert (r.rendered, r.plots) == (r.expected, r.expected), r.not_rendered


def _dom(browser: str, page: str, work: Path) -> str:
    proc = subprocess.Popen([browser, *FLAGS, f"--user-data-dir={work / 'profile2'}", page], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish rendering {page} within 180 s")
    return out


def test_the_answer_block_holds_the_recommended_architecture(browser: str, report: Path, tmp_path: Path) -> None:
    """At the top of the report: how deep (the delivered model's widths), its test metric, what growing saved."""
    from dils_search.search.summary import summarize

    dom = _dom(browser, report.resolve().as_uri(), tmp_path)
    block = re.search(r'<section id="answer">(.*?)</section>', dom, re.S)
    assert block is not None, "no answer block in the rendered page"
    text = block.group(1)
    s = summarize(f"sqlite:///{report.parent / 'b.db'}", "grow")
    assert s.final is not None
    assert f"hidden {s.final['hidden']}" in text and f"test {s.final['test_metric']:.4f}" in text
    assert "to train every evaluated node from scratch" in text
    assert dom.index('id="answer"') < dom.index("<h2>Summary</h2>")  # before everything else


OVERLAPS = """<script>window.addEventListener('load',function(){setTimeout(function(){
  var out=[];var divs=document.querySelectorAll('div[id^="dils-fig-"]');
  for(var i=0;i<divs.length;i++){var d=divs[i];var t=d._fullLayout&&d._fullLayout.title&&d._fullLayout.title.text;
    if(!t||t.indexOf('Growth tree')!==0)continue;
    var r=[].map.call(d.querySelectorAll('g.textpoint text'),function(e){var b=e.getBoundingClientRect();
      return {s:e.textContent,l:b.left,r:b.right,t:b.top,b:b.bottom};}).filter(function(b){return b.r>b.l;});
    var bad=[];for(var a=0;a<r.length;a++)for(var c=a+1;c<r.length;c++){var p=r[a],q=r[c];
      if(Math.min(p.r,q.r)-Math.max(p.l,q.l)>0.5&&Math.min(p.b,q.b)-Math.max(p.t,q.t)>0.5)bad.push(p.s+' / '+q.s);}
    out.push({id:d.id,labels:r.length,overlaps:bad});}
  document.documentElement.setAttribute('data-label-overlaps',JSON.stringify(out));},2500);});</script>"""


def test_tree_labels_do_not_overlap_on_a_30_trial_study(browser: str, tmp_path: Path) -> None:
    """The growth tree of a 30-trial study, rendered in headless Chromium: no two node labels overlap."""
    from dils_search.report.data import load_study_data, tree_data

    torch.set_num_threads(1)
    url, art = f"sqlite:///{tmp_path / 't.db'}", str(tmp_path / "art")
    search = {"n_trials": 30, "max_steps": 3, "widths": [8, 64, 256], "inits": ["dils-analytic", "identity", "dils-approx"]}
    run_study(tiny_config(search=search), url, art, "thirty", progress=False)  # the shape of studies/digits-mlp.toml
    out = tmp_path / "r.html"
    assert main(["report", "--storage", url, "--study-name", "thirty", "--out", str(out)]) == 0
    nodes = len(tree_data(load_study_data(url, "thirty")).nodes)
    assert nodes >= 15  # a bushy tree: many labels at each depth
    page = tmp_path / "overlaps.html"
    page.write_text(out.read_text(encoding="utf-8").replace("<head>", "<head>" + OVERLAPS, 1), encoding="utf-8")
    dom = _dom(browser, page.resolve().as_uri(), tmp_path)
    found = re.search(r'data-label-overlaps="([^"]*)"', dom)
    assert found is not None, "the overlap probe never ran"
    trees = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(trees) == 1 and trees[0]["labels"] == nodes, trees
    assert trees[0]["overlaps"] == [], trees[0]["overlaps"][:10]
