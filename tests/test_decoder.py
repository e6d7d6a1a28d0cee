"""The one decoder against hostile files (issue 26): an allow-list of formats, so no file runs an external
program whatever its name; every decoder failure a bad image naming its file; several frames refused;
16-bit colour PNGs at their real depth; predict streams in batches. Every file is built here."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from cxrlab.cli.predict import main as predict_main
from cxrlab.data.images import check_image, load_rgb
from cxrlab.data.synthetic import make_dataset
from cxrlab.serving import predict as serving
from stages import split
from tests.conftest import ROOT, set_params

LIMITS = {"max_pixels": 50_000_000, "min_side": 32}  # params.yaml's
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
       b"newpath 0 0 moveto 64 64 lineto stroke showpage\n")


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(pixels: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG (colour type 2: RGB, 4: grey+alpha, 6: RGBA) of `pixels` (H x W x C), written by hand:
    Pillow cannot write these."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def broken_exif_png() -> bytes:
    """A valid 64 px PNG whose eXIf chunk has no TIFF header: Pillow raises SyntaxError reading it."""
    buf = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buf, "PNG")
    data = buf.getvalue()
    return data[:33] + chunk(b"eXIf", b"XX\x00\x2a\x00\x00\x00\x08") + data[33:]


def multi_frame(path: Path, fmt: str) -> Path:
    frames = [Image.new("RGB", (64, 64), c) for c in ("black", "white")]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    return path


@pytest.fixture
def fake_gs(tmp_path, monkeypatch) -> Path:
    """A stand-in `gs`, first on PATH, that records being called; returns the file it would write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "gs-was-called"
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {called}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow looks for gs again, finding this one
    return called


def test_the_stand_in_gs_is_what_pillow_would_run(tmp_path, fake_gs):
    """The hazard is real and the stand-in catches it: Pillow left to sniff runs `gs` on an EPS named .png."""
    (tmp_path / "x.png").write_bytes(EPS)
    code = "from PIL import Image\ntry: Image.open('x.png').load()\nexcept Exception: pass"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=os.environ, check=True)
    assert fake_gs.exists()


@pytest.mark.parametrize("name, data, why", [
    ("eps.png", EPS, "an EPS file, a format not read; decoding it would run Ghostscript"),
    ("eps.jpg", EPS, "an EPS file"),
    ("exif.png", broken_exif_png(), "the decoder failed: SyntaxError: not a TIFF file"),
    ("text.png", b"hello, not an image", "its content is none of PNG, JPEG, BMP, TIFF or WebP"),
    ("cut.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00", "the decoder failed: OSError"),
], ids=["eps-as-png", "eps-as-jpg", "broken-exif", "text", "header-cut-short"])
def test_refused_and_broken_files_are_bad_images_naming_why(tmp_path, fake_gs, name, data, why):
    (tmp_path / name).write_bytes(data)
    assert why in check_image(tmp_path / name, **LIMITS)
    assert why in serving.decode(io.BytesIO(data), 64, **LIMITS)  # the page's uploads: from memory
    assert not fake_gs.exists()


@pytest.mark.parametrize("fmt, suffix", [("TIFF", ".tif"), ("PNG", ".png"), ("WEBP", ".webp"), ("GIF", ".png")])
def test_several_frames_are_refused_not_read_as_the_first(tmp_path, fmt, suffix):
    why = check_image(multi_frame(tmp_path / f"x{suffix}", fmt), **LIMITS)
    if fmt == "GIF":  # not an allowed format at all
        assert why == "a GIF file, a format not read; save the X-ray as PNG, JPEG, BMP, TIFF or WebP"
    else:
        assert why == f"a {fmt} file of 2 frames (a stack or an animation); save the one X-ray as a single-frame image"


@pytest.mark.parametrize("colour_type", [2, 4, 6])
def test_16_bit_colour_and_grey_alpha_pngs_keep_their_low_byte(tmp_path, colour_type):
    """12-bit data stored unscaled: Pillow's 8-bit reading keeps the high byte (at most 15); ours maps 4095
    to white exactly as it does for a 16-bit grey PNG of the same pixels."""
    grey = np.linspace(0, 4095, 64 * 64).reshape(64, 64).round().astype(np.uint16)
    channels = {2: [grey] * 3, 4: [grey, np.full_like(grey, 65535)], 6: [grey] * 3 + [np.full_like(grey, 65535)]}
    path = tmp_path / "x.png"
    path.write_bytes(png16(np.dstack(channels[colour_type]), colour_type))
    assert np.asarray(Image.open(path).convert("L")).max() <= 16  # what Pillow alone makes of it
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    expected = load_rgb(tmp_path / "grey16.png", 64, **LIMITS)
    assert expected.max() == 255
    np.testing.assert_array_equal(load_rgb(path, 64, **LIMITS), expected)


