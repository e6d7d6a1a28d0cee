"""Reading a DICOM radiograph (pydicom) into the 8-bit grey image every other format becomes.

The grayscale pipeline of the DICOM standard (PS3.3 C.11), in its order:

1. the stored values, `BitsStored` bits (10-16) in a 16-bit container, signed
   or not (`PixelRepresentation`);
2. the modality transform: `RescaleSlope`/`RescaleIntercept` or a Modality LUT;
3. the VOI transform: the VOI LUT, else the window (`WindowCenter`/`WindowWidth`,
   `VOILUTFunction`); with several of either, the first, as pydicom applies them
   (a VOI LUT is preferred to a window when a file has both);
4. MONOCHROME1 (0 is white) is inverted so that, as in MONOCHROME2 and PNG, 0 is black;
5. the range those steps can produce from every possible stored value (not the
   image's own minimum and maximum, and not the container's 16 bits) is mapped
   linearly onto 0..255 and rounded as the PNG path rounds.

So a DICOM file without rescale or window whose 12-bit values equal a PNG's
gives the same 8-bit pixels, and images of one detector share one scale.

Refused, as a bad image (`data.on_bad_image`), each with one line: a multi-frame
file, a file without pixel data (a structured report, a presentation state), a
modality other than CR, DX or DR (DR is not a DICOM term but exporters write it;
a file without Modality is accepted), colour, and a compressed transfer syntax
no installed pixel decoder reads (`pip install 'cxrlab[dicom]'` installs
pylibjpeg with its OpenJPEG and libjpeg plugins: JPEG, JPEG-LS, JPEG 2000).

No patient data out: messages name what is wrong from fixed text and numbers
the reader checked (frame count, bits, a transfer syntax's registered name);
nothing a header can carry as free text (names, IDs, dates, institution,
accession number) ever reaches a message, and pydicom's warnings, which can
quote header values, are silenced while a file is read.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path
from typing import IO, Iterator

import numpy as np
from PIL import Image

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
RADIOGRAPHS = frozenset({"CR", "DX", "DR"})
# Modalities named in a refusal; any other value (free text a header could abuse) is not repeated.
KNOWN_MODALITIES = frozenset({"CT", "MR", "US", "MG", "NM", "PT", "XA", "RF", "OT", "SR", "PR", "KO", "SEG",
                              "SC", "DOC", "IO", "PX", "ES", "OP", "RG", "XC", "REG", "RTSTRUCT", "RTIMAGE"})
PREAMBLE = 128  # bytes before the b"DICM" marker of a DICOM Part 10 file
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class DicomRefused(ValueError):
    """A readable DICOM file that holds no single grayscale radiograph this pipeline can use."""


def has_preamble(source: str | Path | IO[bytes]) -> bool:
    """True when the 4 bytes after the 128-byte preamble read DICM (`source` is left where it was)."""
    if hasattr(source, "read"):
        start = source.tell()
        try:
            return source.read(PREAMBLE + 4)[PREAMBLE:] == b"DICM"
        finally:
            source.seek(start)
    try:
        with open(source, "rb") as f:
            return f.read(PREAMBLE + 4)[PREAMBLE:] == b"DICM"
    except OSError:
        return False


def is_dicom(source: str | Path | IO[bytes], other_suffixes: frozenset[str]) -> bool:
    """A DICOM file by its suffix (.dcm, .dicom) or, unless its suffix is one of `other_suffixes`
    (the other image formats), by its DICM marker: PACS exports often have no suffix."""
    if hasattr(source, "read"):
        return has_preamble(source)
    suffix = Path(source).suffix.lower()
    return suffix in DICOM_SUFFIXES or (suffix not in other_suffixes and has_preamble(source))


def _transfer_syntax(uid) -> str:
    """A transfer syntax as a message may show it: its registered name, else its UID if it is one."""
    name = getattr(uid, "name", "")
    if getattr(uid, "is_transfer_syntax", False) and name and name != str(uid):
        return f"{name} ({uid})"
    return str(uid) if _UID.match(str(uid)) else "an unknown transfer syntax"


def _check(ds, max_pixels: int, min_side: int) -> None:
    """Refuse what is no single grayscale radiograph within the size limits, before decoding."""
    from cxrlab.data.images import ImageRefused  # imported here: images.py imports this module

    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality not in RADIOGRAPHS:
        shown = f"modality {modality}" if modality in KNOWN_MODALITIES else "another modality"
        raise DicomRefused(f"DICOM of {shown}, not a radiograph (CR, DX or DR); remove it from the data")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomRefused("DICOM without an image (pixel data): a structured report, presentation state "
                           "or other non-image object; remove it from the data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomRefused(f"multi-frame DICOM ({frames} frames); one radiograph per file is expected")
    if "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1) or 1) != 1 or \
            str(ds.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomRefused("DICOM that is not an integer grayscale image (MONOCHROME1 or MONOCHROME2)")
    bits = int(ds.get("BitsStored", 0) or 0)
    if not 1 <= bits <= 16:
        raise DicomRefused(f"DICOM with {bits} bits stored per pixel; 1 to 16 are read")
    width, height = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
    if width * height > max_pixels:
        raise ImageRefused(f"{width} x {height} = {width * height} pixels, more than data.max_image_pixels "
                           f"({max_pixels}): refused before decoding")
    if min(width, height) < min_side:
        raise ImageRefused(f"{width} x {height} pixels, a side under data.min_image_side ({min_side})")
    ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if ts is not None:
        from pydicom.pixels import get_decoder

        try:
            available = get_decoder(ts).is_available  # uncompressed ones: pydicom's own, always there
        except (NotImplementedError, ValueError):  # no decoder at all for this transfer syntax
            available = False
        if not available:
            raise DicomRefused(f"DICOM compressed with {_transfer_syntax(ts)}, which no installed pixel decoder "
                               "reads; convert it to an uncompressed transfer syntax (e.g. gdcmconv --raw), or "
                               "for JPEG, JPEG-LS and JPEG 2000 pip install 'cxrlab[dicom]' (pylibjpeg)")


def to_gray8(stored: np.ndarray, ds) -> np.ndarray:
    """The stored values of `ds` (one frame) as 8-bit grey: modality, VOI, MONOCHROME1, range (module doc)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0) or 0) == 1
    low = -(2 ** (bits - 1)) if signed else 0
    domain = np.arange(low, low + 2 ** bits)  # every value BitsStored bits can hold: at most 65536
    # the transforms are a function of the stored value alone: computed once per possible value, a table
    table = np.asarray(apply_voi_lut(apply_modality_lut(domain, ds), ds, index=0), dtype=np.float64)
    lo, hi = float(table.min()), float(table.max())
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        table = (hi + lo) - table  # 0 was white; exact on integers, like `max - value` on a PNG
    values = np.clip(stored, low, low + 2 ** bits - 1).astype(np.int64) - low  # stray bits above BitsStored
    x = table[values].astype(np.float32)
    # the PNG path's arithmetic (images.to_rgb: float32, times 255 / white, rint, clip): equal inputs, equal bytes
    x -= np.float32(lo)
    x *= 255.0 / (hi - lo) if hi > lo else 0.0
    np.clip(np.rint(x, out=x), 0, 255, out=x)
    return x.astype(np.uint8)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom while a file is read: its warnings and log records quote header values
    ("Invalid value for VR DA: '<a birth date>'"), and a host that configures logging (Streamlit) prints them."""
    import pydicom

    log = logging.getLogger("pydicom")
    settings = pydicom.config.settings
    before = log.disabled, settings.reading_validation_mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log.disabled, settings.reading_validation_mode = True, pydicom.config.IGNORE
        try:
            yield
        finally:
            log.disabled, settings.reading_validation_mode = before


def read_dicom(source: str | Path | IO[bytes], max_pixels: int, min_side: int) -> Image.Image:
    """The radiograph of a DICOM file as an 8-bit grey ("L") image; `DicomRefused` or `ImageRefused`
    (both `ValueError`) for what is not one or is outside the size limits, `ValueError` for a file
    pydicom cannot read. No message quotes the header (module doc)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from cxrlab.data.images import ImageRefused

    with quiet():
        try:
            marked = has_preamble(source)
            ds = pydicom.dcmread(source, force=not marked)  # forced: a .dcm without the 128-byte preamble
            if not marked and "SOPClassUID" not in ds and "PixelData" not in ds:
                raise InvalidDicomError
            _check(ds, max_pixels, min_side)
            gray = to_gray8(ds.pixel_array, ds)
        except (DicomRefused, ImageRefused):
            raise
        except InvalidDicomError:
            raise ValueError("not a DICOM file (no DICM marker, no readable header)") from None
        except Exception as err:  # noqa: BLE001: any pydicom failure, reported without its text (it may quote the header)
            raise ValueError(f"a DICOM file pydicom cannot decode ({type(err).__name__}); it may be "
                             "truncated or damaged") from None
    return Image.fromarray(gray, mode="L")
