"""The runs of a train stage: one per seed, or with `data.folds: k` one per seed and fold.

Fold f's model trains on every other fold and picks its best epoch on fold f
(`build.run_splits`); each (seed, fold) has its own checkpoints, log and work
folder with its own resume file (`paths.checkpoint`, `train_log`, `train_state`
with `fold`), and its summary sits at `seeds.seed_<s>.folds.fold_<f>` of the
train report. Without folds every path and summary is the one-run-per-seed one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cxrlab import paths
from cxrlab.data.datasets import Split


def run_units(seeds: Iterable[int], train: Split) -> list[tuple[int, int | None]]:
    """(seed, fold) of every run, in training order: the fold is None without data.folds."""
    folds: list[int | None] = list(range(len(train.folds()))) or [None]
    return [(seed, fold) for seed in seeds for fold in folds]


def run_outputs(variant: str, units: Iterable[tuple[int, int | None]]) -> list[Path]:
    """What the runs write: each one's checkpoint folder, log and work folder."""
    return [out for seed, fold in units for out in (paths.checkpoint(variant, seed, "best", fold).parent,
                                                    paths.train_log(variant, seed, fold),
                                                    paths.train_state(variant, seed, fold))]


def add_summary(runs: dict, seed: int, fold: int | None, summary: dict | None) -> None:
    """Record a run's summary: at `seed_<s>`, or with folds at `seed_<s>.folds.fold_<f>`."""
    if fold is None:
        runs[f"seed_{seed}"] = summary
    else:
        runs.setdefault(f"seed_{seed}", {"folds": {}})["folds"][f"fold_{fold}"] = summary


def summaries(runs: dict[str, dict]) -> list[dict]:
    """Every run's summary, flat: one per seed, or one per seed and fold."""
    return [r for s in runs.values() for r in (s["folds"].values() if "folds" in s else [s])]


def train_headline(runs: dict[str, dict], select_metric: str) -> dict[str, float]:
    """The numbers of metrics.json for dvc exp show: the best epoch and its validation `select_metric`,
    the mean over seeds (and folds; each run's and everything else is in report.json)."""
    flat = summaries(runs)
    out = {"best_epoch": float(np.mean([r["best"]["epoch"] for r in flat]))}
    values = [(r["best"].get("val") or {}).get(select_metric) for r in flat]
    if all(isinstance(v, (int, float)) for v in values):
        out[f"best_val_{select_metric}"] = float(np.mean(values))
    return out
