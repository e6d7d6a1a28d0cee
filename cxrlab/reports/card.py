"""Stage `card@<variant>`: a model card (Markdown) in the spirit of Model Cards (Mitchell et al.) and TRIPOD+AI.

`cards/<variant>.md`: intended use and a not-for-clinical-use statement;
the data (source, checksum, images per class and split, validation scheme);
the model (architecture, parameters, FLOPs, the settings the variant changes);
internal test metrics with intervals; the operating point with its
validation positives, expected sensitivity and the three-valued verdict on
the screening target; calibration; every external set's results (the table
of plots/summary.md); a Grad-CAM figure; limitations; and how to reproduce
(git revision, dvc.lock hashes of the data and the model).

No number is typed here: each is read from the stage outputs (split,
train, evaluate, flops, external reports) or params.yaml and printed as
read (`external_table.num`), so tests can trace every one back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.data.fetch import source_kind
from cxrlab.errors import UserError
from cxrlab.io.fsio import read_json, write_text
from cxrlab.reports.external_table import HEADER, external_reports, interval, num, row, set_line, verdict_text

DVC_LOCK = Path("dvc.lock")
FEW_POSITIVES = 30  # as stats.FEW_POSITIVES: fewer validation positives make an uncertain threshold


def _read(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} does not exist; run the {stage} stage first (dvc repro {stage})")
    return read_json(path)


def git_revision() -> str:
    """HEAD's commit, `+ uncommitted changes` when the tree is dirty; `unknown` outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if rev.returncode:
        return "unknown (not a git repository)"
    return f"`{rev.stdout.strip()}`" + (" with uncommitted changes" if dirty.stdout.strip() else "")


def lock_hashes(variant: str) -> dict[str, str]:
    """{path: md5} of the raw data and the model as dvc.lock records them (what `dvc checkout` restores)."""
    if not DVC_LOCK.is_file():
        return {}
    stages = (yaml.safe_load(DVC_LOCK.read_text()) or {}).get("stages", {})
    wanted = {"download": "data/raw", "preprocess": "data/prepared", f"train@{variant}": f"models/{variant}"}
    out = {}
    for stage, path in wanted.items():
        for o in (stages.get(stage) or {}).get("outs", []):
            if o.get("path") == path and o.get("md5"):
                out[path] = o["md5"]
    return out


