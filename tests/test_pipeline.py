"""End to end: `dvc repro` of the whole pipeline in a temporary git repository,
then an experiment on one variant, `dvc metrics diff` and `dvc plots show`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import MINI, TINY, copy_project, dvc, git_repo, run, set_params
from tests.synthetic import make_dataset

VARIANTS = ["baseline", "regu_penalty", "dropout", "sharpness", "contrast"]


def declared_outputs(project: Path) -> list[Path]:
    """Every out, metric and plot file that dvc.lock records."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return [project / out["path"] for st in lock["stages"].values() for out in st.get("outs", [])]


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    source = make_dataset(root / "source", n_per_class=30, size=48)
    project = copy_project(root / "project")
    set_params(project / "params.yaml", {**TINY, "data.source": str(source)})
    git_repo(project)
    result = dvc("repro", cwd=project)
    return project, result.stdout + result.stderr


def test_repro_runs_every_stage_and_writes_every_output(reproduced):
    project, output = reproduced
    expected = {"download", "split", "prepare", "preprocess", "flops", "plots"}
    expected |= {f"{s}@{v}" for s in ("train", "evaluate") for v in VARIANTS}
    assert ran_stages(output) == expected

    outputs = declared_outputs(project)
    # download 1, split 2, prepare 1, preprocess 1, train 3 and evaluate 5 per variant, flops 1, plots 1
    assert len(outputs) == 5 + 5 * (3 + 5) + 2
    for path in outputs:
        assert path.exists(), path
    for v in VARIANTS:
        for name in ("best.pt", "last.pt"):
            assert (project / "models" / v / name).is_file()
        for name in ("confusion_matrix.json", "roc.json", "precision_recall.json"):
            assert (project / "metrics/evaluate" / v / "plots/sklearn" / name).is_file()
    for name in ("training_curves.png", "test_metrics.png", "confusion_matrices.png", "roc_curves.png",
                 "summary.md", "data/curves.csv", "data/roc.csv"):
        assert (project / "plots" / name).is_file(), name
    assert "Data and pipelines are up to date" in dvc("status", cwd=project).stdout


def test_metrics_are_complete_and_in_range(reproduced):
    project, _ = reproduced
    split = json.loads((project / "metrics/split.json").read_text())
    assert split["total"] == {"test": 12, "train": 48, "of_which_val": 4}  # 30 per class: 6 test, 24 train
    for v in VARIANTS:
        m = json.loads((project / "metrics/evaluate" / v / "metrics.json").read_text())
        for which in ("best", "last"):
            r = m[which]
            assert 1 <= r["epoch"] <= 2
            for key in ("accuracy", "f1", "sensitivity", "specificity", "precision", "roc_auc"):
                assert 0 <= r[key] <= 1, (v, which, key)
            assert set(r["per_class"]["recall"]) == {"Healthy", "TB"}
            assert sum(sum(row.values()) for row in r["confusion_matrix"].values()) == 12
        train = json.loads((project / "metrics/train" / v / "metrics.json").read_text())
        assert train["best"]["epoch"] == m["best"]["epoch"]
        assert train["study_protocol"]["epoch"] in (1, 2)
        with open(project / "metrics/evaluate" / v / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 12
        for r in rows:
            assert float(r["best_prob_Healthy"]) + float(r["best_prob_TB"]) == pytest.approx(1, abs=2e-6)
    flops = json.loads((project / "metrics/flops.json").read_text())
    assert flops["variants"]["baseline"]["parameters"] == 11_177_538  # resnet18, 2 classes
    assert flops["variants"]["baseline"]["flops"] == 2 * flops["variants"]["baseline"]["macs"] > 0
    summary = (project / "plots/summary.md").read_text()
    assert all(f"| {v} |" in summary for v in VARIANTS)


def test_experiment_on_one_variant_reruns_only_it(reproduced):
    project, _ = reproduced
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-qm", "reproduced"], cwd=project)
    # '+' adds a key the variant does not set yet (Hydra's override syntax)
    result = dvc("exp", "run", "-S", "+experiments.contrast.lr=0.003", cwd=project)
    # no other variant trains or evaluates again; flops and plots (seconds) read every variant
    assert ran_stages(result.stdout) == {"train@contrast", "evaluate@contrast", "flops", "plots"}

    diff = dvc("metrics", "diff", cwd=project).stdout  # what changed against HEAD
    assert "metrics/evaluate/contrast/metrics.json" in diff
    assert "metrics/train/contrast/metrics.json" in diff
    for other in VARIANTS[:-1]:
        assert other not in diff

    params_diff = dvc("params", "diff", cwd=project).stdout
    assert "experiments.contrast.lr" in params_diff and "0.003" in params_diff

    out = project / "rendered"
    dvc("plots", "show", "-o", str(out), cwd=project)
    html = (out / "index.html").read_text()
    assert "Validation F1 per epoch" in html and '"field": "variant"' in html
    assert "confusion_matrices.png" in html


@pytest.mark.skipif(not MINI.is_dir(), reason="../shared/data/tb-cxr-mini is not present")
def test_repro_on_real_chest_xrays(tmp_path):
    project = copy_project(tmp_path / "project")
    set_params(project / "params.yaml", {**TINY, "data.source": str(MINI), "data.image_size": 64,
                                         "data.classes": {"Healthy": "Healthy", "TB": "TB"}})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["experiments"] = {"baseline": {}, "contrast": params["experiments"]["contrast"]}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_repo(project)
    dvc("repro", cwd=project)
    split = json.loads((project / "metrics/split.json").read_text())
    assert split["classes"]["Healthy"]["test"] == {"count": 12, "first": "CHNCXR_0005_0.png",
                                                   "last": "CHNCXR_0045_0.png"}
    assert split["classes"]["TB"]["train"]["count"] == 48
    for path in declared_outputs(project):
        assert path.exists(), path
    m = json.loads((project / "metrics/evaluate/contrast/metrics.json").read_text())
    assert m["best"]["n"] == 24
