"""Stage `ensemble@<name>`: combine trained variants by voting and evaluate the result like a variant.

`ensembles.<name>` in params.yaml names the `members` (keys of `experiments`)
and the `voting`. A member's class probabilities are the mean over its seeds'
checkpoints; then
- soft voting: the ensemble's probabilities are the mean of the members';
- hard voting: each member votes for its predicted class; the ensemble's
  "probability" of a class is its share of the votes, so ROC AUC, the
  operating point and ECE are defined, and the predicted class is the one
  with most votes, ties broken by the soft mean (added with a weight of
  `TIE_BREAK`: visible in the CSV's six decimals, yet smaller than one vote
  while there are fewer than 999 members).

This is done for the best checkpoints and, separately, for the last ones,
on the test and the validation images (the operating point is chosen on
validation), and the ensemble is scored and written exactly as evaluate
writes a single-seed variant, into `metrics/evaluate/<name>/`, so compare and
plots read it as one. Its one run is labelled by the members' seeds
(`42`, or `1+2` for seeds 1 and 2) in the CSVs; `metrics.json` also records
the members, the voting and each member checkpoint's epoch under `ensemble`,
and `epoch` is null: an ensemble has no single epoch.
"""

from __future__ import annotations

import numpy as np

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.data.datasets import eval_batch_size, prepared_image_size
from cxrlab.evaluation.evaluate import (
    CHECKPOINTS,
    ByRun,
    predict_seed,
    report_and_write,
    runtime,
    write_val_predictions,
)
from cxrlab.evaluation.folds import scoring_data
from cxrlab.io.fsio import check_writable

# Weight of the soft mean in a hard vote: breaks ties (and ranks them for ROC) without outweighing a vote.
TIE_BREAK = 1e-3


def combine(member_probs: list[np.ndarray], voting: str) -> np.ndarray:
    """The ensemble's (N x k) probabilities from each member's (N x k) probabilities."""
    soft = np.mean(member_probs, axis=0)
    if voting == "soft":
        return soft
    k = soft.shape[1]
    votes = np.mean([np.eye(k)[p.argmax(1)] for p in member_probs], axis=0)
    return (1 - TIE_BREAK) * votes + TIE_BREAK * soft


def evaluate_ensemble(name: str, params: Params) -> None:
    spec = params.ensemble(name)
    check_writable(paths.eval_dir(name) / "metrics.json")
    rt = runtime(params)
    data = scoring_data(eval_batch_size(params.evaluate.batch_size, rt.device), rt)
    test, y_val = data.test, data.y_val
    image_size = prepared_image_size()

    member_test: dict[str, list[np.ndarray]] = {w: [] for w in CHECKPOINTS}
    member_val: dict[str, list[np.ndarray]] = {w: [] for w in CHECKPOINTS}
    member_epochs: dict[str, dict[str, dict[str, int]]] = {}
    for member in spec.members:
        seeds = params.variant(member).seeds
        member_epochs[member] = {}
        for which in CHECKPOINTS:
            runs = [predict_seed(member, s, which, data, image_size, rt, params.data.positive_class)
                    for s in seeds]  # with data.folds: each seed's fold-mean test, out-of-fold validation
            member_test[which].append(np.mean([run[0] for run in runs], axis=0))
            if y_val is not None:
                member_val[which].append(np.mean([run[1] for run in runs], axis=0))
            member_epochs[member][which] = {f"seed_{s}": run[2] if run[3] is None else
                                            {f: r["epoch"] for f, r in run[3]["per_fold"].items()}
                                            for s, run in zip(seeds, runs)}
        print(f"ensemble {name}: predicted with {member} (seeds {seeds})")

    seeds = sorted({s for member in spec.members for s in params.variant(member).seeds})
    run = "+".join(map(str, seeds))
    probs: ByRun = {w: {run: combine(member_test[w], spec.voting)} for w in CHECKPOINTS}
    val_probs: ByRun = {w: {run: combine(member_val[w], spec.voting)} if y_val is not None else {}
                        for w in CHECKPOINTS}
    header = {"ensemble": {"members": spec.members, "voting": spec.voting, "member_epochs": member_epochs},
              "seeds": seeds}
    report_and_write(f"ensemble {name} ({spec.voting} voting)", paths.eval_dir(name), header,
                     [run], probs, val_probs, {w: {run: None} for w in CHECKPOINTS}, test, y_val, params)
    write_val_predictions(paths.eval_dir(name), data, [run], val_probs)

