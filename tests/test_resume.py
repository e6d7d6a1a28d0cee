"""A killed training run leaves no output DVC could take as complete, and
`runtime.resume: true` continues it to exactly the result of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import env, prepared_project, run, set_params

pytestmark = pytest.mark.slow  # every test trains (the module's project)

VARIANT = "contrast"  # augments in loader workers: the hardest case to repeat

# The train stage with bf16 autocast on the CPU whether or not this CPU has it natively (emulated
# bf16 is slow but computes the same way): the resume guarantee must hold in the precision
# `train.amp: true` gives on AMX or AVX-512-BF16 machines, and this test runs on any CI machine.
TRAIN_BF16 = [sys.executable, "-c", """
import runpy, sys
import cxrlab.training.runtime as runtime
runtime.cpu_bf16_native = lambda: True
sys.argv = ["stages.train", sys.argv[1]]
runpy.run_module("stages.train", run_name="__main__")
""", VARIANT]


def outputs(project: Path) -> dict:
    """Weights of both checkpoints, the summary, and every logged curve but speed and time."""
    seed_dir = project / "models" / VARIANT / "seed_42"
    result = {which: torch.load(seed_dir / f"{which}.pt", weights_only=True) for which in ("best", "last")}
    result["summary"] = json.loads((project / "metrics/train" / VARIANT / "report.json").read_text())
    curves = {}
    for tsv in sorted((project / "metrics/train" / VARIANT / "seeds/seed_42/plots/metrics").rglob("*.tsv")):
        if tsv.name != "images_per_s.tsv":
            with open(tsv) as f:
                curves[tsv.name + str(tsv.parent.name)] = [(r["step"], r[tsv.stem])
                                                           for r in csv.DictReader(f, delimiter="\t")]
    result["curves"] = curves
    return result


def assert_same(a: dict, b: dict) -> None:
    for which in ("best", "last"):
        assert a[which]["epoch"] == b[which]["epoch"]
        assert all(torch.equal(a[which]["model"][k], b[which]["model"][k]) for k in a[which]["model"]), which
    assert a["summary"] == b["summary"]
    assert a["curves"] == b["curves"]


def kill_during_epoch(project: Path, epoch: int) -> None:
    """Start training and SIGKILL it once epoch `epoch` has begun."""
    proc = subprocess.Popen(TRAIN_BF16, cwd=project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"epoch {epoch - 1}/" in line and "ETA" in line:  # the previous epoch is complete
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-2000:]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return prepared_project(tmp_path_factory.mktemp("resume"), **{"train.epochs": 3, "runtime.num_workers": 2})


def test_kill_then_resume_equals_an_uninterrupted_run(project):
    """In bf16 mixed precision on the CPU (train.amp: true), as on an AMX machine."""
    log = run(TRAIN_BF16, cwd=project).stdout
    assert "on cpu, bf16 mixed (CPU" in log
    uninterrupted = outputs(project)
    for folder in ("models", "metrics/train"):
        run(["rm", "-rf", f"{folder}/{VARIANT}"], cwd=project)

    kill_during_epoch(project, 3)
    # nothing that looks like a result: the run lives in .train-state until it completes
    assert not (project / "models" / VARIANT).exists()
    assert not (project / "metrics/train" / VARIANT / "metrics.json").exists()
    state = project / ".train-state" / VARIANT / "seed_42"
    assert torch.load(state / "resume.pt", weights_only=True)["epoch"] == 2
    assert not (state / "last.pt").exists()  # published checkpoints are written only on completion

    set_params(project / "params.yaml", {"runtime.resume": True})
    log = run(TRAIN_BF16, cwd=project).stdout
    assert "resuming after epoch 2" in log and "epoch 1/3" not in log and "bf16 mixed" in log
    assert_same(outputs(project), uninterrupted)
    assert not (project / ".train-state").exists()  # the resume file goes when the run completes


def test_published_checkpoints_hold_weights_and_metadata_only(project):
    """The optimiser and schedule state needed to resume never reach models/ (Adam's doubles the size)."""
    for which in ("best", "last"):
        ckpt = torch.load(project / "models" / VARIANT / "seed_42" / f"{which}.pt", weights_only=True)
        assert set(ckpt) == {"format", "arch", "dropout", "head_hidden", "keep_imagenet_head", "classes",
                             "image_size", "mean", "std", "variant", "seed", "fold", "epoch", "metrics",
                             "model"}, which
        assert ckpt["fold"] is None  # data.folds: null (tests/test_folds.py covers k folds)
        assert ckpt["epoch"] == (3 if which == "last" else ckpt["metrics"]["epoch"])


def test_resume_refuses_a_run_made_with_other_settings(project):
    set_params(project / "params.yaml", {"runtime.resume": False})
    kill_during_epoch(project, 2)
    set_params(project / "params.yaml", {"runtime.resume": True, "train.epochs": 1})  # another run
    log = run([sys.executable, "-m", "stages.train", VARIANT], cwd=project).stdout
    assert "used other settings or data; starting afresh" in log and "epoch 1/1" in log


EDIT_PARAMS_MID_RUN = """
import runpy, sys
from pathlib import Path
import cxrlab.training.loop as loop

train_epoch = loop.train_epoch

def train_epoch_then_edit(*args, **kwargs):
    # what a second `dvc exp run -S train.lr=0.0003` in this workspace does while this stage trains
    result = train_epoch(*args, **kwargs)
    params = Path("params.yaml")
    params.write_text(params.read_text().replace("lr: 0.0001", "lr: 0.0003", 1))
    return result

loop.train_epoch = train_epoch_then_edit
sys.argv = ["stages.train", "baseline"]
runpy.run_module("stages.train", run_name="__main__")
"""


def test_a_stage_whose_params_change_while_it_runs_records_nothing(project):
    params = project / "params.yaml"
    before = params.read_text()
    assert "lr: 0.0001" in before
    try:
        proc = run([sys.executable, "-c", EDIT_PARAMS_MID_RUN], cwd=project, check=False)
    finally:
        params.write_text(before)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: train: params.yaml changed while train@baseline ran (train.lr)")
    assert "dvc exp run --queue" in error
    assert "train baseline seed 42:" in proc.stdout and "ETA" not in proc.stdout  # stopped at epoch 1's first write
    assert not (project / "models/baseline").exists()
    assert not (project / "metrics/train/baseline").exists()


def test_resume_keeps_a_seed_that_finished_before_the_interruption(project, monkeypatch, capsys):
    """Interrupted while its second seed trains, the stage resumed trains only that seed: the first one's
    checkpoints stay the very files it published, and the summary still holds both. (In process, to spare two
    Python starts: an exception leaves what a kill leaves, as test_kill_then_resume... shows with a kill.)"""
    import cxrlab.training.loop as loop
    from stages import train

    set_params(project / "params.yaml", {"runtime.resume": False, "runtime.num_workers": 0, "train.epochs": 1,
                                         "train.seeds": [42, 43]})
    monkeypatch.chdir(project)
    train_run = loop.train_run

    def interrupted_at_seed_43(variant, cfg, seed, *args, **kwargs):
        if seed == 43:
            raise KeyboardInterrupt  # seed 42 is published, seed 43 starts
        return train_run(variant, cfg, seed, *args, **kwargs)

    monkeypatch.setattr(loop, "train_run", interrupted_at_seed_43)
    with pytest.raises(KeyboardInterrupt):
        train.main([VARIANT])
    first = project / "models" / VARIANT / "seed_42" / "best.pt"
    published = first.stat()
    assert not (project / "models" / VARIANT / "seed_43").exists()

    monkeypatch.setattr(loop, "train_run", train_run)
    set_params(project / "params.yaml", {"runtime.resume": True})
    capsys.readouterr()
    train.main([VARIANT])
    log = capsys.readouterr().out
    assert f"train {VARIANT} seed 42: finished before the interruption" in log, log
    assert f"{VARIANT} seed 42 epoch" not in log and f"{VARIANT} seed 43 epoch 1/1" in log, log
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (published.st_ino, published.st_mtime_ns)
    report = json.loads((project / "metrics/train" / VARIANT / "report.json").read_text())
    assert set(report["seeds"]) == {"seed_42", "seed_43"} and report["seeds"]["seed_42"]["epochs_trained"] == 1
    assert not (project / ".train-state" / VARIANT).exists()  # the records of finished runs go with the stage
    set_params(project / "params.yaml", {"train.seeds": [42], "runtime.num_workers": 2})
