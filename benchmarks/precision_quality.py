"""Does bf16 training change what the study measures? fp32 and bf16 trainings of the same seeds,
compared by the project's own compare stage.

    nice python -m benchmarks.precision_quality --source ../shared/data/tb-cxr-mini
    python -m benchmarks.precision_quality --source DIR --image-size 128 --epochs 6 --seeds 1 2 3 --keep out/

A temporary copy of the project (`--source`: a folder of class folders, e.g.
tb-cxr-mini) with two variants that differ only in `train.amp`: `fp32`
(false) and `bf16` (true: bf16 autocast where the CPU or GPU computes it
natively; the train stage's header says which ran, and the command stops if
`bf16` ran in fp32). Both train the same seeds on the same split, evaluate
(fp32, as always), and `stages.compare` compares `bf16` with the reference
`fp32`: seed by seed (a paired stratified bootstrap on the same test
images), and seed-averaged (`bf16_seeds`, an ensemble of bf16's seeds, paired
with fp32's seed-averaged probabilities). Each stage runs as DVC runs it,
`python -m stages.<name>` in the project folder. Prints the ROC AUC
differences with their intervals and the comparison table; `--keep DIR`
keeps the project there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from benchmarks.fixtures import copy_project, run, set_params
from benchmarks.timing import Progress, load_average


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="a folder with one folder of images per class")
    parser.add_argument("--arch", default="resnet18", help="torchvision architecture (resnet18)")
    parser.add_argument("--image-size", type=int, default=128, help="training resolution (128)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (6)")
    parser.add_argument("--batch-size", type=int, default=8, help="train.batch_size (8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="train.seeds (1 2 3)")
    parser.add_argument("--resamples", type=int, default=1000, help="stats.resamples of the bootstrap (1000)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the project in this (new) folder")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        parser.error(f"--source {args.source} is not a folder")
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep} exists; name a new folder")
    return args


def make_project(project: Path, args) -> list[str]:
    """The project copy with the fp32 and bf16 variants and the seed ensemble; returns the classes."""
    copy_project(project)
    classes = sorted(p.name for p in args.source.iterdir() if p.is_dir())
    set_params(project / "params.yaml", {
        "data.source": str(args.source.resolve()), "data.image_size": args.image_size,
        "data.classes": {c: c for c in classes}, "train.arch": args.arch, "train.epochs": args.epochs,
        "train.batch_size": args.batch_size, "train.seeds": args.seeds, "stats.resamples": args.resamples,
        "compare.reference": "fp32"})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["experiments"] = {"fp32": {"amp": False}, "bf16": {"amp": True}}
    params["ensembles"] = {"bf16_seeds": {"members": ["bf16"], "voting": "soft"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return classes


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    log = Progress()
    log(f"load average at start {load_average()}")
    tmp = Path(tempfile.mkdtemp(prefix="tbcxr-precision-"))
    project = tmp / "project"
    try:
        make_project(project, args)
        for module in ("download", "split", "prepare", "preprocess"):
            run([sys.executable, "-m", f"stages.{module}"], cwd=project)
        log("data prepared")
        for variant in ("fp32", "bf16"):
            out = run([sys.executable, "-m", "stages.train", variant], cwd=project).stdout
            header = next(line for line in out.splitlines() if " parameters, on " in line)
            log(f"trained {variant}: {header.split(' on ', 1)[1].split(';')[0]}")
            if variant == "bf16" and "bf16" not in header:
                raise SystemExit("this CPU has no native bf16, so train.amp: true trained in fp32: nothing to compare")
            run([sys.executable, "-m", "stages.evaluate", variant], cwd=project)
        run([sys.executable, "-m", "stages.ensemble", "bf16_seeds"], cwd=project)
        run([sys.executable, "-m", "stages.compare"], cwd=project)
        report = json.loads((project / "metrics/comparison_report.json").read_text())
        result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "roc_auc_difference": {}}
        for model, pairs in report["pairs"].items():
            for pair, r in pairs.items():
                auc = r["roc_auc"]
                result["roc_auc_difference"][f"{model} {pair}"] = auc
                print(f"{model} {pair}: ROC AUC difference (bf16 - fp32) {auc['difference']:+.4f}, "
                      f"{report['ci_level']:.0%} interval [{auc['low']:+.4f}, {auc['high']:+.4f}], "
                      f"Holm p {auc['p_holm']:.3g}")
        print((project / "metrics/comparison.md").read_text())
        log(f"done; load average at end {load_average()}")
        if args.keep:
            shutil.copytree(project, args.keep, symlinks=True)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
