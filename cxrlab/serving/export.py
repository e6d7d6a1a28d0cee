"""The export stage's work: each seed's trained model as an ONNX file with its preprocessing contract beside it.

`exports/<variant>/seed_<seed>.onnx` holds the whole scoring path of one seed's
best checkpoint (the epoch chosen on validation, the one evaluate's operating
threshold belongs to): scaling, ImageNet-style normalisation, the network and
the softmax. Its input is float32 pixel values 0-255, RGB, `(batch, 3, size,
size)` with a dynamic batch axis; its output the class probabilities `(batch,
k)` in the class order of the contract. `seed_<seed>.json` beside it is the
contract a deployment needs: image size and resize, mean and std (applied in
the graph, stated for the record), class order, positive class, operating
threshold, opset and the checkpoint it came from.

One file per seed, not the seeds averaged: evaluate chooses one threshold per
seed on validation, and a threshold belongs to the model it was chosen for.
With `data.folds`, a seed's k fold models are averaged inside the graph: that
mean is what evaluate scores and chooses the seed's threshold for.
Nothing is trained: the checkpoints are read, traced and written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.errors import UserError
from cxrlab.io.fsio import atomic_dir, read_json
from cxrlab.model.backbones import load_checkpoint, model_from_checkpoint

CONTRACT_FORMAT = "cxrlab-onnx-1"
INPUT, OUTPUT = "image", "probabilities"
RESIZE = ("decoded as RGB (grayscale repeated in 3 channels), resized to size x size with PIL's bilinear filter "
          "(aspect ratio not kept), exactly as the preprocess stage and cxr-predict do")


class Scorer(nn.Module):
    """uint8-valued float images (N, 3, S, S) -> class probabilities (N, k): what `engine.predict` computes,
    averaged over `models` (a seed's fold models; one model without folds)."""

    def __init__(self, models: list[nn.Module], mean, std):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image / 255 - self.mean) / self.std
        probs = [torch.softmax(m(x), dim=1) for m in self.models]
        return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)


def seed_checkpoints(variant: str, seed: int) -> list[Path]:
    """The best checkpoint of `seed`, or with data.folds its fold models' in fold order."""
    single = paths.checkpoint(variant, seed, "best")
    if single.is_file():
        return [single]
    folds = sorted(single.parent.glob("fold_*/best.pt"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not folds:
        raise UserError(f"{single} does not exist: variant {variant!r} seed {seed} is not trained; "
                        f"run `dvc repro train@{variant}`")
    return folds


def export_onnx(models: list[nn.Module], mean, std, image_size: int, path: Path, opset: int) -> None:
    """Write the scorer of `models` to `path` (ONNX, `opset`, dynamic batch axis)."""
    scorer = Scorer([m.float().eval() for m in models], mean, std).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False) is deprecated in favour of torch.export's, which needs
        # the onnxscript package and is slower for a plain CNN; this one is still supported and exact here
        # (tests/test_export.py checks onnxruntime against PyTorch). Its deprecation notice is not for users.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(scorer, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


def operating_threshold(variant: str, seed: int) -> float | None:
    """The threshold evaluate chose on validation for `seed`'s best checkpoint, or None (none chosen)."""
    report = paths.eval_dir(variant) / "report.json"
    if not report.is_file():
        raise UserError(f"{report} does not exist; run `dvc repro evaluate@{variant}` first")
    op = (read_json(report).get("best") or {}).get("operating_point") or {}
    threshold = (op.get("thresholds") or {}).get(f"seed_{seed}")
    return None if threshold is None else float(threshold)


def contract(variant: str, seed: int, ckpts: list[Path], first: dict, positive_class: str,
             threshold: float | None, opset: int) -> dict:
    """What a deployment needs to feed the ONNX file and read its output."""
    classes = list(first["classes"])
    positive = positive_class if len(classes) == 2 and positive_class in classes else None
    size = int(first["image_size"])
    return {
        "format": CONTRACT_FORMAT,
        "model": f"seed_{seed}.onnx",
        "variant": variant,
        "seed": seed,
        "arch": first["arch"],
        "checkpoints": [p.as_posix() for p in ckpts],
        "combine": "the mean of the fold models' probabilities (as evaluate scores a seed with data.folds)"
                   if len(ckpts) > 1 else "one model: the seed's best checkpoint (the epoch chosen on validation)",
        "opset": opset,
        "image_size": size,
        "input": {"name": INPUT, "shape": ["batch", 3, size, size], "dtype": "float32",
                  "values": "pixel values 0 to 255, channels R, G, B", "resize": RESIZE},
        "normalisation": "inside the graph: (x / 255 - mean) / std per channel",
        "mean": list(first["mean"]),
        "std": list(first["std"]),
        "output": {"name": OUTPUT, "shape": ["batch", len(classes)], "dtype": "float32",
                   "values": "softmax class probabilities, columns in `classes` order"},
        "classes": classes,
        "positive_class": positive,
        "threshold": threshold if positive else None,
        "rule": (f"{positive} when p({positive}) >= threshold (chosen by evaluate on validation), else the other "
                 "class" if positive and threshold is not None else "the class of the highest probability"),
    }


def export_variant(variant: str, params: Params) -> Path:
    """Export every seed of `variant` into exports/<variant>/ (replaced as a whole); returns that folder."""
    settings = params.variant(variant)
    opset = params.export.opset
    out = paths.export_dir(variant)
    plan = [(seed, seed_checkpoints(variant, seed)) for seed in settings.seeds]  # all present, before writing
    with atomic_dir(out) as tmp:
        for seed, ckpts in plan:
            loaded = [load_checkpoint(p) for p in ckpts]
            first = loaded[0]
            models = [model_from_checkpoint(c, p) for c, p in zip(loaded, ckpts)]
            export_onnx(models, first["mean"], first["std"], int(first["image_size"]), tmp / f"seed_{seed}.onnx",
                        opset)
            spec = contract(variant, seed, ckpts, first, params.data.positive_class,
                            operating_threshold(variant, seed), opset)
            (tmp / f"seed_{seed}.json").write_text(json.dumps(spec, indent=2) + "\n")
            print(f"export {variant}: seed {seed} -> {out / spec['model']} (opset {opset}, "
                  f"{len(ckpts)} model{'s' if len(ckpts) > 1 else ''}, threshold {spec['threshold']})")
    return out
