"""Resuming an interrupted training run: what it must share with the new one, and its saved state.

A run in progress keeps its state in `.train-state/<variant>/seed_<seed>/`
(with data.folds one folder per fold, `.../fold_<f>/`; see
`cxrlab.paths.train_state`). A resume continues from the last finished
epoch only if every setting that changes the numbers, and the prepared data,
are those of the interrupted run; otherwise the run starts afresh and says why.

A run that completed before the stage was interrupted (an earlier seed or
fold) leaves a record (`cxrlab.paths.finished_record`): its fingerprint, its
summary and the hashes of the checkpoints it published. A resume keeps such a
run, not training it again, when the fingerprint is the same and its
checkpoints and log are still the ones it published; the records go when the
stage completes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cxrlab import paths
from cxrlab.config.schema import DataParams, TrainParams
from cxrlab.errors import UserError
from cxrlab.io.fsio import read_json, remove, write_json
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


def _published(variant: str, seed: int, fold: int | None) -> dict[str, str] | None:
    """sha256 of the run's published best.pt and last.pt, or None if either or its log is missing."""
    found = {}
    for which in ("best", "last"):
        path = paths.checkpoint(variant, seed, which, fold)
        if not path.is_file():
            return None
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        found[which] = digest.hexdigest()
    return found if paths.train_log(variant, seed, fold).is_dir() else None


class FinishedRuns:
    """The runs of a train stage that completed while the stage did not: kept by a resume (module doc)."""

    def __init__(self, variant: str, cfg: TrainParams, data: DataParams, resume: bool, is_main: bool) -> None:
        self.variant, self.cfg, self.data, self.resume, self.is_main = variant, cfg, data, resume, is_main
        if is_main and not resume:
            self.clear()  # a fresh start: no run of an earlier, interrupted one is kept

    def record(self, seed: int, fold: int | None, summary: dict | None) -> None:
        """Note that this run completed and what it published (rank 0, after publishing)."""
        if self.is_main:
            write_json(paths.finished_record(self.variant, seed, fold),
                       {"fingerprint": run_fingerprint(self.cfg, self.data, seed, fold),
                        "checkpoints": _published(self.variant, seed, fold), "summary": summary})

    def kept(self, seed: int, fold: int | None) -> dict | None:
        """With runtime.resume, the summary of this run if an earlier, interrupted start of the stage completed
        it with the same settings and data and its outputs are untouched since (it says so); else None."""
        record = paths.finished_record(self.variant, seed, fold)
        if not (self.resume and self.is_main and record.is_file()):
            return None
        done = read_json(record)
        name = f"{self.variant} seed {seed}" + (f" fold_{fold}" if fold is not None else "")
        if done.get("fingerprint") != run_fingerprint(self.cfg, self.data, seed, fold):
            print(f"train {name}: finished earlier with other settings or data; training it again")
            return None
        if done.get("checkpoints") is None or done["checkpoints"] != _published(self.variant, seed, fold):
            where = paths.checkpoint(self.variant, seed, "best", fold).parent
            print(f"train {name}: finished earlier, but its checkpoints in {where} changed or went since; "
                  "training it again")
            return None
        print(f"train {name}: finished before the interruption with these settings and data; kept, not trained "
              "again (runtime.resume)")
        return done["summary"]

    def clear(self) -> None:
        """Drop the records (the stage is complete, or starts afresh) and the work folders left empty."""
        folder = paths.finished_record(self.variant, 0).parent
        remove(folder)
        for parent in (folder.parent, paths.TRAIN_STATE):
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
