"""Smoke test of `python -m benchmarks.speed` at tiny sizes: it runs, and prints
both sides of every comparison with their ratio (the numbers themselves are
the benchmark's business, not the test's)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.conftest import ROOT, run

TINY_BENCH = ["--arch", "resnet18", "--image-size", "32", "--steps", "1", "--eval-images", "4",
              "--prepare-images", "40", "--distinct-images", "8", "--memory-images", "33", "--memory-steps", "1",
              "--data-seconds", "0.3", "--rounds", "1", "--model-rounds", "1", "--threads", "1", "--skip", "repro"]
NUMBER = r"\d+(?:\.\d+)?"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = run([sys.executable, "-m", "benchmarks.speed", *TINY_BENCH, "--out", str(out),
                "--tmp", str(out.parent)], cwd=ROOT, timeout=300)
    return proc.stdout, json.loads(out.read_text()), out.parent


def test_prints_both_sides_and_ratios(bench):
    text, _, _ = bench
    for row in ("baseline (no augmentation)", "contrast (ColorJitter, CPU)", "training (", "evaluation ("):
        line = next((ln for ln in text.splitlines() if ln.startswith(row)), None)
        assert line is not None, f"no row {row!r} in:\n{text}"
        # study img/s ... pipeline img/s ... ratio
        assert len(re.findall(NUMBER, line)) >= 4 and re.search(rf"{NUMBER}x", line), line
    for heading in ("1. Data path alone", "2. Model step", "3. Preparing the data", "4. Peak RSS"):
        assert heading in text
    assert re.search(rf"^split \+ prepare\s+{NUMBER}", text, re.M)
    assert re.search(rf"^peak RSS of the child process \(wait4\)\s+{NUMBER}", text, re.M)


def test_json_holds_every_number_and_the_machine(bench):
    _, results, folder = bench
    assert results["machine"]["torch"] and results["machine"]["usable_cores"] >= 1
    for variant in ("baseline", "contrast"):
        r = results["data"][variant]
        assert r["study"]["images_per_s"] > 0 and r["pipeline"]["images_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["pipeline"]["images_per_s"] / r["study"]["images_per_s"])
        assert r["ratio_per_core"] == pytest.approx(
            r["pipeline"]["images_per_s_per_core"] / r["study"]["images_per_s_per_core"])
    for part in ("train", "eval"):
        r = results["model"][part]
        assert r["ratio"] == pytest.approx(r["pipeline"]["images_per_s"] / r["study"]["images_per_s"])
    assert set(results["prepare"]["seconds"]) == {"download", "split", "prepare", "preprocess"}
    assert results["prepare"]["counts"] == {"Healthy": 33, "TB": 7}
    assert results["memory"]["peak_rss_gib"] > 0 and results["memory"]["train_images"] == 33
    assert "repro" not in results  # skipped
    assert not list(folder.glob("tbcxr-bench-*"))  # temporary projects removed
