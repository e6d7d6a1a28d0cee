"""How fast, and how lean, the pipeline is next to the study's way of doing the same work.

One run, one machine, the same synthetic data for both sides; run from the
repository root:

    python -m benchmarks.speed                 # the study's sizes: resnet50, 224 px, batch 4
    python -m benchmarks.speed --skip prepare --out bench.json

1. Data path alone (no model). The study's loader decodes the full-size PNG
   with PIL for every item (RGB, Resize, ToTensor, Normalize; batch 4,
   shuffled, no workers); the pipeline's reads the uint8 arrays written by
   its own preprocess stage through `cxrlab.training.build.make_loaders` and
   normalises with `cxrlab.data.datasets.to_model_input`. Baseline (no
   augmentation) and contrast (ColorJitter on the CPU) variants.
2. Model step at the same model and image size: training images/s of the
   study's loop (fp32, Adam lr 1e-4, cross-entropy) vs
   `cxrlab.training.engine.train_one_epoch`, and evaluation images/s of the study's
   (eval mode but gradients on, batch 4) vs `cxrlab.training.engine.predict` at
   `evaluate.batch_size`.
3. Wall time of the split, prepare and preprocess stages on N 512 px PNGs at
   TBX11K's class ratio, and of a no-op `dvc repro` of the whole pipeline.
4. Peak RSS of a child process doing what `stages.train` does on the CPU,
   in the state of its second epoch, for a few steps and one validation
   batch (the stage itself cannot stop after K steps).

Absolute numbers depend on the machine and on what else runs on it; the
ratios are the point. `--out` writes every number and the machine to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from decimal import Decimal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
# TBX11K's healthy and TB images; N benchmark images keep this ratio.
TBX11K_COUNTS = {"Healthy": 3800, "TB": 800}
LAYOUT = {"Healthy": ("health", "h"), "TB": ("tb", "tb")}  # class -> (folder, file prefix)
SUBDIR = "TBX11K/imgs"
SOURCE_PX = 512  # TBX11K's images are 512 x 512 grayscale PNGs
STUDY_BATCH = 4
STUDY_LR = 1e-4
SKIPPABLE = ("data", "model", "prepare", "repro", "memory")
DATA_VARIANTS = {"baseline": "baseline (no augmentation)", "contrast": "contrast (ColorJitter, CPU)"}
TARGETS = {"data_per_core_ratio": 10.0, "split_prepare_s": 60.0, "split_prepare_images": 4600,
           "noop_repro_s": 5.0, "peak_rss_gib": 4.0}
GIB = 1024 ** 3


# ---------------------------------------------------------------- utilities
class Progress:
    """Progress lines with the time since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)


def quiet():
    """Hide the progress bars the pipeline's loops draw on stderr (they would garble the table)."""
    return contextlib.redirect_stderr(io.StringIO())


class Limited:
    """The first `batches` batches of a loader, with a length (what train_one_epoch and predict need)."""

    def __init__(self, loader, batches: int):
        self.loader = loader
        self.batches = max(0, min(int(batches), len(loader)))

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.batches)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def torch_flags() -> dict:
    """The global switches `cxrlab.training.runtime.setup` changes, to give the study side torch's defaults."""
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }


def restore_flags(flags: dict) -> None:
    torch.use_deterministic_algorithms(flags["deterministic"], warn_only=flags["warn_only"])
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = flags["cudnn_deterministic"]
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]


def machine(device: torch.device, threads: int) -> dict:
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
        if hasattr(os, "sysconf") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": threads,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def run_module(module: str, project: Path) -> float:
    """Run `python -m stages.<module>` in `project` as DVC would; its wall time in seconds."""
    from tests.conftest import run

    start = time.perf_counter()
    run([sys.executable, "-m", f"stages.{module}"], cwd=project)
    return time.perf_counter() - start


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
    """Write synthetic X-ray-like PNGs (cxrlab.data.synthetic.make_image) named `names` into `folder`."""
    from cxrlab.data.synthetic import make_image

    folder, names, size, seed, sick = job
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(make_image(rng, size, sick), mode="L").save(Path(folder) / name)
    return len(names)


def make_source(root: Path, n_images: int, distinct: int, workers: int) -> dict[str, int]:
    """`n_images` 512 px grayscale PNGs at TBX11K's class ratio, named like TBX11K's
    (h0001.png, tb0001.png) in root/TBX11K/imgs/{health,tb}. `distinct` of them
    are generated (in parallel); the rest are file copies of those."""
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


