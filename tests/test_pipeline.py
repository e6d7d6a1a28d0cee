"""End to end: the whole pipeline, run by the README's quick start on a fresh clone (the
`reproduced` fixture), then an experiment on one variant, `dvc metrics diff` and `dvc plots show`;
and the pipeline on real chest X-rays when ../shared/data/tb-cxr-mini is present."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys

import pytest
import torch
import yaml

from tests.conftest import MINI, TINY, copy_project, declared_outputs, dvc, git_repo, run, run_pipeline, set_params

VARIANTS = ["baseline", "regu_penalty", "dropout", "sharpness", "contrast"]
ENSEMBLE = "all_variants"  # params.yaml's ensemble of the five


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_runs_every_stage_and_writes_every_output(reproduced):
    project, output = reproduced
    expected = {"download", "split", "prepare", "preprocess", "compare", "flops", "plots"}
    expected |= {f"{s}@{v}" for s in ("train", "evaluate", "explain", "card", "export") for v in VARIANTS}
    expected |= {f"ensemble@{ENSEMBLE}"}
    assert ran_stages(output) == expected

    outputs = declared_outputs(project)
    # download 1, split 3, prepare 1, preprocess 1, train 4, evaluate 8, explain 2, card 1 and export 1 per
    # variant, ensemble 8, compare 3, flops 2, plots 1 (no external set: no external stage)
    assert len(outputs) == 6 + 5 * (4 + 8 + 2 + 1 + 1) + 8 + 6
    for path in outputs:
        assert path.exists(), path
    for v in VARIANTS:
        for name in ("best.pt", "last.pt"):
            assert (project / "models" / v / "seed_42" / name).is_file()
        for name in ("confusion_matrix.json", "roc.json", "precision_recall.json"):
            assert (project / "metrics/evaluate" / v / "plots/sklearn" / name).is_file()
    for name in ("training_curves.png", "test_metrics.png", "confusion_matrices.png", "roc_curves.png",
                 "reliability.png", "summary.md", "data/curves.csv"):
        assert (project / "plots" / name).is_file(), name
    assert "Data and pipelines are up to date" in dvc("status", cwd=project).stdout


def test_runtime_knobs_rerun_nothing(reproduced):
    """No stage lists `runtime` as params: where and how a stage runs is not a result."""
    project, _ = reproduced
    params = project / "params.yaml"
    before = params.read_text()
    knobs = {"device": "cpu", "num_workers": 2, "pin_memory": True, "persistent_workers": False,
             "prefetch_factor": 2, "processes": 4, "nodes": 2, "rendezvous": "node0:29400", "resume": True,
             "inference_precision": "fp32"}
    assert set(knobs) == set(yaml.safe_load(before)["runtime"])  # every knob, each to another value
    try:
        set_params(params, {f"runtime.{k}": v for k, v in knobs.items()})
        assert "Data and pipelines are up to date" in dvc("status", cwd=project).stdout
    finally:
        params.write_text(before)


def test_a_forced_rerun_leaves_its_outputs_linked_to_the_cache(reproduced):
    """`dvc repro -f` of a stage whose outputs are already in the cache links its new files to the cache
    (.dvc/config: cache.type hardlink; with hardlink,copy DVC 3 keeps them as copies, treeverse/dvc#10549)."""
    project, _ = reproduced
    dvc("repro", "-f", "-s", "split", cwd=project)
    files = list((project / "data" / "split").iterdir())  # a directory output, the case DVC left as copies
    cache = project / ".dvc" / "cache" / "files" / "md5"
    digests = {f: hashlib.md5(f.read_bytes()).hexdigest() for f in files}  # DVC's name for each in its cache
    linked = {f.name: f.stat().st_ino == (cache / d[:2] / d[2:]).stat().st_ino for f, d in digests.items()}
    assert linked and all(linked.values()), linked
    assert "Data and pipelines are up to date" in dvc("status", cwd=project).stdout


def test_metrics_are_complete_and_in_range(reproduced):
    project, _ = reproduced
    split = json.loads((project / "metrics/split_report.json").read_text())
    # the demo: 60 per class; the quick start's val_fraction 0.2 holds out 10 per class
    assert split["total"] == {"test": 24, "train": 96, "of_which_val": 20}
    assert json.loads((project / "metrics/split.json").read_text()) == {**split["total"], "bad_images": 0}
    for v in VARIANTS:
        m = json.loads((project / "metrics/evaluate" / v / "report.json").read_text())
        assert m["seeds"] == [42] and "per_seed" not in m and m["intervals"].startswith("test sampling")
        for which in ("best", "last"):
            r = m[which]
            assert 1 <= r["epoch"] <= 2
            for key in ("accuracy", "f1", "sensitivity", "specificity", "precision", "roc_auc"):
                assert 0 <= r[key] <= 1, (v, which, key)
                assert r[key + "_ci"]["low"] <= r[key] <= r[key + "_ci"]["high"], (v, which, key)
            assert r["macro"]["f1_ci"]["low"] <= r["macro"]["f1"] <= r["macro"]["f1_ci"]["high"]
            assert set(r["per_class"]["recall"]) == {"Healthy", "TB"}
            assert sum(sum(row.values()) for row in r["confusion_matrix"].values()) == 24
            assert 0 <= r["ece"] <= 1
            # 10 validation positives: enough for a threshold at 0.90 (9 needed), the 1st lowest positive score
            op = r["operating_point"]
            assert op["validation_positives"] == 10 and set(op["thresholds"]) == {"seed_42"}
        headline = json.loads((project / "metrics/evaluate" / v / "metrics.json").read_text())
        assert headline[v]["f1"] == m["best"]["f1"]  # keyed by variant: short, unique dvc exp show columns
        assert headline[v]["roc_auc_low"] == m["best"]["roc_auc_ci"]["low"]
        best_op = m["best"]["operating_point"]
        assert headline[v]["threshold"] == m["best"]["threshold"] == best_op["thresholds"]["seed_42"]
        # one decision rule: the headline is the operating point's, the argmax a secondary view
        assert headline[v]["sensitivity"] == m["best"]["operating_point"]["test"]["sensitivity"]
        assert headline[v]["sensitivity_low"] == m["best"]["operating_point"]["test"]["sensitivity_ci"]["low"]
        assert set(m["best"]["argmax"]["confusion_matrix"]) == {"Healthy", "TB"}
        train = json.loads((project / "metrics/train" / v / "report.json").read_text())
        assert train["seeds"]["seed_42"]["best"]["epoch"] == m["best"]["epoch"]
        assert train["seeds"]["seed_42"]["study_protocol"]["epoch"] in (1, 2)
        train_headline = json.loads((project / "metrics/train" / v / "metrics.json").read_text())
        assert train_headline[v]["best_epoch"] == m["best"]["epoch"]
        with open(project / "metrics/evaluate" / v / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 24 and {r["seed"] for r in rows} == {"42"}
        for r in rows:
            assert float(r["best_prob_Healthy"]) + float(r["best_prob_TB"]) == pytest.approx(1, abs=2e-6)
            threshold = m["best"]["operating_point"]["thresholds"]["seed_42"]
            assert float(r["best_threshold"]) == threshold
            assert r["best_decision"] == ("TB" if float(r["best_prob_TB"]) >= threshold else "Healthy")
    flops = json.loads((project / "metrics/flops_report.json").read_text())
    assert flops["variants"]["baseline"]["parameters"] == 11_177_538  # resnet18, 2 classes
    assert flops["variants"]["baseline"]["flops"] == 2 * flops["variants"]["baseline"]["macs"] > 0
    assert json.loads((project / "metrics/flops.json").read_text())["baseline"]["mparams"] == 11.178

    comparison = json.loads((project / "metrics/comparison_report.json").read_text())
    assert comparison["reference"] == "baseline" and comparison["tests"] == 5 * 3  # one Holm family
    assert set(comparison["pairs"]) == set(VARIANTS[1:]) | {ENSEMBLE}
    assert set(comparison["pairs"][ENSEMBLE]) == {"seed_42_vs_mean_of_42"}
    for pairs in comparison["pairs"].values():
        for r in pairs.values():
            for metric in ("accuracy", "f1", "roc_auc"):
                assert 0 < r[metric]["p_value"] <= r[metric]["p_holm"] <= 1
                assert r[metric]["significant"] == (r[metric]["p_holm"] < 0.05)
    table = (project / "metrics/comparison.md").read_text()
    assert all(f"**{v}** vs baseline" in table for v in VARIANTS[1:])
    assert "one Holm family of all 15 tests" in table

    summary = (project / "plots/summary.md").read_text()
    assert all(f"| {v} |" in summary for v in VARIANTS + [ENSEMBLE])
    assert "Operating point" in summary and "Paired comparisons with `baseline`" in summary
    assert "WHO TPP" in summary and "| test sampling |" in summary


def test_metrics_files_hold_a_few_headline_numbers_only(reproduced):
    """What dvc metrics show / dvc exp show read: numbers only, at most 150 for the five variants, the ensemble,
    the split, FLOPs and the comparison (issue 13)."""
    project, _ = reproduced
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    files = next(iter(shown.values()))["data"]
    assert len(files) == 5 + 5 + 1 + 3  # train and evaluate per variant, the ensemble, split, flops, comparison

    def leaves(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from leaves(value)
        else:
            yield node

    values = [v for f in files.values() for v in leaves(f["data"])]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), values
    assert 60 <= len(values) <= 150
    evaluate = files["metrics/evaluate/baseline/metrics.json"]["data"]["baseline"]
    assert {"accuracy", "f1", "f1_low", "f1_high", "roc_auc", "ece"} <= set(evaluate) and len(evaluate) <= 13


def test_experiment_on_one_variant_reruns_only_it(experimented):
    project, output = experimented
    # no other variant trains or evaluates again; the ensemble (which depends on all of models/), compare,
    # flops and plots (seconds) read every variant
    assert ran_stages(output) == {"train@contrast", "evaluate@contrast", "explain@contrast", "card@contrast",
                                  "export@contrast",
                                  f"ensemble@{ENSEMBLE}", "compare", "flops", "plots"}

    diff = dvc("metrics", "diff", cwd=project).stdout  # what changed against HEAD
    assert "metrics/evaluate/contrast/metrics.json" in diff
    assert "metrics/train/contrast/metrics.json" in diff
    for other in VARIANTS[:-1]:  # their comparison p-values may move: Holm's family includes contrast's tests
        assert f"/{other}/" not in diff

    assert re.search(r"contrast\.(f1|roc_auc)_(low|high)", diff)  # the headline intervals are metrics too

    params_diff = dvc("params", "diff", cwd=project).stdout
    assert "experiments.contrast.lr" in params_diff and "0.003" in params_diff

    out = project / "rendered"
    dvc("plots", "show", "-o", str(out), cwd=project)
    html = (out / "index.html").read_text()
    assert "Validation F1 per epoch" in html and '"field": "variant"' in html
    assert "test_metrics.png" in html


def test_a_repeated_cpu_run_reproduces_weights_and_metrics_exactly(reproduced):
    """train.deterministic: auto is on for the CPU. `sharpness` augments, and the
    repeat does it in a loader worker process (runtime.num_workers, a knob no
    stage depends on): the augmentation draws must repeat too. (Runs after the
    experiment test: only the DVCLive log, which records images/s, differs afterwards.)"""
    project, _ = reproduced
    variant = "sharpness"
    outputs = [project / "metrics/train" / variant / "report.json",
               project / "metrics/evaluate" / variant / "report.json",
               project / "metrics/evaluate" / variant / "predictions.csv"]
    before = [p.read_bytes() for p in outputs]
    weights = {w: torch.load(project / "models" / variant / "seed_42" / f"{w}.pt", weights_only=True)["model"]
               for w in ("best", "last")}
    set_params(project / "params.yaml", {"runtime.num_workers": 1})
    log = run([sys.executable, "-m", "stages.train", variant], cwd=project).stdout
    assert re.search(r"[1-9]\d* loader workers", log)  # the case worth testing: augmentation in workers
    run([sys.executable, "-m", "stages.evaluate", variant], cwd=project)

    for path, old in zip(outputs, before):
        assert path.read_bytes() == old, path
    for which, old in weights.items():
        new = torch.load(project / "models" / variant / "seed_42" / f"{which}.pt", weights_only=True)["model"]
        assert new.keys() == old.keys()
        assert all(torch.equal(new[k], old[k]) for k in old), which
    # DVC agrees: the checkpoints hash the same; only the speed log changed
    status = dvc("status", f"train@{variant}", cwd=project).stdout
    assert f"metrics/train/{variant}/seeds" in status and f"models/{variant}" not in status


@pytest.mark.slow
@pytest.mark.skipif(not MINI.is_dir(), reason="../shared/data/tb-cxr-mini is not present")
def test_pipeline_on_real_chest_xrays(tmp_path, monkeypatch):
    """Every stage on 120 real X-rays, two seeds per variant and a hard-voting ensemble over seeds. The
    stages run in this process (`run_pipeline`); DVC's own run of the pipeline is the quick start's."""
    project = copy_project(tmp_path / "project")
    set_params(project / "params.yaml", {**TINY, "data.source": str(MINI), "data.image_size": 64,
                                         "data.classes": {"Healthy": "Healthy", "TB": "TB"}})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["experiments"] = {"baseline": {}, "contrast": params["experiments"]["contrast"]}
    params["ensembles"] = {"both": {"members": ["baseline", "contrast"], "voting": "hard"}}  # over seeds too
    params["train"]["seeds"] = [1, 2]  # also covers several seeds per variant
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_repo(project)
    run_pipeline(project, monkeypatch, explain=True)
    split = json.loads((project / "metrics/split_report.json").read_text())
    assert split["classes"]["Healthy"]["test"] == {"count": 12, "first": "CHNCXR_0005_0.png",
                                                   "last": "CHNCXR_0045_0.png"}
    assert split["classes"]["TB"]["train"]["count"] == 48
    for path in declared_outputs(project):
        assert path.exists(), path
    m = json.loads((project / "metrics/evaluate/contrast/report.json").read_text())
    assert m["best"]["n"] == 24 and m["seeds"] == [1, 2]
    per_seed = [m["per_seed"][f"seed_{s}"]["best"]["accuracy"] for s in (1, 2)]
    assert m["best"]["accuracy"] == pytest.approx(sum(per_seed) / 2)
    assert m["best"]["accuracy_sd"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    comparison = json.loads((project / "metrics/comparison_report.json").read_text())
    assert set(comparison["pairs"]["contrast"]) == {"seed_1", "seed_2"}  # seed by seed
    assert "both" in comparison["pairs"]
    # the ensemble of all seeds is paired with the reference's seed-averaged probabilities
    assert "| both | seed_1+2_vs_mean_of_1+2 |" in (project / "metrics/comparison.md").read_text()
    both = json.loads((project / "metrics/evaluate/both/report.json").read_text())
    assert both["seeds"] == [1, 2] and both["ensemble"]["voting"] == "hard" and both["best"]["n"] == 24
    for seed in (1, 2):
        assert (project / "models/contrast" / f"seed_{seed}" / "best.pt").is_file()
        assert (project / "metrics/train/contrast/seeds" / f"seed_{seed}" / "metrics.json").is_file()
