"""The split: the study's exact per-class split by ID, and the validation hold-out."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from cxrlab.data import split as split_lib
from cxrlab.data.images import natural_key
from cxrlab.data.layout import find_class_folders, list_class
from cxrlab.errors import UserError
from stages import split
from tests.conftest import set_params

TBX11K_LIST = Path(__file__).parent / "data" / "tbx11k_health_tb.txt"


def tiny_png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (32, 32), 128).save(out, format="PNG")  # data.min_image_side is 32
    return out.getvalue()


PNG = tiny_png()


def placeholder_tree(root: Path, names: list[str]) -> None:
    """The files `names` under `root`: a valid 32 x 32 PNG for image names, empty otherwise."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG if name.endswith(".png") else b"")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tbx11k(in_project):
    """data/raw laid out like the Kaggle download, with TBX11K's real file names."""
    names = TBX11K_LIST.read_text().split()
    raw = in_project / "data" / "raw" / "TBX11K" / "imgs"
    placeholder_tree(raw, names + ["sick/s0001.png", "test/unknown_1.png"])
    placeholder_tree(in_project / "data" / "raw" / "TBX11K", ["lists/TBX11K_trainval.txt"])
    (raw / "tb" / ".DS_Store").touch()
    return in_project


def test_tbx11k_split_matches_the_study_exactly(tbx11k):
    split.main([])
    report = json.loads((tbx11k / "metrics" / "split_report.json").read_text())
    healthy, tb = report["classes"]["Healthy"], report["classes"]["TB"]
    assert healthy["folder"] == "TBX11K/imgs/health" and tb["folder"] == "TBX11K/imgs/tb"
    assert healthy["test"] == {"count": 760, "first": "h0001.png", "last": "h0993.png"}
    assert tb["test"] == {"count": 160, "first": "tb0003.png", "last": "tb0248.png"}
    assert {k: healthy["train"][k] for k in ("count", "first", "last")} == \
        {"count": 3040, "first": "h0995.png", "last": "h5000.png"}
    assert {k: tb["train"][k] for k in ("count", "first", "last")} == \
        {"count": 640, "first": "tb0250.png", "last": "tb1199.png"}
    assert report["ignored_files"] == 1  # the .DS_Store

    # exact membership: per class, the first 20 % by ID are test, the rest train
    names = TBX11K_LIST.read_text().split()
    for cls, folder, label, k in (("Healthy", "health", 0, 760), ("TB", "tb", 1, 160)):
        ids = sorted((Path(n).name for n in names if n.startswith(folder + "/")), key=natural_key)
        test = [r for r in read_csv(tbx11k / "data/split/test.csv") if r["class"] == cls]
        train = [r for r in read_csv(tbx11k / "data/split/train.csv") if r["class"] == cls]
        assert [r["filename"] for r in test] == ids[:k]
        assert [r["filename"] for r in train] == ids[k:]
        assert {r["label"] for r in test + train} == {str(label)}
        assert all(r["path"] == f"TBX11K/imgs/{folder}/{r['filename']}" for r in test + train)


def test_validation_hold_out_is_stratified_seeded_and_inside_train(tbx11k):
    split.main([])
    first = read_csv(tbx11k / "data/split/train.csv")
    val = [r for r in first if r["subset"] == "val"]
    assert sum(r["class"] == "Healthy" for r in val) == 304  # round(0.1 * 3040)
    assert sum(r["class"] == "TB" for r in val) == 64  # round(0.1 * 640)
    assert {r["subset"] for r in read_csv(tbx11k / "data/split/test.csv")} == {"test"}

    split.main([])  # same seed: same hold-out
    assert read_csv(tbx11k / "data/split/train.csv") == first
    set_params(tbx11k / "params.yaml", {"data.seed": 7})
    split.main([])
    other = {r["filename"] for r in read_csv(tbx11k / "data/split/train.csv") if r["subset"] == "val"}
    assert other != {r["filename"] for r in val}
    assert len(other) == len(val)


