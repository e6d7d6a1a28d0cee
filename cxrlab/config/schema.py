"""The params schema: one pydantic model per section of `params.yaml`.

Types and ranges, no defaults: `params.yaml` is the single source of every
value, so a value is never silently taken from code. Loading and merging
variants is `cxrlab.config.load`; the wording of errors is `cxrlab.config.errors`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cxrlab.config.errors import did_you_mean
from cxrlab.config.names import classes_problem, parse_group_by
from cxrlab.model.architectures import ARCHITECTURES

# torchvision.transforms.v2 classes usable as training augmentations: they
# work on uint8 image tensors and keep the image size.
AUGMENTATIONS = (
    "AugMix", "AutoAugment", "ColorJitter", "ElasticTransform", "GaussianBlur", "RandAugment",
    "RandomAdjustSharpness", "RandomAffine", "RandomAutocontrast", "RandomEqualize", "RandomErasing",
    "RandomGrayscale", "RandomHorizontalFlip", "RandomInvert", "RandomPerspective", "RandomPhotometricDistort",
    "RandomPosterize", "RandomRotation", "RandomSolarize", "RandomVerticalFlip", "TrivialAugmentWide",
)


class _Section(BaseModel):
    # allow_inf_nan=False: YAML's .nan and .inf are refused in every float of every section
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _count_or_auto(value: Union[int, str], info: ValidationInfo) -> Union[int, str]:
    """A field validator: an int at least the field's minimum, or 'auto'."""
    least = {"num_workers": 0, "processes": 1, "batch_size": 1}[info.field_name]
    if isinstance(value, int) and value < least:
        raise ValueError(f"{info.field_name} must be >= {least} or 'auto'")
    return value


class DataParams(_Section):
    source: str = Field(min_length=1)
    sha256: Optional[str] = Field(pattern=r"^[0-9a-fA-F]{64}$")
    # {class: folder}, [folder, ...] (class name = folder name) or 'auto' (every class folder found,
    # in natural order); a list or 'auto' is resolved by the split stage (see `class_spec`).
    classes: Union[dict[str, str], list[str], Literal["auto"]]
    positive_class: str
    max_per_class: Optional[int] = Field(gt=0)
    split: Literal["by_id", "random", "grouped"]
    group_by: Optional[str]
    test_fraction: float = Field(gt=0, lt=1)
    val_fraction: float = Field(ge=0, lt=1)
    folds: Optional[int] = Field(ge=2, le=100)
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
    def _folders_distinct(cls, classes: Union[dict[str, str], list[str], str]):
        if classes != "auto" and (why := classes_problem(classes)):
            raise ValueError(why)
        return classes

    @field_validator("group_by")
    @classmethod
    def _group_by_parses(cls, spec: Optional[str]) -> Optional[str]:
        if spec is not None:
            parse_group_by(spec)  # its ValueError names the fix
        return spec

    @model_validator(mode="after")
    def _grouped_needs_groups(self) -> "DataParams":
        if self.split == "grouped" and not self.group_by:
            raise ValueError("split: grouped needs data.group_by (regex:<pattern> or csv:<file>:<image column>:"
                             "<group column>) naming each image's patient or source")
        return self

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
        names = self.class_names
        if names is not None and self.positive_class not in names:
            raise ValueError(
                f"positive_class {self.positive_class!r} is not one of the classes {names}"
            )
        return self

    @property
    def class_spec(self) -> Union[dict[str, str], Literal["auto"]]:
        """{class: folder spec}, or 'auto' (the split stage finds the folders)."""
        if self.classes == "auto":
            return "auto"
        if isinstance(self.classes, list):
            return {Path(f.strip("/")).name: f for f in self.classes}
        return dict(self.classes)

    @property
    def class_names(self) -> Optional[list[str]]:
        """The class names in label order, or None with `auto` (known only after the split stage)."""
        spec = self.class_spec
        return None if spec == "auto" else list(spec)


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
    sync_batchnorm: bool
    amp: bool
    channels_last: bool
    compile: bool
    deterministic: Union[bool, Literal["auto"]]
    accumulate_steps: int = Field(gt=0)

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
            raise ValueError(f"unknown architecture {arch!r}{did_you_mean(arch, ARCHITECTURES)}; "
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
        for name, kwargs in augment.items():
            try:  # JSON has no nan or inf: a quick check of every number, however deeply nested
                json.dumps(kwargs, allow_nan=False, default=str)
            except ValueError:
                raise ValueError(f"{name}: every number must be finite, not nan or inf") from None
            if name not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {name!r}{did_you_mean(name, AUGMENTATIONS)}; "
                                 f"use a torchvision.transforms.v2 name: {', '.join(AUGMENTATIONS)}")
        return augment

    @property
    def augmentations(self) -> dict[str, dict[str, Any]]:
        """The active augmentations, in order (a `null` entry is switched off)."""
        return {name: dict(kw) for name, kw in self.augment.items() if kw is not None}


