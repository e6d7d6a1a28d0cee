"""Stage `train@<variant>`: train one variant; keep its best and last checkpoints.

The variant's settings are `train` with `experiments.<variant>` merged over
it. Every epoch trains on `subset=train` of the training split, scores the
validation hold-out (`subset=val`) and logs to DVCLive:
loss (the cross-entropy; an L2 penalty is logged apart as `train/l2_penalty`,
so `train/loss` compares across variants), accuracy and F1 on train and
validation, per-class validation
precision, recall, specificity and F1, learning rate, trainable parameters,
images/s. The best epoch is chosen on validation (`train.select_metric`,
ties to the lower validation loss), never on the test set; `train.patience`
stops a run that many epochs after its best.

What trains and how fast comes from params: freezing and progressive
unfreezing (freezing.py), the optimiser and the per-epoch schedule
(optim.py), class weights (losses.py) and a class-balanced sampler
(datasets.py).

With `train.log_test_curve` the test set is also scored each epoch and
logged as `test_curve/*`, only to compare with the study, which picked its
epoch by test F1; the summary records that epoch as `study_protocol`.

With several `train.seeds`, the variant is trained once per seed, one after
the other. Writes `models/<variant>/seed_<seed>/best.pt` and `last.pt` (weights
and metadata only, about a third of a checkpoint with Adam's state), the
DVCLive log of each run in `metrics/train/<variant>/seeds/seed_<seed>/`, and
the runs' best epochs in `metrics/train/<variant>/metrics.json`.

With `data.folds: k` (the split marks each training image's fold), each
seed trains k models, model f on every fold but f, picking its best epoch
on fold f: `models/<variant>/seed_<seed>/fold_<f>/`, logs, work folder and
summary per fold likewise (cxrlab.training.folds). The folds run inside this
stage rather than as a `matrix` of variant x fold: one train stage per
variant keeps `models/<variant>` one output, so `dvc exp run -S` on a variant
reruns exactly that variant (all its folds) and evaluate, ensemble, explain
and the serving code find a variant's models where they always did.

A run in progress lives in `.train-state/<variant>/seed_<seed>/` (with folds
`.../fold_<f>/`: best.pt, the resume file with the optimiser and schedule
state, written atomically each epoch, and its log) and is moved into those
outputs only when complete (the resume file is removed then), so an
interrupted stage leaves nothing DVC could take for a result. With
`runtime.resume: true` each run continues from its last
finished epoch if the settings and data are unchanged, and a run (seed, fold)
that completed before the interruption is kept, not trained again
(resume.FinishedRuns); on the CPU the result is the same as an uninterrupted run.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from dvclive import Live

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.config.schema import DataParams, TrainParams
from cxrlab.data.datasets import LoaderSettings, load_split, loader_settings, set_epoch
from cxrlab.errors import UserError
from cxrlab.evaluation.metrics import classification_metrics
from cxrlab.io.fsio import atomic_dir, check_writable, remove, write_json
from cxrlab.model.backbones import (
    checkpoint_meta,
    count_parameters,
    save_checkpoint,
)
from cxrlab.model.freezing import Phase, apply_freeze, phase_at
from cxrlab.model.optim import scale_lr
from cxrlab.training.build import Splits, TrainingRun, build_run, run_splits
from cxrlab.training.engine import confusion_summary, predict, train_one_epoch
from cxrlab.training.folds import add_summary, run_outputs, run_units, train_headline
from cxrlab.training.resume import RESUME_FILE, FinishedRuns, resumable, run_fingerprint, truncate_log
from cxrlab.training.runtime import Runtime, agree, agree_to_stop, seed_all, setup, teardown, torchrun_command, wrap

HIGHER_IS_BETTER = {"f1": True, "macro_f1": True, "accuracy": True, "roc_auc": True, "loss": False}


def selection_key(metrics: dict, metric: str) -> tuple[float, float]:
    """Larger is better: the selection metric, then the lower validation loss."""
    value = metrics.get(metric)
    value = -math.inf if value is None else value
    return (value if HIGHER_IS_BETTER[metric] else -value, -metrics["loss"])


def format_eta(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train_variant(variant: str, params: Params) -> None:
    """Train every seed of `variant` (data-parallel under torchrun when asked) and write its summary."""
    cfg = params.variant(variant)
    # before hours of training, not after: the outputs first, then each run's folders
    check_writable(paths.train_dir(variant) / "metrics.json", paths.model_dir(variant))
    train_split, test_split = load_split("train"), load_split("test")
    units = run_units(cfg.seeds, train_split)  # (seed, fold): the ETA counts them all
    check_writable(*run_outputs(variant, units))
    knobs = params.runtime
    launch = torchrun_command(knobs.processes, knobs.nodes, knobs.rendezvous, "stages.train", [variant])
    if launch:
        print(f"train {variant}: data-parallel, {' '.join(launch[1:])}", flush=True)
        code = subprocess.call(launch)
        if code:
            raise UserError(f"the data-parallel processes of train {variant} failed (exit code {code}); "
                            "their messages are above")
        return

    rt = setup(knobs.device, cfg.amp, cfg.channels_last, cfg.deterministic)
    try:
        loading = loader_settings(knobs, rt.device)
        runs: dict = {}
        finished = FinishedRuns(variant, cfg, params.data, knobs.resume, rt.is_main)
        for i, (seed, fold) in enumerate(units):
            summary = agree(finished.kept(seed, fold), rt)  # completed before an interruption: kept
            if summary is None:
                summary = train_run(variant, cfg, seed, params.data, rt, run_splits(train_split, test_split, fold),
                                    loading, resume=knobs.resume, runs_after=len(units) - 1 - i, fold=fold)
                finished.record(seed, fold, summary)
            add_summary(runs, seed, fold, summary)
        if rt.is_main:
            write_json(paths.train_dir(variant) / "report.json",
                       {"select_metric": f"val/{cfg.select_metric}", "seeds": runs})
            write_json(paths.train_dir(variant) / "metrics.json",
                       {variant: train_headline(runs, cfg.select_metric)})  # dvc exp show: `<variant>.best_epoch`
            finished.clear()
    finally:
        teardown()


@dataclass
class Progress:
    """Where a run stands after its latest finished epoch: what a resume restores and the summary reports."""

    first_epoch: int = 1
    best_key: tuple | None = None
    best: dict | None = None
    study: dict | None = None
    last_epoch: int = 0
    last: dict | None = None  # the summary of epoch `last_epoch`, recorded in last.pt
    stop: bool = False
    phase: Phase | None = None
    net: torch.nn.Module | None = None
    trainable: int = 0


def train_run(variant: str, cfg: TrainParams, seed: int, data: DataParams, rt: Runtime, splits: Splits,
              loading: LoaderSettings, resume: bool = False, runs_after: int = 0,
              fold: int | None = None) -> dict | None:
    """Train one seed of a variant (with `fold`, its model holding out that fold); returns its summary (on rank 0).

    The steps: build, resume or start, then per epoch train, validate, select,
    log and checkpoint; finally publish.
    """
    seed_all(seed)
    run = build_run(cfg, data, rt, splits, seed, loading)
    name = f"{variant} seed {seed}" + (f" fold_{fold}" if fold is not None else "")
    state_dir = paths.train_state(variant, seed, fold)
    meta = checkpoint_meta(cfg.arch, cfg.dropout, run.classes, run.image_size, data.mean, data.std,
                           head_hidden=cfg.head_hidden, keep_imagenet_head=cfg.keep_imagenet_head,
                           variant=variant, seed=seed, fold=fold)
    fingerprint = run_fingerprint(cfg, data, seed, fold, rt.amp_dtype)
    progress = resume_or_start(run, cfg, rt, state_dir, fingerprint, name, resume)
    if rt.is_main:
        announce(run, cfg, rt, splits, name)
    live = open_log(state_dir, progress, rt)
    started = time.perf_counter()
    progress.stop = stops_early(cfg.patience, progress.best, progress.last_epoch)
    for epoch in range(progress.first_epoch, cfg.epochs + 1):
        if progress.stop:
            break
        enter_phase(run, cfg, rt, progress, epoch, name)
        stats, lr = train_epoch(run, cfg, data, rt, progress, seed, epoch, name)
        if not rt.is_main:
            progress.stop = agree_to_stop(False, rt)
            continue
        row, val_metrics = validate(run, data, rt, progress, stats, epoch)
        row.update({"lr": lr, "trainable_params": progress.trainable, "images_per_s": stats["images_per_s"]})
        summary = select(run, cfg, progress, val_metrics, state_dir, meta, epoch)
        log_epoch(live, row)
        progress.last = summary
        checkpoint(run, rt, progress, state_dir, meta, fingerprint, epoch)
        report(cfg, progress, stats, row, val_metrics, lr, epoch, name, started, runs_after)
        progress.last_epoch = epoch
        progress.stop = agree_to_stop(stops_early(cfg.patience, progress.best, epoch), rt)
        if progress.stop and epoch < cfg.epochs:
            print(f"train {name}: no better val/{cfg.select_metric} for {cfg.patience} epochs "
                  f"since epoch {progress.best['epoch']}; stopping early after epoch {epoch}")
    if live is None:
        return None
    live.end()
    publish(run, progress, state_dir, meta, variant, seed, fold)
    return run_summary(cfg, progress, name, variant, seed, fold)


def resume_or_start(run: TrainingRun, cfg: TrainParams, rt: Runtime, state_dir: Path, fingerprint: str,
                    name: str, resume: bool) -> Progress:
    """Continue the interrupted run in `state_dir` when asked and possible; otherwise start afresh there."""
    state = resumable(state_dir / RESUME_FILE, fingerprint, cfg.epochs, name) if resume else None
    if rt.distributed:
        torch.distributed.barrier()  # rank 0 may clear the folder below only after every rank has read it
    if rt.is_main:
        if state is None:
            remove(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
    if state is None:
        return Progress()
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    r = state["resume"]
    if run.scheduler is not None:
        run.scheduler.load_state_dict(r["scheduler"])
    if rt.scaler is not None and r.get("scaler"):
        rt.scaler.load_state_dict(r["scaler"])
    first_epoch = int(state["epoch"]) + 1
    if rt.is_main:
        print(f"train {name}: resuming after epoch {state['epoch']} from {state_dir}")
    # the phase of the last finished epoch: the optimiser's lr already carries its factor
    return Progress(first_epoch=first_epoch, best_key=tuple(r["best_key"]), best=r["best"], study=r["study"],
                    last_epoch=first_epoch - 1, last=state["metrics"], phase=phase_at(run.plan, first_epoch - 1))


def announce(run: TrainingRun, cfg: TrainParams, rt: Runtime, splits: Splits, name: str) -> None:
    print(f"train {name}: {cfg.arch}, {count_parameters(run.model):,} parameters, on {rt.describe()}; "
          f"{len(splits.fit)} training and {len(splits.val)} validation images, batch {cfg.batch_size}"
          f"{f' x {cfg.accumulate_steps} steps' if cfg.accumulate_steps > 1 else ''}"
          f"{f' ({cfg.batch_size // rt.world_size} per process x {rt.world_size} processes)' if rt.distributed else ''}"
          f", {run.loader.num_workers} loader workers")
    if not len(splits.val):
        print(f"train {name}: data.val_fraction is 0, so there is no validation set; "
              "the last epoch stands in for the best")
    if run.class_weights is not None:
        print(f"train {name}: class weights "
              + ", ".join(f"{c} {w:.3f}" for c, w in zip(run.classes, run.class_weights.tolist())))


def open_log(state_dir: Path, progress: Progress, rt: Runtime) -> Live | None:
    """The DVCLive log of the run (rank 0 only), continued after the last finished epoch on a resume."""
    if not rt.is_main:
        return None
    resumed = progress.first_epoch > 1
    live = Live(str(state_dir / "log"), dvcyaml=False, save_dvc_exp=False, resume=resumed)
    if resumed:
        truncate_log(state_dir / "log", progress.first_epoch - 1)
        live.step = progress.first_epoch - 1
    return live


def enter_phase(run: TrainingRun, cfg: TrainParams, rt: Runtime, progress: Progress, epoch: int, name: str) -> None:
    """Apply the freezing phase of `epoch` (and its lr factor) when it starts one; wrap the model to train."""
    now = phase_at(run.plan, epoch)
    if progress.net is not None and now == progress.phase:
        return
    phase = progress.phase
    progress.trainable = apply_freeze(run.model, now.freeze, cfg.arch, cfg.keep_imagenet_head)
    if phase is not None and now != phase and now.lr_factor != phase.lr_factor:
        scale_lr(run.optimizer, now.lr_factor / phase.lr_factor)
    elif phase is None and now.lr_factor != 1:
        scale_lr(run.optimizer, now.lr_factor)
    if rt.is_main and (len(run.plan) > 1 or now.freeze != "none"):
        print(f"train {name}: from epoch {epoch}, freeze {now.freeze}, lr x {now.lr_factor:g}: "
              f"{progress.trainable:,} trainable parameters")
    progress.phase, progress.net = now, wrap(run.model, rt, cfg.compile)  # DDP must see which parameters train


def train_epoch(run: TrainingRun, cfg: TrainParams, data: DataParams, rt: Runtime, progress: Progress,
                seed: int, epoch: int, name: str) -> tuple[dict, float]:
    """One pass over the training loader, then one step of the schedule; returns its stats and the lr it used."""
    seed_all(seed, epoch)
    set_epoch(run.loader, epoch)
    stats = train_one_epoch(progress.net, run.loader, run.optimizer, run.loss_fn, rt, data.mean, data.std,
                            len(run.classes), cfg.accumulate_steps, desc=f"{name} epoch {epoch}/{cfg.epochs}")
    lr = run.optimizer.param_groups[0]["lr"]
    if run.scheduler is not None:
        run.scheduler.step()
    return stats, lr


def validate(run: TrainingRun, data: DataParams, rt: Runtime, progress: Progress, stats: dict,
             epoch: int) -> tuple[dict, dict | None]:
    """The epoch's log row (training, validation and test-curve metrics) and the validation metrics."""
    positive = run.classes.index(data.positive_class)
    # train/loss is the cross-entropy alone, comparable across variants; an L2 penalty is its own curve
    row = {"train/loss": stats["loss"], "train/l2_penalty": stats.get("l2_penalty"),
           **{f"train/{k}": v for k, v in confusion_summary(stats["confusion"], positive).items()}}
    val_metrics = None
    if run.val_loader is not None:
        prob, y = predict(run.model, run.val_loader, rt, data.mean, data.std)
        val_metrics = classification_metrics(y, prob, run.classes, data.positive_class)
        val_metrics["macro_f1"] = val_metrics["macro"]["f1"]
        row.update({f"val/{k}": val_metrics[k] for k in ("loss", "accuracy", "f1", "macro_f1", "roc_auc")})
        row.update({f"val/{c}/{k}": val_metrics["per_class"][k][c]
                    for c in run.classes for k in ("precision", "recall", "specificity", "f1")})
    if run.test_loader is not None:
        prob, y = predict(run.model, run.test_loader, rt, data.mean, data.std)
        test_metrics = classification_metrics(y, prob, run.classes, data.positive_class)
        row.update({f"test_curve/{k}": test_metrics[k] for k in ("accuracy", "f1")})
        if progress.study is None or test_metrics["f1"] > progress.study["test_f1"]:
            progress.study = {"epoch": epoch, "test_accuracy": test_metrics["accuracy"],
                              "test_f1": test_metrics["f1"], "confusion_matrix": test_metrics["confusion_matrix"]}
    return row, val_metrics


