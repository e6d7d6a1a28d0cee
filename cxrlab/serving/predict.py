"""A trained model as a predictor: preprocessing, probabilities, the operating-threshold decision, Grad-CAM.

With `data.folds` the model is the mean of a seed's k fold models, exactly what evaluate scores, decided at
the threshold evaluate chose for that mean (docs/cross-validation.md).

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
from tqdm import tqdm

from cxrlab import paths
from cxrlab.config.load import load_params
from cxrlab.data.images import (
    IMAGE_SUFFIXES,
    ImageRefused,
    is_image_file,
    load_rgb,
    natural_key,
)
from cxrlab.errors import UserError
from cxrlab.evaluation.metrics import decide
from cxrlab.explain import cam
from cxrlab.io.fsio import atomic_file, read_json
from cxrlab.model.backbones import load_checkpoint, model_from_checkpoint
from cxrlab.training.engine import predict
from cxrlab.training.runtime import Runtime, inference_dtype, setup

BATCH_SIZE = 32


@dataclass
class Predictor:
    """A trained model with its preprocessing and decision rule: one checkpoint, or with `data.folds` the
    k fold models of a seed, whose mean probability is the model (what evaluate scores)."""

    paths: list[Path]
    ckpts: list[dict]
    models: list[nn.Module]
    rt: Runtime
    positive: int | None = None  # index of the positive class of a binary task
    threshold: float | None = None  # on the positive class's probability; None: argmax
    dtype: torch.dtype | None = None  # autocast dtype of `probabilities` (runtime.inference_precision); None: fp32

    @property
    def precision(self) -> str:
        """The precision that scores images: `fp32` or `bf16` (autocast, fp32 softmax)."""
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def ckpt(self) -> dict:
        return self.ckpts[0]

    @property
    def classes(self) -> list[str]:
        return list(self.ckpt["classes"])

    @property
    def image_size(self) -> int:
        return int(self.ckpt["image_size"])

    @property
    def summary(self) -> str:
        return f"{self.ckpt['arch']}, {self.image_size} px"

    @property
    def fold_note(self) -> str | None:
        """With data.folds, what the model is: the mean of the fold models, as evaluate scores it."""
        if len(self.models) == 1:
            return None
        return (f"the mean of the {len(self.models)} fold models' probabilities (data.folds), the model evaluate "
                f"scores; Grad-CAM: the mean of their heatmaps; checkpoints {', '.join(map(str, self.paths))}")

    @property
    def rule(self) -> str:
        if self.threshold is None:
            return "the highest probability"
        return f"p({self.classes[self.positive]}) >= {self.threshold:.4f} (the operating threshold chosen by evaluate)"

    def probabilities(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Class probabilities (N x k) of uint8 images (N, 3, size, size), through `engine.predict`; with
        several (fold) models the mean of theirs, in fold order, as evaluate averages them."""
        # np.array copies: `images` may be a read-only memory map, which torch.from_numpy warns about
        batches = [(torch.from_numpy(np.array(images[i:i + batch_size])),
                    torch.zeros(len(images[i:i + batch_size]), dtype=torch.int64))
                   for i in range(0, len(images), batch_size)]
        probs = [predict(model, batches, self.rt, ckpt["mean"], ckpt["std"], dtype=self.dtype)[0]
                 for model, ckpt in zip(self.models, self.ckpts)]
        return probs[0] if len(probs) == 1 else np.mean(probs, axis=0)

    def decisions(self, probs: np.ndarray) -> list[str]:
        """The class decided for each row of `probs`: at the threshold, else by argmax (as evaluate)."""
        return [self.classes[int(i)] for i in decide(probs, self.positive or 0, self.threshold)]

    def explained_class(self, probs: np.ndarray) -> int:
        """Whose Grad-CAM to draw: the positive class of a binary task, else the predicted one."""
        return self.positive if self.positive is not None else int(probs.argmax())

    def heatmaps(self, images: np.ndarray, target_class: int) -> np.ndarray:
        """Grad-CAM of `target_class` over uint8 images (N, 3, size, size), in [0, 1]; with several (fold)
        models the mean of their maps (each model's own last feature maps: there is no one layer to share).
        Always fp32 (the grad-cam library hands activations to NumPy, which has no bf16)."""
        maps = [cam.heatmaps(model, ckpt["arch"], images, ckpt["mean"], ckpt["std"], target_class)
                for model, ckpt in zip(self.models, self.ckpts)]
        return maps[0] if len(maps) == 1 else np.mean(maps, axis=0)


