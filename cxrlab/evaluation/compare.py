"""Stage `compare`: is each variant really different from the reference (the baseline)?

On the same test images, each variant's best checkpoint is compared with the
reference's: McNemar's exact test for accuracy (on the argmax decisions
evaluate reported), a paired permutation (swap) test for F1 and ROC AUC,
and a paired stratified bootstrap (the same resampled images for both) for
the intervals of the differences in accuracy, F1 and ROC AUC. All p-values,
every metric of every pair, are one Holm family, so the chance of any false
"significant" in the whole table is at most `stats.alpha`; the permutations
are raised above `stats.resamples` where needed so that Holm can reject.

Like is paired with like: a variant's seeds are paired seed by seed with the
reference's (the seed lists must be the same); an ensemble (its members'
seeds combined) is paired with the reference's seed-averaged probabilities.
Probabilities are read exactly as evaluate wrote them (shortest repr).

Writes `metrics/comparison.json` (per compared model and metric: the
difference and its Holm p-value, numbers only), `metrics/comparison_report.json`
(every pair: intervals, raw and Holm p-values, discordant counts) and
`metrics/comparison.md`, a table and a sentence per variant.
"""

from __future__ import annotations

import numpy as np

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.errors import UserError
from cxrlab.evaluation import paired
from cxrlab.io.fsio import read_json, write_json, write_text
from cxrlab.io.records import read_rows

METRICS = ("accuracy", "f1", "roc_auc")
LABELS = {"accuracy": "accuracy", "f1": "F1", "roc_auc": "ROC AUC"}
# Permutations are raised automatically up to this (memory and minutes); a family too large for it is warned of.
MAX_PERMUTATIONS = 20_000


class Scored:
    """One evaluated model's best-checkpoint test predictions, per run (a seed; an ensemble's one run)."""

    def __init__(self, name: str, stage: str):
        rows = read_rows(paths.eval_dir(name) / "predictions.csv", stage)
        self.name = name
        self.classes = [c.removeprefix("best_prob_") for c in rows[0] if c.startswith("best_prob_")]
        by_run: dict[str, list[dict]] = {}
        for r in rows:
            by_run.setdefault(r["seed"], []).append(r)
        # float() of the shortest repr evaluate wrote gives back exactly its number
        self.probs = {s: np.array([[float(r[f"best_prob_{c}"]) for c in self.classes] for r in rs])
                      for s, rs in by_run.items()}
        self.predicted = {s: np.array([self.classes.index(r["best_predicted"]) for r in rs])
                          for s, rs in by_run.items()}
        first = next(iter(by_run.values()))
        self.labels = np.array([int(r["label"]) for r in first])
        report = paths.eval_dir(name) / "report.json"
        self.seeds = [int(s) for s in read_json(report)["seeds"]] if report.is_file() else None

    def mean_probs(self) -> np.ndarray:
        return np.mean(list(self.probs.values()), axis=0)


def compare_pair(y, prob_ref, prob_var, pred_ref, pred_var, positive: int, st, permutations: int) -> dict:
    """Variant minus reference on the same images; McNemar on the decisions `pred_*` (class indices), a
    permutation test of F1 and ROC AUC; intervals from the paired bootstrap."""
    boot = paired.paired_bootstrap(y, prob_ref, prob_var, positive, METRICS, st.resamples, st.seed, st.ci_level)
    mc = paired.mcnemar_exact(pred_ref == y, pred_var == y)
    boot["accuracy"].update(p_value=mc["p_value"], p_at_floor=False, test="McNemar exact",
                            reference_right_variant_wrong=mc["a_right_b_wrong"],
                            reference_wrong_variant_right=mc["a_wrong_b_right"])
    tested = ("f1", "roc_auc")
    p = paired.permutation_p_values(y, prob_ref, prob_var, positive, tested, permutations, st.seed)
    for name in tested:
        boot[name].update(p_value=p[name], test="paired permutation",
                          p_at_floor=bool(p[name] is not None and p[name] <= paired.p_value_floor(permutations)))
    return boot


def agrees(r: dict, alpha: float) -> bool | None:
    """Whether the unadjusted interval and the raw p-value agree about 0 (interval excludes 0 iff p < alpha).
    The bootstrap interval runs narrow on small test sets where the exact and permutation tests keep their
    level: they can disagree, and then the test decides (the table marks it)."""
    if r.get("low") is None or r.get("p_value") is None:
        return None
    return bool((r["low"] > 0 or r["high"] < 0) == (r["p_value"] < alpha))