def select(run: TrainingRun, cfg: TrainParams, progress: Progress, val_metrics: dict | None, state_dir: Path,
           meta: dict, epoch: int) -> dict:
    """Keep the epoch as best.pt when it beats the best so far on validation; returns its summary."""
    summary = {"epoch": epoch, "val": _brief(val_metrics)}
    key = selection_key(val_metrics, cfg.select_metric) if val_metrics else (epoch, 0.0)
    if progress.best_key is None or key > progress.best_key:
        progress.best_key, progress.best = key, summary
        save_checkpoint(state_dir / "best.pt", run.model, meta, epoch=epoch, metrics=summary)
    return summary


def log_epoch(live: Live, row: dict) -> None:
    for metric, value in row.items():
        if value is not None:
            live.log_metric(metric, value, plot=True)
    live.next_step()


def checkpoint(run: TrainingRun, rt: Runtime, progress: Progress, state_dir: Path, meta: dict, fingerprint: str,
               epoch: int) -> None:
    """The resume file, after best.pt: whatever an interruption hits, it names the newest complete epoch.

    It alone holds the optimiser, schedule and scaler states (with the weights, so
    the two always belong to one epoch); the published checkpoints hold weights and
    metadata only, and the file goes with the work folder when the run completes.
    """
    save_checkpoint(state_dir / RESUME_FILE, run.model, meta, epoch=epoch, metrics=progress.last,
                    optimizer=run.optimizer.state_dict(),
                    resume={"fingerprint": fingerprint, "best_key": list(progress.best_key), "best": progress.best,
                            "study": progress.study, "scaler": rt.scaler.state_dict() if rt.scaler else None,
                            "scheduler": run.scheduler.state_dict() if run.scheduler else None})


