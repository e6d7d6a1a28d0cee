"""How fast, and how lean, the pipeline is next to the study's way of doing the same work.

One run, one machine, the same synthetic data for both sides; run from the
repository root (or `cxr-benchmark` after `pip install -e .`):

    python -m benchmarks.speed                 # the study's sizes: resnet50, 224 px, batch 4
    python -m benchmarks.speed --skip prepare --out bench.json

1. Data path alone (no model). The study's loader decodes the full-size PNG
   with PIL for every item (RGB, Resize, ToTensor, Normalize; batch 4,
   shuffled, no workers); the pipeline's is the train stage's training loader
   over the uint8 arrays written by its own preprocess stage, normalised with
   `cxrlab.data.datasets.to_model_input`. Baseline (no augmentation) and
   contrast (ColorJitter on the CPU) variants.
2. Model step at the same model and image size: training images/s of the
   study's loop (fp32, Adam lr 1e-4, cross-entropy) vs the train stage's run
   (built by the same builder, in its first epoch's freezing phase) through
   `cxrlab.training.engine.train_one_epoch`, and evaluation images/s of the
   study's (eval mode but gradients on, batch 4) vs
   `cxrlab.training.engine.predict` at `evaluate.batch_size`.
3. Wall time of the split, prepare and preprocess stages on N 512 px PNGs at
   TBX11K's class ratio, and of a no-op `dvc repro` of the whole pipeline.
4. Peak RSS of a child process doing what `stages.train` does on the CPU,
   in the state of its second epoch, for a few steps and one validation
   batch (the stage itself cannot stop after K steps).

Absolute numbers depend on the machine and on what else runs on it; the
ratios are the point. `--out` writes every number and the machine to JSON.
The parts live in modules beside this one: `study_loop` (the study's side),
`pipeline_run` (the pipeline's), `fixtures` (data and projects), `measure`
and `memory` (the measurements), `report` (the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.fixtures import ROOT, build_project, class_counts, train_count
from benchmarks.measure import measure_data, measure_model, measure_noop_repro
from benchmarks.memory import measure_memory
from benchmarks.pipeline_run import Pipeline
from benchmarks.report import TARGETS, report
from benchmarks.study_loop import restore_flags, torch_flags
from benchmarks.timing import Progress, load_average, machine, usable_cores
from cxrlab.config.load import load_params
from cxrlab.errors import run_stage
from cxrlab.training.runtime import pick_device

SKIPPABLE = ("data", "model", "prepare", "repro", "memory")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="torchvision architecture for both sides (resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="training resolution S (224)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per side, all rounds (8)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="training batch of both sides in the model step (default: each its own, the study's 4 "
                             "and params' train.batch_size)")
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
    batch = 1 if args.train_batch is None else args.train_batch
    if min(args.steps, batch, args.eval_images, args.memory_steps, args.distinct_images, args.rounds,
           args.model_rounds) < 1:
        parser.error("--steps, --train-batch, --eval-images, --memory-steps, --distinct-images and the rounds "
                     "must be >= 1")
    if min(class_counts(args.prepare_images).values()) < 5:
        parser.error("--prepare-images is too small: each class needs at least 5 images")
    args.skip = set(args.skip)
    if "prepare" in args.skip:
        args.skip.add("repro")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    log = Progress()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    args.workers = usable_cores()
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
    tmp = Path(tempfile.mkdtemp(prefix="tbcxr-bench-", dir=args.tmp))
    try:
        run_parts(args, results, defaults, tmp, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = log.elapsed()
    results["load_average_at_end"] = load_average()
    print(report(results, args), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return results


def run_parts(args, results: dict, defaults: dict, tmp: Path, log: Progress) -> None:
    """The parts not skipped, in order, each adding its numbers to `results`."""
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
            test_fraction = load_params(ROOT / "params.yaml").data.test_fraction
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


def run() -> None:
    """The `cxr-benchmark` console script."""
    run_stage(main, "benchmark")


if __name__ == "__main__":
    run()
