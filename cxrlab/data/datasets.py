"""Datasets over the preprocessed arrays, their transforms and loaders.

Images stay uint8 (N x C x H x W, C = 1 for grayscale data) until they
reach the device, where `to_model_input` repeats a single channel into three,
scales and normalises them (4x less to copy than float32, 12x for grayscale).
Training augmentations are torchvision.transforms.v2 classes named in
params, applied per image on the CPU in the loader's workers (each image
draws its own random parameters, which batched GPU transforms would not);
evaluation applies none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from cxrlab import paths
from cxrlab.errors import UserError
from cxrlab.io.fsio import read_json
from cxrlab.io.records import read_rows


@dataclass
class Split:
    """One split of the preprocessed data: images, labels and their CSV rows."""

    images: np.ndarray  # uint8, N x C x H x W (memory-mapped; C = 1 or 3)
    labels: np.ndarray  # int64, N
    rows: list[dict]
    classes: list[str]

    def subset(self, *names: str) -> "Split":
        """The rows whose `subset` column is one of `names` (train, val, test, or fold_<f>), in file order."""
        idx = np.array([i for i, r in enumerate(self.rows) if r["subset"] in names], dtype=np.int64)
        return Split(_Indexed(self.images, idx), self.labels[idx], [self.rows[i] for i in idx], self.classes)

    def folds(self) -> list[str]:
        """The folds of a k-fold split (`data.folds`), fold_0 first; [] for a hold-out split."""
        names = {r["subset"] for r in self.rows if r["subset"].startswith("fold_")}
        return sorted(names, key=lambda n: int(n.split("_")[1]))

    def fold_out(self, fold: int) -> tuple["Split", "Split"]:
        """(fit, held out) of fold `fold`: every other fold trains, this one picks the best epoch."""
        names = self.folds()
        return self.subset(*(n for n in names if n != names[fold])), self.subset(names[fold])

    def __len__(self) -> int:
        return len(self.labels)


class _Indexed:
    """A lazy row selection of a memory-mapped array (no copy until indexed)."""

    dtype = np.uint8

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array, self.index = array, index
        self.shape = (len(index),) + tuple(array.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.array[self.index[i]]


def load_split(name: str, folder: Path = paths.PREPARED) -> Split:
    """`train` or `test` from the preprocess stage's output."""
    array_path, csv_path = folder / f"{name}.npy", folder / f"{name}.csv"
    if not array_path.is_file():
        raise UserError(f"{array_path} does not exist; run the preprocess stage first (dvc repro preprocess)")
    images = np.load(array_path, mmap_mode="r")
    rows = read_rows(csv_path, made_by="preprocess")
    meta = read_json(folder / "meta.json")
    if len(rows) != len(images):
        raise UserError(f"{csv_path} lists {len(rows)} images but {array_path} holds {len(images)}; "
                        "run the preprocess stage again (dvc repro -f preprocess)")
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    return Split(images, labels, rows, list(meta["classes"]))


def prepared_image_size(folder: Path = paths.PREPARED) -> int:
    return int(read_json(folder / "meta.json")["image_size"])


def build_augment(augmentations: dict[str, dict[str, Any]]) -> Callable | None:
    """The training transform: the named torchvision v2 augmentations, in order, or None."""
    if not augmentations:
        return None
    steps = []
    for name, kwargs in augmentations.items():
        try:
            steps.append(getattr(v2, name)(**kwargs))
        except (TypeError, ValueError) as err:
            raise UserError(f"augmentation {name} with {kwargs}: {err}; see the torchvision "
                            f"documentation of transforms.v2.{name} for its arguments") from None
    return v2.Compose(steps)


class ImageArrayDataset(Dataset):
    """(uint8 image, label) pairs, fetched a whole batch at a time (`__getitems__`).

    Indices come from `EpochSampler` as (epoch, i) pairs. The augmentation of
    image `i` in epoch `e` draws its randomness from (seed, e, i) alone, so
    results depend neither on the number of loader workers nor on whether
    they persist across epochs, and a run resumed at an epoch boundary
    repeats exactly. A plain index `i` means epoch 0.
    """

    def __init__(self, split: Split, transform: Callable | None = None, seed: int = 0):
        self.split = split
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        images, labels = self.__getitems__([i])
        return images[0], int(labels[0])

    def __getitems__(self, indices: list):
        tagged = [(0, i) if isinstance(i, (int, np.integer)) else i for i in indices]
        order = np.array([i for _, i in tagged], dtype=np.int64)
        ascending = np.argsort(order, kind="stable")
        # one read of the memory-mapped array per batch, in file order
        images = np.empty((len(order),) + tuple(self.split.images.shape[1:]), dtype=np.uint8)
        images[ascending] = self.split.images[order[ascending]]
        images = torch.from_numpy(images)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                out = []
                for image, (epoch, i) in zip(images, tagged):
                    torch.default_generator.manual_seed(_mix(self.seed, epoch, int(i)))
                    out.append(self.transform(image))
            images = torch.stack(out)
        return images, torch.from_numpy(self.split.labels[order])


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def _batched(batch):
    return batch  # __getitems__ already returns (images, labels) tensors


