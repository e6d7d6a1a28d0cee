"""Shared fixtures: a scratch copy of the project, params edits, DVC/stage runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# one copy of the project-copy and params helpers, shared with the benchmark
from benchmarks.fixtures import PROJECT_FILES, copy_project, set_params  # noqa: F401

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


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    """The whole pipeline (five variants, the ensemble; synthetic 48 px X-rays, TINY settings) after
    `dvc repro` in a git repository: (project, DVC's output). Shared by the end-to-end and plots tests."""
    from cxrlab.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("e2e")
    source = make_dataset(root / "source", n_per_class=30, size=48)
    project = copy_project(root / "project")
    set_params(project / "params.yaml", {**TINY, "data.source": str(source)})
    git_repo(project)
    result = dvc("repro", cwd=project)
    return project, result.stdout + result.stderr


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
