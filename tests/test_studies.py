"""The neighbouring studies as params (`studies/*.yaml`), each run end to end at tiny settings,
plus k classes and early stopping.

The stages run in this process, in dvc.yaml's order (`run_pipeline`), to spare a
Python and torch start per stage; DVC's own run of the whole pipeline is test_pipeline's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cxrlab.cli import study
from cxrlab.config import studies
from cxrlab.data.synthetic import make_dataset
from cxrlab.training import loop
from tests.conftest import copy_project, run_pipeline, set_params, write_hub_weights

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.stem for p in (ROOT / "studies").glob("*.yaml"))

# Tiny settings on top of a study: 32 px, 3 epochs, 8 images per class.
TINY_STUDY = {"data.image_size": 32, "train.epochs": 3, "train.batch_size": 8, "evaluate.batch_size": 32,
              "stats.resamples": 200}


def study_project(tmp_path: Path, name: str, n_per_class: int = 8, **changes) -> Path:
    """A project copy with study `name` applied by its command, tiny settings, and generated data
    in a folder per class of the study."""
    project = copy_project(tmp_path / "project")
    (project / "studies").mkdir(exist_ok=True)  # copy_project copies studies/ too
    (project / "studies" / f"{name}.yaml").write_text((ROOT / "studies" / f"{name}.yaml").read_text())
    import os
    cwd = os.getcwd()
    os.chdir(project)
    try:
        study.main([name])
    finally:
        os.chdir(cwd)
    classes = yaml.safe_load((project / "params.yaml").read_text())["data"]["classes"]
    layout = {c: (folder, f"{folder.lower()[:3]}") for c, folder in classes.items()}
    source = make_dataset(tmp_path / "source", n_per_class=n_per_class, size=32, layout=layout, subdir="")
    set_params(project / "params.yaml", {**TINY_STUDY, "data.source": str(source), **changes})
    return project


def report(project: Path, variant: str) -> dict:
    return json.loads((project / "metrics" / "evaluate" / variant / "report.json").read_text())


def train_summary(project: Path, variant: str) -> dict:
    return json.loads((project / "metrics" / "train" / variant / "report.json").read_text())["seeds"]["seed_42"]


def log_column(project: Path, variant: str, metric: str) -> list[float]:
    tsv = project / "metrics" / "train" / variant / "seeds" / "seed_42" / "plots" / "metrics" / f"{metric}.tsv"
    with open(tsv) as f:
        return [float(r[metric.rsplit("/", 1)[-1]]) for r in csv.DictReader(f, delimiter="\t")]


def check_complete(project: Path, params: dict) -> None:
    classes = list(params["data"]["classes"])
    for variant in [*params["experiments"], *params["ensembles"]]:
        m = report(project, variant)["best"]
        assert list(m["confusion_matrix"]) == classes
        assert all(list(row) == classes for row in m["confusion_matrix"].values())
        assert sum(sum(row.values()) for row in m["confusion_matrix"].values()) == m["n"]
        assert set(m["per_class"]["recall"]) == set(classes) and 0 <= m["macro"]["f1"] <= 1
    flops_report = json.loads((project / "metrics" / "flops_report.json").read_text())["variants"]
    for variant, cfg in params["experiments"].items():
        assert flops_report[variant]["arch"] == cfg.get("arch", params["train"]["arch"])
    comparison = json.loads((project / "metrics" / "comparison_report.json").read_text())
    assert comparison["reference"] == params["compare"]["reference"]
    assert (project / "plots" / "summary.md").is_file()


@pytest.fixture
def hub(hub_cache, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(hub_cache))
    return lambda *archs: [write_hub_weights(hub_cache, a) for a in archs]


def test_the_study_command_lists_applies_and_validates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    study.main(["--list"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in STUDIES) and len(STUDIES) == 4

    original = (ROOT / "params.yaml").read_text()
    applied = yaml.safe_load(studies.apply(studies.read_study("covid4_transfer"), original))
    assert list(applied["experiments"]) == ["resnet152_head", "resnet50_finetune", "vit_b16_head"]
    assert list(applied["data"]["classes"]) == ["COVID-19", "Normal", "Pneumonia", "Tuberculosis"]
    assert applied["train"]["lr"] == yaml.safe_load(original)["train"]["lr"]  # keys it does not name stay
    assert "# Every knob of the pipeline" in studies.apply({"train": {"lr": 0.1}}, original)  # comments stay

    project = copy_project(tmp_path / "p")
    (project / "studies").mkdir(exist_ok=True)  # copy_project copies studies/ too
    (project / "studies" / "broken.yaml").write_text("train:\n  scheduler: cosinus\n")
    monkeypatch.chdir(project)
    with pytest.raises(Exception, match="(?s)study broken does not give valid params.*train.scheduler"):
        study.main(["broken"])
    assert (project / "params.yaml").read_text() == original  # nothing written
    with pytest.raises(Exception, match="no study .nope.*broken"):
        study.main(["nope"])


@pytest.mark.slow
def test_covid4_study_four_classes(tmp_path, monkeypatch, hub):
    hub("resnet152", "resnet50", "vit_b_16")
    project = study_project(tmp_path, "covid4_transfer", **{"experiments.resnet50_finetune.warmup_epochs": 1})
    params = run_pipeline(project, monkeypatch)
    check_complete(project, params)
    m = report(project, "resnet50_finetune")["best"]
    assert len(m["confusion_matrix"]) == 4
    assert "operating_point" not in m  # a threshold on one class's probability is for two classes only
    # only the new head trains: Linear 1000->256 and 256->4 on the ImageNet classifier
    assert train_summary(project, "resnet152_head")["trainable_params"] == 1000 * 256 + 256 + 256 * 4 + 4
    assert train_summary(project, "vit_b16_head")["trainable_params"] == 768 * 4 + 4
    # warm-up (1 epoch at tiny settings) then cosine down to lr x final_lr_fraction
    assert log_column(project, "resnet50_finetune", "lr") == pytest.approx([0.5e-4, 1e-4, 1e-7])


@pytest.mark.slow
def test_shufflenet_study_logs_per_class_metrics_every_epoch(tmp_path, monkeypatch, hub):
    hub("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0")
    project = study_project(tmp_path, "shufflenet_transfer")
    params = run_pipeline(project, monkeypatch)
    check_complete(project, params)
    for metric in ("precision", "recall", "specificity", "f1"):
        assert len(log_column(project, "shufflenet_x0_5", f"val/TB/{metric}")) == 3
    lr = log_column(project, "shufflenet_x2_0", "lr")
    assert lr == pytest.approx([0.01, 0.01 * (0.001 + 0.999 * 0.5), 0.01 * 0.001])  # cosine to lr x lrf


@pytest.mark.slow
def test_resnet_guide_study_freezing_progressive_and_ensembles(tmp_path, monkeypatch, hub):
    hub("resnet50")
    phases = [{"epoch": 1, "freeze": "head_only", "lr_factor": 10.0},
              {"epoch": 2, "freeze": "up_to:layer2", "lr_factor": 1.0},
              {"epoch": 3, "freeze": "none", "lr_factor": 0.1}]
    project = study_project(tmp_path, "resnet_finetune_guide", **{"experiments.progressive.progressive": phases})
    params = run_pipeline(project, monkeypatch)
    check_complete(project, params)
    trainable = log_column(project, "progressive", "trainable_params")
    assert trainable[0] == 2048 * 2 + 2 and trainable[0] < trainable[1] < trainable[2] == 23_512_130
    assert log_column(project, "progressive", "lr") == pytest.approx([0.01, 0.001, 0.0001])
    assert log_column(project, "head_only", "trainable_params") == [2048 * 2 + 2] * 3
    for name in ("soft_vote", "hard_vote"):
        assert report(project, name)["best"]["n"] == report(project, "full")["best"]["n"]


@pytest.mark.slow
def test_skin_lesion_study_accumulates_and_decays_exponentially(tmp_path, monkeypatch, hub):
    hub("resnet18", "resnet34", "resnet50")
    project = study_project(tmp_path, "skin_lesion_resnet", n_per_class=10)
    params = run_pipeline(project, monkeypatch)
    check_complete(project, params)
    assert log_column(project, "resnet34", "lr") == pytest.approx([1e-4, 0.98e-4, 0.98 ** 2 * 1e-4])
    m = report(project, "resnet18")["best"]
    assert 0 <= m["roc_auc"] <= 1 and m["operating_point"]["target_sensitivity"] == 0.9  # two classes


THREE = {"Healthy": ("health", "h"), "TB": ("tb", "tb"), "Pneumonia": ("pneu", "p")}


@pytest.mark.slow
def test_three_classes_end_to_end_with_weights_sampler_and_early_stopping(tmp_path, monkeypatch):
    source = make_dataset(tmp_path / "source", n_per_class=10, size=32, layout=THREE)
    project = copy_project(tmp_path / "project")
    set_params(project / "params.yaml", {
        **TINY_STUDY, "data.source": str(source), "data.classes": {c: f for c, (f, _) in THREE.items()},
        "train.arch": "resnet18", "train.epochs": 5, "train.patience": 2, "train.class_weights": "inverse_frequency",
        "train.balanced_sampler": True, "experiments": {"baseline": {}}, "ensembles": {},
        "compare.reference": "baseline"})
    # a plateau: validation metrics that never improve after the first epoch
    frozen = {}

    def plateau(y, prob, classes, positive):
        frozen.setdefault("m", real(y, prob, classes, positive))
        return frozen["m"]

    real = loop.classification_metrics
    monkeypatch.setattr(loop, "classification_metrics", plateau)
    params = run_pipeline(project, monkeypatch)
    check_complete(project, params)
    m = report(project, "baseline")["best"]
    assert np.array([list(r.values()) for r in m["confusion_matrix"].values()]).shape == (3, 3)
    assert set(m["macro"]) >= {"precision", "recall", "specificity", "f1"} and "f1_ci" in m["macro"]
    summary = train_summary(project, "baseline")
    assert summary["best"]["epoch"] == 1 and summary["epochs_trained"] == 3  # stopped 2 epochs after the best
    assert len(log_column(project, "baseline", "train/loss")) == 3
