"""Mixed precision on the CPU: bf16 autocast exactly where the CPU computes bf16 natively (forced on and
off here, whatever this machine has), fp32 master weights, losses and optimiser state; inference precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cxrlab.training.runtime as runtime
from cxrlab.config.load import load_params
from cxrlab.data.datasets import LoaderSettings
from cxrlab.model.losses import StudyLoss
from cxrlab.training.build import Splits, make_loaders
from cxrlab.training.engine import train_one_epoch
from cxrlab.training.runtime import inference_dtype, setup
from tests.conftest import ROOT
from tests.test_models import MEAN, STD, tiny_split


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Force the CPU's answer: `cpu_bf16(True)` makes this machine one with native bf16, `(False)` one without."""
    def force(native: bool) -> None:
        monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: native)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield force
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])  # setup() switches it on for the CPU


def test_train_amp_is_bf16_only_where_the_cpu_has_it(cpu_bf16):
    cpu_bf16(True)
    rt = setup("cpu", amp=True, channels_last=True)
    assert rt.amp_dtype == torch.bfloat16 and rt.scaler is None  # bf16 needs no gradient scaler
    assert rt.describe().startswith("cpu, bf16 mixed (CPU") and "channels_last" in rt.describe()
    assert setup("cpu", amp=False, channels_last=True).amp_dtype is None  # train.amp: false is fp32 anywhere

    cpu_bf16(False)
    rt = setup("cpu", amp=True, channels_last=True)
    assert rt.amp_dtype is None and rt.scaler is None
    assert rt.describe() == "cpu, fp32: this CPU has no native bf16, channels_last"
    assert setup("cpu", amp=False, channels_last=False).describe() == "cpu, fp32"


def test_emulated_bf16_is_not_native(monkeypatch):
    """oneDNN also says yes on plain AVX-512 x86 CPUs, where it emulates bf16 (slower than fp32)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for amx, avx512_bf16, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        runtime.cpu_bf16_native.cache_clear()
        try:
            assert runtime.cpu_bf16_native() is native, (amx, avx512_bf16)
        finally:
            runtime.cpu_bf16_native.cache_clear()


def test_inference_precision(cpu_bf16):
    cpu = torch.device("cpu")
    cpu_bf16(True)
    assert inference_dtype("auto", cpu) == torch.bfloat16
    assert inference_dtype("fp32", cpu) is None
    cpu_bf16(False)
    assert inference_dtype("auto", cpu) is None
    assert inference_dtype("bf16", cpu) == torch.bfloat16  # asked for: emulated, but honoured


def test_a_bf16_step_keeps_weights_loss_and_optimiser_state_in_fp32(cpu_bf16):
    cpu_bf16(True)
    rt = setup("cpu", amp=True, channels_last=True)
    split = tiny_split(n=16, size=16)
    cfg = load_params(ROOT / "params.yaml").variant("baseline")
    weights = {}
    for dtype in (torch.bfloat16, None):
        rt.amp_dtype = dtype
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 2)).to(memory_format=torch.channels_last)
        loss_fn = StudyLoss(model, 0.0)
        seen = []
        loss_fn.terms = lambda logits, y, terms=loss_fn.terms, seen=seen: seen.append(logits.dtype) or terms(logits, y)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = make_loaders(cfg, Splits(split, split, split), rt, 0, LoaderSettings())[0]
        stats = train_one_epoch(model, loader, optimizer, loss_fn, rt, MEAN, STD, 2)
        assert seen and set(seen) == {torch.float32}  # the loss sees fp32 logits
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for s in optimizer.state.values() for k, v in s.items() if k != "step")
        assert torch.isfinite(torch.tensor(stats["loss"]))
        weights[dtype] = [p.detach().clone() for p in model.parameters()]
    bf16, fp32 = weights[torch.bfloat16], weights[None]
    assert any(not torch.equal(a, b) for a, b in zip(bf16, fp32))  # bf16 did compute the step
    assert max((a - b).abs().max().item() for a, b in zip(bf16, fp32)) < 0.01  # and close to fp32's
