"""Bad instances at the DICOM node: skipped or rejected with their reasons; the node still answers C-ECHO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dicomfiles import echo_ok, make_node, predictor, scu, write, xray_dataset  # noqa: F401

from conftest import sample_images

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")


def _rows(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["sop_instance_uid"]: r for r in rows}


def test_bad_instances_are_skipped_or_rejected_and_node_stays_up(tmp_path: Path, predictor) -> None:  # noqa: F811
    img = sample_images("test", "covid")[1]
    lateral = xray_dataset(img, view="LL")
    ct = xray_dataset(img, modality="CT", view=None)
    no_pixels = xray_dataset(img, pixels=False)
    good = xray_dataset(img)
    full = write(xray_dataset(img), tmp_path / "full.dcm").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(full[: len(full) - len(full) // 3])  # pixel data cut by a third
    truncated_uid = (
        __import__("pydicom").dcmread(tmp_path / "full.dcm", stop_before_pixels=True).SOPInstanceUID
    )

    out = tmp_path / "out"
    with make_node(predictor, out, allow=["TESTSCU"], max_associations=2) as node:
        expected = {  # instance -> (C-STORE status, record status)
            lateral.SOPInstanceUID: (0x0000, "skipped: lateral view (ViewPosition LL)"),
            ct.SOPInstanceUID: (0x0000, "skipped: modality CT is not CR/DX/chest SC"),
            no_pixels.SOPInstanceUID: (0xA900, "skipped: no pixel data"),
        }
        for ds in (lateral, ct, no_pixels):
            assoc = scu(node.port)
            assert assoc.send_c_store(ds).Status == expected[ds.SOPInstanceUID][0]
            assoc.release()
            assert echo_ok(node.port)
        assoc = scu(node.port)
        status = assoc.send_c_store(truncated)  # pynetdicom sends the file's bytes as they are
        assoc.release()
        assert status.Status in range(0xC000, 0xD000)  # "cannot understand": a failure, not a success
        assert echo_ok(node.port)

        rejected = scu(node.port, aet="INTRUDER")
        assert rejected.is_rejected and not rejected.is_established
        assert echo_ok(node.port)

        held = [scu(node.port), scu(node.port)]  # a flood: --max-associations 2
        assert all(a.is_established for a in held)
        extra = scu(node.port)
        assert extra.is_rejected
        held[0].abort()  # a client that drops mid-association
        held[1].release()
        assert echo_ok(node.port)

        assoc = scu(node.port)  # and it still classifies
        assert assoc.send_c_store(good).Status == 0x0000
        assoc.release()

    rows = _rows(out)
    for uid, (dimse, status) in expected.items():
        assert rows[uid]["status"] == status
        assert rows[uid]["dimse_status"] == f"0x{dimse:04X}"
        assert rows[uid]["results"] is None and rows[uid]["prob_covid"] is None  # JSON nulls (xraydx.schema)
        assert (rows[uid]["flag"] == "not a frontal chest X-ray") == ("view" in status)
    assert rows[truncated_uid]["status"].startswith("error: ")
    assert rows[truncated_uid]["dimse_status"].startswith("0xC")
    assert rows[good.SOPInstanceUID]["status"] == "ok"
    assert len(rows) == 5  # the rejected association sent nothing, so it has no instance record
    assert not list((out / "results").iterdir())[1:]  # one SR, for the good image only
