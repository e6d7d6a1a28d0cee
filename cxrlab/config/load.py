"""Reading `params.yaml`: validate the whole file (every variant included) before a stage does any work.

`load_params()` raises one `UserError` naming each wrong key. A variant's
settings are `train` with `experiments.<variant>` merged over it (dicts merge
key by key; `null` removes an augmentation).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from cxrlab.config.errors import describe, did_you_mean
from cxrlab.config.schema import EnsembleParams, TrainParams, _ParamsFile
from cxrlab.errors import UserError

PARAMS_FILE = "params.yaml"


class Params:
    """Validated params: one section object per section of params.yaml, and one `TrainParams` per variant."""

    def __init__(self, raw: Mapping[str, Any], parsed: _ParamsFile, variants: dict[str, TrainParams]):
        self.raw = raw
        self.data = parsed.data
        self.runtime = parsed.runtime
        self.evaluate = parsed.evaluate
        self.stats = parsed.stats
        self.compare = parsed.compare
        self.ensembles = parsed.ensembles
        self.explain = parsed.explain
        self.external = parsed.external
        self.export = parsed.export
        self.variants = variants
        self.train = _validate_train(dict(parsed.train), "train")

    def variant(self, name: str) -> TrainParams:
        """The settings of one variant; an unknown name is a `UserError`."""
        return _lookup("variant", "experiments", name, self.variants)

    def ensemble(self, name: str) -> EnsembleParams:
        """The settings of one ensemble; an unknown name is a `UserError`."""
        return _lookup("ensemble", "ensembles", name, self.ensembles)


def _lookup(kind: str, section: str, name: str, table: Mapping[str, Any]):
    if name not in table:
        raise UserError(f"unknown {kind} {name!r}{did_you_mean(name, table)}; "
                        f"params.yaml defines {section}: {', '.join(table) or 'none'}")
    return table[name]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged over it, key by key for nested dicts."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read and validate `params.yaml`; every problem is reported in one `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; run the stage from the repository root")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections (data, train, experiments, evaluate)")
    try:
        parsed = _ParamsFile.model_validate(raw)
    except ValidationError as err:
        raise UserError(describe(err, path, _ParamsFile)) from None

    problems: list[str] = []
    variants: dict[str, TrainParams] = {}
    try:
        _validate_train(dict(parsed.train), "train")
    except UserError as err:
        problems.append(str(err))
    for name, override in parsed.experiments.items():
        override = override or {}
        if not isinstance(override, dict):
            problems.append(f"{path}: experiments.{name} must be a mapping of train keys to values")
            continue
        try:
            variants[name] = _validate_train(deep_merge(parsed.train, override), "train",
                                             override=override, variant=name)
        except UserError as err:
            problems.append(str(err))
    problems += _ensemble_problems(parsed, path)
    names = parsed.data.class_names  # None with classes: auto; the train stage checks against the split's
    for name, cfg in variants.items():
        if names and isinstance(cfg.class_weights, dict) and set(cfg.class_weights) != set(names):
            problems.append(f"{path}: class_weights of variant {name} must give a weight to each of the classes "
                            f"{names} (got {list(cfg.class_weights)})")
    if problems:
        raise UserError("\n".join(dict.fromkeys(problems)))
    return Params(raw, parsed, variants)


def _ensemble_problems(parsed: _ParamsFile, path: Path) -> list[str]:
    """An ensemble's members must be variants, and its name must not be one: both write metrics/evaluate/<name>/."""
    problems = []
    for name, ensemble in parsed.ensembles.items():
        if name in parsed.experiments:
            problems.append(f"{path}: ensembles.{name}: {name!r} is also an experiment and both would write "
                            f"metrics/evaluate/{name}/; rename the ensemble")
        for member in ensemble.members:
            if member not in parsed.experiments:
                problems.append(f"{path}: ensembles.{name}.members: unknown variant {member!r}"
                                f"{did_you_mean(member, parsed.experiments)}; params.yaml defines experiments: "
                                f"{', '.join(parsed.experiments)}")
    return problems


def _validate_train(values: dict[str, Any], section: str, override: Mapping[str, Any] | None = None,
                    variant: str | None = None) -> TrainParams:
    try:
        return TrainParams.model_validate(values)
    except ValidationError as err:
        def where(loc: tuple) -> str:
            if override is not None and loc and loc[0] in override:
                return f"experiments.{variant}"
            return section
        raise UserError(describe(err, Path(PARAMS_FILE), TrainParams, where)) from None
