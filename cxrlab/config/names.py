"""Class and folder names in `data.classes`: each becomes a folder name (data/dataset/<split>/<class>),
so it must be one plain name. A `/` or `..` would write outside the project; a control character or a
name longer than the file system allows fails later with a traceback naming no key. Also the form of
`data.group_by`, which names each image's group (patient or source) for the split."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

NAME_MAX = 255  # bytes in one file name on ext4, XFS, btrfs and APFS (UTF-16 units on NTFS)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one folder's name inside the project, or None."""
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "holds a path separator (/ or \\)"
    if name in (".", ".."):
        return f"is {name!r}, which names a folder, not a new one"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"is longer than a file name can be ({NAME_MAX} bytes)"
    return None


def classes_problem(classes: Union[dict[str, str], list[str]]) -> str | None:
    """What is wrong with `data.classes` ({class: folder spec} or [folder spec, ...]), or None.
    A folder spec may be a path suffix (`imgs/health`): each of its parts is checked."""
    if len(classes) < 2:
        return "name at least two classes, or use auto"
    if isinstance(classes, list) and len({Path(str(f).strip("/")).name for f in classes}) != len(classes):
        return "two folders of the list have the same name; use {class: folder} to name them"
    spec = classes if isinstance(classes, dict) else {str(f).strip("/"): f for f in classes}
    for name, folder in spec.items():
        if not str(folder).strip("/"):
            return f"class {name!r} has an empty folder name"
        named = [("class", name)] if isinstance(classes, dict) else []
        for kind, part in named + [("folder", part) for part in str(folder).strip("/").split("/")]:
            if why := name_problem(part):
                return f"{kind} name {part!r} {why}; use a plain folder name, e.g. TB"
    folders = [f.strip("/") for f in spec.values()]
    if len(set(folders)) != len(folders):
        return "two classes point at the same folder"
    return None


def parse_group_by(spec: str) -> tuple[str, list[str]]:
    """`data.group_by` (cxrlab.data.groups): ('regex', [pattern]) or ('csv', [file, image column,
    group column]); a ValueError naming the fix."""
    kind, _, rest = spec.partition(":")
    if kind == "regex":
        try:
            re.compile(rest)
        except re.error as e:
            raise ValueError(f"{rest!r} is not a regular expression ({e})") from None
        if not rest:
            raise ValueError("regex: needs a pattern, e.g. 'regex:^([A-Z]+)_'")
        return kind, [rest]
    if kind == "csv":
        parts = rest.split(":")
        if len(parts) != 3 or not all(parts):
            raise ValueError("csv: needs csv:<file under the download>:<image column>:<group column>")
        return kind, parts
    raise ValueError("give regex:<pattern> or csv:<file>:<image column>:<group column> (or null: no groups)")
