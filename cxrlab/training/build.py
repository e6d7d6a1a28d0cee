"""One way to build a training run: the model, loss, optimiser, schedule and loaders of a variant and seed.

The train stage and the speed benchmark both call `build_run`, so a benchmark
measures exactly what training runs (head, image size, pretrained weights,
freezing plan, class weights, L2 penalty, optimiser, schedule, loaders),
never a hand-made look-alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from cxrlab import paths
from cxrlab.config.schema import DataParams, TrainParams
from cxrlab.data.datasets import (
    ImageArrayDataset,
    LoaderSettings,
    Split,
    build_augment,
    eval_batch_size,
    make_loader,
    prepared_image_size,
)
from cxrlab.errors import UserError
from cxrlab.model.architectures import family_name
from cxrlab.model.backbones import build_model
from cxrlab.model.freezing import phases
from cxrlab.model.losses import StudyLoss, class_weights
from cxrlab.model.optim import make_optimizer, make_scheduler
from cxrlab.training.runtime import Runtime


class Splits(NamedTuple):
    """The images of a run: `fit` trains, `val` picks the best epoch, `test` only feeds the study's test curve."""

    fit: Split
    val: Split
    test: Split


def run_splits(train: Split, test: Split, fold: int | None) -> Splits:
    """The images of one run: the hold-out split's subsets, or with `fold` (data.folds) every other
    fold to fit and that fold to pick the best epoch on."""
    fit, val = train.fold_out(fold) if fold is not None else (train.subset("train"), train.subset("val"))
    if len(fit) == 0:
        raise UserError(f"{paths.PREPARED}/train.csv has no rows with subset=train; lower data.val_fraction")
    return Splits(fit, val, test)


@dataclass
class TrainingRun:
    """Everything one seed of a variant trains with, built but not yet trained or resumed."""

    model: torch.nn.Module
    loss_fn: StudyLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    loader: DataLoader
    val_loader: DataLoader | None
    test_loader: DataLoader | None
    plan: list  # freezing phases (cxrlab.model.freezing.phases), applied per epoch by the loop
    class_weights: torch.Tensor | None
    classes: list[str]
    image_size: int


def make_loaders(cfg: TrainParams, splits: Splits, rt: Runtime, seed: int, loading: LoaderSettings):
    """Training loader (augmented, shuffled, sharded under DDP); validation and test
    loaders (never augmented, in one process; the test loader only when `log_test_curve`)."""
    augment = build_augment(cfg.augmentations)
    # train.batch_size is the batch of one optimiser step over all processes, so the process count is a
    # runtime knob: each rank takes its share, and the ranks' batches together are the one-process batch
    per_process, rest = divmod(cfg.batch_size, rt.world_size)
    if rest or not per_process:
        raise UserError(f"train.batch_size {cfg.batch_size} does not split evenly over {rt.world_size} processes "
                        f"(runtime.processes x runtime.nodes); set train.batch_size to a multiple of {rt.world_size}")
    # Batch norm in training mode cannot normalise one image where a map is 1 x 1 (ResNet's last block at
    # 32 px, a ViT has none): a last batch of one image is dropped (only then: drop_last would lose up to
    # batch_size - 1 images). The order is reshuffled each epoch, so no image is left out for good.
    alone = -(-len(splits.fit) // rt.world_size) % per_process == 1 and per_process > 1
    loader = make_loader(ImageArrayDataset(splits.fit, augment), per_process, shuffle=True, seed=seed,
                         settings=loading, rank=rt.rank, world_size=rt.world_size, balanced=cfg.balanced_sampler,
                         drop_last=alone and family_name(cfg.arch) != "vit")
    eval_batch = eval_batch_size("auto", rt.device)
    plain_settings = LoaderSettings(pin_memory=loading.pin_memory)

    def plain(split: Split):
        return make_loader(ImageArrayDataset(split), eval_batch, shuffle=False, seed=seed, settings=plain_settings)

    return (loader, plain(splits.val) if len(splits.val) else None,
            plain(splits.test) if cfg.log_test_curve else None)


def build_run(cfg: TrainParams, data: DataParams, rt: Runtime, splits: Splits, seed: int,
              loading: LoaderSettings) -> TrainingRun:
    """Build one seed's run on `rt` from a variant's settings; `loading` says how loaders feed it.

    The caller seeds the RNGs first (`seed_all(seed)`): the loaders and then
    the model's initialisation draw from them in this order, which is what
    makes two builds with one seed bit-identical on the CPU.
    """
    classes = splits.fit.classes
    loader, val_loader, test_loader = make_loaders(cfg, splits, rt, seed, loading)
    image_size = prepared_image_size()
    model = build_model(cfg.arch, len(classes), cfg.dropout, cfg.pretrained, head_hidden=cfg.head_hidden,
                        keep_imagenet_head=cfg.keep_imagenet_head, image_size=image_size).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rt.distributed and cfg.sync_batchnorm and rt.device.type == "cuda":  # PyTorch syncs on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    weights = class_weights(cfg.class_weights, splits.fit.labels, classes)
    loss_fn = StudyLoss(model, cfg.l2_penalty, weights).to(rt.device)
    optimizer = make_optimizer(model.parameters(), cfg)  # frozen parameters get no gradient, so no update
    scheduler = make_scheduler(optimizer, cfg)
    plan = phases(cfg.freeze, [p.model_dump() for p in cfg.progressive])
    return TrainingRun(model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, loader=loader,
                       val_loader=val_loader, test_loader=test_loader, plan=plan, class_weights=weights,
                       classes=classes, image_size=image_size)
