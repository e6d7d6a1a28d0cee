"""The benchmark's data and temporary projects: synthetic TBX11K-like PNGs and copies of this project.

The images come from `cxrlab.data.synthetic` (the same generator as the
tests'); the project helpers are the benchmark's own, so that it never
imports the test suite. Each stage runs as DVC runs it, `python -m stages.<name>`
in the project folder.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from PIL import Image

from cxrlab.data.synthetic import TBX11K_LIKE, make_dataset, make_image

ROOT = Path(__file__).resolve().parents[1]
# What a project needs to run: code, pipeline and DVC settings; no data, models or outputs
# (metrics/external/README.md keeps that folder, a dependency, in git when no external set is configured).
PROJECT_FILES = ("stages", "cxrlab", "app", "studies", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/plots",
                 ".dvcignore", ".gitignore", "metrics/external/README.md")
# TBX11K's healthy and TB images; N benchmark images keep this ratio.
TBX11K_COUNTS = {"Healthy": 3800, "TB": 800}
LAYOUT = TBX11K_LIKE  # class -> (folder, file prefix), as in TBX11K
SUBDIR = "TBX11K/imgs"
SOURCE_PX = 512  # TBX11K's images are 512 x 512 grayscale PNGs
# A project small enough to reproduce end to end in minutes (the no-op repro needs one reproduced first).
TINY = {"data.image_size": 32, "train.arch": "resnet18", "train.epochs": 1, "train.batch_size": 8,
        "evaluate.batch_size": 32, "stats.resamples": 100}


# ------------------------------------------------------------ processes and projects
def env() -> dict:
    """The environment for subprocesses: this interpreter first on PATH, no analytics, no PYTHONPATH
    (a stage must find the project's own code, in its folder)."""
    e = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e.pop("PYTHONPATH", None)
    return e


def run(args: list[str], cwd: Path, timeout: int = 3600) -> subprocess.CompletedProcess:
    """Run a command; a failure raises with the end of its output (a benchmark of a failing stage means nothing)."""
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd)


def run_stage(module: str, project: Path) -> float:
    """Run `python -m stages.<module>` in `project` as DVC would; its wall time in seconds."""
    start = time.perf_counter()
    run([sys.executable, "-m", f"stages.{module}"], cwd=project)
    return time.perf_counter() - start


def copy_project(dest: Path) -> Path:
    """This project's code and pipeline (no data, models or outputs) in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def set_params(params_file: Path, changes: dict) -> None:
    """Edit params.yaml: `{"train.lr": 0.1}` sets params['train']['lr']."""
    params = yaml.safe_load(params_file.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def git_repo(path: Path) -> None:
    """Make `path` a git repository with one commit (DVC needs one; the machine may have no git identity)."""
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "Benchmark"],
                ["git", "config", "user.email", "benchmark@example.com"], ["git", "config", "commit.gpgsign", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        run(cmd, cwd=path)


# ------------------------------------------------------------ synthetic data
def class_counts(n_images: int) -> dict[str, int]:
    total = sum(TBX11K_COUNTS.values())
    healthy = round(n_images * TBX11K_COUNTS["Healthy"] / total)
    return {"Healthy": healthy, "TB": n_images - healthy}


def train_count(n_images: int, test_fraction: float) -> int:
    """Training images (validation included) the study's split leaves of `n_images`."""
    frac = Decimal(str(test_fraction))
    return sum(n - math.floor(frac * n) for n in class_counts(n_images).values())


def _write_pngs(job: tuple) -> int:
    """Write synthetic X-ray-like PNGs named `names` into `folder` (one worker process's share)."""
    folder, names, size, seed, sick = job
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(make_image(rng, size, sick), mode="L").save(Path(folder) / name)
    return len(names)


def make_source(root: Path, n_images: int, distinct: int, workers: int) -> dict[str, int]:
    """`n_images` 512 px grayscale PNGs at TBX11K's class ratio, named like TBX11K's
    (h0001.png, tb0001.png) in root/TBX11K/imgs/{health,tb}. `distinct` of them
    are generated (in parallel); the rest are file copies of those, which keeps
    the set-up to seconds while decoding costs the same."""
    counts = class_counts(n_images)
    total = sum(counts.values())
    jobs, copies = [], []
    for label, (cls, n) in enumerate(counts.items()):
        folder_name, prefix = LAYOUT[cls]
        folder = root / SUBDIR / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        width = max(4, len(str(n)))
        names = [f"{prefix}{i:0{width}d}.png" for i in range(1, n + 1)]
        k = max(1, min(n, round(distinct * n / total)))
        unique = names[:k]
        per_job = max(1, math.ceil(k / max(1, workers)))
        for j in range(0, k, per_job):
            jobs.append((str(folder), unique[j:j + per_job], SOURCE_PX, [label, j], label == 1))
        copies += [(folder / unique[i % k], folder / name) for i, name in enumerate(names[k:])]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_write_pngs, jobs))
    for src, dst in copies:
        shutil.copyfile(src, dst)  # a real copy, not a link: its own inode and page cache
    return counts


def build_project(root: Path, n_images: int, args, log: Callable[[str], None]) -> dict:
    """A project copy whose data went through download, split, prepare and preprocess (each timed)."""
    start = time.perf_counter()
    counts = make_source(root / "source", n_images, args.distinct_images, args.workers)
    distinct = min(n_images, args.distinct_images)
    log(f"data: {n_images} synthetic {SOURCE_PX} px PNGs ({counts['Healthy']} Healthy, {counts['TB']} TB; "
        f"{distinct} distinct, the rest copies) in {time.perf_counter() - start:.1f} s")
    project = copy_project(root / "project")
    set_params(project / "params.yaml", {
        "data.source": str(root / "source"),
        "data.classes": {cls: folder for cls, (folder, _) in LAYOUT.items()},
        "data.image_size": args.image_size,
        "train.arch": args.arch,
    })
    seconds = {}
    for module in ("download", "split", "prepare", "preprocess"):
        seconds[module] = run_stage(module, project)
        log(f"stage {module}: {seconds[module]:.1f} s")
    with open(project / "data" / "split" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"project": project, "images": n_images, "counts": counts, "distinct": distinct,
            "seconds": seconds, "train_images": len(rows),
            "fit_images": sum(r["subset"] == "train" for r in rows)}


def tiny_reproducible_project(root: Path) -> Path:
    """A tiny project (20 synthetic 32 px images, TINY settings) in a git repository, not yet reproduced."""
    source = make_dataset(root / "source", n_per_class=10, size=32)
    project = copy_project(root / "project")
    set_params(project / "params.yaml", {**TINY, "data.source": str(source)})
    git_repo(project)
    return project
