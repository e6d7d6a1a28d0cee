"""Stage `preprocess`: decode and resize every image once, at `data.image_size`.

Reads the dataset folders and writes, per split, `data/prepared/<split>.npy`
(uint8, N x C x size x size) and `<split>.csv` (the split's rows in the same
order), plus `meta.json` (image size, channels, class names). Training and
evaluation read these small arrays instead of decoding full-size PNGs every
epoch.

C is 1 when every image of both splits is grayscale (R = G = B, as in chest
X-rays), else 3. One channel is a third of the memory, of the copies to the
GPU and of the augmentation work; `datasets.to_model_input` repeats it into
the three channels the models take, so the model sees the same input.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxrlab import paths
from cxrlab.config.schema import DataParams
from cxrlab.data.images import load_rgb
from cxrlab.errors import UserError
from cxrlab.io.fsio import atomic_dir, check_writable, write_json
from cxrlab.io.records import read_rows, write_rows


def _decode(path: str, size: int, max_pixels: int, min_side: int) -> np.ndarray | str:
    try:
        return load_rgb(path, size, max_pixels, min_side)
    except (OSError, ValueError) as err:  # unreadable, truncated, not an image, outside the size limits
        return f"{path}: {err}"


def decode_all(files: list[Path], size: int, out: np.ndarray, workers: int, desc: str,
               max_pixels: int, min_side: int) -> None:
    """Decode `files` into `out[i]` in parallel; every unreadable file is reported."""
    bad = []
    decode = partial(_decode, size=size, max_pixels=max_pixels, min_side=min_side)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(decode, map(str, files), chunksize=16)
        for i, result in enumerate(tqdm(results, total=len(files), desc=desc, unit="img", mininterval=2)):
            if isinstance(result, str):
                bad.append(result)
            else:
                out[i] = result
    if bad:
        raise UserError(f"{len(bad)} images could not be read:\n  " + "\n  ".join(bad[:20])
                        + "\nReplace or remove them and run the pipeline again")


def is_grayscale(array: np.ndarray, chunk: int = 256) -> bool:
    """True when R = G = B in every image of `array` (N x 3 x H x W), read in chunks."""
    for start in range(0, len(array), chunk):
        part = array[start:start + chunk]
        if not ((part[:, 0] == part[:, 1]).all() and (part[:, 1] == part[:, 2]).all()):
            return False
    return True


def preprocess(data: DataParams) -> None:
    size = data.image_size
    check_writable(paths.PREPARED)
    splits = {"train": read_rows(paths.TRAIN_CSV), "test": read_rows(paths.TEST_CSV)}
    classes = {int(r["label"]): r["class"] for rows in splits.values() for r in rows}
    workers = max(1, min(os.cpu_count() or 1, 16))
    with atomic_dir(paths.PREPARED) as tmp:
        gray = True
        for split, rows in splits.items():
            files = [paths.DATASET / split / r["class"] / r["filename"] for r in rows]
            array = np.lib.format.open_memmap(tmp / f"{split}.rgb.npy", mode="w+", dtype=np.uint8,
                                              shape=(len(rows), 3, size, size))
            decode_all(files, size, array, workers, f"preprocess {split}", data.max_image_pixels,
                       data.min_image_side)
            array.flush()
            gray = gray and is_grayscale(array)
            del array
            write_rows(tmp / f"{split}.csv", rows)
        for split in splits:
            rgb = tmp / f"{split}.rgb.npy"
            if gray:
                np.save(tmp / f"{split}.npy", np.load(rgb, mmap_mode="r")[:, :1])
                rgb.unlink()
            else:
                rgb.rename(tmp / f"{split}.npy")
        channels = 1 if gray else 3
        write_json(tmp / "meta.json", {"image_size": size, "channels": channels,
                                       "classes": [classes[i] for i in sorted(classes)]})
    print(f"preprocess: {sum(map(len, splits.values()))} images at {size}x{size} px, "
          f"{'grayscale (1 channel)' if gray else 'colour (3 channels)'}, in {paths.PREPARED}")

