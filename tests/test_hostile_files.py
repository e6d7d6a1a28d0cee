"""Hostile images, checkpoints and output folders (archives and source folders: test_hostile.py):
nothing is silently wrong, nothing half-written. Every case is built here."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cxrlab.data.images import check_image, load_rgb
from cxrlab.data.synthetic import make_dataset
from cxrlab.errors import UserError
from cxrlab.serving.predict import decode
from stages import split
from tests.conftest import run, set_params, stage, written
from tests.test_cli_errors import assert_user_error

LIMITS = {"max_pixels": 50_000_000, "min_side": 32}  # params.yaml's


# -------------------------------------------------------------------- images
def png(path: Path, pixels: np.ndarray, sbit: int | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    if sbit:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(pixels).save(path, pnginfo=info)
    return path


def ramp(top: int, size: int = 64) -> np.ndarray:
    return np.linspace(0, top, size * size).reshape(size, size).round().astype(np.uint16)


@pytest.mark.parametrize("name, pixels, sbit", [
    ("12-bit, no sBIT", ramp(4095), None),
    ("12-bit with sBIT 12", ramp(4095), 12),
    ("12-bit scaled to 16 as PNG asks, sBIT 12", (ramp(4095) << 4) | (ramp(4095) >> 8), 12),
    ("16-bit", ramp(65535), None),
    ("10-bit", ramp(1023), None),
])
def test_16_bit_images_keep_their_contrast(tmp_path, name, pixels, sbit):
    path = png(tmp_path / "x.png", pixels, sbit)
    assert Image.open(path).mode == "I;16"
    gray = load_rgb(path, 64, **LIMITS)[0]
    assert gray.min() == 0 and gray.max() == 255, name
    assert abs(int(gray[32, 0]) - 128) <= 1, name  # the middle of the ramp stays mid-grey
    # the page and predict decode the same way, from memory or a file
    np.testing.assert_array_equal(decode(io.BytesIO(path.read_bytes()), 64, **LIMITS)[0], gray)


def test_12_bit_images_of_one_detector_share_one_scale(tmp_path):
    """Dividing each image by its own maximum would make a dim image as bright as a dense one."""
    bright = load_rgb(png(tmp_path / "bright.png", ramp(4000)), 64, **LIMITS)
    dim = load_rgb(png(tmp_path / "dim.png", ramp(2500)), 64, **LIMITS)
    assert bright.max() == round(4000 / 4095 * 255) and dim.max() == round(2500 / 4095 * 255)


def test_8_bit_data_stored_as_16_bit_decodes_as_the_8_bit_image(tmp_path):
    dark = (ramp(60).astype(np.uint8))  # a dark image: its 16-bit copy stays under 2^14
    eight = load_rgb(png(tmp_path / "8.png", dark), 64, **LIMITS)
    sixteen = load_rgb(png(tmp_path / "16.png", dark.astype(np.uint16) * 257), 64, **LIMITS)
    np.testing.assert_array_equal(eight, sixteen)


def pixel_bomb(path: Path, side: int = 12000) -> Path:
    """A valid all-black `side` x `side` grey PNG, compressed row by row (about 140 kB)."""
    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest shows what the code hides
def test_a_pixel_bomb_is_refused_from_its_header(tmp_path):
    bomb = pixel_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000
    started = time.perf_counter()
    for limit in (50_000_000, 100_000_000):  # PIL's own check fires above twice the limit, ours above it
        why = check_image(bomb, max_pixels=limit, min_side=32)
        assert why and "144000000 pixels, more than data.max_image_pixels" in why and "refused before decoding" in why
        assert decode(io.BytesIO(bomb.read_bytes()), 64, limit, 32).startswith("refused: ")
    assert time.perf_counter() - started < 1  # decoding it would take seconds and 144 MB
    # and PIL's DecompressionBombWarning is not printed (pytest would catch it here, so in a fresh process)
    code = f"from cxrlab.data.images import check_image; print(check_image({str(bomb)!r}, 100_000_000, 32))"
    result = run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert "refused before decoding" in result.stdout and result.stderr == ""


def split_with_bad_images(in_project) -> Path:
    raw = in_project / "data" / "raw"
    make_dataset(raw, n_per_class=5, size=32, subdir="")
    pixel_bomb(raw / "tb" / "tb0999.png")
    Image.new("L", (1, 1), 128).save(raw / "health" / "h0999.png")
    return raw


def test_a_pixel_bomb_and_a_1_by_1_image_are_bad_images_for_the_split(in_project):
    split_with_bad_images(in_project)
    with pytest.raises(UserError) as err:
        split.main([])
    message = str(err.value)
    assert message.startswith("2 images in data/raw cannot be read:")
    assert "health/h0999.png: 1 x 1 pixels, a side under data.min_image_side (32)" in message
    assert "tb/tb0999.png: 144000000 pixels, more than data.max_image_pixels (50000000)" in message
    assert not (in_project / "data" / "split").exists() and not written(in_project / "metrics")

    set_params(in_project / "params.yaml", {"data.on_bad_image": "skip"})
    split.main([])
    report = (in_project / "metrics" / "split_report.json").read_text()
    assert '"bad_images": 2' in report and "h0999.png" in report and "tb0999.png" in report
    assert "h0999.png" not in (in_project / "data" / "split" / "train.csv").read_text()


# ------------------------------------------------------------- checkpoints
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_gets_our_line_without_torchs_advice(project, tmp_path):
    import torch

    marker = tmp_path / "PWNED"
    torch.save({"format": "tb-cxr-classifier/1", "model": _Payload(marker)}, tmp_path / "evil.pt")
    Image.new("L", (64, 64), 100).save(tmp_path / "x.png")
    result = stage("predict", "--checkpoint", str(tmp_path / "evil.pt"), str(tmp_path / "x.png"), cwd=project)
    assert_user_error(result, "evil.pt is not a checkpoint written by this pipeline: it holds Python objects "
                              "(posix.system) that a safe load refuses to run")
    assert "weights_only" not in result.stderr and "Re-running" not in result.stderr
    assert not marker.exists()


# --------------------------------------------------------------- file system
def in_mount(cmd: list[str], cwd: Path, mountpoint: Path, options: str, listing: Path | None = None):
    """`cmd` with a fresh tmpfs mounted (`options`) at `mountpoint`, in a private mount namespace
    (`unshare`, as root or through a user namespace); `listing` receives the files left in it."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a read-only or full folder")
    mountpoint.mkdir(parents=True, exist_ok=True)
    after = f'; rc=$?; find "$0" -mindepth 1 > "{listing}"; exit $rc' if listing else ""
    script = f'mount -t tmpfs -o {options} tmpfs "$0" || exit 99; "$@"{after}'
    result = run(["unshare", "-rm", "sh", "-c", script, str(mountpoint), *cmd], cwd=cwd, check=False)
    if result.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {result.stderr.strip()}")
    return result


