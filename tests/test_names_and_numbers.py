"""Names that would escape the project and numbers that are not numbers (issue 26): class names refused at
params load (or at the split with `auto`), NaN/inf refused in every float param, a diverging run stopped
at once in one line, a last batch of one image dropped under batch norm, --device banana one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cxrlab.config.load import load_params
from cxrlab.data.datasets import LoaderSettings, Split
from cxrlab.data.synthetic import make_dataset
from cxrlab.errors import UserError
from cxrlab.training.build import Splits, make_loaders
from cxrlab.training.engine import train_one_epoch
from cxrlab.training.runtime import setup
from stages import split
from tests.conftest import ROOT, set_params
from tests.test_config import error_for, params_file  # noqa: F401 - the fixture


@pytest.mark.parametrize("classes, named", [
    ({"Healthy": "health", "../up": "tb"}, "class name '../up' holds a path separator"),
    ({"Healthy": "health", "..": "tb"}, "class name '..' is '..', which names a folder"),
    ({"Healthy": "health", "a\\b": "tb"}, "class name 'a\\\\b' holds a path separator"),
    ({"Healthy": "health", "T\nB": "tb"}, "class name 'T\\nB' holds a control character"),
    ({"Healthy": "health", " ": "tb"}, "class name ' ' is empty"),
    ({"Healthy": "health", "T" * 256: "tb"}, "is longer than a file name can be (255 bytes)"),
    ({"Healthy": "health", "TB": "imgs/../../tb"}, "folder name '..' is '..'"),
    (["health", "../../tb"], "folder name '..' is '..'"),
    (["health", "t\x00b"], "folder name 't\\x00b' holds a control character"),
])
def test_class_names_that_are_not_one_plain_folder_are_refused_at_load(params_file, classes, named):  # noqa: F811
    positive = "TB" if isinstance(classes, dict) else "health"
    message = error_for(params_file, {"data.classes": classes, "data.positive_class": positive})
    assert message.count("\n") == 0 and "params.yaml: data.classes: " in message and named in message


def test_auto_refuses_a_class_folder_named_with_a_control_character(in_project):
    raw = in_project / "data" / "raw"
    make_dataset(raw, n_per_class=5, size=32, subdir="")
    (raw / "tb").rename(raw / "t\x1bb")
    set_params(in_project / "params.yaml", {"data.classes": "auto", "data.positive_class": "health"})
    with pytest.raises(UserError, match=r"data.classes: auto: the class folder '.*t\\x1bb' cannot be a class: "
                                        r"its name holds a control character; rename the folder"):
        split.main([])
    assert not (in_project / "data" / "split").exists() and not (in_project / "data" / "dataset").exists()


def test_nan_and_inf_are_refused_in_every_float(params_file):  # noqa: F811
    message = error_for(params_file, {"data.mean": [0.5, math.nan, 0.5], "data.std": [math.inf, 0.2, 0.2],
                                      "data.max_unpacked_gb": math.nan, "train.weight_decay": math.inf,
                                      "stats.alpha": math.nan})
    for key in ("data.mean.1", "data.std.0", "data.max_unpacked_gb", "stats.alpha"):
        assert f"params.yaml: {key}: Input should be a finite number" in message, message
    params_file.write_text((ROOT / "params.yaml").read_text())  # each case on its own
    message = error_for(params_file, {"train.weight_decay": math.inf})
    assert "params.yaml: train.weight_decay: Input should be a finite number (got inf)" in message
    params_file.write_text((ROOT / "params.yaml").read_text())
    message = error_for(params_file, {"train.augment": {"RandomRotation": {"degrees": [0, math.nan]}}})
    assert "train.augment: RandomRotation: every number must be finite, not nan or inf" in message


def _batches(n: int, size: int = 8, batch: int = 4) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=g),
             torch.tensor([0, 1] * (batch // 2))) for _ in range(n)]


def test_a_diverging_loss_stops_the_run_at_once_in_one_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e30)
    rt = setup("cpu", amp=False, channels_last=False)
    batches = _batches(20)
    seen = []
    loader = _Counting(batches, seen)
    with pytest.raises(UserError) as err:
        train_one_epoch(model, loader, optimizer, nn.CrossEntropyLoss(), rt, [0.5] * 3, [0.25] * 3, 2,
                        desc="train baseline seed 42 epoch 1/20")
    message = str(err.value)
    assert "\n" not in message and message.startswith("train baseline seed 42 epoch 1/20: the training loss became ")
    assert "at lr 1e+30" in message and "Try a lower train.lr (e.g. 1e+29)" in message
    assert len(seen) < len(batches)  # stopped at once, not at the end of the epoch


class _Counting:
    """A loader that counts the batches taken from it."""

    def __init__(self, batches: list, seen: list):
        self.batches, self.seen = batches, seen

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.seen.append(b)
            yield b


def _split(n: int) -> Split:
    return Split(np.zeros((n, 1, 8, 8), dtype=np.uint8), np.arange(n) % 2,
                 [{"subset": "train"}] * n, ["Healthy", "TB"])


@pytest.mark.parametrize("n", [9, 13, 10, 8])
def test_a_last_training_batch_of_one_is_dropped_under_batch_norm(n):
    cfg = load_params(ROOT / "params.yaml").variant("baseline")  # resnet50, batch 4: batch norm
    rt = setup("cpu", amp=False, channels_last=False)
    loader, _, _ = make_loaders(cfg, Splits(_split(n), _split(0), _split(0)), rt, 0, LoaderSettings())
    sizes = [len(y) for _, y in loader]
    if n % 4 == 1:
        assert sizes == [4] * (n // 4)  # the one left over waits for another epoch's order
    else:
        assert len(sizes) == -(-n // 4) and sum(sizes) == n


@pytest.mark.parametrize("device", ["banana", "cuda:x", "meta"])
def test_an_unknown_device_is_one_line(device):
    with pytest.raises(UserError, match=rf"unknown device '{device}' \(--device or runtime.device\); use auto, cpu"):
        setup(device, amp=False, channels_last=False)
