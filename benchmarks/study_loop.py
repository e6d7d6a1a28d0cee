"""The study's way of doing the work, as its code did it: the other side of every comparison.

A `Dataset` that opens the original 512 px PNG with PIL on every access
(RGB, Resize((S, S)), ToTensor, Normalize), batch 4, shuffled, no loader
workers; a torchvision model trained in fp32 with Adam (lr 1e-4) and
cross-entropy; evaluation in eval mode but without `torch.no_grad`. It runs
with torch's default global settings, which `torch_flags`/`restore_flags`
give back after the pipeline's `runtime.setup` has changed them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

STUDY_BATCH = 4
STUDY_LR = 1e-4


class StudyDataset(Dataset):
    """The study's loader: open the original PNG with PIL on every access, RGB, transform."""

    def __init__(self, files: list[Path], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        image = Image.open(self.files[i]).convert("RGB")
        return self.transform(image), self.labels[i]


def study_loader(files: list[Path], labels: list[int], size: int, mean, std, augment: dict | None = None,
                 shuffle: bool = True, batch: int = STUDY_BATCH) -> DataLoader:
    """Resize((S, S)) [+ augmentation], ToTensor, Normalize; `batch` (the study's 4), no loader workers."""
    from torchvision import transforms as T

    steps = [T.Resize((size, size))]
    for name, kwargs in (augment or {}).items():
        steps.append(getattr(T, name)(**kwargs))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return DataLoader(StudyDataset(files, labels, T.Compose(steps)), batch_size=batch,
                      shuffle=shuffle, num_workers=0)


def split_files(project: Path, split: str, subset: str | None = None) -> tuple[list[Path], list[int]]:
    """The original PNGs of a split (as the prepare stage laid them out) and their labels, in CSV order."""
    with open(project / "data" / "split" / f"{split}.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if subset is None or r["subset"] == subset]
    files = [project / "data" / "dataset" / split / r["class"] / r["filename"] for r in rows]
    return files, [int(r["label"]) for r in rows]


@dataclass
class StudyRun:
    """The study's model, optimiser and loss."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: torch.nn.Module
    device: torch.device

    @classmethod
    def build(cls, arch: str, n_classes: int, device: torch.device) -> StudyRun:
        import torchvision

        model = torchvision.models.get_model(arch, weights=None, num_classes=n_classes).to(device)
        return cls(model, torch.optim.Adam(model.parameters(), lr=STUDY_LR), torch.nn.CrossEntropyLoss(), device)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """One step of the study's loop; the number of images."""
        images, labels = images.to(self.device), labels.to(self.device)
        self.optimizer.zero_grad()
        outputs = self.model(images)
        loss = self.criterion(outputs, labels)
        loss.backward()
        self.optimizer.step()
        _, predicted = torch.max(outputs.data, 1)
        loss.item(), (predicted == labels).sum().item()  # the running loss and accuracy every loop keeps
        return len(labels)

    def eval_batch(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.model(images.to(self.device))  # model.eval() but no torch.no_grad(), as in the study
        _, predicted = torch.max(outputs.data, 1)
        return predicted.cpu()


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
