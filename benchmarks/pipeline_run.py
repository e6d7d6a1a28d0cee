"""The pipeline's side: a training run built from a project's params exactly as the train stage builds it.

The benchmark must measure what `python -m stages.train <variant>` runs (head,
image size, pretrained weights, class weights, L2 penalty, optimiser,
schedule, loaders, the freezing phase of the epoch), not a look-alike made
by hand, so it builds through the same function as the train stage.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from cxrlab import paths
from cxrlab.config.load import load_params
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
)
from cxrlab.model.backbones import build_model
from cxrlab.model.freezing import apply_freeze, phase_at, phases
from cxrlab.model.losses import StudyLoss, class_weights
from cxrlab.model.optim import make_optimizer, make_scheduler, scale_lr
from cxrlab.training.loop import wrap
from cxrlab.training.runtime import Runtime, seed_all, setup


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run with `folder` as the current directory: the library reads a project's outputs relative to it."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass
class Splits:
    fit: Split
    val: Split
    test: Split


@dataclass
class TrainingRun:
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    val_loader: object
    test_loader: object
    plan: list
    classes: list[str]
    image_size: int


def build_run(cfg: TrainParams, data: DataParams, rt: Runtime, splits: Splits, seed: int,
              loading: LoaderSettings) -> TrainingRun:
    """What `cxrlab.training.loop.train_run` builds before its first epoch, step for step.

    A stand-in until branch `dvcrun`'s `cxrlab.training.build.build_run` (the
    train stage's own builder, same signature) is merged; then this function
    goes and the import below `Pipeline.build` changes, nothing else.
    """
    classes = splits.fit.classes
    augment = build_augment(cfg.augmentations)
    loader = make_loader(ImageArrayDataset(splits.fit, augment), cfg.batch_size, shuffle=True, seed=seed,
                         settings=loading, rank=rt.rank, world_size=rt.world_size, balanced=cfg.balanced_sampler)
    plain = LoaderSettings(pin_memory=loading.pin_memory)
    eval_batch = eval_batch_size("auto", rt.device)
    val_loader = (make_loader(ImageArrayDataset(splits.val), eval_batch, shuffle=False, seed=seed, settings=plain)
                  if len(splits.val) else None)
    test_loader = (make_loader(ImageArrayDataset(splits.test), eval_batch, shuffle=False, seed=seed,
                               settings=plain) if cfg.log_test_curve else None)
    image_size = prepared_image_size()
    model = build_model(cfg.arch, len(classes), cfg.dropout, cfg.pretrained, head_hidden=cfg.head_hidden,
                        keep_imagenet_head=cfg.keep_imagenet_head, image_size=image_size).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = class_weights(cfg.class_weights, splits.fit.labels, classes)
    loss_fn = StudyLoss(model, cfg.l2_penalty, weights).to(rt.device)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    plan = phases(cfg.freeze, [p.model_dump() for p in cfg.progressive])
    return TrainingRun(model, loss_fn, optimizer, scheduler, loader, val_loader, test_loader, plan, classes,
                       image_size)


def first_epoch_net(run: TrainingRun, cfg: TrainParams, rt: Runtime) -> tuple[torch.nn.Module, int]:
    """Enter epoch 1 as the train stage's loop does: its freezing phase and lr factor, then the module
    the training step calls (compiled if asked). Returns it and the number of trainable parameters."""
    phase = phase_at(run.plan, 1)
    trainable = apply_freeze(run.model, phase.freeze, cfg.arch, cfg.keep_imagenet_head)
    if phase.lr_factor != 1:
        scale_lr(run.optimizer, phase.lr_factor)
    return wrap(run.model, rt, cfg.compile), trainable


class Pipeline:
    """One prepared project: its params, its splits, and runs built from them as the train stage builds them."""

    def __init__(self, project: Path, device_spec: str):
        self.project, self.device_spec = Path(project), device_spec
        self.params = load_params(self.project / "params.yaml")
        folder = self.project / paths.PREPARED
        train_split, self.test = load_split("train", folder), load_split("test", folder)
        self.fit, self.val = train_split.subset("train"), train_split.subset("val")
        self.train_split = train_split
        self.classes = self.fit.classes

    def runtime(self, cfg: TrainParams) -> Runtime:
        """The train stage's runtime (device, precision, global torch settings); calling it again re-applies
        those settings after the study side has put torch's defaults back."""
        return setup(self.device_spec, cfg.amp, cfg.channels_last, cfg.deterministic)

    def build(self, cfg: TrainParams, rt: Runtime, seed: int) -> TrainingRun:
        """Seed, then build a run as `train_run` does (the loaders first, then the model, from one seed)."""
        seed_all(seed)
        with inside(self.project):  # the builder reads the prepared data's meta.json from the project
            return build_run(cfg, self.params.data, rt, Splits(self.fit, self.val, self.test), seed,
                             loader_settings(cfg, rt.device))