def build_project(root: Path, n_images: int, args, log: Progress) -> dict:
    """A project copy whose data went through download, split, prepare and preprocess (each timed)."""
    from tests.conftest import copy_project, set_params

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
        seconds[module] = run_module(module, project)
        log(f"stage {module}: {seconds[module]:.1f} s")
    with open(project / "data" / "split" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"project": project, "images": n_images, "counts": counts, "distinct": distinct,
            "seconds": seconds, "train_images": len(rows),
            "fit_images": sum(r["subset"] == "train" for r in rows)}


# ------------------------------------------------------------ the study's way
class StudyDataset(Dataset):
    """The study's loader: open the original PNG with PIL on every access, RGB, transform."""

    def __init__(self, files: list[Path], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        image = Image.open(self.files[i]).convert("RGB")
        return self.transform(image), self.labels[i]


def study_loader(files, labels, size: int, mean, std, augment: dict | None = None,
                 shuffle: bool = True) -> DataLoader:
    """Resize((S, S)) [+ augmentation], ToTensor, Normalize; batch 4, no loader workers."""
    from torchvision import transforms as T

    steps = [T.Resize((size, size))]
    for name, kwargs in (augment or {}).items():
        steps.append(getattr(T, name)(**kwargs))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return DataLoader(StudyDataset(files, labels, T.Compose(steps)), batch_size=STUDY_BATCH,
                      shuffle=shuffle, num_workers=0)


def split_files(project: Path, split: str, subset: str | None = None) -> tuple[list[Path], list[int]]:
    """The original PNGs of a split (as prepare laid them out) and their labels, in CSV order."""
    with open(project / "data" / "split" / f"{split}.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if subset is None or r["subset"] == subset]
    files = [project / "data" / "dataset" / split / r["class"] / r["filename"] for r in rows]
    return files, [int(r["label"]) for r in rows]


def study_train_step(model, optimizer, criterion, images, labels, device) -> int:
    images, labels = images.to(device), labels.to(device)
    optimizer.zero_grad()
    outputs = model(images)
    loss = criterion(outputs, labels)
    loss.backward()
    optimizer.step()
    _, predicted = torch.max(outputs.data, 1)
    loss.item(), (predicted == labels).sum().item()  # the running loss and accuracy every loop keeps
    return len(labels)


def study_eval_batch(model, images, device) -> torch.Tensor:
    outputs = model(images.to(device))  # model.eval() but no torch.no_grad(), as in the study
    _, predicted = torch.max(outputs.data, 1)
    return predicted.cpu()


# ------------------------------------------------------------ the pipeline's way
class Pipeline:
    """The project's params, splits and runtime for one temporary project."""

    def __init__(self, project: Path, device_spec: str):
        from cxrlab import paths
        from cxrlab.config.load import load_params
        from cxrlab.data.datasets import load_split

        self.project, self.device_spec = project, device_spec
        self.params = load_params(project / "params.yaml")
        folder = project / paths.PREPARED
        self.train_split, self.test = load_split("train", folder), load_split("test", folder)
        self.fit, self.val = self.train_split.subset("train"), self.train_split.subset("val")
        self.classes = self.fit.classes

    def runtime(self, cfg):
        from cxrlab.training.runtime import setup

        return setup(self.device_spec, cfg.amp, cfg.channels_last, cfg.deterministic)

    def loaders(self, cfg, rt, seed: int):
        from cxrlab.data.datasets import loader_settings
        from cxrlab.training.build import Splits, make_loaders

        return make_loaders(cfg, Splits(self.fit, self.val, self.test), rt, seed,
                            loader_settings(self.params.runtime, rt.device))


def endless(loader, set_epoch=None):
    """Batches of `loader`, epoch after epoch."""
    for epoch in itertools.count(1):
        if set_epoch is not None:
            set_epoch(loader, epoch)
        yield from loader


def throughput(batches, handle, seconds: float, device: torch.device) -> dict:
    """Images/s of `handle(batch)` over `batches` for about `seconds`, after one warm-up batch."""
    batches = iter(batches)
    handle(next(batches))
    sync(device)
    images, count, start = 0, 0, time.perf_counter()
    for batch in batches:
        images += handle(batch)
        count += 1
        if time.perf_counter() - start >= seconds:
            break
    sync(device)
    elapsed = time.perf_counter() - start
    return {"images": images, "batches": count, "seconds": elapsed, "images_per_s": images / elapsed}


# ------------------------------------------------------------ 1. data path
def measure_data(pipe: Pipeline, args, defaults: dict, log: Progress) -> dict:
    """Both loaders of each variant, `args.rounds` rounds taking turns; the median round counts."""
    from cxrlab.data.datasets import set_epoch, to_model_input

    data = pipe.params.data
    files, labels = split_files(pipe.project, "train", "train")
    results = {}
    for variant, label in DATA_VARIANTS.items():
        if variant not in pipe.params.variants:
            log(f"data path: params.yaml has no variant {variant!r}; skipped")
            continue
        cfg = pipe.params.variant(variant)
        seed = cfg.seeds[0]
        rt = pipe.runtime(cfg)
        device = rt.device
        loader, _, _ = pipe.loaders(cfg, rt, seed)
        workers = loader.num_workers
        torch.manual_seed(seed)
        study = study_loader(files, labels, args.image_size, data.mean, data.std, cfg.augmentations)

        def pipeline_batch(batch):
            images, y = batch
            to_model_input(images, device, data.mean, data.std, rt.channels_last)
            y.to(device, non_blocking=True)
            return len(y)

        def study_batch(batch):
            images, y = batch
            images.to(device)
            y.to(device)
            return len(y)

        rounds = {"pipeline": [], "study": []}
        for r in range(args.rounds):
            pipe.runtime(cfg)  # the pipeline's global torch settings
            rounds["pipeline"].append(throughput(endless(loader, set_epoch), pipeline_batch, args.data_seconds,
                                                 device))
            restore_flags(defaults)  # torch's defaults for the study
            rounds["study"].append(throughput(endless(study), study_batch, args.data_seconds, device))
            log(f"data path, {variant}, round {r + 1}/{args.rounds}: pipeline "
                f"{rounds['pipeline'][-1]['images_per_s']:.1f} img/s ({workers} loader workers), study "
                f"{rounds['study'][-1]['images_per_s']:.1f} img/s (0 workers)")
        del loader, study
        sides = {}
        for side, cores, batch in (("pipeline", max(1, workers), cfg.batch_size), ("study", 1, STUDY_BATCH)):
            median = statistics.median(x["images_per_s"] for x in rounds[side])
            sides[side] = {"images_per_s": median, "rounds": rounds[side], "workers": workers if side == "pipeline"
                           else 0, "cores": cores, "batch": batch, "images_per_s_per_core": median / cores}
        results[variant] = {
            "label": label, "augment": cfg.augmentations, **sides,
            "ratio": sides["pipeline"]["images_per_s"] / sides["study"]["images_per_s"],
            "ratio_per_core": sides["pipeline"]["images_per_s_per_core"] / sides["study"]["images_per_s_per_core"],
        }
    return results


# ------------------------------------------------------------ 2. model step
def measure_model(pipe: Pipeline, args, defaults: dict, log: Progress) -> dict:
    """Training and evaluation images/s of both sides, in `args.model_rounds` rounds taking turns
    (so a burst of load elsewhere hits both); each side's images over its total time."""
    import torchvision

    from cxrlab.data.datasets import (
        ImageArrayDataset,
        LoaderSettings,
        Split,
        eval_batch_size,
        make_loader,
        set_epoch,
    )
    from cxrlab.model.backbones import build_model
    from cxrlab.model.losses import StudyLoss
    from cxrlab.model.optim import make_optimizer
    from cxrlab.training.engine import predict, train_one_epoch
    from cxrlab.training.runtime import seed_all

    cfg = pipe.params.variant("baseline")
    data, ev = pipe.params.data, pipe.params.evaluate
    seed = cfg.seeds[0]
    rt = pipe.runtime(cfg)
    device = rt.device
    n_classes = len(pipe.classes)
    rounds = args.model_rounds
    steps = [args.steps // rounds + (r < args.steps % rounds) for r in range(rounds)]
    n_eval = min(math.ceil(args.eval_images / rounds), len(pipe.test))

    # the study: its loaders, torchvision model, Adam, cross-entropy
    restore_flags(defaults)
    torch.manual_seed(seed)
    files, labels = split_files(pipe.project, "train", "train")
    study_batches = endless(study_loader(files, labels, args.image_size, data.mean, data.std))
    test_files, test_labels = split_files(pipe.project, "test")
    study_eval_loader = study_loader(test_files[:n_eval], test_labels[:n_eval], args.image_size, data.mean,
                                     data.std, shuffle=False)
    study_model = torchvision.models.get_model(args.arch, weights=None, num_classes=n_classes).to(device)
    study_opt = torch.optim.Adam(study_model.parameters(), lr=STUDY_LR)
    criterion = torch.nn.CrossEntropyLoss()

    # the pipeline: as stages.train and stages.evaluate build them
    rt = pipe.runtime(cfg)
    seed_all(seed)
    loader, _, _ = pipe.loaders(cfg, rt, seed)
    model = build_model(cfg.arch, n_classes, cfg.dropout, cfg.pretrained).to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = StudyLoss(model, cfg.l2_penalty)
    optimizer = make_optimizer(model.parameters(), cfg)
    net = torch.compile(model) if cfg.compile else model
    accumulate = getattr(cfg, "accumulate_steps", 1)
    test = pipe.test
    subset = Split(test.images[:n_eval], test.labels[:n_eval], test.rows[:n_eval], test.classes)
    eval_batch = eval_batch_size(ev.batch_size, device)
    eval_loader = make_loader(ImageArrayDataset(subset), eval_batch, shuffle=False, seed=0,
                              settings=LoaderSettings(pin_memory=device.type == "cuda"))

    def pipeline_train(batches: int, epoch: int) -> int:
        pipe.runtime(cfg)
        set_epoch(loader, epoch)
        with quiet():
            stats = train_one_epoch(net, Limited(loader, batches), optimizer, loss_fn, rt, data.mean, data.std,
                                    n_classes, accumulate, desc="benchmark")
        return stats["images"]

    def study_train(batches: int) -> int:
        restore_flags(defaults)
        study_model.train()
        return sum(study_train_step(study_model, study_opt, criterion, *next(study_batches), device)
                   for _ in range(batches))

    def pipeline_eval(batches: int | None = None) -> int:
        pipe.runtime(cfg)
        prob, _ = predict(model, eval_loader if batches is None else Limited(eval_loader, batches), rt,
                          data.mean, data.std)
        return len(prob)

    def study_eval(batches: int | None = None) -> int:
        restore_flags(defaults)
        study_model.eval()
        seen = 0
        for images, _ in itertools.islice(study_eval_loader, batches):
            seen += len(study_eval_batch(study_model, images, device))
        return seen

    def timed(fn, *a) -> tuple[int, float]:
        sync(device)
        start = time.perf_counter()
        n = fn(*a)
        sync(device)
        return n, time.perf_counter() - start

    log("model: warm-up, one training step and one evaluation batch on each side ...")
    study_train(1)
    pipeline_train(1, 0)
    study_eval(1)
    pipeline_eval(1)
    totals = {key: [0, 0.0] for key in ("study_train", "pipeline_train", "study_eval", "pipeline_eval")}
    for r in range(rounds):
        for key, fn, a in (("study_train", study_train, (steps[r],)),
                           ("pipeline_train", pipeline_train, (steps[r], r + 1)),
                           ("study_eval", study_eval, ()), ("pipeline_eval", pipeline_eval, ())):
            if not a or a[0] > 0:
                n, seconds = timed(fn, *a)
                totals[key][0] += n
                totals[key][1] += seconds
        log(f"model, round {r + 1}/{rounds}: training {steps[r]} steps, evaluation {n_eval} images per side; "
            + ", ".join(f"{k.replace('_', ' ')} {n / max(t, 1e-9):.2f} img/s" for k, (n, t) in totals.items()))

    def side(key: str, batch: int, precision: str, **extra) -> dict:
        n, seconds = totals[key]
        return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "batch": batch,
                "precision": precision, **extra}

    out = {"arch": args.arch, "image_size": args.image_size, "runtime": rt.describe(), "rounds": rounds}
    study_t = side("study_train", STUDY_BATCH, "fp32", steps=sum(steps))
    pipe_t = side("pipeline_train", cfg.batch_size, rt.describe(), steps=sum(steps),
                  loader_workers=loader.num_workers)
    study_e = side("study_eval", STUDY_BATCH, "fp32", grad=True)
    pipe_e = side("pipeline_eval", eval_batch, rt.describe(), grad=False)
    out["train"] = {"study": study_t, "pipeline": pipe_t, "ratio": pipe_t["images_per_s"] / study_t["images_per_s"]}
    out["eval"] = {"study": study_e, "pipeline": pipe_e, "ratio": pipe_e["images_per_s"] / study_e["images_per_s"]}
    return out


# ------------------------------------------------------------ 3. preparing the data, no-op repro
def measure_noop_repro(root: Path, runs: int, log: Progress) -> dict:
    """A tiny project reproduced end to end in a git repository, then `dvc repro` with nothing to do."""
    from cxrlab.data.synthetic import make_dataset
    from tests.conftest import TINY, copy_project, dvc, git_repo, set_params

    source = make_dataset(root / "source", n_per_class=10, size=32)
    project = copy_project(root / "project")
    # TINY, with one epoch and the fewest bootstrap resamples: the no-op check does not depend on them
    set_params(project / "params.yaml", {**TINY, "data.source": str(source), "train.epochs": 1,
                                         "stats.resamples": 100})
    git_repo(project)
    log("no-op repro: reproducing a tiny project end to end first (every stage, every variant) ...")
    start = time.perf_counter()
    dvc("repro", cwd=project)
    full = time.perf_counter() - start
    log(f"no-op repro: full tiny repro took {full:.1f} s")
    times, up_to_date = [], []
    for i in range(runs):
        start = time.perf_counter()
        result = dvc("repro", cwd=project)
        times.append(time.perf_counter() - start)
        up_to_date.append("Data and pipelines are up to date" in result.stdout + result.stderr)
        log(f"no-op repro {i + 1}/{runs}: {times[-1]:.2f} s"
            f"{'' if up_to_date[-1] else ' (WARNING: it ran something)'}")
    import yaml

    stages = len(yaml.safe_load((project / "dvc.lock").read_text())["stages"])
    return {"full_repro_s": full, "runs_s": times, "median_s": statistics.median(times),
            "all_up_to_date": all(up_to_date), "stages": stages}


# ------------------------------------------------------------ 4. peak memory
CHILD = ("import sys; sys.path.append({root!r}); from benchmarks.speed import memory_child; "
         "memory_child(sys.argv[1:])")
# A forked child's ru_maxrss starts at its parent's peak (Linux carries the parent's high-water mark
# over fork and exec), and this process is large by now. So a small launcher starts the child and
# reports the child's own ru_maxrss from os.wait4.
LAUNCHER = ("import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
            "_, status, usage = os.wait4(p.pid, 0); "
            "print('BENCH ' + json.dumps({'phase': 'exit', 'wait4_maxrss_kib': usage.ru_maxrss, "
            "'returncode': os.waitstatus_to_exitcode(status)}), flush=True)")


def _rss_now() -> dict:
    """In KiB: this process's peak resident set (VmHWM) and what is resident now, anonymous
    (heap, tensors) and file-backed (shared libraries, memory-mapped arrays)."""
    now = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "RssAnon:", "RssFile:")):
                    now[line.split(":")[0].lower()] = int(line.split()[1])
    except OSError:
        pass
    return now


