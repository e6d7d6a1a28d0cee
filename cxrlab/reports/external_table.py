"""The external-validation table, shared by plots/summary.md and the model cards (same wording in both).

Reads `metrics/external/<set>/<model>/report.json`; every number is printed
as read (4 decimals), none is computed here.
"""

from __future__ import annotations

from cxrlab import paths
from cxrlab.io.fsio import read_json


def num(value, digits: int = 4) -> str:
    """A number as the reports print it: integers as they are, other numbers with `digits` decimals."""
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def interval(ci: dict | None) -> str:
    return "" if not ci or ci.get("low") is None else f" [{num(ci['low'])}, {num(ci['high'])}]"


def external_reports(sets, models: list[str]) -> dict[str, dict[str, dict]]:
    """{set: {model: report}} of every external result that exists (a stage not yet run is left out)."""
    out: dict[str, dict[str, dict]] = {}
    for name in sets:
        for model in models:
            path = paths.external_dir(name, model) / "report.json"
            if path.is_file():
                out.setdefault(name, {})[model] = read_json(path)
    return out


def set_line(meta: dict) -> str:
    """`source` (kind), N images: class n, ...; SYNTHETIC for the demo source."""
    counts = ", ".join(f"{c} {num(n)}" for c, n in meta["counts"].items())
    line = f"`{meta['source']}` ({meta['source_kind']}), {num(meta['n'])} images ({counts})"
    if meta.get("sha256"):
        line += f", sha256 `{meta['sha256']}`"
    if meta.get("synthetic"):
        line += "; **SYNTHETIC images (demo source), not X-rays**"
    return line


def verdict_text(op: dict | None) -> str:
    """The screening target's three-valued verdict as evaluate reported it, or why there is none."""
    if not op or not op.get("thresholds"):
        return "no operating point"
    if not op.get("target"):
        return "no target"
    return f"{op['target']['name']}: {op.get('verdict', 'n/a')}"


HEADER = ["| model | ROC AUC internal | ROC AUC external | AUC drop (int. - ext.) | threshold(s), from internal "
          "validation | external sensitivity | external specificity | sensitivity drop | external ECE | target |",
          "|---|---|---|---|---|---|---|---|---|---|"]


def row(model: str, report: dict) -> str:
    best = report["best"]
    diffs = report.get("internal_minus_external", {})
    auc = diffs.get("argmax", {}).get("roc_auc") or {}
    op = best.get("operating_point") or {}
    if op.get("thresholds"):
        test = op["test"]
        thresholds = ", ".join(num(t) for t in op["thresholds"].values())
        sens = num(test["sensitivity"]) + interval(test.get("sensitivity_ci"))
        spec = num(test["specificity"]) + interval(test.get("specificity_ci"))
        drop = diffs.get("operating_point", {}).get("sensitivity") or {}
        sens_drop = num(drop.get("difference")) + interval(drop)
    else:
        thresholds, sens, spec, sens_drop = "none (argmax)", num(best["sensitivity"]), num(best["specificity"]), "n/a"
    return (f"| {model} | {num(auc.get('internal'))} | {num(best['roc_auc'])}{interval(best.get('roc_auc_ci'))} "
            f"| {num(auc.get('difference'))}{interval(auc)} | {thresholds} | {sens} | {spec} | {sens_drop} "
            f"| {num(best['ece'])}{interval(best.get('ece_ci'))} | {verdict_text(op)} |")


def external_section(reports: dict[str, dict[str, dict]], level: float) -> list[str]:
    """Markdown lines: per external set, one row per model; empty without external results."""
    if not reports:
        return []
    lines = ["", "## External validation (docs/external-validation.md)", "",
             (f"Each model scored on images from another source, at the threshold(s) chosen on internal "
              f"validation (not re-tuned). Brackets: {level} intervals, as for the internal test set; a drop "
              "is the internal test metric minus the external one, its interval a bootstrap resampling both "
              "test sets independently. The target verdict reads the exact intervals of the external "
              "sensitivity and specificity: met, not met or inconclusive.")]
    for name, by_model in reports.items():
        meta = next(iter(by_model.values()))["external"]
        lines += ["", f"### {name}: {set_line(meta)}", "", *HEADER]
        lines += [row(model, report) for model, report in by_model.items()]
    return lines