def report(cfg: TrainParams, progress: Progress, stats: dict, row: dict, val_metrics: dict | None, lr: float,
           epoch: int, name: str, started: float, runs_after: int) -> None:
    """One line per epoch: losses, accuracy, F1, lr, speed, elapsed time and the ETA of the stage."""
    elapsed = time.perf_counter() - started
    done = epoch - progress.first_epoch + 1
    eta = elapsed / done * (cfg.epochs - epoch + runs_after * cfg.epochs)
    val_text = (f" | val loss {val_metrics['loss']:.4f} acc {val_metrics['accuracy']:.4f} "
                f"f1 {val_metrics['f1']:.4f}" if val_metrics else "")
    print(f"{name} epoch {epoch}/{cfg.epochs}: train loss {stats['loss']:.4f} "
          f"acc {row['train/accuracy']:.4f}{val_text} | lr {lr:.3g} | {stats['images_per_s']:.1f} img/s | "
          f"elapsed {format_eta(elapsed)}, ETA {format_eta(eta)}", flush=True)


def run_summary(cfg: TrainParams, progress: Progress, name: str, variant: str, seed: int,
                fold: int | None) -> dict:
    result = {"best": progress.best, "epochs_trained": progress.last_epoch, "trainable_params": progress.trainable}
    if progress.study is not None:
        result["study_protocol"] = {
            **progress.study,
            "note": "epoch chosen by test F1 as in the study; leaks the test set, for comparison only"}
    print(f"train {name}: best epoch {progress.best['epoch']} by val/{cfg.select_metric}; "
          f"checkpoints in {paths.checkpoint(variant, seed, 'best', fold).parent}")
    return result


def stops_early(patience: int | None, best: dict | None, epoch: int) -> bool:
    """Early stopping: `patience` epochs have passed since the best one."""
    return bool(patience and best and epoch - best["epoch"] >= patience)


def publish(run: TrainingRun, progress: Progress, state_dir: Path, meta: dict, variant: str, seed: int,
            fold: int | None = None) -> None:
    """Move a completed run from its work folder into the DVC outputs: best.pt, last.pt (the
    final weights, lean like best.pt) and the log; then remove the folder and its resume file."""
    target = paths.checkpoint(variant, seed, "best", fold).parent
    with atomic_dir(target) as tmp:
        shutil.move(state_dir / "best.pt", tmp / "best.pt")
        save_checkpoint(tmp / "last.pt", run.model, meta, epoch=progress.last_epoch, metrics=progress.last)
    with atomic_dir(paths.train_log(variant, seed, fold)) as tmp:
        shutil.copytree(state_dir / "log", tmp, dirs_exist_ok=True)
    remove(state_dir)
    for parent in (state_dir.parent, state_dir.parent.parent, paths.TRAIN_STATE):
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def _brief(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    return {k: metrics[k] for k in ("loss", "accuracy", "f1", "macro_f1", "sensitivity", "specificity", "roc_auc")}

