"""A newcomer's path: the README's quick start, as written, on a fresh clone with
nothing beside it and no network (the demo source under `dvc exp run --temp`),
and a relative `data.source` meaning the repository's folder under `--temp`."""

from __future__ import annotations

import json

import yaml

from cxrlab.data.synthetic import make_dataset
from tests.conftest import copy_project, dvc, git_repo, run


def test_readme_quick_start_runs_as_written_on_a_fresh_offline_clone(reproduced):
    """The quick start itself is the session's `reproduced` fixture (tests/conftest.py): here, what a
    newcomer sees afterwards. test_pipeline checks the outputs stage by stage."""
    clone, output = reproduced
    assert "Running stage 'download'" in output and "synthetic" in output.lower()
    # `dvc exp apply demo` brought the demo's params and outputs into the workspace
    assert yaml.safe_load((clone / "params.yaml").read_text())["data"]["source"] == "demo"
    assert "SYNTHETIC IMAGES" in (clone / "data/raw/synthetic-demo/SYNTHETIC.txt").read_text()
    split = json.loads((clone / "metrics/split_report.json").read_text())
    assert list(split["classes"]) == ["Healthy", "TB"]
    assert all(e["test"]["first"].startswith("synthetic-") for e in split["classes"].values())
    assert split["total"]["train"] + split["total"]["test"] == 120
    for path in ("plots/summary.md", "explanations/baseline/gallery.png",
                 "metrics/evaluate/all_variants/metrics.json", "dvc_plots/index.html"):
        assert (clone / path).is_file(), path


def test_relative_source_means_the_repository_folder_under_temp(tmp_path):
    project = copy_project(tmp_path / "project")
    git_repo(project)
    # not tracked by git, so only the repository itself has it, not the experiment's temporary copy
    (project / ".git/info/exclude").write_text("xrays/\n")
    make_dataset(project / "xrays", n_per_class=10, size=32, subdir="imgs")
    dvc("exp", "run", "--temp", "-n", "rel", "-S", "data.source=xrays", "split", cwd=project)
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project).stdout.split()
    ref = next(r for r in refs if r.endswith("/rel"))  # the experiment's commit holds its metrics
    split = json.loads(run(["git", "show", f"{ref}:metrics/split_report.json"], cwd=project).stdout)
    assert {c: e["folder"] for c, e in split["classes"].items()} == {"Healthy": "imgs/health", "TB": "imgs/tb"}
    assert split["total"]["test"] + split["total"]["train"] == 20
