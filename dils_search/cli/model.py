"""Model commands: export a node's checkpoint, deepen a trained model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import InputError
from ..registry import DATASETS, INITS
from .common import COUNT, POSITIVE_FLOAT, POSITIVE_INT, _fmt, _number, _study_args, command, handles


def _data_kwargs(d: dict[str, Any]) -> dict[str, Any]:
    """``load_dataset``/``raw_rows`` keywords for a recorded ``[data]`` (as ``export`` records it)."""
    return {"seed": int(d.get("seed", 0)), "num_samples": d.get("num_samples"), "path": d.get("path") or None,
            "val_fraction": d.get("val_fraction", 0.15), "test_fraction": d.get("test_fraction", 0.15),
            "label_column": d.get("label_column") or None,
            "options": {"task": d["task"]} if d["dataset"] == "synthetic" and d.get("task") else None}


def _export(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..core.data import raw_rows
    from ..core.export import export, run_exported
    from ..core.preprocess import Predictor
    from ..core.train import score
    from ..search.paths import make_task
    from ..search.study import study_config
    from ..search.summary import summarize
    from ..store import LineageStore, StoreError

    s = summarize(a.storage, a.study_name, a.artifacts)
    if s.best_node_key is None:
        raise StoreError(f"study-name={a.study_name!r} has no completed trial to export yet")
    final = s.final is not None and not a.no_final
    key = s.final["node_key"] if final and s.final is not None else s.best_node_key
    store = LineageStore(a.storage, a.artifacts or study_config(a.storage, a.study_name)[1], create=False)
    record = store.get(key)
    model = store.load_model(record) if record else None
    store.close()
    if model is None:  # missing or damaged: retrain it here (and what it grew from, if need be)
        from ..search.finalize import ensure_node

        print(f"node {key[:12]} has no intact checkpoint; retraining it", file=sys.stderr)
        fetched = ensure_node(a.storage, a.study_name, key, a.artifacts)
        model, record = fetched.model, fetched.record
    if record is None:
        raise StoreError(f"node {key[:12]} is not in the lineage store of study {a.study_name!r}")
    cfg = study_config(a.storage, a.study_name)[0]
    data_record = {"dataset": cfg.data.dataset, "seed": cfg.seed, "num_samples": cfg.data.num_samples,
                   "path": cfg.data.path, "val_fraction": cfg.data.val_fraction,
                   "test_fraction": cfg.data.test_fraction, "label_column": cfg.data.label_column,
                   "task": cfg.data.task}
    data = make_task(cfg, "cpu").data  # its training split's statistics go into the model
    served = Predictor(model.cpu(), data.preprocess(model.spec.input_shape), data.task)
    out = export(served, a.out, a.format, extra={"study": a.study_name, "node_key": key, "final": final,
                                                 "metrics": record.metrics, "data": data_record}, make_parents=False)
    what = "delivered (finalized) model" if final else "search's best node, not finalized"
    print(f"wrote {out} ({a.format}): the {what}, hidden={model.spec.hidden}, val {_fmt(record.metrics.get('val_metric'))}, "
          f"test {_fmt(record.metrics.get('test_metric'))}")
    x, y = raw_rows(cfg.data.dataset, "test", **_data_kwargs(data_record))  # the study's test rows, raw
    got = run_exported(out, a.format, x)
    runtime = {"dils": "torch", "onnx": "onnxruntime", "torch.export": "torch.export"}[a.format]
    line = f"it takes raw inputs (N x {list(served.input_shape)}); on the study's {len(x)} raw test rows, in {runtime}: "
    line += f"test metric {score(torch.from_numpy(got), torch.from_numpy(np.asarray(y)), data.task):.4f}"
    if a.format != "dils":
        with torch.inference_mode():
            ref = served.eval()(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()
        line += f", largest |{runtime} - torch| output difference {float(np.abs(got - ref).max()):.1e}"
    print(line)
    how = {"dils": f"dils_search.load({str(out)!r})(x) or `dils-search deepen {out} ...`",
           "onnx": f"onnxruntime.InferenceSession({str(out)!r}).run(None, {{'x': x.astype('float32')}})",
           "torch.export": f"torch.export.load({str(out)!r}).module()(torch.as_tensor(x, dtype=torch.float32))"}
    print(f"load it with {how[a.format]}")
    return 0


@command("export", "write the delivered model of a study (or its search's best node) as spec + state_dict")
@handles(_export)
def _export_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="checkpoint to write, e.g. model.pt")
    p.add_argument("--no-final", action="store_true",
                   help="write the search's best node instead of the finalized (delivered) model")
    p.add_argument("--format", default="dils", choices=["dils", "onnx", "torch.export"],
                   help="dils: spec + state_dict + preprocessing (dils_search.load, deepen; the default); onnx: an "
                        "ONNX model for onnxruntime (pip install 'dils-search[onnx]'); torch.export: a .pt2 "
                        "ExportedProgram (torch.export.load). Every format takes raw inputs: the study's "
                        "standardisation is inside the model")


def _deepen_data(a: argparse.Namespace, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The data to calibrate and measure on: what the checkpoint records, unless --data says otherwise
    (then the same split is required, or --other-data)."""
    if a.data is None:
        if not recorded:
            raise InputError("deepen needs --data (digits, mnist1d, synthetic or file with --data-path): this "
                             "checkpoint does not record the data it was trained on")
        return {**recorded, "seed": recorded.get("seed", 0) if a.seed is None else a.seed}
    given = {"dataset": a.data, "seed": 0 if a.seed is None else a.seed, "path": a.data_path or "",
             "num_samples": a.num_samples or (recorded or {}).get("num_samples", 4000)}
    if recorded and not a.other_data:
        for k in ("dataset", "seed", "path", "num_samples"):
            if k in recorded and recorded[k] != given[k] and not (k == "seed" and a.seed is None):
                raise InputError(f"--data: the checkpoint was trained on {k}={recorded[k]!r}, not {given[k]!r}, so its "
                                 "'before' test metric would be measured on another split (maybe on rows it trained "
                                 "on); leave --data out to use the recorded data, or pass --other-data")
        given["seed"] = recorded.get("seed", given["seed"]) if a.seed is None else a.seed
    return {**(recorded or {}), **given}