def test_the_split_names_each_bad_file_once_and_counts_ignored_files_by_suffix(in_project, fake_gs, capsys):
    raw = in_project / "data" / "raw"
    make_dataset(raw, n_per_class=5, size=32, subdir="")
    (raw / "tb" / "tb0999.png").write_bytes(EPS)
    (raw / "health" / "h0999.png").write_bytes(broken_exif_png())
    multi_frame(raw / "tb" / "tb0998.tif", "TIFF")
    multi_frame(raw / "health" / "h0998.gif", "GIF")
    (raw / "tb" / "tb0997.dcm").write_bytes(b"\0" * 128 + b"DICM")  # a DICOM file without a data set: bad
    (raw / "tb" / "tb0996.svg").write_text("<svg/>")
    (raw / "tb" / "notes.txt").write_text("not an image")
    set_params(in_project / "params.yaml", {"data.on_bad_image": "skip"})
    split.main([])
    out = capsys.readouterr().out
    assert "skipped unreadable image tb/tb0999.png: an EPS file" in out
    assert "skipped unreadable image health/h0999.png: the decoder failed: SyntaxError" in out
    assert "skipped unreadable image tb/tb0998.tif: a TIFF file of 2 frames" in out
    assert out.count("tb0999.png") == 1
    assert "skipped unreadable image tb/tb0997.dcm" in out
    assert "split: ignored 3 files in the class folders that are not read as images (.gif 1, .svg 1, .txt 1)" in out
    report = json.loads((in_project / "metrics" / "split_report.json").read_text())
    assert report["bad_images"] == 4 and report["ignored_by_suffix"] == {".gif": 1, ".svg": 1, ".txt": 1}
    assert "tb0999.png" not in (in_project / "data" / "split" / "train.csv").read_text()
    assert not fake_gs.exists()


class _Scorer:
    """A stand-in predictor that records the batches it scores."""

    image_size, classes = 32, ["a", "b"]

    def __init__(self, events: list):
        self.events = events

    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        self.events.append(("score", len(images)))
        return np.full((len(images), 2), 0.5, dtype=np.float32)


def test_predict_streams_a_batch_at_a_time(tmp_path, monkeypatch):
    """Images are decoded and scored a batch at a time (never all held at once); a bad file is skipped
    where it stands, named, without losing its batch."""
    files = []
    for i in range(10):
        files.append(tmp_path / f"x{i:02d}.png")
        Image.new("L", (32, 32), i).save(files[-1])
    (tmp_path / "x04.png").write_bytes(EPS)
    events: list = []
    decode = serving.decode
    monkeypatch.setattr(serving, "decode", lambda *a: events.append(("decode", 1)) or decode(*a))
    kept, probs, skipped = serving.predict_files(_Scorer(events), files, batch_size=4,
                                                 max_pixels=LIMITS["max_pixels"], min_side=16)
    assert [p.name for p, _ in skipped] == ["x04.png"] and "an EPS file" in skipped[0][1]
    assert kept == [f for f in files if f.name != "x04.png"] and probs.shape == (9, 2)
    held, most = 0, 0
    for kind, n in events:  # decoded images not yet scored: at most one batch
        held = held + 1 if kind == "decode" else held - n
        most = max(most, held)
    assert [n for kind, n in events if kind == "score"] == [4, 4, 1] and most <= 5  # 4 kept + the skipped one


def test_predict_refuses_eps_by_name_and_never_runs_gs(trained_project, tmp_path, fake_gs, monkeypatch, capsys):
    monkeypatch.chdir(trained_project)
    folder = tmp_path / "xrays"
    folder.mkdir()
    (folder / "a.png").write_bytes(EPS)
    (folder / "b.jpg").write_bytes(EPS)
    (folder / "c.png").write_bytes(broken_exif_png())
    good = next((trained_project / "data/dataset/test/TB").iterdir())
    (folder / "d.png").write_bytes(good.read_bytes())
    predict_main(["--checkpoint", "models/baseline/seed_42/last.pt", str(folder), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    for name in ("a.png", "b.jpg"):
        assert f"skipped {folder / name}: refused: an EPS file, a format not read; decoding it would run " \
               "Ghostscript" in err
    assert f"skipped {folder / 'c.png'}: not a readable image (the decoder failed: SyntaxError" in err
    report = json.loads((tmp_path / "p.json").read_text())
    assert [Path(p["file"]).name for p in report["predictions"]] == ["d.png"]
    assert len(report["skipped"]) == 3 and not fake_gs.exists()


def test_every_image_is_opened_by_the_one_decoder():
    """Split, preprocess, predict, explain and the page's uploads all decode through cxrlab/data/images.py:
    an `Image.open` anywhere else would sniff formats freely again."""
    opened = sorted(str(p.relative_to(ROOT)) for folder in ("cxrlab", "stages", "app")
                    for p in (ROOT / folder).rglob("*.py") if "Image.open(" in p.read_text())
    assert opened == ["cxrlab/data/images.py"]

