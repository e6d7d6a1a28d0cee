"""DICOM radiographs: decoded to the PNG path's pixels, refused in one line when unusable, and no header
field (a canary in every patient-data tag) ever reaches an output, a log or a message."""

from __future__ import annotations

import io
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from cxrlab.data.images import check_image, is_image_file, load_rgb, natural_key
from tests.conftest import TINY, copy_project, set_params

LIMITS = {"max_pixels": 10**8, "min_side": 16}
CANARY = "ZZPHICANARY"
CANARY_DATE = "18880808"
CANARY_UID = "1.2.826.0.1.3680043.10.188808"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
PHI_TEXT = ("PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "PatientAddress",
            "PatientMotherBirthName", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
            "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "AccessionNumber", "StudyID",
            "StudyDescription", "SeriesDescription", "StationName", "DeviceSerialNumber", "ImageComments",
            "PatientComments", "RequestingPhysician")
PHI_DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12, modality: str | None = "DX",
          compress=None, **attributes):
    """A DICOM file of `pixels` (stored values), with the canary in every patient-data tag."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX_STORAGE, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = CANARY_UID + ".1", CANARY_UID + ".2"
    for tag in PHI_TEXT:
        setattr(ds, tag, CANARY)
    for tag in PHI_DATES:
        setattr(ds, tag, CANARY_DATE)
    if modality:
        ds.Modality = modality
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits)
    for key, value in attributes.items():
        setattr(ds, key, value)
    if compress is not None:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    return path


def png(path, pixels: np.ndarray):
    Image.fromarray(pixels).save(path)
    return path


def twelve_bit(seed: int = 0, shape=(40, 48)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)
    pixels[0, 0] = 4095  # the PNG path reads a 16-bit PNG whose brightest pixel needs 12 bits as 12-bit data
    return pixels


def test_a_dicom_decodes_to_the_pixels_of_a_png_of_the_same_values(tmp_path):
    stored = twelve_bit()
    want = load_rgb(png(tmp_path / "x.png", stored), 32, **LIMITS)
    same = {
        "MONOCHROME2, 12 bits in 16": dicom(tmp_path / "m2.dcm", stored),
        "MONOCHROME1 (inverted)": dicom(tmp_path / "m1.dcm", 4095 - stored, "MONOCHROME1"),
        "rescale slope and intercept": dicom(tmp_path / "r.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                                             RescaleType="US"),
        "JPEG 2000 lossless": dicom(tmp_path / "j2k.dcm", stored, compress=JPEG2000Lossless),
        "RLE lossless": dicom(tmp_path / "rle.dcm", stored, compress=RLELossless),
        "no suffix, named by UID": dicom(tmp_path / "1.2.840.113619.2.55.3.604", stored),
    }
    for what, path in same.items():
        assert np.array_equal(load_rgb(path, 32, **LIMITS), want), what
    eight = stored.astype(np.uint8)  # 8 bits stored: byte for byte the 8-bit PNG
    assert np.array_equal(load_rgb(dicom(tmp_path / "8.dcm", eight, bits=8), 32, **LIMITS),
                          load_rgb(png(tmp_path / "8.png", eight), 32, **LIMITS))
    # uploads on the page come as bytes, without a name
    upload = io.BytesIO(same["MONOCHROME1 (inverted)"].read_bytes())
    assert np.array_equal(load_rgb(upload, 32, **LIMITS), want)
    # listed as images: by suffix, and without one by the DICM marker; UID names keep their last number as ID
    (tmp_path / "notes").write_text("x" * 200)
    assert is_image_file(same["no suffix, named by UID"]) and not is_image_file(tmp_path / "notes")
    assert natural_key("1.2.840.113619.2.55.3.604") != natural_key("1.2.840.113619.2.55.3.605")


def test_a_window_maps_its_range_onto_black_to_white(tmp_path):
    stored = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))  # a ramp: 64 columns, 0..4032
    path = dicom(tmp_path / "w.dcm", stored, WindowCenter=[2048, 1000], WindowWidth=[1024, 400])
    row = load_rgb(path, 64, **LIMITS)[0, 0].astype(int)
    # the first window (2048 +- 512): everything below it black, above it white, linear inside
    assert (row[stored[0] <= 1535] == 0).all() and (row[stored[0] >= 2560] == 255).all()
    inside = (stored[0] > 1600) & (stored[0] < 2500)
    expected = ((stored[0][inside] - 2047.5) / 1023 + 0.5) * 255
    assert np.abs(row[inside] - expected).max() <= 1
    # MONOCHROME1 with the same window: its mirror image
    mirrored = load_rgb(dicom(tmp_path / "w1.dcm", stored, "MONOCHROME1", WindowCenter=2048, WindowWidth=1024),
                        64, **LIMITS)[0, 0].astype(int)
    assert (mirrored == 255 - row).all()


def refused_files(folder) -> dict:
    """Files that hold no usable radiograph, each with the canary in its patient-data tags."""
    stored = twelve_bit(1)
    mpeg = dicom(folder / "mpeg.dcm", stored)  # a transfer syntax no installed decoder reads
    ds = pydicom.dcmread(mpeg)
    ds.file_meta.TransferSyntaxUID, ds.PixelData = MPEG2MPML, encapsulate([b"\0" * 64])
    ds.save_as(mpeg)
    frames = dicom(folder / "frames.dcm", np.stack([stored, stored]), NumberOfFrames=2)
    report = dicom(folder / "report.dcm", None, modality="SR")
    no_pixels = dicom(folder / "nopixels.dcm", None, modality=None)
    ct = dicom(folder / "ct.dcm", stored, modality="CT")
    odd = dicom(folder / "odd.dcm", stored, modality=CANARY)  # free text where a code belongs: not repeated
    (folder / "junk.dcm").write_bytes(b"not a dicom file " * 20)
    return {mpeg: "MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100), which no installed pixel decoder",
            frames: "multi-frame DICOM (2 frames)", report: "modality SR, not a radiograph",
            no_pixels: "DICOM without an image (pixel data)", ct: "modality CT, not a radiograph",
            odd: "DICOM of another modality, not a radiograph",
            folder / "junk.dcm": "not a DICOM file"}


def test_an_unusable_dicom_is_one_line_naming_what_is_wrong_and_nothing_of_its_header(tmp_path):
    for path, expected in refused_files(tmp_path).items():
        why = check_image(path, **LIMITS)
        assert why and expected in why and "\n" not in why, (path.name, why)
        assert CANARY not in why and CANARY_DATE not in why, why


@pytest.mark.slow
def test_dicom_through_split_preprocess_training_predict_and_the_page_leaks_no_header(tmp_path, monkeypatch,
                                                                                     capfd):
    """A folder of DICOM radiographs of every kind (and unusable ones, skipped) trains, predicts and scores on
    the page; the canary of the patient-data tags is in no file the pipeline writes and in nothing it prints."""
    from cxrlab.serving.predict import decode, variant_predictor
    from stages import download, prepare, preprocess, split, train

    source = tmp_path / "source"
    kinds = [{}, {"photometric": "MONOCHROME1"}, {"RescaleSlope": 2, "RescaleIntercept": 0},
             {"WindowCenter": 2048, "WindowWidth": 3000}, {"compress": RLELossless}, {"compress": JPEG2000Lossless}]
    for label, (cls, level) in enumerate((("health", 1000), ("tb", 3000))):  # params.yaml's class folders
        (source / cls).mkdir(parents=True)
        rng = np.random.default_rng(label)
        for i in range(12):
            stored = np.clip(rng.normal(level, 400, (32, 32)), 0, 4095).astype(np.uint16)
            kind = dict(kinds[i % len(kinds)])
            if kind.get("photometric") == "MONOCHROME1":
                stored = 4095 - stored
            dicom(source / cls / (f"{cls[0]}{i}.dcm" if i != 11 else f"1.2.3.{i}"), stored, **kind)
    bad = refused_files(source / "tb")
    project = copy_project(tmp_path / "project")
    set_params(project / "params.yaml", {**TINY, "data.source": str(source), "data.on_bad_image": "skip",
                                         "train.epochs": 1, "experiments": {"baseline": {}}, "ensembles": {}})
    monkeypatch.chdir(project)
    for stage in (download, split, prepare, preprocess):
        stage.main([])
    skipped = (project / "metrics" / "split_report.json").read_text()
    assert all(f"tb/{p.name}" in skipped for p in bad), skipped
    train.main(["baseline"])

    # predict: a PNG and a DICOM of the same stored values get the same probabilities
    same = twelve_bit(2, (32, 32))
    inputs = tmp_path / "new"
    inputs.mkdir()
    png(inputs / "a.png", same)
    dicom(inputs / "b.dcm", same)
    dicom(inputs / "c", 4095 - same, "MONOCHROME1")  # no suffix: found by its marker
    refused_files(inputs)
    from cxrlab.cli import predict

    predict.main(["--variant", "baseline", str(inputs), "--out", str(tmp_path / "out" / "preds.csv")])
    rows = [line.split(",") for line in (tmp_path / "out" / "preds.csv").read_text().splitlines()[1:]]
    scores = {row[0].rsplit("/", 1)[-1]: row[1:] for row in rows}
    assert set(scores) == {"a.png", "b.dcm", "c"} and scores["a.png"] == scores["b.dcm"] == scores["c"], scores

    # the page's scoring: an upload (bytes) decoded as predict decodes files, then scored and explained
    predictor = variant_predictor("baseline")
    image = decode(io.BytesIO((inputs / "b.dcm").read_bytes()), predictor.image_size, 10**8, 16)
    probs = predictor.probabilities(image[None])
    assert predictor.heatmaps(image[None], predictor.explained_class(probs[0])).shape == (1, 32, 32)
    assert "multi-frame DICOM (2 frames)" in decode(io.BytesIO((inputs / "frames.dcm").read_bytes()),
                                                    32, 10**8, 16)

    out, err = capfd.readouterr()
    sys.stdout.write(out[-3000:])
    assert "skipped" in err and "frames.dcm" in err  # predict named the refused files ...
    leaks = [name for name, text in (("stdout", out), ("stderr", err))
             if CANARY in text or CANARY_DATE in text or CANARY_UID in text]
    # every file written but the DICOM files themselves (data/raw and its arrangement in data/dataset)
    inputs = {p.read_bytes() for p in source.rglob("*") if p.is_file()}
    written = [p for p in list(project.rglob("*")) + list((tmp_path / "out").rglob("*"))
               if p.is_file() and p.read_bytes() not in inputs]
    assert any(p.suffix == ".npy" for p in written) and any(p.suffix == ".pt" for p in written), written
    for path in written:
        data = path.read_bytes()
        if any(c.encode() in data for c in (CANARY, CANARY_DATE, CANARY_UID)):
            leaks.append(str(path))
    assert not leaks, leaks  # ... and nothing of any header went anywhere
