"""Budget in, best model out: the delivered DILS model against the plain network at the same compute.

For a study config, runs ``dils-search compare``'s machinery (``report/compare.py``) with two entries,
``optuna``/dils-analytic and ``plain`` (the family's usual size: 256x256 MLP, or 3x32 conv), on
``--seeds`` seeds, with ``search.budget_flops`` set to ``--plain-epochs`` epochs of the plain network
(what a user would spend training it by hand). ``--share`` and ``--top-k`` override ``[final]``.
``--scratch`` adds the scratch baseline without a budget (then the budget is not set at all and the
plain network trains for the growing policy's delivered compute).

    python scripts/bench_budget.py studies/digits-mlp.toml --plain-epochs 30 --seeds 3 --out /tmp/bb/digits

Prints one JSON object per policy (the summary row: ``final_test``, ``delivered_flops`` ... over the
seeds, with the per-seed values) and a last one with the verdict and the budget; writes
``results.json`` and ``budget.html`` (delivered test per seed, per policy) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--plain-epochs", type=float, default=30.0, help="budget = this many epochs of the plain network")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--share", type=float, default=None, help="final.share (default: the config's)")
    p.add_argument("--top-k", type=int, default=None, help="final.top_k (default: the config's)")
    p.add_argument("--n-trials", type=int, default=500, help="a cap the budget should reach first")
    p.add_argument("--data-path", default=None, help="data.dataset='file' with this .npz (e.g. digits784.npz)")
    p.add_argument("--scratch", action="store_true", help="no budget: dils-analytic, scratch and plain (at dils's compute)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import torch

    from dils_search.config import PLAIN_HIDDEN, load_config
    from dils_search.report import verdict
    from dils_search.report.compare import delivered_flops, run_compare, summarize_compare
    from dils_search.search.budget import epoch_flops
    from dils_search.search.trainers import make_task

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(a.config)
    if a.data_path:
        cfg = cfg.replace(data={"dataset": "file", "path": str(Path(a.data_path).resolve())})
    final = {k: v for k, v in (("share", a.share), ("top_k", a.top_k)) if v is not None}
    entries = [{"policy": "optuna", "init": "dils-analytic"}, {"policy": "plain"}]
    if a.scratch:
        entries.insert(1, {"policy": "scratch", "init": "random", "label": "scratch"})
    cfg = cfg.replace(compare=entries, final=final, search={"n_trials": a.n_trials if not a.scratch else cfg.search.n_trials})
    plain = make_task(cfg.replace(model={"hidden": PLAIN_HIDDEN[cfg.model.kind]}), "cpu")
    budget = 0.0 if a.scratch else a.plain_epochs * epoch_flops(plain.base, plain.data.size("train"))
    cfg = cfg.replace(search={"budget_flops": budget})  # 0 with --scratch: no budget, whatever the config says
    url = f"sqlite:///{out / 'study.db'}"
    start = time.perf_counter()
    groups = run_compare(cfg, url, str(out / "art"), seeds=a.seeds, progress=False)
    rows, datas = summarize_compare(url, groups, str(out / "art"))
    result: dict[str, Any] = {"config": a.config, "budget_flops": budget or None, "plain_epochs": a.plain_epochs,
                              "share": cfg.final.share, "top_k": cfg.final.top_k, "seeds": a.seeds, "rows": []}
    for row in rows:
        per_seed = [d.final for d in datas[row.policy]]
        r = {"policy": row.policy, "final_test": row.final_test, "final_test_std": row.final_test_std,
             "delivered_flops": row.delivered_flops, "search_flops": row.total_flops,
             "per_seed_test": [f["test_metric"] if f else None for f in per_seed],
             "per_seed_hidden": [f["hidden"] if f else None for f in per_seed],
             "per_seed_delivered": [delivered_flops(url, name) for name in groups[row.policy]],
             "over_budget": (row.delivered_flops or 0) / budget if budget else None}
        result["rows"].append(r)
        print(json.dumps(r))
    dils = next(r for r in rows if r.policy.startswith("optuna"))
    plain_row = next(r for r in rows if r.base_policy == "plain")
    result["delta_pp_vs_plain"] = 100 * ((dils.final_test or 0) - (plain_row.final_test or 0))
    scratch = next((r for r in rows if r.base_policy == "scratch"), None)
    if scratch is not None and scratch.delivered_flops:
        result["delta_pp_vs_scratch"] = 100 * ((dils.final_test or 0) - (scratch.final_test or 0))
        result["flops_vs_scratch"] = (dils.delivered_flops or 0) / scratch.delivered_flops
    result["verdict"] = verdict(rows)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({k: result[k] for k in ("config", "budget_flops", "share", "top_k", "delta_pp_vs_plain",
                                              "delta_pp_vs_scratch", "flops_vs_scratch", "verdict", "seconds")
                      if k in result}))
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out / "budget.html")
    print(f"| {Path(a.config).stem} | " + " | ".join(
        f"{r['policy']} {r['final_test']:.4f} ± {statistics.pstdev([t for t in r['per_seed_test'] if t is not None]):.4f}"
        for r in result["rows"] if r["final_test"] is not None) + f" | {result['delta_pp_vs_plain']:+.2f} pp |", file=sys.stderr)
    return 0


def _plot(result: dict[str, Any], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure([go.Box(y=[t for t in r["per_seed_test"] if t is not None], name=r["policy"], boxpoints="all")
                     for r in result["rows"]])
    budget = f"{result['budget_flops']:.3g} FLOPs" if result["budget_flops"] else "no budget"
    fig.update_layout(title=f"{result['config']}: delivered test metric per seed ({budget})", yaxis_title="test metric")
    fig.write_html(str(path), include_plotlyjs=True)


if __name__ == "__main__":
    sys.exit(main())
