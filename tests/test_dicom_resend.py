"""A failed send (Orthanc stopped) leaves the SR pending; resend delivers it once Orthanc is back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
from dicomfiles import make_node, predictor, scu, sr_of, xray_dataset  # noqa: F401
from orthanc_server import empty_orthanc, orthanc  # noqa: F401

from conftest import sample_images

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def test_send_failure_is_pending_until_resend(tmp_path: Path, predictor, empty_orthanc) -> None:  # noqa: F811
    from xraydx.dicom.results import ResultsLog
    from xraydx.dicom.send import CStoreSender, Destination, Outbox, resend

    source = xray_dataset(sample_images("test", "normal")[1])
    out = tmp_path / "out"
    sender = CStoreSender(Destination("ORTHANC", "127.0.0.1", empty_orthanc.dicom_port), timeout=5)
    empty_orthanc.stop()
    with make_node(predictor, out, sender=sender, retries=1) as node:
        assoc = scu(node.port)
        assert assoc.send_c_store(source).Status == 0x0000  # classified; the send is the node's business
        assoc.release()
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["status"] == "ok"
    assert row["send"].startswith("failed: association with ORTHANC@") and row["send"].endswith("(pending)")
    pending = Outbox(out).pending()
    assert [p.stem for p in pending] == row["results"].split()
    assert (out / "results" / pending[0].name).is_file()  # the SR stays in --out

    log = ResultsLog(out, predictor.classes)
    assert resend(Outbox(out), sender, log, retries=0) == (0, 1)  # still down: still pending
    assert Outbox(out).pending() == pending

    empty_orthanc.start()
    assert resend(Outbox(out), sender, log, retries=0) == (1, 0)
    assert Outbox(out).pending() == []
    ids = empty_orthanc.wait_for_class(COMPREHENSIVE_SR, 1)
    assert len(ids) == 1
    sr = pydicom.dcmread(io.BytesIO(empty_orthanc.file(ids[0])))
    assert sr.SOPInstanceUID == pending[0].stem
    assert sr_of(sr)["refs"] == [source.SOPInstanceUID]
    events = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["received", "resend", "resend"]
    assert events[1]["send"].startswith("failed: ") and events[2]["send"].startswith("sent to ORTHANC@")
    assert events[2]["sop_instance_uid"] == sr.SOPInstanceUID
