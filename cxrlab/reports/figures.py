"""Matplotlib figures comparing the variants (drawn by the plots stage)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cxrlab.io.fsio import atomic_file  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path) as tmp:  # tight: a suptitle wider than one small panel is not clipped
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def _wrap(text: str, inches: float, fontsize: float = 12) -> str:
    """`text` broken into lines that fit `inches` of figure width at `fontsize` points (about 0.55 em a
    character), so a title over one or two narrow panels stays readable instead of clipped."""
    width = max(20, int(inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


PANELS_PER_ROW = 3  # grids of per-variant panels: at most this many across, so a figure fits a page


def _panels(n: int, width: float, height: float):
    """A grid of `n` panels, `PANELS_PER_ROW` across at most, each `width` x `height` inches; unused
    panels hidden. Returns (figure, the n axes, the figure's width in inches)."""
    cols = min(n, PANELS_PER_ROW)
    rows = -(-n // cols)
    fig_width = max(width * cols, 5.0)
    fig, axes = plt.subplots(rows, cols, figsize=(fig_width, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n]), fig_width


def _colors(variants: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


CURVE_PANELS = (
    ("train/loss", "Training objective (cross-entropy + any L2 penalty)"),
    ("val/loss", "Validation loss"),
    ("val/f1", "Validation F1 (selects the best epoch)"),
    ("val/accuracy", "Validation accuracy"),
    ("test_curve/f1", "Test F1 per epoch\n(study's view; never used for selection)"),
    ("images_per_s", "Training throughput (images/s)"),
)


def training_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], best_epoch: dict[str, int],
                    path: Path) -> None:
    """One panel per metric, one line per variant; a dot marks each variant's best epoch."""
    variants = list(curves)
    colors = _colors(variants)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (metric, title) in zip(axes.flat, CURVE_PANELS):
        for v in variants:
            points = curves[v].get(metric)
            if not points:
                continue
            x, y = zip(*points)
            ax.plot(x, y, label=v, color=colors[v], lw=1.6)
            if metric.startswith("val/") and best_epoch.get(v) in x:
                i = x.index(best_epoch[v])
                ax.plot([x[i]], [y[i]], "o", color=colors[v], ms=6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Training curves of all variants (dots: best epoch on validation)")
    _save(fig, path)


def metric_bars(values: dict[str, dict[str, float | None]], path: Path, title: str,
                errors: dict[str, dict[str, tuple[float, float]]] | None = None) -> None:
    """Grouped bars: one group per metric, one bar per variant (optional 95% CI whiskers)."""
    variants = list(values)
    metrics = list(next(iter(values.values())))
    colors = _colors(variants)
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(metrics) * max(1, len(variants) / 4)), 4.8))
    lows = []
    for i, v in enumerate(variants):
        xs = np.arange(len(metrics)) + (i - (len(variants) - 1) / 2) * width
        ys = np.array([values[v][m] if values[v][m] is not None else np.nan for m in metrics], dtype=float)
        yerr = None
        if errors and v in errors:
            lo = np.array([ys[j] - errors[v][m][0] if m in errors[v] else 0 for j, m in enumerate(metrics)])
            hi = np.array([errors[v][m][1] - ys[j] if m in errors[v] else 0 for j, m in enumerate(metrics)])
            yerr = np.vstack([np.clip(lo, 0, None), np.clip(hi, 0, None)])
            lows.extend(ys - yerr[0])
        ax.bar(xs, ys, width, label=v, color=colors[v], yerr=yerr, capsize=3 if yerr is not None else 0)
        lows.extend(ys)
    finite = [x for x in lows if np.isfinite(x)]
    bottom = max(0.0, min(finite) - 0.05) if finite else 0.0
    ax.set_ylim(bottom, 1.0 + 0.01)
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.set_title(_wrap(title, fig.get_figwidth()))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(variants), 5), loc="lower right")
    _save(fig, path)


def confusion_matrices(matrices: dict[str, list[list[int]]], classes: list[str], path: Path,
                       subtitles: dict[str, str] | None = None,
                       title: str = "Test confusion matrices (best epoch on validation)") -> None:
    """Confusion matrices, one panel per variant (rows: true class, columns: predicted)."""
    variants = list(matrices)
    fig, axes, width = _panels(len(variants), 3.4, 3.6)
    for ax, v in zip(axes, variants):
        cm = np.asarray(matrices[v])
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=11)
        ax.set_xticks(range(len(classes)), classes, fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(v + (f"\n{_wrap(subtitles[v], 3.2, 9)}" if subtitles and v in subtitles else ""), fontsize=9)
    fig.suptitle(_wrap(title, width))
    _save(fig, path)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]], positive: str, path: Path,
               points: dict[str, tuple[float, float]] | None = None) -> None:
    """ROC curves of all variants on one set of axes, AUC in the legend; `points`: each variant's
    operating point (false positive rate, true positive rate), marked on its curve."""
    colors = _colors(list(curves))
    fig, ax = plt.subplots(figsize=(5.8, 5.6))
    for v, (fpr, tpr, auc) in curves.items():
        label = f"{v} (AUC {auc:.4f})" if auc is not None else v
        ax.plot(fpr, tpr, label=label, color=colors[v], lw=1.6)
        if points and v in points:
            ax.plot(*points[v], "o", color=colors[v], ms=7, mec="black", mew=0.8)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel(f"true positive rate (sensitivity to {positive})")
    title = "Test ROC curves (best epoch on validation)"
    if points:
        title += "; dots: the operating point (threshold chosen on validation)"
    ax.set_title(_wrap(title, 5.8, 11), fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def reliability(diagrams: dict[str, tuple[list[dict], float]], path: Path) -> None:
    """Reliability diagram per variant: accuracy against mean confidence in each bin."""
    variants = list(diagrams)
    fig, axes, width = _panels(len(variants), 3.3, 3.5)
    for ax, v in zip(axes, variants):
        bins, ece = diagrams[v]
        used = [b for b in bins if int(b["count"]) > 0]
        conf = [float(b["confidence"]) for b in used]
        acc = [float(b["accuracy"]) for b in used]
        bin_width = float(bins[0]["high"]) - float(bins[0]["low"])
        ax.bar([float(b["low"]) for b in used], acc, width=bin_width, align="edge", alpha=0.35,
               edgecolor="tab:blue", label="accuracy in bin")
        ax.plot(conf, acc, "o-", color="tab:blue", ms=3)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-label probability)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_title(f"{_wrap(v, 3.2, 9)}\nECE {ece:.4f}", fontsize=9)
    fig.suptitle(_wrap("Reliability on the test set (best epoch on validation)", width))
    _save(fig, path)