def test_a_read_only_models_folder_fails_before_training(project):
    cmd = [sys.executable, "-m", "stages.train", "baseline"]
    if os.geteuid() != 0:
        (project / "models").mkdir()
        (project / "models").chmod(0o555)
        result = run(cmd, cwd=project, check=False)
        (project / "models").chmod(0o755)
    else:  # root writes anywhere, except on a read-only mount
        result = in_mount(cmd, project, project / "models", "ro,size=64k")
    assert_user_error(result, "error: train: cannot write models/baseline: models is not writable",
                      "make it writable")
    # it failed before reading the data: without the check this project (no data) would say so instead
    assert "preprocess" not in result.stderr
    assert not written(project / "metrics") and not (project / ".train-state").exists()


def test_predict_out_naming_a_folder_fails_before_any_work(in_project, tmp_path):
    from cxrlab.cli.predict import main

    Image.new("L", (64, 64), 100).save(tmp_path / "x.png")
    (tmp_path / "preds.csv").mkdir()
    with pytest.raises(UserError) as err:  # before the checkpoint is even looked for
        main(["--checkpoint", "nowhere.pt", str(tmp_path / "x.png"), "--out", str(tmp_path / "preds.csv")])
    assert str(err.value) == (f"--out {tmp_path / 'preds.csv'} is a folder; name a .csv or .json file, "
                              f"e.g. {tmp_path / 'preds.csv' / 'predictions.csv'}")
    assert list((tmp_path / "preds.csv").iterdir()) == []


def test_a_full_disk_during_download_is_one_line_and_leaves_nothing(project, tmp_path):
    src = tmp_path / "src"
    for cls in ("health", "tb"):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            (src / cls / f"{cls}{i}.png").write_bytes(os.urandom(100_000))
    set_params(project / "params.yaml", {"data.source": str(src)})
    listing = tmp_path / "left.txt"
    result = in_mount([sys.executable, "-m", "stages.download"], project, project / "data", "size=256k", listing)
    assert_user_error(result, "error: download: the disk is full while writing data/raw; nothing was kept in data/raw")
    assert listing.read_text() == ""  # no data/raw, no temporary


def test_the_write_check_leaves_nothing_and_names_a_file_in_the_way(tmp_path):
    from cxrlab.io.fsio import check_writable

    (tmp_path / "models").write_text("a file where a folder should be")
    check_writable(tmp_path / "out" / "deep" / "x.json", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    with pytest.raises(UserError, match=r"cannot write .*/models/baseline/seed_1: .*/models is a file, not a folder"):
        check_writable(tmp_path / "models" / "baseline" / "seed_1")


# --------------------------------------------------------------------- params
@pytest.mark.parametrize("changes, expected", [
    ({"data.max_unpacked_gb": 0}, "data.max_unpacked_gb: Input should be greater than 0"),
    ({"data.max_image_pixels": 0}, "data.max_image_pixels: Input should be greater than or equal to 1"),
    ({"data.min_image_side": 100, "data.max_image_pixels": 5000},
     "min_image_side 100 allows no image within max_image_pixels 5000"),
])
def test_the_limits_are_validated_params(tmp_path, changes, expected):
    from cxrlab.config.load import load_params
    from tests.conftest import ROOT

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    data = load_params(params).data
    assert (data.max_unpacked_gb, data.max_image_pixels, data.min_image_side) == (100, 50_000_000, 32)
    set_params(params, changes)
    with pytest.raises(UserError, match=re.escape(expected)):
        load_params(params)