def test_folds_hold_every_training_image_once_stratified_seeded_and_never_a_test_image(tbx11k):
    set_params(tbx11k / "params.yaml", {"data.folds": 3, "data.max_per_class": 200})
    split.main([])
    train = read_csv(tbx11k / "data/split/train.csv")
    test = read_csv(tbx11k / "data/split/test.csv")
    # the training part is the one of the hold-out split (first 20 % by ID are test), now wholly in folds
    assert len(train) == 2 * 160 and len(test) == 2 * 40
    assert {r["subset"] for r in train} == {"fold_0", "fold_1", "fold_2"}
    assert {r["subset"] for r in test} == {"test"}
    assert not {r["filename"] for r in train} & {r["filename"] for r in test}
    for fold in ("fold_0", "fold_1", "fold_2"):  # stratified: 160 per class in 3 folds is 53 or 54 each
        for cls in ("Healthy", "TB"):
            n = sum(r["subset"] == fold and r["class"] == cls for r in train)
            assert n in (53, 54), (fold, cls, n)
    report = json.loads((tbx11k / "metrics" / "split_report.json").read_text())
    assert {f: sum(per.values()) for f, per in report["folds"].items()} == \
        {f: sum(r["subset"] == f for r in train) for f in ("fold_0", "fold_1", "fold_2")}

    split.main([])  # same seed: the same folds
    assert read_csv(tbx11k / "data/split/train.csv") == train
    set_params(tbx11k / "params.yaml", {"data.seed": 7})
    split.main([])
    other = read_csv(tbx11k / "data/split/train.csv")
    assert [r["filename"] for r in other] == [r["filename"] for r in train]
    assert [r["subset"] for r in other] != [r["subset"] for r in train]


def test_more_folds_than_a_class_has_training_images_is_one_line(tbx11k):
    set_params(tbx11k / "params.yaml", {"data.folds": 5, "data.max_per_class": 5})  # 4 training images each
    with pytest.raises(UserError, match=r"data.folds 5 needs at least 5 training images per class.*lower data.folds"):
        split.main([])


def test_max_per_class_keeps_the_first_ids(tbx11k):
    set_params(tbx11k / "params.yaml", {"data.max_per_class": 10, "data.val_fraction": 0.25})
    split.main([])
    report = json.loads((tbx11k / "metrics" / "split_report.json").read_text())
    assert report["classes"]["Healthy"]["test"] == {"count": 2, "first": "h0001.png", "last": "h0003.png"}
    assert report["classes"]["Healthy"]["train"]["first"] == "h0004.png"
    assert report["classes"]["TB"]["train"]["last"] == "tb0017.png"  # the 10th TB image by ID
    assert report["classes"]["TB"]["train"]["of_which_val"] == 2
    assert report["total"] == {"test": 4, "train": 16, "of_which_val": 4}


@pytest.mark.parametrize("n, fraction, expected", [(3800, 0.2, 760), (800, 0.2, 160), (100, 0.29, 29),
                                                   (10, 0.7, 7), (9, 0.2, 1), (4, 0.2, 0)])
def test_test_count_is_the_exact_floor(n, fraction, expected):
    assert split_lib.n_test(n, fraction) == expected


def test_ids_sort_by_number_not_text():
    names = ["h10.png", "h2.png", "h0001.png", "MCUCXR_0001_0.png", "CHNCXR_0100_0.png", "CHNCXR_0005_0.png"]
    assert sorted(names, key=natural_key) == [
        "CHNCXR_0005_0.png", "CHNCXR_0100_0.png", "h0001.png", "h2.png", "h10.png", "MCUCXR_0001_0.png"]


def test_hold_out_keeps_one_image_each_side():
    assert len(split_lib.hold_out(["a", "b"], 0.01, seed=0, label=0)) == 1
    assert len(split_lib.hold_out(["a", "b", "c"], 0.99, seed=0, label=0)) == 2
    assert split_lib.hold_out(["a", "b", "c"], 0.0, seed=0, label=0) == set()


