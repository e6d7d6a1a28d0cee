"""The one params schema every stage validates `params.yaml` against.

`params.yaml` is the single source of every value: the schema below gives
types and ranges but no defaults, so a value is never silently taken from
code. `load_params()` validates the whole file (every variant included) and
raises one `UserError` naming each wrong key, before a stage does any work.

A variant's settings are `train` with `experiments.<variant>` merged over it
(dicts merge key by key; `null` removes an augmentation).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stages.errors import UserError

PARAMS_FILE = "params.yaml"

# torchvision classification backbones the model builder knows how to re-head.
ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "densenet121",
    "efficientnet_b0",
    "vit_b_16",
)

# torchvision.transforms.v2 classes usable as training augmentations: they
# work on uint8 image tensors and keep the image size.
AUGMENTATIONS = (
    "AugMix",
    "AutoAugment",
    "ColorJitter",
    "ElasticTransform",
    "GaussianBlur",
    "RandAugment",
    "RandomAdjustSharpness",
    "RandomAffine",
    "RandomAutocontrast",
    "RandomEqualize",
    "RandomErasing",
    "RandomGrayscale",
    "RandomHorizontalFlip",
    "RandomInvert",
    "RandomPerspective",
    "RandomPhotometricDistort",
    "RandomPosterize",
    "RandomRotation",
    "RandomSolarize",
    "RandomVerticalFlip",
    "TrivialAugmentWide",
)

# Names people type for our keys; used for "did you mean" only.
_SYNONYMS = {
    "learning_rate": "lr",
    "wd": "weight_decay",
    "bs": "batch_size",
    "batchsize": "batch_size",
    "n_epochs": "epochs",
    "num_epochs": "epochs",
    "model": "arch",
    "architecture": "arch",
    "backbone": "arch",
    "augmentation": "augment",
    "augmentations": "augment",
    "l2": "l2_penalty",
    "l2_lambda": "l2_penalty",
    "drop_rate": "dropout",
    "lr_scheduler": "scheduler",
    "schedule": "scheduler",
    "early_stopping": "patience",
    "freeze_backbone": "freeze",
    "hidden": "head_hidden",
    "weights": "class_weights",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _count_or_auto(value: Union[int, str], info: ValidationInfo) -> Union[int, str]:
    """A field validator: an int at least the field's minimum, or 'auto'."""
    least = {"num_workers": 0, "processes": 1, "batch_size": 1}[info.field_name]
    if isinstance(value, int) and value < least:
        raise ValueError(f"{info.field_name} must be >= {least} or 'auto'")
    return value


class DataParams(_Section):
    source: str = Field(min_length=1)
    sha256: Optional[str] = Field(pattern=r"^[0-9a-fA-F]{64}$")
    classes: dict[str, str] = Field(min_length=2)
    positive_class: str
    max_per_class: Optional[int] = Field(gt=0)
    test_fraction: float = Field(gt=0, lt=1)
    val_fraction: float = Field(ge=0, lt=1)
    seed: int = Field(ge=0)
    image_size: int = Field(ge=16, le=2048)
    on_bad_image: Literal["error", "skip"]
    max_unpacked_gb: float = Field(gt=0)
    max_image_pixels: int = Field(ge=1)
    min_image_side: int = Field(ge=1)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @field_validator("classes")
    @classmethod
    def _folders_distinct(cls, classes: dict[str, str]) -> dict[str, str]:
        for name, folder in classes.items():
            if not str(folder).strip("/"):
                raise ValueError(f"class {name!r} has an empty folder name")
        folders = [f.strip("/") for f in classes.values()]
        if len(set(folders)) != len(folders):
            raise ValueError("two classes point at the same folder")
        return classes

    @field_validator("std")
    @classmethod
    def _std_positive(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("every std must be > 0")
        return std

    @model_validator(mode="after")
    def _image_limits_consistent(self) -> "DataParams":
        if self.min_image_side ** 2 > self.max_image_pixels:
            raise ValueError(f"min_image_side {self.min_image_side} allows no image within max_image_pixels "
                             f"{self.max_image_pixels}; lower min_image_side or raise max_image_pixels")
        return self

    @model_validator(mode="after")
    def _positive_is_a_class(self) -> "DataParams":
        if self.positive_class not in self.classes:
            raise ValueError(
                f"positive_class {self.positive_class!r} is not one of the classes "
                f"{list(self.classes)}"
            )
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)


_FREEZE = re.compile(r"none|head_only|up_to:[\w.]+")


class Phase(_Section):
    epoch: int = Field(ge=1)
    freeze: str
    lr_factor: float = Field(gt=0)


