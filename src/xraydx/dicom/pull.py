"""``xraydx dicom pull``: QIDO-RS search, WADO-RS retrieve, classify, optionally STOW-RS the results back.

Series are searched by modality (one QIDO-RS query per ``--modality`` value; ``--study`` limits the
search to one study, ``--since YYYYMMDD`` to studies from that date on), then their instances; each
instance not yet in the results log with a final status (``ok`` or ``skipped``) is retrieved and goes
through the same pipeline as an instance the node receives. A rerun after a kill or a network failure
therefore carries on where it stopped; instances whose record says ``error`` are tried again.

Every HTTP request has a timeout; WADO-RS retrieval is retried (dicomweb-client's retry, bounded).
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

from xraydx.dicom.pipeline import Pipeline
from xraydx.dicom.results import Record, ResultsLog, clean_uid
from xraydx.dicom.send import Outbox, Sender, send_results
from xraydx.errors import XraydxError

__all__ = ["connect", "pull"]

STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"
_DATE = re.compile(r"^\d{8}$")


class PullError(XraydxError, RuntimeError):
    """The DICOMweb server cannot be searched (unreachable, refused, not DICOMweb)."""


def _value(item: dict[str, Any], tag: str) -> str:
    v = (item.get(tag) or {}).get("Value") or [""]
    return str(v[0])


def connect(url: str, timeout: float = 60.0, retries: int = 3) -> Any:
    """A dicomweb_client.DICOMwebClient for ``url`` whose every request has ``timeout`` seconds."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    class _Session(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            kwargs.setdefault("timeout", timeout)
            return super().request(*args, **kwargs)

    client = DICOMwebClient(url=url.rstrip("/"), session=_Session())
    client.set_http_retry_params(
        retry=retries > 0, max_attempts=max(1, retries + 1), wait_exponential_multiplier=500,
        retriable_error_codes=(429, 502, 503, 504),
    )  # fmt: skip
    return client


def _series(
    client: Any, study: str | None, since: str | None, modalities: Sequence[str]
) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    for modality in modalities:
        filters: dict[str, str] = {"Modality": modality}
        if since:
            filters["StudyDate"] = f"{since}-"
        found = client.search_for_series(study_instance_uid=study, search_filters=filters, get_remaining=True)
        for item in found or []:
            st, se = clean_uid(_value(item, STUDY)) or (study or ""), clean_uid(_value(item, SERIES))
            if se and se != "invalid" and se not in seen:
                seen.add(se)
                yield st, se


def pull(
    client: Any, pipeline: Pipeline, results: ResultsLog, *, study: str | None = None, since: str | None = None,
    modalities: Sequence[str] = ("CR", "DX"), sender: Sender | None = None, retries: int = 3,
    backoff: float = 1.0, limit: int | None = None,
) -> dict[str, int]:  # fmt: skip
    """Pull, classify and (with ``sender``) push back; returns counts by status and ``already`` (resumed)."""
    import requests

    if since is not None and not _DATE.match(since):
        raise ValueError(f"--since expects YYYYMMDD; got {since!r}")
    if study is not None and clean_uid(study) in ("", "invalid"):
        raise ValueError(f"--study expects a Study Instance UID; got {study!r}")
    done = results.done_instances()
    outbox = Outbox(pipeline.out)
    counts = {"ok": 0, "skipped": 0, "error": 0, "already": 0}
    n = 0
    try:
        for st, se in _series(client, study, since, modalities):
            for item in (
                client.search_for_instances(study_instance_uid=st, series_instance_uid=se, get_remaining=True)
                or []
            ):
                sop = clean_uid(_value(item, SOP))
                if not sop or sop == "invalid":
                    continue
                if sop in done:
                    counts["already"] += 1
                    continue
                if limit is not None and n >= limit:
                    return counts
                n += 1
                rec = _one(client, pipeline, outbox, sender, st, se, sop, retries=retries, backoff=backoff)
                results.write(rec)
                done.add(sop)
                key = rec.status.split(":", 1)[0]
                counts[key] = counts.get(key, 0) + 1
    except requests.RequestException as exc:
        raise PullError(f"DICOMweb search failed ({type(exc).__name__}: {str(exc)[:160]})") from None
    return counts


def _one(
    client: Any, pipeline: Pipeline, outbox: Outbox, sender: Sender | None, study: str, series: str, sop: str,
    **send_kw: Any,
) -> Record:  # fmt: skip
    import requests

    t0 = time.perf_counter()
    try:
        ds = client.retrieve_instance(
            study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop
        )
        raw = _file_bytes(ds)
    except requests.RequestException as exc:
        return Record(
            event="pulled", sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=series,
            status=f"error: WADO-RS retrieve failed ({type(exc).__name__})", model_id=pipeline.model.model_id,
            elapsed_ms=f"{(time.perf_counter() - t0) * 1000:.0f}",
        )  # fmt: skip
    except Exception as exc:  # the server sent something pydicom cannot read
        return Record(
            event="pulled", sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=series,
            status=f"error: the retrieved instance cannot be parsed ({type(exc).__name__})",
            model_id=pipeline.model.model_id,
        )  # fmt: skip
    outcome = pipeline.process(raw, ds, event="pulled")
    rec = outcome.record
    rec.dimse_status = ""  # no C-STORE here
    if outcome.results:
        rec.send = send_results(outbox, sender, outcome.results, **send_kw)
    rec.elapsed_ms = f"{(time.perf_counter() - t0) * 1000:.0f}"
    return rec


def _file_bytes(ds: Any) -> bytes:
    """A retrieved dataset as DICOM file bytes (a file meta group is made where the part had none)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
