"""The in-process measurements: 1. the data path alone, 2. the model step, and the no-op `dvc repro`.

Both sides run in this process, taking turns in rounds, so that a burst of
load elsewhere on the machine hits both; the study side runs with torch's
default global settings, the pipeline side with those its runtime sets. The
model step's pipeline side runs twice, in fp32 and in bf16 mixed precision
(`train.amp` on a CPU or GPU with native bf16; on a CPU without it, emulated
and slow, measured all the same), so the two precisions' ratio comes from one run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from benchmarks.fixtures import dvc, tiny_reproducible_project
from benchmarks.pipeline_run import Pipeline, first_epoch_net
from benchmarks.study_loop import STUDY_BATCH, StudyRun, restore_flags, split_files, study_loader
from benchmarks.timing import Limited, endless, quiet, sync, throughput
from cxrlab.data.datasets import (
    ImageArrayDataset,
    LoaderSettings,
    Split,
    eval_batch_size,
    make_loader,
    set_epoch,
    to_model_input,
)
from cxrlab.training.engine import predict, train_one_epoch
from cxrlab.training.runtime import Runtime, cpu_bf16_native

DATA_VARIANTS = {"baseline": "baseline (no augmentation)", "contrast": "contrast (ColorJitter, CPU)"}
Log = Callable[[str], None]


# ------------------------------------------------------------ 1. data path
def measure_data(pipe: Pipeline, args, defaults: dict, log: Log) -> dict:
    """Both loaders of each variant, `args.rounds` rounds taking turns; the median round counts."""
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
        loader = pipe.build(cfg, rt, seed).loader  # the train stage's training loader
        workers = loader.num_workers
        torch.manual_seed(seed)
        study = study_loader(files, labels, args.image_size, data.mean, data.std, cfg.augmentations)

        def pipeline_batch(batch, rt=rt):
            images, y = batch
            to_model_input(images, rt.device, data.mean, data.std, rt.channels_last)
            y.to(rt.device, non_blocking=True)
            return len(y)

        def study_batch(batch, device=rt.device):
            images, y = batch
            images.to(device)
            y.to(device)
            return len(y)

        rounds = {"pipeline": [], "study": []}
        for r in range(args.rounds):
            pipe.runtime(cfg)  # the pipeline's global torch settings
            rounds["pipeline"].append(throughput(endless(loader, set_epoch), pipeline_batch, args.data_seconds,
                                                 rt.device))
            restore_flags(defaults)  # torch's defaults for the study
            rounds["study"].append(throughput(endless(study), study_batch, args.data_seconds, rt.device))
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
def precision_runtimes(pipe: Pipeline, cfg) -> dict[str, Runtime]:
    """The train stage's runtime in fp32 and in bf16 mixed precision (where bf16 can run at all)."""
    fp32 = dataclasses.replace(pipe.runtime(cfg), amp_dtype=None, scaler=None, amp_asked=False)
    runtimes = {"fp32": fp32}
    if fp32.device.type == "cpu" or (fp32.device.type == "cuda" and torch.cuda.is_bf16_supported()):
        runtimes["bf16"] = dataclasses.replace(fp32, amp_dtype=torch.bfloat16, amp_asked=True)
    return runtimes


