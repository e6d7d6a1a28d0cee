"""4. Peak RSS of training on the CPU, measured in a child process.

`stages.train` cannot stop after K steps, so a child process, started in a
prepared project, builds the run as the train stage does, reads every page of
the memory-mapped arrays (what the first epoch's passes leave resident),
trains a few steps and predicts one validation batch, reporting its memory
after each phase. A forked child's `ru_maxrss` starts at its parent's peak
(Linux carries the high-water mark over fork and exec), and the benchmark
process is large by then, so a small launcher starts the child and reports
the child's own `ru_maxrss` from `os.wait4`.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from benchmarks.fixtures import ROOT, env

CHILD = ("import sys; sys.path.append({root!r}); from benchmarks.memory import memory_child; "
         "memory_child(sys.argv[1:])")
LAUNCHER = ("import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
            "_, status, usage = os.wait4(p.pid, 0); "
            "print('BENCH ' + json.dumps({'phase': 'exit', 'wait4_maxrss_kib': usage.ru_maxrss, "
            "'returncode': os.waitstatus_to_exitcode(status)}), flush=True)")


def _rss_now() -> dict:
    """In KiB: this process's peak resident set (VmHWM) and what is resident now, anonymous
    (heap, tensors) and file-backed (shared libraries, memory-mapped arrays)."""
    now = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "RssAnon:", "RssFile:")):
                    now[line.split(":")[0].lower()] = int(line.split()[1])
    except OSError:
        pass
    return now


def _report(phase: str, **extra) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print("BENCH " + json.dumps({"phase": phase, "maxrss_kib": peak, **_rss_now(), **extra}), flush=True)


def memory_child(argv: list[str]) -> None:
    """In the project folder: what `python -m stages.train <variant>` does on the CPU, in the state of
    its second epoch (every page of the prepared arrays read), for `steps` steps and one validation batch."""
    variant, steps, threads = argv[0], int(argv[1]), int(argv[2])
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from benchmarks.pipeline_run import Pipeline, first_epoch_net
    from benchmarks.timing import Limited
    from cxrlab.data.datasets import set_epoch
    from cxrlab.training.engine import predict, train_one_epoch
    from cxrlab.training.runtime import seed_all

    _report("imports")
    pipe = Pipeline(Path.cwd(), "cpu")
    cfg, data = pipe.params.variant(variant), pipe.params.data
    rt = pipe.runtime(cfg)
    seed = cfg.seeds[0]
    run = pipe.build(cfg, rt, seed)
    net, _ = first_epoch_net(run, cfg, rt)
    _report("setup", fit=len(pipe.fit), val=len(pipe.val), test=len(pipe.test), workers=run.loader.num_workers)
    # After the first epoch, its training, validation and test passes have read every page of the
    # memory-mapped arrays: resident (file-backed) from then on, so read them all first.
    touched = 0
    for array in (pipe.train_split.images, pipe.test.images):
        for i in range(0, len(array), 256):
            chunk = np.asarray(array[i:i + 256])
            chunk.max()
            touched += chunk.nbytes
    _report("pages", bytes=touched)
    seed_all(seed, 1)
    set_epoch(run.loader, 1)
    train_one_epoch(net, Limited(run.loader, steps), run.optimizer, run.loss_fn, rt, data.mean, data.std,
                    len(run.classes), cfg.accumulate_steps, desc="memory")
    _report("train", steps=min(steps, len(run.loader)), batch=cfg.batch_size)
    if run.val_loader is not None:
        predict(run.model, Limited(run.val_loader, 1), rt, data.mean, data.std)
        _report("val_batch", batch=run.val_loader.batch_size)


def measure_memory(project: Path, args, log: Callable[[str], None]) -> dict:
    """Run `memory_child` in `project` through the launcher; its peak RSS and its memory after each phase."""
    command = [sys.executable, "-c", LAUNCHER, sys.executable, "-c", CHILD.format(root=str(ROOT)), "baseline",
               str(args.memory_steps), str(args.threads)]
    phases, exit_ = {}, None
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(command, cwd=project, env=env(), stdout=subprocess.PIPE, stderr=errors, text=True)
        for line in proc.stdout:
            if not line.startswith("BENCH "):
                continue
            p = json.loads(line[len("BENCH "):])
            if p["phase"] == "exit":
                exit_ = p
                continue
            p["peak_gib"] = p.get("vmhwm", p["maxrss_kib"]) / 2 ** 20
            phases[p["phase"]] = p
            log(f"memory: after {p['phase']}: peak RSS {p['peak_gib']:.2f} GiB")
        proc.wait()
        if proc.returncode != 0 or exit_ is None or exit_["returncode"] != 0:
            errors.seek(0)
            raise RuntimeError("the memory benchmark's child process failed:\n" + errors.read()[-4000:])
    return {"peak_rss_gib": exit_["wait4_maxrss_kib"] / 2 ** 20, "phases": phases}
