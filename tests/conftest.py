"""Shared fixtures: a scratch copy of the project, params edits, DVC/stage runners."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# Under pytest-xdist, the cores are shared out between the workers: a torch (OpenMP) thread pool as large as
# the machine in every worker, and in every stage process a worker starts, leaves threads spinning for cores
# another process holds. Set before torch is imported; subprocesses inherit it (`env` below).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# one copy of the project-copy and params helpers, shared with the benchmark
from benchmarks.fixtures import PROJECT_FILES, copy_project, set_params  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MINI = SHARED_DATA / "tb-cxr-mini"

COMMANDS = ("predict", "page", "study")  # cxrlab.cli.<name>; everything else is stages.<name>

# Small enough for two CPU cores: 32 px images, ResNet-18, two epochs, 200 bootstrap resamples.
TINY = {
    "data.image_size": 32,
    "train.arch": "resnet18",
    "train.epochs": 2,
    "train.batch_size": 8,
    "evaluate.batch_size": 32,
    "stats.resamples": 200,
}


# The session fixtures below that run a pipeline, by the pytest-xdist group whose worker builds them once.
PIPELINE_GROUPS = {"reproduced": "e2e", "experimented": "e2e", "trained_project": "trained"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the group marks into node ids
def pytest_collection_modifyitems(items) -> None:
    """Keep each pipeline-building fixture on one pytest-xdist worker (`--dist loadgroup`, pyproject.toml):
    the tests that share a session pipeline fixture form one group, and so do the tests of a module
    with a module-scoped fixture of its own; every other test goes to whichever worker is free."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        group = next((PIPELINE_GROUPS[n] for n in names if n in PIPELINE_GROUPS), None)
        if group is None:
            defs = getattr(item, "_fixtureinfo", None)
            module_scoped = [d for n in names for d in (defs.name2fixturedefs.get(n, ()) if defs else ())
                             if d.scope == "module" and d.baseid.startswith("tests/")]
            group = item.module.__name__ if module_scoped else None
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
        if any(n in PIPELINE_GROUPS for n in names):
            item.add_marker(pytest.mark.slow)  # it needs a pipeline run


UNGROUPED = "pytest-xdist did not keep this test's group on one worker, so each worker would build its shared " \
            "fixtures again: install the pytest and pytest-xdist versions that requirements.txt pins"
UNGROUPED_KEY = pytest.StashKey[bool]()


def pytest_collection_finish(session) -> None:
    """Under `--dist loadgroup`, pytest-xdist tags each grouped test's node id with its group. A pytest that
    stores node ids where it cannot (9.2) would silently double the suite's time: such tests fail at once."""
    if getattr(session.config.option, "loadgroup", False):  # set in each worker under --dist loadgroup
        for item in session.items:
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
                item.stash[UNGROUPED_KEY] = True


def pytest_runtest_setup(item) -> None:
    if item.stash.get(UNGROUPED_KEY, False):
        pytest.fail(UNGROUPED, pytrace=False)


