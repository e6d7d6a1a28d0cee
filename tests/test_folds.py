"""k-fold cross-validation (`data.folds`) end to end at tiny settings, stages run in this process."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlab import paths
from cxrlab.data.synthetic import make_dataset
from cxrlab.evaluation.evaluate import predict_checkpoint
from cxrlab.evaluation.folds import fold_loaders, scoring_data
from cxrlab.training import loop
from cxrlab.training.runtime import setup
from stages import compare, download, ensemble, evaluate, plots, prepare, preprocess, split, train
from tests.conftest import TINY, copy_project, set_params

K = 3


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folded(tmp_path_factory) -> Path:
    """One variant (and a one-member ensemble) trained with data.folds: 3 on 12 synthetic images per class."""
    root = tmp_path_factory.mktemp("folds")
    source = make_dataset(root / "source", n_per_class=12, size=32)
    project = copy_project(root / "project")
    set_params(project / "params.yaml", {**TINY, "data.source": str(source), "data.folds": K, "train.epochs": 1,
                                         "experiments": {"baseline": {}},
                                         "ensembles": {"solo": {"members": ["baseline"], "voting": "soft"}}})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        for stage in (download, split, prepare, preprocess):
            stage.main([])
        for stage in (train, evaluate):
            stage.main(["baseline"])
        ensemble.main(["solo"])
        compare.main([])
    return project


def test_each_seed_trains_one_model_per_fold(folded):
    seed_dir = folded / "models" / "baseline" / "seed_42"
    assert sorted(p.name for p in seed_dir.iterdir()) == [f"fold_{f}" for f in range(K)]
    assert all((seed_dir / f"fold_{f}" / f"{w}.pt").is_file() for f in range(K) for w in ("best", "last"))
    summary = json.loads((folded / "metrics" / "train" / "baseline" / "report.json").read_text())
    runs = summary["seeds"]["seed_42"]["folds"]
    assert list(runs) == [f"fold_{f}" for f in range(K)]
    headline = json.loads((folded / "metrics" / "train" / "baseline" / "metrics.json").read_text())
    assert headline["baseline"]["best_epoch"] == pytest.approx(np.mean([r["best"]["epoch"] for r in runs.values()]))
    assert all((folded / paths.train_log("baseline", 42, f) / "plots" / "metrics").is_dir() for f in range(K))


def test_out_of_fold_pool_holds_every_training_image_once(folded):
    train_rows = read_csv(folded / "data" / "split" / "train.csv")
    for name in ("baseline", "solo"):  # the ensemble is scored on the same pool
        pool = read_csv(folded / "metrics" / "evaluate" / name / "val_predictions.csv")
        assert sorted(r["filename"] for r in pool) == sorted(r["filename"] for r in train_rows)
        assert len({r["filename"] for r in pool}) == len(train_rows)
        assert {r["filename"]: r["fold"] for r in pool} == {r["filename"]: r["subset"] for r in train_rows}
        assert all(np.isfinite(float(v)) for r in pool for k, v in r.items() if "_prob_" in k)


def test_threshold_is_chosen_on_every_training_positive(folded):
    report = json.loads((folded / "metrics" / "evaluate" / "baseline" / "report.json").read_text())
    headline = json.loads((folded / "metrics" / "evaluate" / "baseline" / "metrics.json").read_text())
    assert "cross_validation" not in headline and "cross_validation" not in headline["baseline"]
    pool = read_csv(folded / "metrics" / "evaluate" / "baseline" / "val_predictions.csv")
    train_positives = sum(r["class"] == "TB" for r in read_csv(folded / "data" / "split" / "train.csv"))
    assert sum(r["class"] == "TB" for r in pool) == train_positives == 10  # 12 per class, floor(0.2 * 12) test
    op = report["best"]["operating_point"]
    assert op["validation_positives"] == train_positives  # the whole pool, not one fold's
    assert op["thresholds"] and op["thresholds"]["seed_42"] is not None  # >= 9 positives: the rule gives one
    cv = report["cross_validation"]
    assert cv["folds"] == K and set(cv["per_seed"]["seed_42"]["best"]["per_fold"]) == {f"fold_{f}" for f in range(K)}
    per_fold = cv["per_seed"]["seed_42"]["best"]["per_fold"]
    assert sum(r["n"] for r in per_fold.values()) == len(pool)
    accuracy = [r["accuracy"] for r in per_fold.values()]
    assert cv["per_seed"]["seed_42"]["best"]["spread"]["accuracy"]["min"] == min(accuracy)
    assert cv["per_seed"]["seed_42"]["best"]["spread"]["accuracy"]["max"] == max(accuracy)


def test_test_probabilities_are_the_mean_of_the_fold_models(folded, monkeypatch):
    monkeypatch.chdir(folded)
    rt = setup("cpu", False, False, True)
    data = scoring_data(32, rt)
    probs = [predict_checkpoint(paths.checkpoint("baseline", 42, "best", f), data.test.classes, 32, rt,
                                fold_loaders(data, f), "fold")[0] for f in range(K)]
    rows = read_csv(folded / "metrics" / "evaluate" / "baseline" / "predictions.csv")
    written = np.array([[float(r[f"best_prob_{c}"]) for c in data.test.classes] for r in rows])
    assert [r["filename"] for r in rows] == [r["filename"] for r in data.test.rows]
    assert np.allclose(written, np.mean(probs, axis=0), atol=1e-6)
    assert not np.allclose(probs[0], probs[1], atol=1e-6)  # the folds' models differ: the mean is a real mean


def test_plots_average_the_fold_curves(folded, monkeypatch):
    monkeypatch.chdir(folded)
    from stages import flops

    flops.main([])
    plots.main([])
    curves = read_csv(folded / "plots" / "data" / "curves.csv")
    assert any(r.get("val_f1") not in (None, "") for r in curves)
    summary = (folded / "plots" / "summary.md").read_text()
    section = summary.split("## Cross-validation: spread across the fold models", 1)[1]
    assert f"| baseline | seed_42 | {K} | " in section  # the fold spread, beside the test metrics


def test_predict_and_explain_use_the_fold_mean_evaluate_scored(folded, monkeypatch, capsys):
    """predict's probabilities and decisions are evaluate's (the mean of the fold models, at its threshold),
    and the gallery's groups count evaluate's confusion matrix."""
    from cxrlab.cli import predict
    from stages import explain

    monkeypatch.chdir(folded)
    predict.main(["--variant", "baseline", "data/dataset/test", "--out", "preds.csv"])
    out = capsys.readouterr().out
    assert f"the mean of the {K} fold models' probabilities" in out and "p(TB) >= " in out
    mine = {r["file"].rsplit("/", 1)[-1]: r for r in read_csv(folded / "preds.csv")}
    evaluated = read_csv(folded / "metrics" / "evaluate" / "baseline" / "predictions.csv")
    assert len(mine) == len(evaluated) == 4
    for row in evaluated:
        p = mine[row["filename"]]
        for cls in ("Healthy", "TB"):
            assert float(p[f"prob_{cls}"]) == pytest.approx(float(row[f"best_prob_{cls}"]), abs=2e-6)
        assert p["threshold"] == row["best_threshold"] != "" and p["decision"] == row["best_decision"]

    explain.main(["baseline"])
    out = capsys.readouterr().out
    cm = json.loads((folded / "metrics" / "evaluate" / "baseline" / "report.json").read_text())["best"][
        "confusion_matrix"]
    assert (f"true positives {cm['TB']['TB']}, false negatives {cm['TB']['Healthy']}, false positives "
            f"{cm['Healthy']['TB']}, true negatives {cm['Healthy']['Healthy']}") in out
    assert (folded / "explanations" / "baseline" / "gallery.png").is_file()


class Interrupted(Exception):
    """Stands in for a kill: raised after a run's epoch is checkpointed."""


