"""Command `python -m stages.webapp`: the web page for trained models, on 127.0.0.1.

Starts Streamlit on `app/page.py` from the project root (where `params.yaml`,
`models/` and `metrics/` are), listening on 127.0.0.1 only unless
`--address` says otherwise, with no usage statistics sent and no browser
opened. The helpers below are what the page shows; they read the pipeline's
outputs and never write anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from cxrlab import paths
from cxrlab.config.schema import Params, load_params
from cxrlab.errors import UserError, run_stage
from cxrlab.io.fsio import read_json

PAGE = Path(__file__).resolve().parents[1] / "app" / "page.py"

# (key in the evaluate report, label) of the test metrics the page shows
HEADLINE = (("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
            ("precision", "Precision"), ("f1", "F1"), ("roc_auc", "ROC AUC"))


def trained_variants(params: Params) -> list[str]:
    """The variants of params.yaml whose first seed has a best checkpoint."""
    return [v for v in params.variants if paths.checkpoint(v, params.variant(v).seeds[0], "best").is_file()]


def _interval(ci: dict | None) -> str:
    if not ci or ci.get("low") is None or ci.get("high") is None:
        return "n/a"
    return f"[{ci['low']:.3f}, {ci['high']:.3f}]"


def _value(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def metrics_table(variant: str, params: Params) -> str | None:
    """The variant's test metrics of its best checkpoint with their intervals, as a Markdown table;
    None before evaluate has run."""
    report_path = paths.eval_dir(variant) / "metrics.json"
    if not report_path.is_file():
        return None
    best = read_json(report_path)["best"]
    positive = params.data.positive_class
    level = f"{params.stats.ci_level:.0%} interval"
    lines = [f"| test metric (best checkpoint) | value | {level} |", "|---|---|---|"]
    for key, label in HEADLINE:
        if key in best:
            lines.append(f"| {label} | {_value(best[key])} | {_interval(best.get(key + '_ci'))} |")
    op = best.get("operating_point")
    if op:
        test = op["test"]
        lines.append(f"| Operating threshold on p({positive}) | {op['threshold']:.3f} | chosen on validation |")
        for key in ("sensitivity", "specificity"):
            lines.append(f"| {key.capitalize()} at the threshold | {_value(test[key])} | "
                         f"{_interval(test.get(key + '_ci'))} |")
        lines.append(f"| WHO target (sensitivity >= {op['who_tpp']['sensitivity']}, specificity >= "
                     f"{op['who_tpp']['specificity']}) | {'met' if op['meets_who_tpp'] else 'not met'} | |")
    return "\n".join(lines)


def command(address: str, port: int) -> list[str]:
    """The `streamlit run` command line of the page."""
    return [sys.executable, "-m", "streamlit", "run", str(PAGE),
            "--server.address", address, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--server.runOnSave", "false", "--global.developmentMode", "false",
            "--client.toolbarMode", "minimal", "--theme.base", "light"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1",
                        help="where to listen (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8501)
    args = parser.parse_args(argv)
    params = load_params()  # from the project root: a wrong folder or params file fails here, not in the page
    if not trained_variants(params):
        raise UserError(f"no trained variant in {paths.MODELS}/; run `dvc repro` (or `dvc pull`) first")
    print(f"webapp: http://{args.address}:{args.port} (Ctrl+C stops it)", flush=True)
    code = str(PAGE.parents[1])  # the page imports stages.* from here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}
    os.execve(sys.executable, command(args.address, args.port), env)


if __name__ == "__main__":
    run_stage(main, "webapp")
