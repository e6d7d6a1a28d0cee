"""Never record results under params that changed while the stage ran.

Two `dvc exp run` side by side in one workspace write their `-S` values into
the same `params.yaml`: a stage of the first run would then publish outputs
computed with one set of values while DVC records another. `watch` notes, when
a stage starts, the values of exactly the params `dvc.yaml` lists for it;
`check` re-reads them and raises a `UserError` naming what changed. `run_stage`
watches every stage, and every output goes through `cxrlab.io.fsio`, which runs
`check` before it renames anything into place: a changed param stops the stage
before its next write, and nothing it computed is published.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cxrlab.errors import UserError
from cxrlab.io import fsio

DVC_FILE = "dvc.yaml"
PARAMS_FILE = "params.yaml"
ABSENT = "<absent>"

_watched: dict[str, Any] | None = None


def stage_params(stage: str, dvc_file: str | Path = DVC_FILE, argv: Sequence[str] = ()) -> list[str]:
    """The params.yaml keys `dvc.yaml` lists for `stage` (`name` or `name@key` of a foreach stage; a matrix
    stage's `${item.<axis>}` are the stage's arguments `argv`, in the order of its matrix)."""
    path = Path(dvc_file)
    if not path.is_file():
        return []
    name, _, key = stage.partition("@")
    spec = (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(name)
    if not isinstance(spec, dict):
        return []
    body = spec.get("do", spec)
    keys: list[str] = []
    for entry in body.get("params", []) or []:
        if isinstance(entry, dict):  # {other_file.yaml: [keys]}: only params.yaml is ours to watch
            keys += [str(k) for f, ks in entry.items() if f == PARAMS_FILE for k in ks or []]
        else:
            keys.append(str(entry))
    axes = dict(zip(spec.get("matrix") or {}, argv))
    for axis, value in axes.items():
        keys = [k.replace("${item.%s}" % axis, value) for k in keys]
    return [k.replace("${key}", key).replace("${item}", key) for k in keys]


def _leaves(raw: Any, keys: Sequence[str]) -> dict[str, Any]:
    """Every leaf value under each dotted key, by its dotted name (a missing key is ABSENT)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):  # an empty mapping has no leaves: {} -> {lr: 1} changes only `lr`
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    for dotted in keys:
        node: Any = raw
        for part in dotted.split("."):
            node = node.get(part, ABSENT) if isinstance(node, dict) else ABSENT
        walk(dotted, node)
    return out


def _read(params_file: Path) -> Any:
    try:
        return yaml.safe_load(params_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def watch(stage: str, argv: Sequence[str] = (), dvc_file: str | Path = DVC_FILE,
          params_file: str | Path = PARAMS_FILE) -> None:
    """Note the params `stage` depends on (a foreach stage's key is its first argument)."""
    global _watched
    kind = _generated(stage, dvc_file) if "@" not in stage else None
    if argv and kind == "foreach":
        stage = f"{stage}@{argv[0]}"
    elif argv and kind == "matrix":
        stage = f"{stage}@{'-'.join(argv)}"
    keys = stage_params(stage, dvc_file, argv if kind == "matrix" else ())
    if not keys:
        _watched = None
        return
    _watched = {"stage": stage, "keys": keys, "file": Path(params_file).resolve(),
                "values": _leaves(_read(Path(params_file)), keys)}


def _generated(stage: str, dvc_file: str | Path) -> str | None:
    """'foreach' or 'matrix' for a stage that generates several, else None."""
    path = Path(dvc_file)
    if not path.is_file():
        return None
    spec = (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(stage)
    if not isinstance(spec, dict):
        return None
    return next((kind for kind in ("foreach", "matrix") if kind in spec), None)


def unwatch() -> None:
    global _watched
    _watched = None


def check() -> None:
    """Raise a `UserError` if a param the watched stage depends on changed since `watch`."""
    if _watched is None:
        return
    now = _leaves(_read(_watched["file"]), _watched["keys"])
    before = _watched["values"]
    changed = sorted(k for k in set(now) | set(before) if now.get(k, ABSENT) != before.get(k, ABSENT))
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise UserError(f"{PARAMS_FILE} changed while {_watched['stage']} ran ({shown}); its results were not "
                        "recorded. Run experiments side by side with `dvc exp run --queue` and "
                        "`dvc queue start -j N`, each in its own copy of the workspace")


fsio.before_publish(check)
