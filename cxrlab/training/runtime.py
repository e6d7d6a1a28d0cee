"""Where and how the model runs: device, precision, memory format, processes.

`runtime.device: auto` picks CUDA, then Apple MPS, then the CPU. On CUDA the
defaults add mixed precision (bf16 where the GPU supports it, else fp16 with
a gradient scaler), channels_last and cuDNN autotuning; on the CPU,
channels_last too (oneDNN's NHWC kernels are faster) and bf16 autocast where
the CPU computes bf16 natively (AMX or AVX-512-BF16, as oneDNN reports it:
about 2.7x faster for ResNet-50, docs/benchmarks.md), fp32 elsewhere.
Master weights, losses and optimiser state stay fp32 in every case. Under `torchrun`
(WORLD_SIZE > 1) each process drives one GPU (or CPU with the gloo backend),
and only rank 0 writes files and logs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from cxrlab.errors import UserError


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    rank: int = 0
    world_size: int = 1
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)
    amp_asked: bool = False  # train.amp, to say why a CPU run is fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def precision(self) -> str:
        """The training step's precision in words, as the run's header gives it."""
        if self.amp_dtype is None:
            if self.device.type == "cpu" and self.amp_asked and not cpu_bf16_native():
                return "fp32: this CPU has no native bf16"
            return "fp32"
        name = {torch.bfloat16: "bf16 mixed", torch.float16: "fp16 mixed"}[self.amp_dtype]
        return f"{name} ({cpu_bf16_unit()})" if self.device.type == "cpu" else name

    def describe(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        parts = [name, self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if self.distributed:
            parts.append(f"rank {self.rank}/{self.world_size}")
        return ", ".join(parts)


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 in hardware, so that bf16 autocast is faster than fp32.

    oneDNN's own check (`_is_mkldnn_bf16_supported`) also says yes on plain
    AVX-512 x86 CPUs, where it emulates bf16 (slower than fp32), so on x86 the
    instructions must be there too: AMX tiles (Sapphire Rapids and later) or
    AVX-512-BF16. On ARM, oneDNN's check already asks for the BF16 extension.
    """
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return True


def cpu_bf16_unit() -> str:
    """What runs bf16 on this CPU, for the header."""
    if torch.cpu._is_amx_tile_supported():
        return "CPU AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "CPU AVX-512-BF16"
    return "CPU"


def inference_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of inference for `runtime.inference_precision` (None: fp32).

    `auto` is bf16 where the device computes it natively (faster; probabilities
    within 0.01 of fp32, tests/test_predict.py), fp32 elsewhere; `bf16` asks
    for it anyway (emulated, slower, on CPUs without it). Callers that score
    for the record (evaluate, ensembles, the explain stage) never use this.
    """
    if choice == "fp32":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16_native():
        return torch.bfloat16
    return None


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA, then MPS, then CPU; an explicit device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:  # torch's own message is a traceback-worthy "Expected one of cpu, cuda, ..." list
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {spec!r} (--device or runtime.device); use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"runtime.device is {spec!r} but no CUDA GPU is visible; set runtime.device: auto or cpu")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise UserError(f"runtime.device is {spec!r} but only {torch.cuda.device_count()} GPUs are visible")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("runtime.device is 'mps' but Apple MPS is not available; set runtime.device: auto or cpu")
    return device


def setup(device: str, amp: bool, channels_last: bool, deterministic: bool | str = "auto") -> Runtime:
    """Choose the device and precision; join the process group under torchrun.

    `deterministic: auto` means deterministic on the CPU (free there) and
    autotuned on a GPU (faster, with run-to-run differences in the last bits).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    rt = Runtime(device=dev, rank=rank, world_size=world_size)
    if deterministic == "auto":
        deterministic = dev.type == "cpu"
    if dev.type == "cuda":
        if amp:
            rt.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
    elif dev.type == "mps" and amp:
        rt.amp_dtype = torch.float16
    elif dev.type == "cpu" and amp and cpu_bf16_native():
        rt.amp_dtype = torch.bfloat16  # no gradient scaler: bf16 has fp32's exponent range
    rt.amp_asked = amp
    # NHWC convolutions: faster with cuDNN's tensor cores and with oneDNN on the CPU
    rt.channels_last = channels_last and dev.type in ("cuda", "cpu")
    if rt.amp_dtype == torch.float16:
        rt.scaler = torch.amp.GradScaler(dev.type)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if dev.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
    return rt


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_command(processes: int | str, nodes: int, rendezvous: str | None, module: str,
                     args: list[str]) -> list[str] | None:
    """The `torchrun` command that runs `python -m module args` data-parallel, or None
    when one process is asked for (or this already is a torchrun worker).

    `processes: auto` is one per visible CUDA GPU. One machine uses torchrun's
    standalone rendezvous. Several machines meet at `rendezvous` (host:port of
    the machine with NODE_RANK=0, which then holds global rank 0 and writes the
    outputs); each machine says which it is in the NODE_RANK environment variable.
    """
    if under_torchrun():
        return None
    if processes == "auto":
        processes = max(1, torch.cuda.device_count())
    if processes == 1 and nodes == 1:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        node_rank = os.environ.get("NODE_RANK", "")
        if not node_rank.isdigit() or int(node_rank) >= nodes:
            raise UserError(f"runtime.nodes is {nodes}: set NODE_RANK on each machine, 0 on the rendezvous host "
                            f"{rendezvous.rsplit(':', 1)[0]} and 1..{nodes - 1} on the others "
                            f"(got {node_rank or 'nothing'})")
        host, port = rendezvous.rsplit(":", 1)
        cmd += [f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--master-addr={host}", f"--master-port={port}"]
    return cmd + ["-m", module, *args]


def seed_all(*seed: int) -> None:
    """Seed Python, NumPy and torch from a tuple (e.g. run seed, epoch)."""
    value = int(np.random.SeedSequence(list(seed)).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, rt: Runtime, compile_model: bool) -> torch.nn.Module:
    """The module the training step calls: DDP over the model when distributed, compiled if asked."""
    net = model
    if rt.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return torch.compile(net) if compile_model else net


def agree(value, rt: Runtime):
    """Rank 0's `value` (any picklable object), given to every process."""
    if not rt.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def agree_to_stop(stop: bool, rt: Runtime) -> bool:
    """Rank 0's decision, given to every process (all must leave the loop together)."""
    if not rt.distributed:
        return stop
    flag = torch.tensor([int(stop)], device=rt.device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())