def _report(phase: str, **extra) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print("BENCH " + json.dumps({"phase": phase, "maxrss_kib": peak, **_rss_now(), **extra}), flush=True)


def memory_child(argv: list[str]) -> None:
    """In the project folder: what `python -m stages.train <variant>` does on the CPU, in the state of
    its second epoch (every page of the prepared arrays read), for `steps` steps and one validation batch."""
    variant, steps, threads = argv[0], int(argv[1]), int(argv[2])
    torch.set_num_threads(threads)
    from cxrlab.config.load import load_params
    from cxrlab.data.datasets import load_split, loader_settings, set_epoch
    from cxrlab.model.backbones import build_model
    from cxrlab.model.losses import StudyLoss
    from cxrlab.model.optim import make_optimizer
    from cxrlab.training.build import Splits, make_loaders
    from cxrlab.training.engine import predict, train_one_epoch
    from cxrlab.training.runtime import seed_all, setup

    _report("imports")
    params = load_params()
    cfg, data = params.variant(variant), params.data
    train_split, test_split = load_split("train"), load_split("test")
    rt = setup("cpu", cfg.amp, cfg.channels_last, cfg.deterministic)
    fit, val = train_split.subset("train"), train_split.subset("val")
    seed = cfg.seeds[0]
    seed_all(seed)
    loader, val_loader, _ = make_loaders(cfg, Splits(fit, val, test_split), rt, seed,
                                         loader_settings(params.runtime, rt.device))
    model = build_model(cfg.arch, len(fit.classes), cfg.dropout, cfg.pretrained).to(rt.device)
    loss_fn = StudyLoss(model, cfg.l2_penalty)
    optimizer = make_optimizer(model.parameters(), cfg)
    _report("setup", fit=len(fit), val=len(val), test=len(test_split), workers=loader.num_workers)
    # After the first epoch, its training, validation and test passes have read every page of the
    # memory-mapped arrays: resident (file-backed) from then on, so read them all first.
    touched = 0
    for array in (train_split.images, test_split.images):
        for i in range(0, len(array), 256):
            chunk = np.asarray(array[i:i + 256])
            chunk.max()
            touched += chunk.nbytes
    _report("pages", bytes=touched)
    seed_all(seed, 1)
    set_epoch(loader, 1)
    train_one_epoch(model, Limited(loader, steps), optimizer, loss_fn, rt, data.mean, data.std, len(fit.classes),
                    getattr(cfg, "accumulate_steps", 1), desc="memory")
    _report("train", steps=min(steps, len(loader)), batch=cfg.batch_size)
    if val_loader is not None:
        predict(model, Limited(val_loader, 1), rt, data.mean, data.std)
        _report("val_batch", batch=val_loader.batch_size)