def env(extra: dict | None = None) -> dict:
    """The environment for subprocesses: this interpreter first on PATH, no analytics."""
    e = {**os.environ, **(extra or {})}
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["DVC_NO_ANALYTICS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("PYTHONPATH", None)
    return e


def run(args: list[str], cwd: Path, check: bool = True, timeout: int = 900,
        extra_env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env(extra_env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=check)


def stage(module: str, *args: str, cwd: Path, check: bool = False,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a stage's module as DVC would (or a command: predict, page, study); `env` adds environment variables."""
    target = f"cxrlab.cli.{module}" if module in COMMANDS else f"stages.{module}"
    return run([sys.executable, "-m", target, *args], cwd=cwd, check=check, extra_env=env)


def written(folder: Path) -> list[Path]:
    """The files a run left under `folder`, beside the one the repository keeps there (metrics/external/README.md,
    so that the external results' folder exists as a dependency)."""
    return [p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"] if folder.exists() else []


def git_repo(path: Path) -> None:
    """Make `path` a git repository with one commit (CI may have no git identity)."""
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "Test"],
                ["git", "config", "user.email", "test@example.com"],
                ["git", "config", "commit.gpgsign", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        run(cmd, cwd=path)


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the project in a temporary folder (not yet a git repository)."""
    return copy_project(tmp_path / "project")


@pytest.fixture
def in_project(project, monkeypatch) -> Path:
    """Like `project`, and the current directory (stage `main()`s read ./params.yaml)."""
    monkeypatch.chdir(project)
    return project


def prepared_project(root: Path, n_per_class: int = 20, **changes) -> Path:
    """A project copy in `root` whose data is downloaded, split and preprocessed
    (synthetic 32 px images, TINY settings plus `changes`), ready to train."""
    from cxrlab.data.synthetic import make_dataset

    source = make_dataset(root / "source", n_per_class=n_per_class, size=32)
    project = copy_project(root / "project")
    set_params(project / "params.yaml", {**TINY, "data.source": str(source), **changes})
    for module in ("download", "split", "prepare", "preprocess"):
        run([sys.executable, "-m", f"stages.{module}"], cwd=project)
    return project


def run_pipeline(project: Path, monkeypatch, explain: bool = False) -> dict:
    """Every stage of dvc.yaml (explain and export only if asked), in order, in this process, in `project`;
    returns the params used. Spares a Python and torch start per stage; DVC's own run is the quick start's
    (`reproduced`)."""
    from stages import card, compare, download, ensemble, evaluate, flops, plots, prepare, preprocess, split, train
    from stages import explain as explain_stage
    from stages import export as export_stage

    monkeypatch.chdir(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    per_variant = (train, evaluate, explain_stage, export_stage) if explain else (train, evaluate)
    steps = [(stage.main, []) for stage in (download, split, prepare, preprocess)]
    steps += [(stage.main, [v]) for v in params["experiments"] for stage in per_variant]
    steps += [(ensemble.main, [name]) for name in params["ensembles"]]
    steps += [(stage.main, []) for stage in (compare, flops, plots)]
    steps += [(card.main, [v]) for v in params["experiments"]]
    for main, args in steps:
        started = time.perf_counter()
        main(args)
        print(f"{main.__module__} {' '.join(args)}: {time.perf_counter() - started:.1f} s")
    return params


def declared_outputs(project: Path) -> list[Path]:
    """Every out, metric and plot file that dvc.yaml declares (foreach stages expanded by DVC itself)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return [Path(out.fs_path) for st in repo.index.stages for out in st.outs]


def hub_weights_path(torch_home: Path, arch: str) -> Path:
    """Where torchvision looks for `arch`'s ImageNet weights under TORCH_HOME."""
    from urllib.parse import urlparse

    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return torch_home / "hub" / "checkpoints" / Path(urlparse(url).path).name


def write_hub_weights(torch_home: Path, arch: str) -> Path:
    """A stand-in for `arch`'s ImageNet weights (seeded random, right shapes) in the torch hub cache."""
    import torch
    import torchvision

    path = hub_weights_path(torch_home, arch)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A TORCH_HOME shared by the session; tests add the weights they need with `write_hub_weights`."""
    return tmp_path_factory.mktemp("torch_home")


@pytest.fixture
def torch_home(hub_cache, monkeypatch) -> Path:
    """TORCH_HOME pointing at `hub_cache`, holding stand-in ResNet-18 and ViT-B/16 ImageNet weights."""
    for arch in ("resnet18", "vit_b_16"):
        write_hub_weights(hub_cache, arch)
    monkeypatch.setenv("TORCH_HOME", str(hub_cache))
    return hub_cache


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """A tiny project (synthetic X-rays, TINY settings) in a git repository where
    `dvc repro` has trained and evaluated the baseline only. Shared by the
    tests of the prediction command, the explain stage and the web page."""
    from cxrlab.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("trained")
    source = make_dataset(root / "source", n_per_class=20, size=64)
    project = copy_project(root / "project")
    # 64 px, not 32: ResNet's last block then has a 2 x 2 map for Grad-CAM, not a single value.
    # 6 validation images per class and a target sensitivity of 0.8: enough for an operating threshold
    set_params(project / "params.yaml", {**TINY, "data.source": str(source), "data.image_size": 64,
                                         "data.val_fraction": 0.4, "evaluate.target_sensitivity": 0.8})
    git_repo(project)
    dvc("repro", "evaluate@baseline", cwd=project)
    return project


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


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    """The suite's one run of the whole pipeline: the README's quick start, as written, on a fresh clone
    with nothing beside it and no network (`data.source=demo` under `dvc exp run --temp`, then
    `dvc exp apply demo`), at TINY settings, with params.yaml's five variants and their ensemble.
    (the clone, the output of the quick start's `dvc exp run`). Shared by the quick-start, end-to-end
    and plots tests."""
    root = tmp_path_factory.mktemp("quickstart")
    origin = copy_project(root / "origin")
    git_repo(origin)
    run(["git", "clone", "-q", str(origin), "clone"], cwd=root)
    clone = root / "clone"
    assert sorted(p.name for p in root.iterdir()) == ["clone", "origin"]  # nothing beside it: no shared/ data
    commands = quick_start_commands()
    assert any(c[:3] == ["dvc", "exp", "run"] and "data.source=demo" in c and "--temp" in c for c in commands)
    output = ""
    for args in commands:
        args = tiny(args)
        proc = run([sys.executable, "-m", *args] if args[0] == "dvc" else args, cwd=clone, extra_env=OFFLINE)
        if args[:3] == ["dvc", "exp", "run"]:
            output = proc.stdout + proc.stderr
    return clone, output


EXPERIMENT = "+experiments.contrast.lr=0.003"  # '+' adds a key the variant does not set yet (Hydra's syntax)


@pytest.fixture(scope="session")
def experimented(reproduced) -> tuple[Path, str]:
    """`reproduced` committed, then `dvc exp run -S EXPERIMENT` in its workspace: (project, DVC's output).
    HEAD and the experiment are two revisions for `dvc metrics diff` and `dvc plots diff`."""
    project, _ = reproduced
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-qm", "reproduced"], cwd=project)
    result = dvc("exp", "run", "-S", EXPERIMENT, cwd=project)
    return project, result.stdout
