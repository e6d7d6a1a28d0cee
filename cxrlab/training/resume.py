"""Resuming an interrupted training run: what it must share with the new one, and its saved state.

A run in progress keeps its state in `.train-state/<variant>/seed_<seed>/`
(with data.folds one folder per fold, `.../fold_<f>/`; see
`cxrlab.paths.train_state`). A resume continues from the last finished
epoch only if every setting that changes the numbers, and the prepared data,
are those of the interrupted run; otherwise the run starts afresh and says why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cxrlab import paths
from cxrlab.config.schema import DataParams, TrainParams
from cxrlab.errors import UserError
from cxrlab.model.backbones import load_checkpoint

# In the run's work folder: the weights, optimiser, schedule and scaler states and the
# selection so far, after the last finished epoch. Never a DVC output; removed on completion.
RESUME_FILE = "resume.pt"


def run_fingerprint(cfg: TrainParams, data: DataParams, seed: int, fold: int | None = None,
                    amp_dtype=None) -> str:
    """What a resumed run must share with the interrupted one: every setting that
    changes the numbers, the prepared data, with data.folds the fold it holds out,
    and the mixed precision the machine gave `train.amp` (a run begun in bf16 on an
    AMX CPU does not continue in fp32 on a CPU without it)."""
    settings = cfg.model_dump(exclude={"seeds", "log_test_curve"})
    run = {"train": settings, "seed": seed, "positive": data.positive_class, "mean": data.mean, "std": data.std}
    if fold is not None:  # without folds the fingerprint is unchanged
        run["fold"] = fold
    if amp_dtype is not None:  # nor in fp32
        run["amp_dtype"] = str(amp_dtype)
    digest = hashlib.sha256(json.dumps(run, sort_keys=True).encode())
    for name in ("train.csv", "test.csv", "meta.json"):
        digest.update((paths.PREPARED / name).read_bytes())
    return digest.hexdigest()


def resumable(last: Path, fingerprint: str, epochs: int, name: str) -> dict | None:
    """The interrupted run's last checkpoint if it can be continued, else None (and why)."""
    if not last.is_file():
        print(f"train {name}: runtime.resume is on but there is no interrupted run in {last.parent}; starting afresh")
        return None
    try:
        state = load_checkpoint(last)
    except UserError as err:
        print(f"train {name}: cannot resume ({err}); starting afresh")
        return None
    if state.get("resume", {}).get("fingerprint") != fingerprint:
        print(f"train {name}: the interrupted run in {last.parent} used other settings or data; starting afresh")
        return None
    if int(state["epoch"]) > epochs:
        print(f"train {name}: the interrupted run is past train.epochs; starting afresh")
        return None
    return state


def truncate_log(folder: Path, epochs: int) -> None:
    """Drop DVCLive rows after the first `epochs` epochs (steps 0..epochs-1): an
    interruption between logging and checkpointing must not leave a duplicate step."""
    for tsv in (folder / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        column = lines[0].rstrip("\n").split("\t").index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[column]) < epochs]
        tsv.write_text("".join(kept))
