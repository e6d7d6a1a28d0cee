"""Finding, ordering and decoding image files.

Every image, whatever its mode (8- or 16-bit grayscale, palette, RGB, RGBA,
CMYK), becomes an 8-bit RGB array resized to the training resolution with
the same filter torchvision's `Resize` uses on PIL images (bilinear, with
antialiasing). Preprocessing, prediction and the web page all go through
`read_rgb` (`load_rgb`), so they see the same pixels. DICOM files (`.dcm`,
or the DICM marker) go to `cxrlab.data.dicom`, which gives the 8-bit grey
image a PNG of the same values would.

Before anything is decoded, the header's size is checked: more than
`data.max_image_pixels` pixels is refused (a decompression bomb: a 140 KB
PNG can hold 12000 x 12000 pixels), and so is a shorter side under
`data.min_image_side` (a thumbnail or a 1 x 1 tracking pixel is no X-ray).
Both raise `ImageRefused`, a `ValueError`, which callers treat as a bad image.

What a file is comes from its content, never its name, and only the formats
of `PILLOW_FORMATS` are decoded (`open_image` is the one place that decides):
anything else is refused by name before any decoder runs. Left to sniff
freely, Pillow hands an EPS/PostScript file named `.png` to Ghostscript, an
external program. Every exception a decoder raises on a hostile file (broken
EXIF, a malformed TIFF directory ...) becomes `UnreadableImage`, a
`ValueError`: a bad image naming its file, never a traceback. A multi-frame
file (TIFF, APNG, animated WebP) is refused rather than silently read as
its first frame.

16-bit (and 32-bit integer) grayscale is mapped onto 8 bits by the bit depth
of its data, not of its container (`gray_scale`): X-ray detectors deliver 10,
12 or 14 bits, often stored unscaled in a 16-bit PNG, and dividing 12-bit
values by 257 makes the brightest pixel 14 of 255. 16-bit colour and
grey+alpha PNGs, which Pillow reads as 8 bits by dropping the low byte, are
decoded at 16 bits by OpenCV and mapped the same way (`read_png16`).
"""

from __future__ import annotations

import contextlib
import re
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import IO, Iterator

import numpy as np
from PIL import Image, ImageOps

from cxrlab.data.dicom import DICOM_SUFFIXES, has_preamble, is_dicom, read_dicom

PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
IMAGE_SUFFIXES = PILLOW_SUFFIXES | DICOM_SUFFIXES  # DICOM: cxrlab.data.dicom

# Bit depths X-ray detectors deliver; a 16-bit image without sBIT is taken to
# hold the smallest of these that covers its brightest pixel.
DETECTOR_BITS = (8, 10, 12, 14, 16)

# PIL's own bomb check (a warning above Image.MAX_IMAGE_PIXELS, an error
# above twice that) is set to our limit while `open_image` has an image open; it refuses
# everything above it with its own message first; the warning would only
# repeat that on stderr.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


# The formats decoded, as Pillow names them; Pillow opens each with that plugin only. A reader of
# another kind (DICOM through pydicom, say) is one more branch in `open_image`, before Pillow's.
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# formats whose Pillow plugin runs an external program to decode: named as such when refused
EXTERNAL_PROGRAM = {"EPS": "Ghostscript", "WMF": "a Windows metafile handler"}


class ImageRefused(ValueError):
    """An image refused before decoding: too large or too small by its header, an unread format, several frames."""


class UnreadableImage(ValueError):
    """A decoder failed on the file (any exception of Pillow's or OpenCV's): a bad image."""


_DIGITS = re.compile(r"(\d+)")


