"""What the web page shows about trained variants, and the Streamlit command line that serves it.

The page itself is `app/page.py`; `cxrlab.cli.page` starts it. Nothing here writes anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.io.fsio import read_json

PAGE = Path(__file__).resolve().parents[2] / "app" / "page.py"

# (key in the evaluate report, label) of the test metrics the page shows
HEADLINE = (("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
            ("precision", "Precision"), ("f1", "F1"), ("roc_auc", "ROC AUC"))


def trained_variants(params: Params) -> list[str]:
    """The variants of params.yaml whose first seed has a best checkpoint."""
    return [v for v in params.variants if paths.served_checkpoint(v, params.variant(v).seeds[0], "best").is_file()]


def _interval(ci: dict | None) -> str:
    if not ci or ci.get("low") is None or ci.get("high") is None:
        return "n/a"
    return f"[{ci['low']:.3f}, {ci['high']:.3f}]"


def _value(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def metrics_table(variant: str, params: Params) -> str | None:
    """The variant's test metrics of its best checkpoint with their intervals, as a Markdown table;
    None before evaluate has run."""
    report_path = paths.eval_dir(variant) / "report.json"
    if not report_path.is_file():
        return None
    report = read_json(report_path)
    best = report["best"]
    positive = params.data.positive_class
    level = f"{params.stats.ci_level:.0%} interval"
    lines = [f"| test metric (best checkpoint) | value | {level} |", "|---|---|---|"]
    for key, label in HEADLINE:
        if key in best:
            lines.append(f"| {label} | {_value(best[key])} | {_interval(best.get(key + '_ci'))} |")
    op = best.get("operating_point")
    if op and op.get("thresholds"):
        test = op["test"]
        thresholds = ", ".join(f"{t:.3f}" for t in op["thresholds"].values())
        lines.append(f"| Operating threshold on p({positive}) | {thresholds} | chosen on validation "
                     f"({op['validation_positives']} positives) |")
        for key in ("sensitivity", "specificity"):
            lines.append(f"| {key.capitalize()} at the threshold | {_value(test[key])} | "
                         f"{_interval(test.get(key + '_ci'))} |")
        if op.get("target"):
            t = op["target"]
            lines.append(f"| {t['name']} (sensitivity >= {t['sensitivity']}, specificity >= "
                         f"{t['specificity']}) | {op.get('verdict', 'n/a')} | read on the intervals: met when "
                         "both lower bounds reach the target, not met when an upper bound is below it |")
    elif op:
        lines.append(f"| Operating threshold on p({positive}) | n/a | {op.get('message', '')} |")
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
