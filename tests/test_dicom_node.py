"""The DICOM node against a real Orthanc: C-STORE in, Structured Report back into Orthanc, equal to predict."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from dicomfiles import PHI_VALUES, make_node, predict_probs, predictor, scu, sr_of, write, xray_dataset  # noqa: F401
from orthanc_server import empty_orthanc, orthanc  # noqa: F401

from conftest import sample_images

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

ROOT = Path(__file__).resolve().parents[1]
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CLASSES = ("covid", "non_covid", "normal")


def _srs_in(server, n: int) -> dict[str, pydicom.Dataset]:
    """The SRs stored in Orthanc, read back over its REST API, keyed by the SOP instance they reference."""
    ids = server.wait_for_class(COMPREHENSIVE_SR, n)
    out = {}
    for iid in ids:
        ds = pydicom.dcmread(io.BytesIO(server.file(iid)))
        refs = sr_of(ds)["refs"]
        assert len(refs) == 1
        out[refs[0]] = ds
    return out


def _check_sr(ds: pydicom.Dataset, source: pydicom.Dataset, probs: list[float]) -> None:
    found = sr_of(ds)
    assert found["refs"] == [source.SOPInstanceUID]
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    got = [found["probs"][c] for c in CLASSES]
    assert got == pytest.approx(probs, abs=2e-6)
    top = CLASSES[max(range(3), key=lambda i: probs[i])]
    assert found["codes"]["predicted-class"] == {"covid": "840539006", "normal": "17621005"}.get(top, top)
    assert found["codes"]["uncertainty"] in ("uncertain", "not-flagged")
    assert any("Research use only, not for diagnosis" in t for t in found["texts"])


def _no_phi(out: Path) -> None:
    for name in ("results.jsonl", "results.csv"):
        text = (out / name).read_text()
        for value in PHI_VALUES:
            assert value not in text, f"{value!r} leaked into {name}"
    assert not any((out / "incoming").iterdir()), "received files are deleted after processing"


def _listen(out: Path, orthanc_port: int) -> tuple[subprocess.Popen[str], int]:
    """``xraydx dicom listen`` in its own process on a free port; returns it and the port it printed."""
    cmd = [
        sys.executable, "-m", "xraydx", "dicom", "listen", "--port", "0", "--out", str(out), "--allow", "TESTSCU",
        "--send-to", f"ORTHANC@127.0.0.1:{orthanc_port}", "--device", "cpu", "-q",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"DICOM node XRAYDX on 127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"xraydx dicom listen did not start: {proc.stderr.read()[-2000:]}")


def test_cstore_into_listen_sr_arrives_in_orthanc(tmp_path: Path, empty_orthanc) -> None:  # noqa: F811
    """C-STORE into ``xraydx dicom listen``; SIGTERM right after: the queued sends finish, exit 0, log complete."""
    sources = [
        xray_dataset(sample_images("test", "covid")[0], modality="DX"),
        xray_dataset(sample_images("test", "normal")[0], modality="CR", monochrome1=True),
    ]
    files = [write(ds, tmp_path / "in" / f"{ds.SOPInstanceUID}.dcm") for ds in sources]
    expected = predict_probs(files, tmp_path / "predict.csv")
    out = tmp_path / "out"
    proc, port = _listen(out, empty_orthanc.dicom_port)
    try:
        assoc = scu(port)
        assert assoc.is_established
        for ds in sources:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert not scu(port, aet="OTHER").is_established  # --allow TESTSCU
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    srs = _srs_in(empty_orthanc, len(sources))
    assert set(srs) == {ds.SOPInstanceUID for ds in sources}
    for ds in sources:
        _check_sr(srs[ds.SOPInstanceUID], ds, expected[ds.SOPInstanceUID])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(ds.SOPInstanceUID for ds in sources)
    for r in rows:
        assert r["status"] == "ok" and r["calling_ae"] == "TESTSCU" and r["dimse_status"] == "0x0000"
        assert r["send"] == f"sent to ORTHANC@127.0.0.1:{empty_orthanc.dicom_port}"
        # both sides are written with 6 decimals (each rounded by up to 5e-7), and the node runs in another
        # process, whose float sums may differ in the 7th digit: 2e-6 is two roundings plus that
        assert [float(r[f"prob_{c}"]) for c in CLASSES] == pytest.approx(
            expected[r["sop_instance_uid"]], abs=2e-6
        )
        assert r["model_id"].startswith("mobilenetv2_100-") and len(r["results"].split()) == 1
    assert not any((out / "pending").iterdir())
    _no_phi(out)
    for value in PHI_VALUES:
        assert value not in err


def test_orthanc_forwards_to_node_same_result(tmp_path: Path, predictor, empty_orthanc) -> None:  # noqa: F811
    from xraydx.dicom.send import CStoreSender, Destination

    source = xray_dataset(sample_images("test", "non_covid")[0], modality="DX")
    path = write(source, tmp_path / "in" / "x.dcm")
    expected = predict_probs([path], tmp_path / "predict.csv")[source.SOPInstanceUID]
    orthanc_id = empty_orthanc.upload(path)
    out = tmp_path / "out"
    sender = CStoreSender(Destination("ORTHANC", "127.0.0.1", empty_orthanc.dicom_port))
    with make_node(predictor, out, sender=sender, allow=["ORTHANC"], heatmap=True) as node:
        empty_orthanc.set_node_port(node.port)
        job = empty_orthanc.post(
            "/modalities/xraydx/store", {"Resources": [orthanc_id], "Synchronous": True}, timeout=120
        )
        assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == 1
    srs = _srs_in(empty_orthanc, 1)
    _check_sr(srs[source.SOPInstanceUID], source, expected)
    sc_ids = empty_orthanc.wait_for_class(SECONDARY_CAPTURE, 1)
    assert len(sc_ids) == 1  # --heatmap: the Grad-CAM Secondary Capture, in the same study
    sc = pydicom.dcmread(io.BytesIO(empty_orthanc.file(sc_ids[0])))
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PhotometricInterpretation == "RGB"
    assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["calling_ae"] == "ORTHANC" and row["status"] == "ok" and len(row["results"].split()) == 2
    _no_phi(out)