def test_resume_continues_each_fold_from_its_own_state(folded, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    shutil.copytree(folded, project, symlinks=True)
    monkeypatch.chdir(project)
    set_params(project / "params.yaml", {"train.epochs": 2})
    report = loop.report

    def interrupt_fold_1(*args):
        report(*args)
        if args[7] == "baseline seed 42 fold_1" and args[6] == 1:  # name, epoch
            raise Interrupted

    monkeypatch.setattr(loop, "report", interrupt_fold_1)
    with pytest.raises(Interrupted):
        train.main(["baseline"])
    states = project / paths.TRAIN_STATE / "baseline" / "seed_42"
    assert sorted(p.name for p in states.iterdir()) == ["fold_1"]  # fold_0 completed, fold_2 never started
    assert torch.load(paths.train_state("baseline", 42, 1) / "resume.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(loop, "report", report)

    set_params(project / "params.yaml", {"runtime.resume": True})
    capsys.readouterr()
    train.main(["baseline"])
    out = capsys.readouterr().out
    assert "train baseline seed 42 fold_1: resuming after epoch 1" in out
    assert "baseline seed 42 fold_1 epoch 1/2" not in out and "baseline seed 42 fold_1 epoch 2/2" in out
    # each fold its own state: fold_0 completed before the interruption and is kept, fold_2 never started
    assert "train baseline seed 42 fold_0: finished before the interruption" in out
    assert "baseline seed 42 fold_0 epoch" not in out
    assert "fold_2: runtime.resume is on but there is no interrupted run" in out
    assert not (project / paths.TRAIN_STATE).exists()
    runs = json.loads((project / "metrics/train/baseline/report.json").read_text())["seeds"]["seed_42"]["folds"]
    assert [r["epochs_trained"] for r in runs.values()] == [2] * K
