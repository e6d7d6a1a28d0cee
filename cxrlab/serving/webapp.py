"""What the web page shows about trained variants, and the Streamlit command line that serves it.

The page itself is `app/page.py`; `cxrlab.cli.page` starts it. Nothing here writes anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.io.fsio import read_json
from cxrlab.io.records import split_classes

PAGE = Path(__file__).resolve().parents[2] / "app" / "page.py"

# (key in the evaluate report, label) of the test metrics the page shows
HEADLINE = (("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
            ("precision", "Precision"), ("f1", "F1"), ("roc_auc", "ROC AUC"))


def trained_variants(params: Params) -> list[str]:
    """The variants of params.yaml whose first seed has its best checkpoint(s)."""
    return [v for v in params.variants
            if all(p.is_file() for p in paths.served_checkpoints(v, params.variant(v).seeds[0], "best"))]


def class_names(params: Params) -> list[str] | None:
    """The class names in label order for any form of data.classes (a mapping, a list, or `auto`, as the
    split stage resolved it); None before the split stage has run with `auto`."""
    names = params.data.class_names
    if names is None and paths.TRAIN_CSV.is_file():
        names = split_classes(paths.TRAIN_CSV)
    return names


def page_title(names: list[str] | None) -> str:
    """The page's title: the question the model answers, from the class names."""
    if not names:
        return "Chest X-ray classifier"
    return f"Chest X-ray: {', '.join(names[:-1])} or {names[-1]}?"


def _interval(ci: dict | None) -> str:
    if not ci or ci.get("low") is None or ci.get("high") is None:
        return "n/a"
    return f"[{ci['low']:.3f}, {ci['high']:.3f}]"


def _value(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def metrics_table(variant: str, params: Params) -> str | None:
    """The variant's test metrics of its best checkpoint with their intervals, as a Markdown table, at the
    decision rule the page decides by (the operating threshold, else the argmax); None before evaluate."""
    report_path = paths.eval_dir(variant) / "report.json"
    if not report_path.is_file():
        return None
    report = read_json(report_path)
    best = report["best"]
    positive = params.data.positive_class
    level = f"{params.stats.ci_level:.0%} interval"
    op = best.get("operating_point")
    at_threshold = bool(op and op.get("thresholds"))
    rule = "at the operating threshold" if at_threshold else "at the argmax (0.5)"
    lines = [f"| test metric (best checkpoint, {rule}) | value | {level} |", "|---|---|---|"]
    if at_threshold:
        thresholds = ", ".join(f"{t:.3f}" for t in op["thresholds"].values())
        lines.append(f"| Operating threshold on p({positive}) | {thresholds} | chosen on validation "
                     f"({op['validation_positives']} positives) |")
    elif op:
        lines.append(f"| Operating threshold on p({positive}) | n/a | {op.get('message', '')} |")
    for key, label in HEADLINE:
        if key in best:
            lines.append(f"| {label} | {_value(best[key])} | {_interval(best.get(key + '_ci'))} |")
    if at_threshold and op.get("target"):
        t = op["target"]
        lines.append(f"| {t['name']} (sensitivity >= {t['sensitivity']}, specificity >= "
                     f"{t['specificity']}) | {op.get('verdict', 'n/a')} | read on the intervals: met when "
                     "both lower bounds reach the target, not met when an upper bound is below it |")
    argmax = best.get("argmax")
    if at_threshold and argmax:
        lines.append(f"| *At the argmax (0.5), for reference:* accuracy, sensitivity, specificity | "
                     f"{_value(argmax['accuracy'])}, {_value(argmax['sensitivity'])}, "
                     f"{_value(argmax['specificity'])} | |")
    return "\n".join(lines) + (f"\n\nIntervals cover {report.get('intervals', 'test sampling')}; exact "
                               "(Clopper-Pearson) for accuracy, sensitivity, specificity and precision, "
                               "percentile bootstrap for F1 and ROC AUC.")


def command(address: str, port: int) -> list[str]:
    """The `streamlit run` command line of the page."""
    return [sys.executable, "-m", "streamlit", "run", str(PAGE),
            "--server.address", address, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--server.runOnSave", "false", "--global.developmentMode", "false",
            "--client.toolbarMode", "minimal", "--theme.base", "light"]
