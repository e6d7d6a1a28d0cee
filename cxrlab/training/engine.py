"""One training epoch and batched prediction, on whatever `Runtime` was chosen.

Shared by the train and evaluate stages (and the prediction command), so
the model sees exactly the same input pipeline everywhere.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrlab.data.datasets import to_model_input
from cxrlab.errors import UserError
from cxrlab.evaluation.stats import metrics_from_confusion
from cxrlab.model.freezing import train_mode
from cxrlab.model.losses import total
from cxrlab.training.runtime import Runtime


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    loss_fn: nn.Module, rt: Runtime, mean, std, num_classes: int,
                    accumulate_steps: int = 1, desc: str = "train") -> dict:
    """Train over `loader` once; returns the mean of each loss term per image (`loss` is the
    cross-entropy, `l2_penalty` the penalty when there is one), confusion counts and images/s
    (all ranks summed). Frozen batch-norm layers stay in eval mode.

    `loss_fn` is a `StudyLoss`, or any loss module (its value then counts as the cross-entropy).
    """
    train_mode(model)
    names = ["cross_entropy"] + (["l2_penalty"] if getattr(loss_fn, "l2_lambda", 0) > 0 else [])
    sums = torch.zeros(len(names), dtype=torch.float64, device=rt.device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=rt.device)
    seen = 0
    steps = len(loader)
    start = shown = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not rt.is_main, mininterval=1)
    optimizer.zero_grad(set_to_none=True)
    for step, (images, labels) in enumerate(bar):
        x = to_model_input(images, rt.device, mean, std, rt.channels_last)
        y = labels.to(rt.device, non_blocking=True)
        boundary = (step + 1) % accumulate_steps == 0 or step + 1 == steps
        sync = contextlib.nullcontext() if boundary or not rt.distributed else model.no_sync()
        with sync:
            with rt.autocast():
                logits = model(x)
            logits = logits.float()  # the loss in fp32 whatever the autocast dtype
            if hasattr(loss_fn, "terms"):
                terms = loss_fn.terms(logits, y)
            else:
                terms = {"cross_entropy": loss_fn(logits, y)}
            loss = total(terms)
            if not torch.isfinite(loss):  # one sync per step, small next to the step: a NaN must stop the run now
                raise UserError(diverged(desc, loss.item(), step, steps, optimizer.param_groups[0]["lr"]))
            scaled = loss / accumulate_steps
            (rt.scaler.scale(scaled) if rt.scaler else scaled).backward()
        if boundary:
            if rt.scaler:
                rt.scaler.step(optimizer)
                rt.scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            sums += torch.stack([terms[name].detach().double() for name in names]) * len(y)
            pred = logits.argmax(dim=1)
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(
                num_classes, num_classes)
        seen += len(y)
        if rt.is_main and (time.perf_counter() - shown >= 1 or step + 1 == steps):
            # the mean over the epoch so far (this process's batches), not one batch's noisy value
            shown = time.perf_counter()
            bar.set_postfix(mean_loss=f"{sums[0].item() / seen:.4f}",
                            img_s=f"{seen * rt.world_size / max(shown - start, 1e-9):.0f}", refresh=False)
    bar.close()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - start
    totals = torch.cat([sums, torch.tensor([seen], dtype=torch.float64, device=rt.device)])
    if rt.distributed:
        dist.all_reduce(totals)
        dist.all_reduce(confusion)
    n = int(totals[-1].item())
    means = {"loss" if name == "cross_entropy" else name: totals[i].item() / max(n, 1)
             for i, name in enumerate(names)}
    return {**means, "confusion": confusion.cpu().numpy(),
            "images": n, "seconds": seconds, "images_per_s": n / max(seconds, 1e-9)}


def diverged(desc: str, loss: float, step: int, steps: int, lr: float) -> str:
    """What a run whose training loss became nan or inf was doing, and what to try."""
    return (f"{desc}: the training loss became {loss} at batch {step + 1} of {steps}, at lr {lr:.3g}: the run "
            "diverged and was stopped; nothing of it was published. Try a lower train.lr (e.g. "
            f"{lr / 10:.3g}), a warmup (train.scheduler: warmup_cosine), or train.amp: false")


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, rt: Runtime, mean, std,
            desc: str | None = None, dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N x k, float32) and labels for every image of `loader`, in order.

    In float32 unless `dtype` asks for autocast, whatever `rt`'s mixed precision
    (which is for training steps only): bf16/fp16 logits round probabilities,
    create ties that move ROC AUC and thresholds, and make a metric depend on the
    hardware it ran on. Only serving (prediction, the page) passes a `dtype`
    (`runtime.inference_precision`); evaluation, ensembles and validation never do.
    """
    model.eval()
    probs, labels = [], []
    cast = torch.autocast(rt.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    for images, y in tqdm(loader, desc=desc, unit="batch", leave=False,
                          disable=desc is None or not rt.is_main, mininterval=1):
        x = to_model_input(images, rt.device, mean, std, rt.channels_last)
        with cast:
            logits = model(x)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(y)
    if not probs:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def confusion_summary(confusion: np.ndarray, positive: int) -> dict:
    """Accuracy and the positive class's F1 from a confusion matrix (rows true)."""
    values = metrics_from_confusion(np.asarray(confusion)[None], positive)
    return {"accuracy": float(values["accuracy"][0]), "f1": float(values["f1"][0])}
