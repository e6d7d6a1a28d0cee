"""Stage `compare`: is each variant really different from the reference (the baseline)?

On the same test images, each variant's best checkpoint is compared with the
reference's: McNemar's exact test for accuracy, and a paired stratified
bootstrap (the same resampled images for both) for the differences in
accuracy, F1 and ROC AUC. The p-values of each metric are Holm-corrected
across all comparisons. With several seeds, the i-th seed of a variant is
paired with the i-th seed of the reference. Ensembles (`ensembles` in
params.yaml) are compared like variants: their one run (all members' seeds
combined) is paired with the reference's first seed.

Writes `metrics/comparison.json` and `metrics/comparison.md`, a table and a
sentence per variant saying which differences are significant at `stats.alpha`.
"""

from __future__ import annotations

import numpy as np

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.errors import UserError
from cxrlab.evaluation import stats
from cxrlab.io.fsio import write_json, write_text
from cxrlab.io.records import read_rows

METRICS = ("accuracy", "f1", "roc_auc")
LABELS = {"accuracy": "accuracy", "f1": "F1", "roc_auc": "ROC AUC"}


def read_predictions(variant: str, stage: str) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Labels, {seed: best-checkpoint probabilities} and class names from the CSV `stage` wrote
    (an ensemble's seed is its label such as `1+2`)."""
    rows = read_rows(paths.eval_dir(variant) / "predictions.csv", stage)
    classes = [c.removeprefix("best_prob_") for c in rows[0] if c.startswith("best_prob_")]
    by_seed: dict[str, list[dict]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(r)
    probs = {s: np.array([[float(r[f"best_prob_{c}"]) for c in classes] for r in rs]) for s, rs in by_seed.items()}
    first = next(iter(by_seed.values()))
    labels = np.array([int(r["label"]) for r in first])
    return labels, probs, classes


def compare_pair(y, prob_ref, prob_var, positive: int, st) -> dict:
    boot = stats.paired_bootstrap(y, prob_ref, prob_var, positive, METRICS, st.resamples, st.seed, st.ci_level)
    mc = stats.mcnemar_exact(prob_ref.argmax(1) == y, prob_var.argmax(1) == y)
    boot["accuracy"].update(p_value=mc["p_value"], test="McNemar exact",
                            reference_right_variant_wrong=mc["a_right_b_wrong"],
                            reference_wrong_variant_right=mc["a_wrong_b_right"])
    for name in ("f1", "roc_auc"):
        boot[name]["test"] = "paired bootstrap"
    return boot


def _fmt_diff(name: str, r: dict) -> str:
    scale, unit = (100, " pts") if name == "accuracy" else (1, "")
    digits = 2 if name == "accuracy" else 4
    if r["low"] is None:
        return "n/a"
    return (f"{r['difference'] * scale:+.{digits}f}{unit} "
            f"[{r['low'] * scale:+.{digits}f}, {r['high'] * scale:+.{digits}f}]")


def _fmt_p(r: dict) -> str:
    if r["p_value"] is None:
        return "n/a"
    star = " *" if r["significant"] else ""
    return f"{r['p_value']:.3g} ({r['p_holm']:.3g}){star}"


def markdown(result: dict, n_test: int) -> str:
    ref, alpha, level = result["reference"], result["alpha"], result["ci_level"]
    lines = [
        f"# Paired comparisons with `{ref}`",
        "",
        f"Same {n_test} test images, best-on-validation checkpoints. Differences are variant minus {ref} "
        f"with {level:.0%} paired bootstrap intervals; p-values (Holm-corrected across the "
        f"{result['comparisons']} comparisons of each metric in brackets); * significant at {alpha}. "
        "Accuracy is tested with McNemar's exact test, F1 and ROC AUC with the paired bootstrap.",
        "",
        "| variant | seed | Δ accuracy | p (Holm) | Δ F1 | p (Holm) | Δ ROC AUC | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    words = []
    for variant, pairs in result["pairs"].items():
        significant: dict[str, list[str]] = {m: [] for m in METRICS}
        for seed, r in pairs.items():
            lines.append(f"| {variant} | {seed} | " + " | ".join(
                f"{_fmt_diff(m, r[m])} | {_fmt_p(r[m])}" for m in METRICS) + " |")
            for m in METRICS:
                if r[m]["significant"]:
                    direction = "higher" if r[m]["difference"] > 0 else "lower"
                    significant[m].append(f"{direction} in {seed}")
        found = [f"{LABELS[m]} ({', '.join(v)})" for m, v in significant.items() if v]
        of = f" of {len(pairs)} seed pairs" if len(pairs) > 1 else ""
        if found:
            words.append(f"- **{variant}** vs {ref}: significant difference at {alpha} after Holm correction in "
                         + "; ".join(found) + f"{of}.")
        else:
            words.append(f"- **{variant}** vs {ref}: no difference in accuracy, F1 or ROC AUC is significant "
                         f"at {alpha} after Holm correction{' in any seed pair' if of else ''}.")
    return "\n".join(lines + ["", "In words:", "", *words, ""])


def compare_all(params: Params) -> None:
    st, ref = params.stats, params.compare.reference
    y, ref_probs, classes = read_predictions(ref, f"evaluate@{ref}")
    positive = classes.index(params.data.positive_class)

    pairs: dict[str, dict[str, dict]] = {}
    scored = {v: f"evaluate@{v}" for v in params.variants if v != ref}
    scored |= {e: f"ensemble@{e}" for e in params.ensembles}
    for variant, stage in scored.items():
        y_v, probs, _ = read_predictions(variant, stage)
        if not np.array_equal(y_v, y):
            raise UserError(f"{variant} and {ref} were evaluated on different test images; rerun evaluate (dvc repro)")
        pairs[variant] = {}
        for (s_ref, p_ref), (s_var, p_var) in zip(ref_probs.items(), probs.items()):
            label = f"seed_{s_var}" if s_var == s_ref else f"seed_{s_var}_vs_{s_ref}"
            pairs[variant][label] = compare_pair(y, p_ref, p_var, positive, st)

    all_results = [r for by_seed in pairs.values() for r in by_seed.values()]
    for m in METRICS:
        adjusted = stats.holm([r[m]["p_value"] for r in all_results])
        for r, p in zip(all_results, adjusted):
            r[m]["p_holm"] = p
            r[m]["significant"] = bool(p is not None and p < st.alpha)

    result = {"reference": ref, "alpha": st.alpha, "ci_level": st.ci_level, "comparisons": len(all_results),
              "pairs": pairs}
    summary = {}
    for variant, by_seed in pairs.items():
        if len(by_seed) == 1:
            summary[variant] = next(iter(by_seed.values()))
        else:
            summary[variant] = {
                "mean_difference": {m: float(np.mean([r[m]["difference"] for r in by_seed.values()])) for m in METRICS},
                "sd_difference": {m: float(np.std([r[m]["difference"] for r in by_seed.values()], ddof=1))
                                  for m in METRICS},
                "significant_pairs": {m: sum(r[m]["significant"] for r in by_seed.values()) for m in METRICS},
                **by_seed,
            }
    write_json(paths.COMPARISON, {k: v for k, v in result.items() if k != "pairs"} | {"variants": summary})
    table = markdown(result, len(y))
    write_text(paths.COMPARISON_TABLE, table)
    print(table)