def _deepen(a: argparse.Namespace) -> int:
    import torch

    from ..core.checkpoint import load, load_extra, save
    from ..core.data import load_dataset
    from ..core.grow import GrowOptions, grow, output_gap
    from ..core.preprocess import Predictor
    from ..core.spec import stream_widths
    from ..core.train import Recipe, evaluate, train

    served = load(a.model)  # the network works on the standardised data; its preprocessing is kept as it is
    model = served.net
    d = _deepen_data(a, load_extra(a.model).get("data"))
    data = load_dataset(d["dataset"], **_data_kwargs(d)).reshaped(model.spec.input_shape)
    if data.out_features != model.spec.out_features:
        raise InputError(f"data={d['dataset']!r} has {data.out_features} outputs but the model has {model.spec.out_features}")
    calib = data.x_train[: a.calib_size]
    steps = [_parse_step(s) for s in a.insert]
    seed = int(d["seed"])

    def metric(m: torch.nn.Module) -> float:
        return evaluate(m, data.x_test, data.y_test, data.task)["metric"]

    before = metric(model)
    new = model
    exact_widths = []
    for i, step in enumerate(steps):
        exact_widths.append((step, stream_widths(new.spec)[step.position]))
        new = grow(new, step, calib, GrowOptions(seed=seed + i))
    calib_gap = output_gap(model, new, calib)
    if calib_gap > a.max_gap:
        hints = "; ".join(f"{s.position}:{max(s.width, w)}:dils-analytic is exact" for s, w in exact_widths if s.width < w)
        message = (f"the insertion changes the outputs on the calibration data by {calib_gap:.2e} (relative), over "
                   f"--max-gap={a.max_gap:g}" + (f"; {hints}" if hints else "; dils-approx may come closer"))
        if a.strict:
            raise InputError(f"--strict: {message}")
        print(f"dils-search deepen: warning: {message}", file=sys.stderr)
    gap = output_gap(model, new, data.x_test)
    after = metric(new)
    tuned = None
    if a.epochs > 0:
        train(new, data, Recipe(epochs=a.epochs, lr=a.lr, seed=seed, rewarmup_epochs=a.rewarmup_epochs))
        tuned = metric(new)
    save(Predictor(new, served.preprocess, served.task, served.input_shape), a.out,
         extra={"data": d, "deepened_from": str(a.model)}, make_parents=False)
    result = {"hidden_before": model.spec.hidden, "hidden_after": new.spec.hidden, "metric_before": before,
              "metric_after_insert": after, "metric_after_finetune": tuned, "output_gap": gap,
              "calib_gap": calib_gap, "out": str(a.out), "data": d}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"hidden {model.spec.hidden} -> {new.spec.hidden}; largest relative output gap: calibration "
              f"{calib_gap:.2e}, test {gap:.2e} ({d['dataset']}, seed {seed})")
        tail = f", after {a.epochs} fine-tune epochs {_fmt(tuned)}" if tuned is not None else " (no fine-tuning: --epochs 0)"
        print(f"test metric: before {before:.4f}, right after insertion {after:.4f}{tail}")
        print(f"wrote {a.out}")
    return 0


