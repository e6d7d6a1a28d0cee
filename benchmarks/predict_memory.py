"""Peak memory of the prediction command as the number of images grows: flat when it streams.

    python -m benchmarks.predict_memory                          # 1,000 and 10,000 images, 224 px
    python -m benchmarks.predict_memory --images 100 1000 --image-size 64

For each count, a folder of that many PNGs (a few distinct 512 px X-ray-like images, hard-linked
under new names, so building it is quick) is scored by `python -m cxrlab.cli.predict --checkpoint`
with an untrained checkpoint of `--arch` (the weights do not change the memory) in a child process
whose own peak resident set (`ru_maxrss` from `os.wait4`, as benchmarks/memory.py does) is reported.
Decoding and scoring a batch at a time, the peak does not grow with the count; holding every decoded
image, it grew by 3 x size^2 bytes per image (150 KB at 224 px: 1.5 GB for 10,000).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTINCT = 8
LAUNCHER = ("import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "_, status, usage = os.wait4(p.pid, 0); "
            "print(json.dumps({'maxrss_kib': usage.ru_maxrss, 'returncode': os.waitstatus_to_exitcode(status)}))")


def make_folder(folder: Path, n: int, sources: list[Path]) -> None:
    """`n` image files named x00000.png ..., hard links to `sources` in turn (copies where links fail)."""
    folder.mkdir(parents=True)
    for i in range(n):
        target = folder / f"x{i:05d}.png"
        try:
            os.link(sources[i % len(sources)], target)
        except OSError:
            shutil.copyfile(sources[i % len(sources)], target)


def make_checkpoint(path: Path, arch: str, image_size: int) -> None:
    from cxrlab.model.backbones import build_model, checkpoint_meta, save_checkpoint

    model = build_model(arch, 2, 0.0, False, image_size=image_size)
    meta = checkpoint_meta(arch, 0.0, ["Healthy", "TB"], image_size, [0.5] * 3, [0.25] * 3)
    save_checkpoint(path, model, meta)


def measure(work: Path, folder: Path, threads: int, code: Path = ROOT) -> dict:
    """Peak RSS (MiB) and seconds of the prediction command on `folder`, run in `work` (its params.yaml)
    with the `cxrlab` of checkout `code`."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "cxrlab.cli.predict",
               "--checkpoint", "model.pt", "--device", "cpu", str(folder)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    if result.returncode or out.get("returncode"):
        raise RuntimeError(f"the prediction command failed:\n{result.stderr[-4000:]}")
    return {"peak_rss_mib": round(out["maxrss_kib"] / 1024, 1), "seconds": round(seconds, 1)}


def run_benchmark(counts: list[int], image_size: int, arch: str, threads: int, code: Path = ROOT) -> dict:
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="predict-memory-") as tmp:
        work = Path(tmp)
        shutil.copyfile(ROOT / "params.yaml", work / "params.yaml")
        make_checkpoint(work / "model.pt", arch, image_size)
        rng = np.random.default_rng(0)
        sources = []
        for i in range(DISTINCT):
            sources.append(work / f"source{i}.png")
            Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8), mode="L").save(sources[-1])
        results = {}
        for n in counts:
            make_folder(work / f"n{n}", n, sources)
            results[n] = measure(work, work / f"n{n}", threads, code)
            print(f"predict_memory: {n} images at {image_size} px ({arch}): peak RSS "
                  f"{results[n]['peak_rss_mib']:.0f} MiB, {results[n]['seconds']:.0f} s", flush=True)
            shutil.rmtree(work / f"n{n}")
    low, high = results[min(counts)], results[max(counts)]
    growth = (high["peak_rss_mib"] - low["peak_rss_mib"]) / max(1, max(counts) - min(counts)) * 1024
    return {"image_size": image_size, "arch": arch, "threads": threads, "code": str(code), "counts": results,
            "growth_kib_per_image": round(growth, 2), "held_image_kib": round(3 * image_size ** 2 / 1024, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000], help="image counts to compare")
    parser.add_argument("--image-size", type=int, default=224, help="the checkpoint's image size")
    parser.add_argument("--arch", default="shufflenet_v2_x0_5", help="a small backbone: the decode dominates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="the checkout whose cxrlab predicts (default this one; another to compare versions)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    results = run_benchmark(sorted(set(args.images)), args.image_size, args.arch, args.threads, args.code.resolve())
    print(f"predict_memory: {results['growth_kib_per_image']} KiB more peak memory per extra image "
          f"(holding every decoded image would add {results['held_image_kib']} KiB each)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
