"""Named study configurations (`studies/*.yaml`) and applying one to params.yaml text.

`cxrlab.cli.study` is the command; this module reads and merges, keeping comments (ruamel.yaml).
"""

from __future__ import annotations

import io
from pathlib import Path

import yaml
from ruamel.yaml import YAML

from cxrlab.errors import UserError

STUDIES = Path("studies")
REPLACED = ("experiments", "ensembles")


def available() -> list[str]:
    return sorted(p.stem for p in STUDIES.glob("*.yaml"))


def read_study(name: str) -> dict:
    path = STUDIES / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no study {name!r} in {STUDIES}/; choose one of {', '.join(available()) or 'none'}")
    overlay = yaml.safe_load(path.read_text()) or {}
    if not isinstance(overlay, dict) or not all(isinstance(v, dict) for v in overlay.values()):
        raise UserError(f"{path} must map params.yaml sections to their keys")
    return overlay


def apply(overlay: dict, params_text: str) -> str:
    """params.yaml's text with the study applied (comments kept where the keys are kept)."""
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params_text)
    for section, values in overlay.items():
        if section in REPLACED or section not in doc:
            doc[section] = values
            continue
        for key, value in values.items():
            doc[section][key] = value
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


def description(name: str) -> str:
    """The study's whole description: its leading comment lines, joined into one paragraph."""
    lines = []
    for line in (STUDIES / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(filter(None, lines))