def _fmt_diff(name: str, r: dict) -> str:
    scale, unit = (100, " pts") if name == "accuracy" else (1, "")
    digits = 2 if name == "accuracy" else 4
    if r["low"] is None:
        return "n/a"
    return (f"{r['difference'] * scale:+.{digits}f}{unit} "
            f"[{r['low'] * scale:+.{digits}f}, {r['high'] * scale:+.{digits}f}]"
            + (" †" if r.get("interval_agrees") is False else ""))


def _fmt_p(r: dict, floor: float) -> str:
    """`p (Holm)`; a permutation p at its floor 1/(B+1) is an upper bound: `< 0.001`, Holm's then `≤`."""
    if r["p_value"] is None:
        return "n/a"
    star = " *" if r["significant"] else ""
    if r.get("p_at_floor"):
        return f"< {_round_up(floor)} (≤ {r['p_holm']:.3g}){star}"
    return f"{r['p_value']:.3g} ({r['p_holm']:.3g}){star}"


def _round_up(value: float) -> str:
    """Two significant digits, rounded up, so `< text` stays true (1/1001 -> 0.001)."""
    exponent = int(np.floor(np.log10(value))) - 1
    return f"{np.ceil(value / 10.0 ** exponent) * 10.0 ** exponent:.2g}"


def family_text(result: dict) -> str:
    pairs = result["tests"] // len(METRICS)
    return (f"one Holm family of all {result['tests']} tests ({len(METRICS)} metrics x {pairs} "
            f"comparison{'s' if pairs != 1 else ''})")