def metric_rows(best: dict) -> list[str]:
    rows = ["| metric | value [interval] |", "|---|---|"]
    for key, label in (("accuracy", "accuracy"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                       ("precision", "precision"), ("f1", "F1"), ("roc_auc", "ROC AUC")):
        rows.append(f"| {label} | {num(best.get(key))}{interval(best.get(key + '_ci'))} |")
    return rows


def operating_lines(op: dict | None) -> list[str]:
    if not op:
        return ["No operating point (more than two classes)."]
    if not op.get("thresholds"):
        return [f"No operating threshold: {op.get('message', '')}"]
    test, val = op["test"], op["validation"]
    lines = ["- Threshold(s) on p(positive), chosen on internal validation: "
             + ", ".join(f"{run} {num(t)}" for run, t in op["thresholds"].items()),
             f"- Validation positives: {num(op['validation_positives'])}; validation sensitivity "
             f"{num(val['sensitivity'])}{interval(val.get('sensitivity_ci'))}",
             f"- Expected sensitivity on new images (the rule's promise): {num(op['expected_sensitivity'])}",
             f"- Internal test at the threshold: sensitivity {num(test['sensitivity'])}"
             f"{interval(test.get('sensitivity_ci'))}, specificity {num(test['specificity'])}"
             f"{interval(test.get('specificity_ci'))}"]
    if op.get("target"):
        t = op["target"]
        lines.append(f"- Screening target {t['name']} (sensitivity >= {num(t['sensitivity'])}, specificity >= "
                     f"{num(t['specificity'])}): **{op.get('verdict', 'n/a')}** (met only when both interval "
                     "lower bounds reach the target; not met when an upper bound is below it; else inconclusive)")
    else:
        lines.append(f"- {op.get('target_text', 'no screening target')}")
    return lines


def limitations(params: Params, evaluation: dict, externals: dict, demo: bool) -> list[str]:
    op = evaluation["best"].get("operating_point") or {}
    out = []
    if demo:
        out.append("**The data are SYNTHETIC** (data.source is `demo`): smooth noise with bright blobs, not chest "
                   "X-rays. No number in this card says anything about tuberculosis or any patient.")
    if not params.external:
        out.append("**No external validation**: every number comes from a test split of the training source; "
                   "models trained on one hospital's images often lose much of their accuracy on another's. "
                   "Add an external set (docs/external-validation.md).")
    elif any(r["external"].get("synthetic") for by in externals.values() for r in by.values()):
        out.append("An external set is synthetic (demo source): it exercises the pipeline, it validates nothing.")
    n_pos = op.get("validation_positives")
    if n_pos is not None and n_pos < FEW_POSITIVES:
        out.append(f"Small validation set: {num(n_pos)} validation positives choose the threshold; its "
                   "sensitivity on new images is uncertain (see the interval above).")
    seeds = evaluation.get("seeds") or []
    if len(seeds) < 2:
        out.append("One training seed: the intervals cover test sampling only, not training noise.")
    out.append(f"Internal test set of {num(evaluation['best']['n'])} images; the intervals show how little "
               "that pins down.")
    return [f"- {line}" for line in out]


def write_card(variant: str, params: Params) -> None:
    cfg = params.variant(variant)
    data = params.data
    evaluation = _read(paths.eval_dir(variant) / "report.json", f"evaluate@{variant}")
    split = _read(paths.SPLIT_REPORT, "split")
    train = _read(paths.train_dir(variant) / "report.json", f"train@{variant}")
    flops = _read(paths.FLOPS_REPORT, "flops")["variants"].get(variant, {})
    gallery = paths.explain_dir(variant) / "gallery.png"
    externals = external_reports(params.external, [variant])
    best = evaluation["best"]
    classes = list(best["confusion_matrix"])
    demo = source_kind(data.source) == "demo"
    overrides = params.raw.get("experiments", {}).get(variant) or {}

    lines = [f"# Model card: {variant}", "",
             "Written by the `card` stage from the pipeline's outputs; no number in it is typed by hand.", ""]
    if demo:
        lines += ["> **SYNTHETIC DATA.** This model was trained and tested on the `demo` source: generated "
                  "images (smooth noise, bright blobs), not chest X-rays. It shows how the pipeline works; it "
                  "says nothing about tuberculosis.", ""]
    lines += ["> **Not for clinical use.** A research model: not a medical device, not validated for "
              "diagnosis, triage or screening of patients.", "",
              "## Intended use", "",
              f"Research on classifying chest X-rays as {' or '.join(classes)} (positive class "
              f"{data.positive_class}): comparing training variants and studying how the results transfer. "
              "Out of scope: any decision about a patient; images from other devices, populations or views than "
              "the training data without external validation; children; other diseases.", "",
              "## Data", "",
              f"- Source: `{data.source}` ({source_kind(data.source)})"
              + (f", sha256 `{data.sha256}`" if data.sha256 else ", no checksum given (data.sha256 is null)"),
              "", "| class | train | of which validation | test |", "|---|---|---|---|"]
    for name, entry in split["classes"].items():
        held = entry["train"].get("of_which_val")
        lines.append(f"| {name} | {num(entry['train']['count'])} | {num(held) if held is not None else 'folds'} "
                     f"| {num(entry['test']['count'])} |")
    if data.folds:
        scheme = (f"{num(data.folds)}-fold stratified cross-validation of the training part (seed "
                  f"{num(data.seed)}); the threshold is chosen on the pooled out-of-fold predictions")
    else:
        scheme = (f"a hold-out of {num(data.val_fraction)} of each class's training images (seed "
                  f"{num(data.seed)}) picks the best epoch and the operating threshold")
    lines += ["", f"Split: the first {num(data.test_fraction)} of each class by image ID is the test set; "
              f"validation: {scheme}.", ""]
    lines += ["## Model", "",
              f"- Architecture: {cfg.arch}" + (", ImageNet-pretrained" if cfg.pretrained else ", trained from "
                                               "scratch"),
              f"- Parameters: {num(flops.get('parameters'))}; GFLOPs per image: {num(flops.get('gflops'))} "
              f"(at {num(data.image_size)} px)",
              f"- Training: {num(cfg.epochs)} epochs, {cfg.optimizer}, lr {num(cfg.lr)}, batch size "
              f"{num(cfg.batch_size)}, seeds {', '.join(num(s) for s in cfg.seeds)}; the best epoch by "
              f"{train.get('select_metric', 'validation')}",
              "- Settings this variant changes from the study's shared `train` section: "
              + (", ".join(f"`{k}: {v}`" for k, v in overrides.items()) or "none"), ""]
    lines += ["## Internal test set (best epoch on validation)", "",
              f"{num(best['n'])} images; {params.stats.ci_level} intervals: {evaluation.get('intervals', '')}.", "",
              *metric_rows(best), "",
              "## Operating point", "", *operating_lines(best.get("operating_point")), "",
              "## Calibration", "",
              f"Expected calibration error {num(best['ece'])}{interval(best.get('ece_ci'))}"
              + (f"; a perfectly calibrated model would show {num(best['ece_calibrated'])} on this many images"
                 if best.get("ece_calibrated") is not None else "") + ". Reliability diagram: "
              "`plots/reliability.png`.", "",
              "## External validation", ""]
    if externals:
        lines.append("At the internal threshold, never re-tuned on the external images; drop = internal minus "
                     "external, with a bootstrap interval over both test sets (docs/external-validation.md).")
        for name, by_model in externals.items():
            report = by_model[variant]
            lines += ["", f"### {name}: {set_line(report['external'])}", "", *HEADER, row(variant, report), "",
                      f"Verdict on the external set: {verdict_text(report['best'].get('operating_point'))}."]
    else:
        lines.append("None: no external test set is configured (params `external`), so nothing here says how "
                     "the model does on another hospital's images.")
    lines += ["", "## Grad-CAM", ""]
    lines += ([f"![Grad-CAM over internal test images](../{gallery.as_posix()})"] if gallery.is_file()
              else ["No Grad-CAM gallery (run `dvc repro explain@" + variant + "`)."])
    lines += ["", "## Limitations", "", *limitations(params, evaluation, externals, demo), "",
              "## How to reproduce", "", f"- Git revision: {git_revision()}"]
    for path, md5 in lock_hashes(variant).items():
        lines.append(f"- `{path}`: md5 `{md5}` in dvc.lock")
    lines += [f"- `git checkout <revision> && dvc repro card@{variant}` (or `dvc pull` where a remote holds "
              "the outputs)", ""]
    write_text(paths.CARDS / f"{variant}.md", "\n".join(lines))
    print(f"card {variant}: {paths.CARDS / f'{variant}.md'}")
