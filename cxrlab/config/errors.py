"""How params errors read: one line per problem, naming the file and key, with a "did you mean"."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import get_args, get_origin

from pydantic import BaseModel, ValidationError

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



def describe(err: ValidationError, path: Path, model: type[BaseModel], where=None) -> str:
    """One line per problem: `params.yaml: train.lr: must be > 0 (got -1)`."""
    lines = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        prefix = where(loc) if where else None
        key = ".".join(str(part) for part in ((prefix,) if prefix else ()) + loc)
        kind = problem["type"]
        if kind == "extra_forbidden":
            known = _fields_at(model, loc[:-1])
            msg = f"unknown key{did_you_mean(str(loc[-1]), known)}"
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


def did_you_mean(word: str, choices) -> str:
    choices = list(choices)
    synonym = _SYNONYMS.get(word.lower())
    if synonym is None:
        close_synonyms = difflib.get_close_matches(word.lower(), _SYNONYMS, n=1, cutoff=0.8)
        synonym = _SYNONYMS[close_synonyms[0]] if close_synonyms else None
    if synonym in choices:
        return f" (did you mean {synonym!r}?)"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
