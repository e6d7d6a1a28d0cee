"""Smoke test of `python -m benchmarks.speed` at tiny sizes: it runs, and prints
both sides of every comparison with their ratio (the numbers themselves are
the benchmark's business, not the test's); and its pipeline side is the run
the train stage builds, whatever params say."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.conftest import ROOT, TINY, copy_project, run, set_params

pytestmark = pytest.mark.slow

TINY_BENCH = ["--arch", "resnet18", "--image-size", "32", "--steps", "1", "--train-batch", "2", "--eval-images", "4",
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
    for row in ("training (", "evaluation ("):  # study, fp32 and bf16 img/s; fp32/study, bf16/study, bf16/fp32
        line = next(ln for ln in text.splitlines() if ln.startswith(row))
        assert len(re.findall(rf"{NUMBER}x", line)) == 3, line
    assert "bf16 / fp32" in text and re.search(r"data path \(part 1, baseline\) .* training step: ", text)
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
    model = results["model"]
    for part in ("train", "eval"):
        r = model[part]
        assert r["ratio"] == pytest.approx(r["pipeline"]["images_per_s"] / r["study"]["images_per_s"])
        # fp32 and bf16 measured in the same run, side by side (on the CPU bf16 runs even where emulated)
        assert (r["fp32"]["precision"], r["bf16"]["precision"]) == ("fp32", "bf16")
        assert r["bf16_vs_fp32"] == pytest.approx(r["bf16"]["images_per_s"] / r["fp32"]["images_per_s"])
    # --train-batch: both sides' training steps at that batch (evaluation keeps its own)
    assert {model["train"][side]["batch"] for side in ("study", "fp32", "bf16")} == {2}
    assert {model["train"][side]["images"] for side in ("study", "fp32", "bf16")} == {2}
    # the pipeline row is what the stages run: training in train.amp's precision here, evaluation in fp32
    assert model["train"]["pipeline"] == model["train"][model["stage_precision"]]
    assert model["eval"]["pipeline"] == model["eval"]["fp32"]
    assert (model["stage_precision"] == "bf16") == ("bf16 mixed" in model["runtime"])
    assert set(results["prepare"]["seconds"]) == {"download", "split", "prepare", "preprocess"}
    assert results["prepare"]["counts"] == {"Healthy": 33, "TB": 7}
    assert results["memory"]["peak_rss_gib"] > 0 and results["memory"]["train_images"] == 33
    assert "repro" not in results  # skipped
    assert not list(folder.glob("tbcxr-bench-*"))  # temporary projects removed


def test_pipeline_side_is_the_train_stage_run(tmp_path, monkeypatch):
    """The benchmark once built its own model, loss and optimiser and missed params that change what
    trains; now head, freezing, class weights and the optimiser all follow params."""
    import torch

    from benchmarks.pipeline_run import Pipeline, first_epoch_net
    from cxrlab.data.synthetic import make_dataset
    from stages import download, prepare, preprocess, split

    project = copy_project(tmp_path / "project")
    set_params(project / "params.yaml", {
        **TINY, "data.source": str(make_dataset(tmp_path / "source", n_per_class=10, size=32)),
        "train.head_hidden": [16], "train.freeze": "head_only", "train.class_weights": {"Healthy": 1.0, "TB": 3.0},
        "train.optimizer": "sgd", "train.scheduler": "step"})
    monkeypatch.chdir(project)
    for stage in (download, split, prepare, preprocess):  # in this process: seconds, not a torch import each
        stage.main([])
    monkeypatch.chdir(tmp_path)  # the benchmark runs from elsewhere: the project's folder must not matter
    pipe = Pipeline(project, "cpu")
    cfg = pipe.params.variant("baseline")
    rt = pipe.runtime(cfg)
    run = pipe.build(cfg, rt, cfg.seeds[0])
    net, trainable = first_epoch_net(run, cfg, rt)
    assert trainable == 512 * 16 + 16 + 16 * 2 + 2  # only the MLP head of resnet18 trains
    assert trainable == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert isinstance(run.optimizer, torch.optim.SGD) and run.scheduler is not None
    assert run.loss_fn.ce.weight.tolist() == [1.0, 3.0]
    assert run.image_size == 32 and len(run.loader.dataset) == len(pipe.fit)
