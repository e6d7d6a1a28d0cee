"""A newcomer's path: the README's quick start, as written, on a fresh clone with
nothing beside it and no network (the demo source under `dvc exp run --temp`),
and a relative `data.source` meaning the repository's folder under `--temp`."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import yaml

from cxrlab.data.synthetic import make_dataset
from tests.conftest import ROOT, TINY, copy_project, dvc, git_repo, run

OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}  # any download fails fast


def quick_start_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The commands of the README's "Quick start" section's code blocks, comments dropped."""
    section = readme.read_text().split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    assert blocks, "the README's quick start has no bash block"
    text = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if shlex.split(line, comments=True)]


def tiny(args: list[str]) -> list[str]:
    """`dvc exp run ... -S key=value ...` at the tests' TINY settings: a value the README sets for one of
    TINY's keys is replaced, TINY's other keys are appended; every other word stays as written."""
    if args[:3] != ["dvc", "exp", "run"]:
        return args
    out, done = list(args), set()
    for i, word in enumerate(out):
        key = word.split("=", 1)[0]
        if out[i - 1] == "-S" and key in TINY:
            out[i] = f"{key}={TINY[key]}"
            done.add(key)
    for key in TINY.keys() - done:
        out += ["-S", f"{key}={TINY[key]}"]
    return out


def test_readme_quick_start_runs_as_written_on_a_fresh_offline_clone(tmp_path):
    commands = quick_start_commands()
    assert any(c[:3] == ["dvc", "exp", "run"] and "data.source=demo" in c and "--temp" in c for c in commands)
    origin = copy_project(tmp_path / "origin")
    # two variants and their ensemble instead of five: the commands are the README's, the study smaller
    params = yaml.safe_load((origin / "params.yaml").read_text())
    params["experiments"] = {"baseline": {}, "contrast": params["experiments"]["contrast"]}
    params["ensembles"] = {"both": {"members": ["baseline", "contrast"], "voting": "soft"}}
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_repo(origin)
    run(["git", "clone", "-q", str(origin), "clone"], cwd=tmp_path)
    clone = tmp_path / "clone"
    assert not (tmp_path / "shared").exists()

    for args in commands:
        args = tiny(args)
        if args[0] == "dvc":
            args = [sys.executable, "-m", *args]
        run(args, cwd=clone, extra_env=OFFLINE)

    # `dvc exp apply demo` brought the demo's params and outputs into the workspace
    assert yaml.safe_load((clone / "params.yaml").read_text())["data"]["source"] == "demo"
    assert "SYNTHETIC IMAGES" in (clone / "data/raw/synthetic-demo/SYNTHETIC.txt").read_text()
    split = json.loads((clone / "metrics/split_report.json").read_text())
    assert list(split["classes"]) == ["Healthy", "TB"]
    assert all(e["test"]["first"].startswith("synthetic-") for e in split["classes"].values())
    for path in ("plots/summary.md", "explanations/baseline/gallery.png", "metrics/evaluate/both/metrics.json",
                 "dvc_plots/index.html"):
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
