"""What studies did, as plain data: a study read back from storage, its best-so-far curve, its growth
tree and its nodes' points. Compute is charged honestly per study: a node costs its own training
FLOPs and seconds the first time a study uses it, whoever trained it. Reuse within a study is free,
which is the point of growing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ..search.attrs import NODE_KEYS
from ..store import LineageStore, NodeRecord

if TYPE_CHECKING:
    from ..config import StudyConfig
    from ..search.storage import StoredTrial


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
    from ..search.storage import FINISHED_STATES, read_study, study_config

    stored_study = read_study(url, name)  # plain SQL: `report` imports neither torch nor Optuna for this
    cfg, stored = study_config(url, name, stored_study)
    finished = [t for t in stored_study.trials if t.state in FINISHED_STATES]
    trials = [t for t in finished if t.user_attrs.get(NODE_KEYS)]
    keys = sorted({k for t in trials for k in t.user_attrs[NODE_KEYS]})
    store = LineageStore(url, artifacts or stored, create=False)
    try:
        nodes = {r.key: r for r in store.nodes(keys) if r.status == "ready"}
    finally:
        store.close()
    return StudyData(name, label or name, cfg, stored_study.user_attrs, stored_study.directions, trials, nodes,
                     stored_study.final, url, len(finished))


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
        for key in t.user_attrs[NODE_KEYS]:
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


def seed_targets(groups: dict[str, list[Curve]], margin: float) -> list[float | None]:
    """Target of seed i: the best final validation metric of any label on seed i minus ``margin``."""
    n_seeds = max((len(v) for v in groups.values()), default=0)
    ends = [[c[i].best_val[-1] for c in groups.values() if len(c) > i and c[i].best_val] for i in range(n_seeds)]
    return [max(e) - margin if e else None for e in ends]


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
    keys = list(dict.fromkeys(k for t in data.trials for k in t.user_attrs[NODE_KEYS] if k in data.nodes))
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
    delivered = (data.final or {}).get("from_node")  # the path ends where the answer block's architecture is
    if delivered in recs:
        best_key = delivered
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


class Point(NamedTuple):
    label: str
    key: str
    depth: int
    params: int
    val: float
    test: float


def node_points(data: StudyData) -> list[Point]:
    """Every node the study's trials evaluated, once."""
    keys = dict.fromkeys(k for t in data.trials for k in t.user_attrs[NODE_KEYS] if k in data.nodes)
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