def measure_model(pipe: Pipeline, args, defaults: dict, log: Log) -> dict:
    """Training and evaluation images/s of both sides, the pipeline's in fp32 and in bf16, in
    `args.model_rounds` rounds taking turns (so a burst of load elsewhere hits all); each side's
    images over its total time."""
    cfg = pipe.params.variant("baseline")
    train_batch = args.train_batch or STUDY_BATCH  # the study's side
    if args.train_batch:  # both sides at one batch size; else each its own (the study's 4, params' train.batch_size)
        cfg = cfg.model_copy(update={"batch_size": args.train_batch})
    data, ev = pipe.params.data, pipe.params.evaluate
    seed = cfg.seeds[0]
    rt = pipe.runtime(cfg)  # what the train stage runs: `train.amp` on this machine
    stage_precision = "bf16" if rt.amp_dtype == torch.bfloat16 else "fp32"
    runtimes = precision_runtimes(pipe, cfg)
    precisions = list(runtimes)
    device = rt.device
    n_classes = len(pipe.classes)
    rounds = args.model_rounds
    steps = [args.steps // rounds + (r < args.steps % rounds) for r in range(rounds)]
    n_eval = min(math.ceil(args.eval_images / rounds), len(pipe.test))

    # the study: its loaders, torchvision model, Adam, cross-entropy
    restore_flags(defaults)
    torch.manual_seed(seed)
    files, labels = split_files(pipe.project, "train", "train")
    study_batches = endless(study_loader(files, labels, args.image_size, data.mean, data.std, batch=train_batch))
    test_files, test_labels = split_files(pipe.project, "test")
    study_eval_loader = study_loader(test_files[:n_eval], test_labels[:n_eval], args.image_size, data.mean,
                                     data.std, shuffle=False)
    study = StudyRun.build(args.arch, n_classes, device)

    # the pipeline: the train stage's run, entering its first epoch, once per precision; evaluate's batch size
    runs, nets = {}, {}
    for precision, prt in runtimes.items():
        runs[precision] = pipe.build(cfg, prt, seed)
        nets[precision], trainable = first_epoch_net(runs[precision], cfg, prt)
    run = runs["fp32"]
    test = pipe.test
    subset = Split(test.images[:n_eval], test.labels[:n_eval], test.rows[:n_eval], test.classes)
    eval_batch = eval_batch_size(ev.batch_size, device)
    eval_loader = make_loader(ImageArrayDataset(subset), eval_batch, shuffle=False, seed=0,
                              settings=LoaderSettings(pin_memory=device.type == "cuda"))

    def pipeline_train(precision: str, batches: int, epoch: int) -> int:
        pipe.runtime(cfg)
        r = runs[precision]
        set_epoch(r.loader, epoch)
        with quiet():
            stats = train_one_epoch(nets[precision], Limited(r.loader, batches), r.optimizer, r.loss_fn,
                                    runtimes[precision], data.mean, data.std, n_classes, cfg.accumulate_steps,
                                    desc="benchmark")
        return stats["images"]

    def study_train(batches: int) -> int:
        restore_flags(defaults)
        study.model.train()
        return sum(study.train_step(*next(study_batches)) for _ in range(batches))

    def pipeline_eval(precision: str, batches: int | None = None) -> int:
        """`predict` as the evaluate stage runs it (fp32) and as predict and the page may (bf16 autocast)."""
        pipe.runtime(cfg)
        prob, _ = predict(run.model, eval_loader if batches is None else Limited(eval_loader, batches),
                          runtimes["fp32"], data.mean, data.std, dtype=runtimes[precision].amp_dtype)
        return len(prob)

    def study_eval(batches: int | None = None) -> int:
        restore_flags(defaults)
        study.model.eval()
        seen = 0
        for images, _ in itertools.islice(study_eval_loader, batches):
            seen += len(study.eval_batch(images))
        return seen

    def timed(fn, *a) -> tuple[int, float]:
        sync(device)
        start = time.perf_counter()
        n = fn(*a)
        sync(device)
        return n, time.perf_counter() - start

    log(f"model: warm-up, one training step and one evaluation batch on each side ({', '.join(precisions)}) ...")
    study_train(1)
    study_eval(1)
    for precision in precisions:
        pipeline_train(precision, 1, 0)
        pipeline_eval(precision, 1)
    jobs = [("study_train", study_train, ()), ("study_eval", study_eval, ())]
    jobs += [(f"{precision}_train", pipeline_train, (precision,)) for precision in precisions]
    jobs += [(f"{precision}_eval", pipeline_eval, (precision,)) for precision in precisions]
    totals = {key: [0, 0.0] for key, _, _ in jobs}
    for r in range(rounds):
        for key, fn, a in jobs:
            if key.endswith("_train"):
                if not steps[r]:
                    continue
                a = (*a, steps[r]) + ((r + 1,) if a else ())
            n, seconds = timed(fn, *a)
            totals[key][0] += n
            totals[key][1] += seconds
        log(f"model, round {r + 1}/{rounds}: training {steps[r]} steps, evaluation {n_eval} images per side; "
            + ", ".join(f"{k.replace('_', ' ')} {n / max(t, 1e-9):.2f} img/s" for k, (n, t) in totals.items()))

    def side(key: str, batch: int, precision: str, **extra) -> dict:
        n, seconds = totals[key]
        return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "batch": batch,
                "precision": precision, **extra}

    out = {"arch": args.arch, "image_size": args.image_size, "runtime": rt.describe(), "rounds": rounds,
           "trainable_params": trainable, "stage_precision": stage_precision,
           "bf16_native": device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native())}
    for part, batch, extra in (("train", cfg.batch_size, {"steps": sum(steps),
                                                          "loader_workers": run.loader.num_workers}),
                               ("eval", eval_batch, {"grad": False})):
        study_extra = {"steps": sum(steps)} if part == "train" else {"grad": True}
        study = side(f"study_{part}", train_batch if part == "train" else STUDY_BATCH, "fp32", **study_extra)
        result = {"study": study}
        for precision in precisions:
            result[precision] = side(f"{precision}_{part}", batch, precision, **extra)
            result[f"{precision}_ratio"] = result[precision]["images_per_s"] / study["images_per_s"]
        # `pipeline` is what the stage runs: training in train.amp's precision on this machine, evaluation in fp32
        result["pipeline"] = result[stage_precision if part == "train" else "fp32"]
        result["ratio"] = result["pipeline"]["images_per_s"] / study["images_per_s"]
        if "bf16" in result:
            result["bf16_vs_fp32"] = result["bf16"]["images_per_s"] / result["fp32"]["images_per_s"]
        out[part] = result
    return out


# ------------------------------------------------------------ 3. no-op repro
def measure_noop_repro(root: Path, runs: int, log: Log) -> dict:
    """A tiny project reproduced end to end in a git repository, then `dvc repro` with nothing to do."""
    project = tiny_reproducible_project(root)
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
    stages = len(yaml.safe_load((project / "dvc.lock").read_text())["stages"])
    return {"full_repro_s": full, "runs_s": times, "median_s": statistics.median(times),
            "all_up_to_date": all(up_to_date), "stages": stages}