def _parse_step(text: str) -> Any:
    from ..core.spec import GrowthStep

    parts = text.split(":")
    if len(parts) != 3:
        raise InputError(f"--insert={text!r} must look like POSITION:WIDTH:INIT, e.g. 1:64:dils-analytic")
    try:
        position, width = int(parts[0]), int(parts[1])
    except ValueError:
        raise InputError(f"--insert={text!r}: POSITION and WIDTH must be integers, e.g. 1:64:dils-analytic") from None
    if parts[2] not in INITS:
        raise InputError(f"--insert={text!r}: init {parts[2]!r} is unknown; allowed: {', '.join(INITS.names())}")
    return GrowthStep(position, width, parts[2])


@command("deepen", "insert layers into a trained model without losing what it knows (system upgrade)")
@handles(_deepen)
def _deepen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint written by `dils-search export`, `deepen` or dils_search.save")
    p.add_argument("--insert", action="append", required=True, metavar="POS:WIDTH:INIT",
                   help="a layer to insert, e.g. 1:64:dils-analytic (repeat for several, applied in order); "
                        f"INIT is one of: {', '.join(INITS.names())}")
    p.add_argument("--data", default=None,
                   help=f"dataset for calibration and metrics: {', '.join(DATASETS.names())} (default: the data, "
                        "seed and split the checkpoint records; `export` records them)")
    p.add_argument("--data-path", default=None, help="the .npz/.csv file when --data file")
    p.add_argument("--num-samples", type=POSITIVE_INT, default=None, help="mnist1d/synthetic samples (default 4000)")
    p.add_argument("--other-data", action="store_true",
                   help="use --data even though the checkpoint records other data or another seed")
    p.add_argument("--max-gap", type=_number(float, 0.0), default=1e-3, metavar="G",
                   help="warn when the relative output gap on the calibration data exceeds G (default 1e-3)")
    p.add_argument("--strict", action="store_true", help="refuse (write nothing) when the gap exceeds --max-gap")
    p.add_argument("--calib-size", type=POSITIVE_INT, default=1024, help="calibration samples (default 1024)")
    p.add_argument("--epochs", type=COUNT, default=0, help="fine-tune epochs after insertion (default 0)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3, help="fine-tune learning rate (default 1e-3)")
    p.add_argument("--rewarmup-epochs", type=_number(float, 0.0), default=0.5, help="epochs of linear lr re-warmup (default 0.5)")
    p.add_argument("--seed", type=COUNT, default=None,
                   help="seed of the data split and the insertion (default: the checkpoint's, else 0)")
    p.add_argument("--out", required=True, help="where to write the deeper checkpoint")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
