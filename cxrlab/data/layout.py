"""Finding each class's folder under the download and listing its images.

`data.classes` names the folders three ways. `{class: folder}`: a class
folder is found by name anywhere under the downloaded root
(`{Healthy: health}` finds `TBX11K/imgs/health`), or by a longer path suffix
when the name alone is ambiguous (`imgs/health`). `[folder, ...]`: the same,
and the class is called after its folder. `auto`: every folder that directly
holds images is a class, called after the folder, in natural order (so any
folder-per-class dataset works without naming its classes). Only files
directly inside the folder count; non-image files are skipped and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cxrlab.config.names import name_problem
from cxrlab.data.images import is_image_file, natural_key
from cxrlab.errors import UserError

_SKIP_DIRS = {"__MACOSX", ".git", ".dvc"}


@dataclass
class ClassFolder:
    name: str
    label: int
    folder: Path
    images: list[str]  # file names, sorted by ID
    ignored: list[str] = field(default_factory=list)  # non-image files


def find_class_folders(root: Path, classes: dict[str, str] | str) -> dict[str, Path]:
    """Map each class name to the one folder under `root` that matches its spec
    (`classes` is {class: folder spec}, or 'auto')."""
    if classes == "auto":
        return find_all_class_folders(root)
    folders = [Path(d).relative_to(root) for d, dirs, _ in _walk(root)]
    found: dict[str, Path] = {}
    for name, spec in classes.items():
        want = Path(spec.strip("/")).parts
        hits = [f for f in folders if f.parts[-len(want):] == want]
        if not hits:
            raise UserError(
                f"class {name!r}: no folder named {spec!r} under {root}. "
                f"Folders there: {_preview(folders)}. "
                f"Set data.classes.{name} to the folder holding its images (or data.classes: auto)"
            )
        if len(hits) > 1:
            raise UserError(
                f"class {name!r}: folder {spec!r} found {len(hits)} times under {root}: "
                f"{', '.join(str(h) for h in hits[:5])}. Set data.classes.{name} to a "
                f"longer path that names one of them, such as {str(hits[0])!r}"
            )
        found[name] = root / hits[0]
    return found


def find_all_class_folders(root: Path) -> dict[str, Path]:
    """`data.classes: auto`: every folder directly holding images, named after it, in natural order."""
    holding = [Path(d).relative_to(root) for d, _, files in _walk(root)
               if any(is_image_file(Path(d) / f) for f in files)]
    by_name: dict[str, list[Path]] = {}
    for folder in holding:
        by_name.setdefault(folder.name or root.name, []).append(folder)
    for name, hits in by_name.items():
        if len(hits) > 1:
            raise UserError(
                f"data.classes: auto finds {len(hits)} folders named {name!r} under {root}: "
                f"{', '.join(str(h) for h in hits[:5])}. Name the class folders in data.classes, e.g. "
                f"-S 'data.classes=[{hits[0]!s}, ...]'"
            )
    if len(by_name) < 2:
        raise UserError(
            f"data.classes: auto finds {len(by_name)} folder(s) holding images under {root} "
            f"({_preview(holding)}); a classifier needs at least two class folders. "
            "Point data.source at a folder with one subfolder per class"
        )
    for name, hits in by_name.items():
        if why := name_problem(name):
            raise UserError(f"data.classes: auto: the class folder {str(root / hits[0])!r} cannot be a class: its "
                            f"name {why}; rename the folder, or name the classes in data.classes")
    names = sorted(by_name, key=lambda n: (natural_key(n), n))
    return {name: root / by_name[name][0] for name in names}


def list_class(name: str, label: int, folder: Path) -> ClassFolder:
    """The images directly in `folder`, sorted by ID; duplicates and emptiness are errors."""
    images, ignored = [], []
    for entry in os.scandir(folder):
        if entry.is_file():
            (images if is_image_file(entry.path) else ignored).append(entry.name)
    if not images:
        raise UserError(f"class {name!r}: no images in {folder} "
                        f"(looked for {', '.join(sorted({'.png', '.jpg', '.jpeg', '.dcm'}))} and other image files)")
    images.sort(key=lambda n: (natural_key(n), n))
    for prev, cur in zip(images, images[1:]):
        if natural_key(prev) == natural_key(cur):
            raise UserError(f"class {name!r}: {prev!r} and {cur!r} in {folder} carry the same ID; "
                            "remove one of them")
    return ClassFolder(name, label, folder, images, sorted(ignored))


def _walk(root: Path):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        yield d, dirs, files


def _preview(folders: list[Path], n: int = 8) -> str:
    shown = [str(f) for f in folders if str(f) != "."][:n]
    if not shown:
        return "(none)"
    more = len(folders) - 1 - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
