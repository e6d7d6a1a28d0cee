"""SIGTERM is handled like Ctrl-C in every stage (`cxrlab.errors.run_stage`): worker processes ended,
temporary folders removed, one line, exit 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cxrlab.data.synthetic import make_dataset
from stages import download, prepare, split
from tests.conftest import TINY, env, set_params

# preprocess with every image decode stuck for a minute (Pillow's open patched before the stage is
# imported; the forked pool workers inherit the patch): the stage is surely mid-work when the signal comes
STUCK_PREPROCESS = (
    "import runpy, time, PIL.Image as I; real = I.open\n"
    "I.open = lambda *a, **k: (time.sleep(60), real(*a, **k))[1]\n"
    "runpy.run_module('stages.preprocess', run_name='__main__', alter_sys=True)\n"
)


def children(pid: int) -> set[int]:
    pids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_sigterm_during_preprocess_ends_the_workers_and_removes_the_temporary_folder(in_project, tmp_path):
    source = make_dataset(tmp_path / "source", n_per_class=10, size=32)
    set_params(in_project / "params.yaml", {**TINY, "data.source": str(source)})
    for stage in (download, split, prepare):
        stage.main([])
    proc = subprocess.Popen([sys.executable, "-c", STUCK_PREPROCESS], cwd=in_project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, workers = time.monotonic() + 60, set()
        while time.monotonic() < deadline and proc.poll() is None:
            workers = children(proc.pid)
            if workers and list((in_project / "data").glob("prepared.tmp-*")):
                break
            time.sleep(0.05)
        assert workers, f"preprocess started no workers: {proc.communicate()}"
        time.sleep(0.3)  # the workers are inside the stuck decode by now
        proc.send_signal(signal.SIGTERM)  # to the stage alone, as `kill <pid>` or a scheduler does
        _, err = proc.communicate(timeout=20)
    finally:  # on a failure, leave nothing running
        for pid in [proc.pid, *workers]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == (
        "error: preprocess: terminated (SIGTERM); nothing was recorded as complete"), err
    assert "Traceback" not in err
    assert [pid for pid in workers if running(pid)] == []  # no orphaned pool worker
    leftovers = [p.name for p in (in_project / "data").iterdir() if ".tmp-" in p.name or p.name == "prepared"]
    assert leftovers == []
