"""pyproject.toml: its console scripts reach the commands through `run_stage` (a mistake is one line,
not a traceback), and requirements.txt pins what pyproject asks for."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def name(requirement: str) -> str:
    """The normalised distribution name of a requirement line ("ruamel.yaml>=0.18" -> "ruamel-yaml")."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_targets_a_function_that_runs_through_run_stage(script):
    module, function = SCRIPTS[script].split(":")
    target = getattr(importlib.import_module(module), function)
    assert callable(target)
    assert "run_stage(main," in (ROOT / (module.replace(".", "/") + ".py")).read_text()


def test_a_console_script_turns_a_mistake_into_one_line(tmp_path):
    # what the installed `cxr-predict` runs: `from cxrlab.cli.predict import run; run()`
    module, function = SCRIPTS["cxr-predict"].split(":")
    code = f"import sys; sys.argv[0] = 'cxr-predict'; from {module} import {function}; {function}()"
    result = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(tmp_path / "none.pt"), "x.png"],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line] == [
        f"error: predict: checkpoint {tmp_path / 'none.pt'} does not exist; train it first (dvc repro)"]


def test_requirements_pin_every_dependency_and_extra_exactly():
    pinned = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s;]+", line), f"not an exact pin: {line!r}"
            pinned[name(line)] = line
    project = PYPROJECT["project"]
    wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    missing = sorted(name(r) for r in wanted if name(r) not in pinned)
    assert not missing, f"requirements.txt does not pin {missing}"
    # torch's CUDA libraries are torch's to pin: listed here, they would land on CPU-only machines too
    assert not [p for p in pinned if p.startswith(("nvidia-cu", "triton", "cuda-"))]