def measure_memory(project: Path, args, log: Progress) -> dict:
    from tests.conftest import env

    command = [sys.executable, "-c", LAUNCHER, sys.executable, "-c", CHILD.format(root=str(ROOT)), "baseline",
               str(args.memory_steps), str(args.threads)]
    phases, exit_ = {}, None
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(command, cwd=project, env=env(), stdout=subprocess.PIPE, stderr=errors, text=True)
        for line in proc.stdout:
            if not line.startswith("BENCH "):
                continue
            p = json.loads(line[len("BENCH "):])
            if p["phase"] == "exit":
                exit_ = p
                continue
            p["peak_gib"] = p.get("vmhwm", p["maxrss_kib"]) / 2 ** 20
            phases[p["phase"]] = p
            log(f"memory: after {p['phase']}: peak RSS {p['peak_gib']:.2f} GiB")
        proc.wait()
        if proc.returncode != 0 or exit_ is None or exit_["returncode"] != 0:
            errors.seek(0)
            raise RuntimeError("the memory benchmark's child process failed:\n" + errors.read()[-4000:])
    return {"peak_rss_gib": exit_["wait4_maxrss_kib"] / 2 ** 20, "phases": phases}


# ------------------------------------------------------------ the report
def table(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [title, line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    out += [f"  {n}" for n in notes]
    return "\n".join(out)


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(results: dict, args) -> str:
    m = results["machine"]
    parts = [
        "=" * 100,
        f"Pipeline vs study, one run on one machine: {m['cpu']}, {m['usable_cores']} usable cores, "
        f"{m['memory_gib']} GiB, torch {m['torch']} ({m['torch_threads']} threads), device {m['device']}"
        + (f" ({m['gpu']})" if m["gpu"] else ""),
        f"load average at start {m['load_average_at_start']}, at end {results.get('load_average_at_end')}; "
        f"total {results['wall_s']:.0f} s. Ratios = pipeline / study (higher is better).",
    ]
    d = results.get("data")
    if d:
        rows = []
        for r in d.values():
            s, p = r["study"], r["pipeline"]
            rows.append([r["label"], f"{s['images_per_s']:.1f}", s["cores"], f"{s['images_per_s_per_core']:.1f}",
                         f"{p['images_per_s']:.1f}", p["cores"], f"{p['images_per_s_per_core']:.1f}",
                         f"{r['ratio']:.1f}x", f"{r['ratio_per_core']:.1f}x",
                         met(r["ratio_per_core"] >= TARGETS["data_per_core_ratio"])])
        info = results["data_info"]

        def spread(side: dict) -> str:
            values = [x["images_per_s"] for x in side["rounds"]]
            return f"{min(values):.0f}-{max(values):.0f}"

        ranges = "; ".join(f"{variant}: study {spread(r['study'])}, pipeline {spread(r['pipeline'])} img/s"
                           for variant, r in d.items())
        parts.append(table(
            f"\n1. Data path alone (no model): {info['fit_images']} training images, {args.image_size} px, "
            f"to {m['device']}",
            ["variant", "study img/s", "cores", "img/s/core", "pipeline img/s", "cores", "img/s/core",
             "ratio", "ratio/core", f"target >= {TARGETS['data_per_core_ratio']:.0f}x/core"],
            rows,
            [f"study: PIL opens the {SOURCE_PX} px PNG per item, RGB, Resize, ToTensor, Normalize; "
             f"batch {STUDY_BATCH}, shuffled, 0 workers; median of {args.rounds} rounds of {args.data_seconds:g} s "
             "per side, taking turns",
             "pipeline: stages.train.make_loaders over the preprocessed uint8 arrays + to_model_input; "
             "cores = max(1, loader workers)",
             f"range over the rounds: {ranges}"]))
    mo = results.get("model")
    if mo:
        rows = []
        for key, name in (("train", "training"), ("eval", "evaluation")):
            r = mo[key]
            s, p = r["study"], r["pipeline"]
            amount = f"{s['steps']} steps" if key == "train" else f"{s['images']} images"
            rows.append([f"{name} ({amount})", f"{s['images_per_s']:.2f}", s["batch"], f"{p['images_per_s']:.2f}",
                         p["batch"], f"{r['ratio']:.2f}x"])
        parts.append(table(
            f"\n2. Model step: {mo['arch']}, {mo['image_size']} px; pipeline on {mo['runtime']}",
            ["", "study img/s", "batch", "pipeline img/s", "batch", "ratio"], rows,
            ["study: its own loader, fp32, Adam lr 1e-4, cross-entropy; evaluation in eval mode WITHOUT "
             "torch.no_grad",
             "pipeline: stages.engine.train_one_epoch (params' batch size) and predict (evaluate.batch_size);",
             f"one warm-up step each side, then {mo['rounds']} rounds taking turns; loaders included; "
             "images over total time"]))
    pr = results.get("prepare")
    if pr:
        n = pr["images"]
        sp = pr["seconds"]["split"] + pr["seconds"]["prepare"]
        # the target is for 4,600 images; with fewer, process start-up dominates and it is not judged
        judged = n >= TARGETS["split_prepare_images"]
        rows = [["download (local folder, hard links)", f"{pr['seconds']['download']:.1f}",
                 f"{n / pr['seconds']['download']:.0f}", "", ""],
                ["split", f"{pr['seconds']['split']:.1f}", f"{n / pr['seconds']['split']:.0f}", "", ""],
                ["prepare", f"{pr['seconds']['prepare']:.1f}", f"{n / pr['seconds']['prepare']:.0f}", "", ""],
                ["split + prepare", f"{sp:.1f}", f"{n / sp:.0f}",
                 f"<= {TARGETS['split_prepare_s']:.0f} s at {TARGETS['split_prepare_images']}",
                 met(sp <= TARGETS["split_prepare_s"]) if judged else "not judged"],
                [f"preprocess (decode + resize to {args.image_size} px)", f"{pr['seconds']['preprocess']:.1f}",
                 f"{n / pr['seconds']['preprocess']:.0f}", "", ""]]
        rp = results.get("repro")
        if rp:
            rows.append([f"no-op dvc repro ({rp['stages']} stages, median of {len(rp['runs_s'])})",
                         f"{rp['median_s']:.1f}", "", f"<= {TARGETS['noop_repro_s']:.0f} s",
                         met(rp["median_s"] <= TARGETS["noop_repro_s"] and rp["all_up_to_date"])])
        notes = [f"{n} PNGs of {SOURCE_PX} px ({pr['counts']['Healthy']} Healthy, {pr['counts']['TB']} TB), "
                 f"{pr['distinct']} distinct synthetic images, the rest file copies; each stage a "
                 "`python -m stages.<name>` process (start-up included)"]
        if rp:
            notes.append(f"no-op runs: {', '.join(f'{t:.2f}' for t in rp['runs_s'])} s, in a git repository "
                         f"reproduced with tiny settings (the full tiny repro took {rp['full_repro_s']:.0f} s)"
                         + ("" if rp["all_up_to_date"] else "; WARNING: a no-op run ran a stage"))
        parts.append(table(f"\n3. Preparing the data: {n} images", ["step", "seconds", "images/s", "target", ""],
                           rows, notes))
    me = results.get("memory")
    if me:
        ph = me["phases"]
        setup = ph.get("setup", {})
        rows = []
        labels = {"imports": "imported torch and stages.train (as the stage does)",
                  "setup": "+ loaded the splits, built loaders, model, optimiser",
                  "pages": "+ every page of the prepared arrays read (as by the end of epoch 1)",
                  "train": f"+ {ph.get('train', {}).get('steps')} training steps of batch "
                           f"{ph.get('train', {}).get('batch')}",
                  "val_batch": f"+ one validation batch of {ph.get('val_batch', {}).get('batch')} (predict)"}

        def gib(kib):
            return f"{kib / 2 ** 20:.2f}" if kib is not None else ""

        for key, label in labels.items():
            if key in ph:
                rows.append([label, f"{ph[key]['peak_gib']:.2f}", gib(ph[key].get("rssanon")),
                             gib(ph[key].get("rssfile")), "", ""])
        rows.append(["peak RSS of the child process (wait4)", f"{me['peak_rss_gib']:.2f}", "", "",
                     f"<= {TARGETS['peak_rss_gib']:.0f} GiB", met(me["peak_rss_gib"] <= TARGETS["peak_rss_gib"])])
        parts.append(table(
            f"\n4. Peak RSS of training on the CPU: {args.arch}, {args.image_size} px, "
            f"{me['train_images']} training images ({setup.get('fit')} fit + {setup.get('val')} validation), "
            f"{setup.get('workers')} loader workers",
            ["", "peak RSS GiB", "now: anon", "file", "target", ""], rows,
            ["a child process doing what `python -m stages.train baseline` does, stopped after K steps "
             "(the stage has no way to stop early); peak = VmHWM so far;",
             "now = RSS at that moment, anonymous (tensors, heap) and file-backed (shared libraries, "
             "memory-mapped arrays: reclaimable)"]))
    parts.append("=" * 100)
    return "\n".join(parts)


# ------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="torchvision architecture for both sides (resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="training resolution S (224)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per side, all rounds (8)")
    parser.add_argument("--eval-images", type=int, default=128,
                        help="timed evaluation images per side, all rounds (128)")
    parser.add_argument("--model-rounds", type=int, default=2,
                        help="model rounds, the two sides taking turns (2)")
    parser.add_argument("--prepare-images", type=int, default=4600,
                        help="PNGs for split/prepare/preprocess, TBX11K's class ratio (4600)")
    parser.add_argument("--memory-images", type=int, default=3680,
                        help="training images (validation included) for the peak-RSS run (3680)")
    parser.add_argument("--memory-steps", type=int, default=3, help="training steps of the peak-RSS run (3)")
    parser.add_argument("--data-seconds", type=float, default=2.0,
                        help="seconds each data-path measurement runs for (2)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="data-path rounds, the two sides taking turns; the median counts (5)")
    parser.add_argument("--distinct-images", type=int, default=400,
                        help="distinct synthetic PNGs to generate; the rest are copies of them (400)")
    parser.add_argument("--repro-runs", type=int, default=3, help="no-op `dvc repro` runs, median reported (3)")
    parser.add_argument("--skip", action="append", choices=SKIPPABLE, default=[],
                        help="leave out a part (repeatable): data, model, prepare (with repro), repro, memory")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="write every number and the machine to this JSON")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the temporary projects")
    args = parser.parse_args(argv)
    if min(args.steps, args.eval_images, args.memory_steps, args.distinct_images, args.rounds,
           args.model_rounds) < 1:
        parser.error("--steps, --eval-images, --memory-steps, --distinct-images and the rounds must be >= 1")
    if min(class_counts(args.prepare_images).values()) < 5:
        parser.error("--prepare-images is too small: each class needs at least 5 images")
    args.skip = set(args.skip)
    if "prepare" in args.skip:
        args.skip.add("repro")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = Progress()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    args.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    from cxrlab.config.load import load_params
    from cxrlab.training.runtime import pick_device

    device = pick_device(args.device)
    results: dict = {"machine": machine(device, args.threads),
                     "settings": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(args).items()},
                     "targets": TARGETS}
    m = results["machine"]
    gpu = f" ({m['gpu']})" if m["gpu"] else ""
    log(f"machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} with {args.threads} threads, "
        f"device {device}{gpu}, load average {m['load_average_at_start']}")
    defaults = torch_flags()
    test_fraction = load_params(ROOT / "params.yaml").data.test_fraction
    tmp = Path(tempfile.mkdtemp(prefix="tbcxr-bench-", dir=args.tmp))
    try:
        main_data = None
        if {"data", "model", "prepare", "memory"} - args.skip:
            log(f"building a project with {args.prepare_images} images in {tmp} ...")
            main_data = build_project(tmp / "main", args.prepare_images, args, log)
            results["prepare"] = {k: v for k, v in main_data.items() if k != "project"}
        if {"data", "model"} - args.skip:
            pipe = Pipeline(main_data["project"], args.device)
            results["data_info"] = {"fit_images": len(pipe.fit), "val_images": len(pipe.val),
                                    "test_images": len(pipe.test)}
            if "data" not in args.skip:
                results["data"] = measure_data(pipe, args, defaults, log)
            if "model" not in args.skip:
                results["model"] = measure_model(pipe, args, defaults, log)
            del pipe
            restore_flags(defaults)
        if "repro" not in args.skip:
            results["repro"] = measure_noop_repro(tmp / "repro", args.repro_runs, log)
            shutil.rmtree(tmp / "repro", ignore_errors=True)
        if "memory" not in args.skip:
            data = main_data
            if data["train_images"] != args.memory_images:
                n = max(10, math.floor(args.memory_images / (1 - test_fraction)) - 5)
                while train_count(n, test_fraction) < args.memory_images:
                    n += 1
                log(f"memory: building a project with {n} images ({train_count(n, test_fraction)} for training) ...")
                data = build_project(tmp / "memory", n, args, log)
            log(f"memory: a child process trains {args.memory_steps} steps on the CPU ...")
            results["memory"] = measure_memory(data["project"], args, log)
            results["memory"]["train_images"] = data["train_images"]
        if "prepare" in args.skip:
            results.pop("prepare", None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = log.elapsed()
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print(report(results, args), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
