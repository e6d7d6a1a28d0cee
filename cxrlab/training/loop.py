"""Stage `train@<variant>`: train one variant; keep its best and last checkpoints.

The variant's settings are `train` with `experiments.<variant>` merged over
it. Every epoch trains on `subset=train` of the training split, scores the
validation hold-out (`subset=val`) and logs to DVCLive:
loss, accuracy and F1 on train and validation, per-class validation
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
the other. Writes `models/<variant>/seed_<seed>/best.pt` and `last.pt`, the
DVCLive log of each run in `metrics/train/<variant>/seeds/seed_<seed>/`, and
the runs' best epochs in `metrics/train/<variant>/metrics.json`.

A run in progress lives in `.train-state/<variant>/seed_<seed>/` (checkpoints
each epoch, written atomically, and its log) and is moved into those outputs
only when complete, so an interrupted stage leaves nothing DVC could take for
a result. With `train.resume: true` the next run continues from the last
finished epoch if the settings and data are unchanged; on the CPU the result
is the same as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from dvclive import Live

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.config.schema import DataParams, TrainParams
from cxrlab.data.datasets import (
    ImageArrayDataset,
    LoaderSettings,
    Split,
    build_augment,
    eval_batch_size,
    load_split,
    loader_settings,
    make_loader,
    prepared_image_size,
    set_epoch,
)
from cxrlab.errors import UserError
from cxrlab.evaluation.metrics import classification_metrics
from cxrlab.io.fsio import atomic_dir, remove, write_json
from cxrlab.model.backbones import (
    build_model,
    checkpoint_meta,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)
from cxrlab.model.freezing import apply_freeze, phase_at, phases
from cxrlab.model.losses import StudyLoss, class_weights
from cxrlab.model.optim import make_optimizer, make_scheduler, scale_lr
from cxrlab.training.engine import confusion_summary, predict, train_one_epoch
from cxrlab.training.runtime import Runtime, seed_all, setup, teardown, torchrun_command

HIGHER_IS_BETTER = {"f1": True, "macro_f1": True, "accuracy": True, "roc_auc": True, "loss": False}


def make_loaders(cfg: TrainParams, fit: Split, val: Split, test: Split, rt: Runtime, seed: int):
    """Training loader (augmented, shuffled, sharded under DDP); validation and test
    loaders (never augmented, in one process; the test loader only when `log_test_curve`)."""
    augment = build_augment(cfg.augmentations)
    settings = loader_settings(cfg, rt.device)
    loader = make_loader(ImageArrayDataset(fit, augment), cfg.batch_size, shuffle=True, seed=seed,
                         settings=settings, rank=rt.rank, world_size=rt.world_size, balanced=cfg.balanced_sampler)
    eval_batch = eval_batch_size("auto", rt.device)
    plain_settings = LoaderSettings(pin_memory=settings.pin_memory)

    def plain(split: Split):
        return make_loader(ImageArrayDataset(split), eval_batch, shuffle=False, seed=seed, settings=plain_settings)

    return (loader, plain(val) if len(val) else None,
            plain(test) if cfg.log_test_curve else None)


def selection_key(metrics: dict, metric: str) -> tuple[float, float]:
    """Larger is better: the selection metric, then the lower validation loss."""
    value = metrics.get(metric)
    value = -math.inf if value is None else value
    return (value if HIGHER_IS_BETTER[metric] else -value, -metrics["loss"])


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train_variant(variant: str, params: Params) -> None:

    cfg = params.variant(variant)
    train_split, test_split = load_split("train"), load_split("test")
    launch = torchrun_command(cfg.processes, cfg.nodes, cfg.rendezvous, "stages.train", [variant])
    if launch:
        print(f"train {variant}: data-parallel, {' '.join(launch[1:])}", flush=True)
        code = subprocess.call(launch)
        if code:
            raise UserError(f"the data-parallel processes of train {variant} failed (exit code {code}); "
                            "their messages are above")
        return

    rt = setup(cfg.device, cfg.amp, cfg.channels_last, cfg.deterministic)
    try:
        fit, val = train_split.subset("train"), train_split.subset("val")
        if len(fit) == 0:
            raise UserError(f"{paths.PREPARED}/train.csv has no rows with subset=train; lower data.val_fraction")
        runs = {}
        for i, seed in enumerate(cfg.seeds):
            runs[f"seed_{seed}"] = train_run(variant, cfg, seed, params.data, rt, fit, val, test_split,
                                             runs_after=len(cfg.seeds) - 1 - i)
        if rt.is_main:
            write_json(paths.train_dir(variant) / "report.json",
                       {"select_metric": f"val/{cfg.select_metric}", "seeds": runs})
            write_json(paths.train_dir(variant) / "metrics.json",
                       {variant: train_headline(runs, cfg.select_metric)})  # dvc exp show: `<variant>.best_epoch`
    finally:
        teardown()


def train_headline(runs: dict[str, dict], select_metric: str) -> dict[str, float]:
    """The numbers of metrics.json for dvc exp show: the best epoch and its validation `select_metric`,
    the mean over seeds (each seed's and everything else is in report.json)."""
    out = {"best_epoch": float(np.mean([r["best"]["epoch"] for r in runs.values()]))}
    values = [(r["best"].get("val") or {}).get(select_metric) for r in runs.values()]
    if all(isinstance(v, (int, float)) for v in values):
        out[f"best_val_{select_metric}"] = float(np.mean(values))
    return out


def train_run(variant: str, cfg: TrainParams, seed: int, data: DataParams, rt: Runtime,
              fit: Split, val: Split, test: Split, runs_after: int = 0) -> dict | None:
    """Train one seed of a variant; returns its summary (on rank 0)."""
    seed_all(seed)
    classes = fit.classes
    positive = classes.index(data.positive_class)
    loader, val_loader, test_loader = make_loaders(cfg, fit, val, test, rt, seed)

    image_size = prepared_image_size()
    model = build_model(cfg.arch, len(classes), cfg.dropout, cfg.pretrained, head_hidden=cfg.head_hidden,
                        keep_imagenet_head=cfg.keep_imagenet_head, image_size=image_size).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rt.distributed and cfg.sync_batchnorm and rt.device.type == "cuda":  # PyTorch syncs on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    weights = class_weights(cfg.class_weights, fit.labels, classes)
    loss_fn = StudyLoss(model, cfg.l2_penalty, weights).to(rt.device)
    optimizer = make_optimizer(model.parameters(), cfg)  # frozen parameters get no gradient, so no update
    scheduler = make_scheduler(optimizer, cfg)
    plan = phases(cfg.freeze, [p.model_dump() for p in cfg.progressive])

    meta = checkpoint_meta(cfg.arch, cfg.dropout, classes, image_size, data.mean, data.std,
                           head_hidden=cfg.head_hidden, keep_imagenet_head=cfg.keep_imagenet_head,
                           variant=variant, seed=seed)
    name = f"{variant} seed {seed}"
    state_dir = paths.train_state(variant, seed)
    fingerprint = run_fingerprint(cfg, data, seed)
    state = resumable(state_dir / "last.pt", fingerprint, cfg.epochs, name) if cfg.resume else None
    if rt.distributed:
        torch.distributed.barrier()  # rank 0 may clear the folder below only after every rank has read it
    if rt.is_main:
        if state is None:
            remove(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        print(f"train {name}: {cfg.arch}, {count_parameters(model):,} parameters, on {rt.describe()}; "
              f"{len(fit)} training and {len(val)} validation images, batch {cfg.batch_size}"
              f"{f' x {cfg.accumulate_steps} steps' if cfg.accumulate_steps > 1 else ''}"
              f"{f' x {rt.world_size} processes' if rt.distributed else ''}, {loader.num_workers} loader workers")
        if not len(val):
            print(f"train {name}: data.val_fraction is 0, so there is no validation set; "
                  "the last epoch stands in for the best")
        if weights is not None:
            print(f"train {name}: class weights " + ", ".join(f"{c} {w:.3f}" for c, w in zip(classes, weights.tolist())))

    best_key, best, study, first_epoch = None, None, None, 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["resume"]["scheduler"])
        if rt.scaler is not None and state["resume"].get("scaler"):
            rt.scaler.load_state_dict(state["resume"]["scaler"])
        r = state["resume"]
        best_key, best, study = tuple(r["best_key"]), r["best"], r["study"]
        first_epoch = int(state["epoch"]) + 1
        if rt.is_main:
            print(f"train {name}: resuming after epoch {state['epoch']} from {state_dir}")
    live = None
    if rt.is_main:
        live = Live(str(state_dir / "log"), dvcyaml=False, save_dvc_exp=False, resume=state is not None)
        if state is not None:
            truncate_log(state_dir / "log", first_epoch - 1)
            live.step = first_epoch - 1
    started = time.perf_counter()
    phase, net, trainable = phase_at(plan, first_epoch - 1) if first_epoch > 1 else None, None, 0
    last_epoch = first_epoch - 1
    stop = stops_early(cfg.patience, best, last_epoch)
    for epoch in range(first_epoch, cfg.epochs + 1):
        if stop:
            break
        now = phase_at(plan, epoch)
        if net is None or now != phase:
            trainable = apply_freeze(model, now.freeze, cfg.arch, cfg.keep_imagenet_head)
            if phase is not None and now != phase and now.lr_factor != phase.lr_factor:
                scale_lr(optimizer, now.lr_factor / phase.lr_factor)
            elif phase is None and now.lr_factor != 1:
                scale_lr(optimizer, now.lr_factor)
            if rt.is_main and (len(plan) > 1 or now.freeze != "none"):
                print(f"train {name}: from epoch {epoch}, freeze {now.freeze}, lr x {now.lr_factor:g}: "
                      f"{trainable:,} trainable parameters")
            phase, net = now, wrap(model, rt, cfg.compile)  # DDP must see which parameters train
        seed_all(seed, epoch)
        set_epoch(loader, epoch)
        stats = train_one_epoch(net, loader, optimizer, loss_fn, rt, data.mean, data.std, len(classes),
                                cfg.accumulate_steps, desc=f"{name} epoch {epoch}/{cfg.epochs}")
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        if not rt.is_main:
            stop = agree_to_stop(False, rt)
            continue

        row = {"train/loss": stats["loss"], **{f"train/{k}": v for k, v in
                                                 confusion_summary(stats["confusion"], positive).items()}}
        val_metrics = None
        if val_loader is not None:
            prob, y = predict(model, val_loader, rt, data.mean, data.std)
            val_metrics = classification_metrics(y, prob, classes, data.positive_class)
            val_metrics["macro_f1"] = val_metrics["macro"]["f1"]
            row.update({f"val/{k}": val_metrics[k] for k in ("loss", "accuracy", "f1", "macro_f1", "roc_auc")})
            row.update({f"val/{c}/{k}": val_metrics["per_class"][k][c]
                        for c in classes for k in ("precision", "recall", "specificity", "f1")})
        if test_loader is not None:
            prob, y = predict(model, test_loader, rt, data.mean, data.std)
            test_metrics = classification_metrics(y, prob, classes, data.positive_class)
            row.update({f"test_curve/{k}": test_metrics[k] for k in ("accuracy", "f1")})
            if study is None or test_metrics["f1"] > study["test_f1"]:
                study = {"epoch": epoch, "test_accuracy": test_metrics["accuracy"],
                         "test_f1": test_metrics["f1"], "confusion_matrix": test_metrics["confusion_matrix"]}
        row["lr"] = lr
        row["trainable_params"] = trainable
        row["images_per_s"] = stats["images_per_s"]
        for metric, value in row.items():
            if value is not None:
                live.log_metric(metric, value, plot=True)

        summary = {"epoch": epoch, "val": _brief(val_metrics)}
        key = selection_key(val_metrics, cfg.select_metric) if val_metrics else (epoch, 0.0)
        if best_key is None or key > best_key:
            best_key, best = key, summary
            save_checkpoint(state_dir / "best.pt", model, meta, epoch=epoch, metrics=summary)
        live.next_step()
        # last.pt last: whatever an interruption hits, it names the newest complete epoch
        save_checkpoint(state_dir / "last.pt", model, meta, epoch=epoch, metrics=summary,
                        optimizer=optimizer.state_dict(),
                        resume={"fingerprint": fingerprint, "best_key": list(best_key), "best": best,
                                "study": study, "scaler": rt.scaler.state_dict() if rt.scaler else None,
                                "scheduler": scheduler.state_dict() if scheduler else None})

        elapsed = time.perf_counter() - started
        done = epoch - first_epoch + 1
        eta = elapsed / done * (cfg.epochs - epoch + runs_after * cfg.epochs)
        val_text = (f" | val loss {val_metrics['loss']:.4f} acc {val_metrics['accuracy']:.4f} "
                    f"f1 {val_metrics['f1']:.4f}" if val_metrics else "")
        print(f"{name} epoch {epoch}/{cfg.epochs}: train loss {stats['loss']:.4f} "
              f"acc {row['train/accuracy']:.4f}{val_text} | lr {lr:.3g} | {stats['images_per_s']:.1f} img/s | "
              f"elapsed {format_eta(elapsed)}, ETA {format_eta(eta)}", flush=True)
        last_epoch = epoch
        stop = agree_to_stop(stops_early(cfg.patience, best, epoch), rt)
        if stop and epoch < cfg.epochs:
            print(f"train {name}: no better val/{cfg.select_metric} for {cfg.patience} epochs "
                  f"since epoch {best['epoch']}; stopping early after epoch {epoch}")

    if live is None:
        return None
    live.end()
    publish(state_dir, variant, seed)
    result = {"best": best, "epochs_trained": last_epoch, "trainable_params": trainable}
    if study is not None:
        result["study_protocol"] = {
            **study, "note": "epoch chosen by test F1 as in the study; leaks the test set, for comparison only"}
    print(f"train {name}: best epoch {best['epoch']} by val/{cfg.select_metric}; "
          f"checkpoints in {paths.checkpoint(variant, seed, 'best').parent}")
    return result


def wrap(model: torch.nn.Module, rt: Runtime, compile_model: bool) -> torch.nn.Module:
    """The module the training step calls: DDP over the model when distributed, compiled if asked."""
    net = model
    if rt.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return torch.compile(net) if compile_model else net


def stops_early(patience: int | None, best: dict | None, epoch: int) -> bool:
    """Early stopping: `patience` epochs have passed since the best one."""
    return bool(patience and best and epoch - best["epoch"] >= patience)


def agree_to_stop(stop: bool, rt: Runtime) -> bool:
    """Rank 0's decision, given to every process (all must leave the loop together)."""
    if not rt.distributed:
        return stop
    flag = torch.tensor([int(stop)], device=rt.device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def run_fingerprint(cfg: TrainParams, data: DataParams, seed: int) -> str:
    """What a resumed run must share with the interrupted one: every setting that
    changes the numbers, and the prepared data."""
    settings = cfg.model_dump(exclude={"resume", "seeds", "num_workers", "pin_memory", "persistent_workers",
                                       "prefetch_factor", "log_test_curve"})
    digest = hashlib.sha256(json.dumps({"train": settings, "seed": seed, "positive": data.positive_class,
                                        "mean": data.mean, "std": data.std}, sort_keys=True).encode())
    for name in ("train.csv", "test.csv", "meta.json"):
        digest.update((paths.PREPARED / name).read_bytes())
    return digest.hexdigest()


def resumable(last: Path, fingerprint: str, epochs: int, name: str) -> dict | None:
    """The interrupted run's last checkpoint if it can be continued, else None (and why)."""
    if not last.is_file():
        print(f"train {name}: train.resume is on but there is no interrupted run in {last.parent}; starting afresh")
        return None
    try:
        state = load_checkpoint(last)
    except UserError as err:
        print(f"train {name}: cannot resume ({err}); starting afresh")
        return None
    if state.get("resume", {}).get("fingerprint") != fingerprint:
        print(f"train {name}: the interrupted run in {last.parent} used other settings or data; starting afresh")
        return None
    if int(state["epoch"]) > epochs:
        print(f"train {name}: the interrupted run is past train.epochs; starting afresh")
        return None
    return state


def truncate_log(folder: Path, epochs: int) -> None:
    """Drop DVCLive rows after the first `epochs` epochs (steps 0..epochs-1): an
    interruption between logging and checkpointing must not leave a duplicate step."""
    for tsv in (folder / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        column = lines[0].rstrip("\n").split("\t").index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[column]) < epochs]
        tsv.write_text("".join(kept))


def publish(state_dir: Path, variant: str, seed: int) -> None:
    """Move a completed run from its work folder into the DVC outputs."""
    target = paths.checkpoint(variant, seed, "best").parent
    with atomic_dir(target) as tmp:
        for which in ("best", "last"):
            shutil.copy2(state_dir / f"{which}.pt", tmp / f"{which}.pt")
    with atomic_dir(paths.train_log(variant, seed)) as tmp:
        shutil.copytree(state_dir / "log", tmp, dirs_exist_ok=True)
    remove(state_dir)
    for parent in (state_dir.parent, paths.TRAIN_STATE):
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def _brief(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    return {k: metrics[k] for k in ("loss", "accuracy", "f1", "macro_f1", "sensitivity", "specificity", "roc_auc")}