class EpochSampler(Sampler):
    """The indices of one epoch as (epoch, i) pairs: shuffled from (seed, epoch),
    and under DDP dealt out in turn to the ranks (rank r gets positions r,
    r + world, ...), so rank batches together are the one-process batch.

    The order lives in the main process, so persistent workers see each new
    epoch without being restarted. Call `set_epoch` before every epoch.
    Under DDP the epoch is padded by repeating its first indices so every
    rank has the same number of batches (as `DistributedSampler` does).

    With `weights` (one per item), an epoch is n draws with replacement in
    proportion to them instead: `balanced_weights` makes every class equally
    likely (`train.balanced_sampler`).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 weights: np.ndarray | None = None):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        padded = len(self) * self.world_size
        if padded > self.n:
            order = torch.cat([order, order[: padded - self.n]])
        for i in order[self.rank::self.world_size].tolist():
            yield self.epoch, i


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-item sampling weights 1 / (count of its class): each class drawn equally often."""
    counts = np.bincount(labels)
    return 1.0 / counts[labels]


@dataclass(frozen=True)
class LoaderSettings:
    """How a loader feeds the model (`runtime.num_workers` etc., resolved for the device)."""

    workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int = 2


def loader_settings(cfg, device: torch.device) -> LoaderSettings:
    """Resolve the `auto` loader knobs of `runtime` (RuntimeParams) for `device`."""
    workers = auto_workers(cfg.num_workers, device)
    pin = device.type == "cuda" if cfg.pin_memory == "auto" else bool(cfg.pin_memory)
    return LoaderSettings(workers=workers, pin_memory=pin, persistent_workers=cfg.persistent_workers and workers > 0,
                          prefetch_factor=cfg.prefetch_factor)


def auto_workers(setting: int | str, device: torch.device) -> int:
    """Loader processes: on a GPU enough to keep it fed; elsewhere none.

    Without a GPU the model step is the bottleneck by far (ResNet-50 trains at
    a few images/s per CPU core; decoding nothing and augmenting an image
    costs about 0.5 ms), while each batch a worker hands over costs a few ms
    of inter-process transfer: in-process loading is faster there.
    """
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_gpu = cpus // max(1, torch.cuda.device_count())
    return max(1, min(8, per_gpu - 1))


def eval_batch_size(setting: int | str, device: torch.device) -> int:
    """Images per inference batch: `auto` is 256 on a GPU and 8 elsewhere, where
    larger batches run slower per image (ResNet-50 on 2 CPU cores: 10.4 img/s
    at 8, 8.6 at 64)."""
    if setting != "auto":
        return int(setting)
    return 256 if device.type == "cuda" else 8


def make_loader(dataset: ImageArrayDataset, batch_size: int, *, shuffle: bool, seed: int,
                settings: LoaderSettings = LoaderSettings(), rank: int = 0, world_size: int = 1,
                balanced: bool = False, drop_last: bool = False) -> DataLoader:
    """A loader over `dataset` whose order comes from `EpochSampler(seed)`, sharded by rank
    (`balanced`: classes drawn equally often, with replacement).

    Call `set_epoch(loader, epoch)` before each epoch: it reseeds the order and
    the augmentations from (seed, epoch).
    """
    dataset.seed = seed
    workers = settings.workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                             weights=balanced_weights(dataset.split.labels) if balanced else None),
        num_workers=workers,
        collate_fn=_batched,
        drop_last=drop_last,
        pin_memory=settings.pin_memory,
        persistent_workers=settings.persistent_workers and workers > 0,
        prefetch_factor=settings.prefetch_factor if workers > 0 else None,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    loader.sampler.set_epoch(epoch)


def to_model_input(images: torch.Tensor, device: torch.device, mean, std, channels_last: bool) -> torch.Tensor:
    """uint8 N x C x H x W on the host (C = 1 or 3) -> normalised float N x 3 x H x W on `device`."""
    x = images.to(device, non_blocking=True).float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale: the three channels are equal
    mean_t = torch.as_tensor(mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - mean_t).div_(std_t)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
