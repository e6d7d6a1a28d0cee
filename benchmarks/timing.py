"""Clocks, progress lines and the machine's description, shared by the measurements."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import platform
import time
from typing import Callable, Iterable, Iterator

import torch

GIB = 1024 ** 3


class Progress:
    """Progress lines with the time since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)


def quiet():
    """Hide the progress bars the pipeline's loops draw on stderr (they would garble the table)."""
    return contextlib.redirect_stderr(io.StringIO())


class Limited:
    """The first `batches` batches of a loader, with a length (what train_one_epoch and predict need)."""

    def __init__(self, loader, batches: int):
        self.loader = loader
        self.batches = max(0, min(int(batches), len(loader)))

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.batches)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def endless(loader, set_epoch: Callable | None = None) -> Iterator:
    """Batches of `loader`, epoch after epoch."""
    for epoch in itertools.count(1):
        if set_epoch is not None:
            set_epoch(loader, epoch)
        yield from loader


def throughput(batches: Iterable, handle: Callable[[object], int], seconds: float, device: torch.device) -> dict:
    """Images/s of `handle(batch)` over `batches` for about `seconds`, after one warm-up batch."""
    batches = iter(batches)
    handle(next(batches))
    sync(device)
    images, count, start = 0, 0, time.perf_counter()
    for batch in batches:
        images += handle(batch)
        count += 1
        if time.perf_counter() - start >= seconds:
            break
    sync(device)
    elapsed = time.perf_counter() - start
    return {"images": images, "batches": count, "seconds": elapsed, "images_per_s": images / elapsed}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine(device: torch.device, threads: int) -> dict:
    """What the numbers were measured on: they mean little without it."""
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
        if hasattr(os, "sysconf") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": threads,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": load_average(),
    }
