"""DICOM files written with pydicom from the bundled sample's real chest X-rays (for the DICOM node tests).

Every file carries made-up patient identifiers (PHI_VALUES) so that tests can check none of them reaches a
log or results file."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
from PIL import Image

PATIENT_NAME = "Testpatient^Hildegard"
PATIENT_ID = "PID-7731905"
BIRTH_DATE = "19410317"
PHI_VALUES = (PATIENT_NAME, "Testpatient", "Hildegard", PATIENT_ID, BIRTH_DATE)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"


def xray_dataset(
    png: Path, *, modality: str = "DX", view: str | None = "PA", study_uid: str | None = None,
    sop_class: str | None = None, monochrome1: bool = False, pixels: bool = True,
):  # -> pydicom.Dataset  # fmt: skip
    """A 12-bit chest X-ray DICOM (CR, DX or CT SOP class by ``modality``) of a real sample image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    img = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16  # 8 -> 12 bits
    if monochrome1:
        img = 4095 - img
    sop_class = sop_class or {"CR": CR, "DX": DX, "CT": CT, "OT": SC}[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        PATIENT_NAME,
        PATIENT_ID,
        BIRTH_DATE,
        "F",
    )
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _dt.date.today().strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC1", "1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.Manufacturer = "test"
    ds.BodyPartExamined = "CHEST"
    if view is not None:
        ds.ViewPosition = view
    ds.PatientOrientation = ""
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    if pixels:
        ds.PixelData = np.ascontiguousarray(img).tobytes()
    return ds


def write(ds, path: Path) -> Path:  # ds: pydicom.Dataset
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---- shared by the DICOM tests -------------------------------------------------------------------

DEFAULT_CHECKPOINT = (
    Path(__file__).resolve().parents[1] / "src" / "xraydx" / "weights" / "default.safetensors"
)
SOP_CLASSES = (CR, DX, SC, CT, "1.2.840.10008.5.1.4.1.1.88.33")
VERIFICATION = "1.2.840.10008.1.1"


def scu(port: int, aet: str = "TESTSCU", called: str = "XRAYDX"):  # -> pynetdicom Association
    """An association from ``aet`` to the node on 127.0.0.1:``port`` (storage of the test SOP classes + echo)."""
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for uid in (*SOP_CLASSES, VERIFICATION):
        ae.add_requested_context(uid)
    return ae.associate("127.0.0.1", port, ae_title=called)


def echo_ok(port: int) -> bool:
    assoc = scu(port)
    try:
        return bool(assoc.is_established and assoc.send_c_echo().Status == 0)
    finally:
        if assoc.is_established:
            assoc.release()


def predict_probs(files: list[Path], out_csv: Path) -> dict[str, list[float]]:
    """``xraydx predict`` on ``files``: {SOPInstanceUID (file stem): probabilities in class order}."""
    import csv

    import pydicom

    from xraydx.cli import main

    assert main(["predict", *map(str, files), "--out", str(out_csv), "--device", "cpu", "-q"]) == 0
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for r in rows:
        uid = str(pydicom.dcmread(r["path"], stop_before_pixels=True).SOPInstanceUID)
        out[uid] = [float(r[k]) for k in ("prob_covid", "prob_non_covid", "prob_normal")]
    return out


def sr_of(ds) -> dict:  # ds: a Comprehensive SR (pydicom) -> probabilities, predicted code, referenced images
    """Walks the SR content tree by hand (independently of xraydx.dicom.sr.read_sr)."""
    found: dict = {"probs": {}, "refs": [], "codes": {}, "texts": []}

    def walk(items) -> None:
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in it else ""
            if it.ValueType == "NUM" and name.startswith("prob-"):
                found["probs"][name[5:]] = float(it.MeasuredValueSequence[0].NumericValue)
            elif it.ValueType == "CODE":
                found["codes"][name] = it.ConceptCodeSequence[0].CodeValue
            elif it.ValueType == "TEXT":
                found["texts"].append(str(it.TextValue))
            elif it.ValueType == "IMAGE":
                found["refs"].append(str(it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return found


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def predictor():  # -> xraydx.predict.Predictor of the shipped default model, on CPU
    pytest.importorskip("pynetdicom")
    pytest.importorskip("highdicom")
    from xraydx.predict import Predictor

    return Predictor(DEFAULT_CHECKPOINT, "cpu")


def make_node(predictor, out: Path, *, port: int = 0, sender=None, heatmap: bool = False, **kw):  # -> Node
    from xraydx.dicom.node import Node
    from xraydx.dicom.pipeline import Pipeline
    from xraydx.dicom.results import ResultsLog

    pipeline = Pipeline(predictor, out, heatmap=heatmap)
    return Node(pipeline, ResultsLog(out, predictor.classes), port=port, sender=sender, backoff=0.1, **kw)
