"""Split options: `data.split` random and grouped, `data.group_by` (a regex or a table), the group report."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from cxrlab.data.groups import apportion
from cxrlab.errors import UserError
from stages import split
from tests.conftest import set_params
from tests.test_split import placeholder_tree, read_csv

SOURCE = r"regex:^([A-Z]+)_"
PATIENT = r"regex:^(p\d+)_"


def two_hospitals(raw) -> None:
    """Shenzhen-like (CHNCXR, 40 + 40) and Montgomery-like (MCUCXR, 10 + 10) images in two class folders:
    by ID, CHNCXR sorts first, so the study's split puts only CHNCXR images in the test set."""
    names = [f"normal/CHNCXR_{i:04d}_0.png" for i in range(40)] + [f"tb/CHNCXR_{i:04d}_1.png" for i in range(40, 80)]
    names += [f"normal/MCUCXR_{i:04d}_0.png" for i in range(10)] + [f"tb/MCUCXR_{i:04d}_1.png" for i in range(10, 20)]
    placeholder_tree(raw, names)


def patients(raw) -> dict[str, str]:
    """60 patients with 1 to 4 images each; some patients have images in both classes. {file name: patient}."""
    owner = {}
    for p in range(60):
        for j in range(1 + p % 4):
            cls = "tb" if (p + j) % 3 == 0 else "normal"
            name = f"p{p}_{j}.png"
            placeholder_tree(raw, [f"{cls}/{name}"])
            owner[name] = f"p{p}"
    return owner


def rows(project) -> list[dict]:
    return read_csv(project / "data/split/test.csv") + read_csv(project / "data/split/train.csv")


def report(project) -> dict:
    return json.loads((project / "metrics/split_report.json").read_text())


CLASSES = {"data.classes": {"Healthy": "normal", "TB": "tb"}}


def test_the_studys_split_warns_when_a_source_is_missing_from_test(in_project, capsys):
    two_hospitals(in_project / "data/raw")
    set_params(in_project / "params.yaml", {**CLASSES, "data.group_by": SOURCE})
    split.main([])
    test = read_csv(in_project / "data/split/test.csv")
    assert {r["filename"][:6] for r in test} == {"CHNCXR"}  # by ID: every test image from one hospital
    groups = report(in_project)["groups"]
    assert groups["missing_from_test"] == ["MCUCXR"]
    mcu = groups["per_group"]["MCUCXR"]
    assert mcu["test"] == 0 and mcu["train"] + mcu["val"] == 20 and groups["per_group"]["CHNCXR"]["test"] == 20
    out = capsys.readouterr().out
    assert "warning: 1 group(s) have no test image, e.g. 'MCUCXR'" in out and "data.split: random" in out


def test_a_random_split_within_sources_has_every_source_in_test(in_project, capsys):
    two_hospitals(in_project / "data/raw")
    set_params(in_project / "params.yaml", {**CLASSES, "data.group_by": SOURCE, "data.split": "random"})
    split.main([])
    test = read_csv(in_project / "data/split/test.csv")
    # per class floor(0.2 * 50) = 10 test images, apportioned to the sources by size: 8 CHNCXR + 2 MCUCXR
    assert Counter((r["class"], r["filename"][:6]) for r in test) == {
        ("Healthy", "CHNCXR"): 8, ("Healthy", "MCUCXR"): 2, ("TB", "CHNCXR"): 8, ("TB", "MCUCXR"): 2}
    assert report(in_project)["groups"]["missing_from_test"] == []
    assert "warning" not in capsys.readouterr().out
    first = rows(in_project)
    split.main([])  # seeded: the same draw
    assert rows(in_project) == first
    set_params(in_project / "params.yaml", {"data.seed": 7})
    split.main([])
    assert {r["filename"] for r in read_csv(in_project / "data/split/test.csv")} != {r["filename"] for r in test}


def test_a_random_split_without_groups_draws_the_studys_counts(in_project):
    two_hospitals(in_project / "data/raw")
    set_params(in_project / "params.yaml", {**CLASSES, "data.split": "random"})
    split.main([])
    test = read_csv(in_project / "data/split/test.csv")
    assert Counter(r["class"] for r in test) == {"Healthy": 10, "TB": 10}
    assert {r["filename"][:6] for r in test} == {"CHNCXR", "MCUCXR"}  # not the first by ID
    assert "groups" not in report(in_project)