def test_class_folder_found_by_longer_path_when_ambiguous(tmp_path):
    placeholder_tree(tmp_path, ["a/tb/1.png", "b/tb/2.png", "a/health/3.png"])
    with pytest.raises(UserError, match=r"found 2 times.*a/tb.*b/tb.*longer path"):
        find_class_folders(tmp_path, {"Healthy": "health", "TB": "tb"})
    found = find_class_folders(tmp_path, {"Healthy": "health", "TB": "b/tb"})
    assert found["TB"] == tmp_path / "b" / "tb"


def test_missing_class_folder_names_it_and_the_fix(tmp_path):
    placeholder_tree(tmp_path, ["Healthy/1.png", "Sick/2.png"])
    with pytest.raises(UserError, match=r"class 'TB': no folder named 'TB'.*Healthy, Sick.*data.classes.TB"):
        find_class_folders(tmp_path, {"Healthy": "Healthy", "TB": "TB"})


def test_duplicate_ids_and_empty_classes_are_errors(tmp_path):
    placeholder_tree(tmp_path, ["tb/tb0001.png", "tb/tb1.png", "empty/readme.txt"])
    with pytest.raises(UserError, match=r"'tb0001.png' and 'tb1.png'.* same ID"):
        list_class("TB", 1, tmp_path / "tb")
    with pytest.raises(UserError, match=r"class 'Healthy': no images in .*empty"):
        list_class("Healthy", 0, tmp_path / "empty")


def test_too_few_images_for_the_split_is_an_error(in_project):
    placeholder_tree(in_project / "data" / "raw", ["health/h1.png", "health/h2.png", "tb/t1.png",
                                                   "tb/t2.png", "tb/t3.png", "tb/t4.png", "tb/t5.png"])
    with pytest.raises(UserError, match=r"class 'Healthy' has 2 images.*0 for test"):
        split.main([])
    assert not (in_project / "data" / "split").exists()


def bad_images(raw: Path) -> None:
    """Class folders with a truncated PNG, a text file named .png and a stray file."""
    placeholder_tree(raw, [f"health/h{i}.png" for i in range(1, 11)] + [f"tb/tb{i}.png" for i in range(1, 11)])
    (raw / "health" / "h2.png").write_bytes(PNG[: len(PNG) // 2])  # truncated
    (raw / "tb" / "tb1.png").write_text("not an image")
    (raw / "tb" / "notes.txt").write_text("ignored, counted")


def test_bad_images_are_all_named_and_nothing_is_written(in_project):
    bad_images(in_project / "data" / "raw")
    with pytest.raises(UserError) as err:
        split.main([])
    message = str(err.value)
    assert message.startswith("2 images in data/raw cannot be read")
    assert "health/h2.png" in message and "tb/tb1.png" in message and "data.on_bad_image: skip" in message
    assert not (in_project / "data" / "split").exists() and not (in_project / "metrics" / "split.json").exists()


def test_skipped_bad_images_leave_the_split_and_are_reported(in_project):
    bad_images(in_project / "data" / "raw")
    set_params(in_project / "params.yaml", {"data.on_bad_image": "skip", "data.test_fraction": 0.2,
                                            "data.max_per_class": 5})
    split.main([])
    test = read_csv(in_project / "data/split/test.csv")
    train = read_csv(in_project / "data/split/train.csv")
    # 5 per class from the good images, first by ID: h1 h3 h4 h5 h6 and tb2..tb6
    assert [r["filename"] for r in test] == ["h1.png", "tb2.png"]
    assert [r["filename"] for r in train] == ["h3.png", "h4.png", "h5.png", "h6.png",
                                              "tb3.png", "tb4.png", "tb5.png", "tb6.png"]
    report = json.loads((in_project / "metrics/split_report.json").read_text())
    assert report["bad_images"] == 2 and set(report["bad_image_files"]) == {"health/h2.png", "tb/tb1.png"}
    assert report["ignored_files"] == 1