class TrainParams(_Section):
    arch: str
    pretrained: bool
    head_hidden: list[int]
    keep_imagenet_head: bool
    dropout: float = Field(ge=0, lt=1)
    freeze: str
    progressive: list[Phase]
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = Field(ge=0)
    scheduler: Literal["none", "step", "exponential", "cosine", "warmup_cosine"]
    step_size: int = Field(gt=0)
    gamma: float = Field(gt=0, le=1)
    final_lr_fraction: float = Field(gt=0, le=1)
    warmup_epochs: int = Field(ge=0)
    patience: Optional[int] = Field(gt=0)
    class_weights: Union[None, Literal["inverse_frequency"], dict[str, float]]
    balanced_sampler: bool
    l2_penalty: float = Field(ge=0)
    augment: dict[str, Optional[dict[str, Any]]]
    seeds: list[int] = Field(min_length=1)
    select_metric: Literal["f1", "macro_f1", "accuracy", "roc_auc", "loss"]
    log_test_curve: bool
    device: str
    num_workers: Union[int, Literal["auto"]]
    pin_memory: Union[bool, Literal["auto"]]
    persistent_workers: bool
    prefetch_factor: int = Field(gt=0)
    processes: Union[int, Literal["auto"]]
    nodes: int = Field(ge=1)
    rendezvous: Optional[str]
    sync_batchnorm: bool
    amp: bool
    channels_last: bool
    compile: bool
    deterministic: Union[bool, Literal["auto"]]
    accumulate_steps: int = Field(gt=0)
    resume: bool

    @field_validator("seeds")
    @classmethod
    def _seeds_distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError("seeds must be distinct integers >= 0")
        return seeds

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}{_did_you_mean(arch, ARCHITECTURES)}; "
                             f"choose one of {', '.join(ARCHITECTURES)}")
        return arch

    @field_validator("head_hidden")
    @classmethod
    def _hidden_sizes(cls, sizes: list[int]) -> list[int]:
        if any(h <= 0 for h in sizes):
            raise ValueError("hidden layer sizes must be > 0")
        return sizes

    @field_validator("freeze")
    @classmethod
    def _known_freeze(cls, spec: str) -> str:
        if not _FREEZE.fullmatch(spec):
            raise ValueError("use none, head_only or up_to:<module>, e.g. up_to:layer3")
        return spec

    @field_validator("progressive")
    @classmethod
    def _phases_in_order(cls, phases: list[Phase]) -> list[Phase]:
        if phases and phases[0].epoch != 1:
            raise ValueError("the first phase must start at epoch 1")
        if any(b.epoch <= a.epoch for a, b in zip(phases, phases[1:])):
            raise ValueError("phase epochs must increase")
        for phase in phases:
            cls._known_freeze(phase.freeze)
        return phases

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, weights):
        if isinstance(weights, dict) and (not weights or min(weights.values()) <= 0):
            raise ValueError("give every class a weight > 0, or use inverse_frequency or null")
        return weights

    @model_validator(mode="after")
    def _consistent(self) -> "TrainParams":
        if self.keep_imagenet_head and not self.pretrained:
            raise ValueError("keep_imagenet_head: true needs pretrained: true (it keeps the ImageNet classifier)")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov: true needs optimizer: sgd with momentum > 0")
        if self.progressive and self.freeze != "none":
            raise ValueError("progressive phases set the freezing; set freeze: none")
        if self.scheduler == "warmup_cosine" and not 0 < self.warmup_epochs < self.epochs:
            raise ValueError("warmup_cosine needs 0 < warmup_epochs < epochs")
        return self

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, augment: dict) -> dict:
        for name in augment:
            if name not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {name!r}{_did_you_mean(name, AUGMENTATIONS)}; "
                                 f"use a torchvision.transforms.v2 name: {', '.join(AUGMENTATIONS)}")
        return augment

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        kind = device.split(":")[0]
        if kind not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
        return device

    _counts = field_validator("num_workers", "processes")(_count_or_auto)

    @field_validator("rendezvous")
    @classmethod
    def _rendezvous_for_several_nodes(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if info.data.get("nodes", 1) > 1 and not value:
            raise ValueError("nodes > 1 needs a rendezvous: host:port of a machine every node can reach")
        if value is not None and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", value):
            raise ValueError("rendezvous must be host:port, e.g. node0:29400")
        return value

    @property
    def augmentations(self) -> dict[str, dict[str, Any]]:
        """The active augmentations, in order (a `null` entry is switched off)."""
        return {name: dict(kw) for name, kw in self.augment.items() if kw is not None}


class TppParams(_Section):
    sensitivity: float = Field(gt=0, le=1)
    specificity: float = Field(gt=0, le=1)


class EvaluateParams(_Section):
    batch_size: Union[int, Literal["auto"]]
    target_sensitivity: float = Field(gt=0, le=1)
    who_tpp: TppParams
    calibration_bins: int = Field(ge=2, le=100)

    _batch_size = field_validator("batch_size")(_count_or_auto)


class StatsParams(_Section):
    ci_level: float = Field(gt=0.5, lt=1)
    resamples: int = Field(ge=100)
    seed: int = Field(ge=0)
    alpha: float = Field(gt=0, lt=0.5)


class CompareParams(_Section):
    reference: str


class EnsembleParams(_Section):
    """One ensemble: trained variants (`members`, keys of `experiments`) combined by `voting`."""

    members: list[str] = Field(min_length=1)
    voting: Literal["soft", "hard"]

    @field_validator("members")
    @classmethod
    def _members_distinct(cls, members: list[str]) -> list[str]:
        if len(set(members)) != len(members):
            raise ValueError("members must be distinct variants")
        return members
class ExplainParams(_Section):
    checkpoint: Literal["best", "last"]
    per_group: int = Field(ge=1, le=16)


class _ParamsFile(_Section):
    data: DataParams
    train: dict[str, Any]
    experiments: dict[str, dict[str, Any]] = Field(min_length=1)
    evaluate: EvaluateParams
    stats: StatsParams
    compare: CompareParams
    ensembles: dict[str, EnsembleParams]
    explain: ExplainParams

    @model_validator(mode="after")
    def _reference_is_a_variant(self) -> "_ParamsFile":
        if self.compare.reference not in self.experiments:
            raise ValueError(f"compare.reference {self.compare.reference!r} is not one of the experiments "
                             f"{list(self.experiments)}")
        return self


class Params:
    """Validated params: one section object per section of params.yaml, and one `TrainParams` per variant."""

    def __init__(self, raw: Mapping[str, Any], parsed: _ParamsFile, variants: dict[str, TrainParams]):
        self.raw = raw
        self.data = parsed.data
        self.evaluate = parsed.evaluate
        self.stats = parsed.stats
        self.compare = parsed.compare
        self.ensembles = parsed.ensembles
        self.explain = parsed.explain
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
        raise UserError(f"unknown {kind} {name!r}{_did_you_mean(name, table)}; "
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
        raise UserError(_describe(err, path, _ParamsFile)) from None

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
    for name, cfg in variants.items():
        if isinstance(cfg.class_weights, dict) and set(cfg.class_weights) != set(parsed.data.classes):
            problems.append(f"{path}: class_weights of variant {name} must give a weight to each of the classes "
                            f"{list(parsed.data.classes)} (got {list(cfg.class_weights)})")
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
                                f"{_did_you_mean(member, parsed.experiments)}; params.yaml defines experiments: "
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
        raise UserError(_describe(err, Path(PARAMS_FILE), TrainParams, where)) from None


def _describe(err: ValidationError, path: Path, model: type[BaseModel], where=None) -> str:
    """One line per problem: `params.yaml: train.lr: must be > 0 (got -1)`."""
    lines = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        prefix = where(loc) if where else None
        key = ".".join(str(part) for part in ((prefix,) if prefix else ()) + loc)
        kind = problem["type"]
        if kind == "extra_forbidden":
            known = _fields_at(model, loc[:-1])
            msg = f"unknown key{_did_you_mean(str(loc[-1]), known)}"
        elif kind == "missing":
            msg = "is missing; add it (README.md lists every key)"
        else:
            text = problem["msg"].removeprefix("Value error, ")
            msg = f"{text} (got {problem.get('input')!r})"
        lines.append(f"{path}: {key}: {msg}")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (sub)model found by following `loc` from `model`
    (through a name -> section mapping such as `ensembles.<name>`)."""
    parts = iter(loc)
    for part in parts:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
            next(parts, None)  # the mapping's key: a name of the user's
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def _did_you_mean(word: str, choices) -> str:
    choices = list(choices)
    synonym = _SYNONYMS.get(word.lower())
    if synonym is None:
        close_synonyms = difflib.get_close_matches(word.lower(), _SYNONYMS, n=1, cutoff=0.8)
        synonym = _SYNONYMS[close_synonyms[0]] if close_synonyms else None
    if synonym in choices:
        return f" (did you mean {synonym!r}?)"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
