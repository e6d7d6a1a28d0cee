"""External validation (params `external`) and the model card, on a copy of the trained fixture.

A shifted synthetic set (brighter images, smaller blobs, other folder-name case) is added with the documented
one-line `dvc exp run -S '+external.<name>=...'`: only its two new stages may run, and the external numbers
must carry the internal threshold over. The card is then written in this process and every number in it is
traced back to the files it reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from cxrlab.evaluation.stats import verdict
from tests.conftest import dvc, run, set_params


def _in(project: Path, fn):
    here = os.getcwd()
    os.chdir(project)
    try:
        return fn()
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def external(trained_project, tmp_path_factory) -> tuple[Path, str]:
    """(project, DVC's output of adding the set): the trained fixture with one variant, a shifted set added."""
    from cxrlab.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("external")
    project = root / "project"
    shutil.copytree(trained_project, project, symlinks=True)
    # one variant, no ensemble: the card's `metrics/external` dep then needs no other variant trained
    set_params(project / "params.yaml", {"experiments": {"baseline": {}}, "ensembles": {},
                                         "compare.reference": "baseline"})
    run(["git", "commit", "-qam", "one variant"], cwd=project)
    shifted = make_dataset(root / "hospital2", n_per_class=12, size=64, seed=7, subdir="export",
                           layout={"Healthy": ("HEALTH", "h"), "TB": ("Tb", "t")}, brightness=40, blob_scale=0.7)
    out = dvc("exp", "run", "-S", f"+external.shifted={{source: {shifted}, classes: auto}}",
              "external@baseline-shifted", cwd=project)
    return project, out.stdout + out.stderr


def test_adding_a_set_runs_only_its_stages_and_carries_the_threshold_over(external):
    project, output = external
    ran = re.findall(r"Running stage '([^']+)'", output)
    assert ran == ["external_data@shifted", "external@baseline-shifted"], output  # nothing retrained or re-scored
    assert "Stage 'train@baseline' didn't change" in output and "Stage 'evaluate@baseline' didn't change" in output

    meta = json.loads((project / "data/external/shifted/meta.json").read_text())
    assert meta["counts"] == {"Healthy": 12, "TB": 12} and meta["folders"] == {"Healthy": "export/HEALTH",
                                                                                "TB": "export/Tb"}
    headline = json.loads((project / "metrics/external/shifted/baseline/metrics.json").read_text())
    numbers = headline["shifted"]["baseline"]
    assert {"roc_auc", "sensitivity", "roc_auc_drop", "roc_auc_drop_low", "roc_auc_drop_high"} <= set(numbers)
    assert all(isinstance(v, (int, float)) for v in numbers.values())

    internal = json.loads((project / "metrics/evaluate/baseline/report.json").read_text())
    report = json.loads((project / "metrics/external/shifted/baseline/report.json").read_text())
    thresholds = internal["best"]["operating_point"]["thresholds"]
    assert thresholds and report["best"]["operating_point"]["thresholds"] == thresholds
    assert report["best"]["n"] == 24
    # the external decisions are those of the internal threshold
    rows = (project / "metrics/external/shifted/baseline/predictions.csv").read_text().splitlines()[1:]
    assert rows and all(float(r.split(",")[-2]) == thresholds["seed_42"] for r in rows)


def test_differences_are_internal_minus_external_with_intervals_around_them(external):
    project, _ = external
    internal = json.loads((project / "metrics/evaluate/baseline/report.json").read_text())["best"]
    report = json.loads((project / "metrics/external/shifted/baseline/report.json").read_text())
    diffs = report["internal_minus_external"]
    assert set(diffs) >= {"argmax", "operating_point"}
    for where in ("argmax", "operating_point"):
        for name, d in diffs[where].items():
            assert d["low"] <= d["difference"] <= d["high"], (where, name, d)
            assert d["difference"] == pytest.approx(d["internal"] - d["external"])
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        argmax = internal.get("argmax", {})  # the threshold-free roc_auc is not repeated there
        assert diffs["argmax"][name]["internal"] == pytest.approx(argmax.get(name, internal[name]))
        assert diffs["argmax"][name]["external"] == pytest.approx(report["best"][name])
    op = diffs["operating_point"]["sensitivity"]
    assert op["internal"] == pytest.approx(internal["operating_point"]["test"]["sensitivity"])
    assert op["external"] == pytest.approx(report["best"]["operating_point"]["test"]["sensitivity"])


def _leaves(value, out: set[str]) -> None:
    """Every number in a JSON/YAML tree, as the card may print it (as is, or with 4 decimals)."""
    if isinstance(value, dict):
        for v in value.values():
            _leaves(v, out)
    elif isinstance(value, list):
        for v in value:
            _leaves(v, out)
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        out.add(str(value))
    elif isinstance(value, float):
        out |= {f"{value:.4f}", repr(value)}


def test_every_number_of_the_card_is_read_from_the_outputs(external):
    from stages import card, flops

    project, _ = external
    _in(project, lambda: flops.main([]))
    _in(project, lambda: card.main(["baseline"]))
    text = (project / "cards/baseline.md").read_text()
    sources = ["metrics/evaluate/baseline/report.json", "metrics/external/shifted/baseline/report.json",
               "metrics/split_report.json", "metrics/flops_report.json", "metrics/train/baseline/report.json"]
    allowed: set[str] = set()
    for path in sources:
        _leaves(json.loads((project / path).read_text()), allowed)
    _leaves(yaml.safe_load((project / "params.yaml").read_text()), allowed)
    prose = re.sub(r"`[^`]*`", "", text)  # code spans: paths, hashes, the git revision
    numbers = re.findall(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?![\w.]?\d)", prose)
    assert len(numbers) > 40, numbers
    stray = sorted({n for n in numbers if n not in allowed})
    assert not stray, f"numbers in the card not found in its sources: {stray}"
    for must in ("Not for clinical use", "## External validation", "### shifted", "Verdict on the external set",
                 "models/baseline", "## Limitations"):
        assert must in text, must
    assert "SYNTHETIC" not in text  # a local folder: the card cannot know it is synthetic

    # the demo source is said plainly (the card reads data.source; nothing is rerun)
    set_params(project / "params.yaml", {"data.source": "demo"})
    _in(project, lambda: card.main(["baseline"]))
    assert "**SYNTHETIC DATA.**" in (project / "cards/baseline.md").read_text()


def test_a_training_class_missing_from_the_external_set_is_one_clear_line(external, tmp_path):
    from cxrlab.config.load import load_params
    from cxrlab.data.external import prepare_external
    from cxrlab.data.synthetic import make_dataset
    from cxrlab.errors import UserError

    project, _ = external
    only_healthy = make_dataset(tmp_path / "h", n_per_class=3, size=32, layout={"Healthy": ("health", "h"),
                                                                                 "Other": ("normal", "n")})
    set_params(project / "params.yaml", {"external.bad": {"source": str(only_healthy), "classes": "auto"}})
    with pytest.raises(UserError) as err:
        _in(project, lambda: prepare_external("bad", load_params()))
    message = str(err.value)
    assert "\n" not in message and "external.bad" in message and "'TB'" in message and "classes=" in message
    assert not (project / "data/external/bad").exists()


@pytest.mark.parametrize(("low", "high", "expected"), [
    (0.90, 0.99, "met"),             # the lower bound reaches the target exactly
    (0.8999, 0.99, "inconclusive"),  # just below it
    (0.50, 0.8999, "not met"),       # the upper bound just below the target
    (0.50, 0.90, "inconclusive"),    # the upper bound on it
    (None, 0.99, "inconclusive"),
    (0.95, None, "inconclusive"),
])
def test_verdict_boundaries(low, high, expected):
    assert verdict(low, high, 0.90) == expected


def test_guard_resolves_matrix_stage_params(tmp_path):
    from cxrlab.config import guard

    dvc_file = Path(__file__).resolve().parents[1] / "dvc.yaml"
    keys = guard.stage_params("external@dropout-x", dvc_file, ["dropout", "x"])
    assert "experiments.dropout" in keys and not any("${" in k for k in keys)
    keys = guard.stage_params("external_ensemble@all_variants-x", dvc_file, ["all_variants", "x"])
    assert "ensembles.all_variants" in keys
