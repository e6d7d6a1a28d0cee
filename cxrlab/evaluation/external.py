"""Stages `external@<variant>-<set>` and `external_ensemble@<ensemble>-<set>`: a model on an external test set.

Scored exactly as evaluate scores the internal test set (`report_and_write`:
every metric with the same intervals, ROC AUC, ECE and the reliability bins,
best and last checkpoints, every seed), with one difference: the operating
threshold is not chosen anew. The validation probabilities it is chosen on
are read from evaluate's `val_predictions.csv` and go through the same rule,
so each run's threshold is the internal one, bit for bit (checked against
evaluate's `report.json`); the external images never choose or tune anything.

Writes to `metrics/external/<set>/<model>/` what evaluate writes (report.json,
predictions.csv, calibration.csv, DVCLive's plots), and
- `report.json` also holds `external` (the set: source, checksum, counts,
  whether synthetic) and `internal_minus_external`: for the best checkpoint,
  the internal test metric minus the external one, at the argmax and at the
  operating point, with a percentile bootstrap interval that resamples the
  two test sets independently (stratified, `stats.resamples` each);
- `metrics.json`: `{<set>: {<model>: headline}}`: evaluate's headline
  numbers on the external set and the drop of ROC AUC and of the operating
  sensitivity, with their intervals;
- `roc.csv`: the ROC curve of the first run's best checkpoint on the internal
  and on the external test set (`dvc plots show`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Hashable

import numpy as np
from sklearn.metrics import roc_curve

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.data.datasets import ImageArrayDataset, LoaderSettings, eval_batch_size, load_split, make_loader
from cxrlab.errors import UserError
from cxrlab.evaluation import stats
from cxrlab.evaluation.ensemble import combine
from cxrlab.evaluation.evaluate import CHECKPOINTS, ByRun, predict_checkpoint, report_and_write, runtime, write_rows
from cxrlab.evaluation.scoring import headline
from cxrlab.io.fsio import check_writable, read_json, write_json

DIFFERENCES = ("accuracy", "sensitivity", "specificity", "f1", "roc_auc")
METHOD = ("internal test metric minus external test metric, best checkpoint; interval: percentile bootstrap "
          "resampling the internal and the external test images independently (stratified by class), the "
          "trained model(s) and the operating thresholds held fixed")


def read_probs(path, classes: list[str], made_by: str) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray | None]:
    """({checkpoint: {run label (the CSV's seed column): N x k probabilities}}, labels of the first run) of a
    predictions CSV written by evaluate (predictions.csv or val_predictions.csv)."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; run the {made_by} stage first (dvc repro {made_by})")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[str, np.ndarray]] = {w: {} for w in CHECKPOINTS}
    runs = list(dict.fromkeys(r["seed"] for r in rows))
    for run in runs:
        mine = [r for r in rows if r["seed"] == run]
        for which in CHECKPOINTS:
            try:
                out[which][run] = np.array([[float(r[f"{which}_prob_{c}"]) for c in classes] for r in mine])
            except KeyError:
                raise UserError(f"{path} has no {which}_prob_* columns for the classes {classes}; run the "
                                f"{made_by} stage again (dvc repro {made_by})") from None
    labels = np.array([int(r["label"]) for r in rows if r["seed"] == runs[0]], dtype=np.int64) if runs else None
    return out, labels


def model_probs(model: str, seed: int, which: str, params: Params, classes, image_size, rt, loader, desc: str
                ) -> tuple[np.ndarray, int | None]:
    """One seed's `which` checkpoint on the external images (with data.folds, the mean of its fold models)."""
    folds = list(range(params.data.folds)) if params.data.folds else [None]
    if not all(paths.checkpoint(model, seed, which, f).is_file() for f in folds):
        raise UserError(f"checkpoints of {model} are missing under {paths.model_dir(model)}; run its train stage "
                        f"(dvc repro train@{model})")
    runs = [predict_checkpoint(paths.checkpoint(model, seed, which, fold), classes, image_size, rt,
                               {"test": loader}, desc)[::2] for fold in folds]
    return np.mean([p for p, _ in runs], axis=0), runs[0][1] if folds == [None] else None


def differences(y_int, probs_int: list[np.ndarray], y_ext, probs_ext: list[np.ndarray], positive: int,
                thresholds: list[float | None] | None, st) -> dict:
    """Internal minus external of each headline metric, at the argmax and at the operating thresholds."""
    idx_int = stats.stratified_indices(y_int, st.resamples, st.seed)
    idx_ext = stats.stratified_indices(y_ext, st.resamples, st.seed + 1)  # independent of the internal draws
    out: dict = {"method": METHOD}
    for label, th in (("argmax", None), ("operating_point", thresholds)):
        if label == "operating_point" and not th:
            continue
        full_i = stats.resampled_metrics(y_int, probs_int, np.arange(len(y_int))[None, :], positive, th)
        full_e = stats.resampled_metrics(y_ext, probs_ext, np.arange(len(y_ext))[None, :], positive, th)
        boot_i = stats.resampled_metrics(y_int, probs_int, idx_int, positive, th)
        boot_e = stats.resampled_metrics(y_ext, probs_ext, idx_ext, positive, th)
        out[label] = {}
        for name in DIFFERENCES if th is None else DIFFERENCES[:4]:
            internal, external = float(full_i[name][0]), float(full_e[name][0])
            out[label][name] = {"internal": internal, "external": external, "difference": internal - external,
                                **stats.percentile_interval(boot_i[name] - boot_e[name], st.ci_level)}
    return out


def evaluate_external(model: str, set_name: str, params: Params) -> None:
    if set_name not in params.external:
        raise UserError(f"unknown external set {set_name!r}; params.yaml defines external: "
                        f"{', '.join(params.external) or 'none'}")
    is_ensemble = model in params.ensembles
    spec = params.ensemble(model) if is_ensemble else None
    seeds: list[Hashable] = [] if is_ensemble else list(params.variant(model).seeds)
    internal_dir, out = paths.eval_dir(model), paths.external_dir(set_name, model)
    check_writable(out / "metrics.json")
    data_dir = paths.external_data(set_name)
    ext = load_split("images", data_dir)
    meta = read_json(data_dir / "meta.json")
    classes, pos = ext.classes, ext.classes.index(params.data.positive_class)
    made_by = f"ensemble@{model}" if is_ensemble else f"evaluate@{model}"
    internal, y_int = read_probs(internal_dir / "predictions.csv", classes, made_by)
    val, y_val = read_probs(internal_dir / "val_predictions.csv", classes, made_by)
    internal_report = read_json(internal_dir / "report.json")

    rt = runtime(params)
    loader = make_loader(ImageArrayDataset(ext), eval_batch_size(params.evaluate.batch_size, rt.device),
                         shuffle=False, seed=0, settings=LoaderSettings(pin_memory=rt.device.type == "cuda"))
    size = int(meta["image_size"])
    probs: ByRun = {w: {} for w in CHECKPOINTS}
    epochs: dict[str, dict[Hashable, int | None]] = {w: {} for w in CHECKPOINTS}
    if is_ensemble:
        run = next(iter(internal["best"]), None)
        if run is None:
            raise UserError(f"{internal_dir / 'predictions.csv'} holds no predictions; run {made_by} again")
        seeds = [run]
        for which in CHECKPOINTS:
            members = []
            for member in spec.members:
                member_seeds = params.variant(member).seeds
                members.append(np.mean([model_probs(member, s, which, params, classes, size, rt, loader,
                                                    f"{set_name} {member} seed {s} {which}")[0]
                                        for s in member_seeds], axis=0))
            probs[which][run], epochs[which][run] = combine(members, spec.voting), None
    else:
        for seed in seeds:
            for which in CHECKPOINTS:
                probs[which][seed], epochs[which][seed] = model_probs(
                    model, seed, which, params, classes, size, rt, loader, f"{set_name} {model} seed {seed} {which}")
    missing = [s for s in seeds if str(s) not in internal["best"]]
    if missing:
        raise UserError(f"{internal_dir / 'predictions.csv'} has no predictions of run(s) {missing}; run "
                        f"{made_by} again (dvc repro {made_by})")
    val_probs: ByRun = {w: {s: val[w][str(s)] for s in seeds if str(s) in val[w]} for w in CHECKPOINTS}
    if y_val is not None and len(val_probs["best"]) != len(seeds):
        raise UserError(f"{internal_dir / 'val_predictions.csv'} lacks runs of {model}; run {made_by} again")

    # the operating thresholds are the internal ones; the differences are computed at them
    internal_op = (internal_report.get("best") or {}).get("operating_point") or {}
    thresholds = internal_op.get("thresholds")
    runs = [f"seed_{s}" for s in seeds]
    diffs = differences(y_int, [internal["best"][str(s)] for s in seeds], ext.labels,
                        [probs["best"][s] for s in seeds], pos,
                        [thresholds[r] for r in runs] if thresholds else None, params.stats)
    header = {"external": {**meta, "model": model, "threshold": "carried over from internal validation "
                           f"({internal_dir / 'val_predictions.csv'}), not re-tuned on the external set"},
              "seeds": seeds, "internal_minus_external": diffs}
    if is_ensemble:
        header["ensemble"] = {"members": spec.members, "voting": spec.voting}
    report_and_write(f"external {set_name} {model}", out, header, seeds, probs, val_probs, epochs, ext, y_val,
                     params)
    report = read_json(out / "report.json")
    carried = ((report.get("best") or {}).get("operating_point") or {}).get("thresholds")
    if carried != thresholds:
        raise UserError(f"the operating thresholds on {set_name} ({carried}) differ from {internal_dir}'s "
                        f"({thresholds}): its report is out of date; run {made_by} again (dvc repro)")
    top = headline(report["best"])
    for key, where, name in (("roc_auc_drop", "argmax", "roc_auc"),
                             ("op_sensitivity_drop", "operating_point", "sensitivity")):
        d = diffs.get(where, {}).get(name)
        if d:
            top.update({key: d["difference"], f"{key}_low": d["low"], f"{key}_high": d["high"]})
    numbers = {k: v for k, v in top.items() if isinstance(v, (int, float)) and math.isfinite(v)}  # numbers only
    write_json(out / "metrics.json", {set_name: {model: numbers}})
    write_roc(out / "roc.csv", y_int, internal["best"][str(seeds[0])], ext.labels, probs["best"][seeds[0]],
              pos, set_name)


def write_roc(path, y_int, prob_int, y_ext, prob_ext, pos: int, set_name: str) -> None:
    """The ROC curves of one run on the internal and the external test set, one row per point."""
    rows = []
    for dataset, y, prob in (("internal test", y_int, prob_int), (f"external {set_name}", y_ext, prob_ext)):
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(np.asarray(y) == pos, np.asarray(prob)[:, pos])
        rows += [[dataset, float(f), float(t)] for f, t in zip(fpr, tpr)]
    write_rows(path, ["dataset", "fpr", "tpr"], rows)
