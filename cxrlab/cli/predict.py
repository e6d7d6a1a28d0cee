"""Command `python -m cxrlab.cli.predict`: class probabilities of a trained model for new X-rays.

    python -m cxrlab.cli.predict --variant baseline [--seed S] [--which best|last] PATHS... [--out preds.csv|.json]
    python -m cxrlab.cli.predict --checkpoint models/baseline/seed_42/best.pt PATHS... [--out preds.json]
    python -m cxrlab.cli.predict --onnx exports/baseline/seed_42.onnx PATHS... [--out preds.json]

PATHS are image files or folders (searched recursively for images). Each
image is decoded and resized exactly as the preprocess stage does
(`load_rgb`) and normalised with the checkpoint's own mean and std, so a test
image gets the probabilities evaluate reported for it. With `--variant`,
the model is evaluate's: the seed's checkpoint, or with `data.folds` the mean
of its fold models' probabilities; a binary task's best or last checkpoint
is decided at the operating threshold evaluate chose on validation for it
(`metrics/evaluate/<variant>/report.json`), the rule behind every reported
metric; a `--checkpoint`, or a task without a threshold, is decided by the
highest probability. With `--onnx`, an exported model (export stage) is scored
with onnxruntime (`pip install -e '.[onnx]'`), deciding as its contract
(the .json beside it) says. Unreadable files, and images outside the size limits
of params.yaml (`data.max_image_pixels`, `data.min_image_side`, so run it from
the project root), are reported and skipped. The table goes to stdout;
`--out` also writes it as CSV or JSON (checked to be writable first), with
the precision that scored each image: `--precision` (default
`runtime.inference_precision`; `auto`: bf16 where the CPU or GPU computes it
natively, within 0.01 of fp32; fp32 gives evaluate's probabilities exactly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from cxrlab.config.load import load_params
from cxrlab.errors import UserError, run_stage
from cxrlab.io.fsio import check_writable
from cxrlab.serving.onnx import load_onnx_predictor
from cxrlab.serving.predict import (
    image_files,
    load_predictor,
    predict_files,
    variant_predictor,
    write_output,
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--variant", help="a trained key of `experiments` in params.yaml")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint file (.pt) written by the train stage")
    source.add_argument("--onnx", type=Path, help="an exported model (exports/<variant>/seed_<seed>.onnx), "
                        "scored with onnxruntime as the contract beside it says")
    parser.add_argument("--seed", type=int, help="with --variant: which seed's model (default: the first)")
    parser.add_argument("--which", choices=("best", "last"), default="best",
                        help="with --variant: the epoch chosen on validation (best) or the last one")
    parser.add_argument("--out", type=Path, help="also write the predictions to this .csv or .json file")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="fp32, bf16 or auto (bf16 where native); default: runtime.inference_precision")
    parser.add_argument("paths", nargs="+", help="image files or folders of images")
    args = parser.parse_args(argv)
    if args.out is not None:  # before any work: a wrong --out must not cost the predictions
        if args.out.is_dir():
            raise UserError(f"--out {args.out} is a folder; name a .csv or .json file, e.g. "
                            f"{args.out / 'predictions.csv'}")
        if args.out.suffix.lower() not in (".csv", ".json"):
            raise UserError(f"--out {args.out}: write .csv or .json")
        check_writable(args.out)
    params = load_params()
    data, precision = params.data, args.precision or params.runtime.inference_precision

    if args.onnx:
        predictor = load_onnx_predictor(args.onnx)
    elif args.variant is not None:  # `--variant ""` too: an unknown variant, named
        predictor = variant_predictor(args.variant, args.seed, args.which, args.device, precision)
    else:
        predictor = load_predictor(args.checkpoint, device=args.device, precision=precision)
    files = image_files(args.paths)
    # streamed: a batch at a time is decoded and scored, so a folder of 50,000 images fits in memory
    kept, probs, skipped = predict_files(predictor, files, data.max_image_pixels, data.min_image_side,
                                         on_skip=lambda path, why: print(f"skipped {path}: {why}", file=sys.stderr))
    if not kept:
        raise UserError(f"none of the {len(files)} files could be read as an image (reasons above)")

    decisions = predictor.decisions(probs)
    classes = predictor.classes
    print(f"predict: {predictor.path} ({predictor.summary}), "
          f"{len(kept)} images in {predictor.precision}, deciding by {predictor.rule}")
    if predictor.fold_note:
        print(f"predict: {predictor.fold_note}")
    width = max(len(str(p)) for p in kept)
    print(f"{'file':<{width}}  " + "  ".join(f"p({c})" for c in classes) + "  decision")
    for path, p, decision in zip(kept, probs, decisions):
        print(f"{str(path):<{width}}  " + "  ".join(f"{v:.4f}".rjust(len(c) + 3) for v, c in zip(p, classes))
              + f"  {decision}")
    if args.out is not None:
        write_output(args.out, predictor, kept, probs, decisions, skipped)
        print(f"predict: wrote {args.out}" + (f" ({len(skipped)} files skipped)" if skipped else ""))


def run() -> None:
    """The `cxr-predict` console script: a mistake the user can fix is one line, not a traceback."""
    run_stage(main, "predict")


if __name__ == "__main__":
    run()