@pytest.mark.parametrize("folds", [None, 3])
def test_a_grouped_split_never_puts_one_patient_in_two_splits(in_project, folds):
    owner = patients(in_project / "data/raw")
    set_params(in_project / "params.yaml", {**CLASSES, "data.group_by": PATIENT, "data.split": "grouped",
                                            "data.val_fraction": 0.25, "data.folds": folds})
    split.main([])
    subsets = defaultdict(set)
    for r in rows(in_project):
        subsets[owner[r["filename"]]].add(r["subset"])
    assert all(len(s) == 1 for s in subsets.values()), {p: s for p, s in subsets.items() if len(s) > 1}
    used = Counter(s for ss in subsets.values() for s in ss)
    expected = {"test", "train", "val"} if folds is None else {"test", "fold_0", "fold_1", "fold_2"}
    assert set(used) == expected
    assert 60 // 5 - 3 <= used["test"] <= 60 // 5 + 3  # about a fifth of the patients (0.2 -> 5 parts)
    rep = report(in_project)
    assert rep["split"] == {"how": "grouped", "group_by": PATIENT}
    assert rep["groups"]["count"] == 60 and rep["groups"]["in_test_and_training"] == 0
    assert rep["groups"]["missing_from_test"] == []  # whole groups: being absent from test is the point
    assert {c: rep["classes"][c]["test"]["count"] > 0 for c in ("Healthy", "TB")} == {"Healthy": True, "TB": True}


def test_groups_from_a_table_shipped_with_the_dataset(in_project):
    owner = patients(in_project / "data/raw")
    table = "Image Index,Patient ID\n" + "".join(f"{n},{p}\n" for n, p in owner.items())
    (in_project / "data/raw/meta.csv").write_text(table)
    set_params(in_project / "params.yaml", {**CLASSES, "data.split": "grouped",
                                            "data.group_by": "csv:meta.csv:Image Index:Patient ID"})
    split.main([])
    seen = defaultdict(set)
    for r in rows(in_project):
        seen[owner[r["filename"]]].add(r["subset"] == "test")
    assert all(len(s) == 1 for s in seen.values())

    set_params(in_project / "params.yaml", {"data.group_by": "csv:meta.csv:Image Index:Patient"})
    with pytest.raises(UserError, match=r"data.group_by: .*meta.csv has no column 'Patient'"):
        split.main([])
    set_params(in_project / "params.yaml", {"data.group_by": "csv:../../params.yaml:a:b"})
    with pytest.raises(UserError, match=r"'../../params.yaml' is not a file under data/raw"):
        split.main([])


def test_files_no_group_is_found_for_are_named(in_project):
    two_hospitals(in_project / "data/raw")
    placeholder_tree(in_project / "data/raw", ["tb/xray_9.png"])
    set_params(in_project / "params.yaml", {**CLASSES, "data.group_by": SOURCE})
    with pytest.raises(UserError, match=r"finds no group for 1 of 101 images, e.g. 'xray_9.png'"):
        split.main([])
    assert not (in_project / "data/split").exists()


@pytest.mark.parametrize("changes, message", [
    ({"data.split": "grouped"}, r"data.*split: grouped needs data.group_by"),
    ({"data.group_by": "regex:(["}, r"data.group_by.*not a regular expression"),
    ({"data.group_by": "patient"}, r"data.group_by.*regex:<pattern> or csv:"),
    ({"data.split": "stratified"}, r"data.split"),
])
def test_bad_split_params_name_the_key(in_project, changes, message):
    set_params(in_project / "params.yaml", changes)
    with pytest.raises(UserError, match=message):
        split.main([])


def test_too_few_groups_for_the_parts_is_one_line(in_project):
    two_hospitals(in_project / "data/raw")
    set_params(in_project / "params.yaml", {**CLASSES, "data.group_by": SOURCE, "data.split": "grouped"})
    with pytest.raises(UserError, match=r"data.test_fraction asks for 5 parts of whole groups, but .* only 2"):
        split.main([])


def test_apportion_is_proportional_and_exact():
    assert apportion(10, {"a": 40, "b": 10}) == {"a": 8, "b": 2}
    assert apportion(3, {"a": 1, "b": 1, "c": 1, "d": 1}) == {"a": 1, "b": 1, "c": 1, "d": 0}
    assert sum(apportion(7, {"x": 5, "y": 3, "z": 1}).values()) == 7
    assert apportion(5, {"a": 1, "b": 9})["a"] <= 1