def is_image_name(name: str) -> bool:
    """An image by its name: a known suffix, not a hidden or macOS resource file."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def is_image_file(path: str | Path) -> bool:
    """An image by its name, or a DICOM file by its DICM marker (PACS exports often have no suffix)."""
    name = Path(path).name
    return is_image_name(name) or (not name.startswith(".") and has_preamble(path))


def natural_key(name: str) -> tuple:
    """Sort key comparing the numbers in a file name by value: h2 < h10.

    `h0001.png` -> ('h', 1, ''); `CHNCXR_0005_0.png` -> ('chncxr_', 5, '_', 0, '').
    Text parts are compared case-insensitively; two names with the same key
    (`h1.png`, `h0001.png`, `H0001.jpg`) carry the same ID.
    """
    # a suffix only if it is an image's: DICOM files named by UID (1.2.840.113619.2.55.3.4) end in digits
    parts = _DIGITS.split(Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))


def png_significant_bits(fp: IO[bytes]) -> int | None:
    """The grey channel's significant bits from a PNG's sBIT chunk, or None.

    Pillow does not expose sBIT, so the chunks before the image data are read
    here (each is skipped by its length; a few hundred bytes in all). `fp` is
    left where it was.
    """
    start = fp.tell()
    try:
        if fp.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        for _ in range(256):
            head = fp.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND"):
                return None
            if kind == b"sBIT":
                bits = fp.read(min(length, 4))
                return bits[0] if bits and 1 <= bits[0] <= 16 else None
            fp.seek(length + 4, 1)  # data and CRC
        return None
    finally:
        fp.seek(start)


def gray_scale(arr: np.ndarray, significant_bits: int | None) -> float:
    """The value that becomes 255 when a 16-bit (or wider) grayscale array is mapped onto 8 bits.

    - The PNG says how many bits are significant (sBIT = k): if every value
      fits in k bits, the data are stored unscaled, as detectors' exports
      usually are, and 2^k - 1 is white; larger values mean the writer scaled
      them to 16 bits as the PNG standard asks, and 65535 is white.
    - Otherwise, values that are all multiples of 257 are 8-bit data scaled
      to 16 bits (v * 257, as Pillow and numpy users write them): 65535.
    - Otherwise the data's bit depth is the smallest detector depth (8, 10,
      12, 14 or 16 bits) holding the brightest pixel, and 2^depth - 1 is
      white: a 12-bit X-ray keeps its contrast, and images of one detector
      share one scale (relative brightness between them is kept), unlike a
      per-image stretch to [min, max]. A 16-bit image darker than 1/4 of the
      range is thereby brightened; its writer can say so with sBIT = 16.
    """
    top = float(arr.max()) if arr.size else 0.0
    if significant_bits:
        return float(2 ** significant_bits - 1) if top <= 2 ** significant_bits - 1 else 65535.0
    if top > 255 and not (arr % 257).any():
        return 65535.0
    for bits in DETECTOR_BITS:
        if top <= 2 ** bits - 1:
            return float(2 ** bits - 1)
    return float(2 ** int(np.ceil(np.log2(top + 1))) - 1)  # 32-bit integer images


def to_rgb(img: Image.Image, significant_bits: int | None = None) -> Image.Image:
    """An 8-bit RGB copy of `img`, whatever its mode; 16-bit grey is scaled by `gray_scale`."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.array(img, dtype=np.float32)  # a writable copy
        if img.mode == "F" and arr.size and arr.max() <= 1.0:
            scale = 1.0  # floating-point images in [0, 1]
        else:
            scale = gray_scale(np.rint(arr) if img.mode == "F" else np.asarray(img), significant_bits)
        arr *= 255.0 / scale  # in place: a 50-megapixel image is 200 MB as float32
        np.clip(np.rint(arr, out=arr), 0, 255, out=arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, YCbCr ...


def sniff_format(fp: IO[bytes]) -> str | None:
    """The format Pillow would take `fp`'s content for, from its first 16 bytes only (each plugin's
    `accept` test: no plugin opens it), or None. `fp` is left where it was."""
    start = fp.tell()
    prefix = fp.read(16)
    fp.seek(start)
    Image.init()
    for name in dict.fromkeys((*PILLOW_FORMATS, *Image.ID)):  # ours first, as Image.open would try them
        accept = Image.OPEN[name][1] if name in Image.OPEN else None
        with contextlib.suppress(Exception):
            if accept is not None and accept(prefix):
                return name
    return None


def refusal(fmt: str | None) -> str:
    """Why a file whose content is `fmt` (None: unrecognised) is not decoded."""
    allowed = ", ".join(PILLOW_FORMATS[:-1]) + " or WebP"
    if fmt is None:
        return f"its content is none of {allowed}"
    program = f"; decoding it would run {EXTERNAL_PROGRAM[fmt]}, an external program" if fmt in EXTERNAL_PROGRAM else ""
    article = "an" if fmt[0] in "AEFHILMNORSX" else "a"  # as the letters are spoken: an EPS, a GIF
    return f"{article} {fmt} file, a format not read{program}; save the X-ray as {allowed}"


@contextlib.contextmanager
def open_image(source: str | Path | IO[bytes], max_pixels: int,
               min_side: int) -> Iterator[tuple[Image.Image, int | None, int | None]]:
    """(the opened, not yet decoded image, its PNG significant bits, and for a 16-bit colour or
    grey+alpha PNG the offset where it starts in its file, else None) after the header's size is checked.

    The one place that decides how a file is decoded: by its content, through the Pillow plugins
    of `PILLOW_FORMATS` only. Raises `ImageRefused` for another format (named), several frames,
    more than `max_pixels` pixels or a side under `min_side`; `UnreadableImage` for a file the
    decoder fails on; `OSError` when the file cannot be read.
    """
    with contextlib.ExitStack() as stack:
        # PIL refuses beyond twice its limit even where we do not look: ours while this image is open,
        # PIL's own again afterwards (a process-wide setting must not leak into other callers)
        stack.callback(setattr, Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
        Image.MAX_IMAGE_PIXELS = max_pixels
        fp = source if hasattr(source, "read") else stack.enter_context(open(source, "rb"))
        fmt = sniff_format(fp)  # the dispatch, by content: a reader of another kind (DICOM) is a branch here
        if fmt not in PILLOW_FORMATS:
            raise (UnreadableImage if fmt is None else ImageRefused)(refusal(fmt))
        bits = png_significant_bits(fp)
        png16_at = fp.tell() if png16_colour(fp) else None
        try:
            img = stack.enter_context(Image.open(fp, formats=[fmt]))
            frames = getattr(img, "n_frames", 1)
        except Image.DecompressionBombError as err:
            pixels = re.search(r"\((\d+) pixels\)", str(err))
            raise ImageRefused(f"{pixels.group(1) if pixels else 'too many'} pixels, more than "
                               f"data.max_image_pixels ({max_pixels}): refused before decoding") from None
        except Exception as err:  # noqa: BLE001 - whatever a parser raises on a hostile header is a bad image
            raise UnreadableImage(_why(err)) from err
        if frames > 1:
            raise ImageRefused(f"a {img.format} file of {frames} frames (a stack or an animation); "
                               "save the one X-ray as a single-frame image")
        width, height = img.size
        if width * height > max_pixels:
            raise ImageRefused(f"{width} x {height} = {width * height} pixels, more than data.max_image_pixels "
                               f"({max_pixels}): refused before decoding")
        if min(width, height) < min_side:
            raise ImageRefused(f"{width} x {height} pixels, a side under data.min_image_side ({min_side})")
        yield img, bits, png16_at


def _why(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"the decoder failed: {type(err).__name__}" + (f": {text}" if text else "")


def png16_colour(fp: IO[bytes]) -> bool:
    """True for a 16-bit PNG with colour or alpha (colour types 2, 4, 6), which Pillow reads at 8 bits."""
    start = fp.tell()
    head = fp.read(26)
    fp.seek(start)
    return (len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
            and head[24] == 16 and head[25] in (2, 4, 6))


def read_png16(data: bytes, significant_bits: int | None) -> Image.Image:
    """A 16-bit colour or grey+alpha PNG as 8-bit RGB, scaled by its real depth (`gray_scale`).

    OpenCV, not Pillow: Pillow has no 16-bit colour mode and keeps only the high byte, so 12-bit
    data stored unscaled would become nearly black. Alpha is dropped, as `to_rgb` drops it.
    """
    import cv2  # here: only these rare files need it, and it is slow to import

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.dtype != np.uint16:
        raise UnreadableImage("the decoder failed: OpenCV cannot read this 16-bit PNG")
    rgb = arr[..., 2::-1].astype(np.float32)  # BGR(A) -> RGB
    rgb *= 255.0 / gray_scale(arr[..., :3], significant_bits)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")


def read_rgb(source: str | Path | IO[bytes], max_pixels: int, min_side: int) -> Image.Image:
    """`source` decoded into an 8-bit RGB image, within the size limits (see `open_image`)."""
    if is_dicom(source, PILLOW_SUFFIXES):  # its own reader (cxrlab.data.dicom): never Pillow's guess
        return read_dicom(source, max_pixels, min_side).convert("RGB")
    with open_image(source, max_pixels, min_side) as (img, bits, png16_at):
        try:
            if png16_at is not None:
                img.fp.seek(png16_at)
                rgb = read_png16(img.fp.read(), bits)
                rgb.info["exif"] = img.getexif().tobytes()
                return ImageOps.exif_transpose(rgb)
            img.load()
            return to_rgb(img, bits)
        except (ImageRefused, UnreadableImage):
            raise
        except Exception as err:  # noqa: BLE001 - broken EXIF, a malformed TIFF directory ...: a bad image
            raise UnreadableImage(_why(err)) from err


def check_image(path: str | Path, max_pixels: int, min_side: int) -> str | None:
    """None if `path` decodes completely within the size limits, else why not."""
    try:
        read_rgb(path, max_pixels, min_side)
    except (OSError, ValueError) as err:  # unreadable, truncated, not an image, refused (see `open_image`)
        return str(err) or type(err).__name__
    return None


def check_images(paths: list[Path], workers: int, max_pixels: int, min_side: int) -> dict[Path, str]:
    """{path: reason} for every file of `paths` that does not decode, checked in parallel."""
    check = partial(check_image, max_pixels=max_pixels, min_side=min_side)
    if workers <= 1 or len(paths) < 64:
        results = map(check, paths)
        return {p: why for p, why in zip(paths, results) if why}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check, paths, chunksize=32)
        return {p: why for p, why in zip(paths, results) if why}


def load_rgb(source: str | Path | IO[bytes], size: int, max_pixels: int, min_side: int) -> np.ndarray:
    """Decode `source` (a path or an open binary file) into a (3, size, size) uint8 array.

    Raises `ImageRefused` (a `ValueError`) for a file refused before decoding (see `open_image`),
    `UnreadableImage` (a `ValueError`) for one the decoder fails on, truncated ones included,
    and `OSError` for one that cannot be read.
    """
    rgb = read_rgb(source, max_pixels, min_side)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()