class RuntimeParams(_Section):
    """Where and how a stage runs, never what it computes: no stage lists `runtime` as params,
    so changing it leaves `dvc status` clean. (Knobs that can change the numbers, such as
    amp, channels_last, compile and deterministic, stay in `train`.)"""

    device: str
    num_workers: Union[int, Literal["auto"]]
    pin_memory: Union[bool, Literal["auto"]]
    persistent_workers: bool
    prefetch_factor: int = Field(gt=0)
    processes: Union[int, Literal["auto"]]
    nodes: int = Field(ge=1)
    rendezvous: Optional[str]
    resume: bool
    inference_precision: Literal["auto", "fp32", "bf16"] = "auto"

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


class ScreeningParams(_Section):
    """A screening target (e.g. WHO's TPP for a TB triage test) the operating point is checked against."""

    name: str = Field(min_length=1)
    sensitivity: float = Field(gt=0, le=1)
    specificity: float = Field(gt=0, le=1)
    tb_only: bool


class EvaluateParams(_Section):
    batch_size: Union[int, Literal["auto"]]
    # < 1: no threshold chosen on a finite validation set can promise a sensitivity of 1 on new images
    target_sensitivity: float = Field(gt=0, lt=1)
    threshold_rule: Literal["expected", "tolerance"]
    screening: Optional[ScreeningParams]
    calibration_bins: int = Field(ge=2, le=100)

    _batch_size = field_validator("batch_size")(_count_or_auto)


class StatsParams(_Section):
    ci_level: float = Field(gt=0.5, lt=1)
    resamples: int = Field(ge=100)
    seed: int = Field(ge=0)
    alpha: float = Field(gt=0, lt=0.5)
    resample_seeds: bool


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


class ExternalSetParams(_Section):
    """One external test set (`external.<name>`): scored by every model, never trained, tuned or split on."""

    source: str = Field(min_length=1)  # as data.source: demo, kaggle:<owner>/<dataset>, an http(s) archive, a path
    # The one default of the schema: a set is added on the command line in one short -S line
    # (`+external.x={source: ..., classes: auto}`), so an absent sha256 means "not checked", as null does.
    sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    # auto: each training class's folder found by its class or training folder name, case-insensitively;
    # or {class: folder} naming the folder of every training class (as data.classes)
    classes: Union[Literal["auto"], dict[str, str]]

    @field_validator("classes")
    @classmethod
    def _folders_named(cls, classes):
        if isinstance(classes, dict) and any(not str(f).strip("/") for f in classes.values()):
            raise ValueError("every class needs a folder name")
        return classes


EXTERNAL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class ExplainParams(_Section):
    checkpoint: Literal["best", "last"]
    per_group: int = Field(ge=1, le=16)


class ExportParams(_Section):
    # 13: Softmax over one axis (older opsets flatten); 20: the TorchScript exporter's newest
    opset: int = Field(ge=13, le=20)


class _ParamsFile(_Section):
    data: DataParams
    train: dict[str, Any]
    runtime: RuntimeParams
    experiments: dict[str, dict[str, Any]] = Field(min_length=1)
    evaluate: EvaluateParams
    stats: StatsParams
    compare: CompareParams
    ensembles: dict[str, EnsembleParams]
    explain: ExplainParams
    external: dict[str, ExternalSetParams]

    @field_validator("external")
    @classmethod
    def _external_names(cls, sets: dict) -> dict:
        for name in sets:
            if not EXTERNAL_NAME.fullmatch(name):
                raise ValueError(f"external set name {name!r}: use letters, digits and _ (a letter first); "
                                 "it names a folder and a DVC stage")
        return sets

    export: ExportParams

    @model_validator(mode="after")
    def _reference_is_a_variant(self) -> "_ParamsFile":
        if self.compare.reference not in self.experiments:
            raise ValueError(f"compare.reference {self.compare.reference!r} is not one of the experiments "
                             f"{list(self.experiments)}")
        return self


