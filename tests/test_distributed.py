"""Data-parallel training chosen by params: `runtime.processes: 2` launches torchrun,
two CPU processes with the gloo backend, and writes what one process writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from cxrlab.errors import UserError
from cxrlab.training.runtime import torchrun_command
from tests.conftest import prepared_project, run, set_params


def test_one_process_needs_no_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert torchrun_command(1, 1, None, "stages.train", ["baseline"]) is None
    if not torch.cuda.is_available():
        assert torchrun_command("auto", 1, None, "stages.train", ["baseline"]) is None  # one per GPU: none


def test_launch_commands(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    one_machine = torchrun_command(4, 1, None, "stages.train", ["dropout"])
    assert one_machine == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone",
                           "-m", "stages.train", "dropout"]
    monkeypatch.setenv("NODE_RANK", "1")
    two_machines = torchrun_command(8, 2, "node0:29400", "stages.train", ["dropout"])
    assert two_machines[3:8] == ["--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--master-addr=node0",
                                 "--master-port=29400"]
    monkeypatch.delenv("NODE_RANK")
    with pytest.raises(UserError, match="set NODE_RANK on each machine, 0 on the rendezvous host node0"):
        torchrun_command(8, 2, "node0:29400", "stages.train", ["dropout"])
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a torchrun worker: never launch again
    assert torchrun_command(4, 1, None, "stages.train", ["dropout"]) is None


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for sub in ("models", "metrics") for p in (root / sub).rglob("*")}


def keys(value, prefix=""):
    if isinstance(value, dict):
        return {k for key, v in value.items() for k in keys(v, f"{prefix}{key}.")} | {prefix}
    return {prefix}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_project(tmp_path_factory.mktemp("ddp"), **{"train.log_test_curve": False})


@pytest.mark.slow
def test_two_cpu_processes_train_and_write_what_one_process_writes(prepared):
    project = prepared
    one = run([sys.executable, "-m", "stages.train", "baseline"], cwd=project).stdout
    assert "x 2 processes" not in one
    one_files = tree(project)
    one_summary = json.loads((project / "metrics/train/baseline/report.json").read_text())

    # the same train.batch_size (8) split over 2 processes: a runtime knob, so the same results
    set_params(project / "params.yaml", {"runtime.processes": 2})
    two = run([sys.executable, "-m", "stages.train", "baseline"], cwd=project)
    log = two.stdout + two.stderr
    assert "--nproc-per-node=2 --standalone" in log
    assert "rank 0/2" in log and "batch 8 (4 per process x 2 processes)" in log
    assert log.count("best epoch") == 1  # only rank 0 reports and writes

    assert tree(project) == one_files
    two_summary = json.loads((project / "metrics/train/baseline/report.json").read_text())
    assert keys(two_summary) == keys(one_summary)
    for which in ("best", "last"):
        ckpt = torch.load(project / "models/baseline/seed_42" / f"{which}.pt", weights_only=True)
        assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped from DDP
    run([sys.executable, "-m", "stages.evaluate", "baseline"], cwd=project)  # loads like any checkpoint
    assert json.loads((project / "metrics/evaluate/baseline/report.json").read_text())["best"]["n"] == 8

