"""Ensembles: two trained tiny variants combined by soft and by hard voting,
evaluated like a variant; and the mistakes `ensembles` in params.yaml can hold."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cxrlab.config.load import load_params
from cxrlab.errors import UserError
from cxrlab.evaluation.ensemble import TIE_BREAK, combine
from stages import ensemble
from tests.conftest import ROOT, prepared_project, run, set_params

MEMBERS = ["baseline", "dropout"]
CLASSES = ["Healthy", "TB"]


def predictions(project: Path, name: str) -> list[dict]:
    with open(project / "metrics/evaluate" / name / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def probs(rows: list[dict], which: str) -> np.ndarray:
    return np.array([[float(r[f"{which}_prob_{c}"]) for c in CLASSES] for r in rows])


def keys(tree: dict, prefix: str = "") -> set[str]:
    """Every dotted key path of a nested dict."""
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= keys(value, f"{prefix}{key}.")
    return out


def run_stages(project: Path, calls: list[tuple[str, ...]]) -> None:
    """Run stage `main()`s one after the other in one fresh interpreter (one torch import, not one per stage)."""
    script = "\n".join(f"from stages import {module}; {module}.main({list(args)!r})" for module, *args in calls)
    run([sys.executable, "-c", script], cwd=project)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Two tiny variants trained and evaluated, one ensemble of both per voting rule, compared."""
    # one epoch (best = last) is enough to check how the members are combined
    project = prepared_project(tmp_path_factory.mktemp("ensemble"),
                               **{"train.epochs": 1, "train.log_test_curve": False})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["experiments"] = {"baseline": {}, "dropout": {"dropout": 0.5}}
    params["ensembles"] = {"pair_soft": {"members": MEMBERS, "voting": "soft"},
                           "pair_hard": {"members": MEMBERS, "voting": "hard"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stages(project, [("train", v) for v in MEMBERS] + [("evaluate", v) for v in MEMBERS]
               + [("ensemble", "pair_soft"), ("ensemble", "pair_hard"), ("compare",)])
    return project


def test_soft_voting_is_the_mean_of_the_members_probabilities(project):
    members = [predictions(project, m) for m in MEMBERS]
    rows = predictions(project, "pair_soft")
    assert [r["filename"] for r in rows] == [r["filename"] for r in members[0]]
    assert {r["seed"] for r in rows} == {"42"}
    for which in ("best", "last"):
        expected = np.mean([probs(m, which) for m in members], axis=0)
        np.testing.assert_allclose(probs(rows, which), expected, atol=1e-5)
        assert [r[f"{which}_predicted"] for r in rows] == [CLASSES[i] for i in expected.argmax(1)]


def test_hard_voting_follows_the_members_votes_and_breaks_ties_by_the_soft_mean(project):
    members = [predictions(project, m) for m in MEMBERS]
    rows = predictions(project, "pair_hard")
    for which in ("best", "last"):
        votes = np.array([[r[f"{which}_predicted"] for r in m] for m in members])  # members x images
        soft = np.mean([probs(m, which) for m in members], axis=0)
        for i, r in enumerate(rows):
            agreed = votes[0, i] == votes[1, i]
            expected = votes[0, i] if agreed else CLASSES[int(soft[i].argmax())]
            assert r[f"{which}_predicted"] == expected, (which, r["filename"])
            share = [np.mean(votes[:, i] == c) for c in CLASSES]
            np.testing.assert_allclose(probs([r], which)[0], share, atol=TIE_BREAK + 1e-6)


def test_a_majority_outvotes_a_more_confident_member():
    # two members lean TB a little, one is sure of Healthy: soft says Healthy, hard says TB
    members = [np.array([[0.45, 0.55]]), np.array([[0.4, 0.6]]), np.array([[0.99, 0.01]])]
    assert combine(members, "soft").argmax(1).tolist() == [0]
    hard = combine(members, "hard")
    assert hard.argmax(1).tolist() == [1]
    np.testing.assert_allclose(hard, [[1 / 3, 2 / 3]], atol=TIE_BREAK)
    assert hard.sum() == pytest.approx(1)


def test_an_ensemble_is_reported_like_a_variant(project):
    variant = json.loads((project / "metrics/evaluate/baseline/report.json").read_text())
    for name, voting in (("pair_soft", "soft"), ("pair_hard", "hard")):
        folder = project / "metrics/evaluate" / name
        m = json.loads((folder / "report.json").read_text())
        assert keys(m) - keys(m["ensemble"], "ensemble.") - {"ensemble"} == keys(variant)
        assert m["ensemble"]["members"] == MEMBERS and m["ensemble"]["voting"] == voting
        assert set(m["ensemble"]["member_epochs"]["dropout"]["best"]) == {"seed_42"}
        assert m["seeds"] == [42] and m["best"]["epoch"] is None
        assert m["best"]["n"] == variant["best"]["n"]
        assert m["best"]["operating_point"]["validation_positives"] == 2  # too few for a threshold
        assert m["best"]["operating_point"]["thresholds"] is None
        for path in ("metrics.json", "predictions.csv", "calibration.csv", "plots/sklearn/confusion_matrix.json",
                     "plots/sklearn/roc.json", "plots/sklearn/precision_recall.json"):
            assert (folder / path).is_file(), path
    comparison = json.loads((project / "metrics/comparison_report.json").read_text())
    assert set(comparison["pairs"]) == {"dropout", "pair_soft", "pair_hard"}
    assert comparison["tests"] == 3 * 3  # three pairs, three metrics: one Holm family
    headline = json.loads((project / "metrics/comparison.json").read_text())
    pair = comparison["pairs"]["pair_soft"]["seed_42_vs_mean_of_42"]
    assert headline["pair_soft"]["f1_diff"] == pair["f1"]["difference"]


def test_an_unknown_ensemble_is_named(project, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(UserError, match=r"unknown ensemble 'pair_sfot' \(did you mean 'pair_soft'\?\)"):
        ensemble.main(["pair_sfot"])


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    return path


def error_for(params_file: Path, ensembles) -> str:
    set_params(params_file, {"ensembles": ensembles})
    with pytest.raises(UserError) as err:
        load_params(params_file)
    return str(err.value)


@pytest.mark.parametrize("ensembles, expected", [
    ({"pair": {"members": ["baseline", "dropuot"], "voting": "soft"}},
     "ensembles.pair.members: unknown variant 'dropuot' (did you mean 'dropout'?)"),
    ({"dropout": {"members": ["baseline", "contrast"], "voting": "soft"}},
     "ensembles.dropout: 'dropout' is also an experiment"),
    ({"pair": {"members": ["baseline", "baseline"], "voting": "soft"}},
     "ensembles.pair.members: members must be distinct variants"),
    ({"pair": {"members": [], "voting": "soft"}}, "ensembles.pair.members: List should have at least 1 item"),
    ({"pair": {"members": ["baseline"], "voting": "majority"}},
     "ensembles.pair.voting: Input should be 'soft' or 'hard'"),
    ({"pair": {"members": ["baseline"], "votng": "soft"}},
     "ensembles.pair.votng: unknown key (did you mean 'voting'?)"),
])
def test_ensemble_mistakes_name_the_key(params_file, ensembles, expected):
    assert expected in error_for(params_file, ensembles)


def test_the_ensembles_section_is_required_and_may_be_empty(params_file):
    set_params(params_file, {"ensembles": {}})
    assert load_params(params_file).ensembles == {}
    params = yaml.safe_load(params_file.read_text())
    del params["ensembles"]
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(UserError, match=r"ensembles: is missing"):
        load_params(params_file)