def markdown(result: dict, n_test: int) -> str:
    ref, alpha, level = result["reference"], result["alpha"], result["ci_level"]
    floor = result["p_value_floor"]
    lines = [
        f"# Paired comparisons with `{ref}`",
        "",
        (f"Same {n_test} test images, best-on-validation checkpoints. Differences are variant minus {ref} "
         f"with {level:.0%} paired bootstrap intervals (test sampling, not Holm-adjusted). p-values, then in "
         f"brackets Holm-corrected ({family_text(result)}); * significant at {alpha}: the test decides, not "
         "the interval. Accuracy is tested with McNemar's exact test on the argmax decisions, F1 and ROC AUC "
         f"with a paired permutation (swap) test, whose smallest p-value with {result['permutations']} "
         f"permutations is {floor:.2g} (shown as < {_round_up(floor)}). "
         + (f"{result['permutations_note']} " if result.get("permutations_note") else "")
         + (f"**Warning: {result['warning']}.** " if result.get("warning") else "")
         + "Variants are paired with the reference seed by seed; an ensemble with the reference's "
         "seed-averaged probabilities. †: the interval and the unadjusted p-value disagree about 0 (the "
         "bootstrap interval runs narrow on small test sets; the test decides)."),
        "",
        "| variant | pair | Δ accuracy | p (Holm) | Δ F1 | p (Holm) | Δ ROC AUC | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    words = []
    for variant, pairs in result["pairs"].items():
        significant: dict[str, list[str]] = {m: [] for m in METRICS}
        for seed, r in pairs.items():
            lines.append(f"| {variant} | {seed} | " + " | ".join(
                f"{_fmt_diff(m, r[m])} | {_fmt_p(r[m], floor)}" for m in METRICS) + " |")
            for m in METRICS:
                if r[m]["significant"]:
                    direction = "higher" if r[m]["difference"] > 0 else "lower"
                    significant[m].append(f"{direction} in {seed}")
        found = [f"{LABELS[m]} ({', '.join(v)})" for m, v in significant.items() if v]
        of = f" of {len(pairs)} seed pairs" if len(pairs) > 1 else ""
        holm = f"after Holm correction over all {result['tests']} tests"
        if found:
            words.append(f"- **{variant}** vs {ref}: significant difference at {alpha} {holm} in "
                         + "; ".join(found) + f"{of}.")
        else:
            words.append(f"- **{variant}** vs {ref}: no difference in accuracy, F1 or ROC AUC is significant "
                         f"at {alpha} {holm}{' in any seed pair' if of else ''}.")
    return "\n".join(lines + ["", "In words:", "", *words, ""])


def check_seeds(ref: Scored, other: Scored, is_ensemble: bool) -> None:
    """Refuse to pair different seeds: a silent `zip` would drop or mismatch them."""
    mine = sorted(other.seeds if is_ensemble else map(int, other.probs))
    theirs = sorted(map(int, ref.probs))
    if mine != theirs:
        what = "ensemble" if is_ensemble else "variant"
        raise UserError(f"{what} {other.name} has seeds {mine} but the reference {ref.name} has {theirs}; "
                        "compare pairs like with like: give them the same train.seeds in params.yaml "
                        f"(experiments.<variant>.seeds), or set compare.reference")


def compare_all(params: Params) -> None:
    st, ref_name = params.stats, params.compare.reference
    ref = Scored(ref_name, f"evaluate@{ref_name}")
    y, positive = ref.labels, ref.classes.index(params.data.positive_class)
    scored = [(Scored(v, f"evaluate@{v}"), False) for v in params.variants if v != ref_name]
    scored += [(Scored(e, f"ensemble@{e}"), True) for e in params.ensembles]
    for other, is_ensemble in scored:  # every check before the first bootstrap
        if not np.array_equal(other.labels, y):
            raise UserError(f"{other.name} and {ref_name} were evaluated on different test images; "
                            "rerun evaluate (dvc repro)")
        check_seeds(ref, other, is_ensemble)

    tests = len(METRICS) * sum(1 if is_ensemble else len(ref.probs) for _, is_ensemble in scored)
    permutations = min(paired.permutations_for(tests, st.alpha, st.resamples),
                       max(st.resamples, MAX_PERMUTATIONS))
    warning = paired.holm_floor_warning(paired.p_value_floor(permutations), tests, st.alpha)
    pairs: dict[str, dict[str, dict]] = {}
    for other, is_ensemble in scored:
        pairs[other.name] = {}
        if is_ensemble:
            (run, prob), = other.probs.items()
            mean_ref = ref.mean_probs()
            pairs[other.name][f"seed_{run}_vs_mean_of_{'+'.join(ref.probs)}"] = compare_pair(
                y, mean_ref, prob, mean_ref.argmax(1), other.predicted[run], positive, st, permutations)
            continue
        for seed in ref.probs:
            pairs[other.name][f"seed_{seed}"] = compare_pair(
                y, ref.probs[seed], other.probs[seed], ref.predicted[seed], other.predicted[seed], positive, st,
                permutations)

    family = [r[m] for by_seed in pairs.values() for r in by_seed.values() for m in METRICS]
    for r, p in zip(family, paired.holm([r["p_value"] for r in family])):
        r["p_holm"] = p
        r["significant"] = bool(p is not None and p < st.alpha)
        r["interval_agrees"] = agrees(r, st.alpha)

    result = {"reference": ref_name, "alpha": st.alpha, "ci_level": st.ci_level, "resamples": st.resamples,
              "permutations": permutations, "p_value_floor": paired.p_value_floor(permutations),
              "tests": len(family)}
    if permutations > st.resamples:
        result["permutations_note"] = (f"Permutations raised from stats.resamples = {st.resamples} to "
                                       f"{permutations} so that the smallest p-value times the {len(family)} "
                                       f"tests stays at most alpha / 2 (Holm could otherwise never reject).")
    result["family"] = family_text(result)
    if warning:
        result["warning"] = warning
    result["pairs"] = pairs
    write_json(paths.COMPARISON_REPORT, result)
    write_json(paths.COMPARISON, headline(pairs))
    table = markdown(result, len(y))
    write_text(paths.COMPARISON_TABLE, table)
    print(table)
    if warning:
        print(f"compare: warning: {warning}")


def headline(pairs: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Per compared model and metric: the difference (mean over seed pairs) and the Holm p-value (the
    largest over seed pairs: below alpha means significant in every pair). Numbers only, for dvc exp show."""
    out = {}
    for name, by_seed in pairs.items():
        row: dict[str, float] = {}
        for m in METRICS:
            row[f"{m}_diff"] = float(np.mean([r[m]["difference"] for r in by_seed.values()]))
            holm = [r[m]["p_holm"] for r in by_seed.values() if r[m]["p_holm"] is not None]
            if holm:
                row[f"{m}_p_holm"] = max(holm)
        out[name] = row
    return out
