"""DVC's contract, code side: every stage lists, as deps, exactly the project modules it runs.

A stage's command module imports project modules directly or through others,
at module level or inside functions; each one can change what the stage
computes, so each must be a dep, or editing it would leave results silently
stale. `EXEMPT` is the one list of modules that cannot change a result.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from tests.conftest import ROOT

# Modules that cannot change a stage's numbers: error texts and the stage runner
# (errors), the wording of params errors (config/errors), output path names
# (paths: a renamed output fails DVC's own output check instead), atomic-write
# helpers (fsio). Empty package markers count as none. The params guard
# (config/guard) is listed like the rest of config/: every stage already depends
# on config/load and config/schema, so listing it reruns nothing more often.
EXEMPT = {"cxrlab/errors.py", "cxrlab/config/errors.py", "cxrlab/paths.py", "cxrlab/io/fsio.py"}


def module_file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(module: str) -> set[str]:
    """Project files (relative paths) that `python -m module` imports, directly or through others,
    with every package `__init__.py` on the way."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            f = module_file(".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            package = ".".join(parts[:i]) if f.name == "__init__.py" else ".".join(parts[:i - 1])
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join(anchor + ([base] if base else []))
                    todo += [base] + [f"{base}.{a.name}" for a in node.names]
    return {f.relative_to(ROOT).as_posix() for f in seen}


def needed(files: set[str]) -> set[str]:
    return {f for f in files
            if f not in EXEMPT and not (f.endswith("__init__.py") and not (ROOT / f).read_text().strip())}


def stage_code_deps() -> dict[str, tuple[set[str], set[str]]]:
    """stage name -> (code files its command imports, code files its deps list)."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in pipeline.items():
        body = stage.get("do", stage)
        module = re.search(r"python -m ([\w.]+)", body["cmd"]).group(1)
        listed = {str(d) for d in body.get("deps", []) if str(d).endswith(".py")}
        out[name] = (needed(import_closure(module)), listed)
    return out


def test_every_stage_lists_exactly_the_code_it_imports():
    problems = []
    for name, (imports, listed) in stage_code_deps().items():
        if imports - listed:
            problems.append(f"{name}: missing {' '.join(sorted(imports - listed))}")
        if listed - imports:
            problems.append(f"{name}: lists {' '.join(sorted(listed - imports))}, which it does not import")
    assert not problems, "dvc.yaml code deps are off:\n" + "\n".join(problems)


def test_exempt_modules_hold_no_computation():
    """The exemption is only safe while these modules import nothing that computes. The one module
    beyond EXEMPT they reach is the params guard (the stage runner watches params), a dep of every stage."""
    for f in EXEMPT:
        assert needed(import_closure(f[:-3].replace("/", "."))) <= {"cxrlab/config/guard.py"}, f


def test_the_closure_follows_imports_inside_functions(tmp_path):
    # cxrlab.data.fetch imports kagglehub inside a function; project imports inside functions count too
    closure = import_closure("stages.explain")
    assert "cxrlab/explain/cam.py" in closure and "cxrlab/serving/predict.py" in closure