def load_predictor(path: str | Path | Sequence[str | Path], positive_class: str | None = None,
                   threshold: float | None = None, device: str = "auto", precision: str = "fp32") -> Predictor:
    """The model of checkpoint `path` (or of several fold checkpoints, averaged), deciding at `threshold` on
    `positive_class` (binary tasks only), scoring in `precision` (`runtime.inference_precision`: auto, fp32
    or bf16)."""
    files = [path] if isinstance(path, (str, Path)) else list(path)
    return make_predictor([load_checkpoint(p) for p in files], files, positive_class, threshold, device, precision)


def make_predictor(ckpts: list[dict], files: Sequence[str | Path], positive_class: str | None = None,
                   threshold: float | None = None, device: str = "auto", precision: str = "fp32") -> Predictor:
    """Like `load_predictor`, for checkpoints already loaded from `files`. The explain stage keeps the
    default fp32: a stage's output must not depend on `runtime`."""
    first = ckpts[0]  # fold models of one seed: trained together by one train stage, on the same data
    rt = setup(device, amp=False, channels_last=False)
    models = [model_from_checkpoint(ckpt, path).to(rt.device).eval() for ckpt, path in zip(ckpts, files)]
    classes = list(first["classes"])
    binary = len(classes) == 2 and positive_class in classes
    positive = classes.index(positive_class) if binary else None
    return Predictor([Path(p) for p in files], list(ckpts), models, rt, positive, threshold if binary else None,
                     inference_dtype(precision, rt.device))


def operating_threshold(variant: str, seed: int, which: str = "best") -> float | None:
    """The threshold evaluate chose on validation for `seed`'s `which` checkpoint(s) (its report.json), or None."""
    report_path = paths.eval_dir(variant) / "report.json"
    if not report_path.is_file():
        return None
    op = (read_json(report_path).get(which) or {}).get("operating_point") or {}
    threshold = (op.get("thresholds") or {}).get(f"seed_{seed}")
    return None if threshold is None else float(threshold)


def variant_predictor(variant: str, seed: int | None = None, which: str = "best",
                      device: str = "auto", precision: str = "fp32") -> Predictor:
    """The predictor of a trained variant (first seed by default; with data.folds the mean of its fold
    models), deciding at evaluate's operating threshold for that checkpoint kind."""
    params = load_params()
    seeds = params.variant(variant).seeds
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise UserError(f"variant {variant!r} is trained with seeds {seeds}, not {seed}; "
                        f"pass one of them to --seed (train.seeds in params.yaml)")
    files = paths.served_checkpoints(variant, seed, which)
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]} does not exist: variant {variant!r} is not trained yet; "
                        f"run `dvc repro train@{variant} evaluate@{variant}`")
    return load_predictor(files, params.data.positive_class, operating_threshold(variant, seed, which), device,
                          precision)


def image_files(inputs: Sequence[str]) -> list[Path]:
    """The files named, and the images under the folders named, each once, in order."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and is_image_file(p)]
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
    except ImageRefused as err:  # another format, several frames, too large (a bomb) or too small, by its header
        return f"refused: {err}"
    except (OSError, ValueError) as err:  # not an image, truncated, any decoder failure (UnreadableImage)
        why = str(err).replace(repr(source), "").replace(repr(str(source)), "").strip() or type(err).__name__
        return f"not a readable image ({why})"


def predict_files(predictor: Predictor, files: list[Path], max_pixels: int, min_side: int,
                  batch_size: int = BATCH_SIZE, on_skip=None) -> tuple[list[Path], np.ndarray, list[tuple[Path, str]]]:
    """(the files read, their class probabilities (N x k), [(skipped file, why)]), streamed:
    `batch_size` images are decoded, scored and let go at a time, so memory stays flat however many
    files there are (only the probabilities, k floats per image, are kept). `on_skip(path, why)` is
    called as each unreadable file is met."""
    kept: list[Path] = []
    probs: list[np.ndarray] = []
    skipped: list[tuple[Path, str]] = []
    batch: list[np.ndarray] = []
    batch_files: list[Path] = []

    def flush() -> None:
        if batch:
            probs.append(predictor.probabilities(np.stack(batch), batch_size))
            kept.extend(batch_files)
            batch.clear()
            batch_files.clear()

    for path in tqdm(files, desc="predict", unit="img", leave=False, disable=None, mininterval=1):
        result = decode(path, predictor.image_size, max_pixels, min_side)
        if isinstance(result, str):
            skipped.append((path, result))
            if on_skip is not None:
                on_skip(path, result)
            continue
        batch.append(result)
        batch_files.append(path)
        if len(batch) == batch_size:
            flush()
    flush()
    k = len(predictor.classes)
    return kept, (np.concatenate(probs) if probs else np.zeros((0, k), dtype=np.float32)), skipped


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
        "checkpoint": str(predictor.path) if len(predictor.paths) == 1 else [str(p) for p in predictor.paths],
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
