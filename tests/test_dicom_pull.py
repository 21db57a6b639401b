"""DICOMweb pull (QIDO-RS, WADO-RS, STOW-RS of the SRs) against Orthanc's DICOMweb plugin, with resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
from dicomfiles import predict_probs, predictor, sr_of, write, xray_dataset  # noqa: F401
from orthanc_server import empty_orthanc, orthanc  # noqa: F401

from conftest import sample_images

pytest.importorskip("dicomweb_client")
pytest.importorskip("highdicom")

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
CLASSES = ("covid", "non_covid", "normal")


def test_pull_classifies_pushes_and_resumes(tmp_path: Path, predictor, empty_orthanc) -> None:  # noqa: F811
    from xraydx.dicom.pipeline import Pipeline
    from xraydx.dicom.pull import connect, pull
    from xraydx.dicom.results import ResultsLog
    from xraydx.dicom.send import StowSender

    study = pydicom.uid.generate_uid()
    sources = [
        xray_dataset(sample_images("val", "covid")[0], modality="CR", study_uid=study),
        xray_dataset(sample_images("val", "normal")[0], modality="DX", study_uid=study),
    ]
    other = xray_dataset(sample_images("val", "normal")[1], modality="CR")  # another study: not pulled
    files = [write(ds, tmp_path / "in" / f"{ds.SOPInstanceUID}.dcm") for ds in [*sources, other]]
    for f in files:
        empty_orthanc.upload(f)
    expected = predict_probs(files[:2], tmp_path / "predict.csv")

    out = tmp_path / "out"
    client = connect(empty_orthanc.dicomweb, timeout=30)
    stow = StowSender(empty_orthanc.dicomweb)

    def run(**kw: object) -> dict[str, int]:
        pipeline = Pipeline(predictor, out)
        return pull(client, pipeline, ResultsLog(out, predictor.classes), study=study,
                    modalities=["CR", "DX"], sender=stow, retries=0, **kw)  # fmt: skip

    first = run(limit=1)  # stopped after one instance, as a killed run would be
    assert first["ok"] == 1 and first["already"] == 0
    second = run()
    assert second == {"ok": 1, "skipped": 0, "error": 0, "already": 1}
    third = run()
    assert third == {"ok": 0, "skipped": 0, "error": 0, "already": 2}

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(ds.SOPInstanceUID for ds in sources)
    for r in rows:
        assert r["event"] == "pulled" and r["status"] == "ok"
        assert r["send"] == f"sent to {empty_orthanc.dicomweb}"
        assert [float(r[f"prob_{c}"]) for c in CLASSES] == pytest.approx(
            expected[r["sop_instance_uid"]],
            abs=2e-6,  # two 6-decimal roundings, another process
        )
    ids = empty_orthanc.wait_for_class(COMPREHENSIVE_SR, 2)
    assert len(ids) == 2
    for iid in ids:
        sr = pydicom.dcmread(io.BytesIO(empty_orthanc.file(iid)))
        found = sr_of(sr)
        (ref,) = found["refs"]
        assert sr.StudyInstanceUID == study
        assert [found["probs"][c] for c in CLASSES] == pytest.approx(expected[ref], abs=2e-6)
