"""A trained model as a predictor: preprocessing, probabilities, the operating-threshold decision, Grad-CAM.

Used by the prediction command (`cxrlab.cli.predict`), the explain stage and the web page.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

import numpy as np
import torch
from torch import nn

from cxrlab import paths
from cxrlab.config.load import load_params
from cxrlab.data.images import (
    IMAGE_SUFFIXES,
    ImageRefused,
    is_image_name,
    load_rgb,
    natural_key,
)
from cxrlab.errors import UserError
from cxrlab.explain import cam
from cxrlab.io.fsio import atomic_file, read_json
from cxrlab.model.backbones import load_checkpoint, model_from_checkpoint
from cxrlab.training.engine import predict
from cxrlab.training.runtime import Runtime, inference_dtype, setup

BATCH_SIZE = 32


@dataclass
class Predictor:
    """A checkpoint's model with its preprocessing and decision rule."""

    path: Path
    ckpt: dict
    model: nn.Module
    rt: Runtime
    positive: int | None = None  # index of the positive class of a binary task
    threshold: float | None = None  # on the positive class's probability; None: argmax
    dtype: torch.dtype | None = None  # autocast dtype of `probabilities` (runtime.inference_precision); None: fp32

    @property
    def precision(self) -> str:
        """The precision that scores images: `fp32` or `bf16` (autocast, fp32 softmax)."""
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    @property
    def classes(self) -> list[str]:
        return list(self.ckpt["classes"])

    @property
    def image_size(self) -> int:
        return int(self.ckpt["image_size"])

    @property
    def fold_note(self) -> str | None:
        """With data.folds, what this one model is: serving loads a single fold's model, not the k-model mean."""
        fold = self.ckpt.get("fold")
        if fold is None:
            return None
        return (f"fold_{fold}'s model alone (data.folds: evaluate's metrics are of the mean of the fold models, "
                "its threshold of their out-of-fold predictions)")

    @property
    def rule(self) -> str:
        if self.threshold is None:
            return "the highest probability"
        return f"p({self.classes[self.positive]}) >= {self.threshold:.4f} (the operating threshold chosen by evaluate)"

    def probabilities(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Class probabilities (N x k) of uint8 images (N, 3, size, size), through `engine.predict`."""
        # np.array copies: `images` may be a read-only memory map, which torch.from_numpy warns about
        batches = [(torch.from_numpy(np.array(images[i:i + batch_size])),
                    torch.zeros(len(images[i:i + batch_size]), dtype=torch.int64))
                   for i in range(0, len(images), batch_size)]
        return predict(self.model, batches, self.rt, self.ckpt["mean"], self.ckpt["std"], dtype=self.dtype)[0]

    def decisions(self, probs: np.ndarray) -> list[str]:
        """The class decided for each row of `probs`: at the threshold, else by argmax (as evaluate)."""
        if self.threshold is None:
            return [self.classes[int(i)] for i in probs.argmax(1)]
        other = 1 - self.positive
        return [self.classes[self.positive] if p[self.positive] >= self.threshold else self.classes[other]
                for p in probs]

    def explained_class(self, probs: np.ndarray) -> int:
        """Whose Grad-CAM to draw: the positive class of a binary task, else the predicted one."""
        return self.positive if self.positive is not None else int(probs.argmax())

    def heatmaps(self, images: np.ndarray, target_class: int) -> np.ndarray:
        """Grad-CAM of `target_class` over uint8 images (N, 3, size, size), in [0, 1]; always fp32
        (the grad-cam library hands activations to NumPy, which has no bf16; and it is one image a time)."""
        return cam.heatmaps(self.model, self.ckpt["arch"], images, self.ckpt["mean"], self.ckpt["std"], target_class)


def load_predictor(path: str | Path, positive_class: str | None = None, threshold: float | None = None,
                   device: str = "auto", precision: str = "fp32") -> Predictor:
    """The model of checkpoint `path`, deciding at `threshold` on `positive_class` (binary tasks only),
    scoring in `precision` (`runtime.inference_precision`: auto, fp32 or bf16)."""
    return make_predictor(load_checkpoint(path), path, positive_class, threshold, device, precision)


def make_predictor(ckpt: dict, path: str | Path, positive_class: str | None = None,
                   threshold: float | None = None, device: str = "auto", precision: str = "fp32") -> Predictor:
    """Like `load_predictor`, for a checkpoint already loaded from `path`. The explain stage keeps
    the default fp32: a stage's output must not depend on `runtime`."""
    rt = setup(device, amp=False, channels_last=False)
    model = model_from_checkpoint(ckpt, path).to(rt.device).eval()
    classes = list(ckpt["classes"])
    binary = len(classes) == 2 and positive_class in classes
    positive = classes.index(positive_class) if binary else None
    return Predictor(Path(path), ckpt, model, rt, positive, threshold if binary else None,
                     inference_dtype(precision, rt.device))


def operating_threshold(variant: str, seed: int) -> float | None:
    """The threshold evaluate chose on validation for `seed`'s best checkpoint (its report.json), or None."""
    report_path = paths.eval_dir(variant) / "report.json"
    if not report_path.is_file():
        return None
    op = (read_json(report_path).get("best") or {}).get("operating_point") or {}
    threshold = (op.get("thresholds") or {}).get(f"seed_{seed}")
    return None if threshold is None else float(threshold)


def variant_predictor(variant: str, seed: int | None = None, which: str = "best",
                      device: str = "auto", precision: str = "fp32") -> Predictor:
    """The predictor of a trained variant (first seed by default), with evaluate's threshold."""
    params = load_params()
    seeds = params.variant(variant).seeds
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise UserError(f"variant {variant!r} is trained with seeds {seeds}, not {seed}; "
                        f"pass one of them to --seed (train.seeds in params.yaml)")
    path = paths.served_checkpoint(variant, seed, which)
    if not path.is_file():
        raise UserError(f"{path} does not exist: variant {variant!r} is not trained yet; "
                        f"run `dvc repro train@{variant} evaluate@{variant}`")
    threshold = operating_threshold(variant, seed) if which == "best" else None
    return load_predictor(path, params.data.positive_class, threshold, device, precision)


def image_files(inputs: Sequence[str]) -> list[Path]:
    """The files named, and the images under the folders named, each once, in order."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and is_image_name(p.name)]
            files += sorted(found, key=lambda p: (p.parent.as_posix(), natural_key(p.name)))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist; name image files or folders of images")
    files = list(dict.fromkeys(files))
    if not files:
        raise UserError(f"no images found in {', '.join(inputs)} (looked for "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def decode(source: str | Path | IO[bytes], size: int, max_pixels: int, min_side: int) -> np.ndarray | str:
    """The (3, size, size) uint8 image as the preprocess stage makes it, or why it cannot be used
    (`max_pixels`, `min_side`: params.yaml's data.max_image_pixels and data.min_image_side)."""
    try:
        return load_rgb(source, size, max_pixels, min_side)
    except ImageRefused as err:  # too large (a decompression bomb) or too small, by its header
        return f"refused: {err}"
    except (OSError, ValueError) as err:  # not an image, truncated
        why = str(err).replace(repr(source), "").replace(repr(str(source)), "").strip() or type(err).__name__
        return f"not a readable image ({why})"


def decode_all(files: list[Path], size: int, max_pixels: int,
               min_side: int) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """(images, their files, [(skipped file, why)])."""
    images, kept, skipped = [], [], []
    for path in files:
        result = decode(path, size, max_pixels, min_side)
        if isinstance(result, str):
            skipped.append((path, result))
        else:
            images.append(result)
            kept.append(path)
    array = np.stack(images) if images else np.zeros((0, 3, size, size), dtype=np.uint8)
    return array, kept, skipped


def write_output(out: Path, predictor: Predictor, files: list[Path], probs: np.ndarray, decisions: list[str],
                 skipped: list[tuple[Path, str]]) -> None:
    """`out` as CSV (one row per image) or JSON (with the checkpoint, rule and skipped files)."""
    classes = predictor.classes
    if out.suffix.lower() == ".csv":
        with atomic_file(out) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", *(f"prob_{c}" for c in classes), "predicted", "threshold", "decision",
                             "precision"])
            for path, p, decision in zip(files, probs, decisions):
                writer.writerow([str(path), *(f"{v:.6f}" for v in p), classes[int(p.argmax())],
                                 # the threshold exactly as evaluate wrote it
                                 "" if predictor.threshold is None else repr(float(predictor.threshold)),
                                 decision, predictor.precision])
        return
    report = {
        "checkpoint": str(predictor.path),
        "classes": classes,
        "positive_class": None if predictor.positive is None else classes[predictor.positive],
        "threshold": predictor.threshold,
        "rule": predictor.rule,
        "precision": predictor.precision,
        **({"model": predictor.fold_note} if predictor.fold_note else {}),
        "predictions": [{"file": str(path), "probabilities": dict(zip(classes, map(float, p))),
                         "predicted": classes[int(p.argmax())], "decision": decision,
                         "precision": predictor.precision}
                        for path, p, decision in zip(files, probs, decisions)],
        "skipped": [{"file": str(path), "reason": why} for path, why in skipped],
    }
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
