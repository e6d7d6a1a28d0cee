"""An external test set (`external.<name>`): fetched and preprocessed once, never split.

The images come through the same code as the training data: `fetch` (local
folder or archive, http(s) archive checked against its sha256, Kaggle, demo;
the same archive and link safety checks), the same decoding and size limits
(`data.max_image_pixels`, `data.min_image_side`, `data.on_bad_image`) and the
same resizing to `data.image_size` (`cxrlab.data.preprocess.decode_all`).
The class folders are mapped onto the training classes: `auto` finds, for
each training class, the one folder holding images whose name is the class
name or its training folder name, case-insensitively; `{class: folder}`
names them. A training class with no folder is an error; a folder of no
training class is left out and said so.

Writes `data/external/<name>/`: `images.npy` (uint8, N x C x size x size),
`images.csv` (the rows, in the same order, subset `external`) and
`meta.json` (source, checksum, classes, counts per class, whether it is
synthetic, skipped images). The downloaded files are not kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.data.fetch import fetch, source_kind
from cxrlab.data.images import check_images, is_image_file
from cxrlab.data.layout import _walk, find_class_folders, list_class
from cxrlab.data.preprocess import decode_all, is_grayscale
from cxrlab.errors import UserError
from cxrlab.io.fsio import atomic_dir, check_writable, remove, write_json
from cxrlab.io.records import split_classes, write_rows

META = "meta.json"


def _renamed(err: UserError, name: str) -> UserError:
    """A fetch or layout message about data.* reworded for external.<name>.*."""
    text = str(err)
    for key in ("source", "sha256", "classes"):
        text = text.replace(f"data.{key}", f"external.{name}.{key}")
    return UserError(f"external.{name}: {text}")


def training_folder_names(params: Params, classes: list[str]) -> dict[str, set[str]]:
    """Each training class's names for `auto`, lower-cased: the class name and its folder's name in data.classes."""
    spec = params.data.class_spec
    names = {c: {c.lower()} for c in classes}
    if isinstance(spec, dict):
        for c, folder in spec.items():
            if c in names:
                names[c].add(Path(folder.strip("/")).name.lower())
    return names


def map_classes(root: Path, name: str, spec, classes: list[str], params: Params) -> dict[str, Path]:
    """{training class: its folder under `root`}; every training class must have one."""
    if spec != "auto":
        if set(spec) != set(classes):
            raise UserError(f"external.{name}.classes names {sorted(spec)} but the model's classes are {classes}; "
                            f"give the folder of each: -S 'external.{name}.classes={{"
                            + ", ".join(f"{c}: <folder>" for c in classes) + "}'")
        try:
            return find_class_folders(root, {c: spec[c] for c in classes})
        except UserError as err:
            raise _renamed(err, name) from None
    holding = [Path(d) for d, _, files in _walk(root) if any(is_image_file(Path(d) / f) for f in files)]
    wanted = training_folder_names(params, classes)
    found: dict[str, Path] = {}
    for c in classes:
        hits = [f for f in holding if f.name.lower() in wanted[c]]
        looked = " or ".join(sorted(wanted[c]))
        if not hits:
            shown = ", ".join(sorted({f.relative_to(root).as_posix() for f in holding})[:8]) or "(none)"
            raise UserError(f"external.{name}: no folder for class {c!r} (looked for {looked}, any case) under "
                            f"the source; folders holding images there: {shown}. Name it: "
                            f"-S 'external.{name}.classes={{{', '.join(f'{k}: <folder>' for k in classes)}}}'")
        if len(hits) > 1:
            raise UserError(f"external.{name}: class {c!r} matches {len(hits)} folders ("
                            + ", ".join(h.relative_to(root).as_posix() for h in hits[:5])
                            + f"); name one in external.{name}.classes")
        found[c] = hits[0]
    for folder in holding:
        if folder not in found.values():
            print(f"external_data {name}: folder {folder.relative_to(root).as_posix()} is not a training class "
                  f"({', '.join(classes)}); left out")
    return found


def prepare_external(name: str, params: Params) -> None:
    """Fetch, map and preprocess external set `name` into data/external/<name>/."""
    spec, data = params.external.get(name), params.data
    if spec is None:
        raise UserError(f"unknown external set {name!r}; params.yaml defines external: "
                        f"{', '.join(params.external) or 'none'}")
    if spec.source == data.source:
        raise UserError(f"external.{name}.source is data.source ({spec.source}): the training images themselves. "
                        "An external set must come from elsewhere (another hospital, another dataset)")
    classes = split_classes(paths.TRAIN_CSV)
    out = paths.external_data(name)
    check_writable(out, paths.DOWNLOADS)
    size = data.image_size
    with atomic_dir(out) as tmp:
        raw = tmp / "raw"
        raw.mkdir()
        try:
            summary = fetch(spec.source, raw, spec.sha256, paths.DOWNLOADS, int(data.max_unpacked_gb * 1e9))
        except UserError as err:
            raise _renamed(err, name) from None
        print(f"external_data {name}: {summary}")
        folders = map_classes(raw, name, spec.classes, classes, params)
        listed = []
        for label, c in enumerate(classes):
            try:
                listed.append(list_class(c, label, folders[c]))
            except UserError as err:
                raise _renamed(err, name) from None
        workers = max(1, min(os.cpu_count() or 1, 16))
        skipped: dict[str, str] = {}
        if data.on_bad_image == "skip":
            files = [cls.folder / f for cls in listed for f in cls.images]
            for path, why in check_images(files, workers, data.max_image_pixels, data.min_image_side).items():
                skipped[path.relative_to(raw).as_posix()] = why
                print(f"external_data {name}: skipped unreadable image {path.relative_to(raw).as_posix()}: {why}")
        rows = [{"filename": f, "label": cls.label, "class": cls.name, "subset": "external",
                 "path": (cls.folder / f).relative_to(raw).as_posix()}
                for cls in listed for f in cls.images if (cls.folder / f).relative_to(raw).as_posix() not in skipped]
        counts = {c: sum(r["class"] == c for r in rows) for c in classes}
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise UserError(f"external.{name}: no readable images of {', '.join(empty)}; an external set needs "
                            "every class")
        array = np.lib.format.open_memmap(tmp / "images.rgb.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(rows), 3, size, size))
        decode_all([raw / r["path"] for r in rows], size, array, workers, f"external_data {name}",
                   data.max_image_pixels, data.min_image_side)
        array.flush()
        gray = is_grayscale(array)
        del array
        if gray:
            np.save(tmp / "images.npy", np.load(tmp / "images.rgb.npy", mmap_mode="r")[:, :1])
            (tmp / "images.rgb.npy").unlink()
        else:
            (tmp / "images.rgb.npy").rename(tmp / "images.npy")
        write_rows(tmp / "images.csv", rows)
        remove(raw)  # only the preprocessed images are kept
        kind = source_kind(spec.source)
        write_json(tmp / META, {
            "name": name, "source": spec.source, "source_kind": kind, "sha256": spec.sha256,
            "synthetic": kind == "demo", "image_size": size, "channels": 1 if gray else 3, "classes": classes,
            "folders": {c: folders[c].relative_to(raw).as_posix() for c in classes}, "counts": counts,
            "n": len(rows), "skipped": skipped})
    print(f"external_data {name}: {len(rows)} images ("
          + ", ".join(f"{c} {n}" for c, n in counts.items()) + f") at {size}x{size} px in {out}")
