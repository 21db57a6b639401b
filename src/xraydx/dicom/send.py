"""Sending results to the PACS: C-STORE SCU (pynetdicom) or STOW-RS (dicomweb-client), with retries;
the pending queue and ``resend``.

A result file is written to ``<out>/results/`` before any send. While it is not delivered, a link to it
(a copy where links are not possible) sits in ``<out>/pending/``; a successful send removes the link. So
a send that fails (PACS down, association rejected, STOW-RS error) loses nothing: ``xraydx dicom resend``
sends what is in ``pending/`` and logs one ``resend`` record per file.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from xraydx.fsutil import atomic_write_bytes

__all__ = ["CStoreSender", "Destination", "Outbox", "SendError", "Sender", "StowSender", "deliver", "resend"]

_DEST = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


class SendError(RuntimeError):
    pass


@dataclass(frozen=True)
class Destination:
    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@HOST:PORT`` (AE title up to 16 characters, no backslash)."""
        m = _DEST.match(text.strip())
        if not m or "\\" in m["aet"] or not 0 < int(m["port"]) < 65536:
            raise ValueError(f"expected AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242); got {text!r}")
        return cls(m["aet"].strip(), m["host"], int(m["port"]))

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


class Sender:
    """Sends DICOM files somewhere; ``send`` raises SendError with a short reason."""

    name = "?"

    def send(self, paths: Sequence[Path]) -> None:
        raise NotImplementedError


class CStoreSender(Sender):
    """One association per batch of files; each file's C-STORE must answer success (or a warning)."""

    def __init__(self, dest: Destination, calling_aet: str = "XRAYDX", timeout: float = 30.0) -> None:
        self.dest = dest
        self.calling_aet = calling_aet
        self.timeout = timeout
        self.name = str(dest)

    def send(self, paths: Sequence[Path]) -> None:
        from pynetdicom import AE

        datasets = [pydicom.dcmread(p) for p in paths]
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(sop_class, [str(datasets[0].file_meta.TransferSyntaxUID)])
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.aet)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
            raise SendError(f"association with {self.dest} {why}")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(getattr(status, "Status", -1)) if status else -1
                if code == -1:
                    raise SendError(f"no C-STORE response from {self.dest} (timeout or connection lost)")
                if code != 0 and not 0xB000 <= code <= 0xBFFF:
                    raise SendError(f"{self.dest} answered C-STORE status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()


class StowSender(Sender):
    """STOW-RS to a DICOMweb base URL (e.g. http://127.0.0.1:8042/dicom-web)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.name = self.url

    def send(self, paths: Sequence[Path]) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        client = DICOMwebClient(url=self.url, session=session)
        client.set_http_retry_params(retry=False)
        datasets = [pydicom.dcmread(p) for p in paths]
        try:
            resp = client.store_instances(datasets)
        except requests.RequestException as exc:
            raise SendError(f"STOW-RS to {self.url} failed ({type(exc).__name__}: {_short(exc)})") from None
        finally:
            session.close()
        failed = resp.get("FailedSOPSequence") if resp is not None else None
        if failed:
            raise SendError(f"STOW-RS to {self.url}: {len(failed)} instance(s) refused")


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:limit]


def deliver(
    sender: Sender, paths: Sequence[Path], *, retries: int = 3, backoff: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:  # fmt: skip
    """Send with ``retries`` more tries after the first, waiting backoff, 2*backoff, ... (at most 30 s).
    Returns the log's send field: ``sent to <dest>`` or ``failed: <reason> (pending)``."""
    reason = ""
    for attempt in range(retries + 1):
        try:
            sender.send(paths)
            return f"sent to {sender.name}"
        except SendError as exc:
            reason = str(exc)
        except Exception as exc:  # a library error must not take the node down; it is a failed send
            reason = f"{type(exc).__name__}: {_short(exc)}"
        if attempt < retries:
            sleep(min(30.0, backoff * 2**attempt))
    return f"failed: {reason} (pending)"


class Outbox:
    """``<out>/results`` (every result file) and ``<out>/pending`` (those not delivered yet)."""

    def __init__(self, out: Path) -> None:
        self.results = Path(out) / "results"
        self.pending_dir = Path(out) / "pending"
        self.results.mkdir(parents=True, exist_ok=True)
        self.pending_dir.mkdir(parents=True, exist_ok=True)

    def hold(self, paths: Sequence[Path]) -> None:
        for p in paths:
            target = self.pending_dir / p.name
            if target.exists():
                continue
            try:
                os.link(p, target)
            except OSError:  # a file system without hard links
                atomic_write_bytes(target, p.read_bytes())

    def release(self, paths: Sequence[Path]) -> None:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                (self.pending_dir / p.name).unlink()

    def pending(self) -> list[Path]:
        return sorted(p for p in self.pending_dir.glob("*.dcm") if p.is_file())


def send_results(outbox: Outbox, sender: Sender | None, paths: Sequence[Path], **kw: Any) -> str:
    """Hold ``paths`` in the outbox, send them, release them on success; the log's send field."""
    if sender is None or not paths:
        return ""
    outbox.hold(paths)
    outcome = deliver(sender, paths, **kw)
    if outcome.startswith("sent"):
        outbox.release(paths)
    return outcome


def resend(outbox: Outbox, sender: Sender, log: Any, **kw: Any) -> tuple[int, int]:
    """Send every pending file (one at a time, so one bad file does not hold back the rest); log one
    ``resend`` record each. Returns (sent, still pending)."""
    from xraydx.dicom.results import Record

    sent = failed = 0
    for path in outbox.pending():
        t0 = time.perf_counter()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            outcome, ds = "failed: unreadable result file (pending)", None
        else:
            outcome = deliver(sender, [path], **kw)
        if outcome.startswith("sent"):
            outbox.release([path])
            sent += 1
        else:
            failed += 1
        hdr: Any = ds if ds is not None else {}
        log.write(
            Record(
                event="resend", sop_instance_uid=path.stem, results=[path.stem], send=outcome,
                study_instance_uid=str(hdr.get("StudyInstanceUID", "")),
                series_instance_uid=str(hdr.get("SeriesInstanceUID", "")),
                sop_class_uid=str(hdr.get("SOPClassUID", "")), modality=str(hdr.get("Modality", "")),
                status="ok" if ds is not None else "error: unreadable result file",
                elapsed_ms=f"{(time.perf_counter() - t0) * 1000:.0f}",
            )
        )  # fmt: skip
    return sent, failed
