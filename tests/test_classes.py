"""`data.classes` as a list of folders or `auto`, on a dataset whose folders are not TBX11K's:
the classes the split finds name every output, and no text speaks of TB. The same run is
the warnings-as-errors run: every stage under `python -W error`."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from cxrlab.data.synthetic import make_dataset
from tests.conftest import TINY, copy_project, run, set_params

PNEUMONIA_LIKE = {"NORMAL": ("NORMAL", "n"), "PNEUMONIA": ("PNEUMONIA", "p")}
STAGES = [("download",), ("split",), ("prepare",), ("preprocess",), ("train", "baseline"),
          ("evaluate", "baseline"), ("explain", "baseline"), ("compare",), ("flops",), ("plots",)]
TB_WORDS = re.compile(r"\bTB\b|tubercul", re.IGNORECASE)


def pneumonia_project(tmp_path, classes) -> tuple:
    source = make_dataset(tmp_path / "source", n_per_class=12, size=64, layout=PNEUMONIA_LIKE, subdir="chest_xray")
    project = copy_project(tmp_path / "project")
    set_params(project / "params.yaml", {**TINY, "data.source": str(source), "data.image_size": 64,
                                         "data.classes": classes, "data.positive_class": "PNEUMONIA"})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["experiments"], params["ensembles"] = {"baseline": {}}, {}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


@pytest.mark.slow
def test_auto_classes_name_every_output_and_no_stage_warns(tmp_path, monkeypatch):
    project = pneumonia_project(tmp_path, "auto")
    printed = ""
    for module, *args in STAGES:
        proc = run([sys.executable, "-W", "error", "-m", f"stages.{module}", *args], cwd=project)
        printed += proc.stdout + proc.stderr
    assert "Warning" not in printed

    split = json.loads((project / "metrics/split_report.json").read_text())
    assert list(split["classes"]) == ["NORMAL", "PNEUMONIA"]
    assert json.loads((project / "data/prepared/meta.json").read_text())["classes"] == ["NORMAL", "PNEUMONIA"]
    m = json.loads((project / "metrics/evaluate/baseline/report.json").read_text())
    assert set(m["best"]["per_class"]["recall"]) == {"NORMAL", "PNEUMONIA"}
    assert "prob_PNEUMONIA" in (project / "explanations/baseline/gallery.csv").read_text()
    assert "PNEUMONIA" in (project / "plots/summary.md").read_text()
    from cxrlab.config.load import load_params
    from cxrlab.serving.webapp import class_names, page_title

    monkeypatch.chdir(project)  # the page's title: the classes the split found, not the letters of "auto"
    assert page_title(class_names(load_params())) == "Chest X-ray: NORMAL or PNEUMONIA?"
    texts = {"output": printed}
    for folder in ("metrics", "plots", "explanations"):
        for path in (project / folder).rglob("*"):
            if path.suffix in (".json", ".md", ".csv", ".tsv"):
                texts[str(path.relative_to(project))] = path.read_text()
    for name, text in texts.items():
        # the WHO screening target's wording is the statistics texts' own (made a param separately)
        mentions = [line for line in text.splitlines() if TB_WORDS.search(line) and "WHO" not in line]
        assert not mentions, f"{name} speaks of TB: {mentions[:3]}"


def test_a_list_of_folders_names_the_classes_in_its_order(in_project, tmp_path):
    from stages import download, split

    source = make_dataset(tmp_path / "src", n_per_class=10, size=32, layout=PNEUMONIA_LIKE, subdir="chest_xray")
    set_params(in_project / "params.yaml", {"data.source": str(source), "data.positive_class": "NORMAL",
                                            "data.classes": ["chest_xray/PNEUMONIA", "NORMAL"]})
    download.main([])
    split.main([])
    report = json.loads((in_project / "metrics/split_report.json").read_text())
    assert {c: e["folder"] for c, e in report["classes"].items()} == {
        "PNEUMONIA": "chest_xray/PNEUMONIA", "NORMAL": "chest_xray/NORMAL"}
    rows = (in_project / "data/split/test.csv").read_text().splitlines()[1:]
    labels = {r.split(",")[2]: r.split(",")[1] for r in rows}
    assert labels == {"PNEUMONIA": "0", "NORMAL": "1"}


def test_auto_checks_the_positive_class_against_the_folders_found(in_project, tmp_path):
    from cxrlab.errors import UserError
    from stages import download, split

    source = make_dataset(tmp_path / "src", n_per_class=10, size=32, layout=PNEUMONIA_LIKE)
    set_params(in_project / "params.yaml", {"data.source": str(source), "data.classes": "auto"})
    download.main([])
    with pytest.raises(UserError, match=r"data.positive_class 'TB' is not one of the classes "
                                        r"\['NORMAL', 'PNEUMONIA'\] found under data/raw; set data.positive_class"):
        split.main([])
    assert not (in_project / "data/split").exists()


def test_the_page_title_names_the_classes_in_any_form(in_project):
    from cxrlab.config.load import load_params
    from cxrlab.serving.webapp import class_names, page_title

    assert page_title(class_names(load_params())) == "Chest X-ray: Healthy or TB?"  # a mapping
    set_params(in_project / "params.yaml", {"data.classes": ["x/NORMAL", "PNEUMONIA", "COVID"],
                                            "data.positive_class": "COVID"})
    assert page_title(class_names(load_params())) == "Chest X-ray: NORMAL, PNEUMONIA or COVID?"
    set_params(in_project / "params.yaml", {"data.classes": "auto"})
    assert page_title(class_names(load_params())) == "Chest X-ray classifier"  # before the split resolves it
