"""The pipeline's side: a training run built from a project's params exactly as the train stage builds it.

The benchmark must measure what `python -m stages.train <variant>` runs (head,
image size, pretrained weights, class weights, L2 penalty, optimiser,
schedule, loaders, the freezing phase of the epoch), not a look-alike made
by hand, so it builds through the same function as the train stage.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from cxrlab import paths
from cxrlab.config.load import load_params
from cxrlab.config.schema import TrainParams
from cxrlab.data.datasets import load_split, loader_settings
from cxrlab.training.build import Splits, TrainingRun, build_run
from cxrlab.training.loop import Progress, enter_phase
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


def first_epoch_net(run: TrainingRun, cfg: TrainParams, rt: Runtime) -> tuple[torch.nn.Module, int]:
    """Enter epoch 1 as the train stage's loop does (`enter_phase`: its freezing phase and lr factor, then
    the module the training step calls, compiled if asked). Returns it and the number of trainable parameters."""
    progress = Progress()
    enter_phase(run, cfg, rt, progress, 1, "benchmark")
    return progress.net, progress.trainable


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
                             loader_settings(self.params.runtime, rt.device))
