"""Stage `explain@<variant>`: Grad-CAM heatmaps over test images, by kind of outcome.

The first seed's `explain.checkpoint` (best or last; with `data.folds` the
mean of its fold models) predicts the test set as the prediction command
does: at the operating threshold evaluate chose for that checkpoint (the
argmax where it chose none), so the groups' counts are the confusion matrix
evaluate reports for the seed.
The test images then fall into four groups with respect to
`data.positive_class`: true positives, false negatives, false positives and
true negatives. Of each group the `explain.per_group` most telling are shown
(the most confident for correct decisions, the worst misses for errors),
each with the Grad-CAM heatmap of the positive class over it.

Writes to `explanations/<variant>/`:
- `gallery.png`: one row per group (a row stays empty when no image falls
  into it), declared as a DVC plot so `dvc plots show` displays it;
- `gallery.csv`: the images shown: group, file, class, probability, decision.
"""

from __future__ import annotations

import csv
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxrlab import paths  # noqa: E402
from cxrlab.config.load import Params
from cxrlab.data.datasets import eval_batch_size, load_split, prepared_image_size  # noqa: E402
from cxrlab.errors import UserError  # noqa: E402
from cxrlab.evaluation.evaluate import load_for_test  # noqa: E402
from cxrlab.explain.cam import overlay  # noqa: E402
from cxrlab.io.fsio import atomic_file, check_writable  # noqa: E402
from cxrlab.serving.predict import make_predictor, operating_threshold  # noqa: E402

# (name, truly positive, decided positive, most telling first: highest p(positive)?)
GROUPS = (
    ("true positives", True, True, True),
    ("false negatives", True, False, False),
    ("false positives", False, True, True),
    ("true negatives", False, False, False),
)


def pick(labels: np.ndarray, decided: np.ndarray, p_pos: np.ndarray, positive: int,
         per_group: int) -> dict[str, np.ndarray]:
    """Indices of up to `per_group` images per group, the most telling first."""
    picked = {}
    for name, truly, decided_pos, descending in GROUPS:
        idx = np.flatnonzero(((labels == positive) == truly) & ((decided == positive) == decided_pos))
        order = np.argsort(-p_pos[idx] if descending else p_pos[idx], kind="stable")
        picked[name] = idx[order][:per_group]
    return picked


def draw_gallery(path, pictures: dict[str, list[tuple[np.ndarray, str]]], per_group: int, title: str) -> None:
    """One row per group of (overlay, caption) pictures, written atomically as PNG."""
    fig, axes = plt.subplots(len(pictures), per_group, figsize=(2.3 * per_group, 2.6 * len(pictures)),
                             squeeze=False)
    for row, (group, items) in zip(axes, pictures.items()):
        for col, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(col < len(items))
            if col < len(items):
                picture, caption = items[col]
                ax.imshow(picture)
                ax.set_title(caption, fontsize=7)
            elif col == 0:
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=9, color="grey")
        row[0].set_ylabel(f"{group}\n({len(items)} shown)", fontsize=9)
    fig.suptitle("\n".join(textwrap.fill(line, int(16 * 2.3 * per_group)) for line in title.splitlines()),
                 fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def explain_variant(variant: str, params: Params) -> None:
    seed = params.variant(variant).seeds[0]
    which, per_group = params.explain.checkpoint, params.explain.per_group
    positive_class = params.data.positive_class
    check_writable(paths.explain_dir(variant) / "gallery.png")

    test = load_split("test")
    if not len(test):
        raise UserError(f"the test set in {paths.PREPARED} is empty; raise data.test_fraction")
    files = paths.served_checkpoints(variant, seed, which)
    ckpts = [load_for_test(path, test.classes, prepared_image_size()) for path in files]
    threshold = operating_threshold(variant, seed, which)
    predictor = make_predictor(ckpts, files, positive_class, threshold, device=params.runtime.device)
    positive = test.classes.index(positive_class)

    probs = predictor.probabilities(test.images, eval_batch_size(params.evaluate.batch_size, predictor.rt.device))
    decided = np.array([test.classes.index(d) for d in predictor.decisions(probs)])
    picked = pick(test.labels, decided, probs[:, positive], positive, per_group)
    shown = np.sort(np.concatenate(list(picked.values())))  # ascending: one pass over the memory map
    shown_images = np.asarray(test.images[shown])
    maps = dict(zip(shown.tolist(), predictor.heatmaps(shown_images, positive)))
    images = dict(zip(shown.tolist(), shown_images))

    pictures: dict[str, list[tuple[np.ndarray, str]]] = {}
    rows = []
    for group, idx in picked.items():
        pictures[group] = []
        for i in idx.tolist():
            r = test.rows[i]
            caption = f"{r['filename']}\np({positive_class}) = {probs[i, positive]:.3f}"
            pictures[group].append((overlay(images[i], maps[i]), caption))
            rows.append([group, r["filename"], r["class"], f"{probs[i, positive]:.6f}", test.classes[decided[i]]])
    counts = ", ".join(f"{g} {int(np.sum(((test.labels == positive) == t) & ((decided == positive) == d)))}"
                       for g, t, d, _ in GROUPS)
    fold = f" (the mean of {len(files)} fold models)" if len(files) > 1 else ""
    title = (f"{variant}, seed {seed}, {which} checkpoint{fold}: Grad-CAM of {positive_class} on test images, "
             f"decided by {predictor.rule.split(' (')[0]}\n{counts}")

    out = paths.explain_dir(variant)
    draw_gallery(out / "gallery.png", pictures, per_group, title)
    with atomic_file(out / "gallery.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "filename", "class", f"prob_{positive_class}", "decision"])
        writer.writerows(rows)
    print(f"explain {variant}: {len(test)} test images ({counts}); Grad-CAM of {len(shown)} "
          f"in {out / 'gallery.png'}")

