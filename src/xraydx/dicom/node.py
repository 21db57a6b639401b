"""The DICOM node: a C-ECHO and C-STORE SCP (pynetdicom) that classifies what it receives.

* Associations: the calling AE title must be in the allow-list (when one is given; others are rejected
  at association with "calling AE title not recognised"); at most ``max_associations`` at a time (more
  are rejected, transient, "local limit exceeded"); idle or dropped peers are closed after the network
  timeout. Storage is offered for every storage SOP class (an instance the node does not classify, a CT
  say, is accepted and logged as skipped, so a PACS forwarding a whole study does not see failures), with
  the transfer syntaxes pydicom can decode here.
* Each C-STORE is screened and classified in the association's thread (xraydx.dicom.pipeline; one
  Predictor behind a lock), so its response status says what happened to the data. Results are queued
  to one sender thread (C-STORE SCU or STOW-RS, with retries), which writes the instance's record once
  the send is done; without a destination the record is written at once.
* :meth:`Node.stop` (SIGTERM, Ctrl-C): the server stops accepting, associations in progress finish
  (bounded by ``drain_timeout``), the send queue is emptied, then the log is complete.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xraydx.dicom.pipeline import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Pipeline, decodable_transfer_syntaxes
from xraydx.dicom.results import Record, ResultsLog, clean_code, clean_uid
from xraydx.dicom.send import Outbox, Sender, send_results

__all__ = ["Node"]

log = logging.getLogger("xraydx.dicom")


class Node:
    def __init__(
        self, pipeline: Pipeline, results: ResultsLog, *, aet: str = "XRAYDX", bind: str = "127.0.0.1",
        port: int = 11112, allow: Sequence[str] | None = None, max_associations: int = 8,
        sender: Sender | None = None, retries: int = 3, backoff: float = 1.0, network_timeout: float = 60.0,
        drain_timeout: float = 120.0,
    ) -> None:  # fmt: skip
        self.pipeline, self.results = pipeline, results
        self.aet, self.bind, self.port = aet, bind, int(port)
        self.allow = [a.strip() for a in allow or [] if a.strip()]
        self.max_associations = int(max_associations)
        self.sender = sender
        self.send_kw = {"retries": int(retries), "backoff": float(backoff)}
        self.network_timeout = float(network_timeout)
        self.drain_timeout = float(drain_timeout)
        self.outbox = Outbox(pipeline.out)
        self.counts: dict[str, int] = {"ok": 0, "skipped": 0, "error": 0}
        self._ae: Any = None
        self._server: Any = None
        self._queue: queue.Queue[tuple[Record, list[Path]] | None] = queue.Queue(maxsize=256)
        self._sender_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._count_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Node:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.aet)
        ae.maximum_associations = self.max_associations
        ae.network_timeout = self.network_timeout
        ae.acse_timeout = ae.dimse_timeout = 30.0
        ae.maximum_pdu_size = 0  # no limit on the PDU size we accept (the peer's choice)
        if self.allow:
            ae.require_calling_aet = self.allow
        syntaxes = decodable_transfer_syntaxes()
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store)]
        self._server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        self._ae = ae
        if self.sender is not None:
            self._sender_thread = threading.Thread(
                target=self._send_loop, name="xraydx-dicom-send", daemon=True
            )
            self._sender_thread.start()
        log.info("xraydx dicom: %s listening on %s:%d", self.aet, self.bind, self.port)
        return self

    def stop(self) -> None:
        """Graceful: stop accepting, let associations in progress finish, empty the send queue."""
        if self._server is None:
            return
        self._stop.set()
        self._server.shutdown()
        deadline = time.monotonic() + self.drain_timeout
        while self._ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._ae.active_associations:  # still busy after drain_timeout
            assoc.abort()
        if self._sender_thread is not None:
            self._queue.put(None)
            self._sender_thread.join()
        self._server = None

    def serve_forever(self, ready: Any = None) -> None:
        """Start, wait for SIGTERM/SIGINT, stop gracefully (main thread only: it installs signal handlers)."""
        got = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            got.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if ready is not None:
                ready(self)
            while not got.wait(0.5):
                pass
            log.info("xraydx dicom: stopping (finishing the instances in progress)")
        finally:
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers (association threads) ----------------------------------------------------------

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> int:
        calling = clean_code(event.assoc.requestor.ae_title)
        try:
            raw = event.encoded_dataset(include_meta=True)
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.get("SOPInstanceUID")  # forces parsing of the start of the data
        except Exception as exc:
            rec = Record(
                event="received", sop_instance_uid=clean_uid(event.request.AffectedSOPInstanceUID),
                sop_class_uid=clean_uid(event.request.AffectedSOPClassUID), calling_ae=calling,
                status=f"error: the dataset cannot be parsed ({type(exc).__name__})",
                dimse_status=f"0x{CANNOT_UNDERSTAND:04X}", model_id=self.pipeline.model.model_id,
            )  # fmt: skip
            self._record(rec)
            return CANNOT_UNDERSTAND
        outcome = self.pipeline.process(raw, ds, event="received", calling_ae=calling)
        if outcome.results and self.sender is not None:
            try:
                self._queue.put((outcome.record, outcome.results), timeout=30.0)
            except queue.Full:
                self.outbox.hold(outcome.results)
                outcome.record.send = "failed: send queue full (pending)"
                self._record(outcome.record)
        else:
            self._record(outcome.record)
        if outcome.dimse_status == OUT_OF_RESOURCES:
            log.warning(
                "xraydx dicom: %s refused (%s)", outcome.record.sop_instance_uid, outcome.record.status
            )
        return outcome.dimse_status

    def _record(self, rec: Record) -> None:
        self.results.write(rec)
        key = rec.status.split(":", 1)[0]
        with self._count_lock:
            self.counts[key] = self.counts.get(key, 0) + 1
        log.info("xraydx dicom: %s from %s: %s%s", rec.sop_instance_uid, rec.calling_ae or "?", rec.status,
                 f"; {rec.send}" if rec.send else "")  # fmt: skip

    # -- sender thread ----------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            rec, paths = item
            try:
                rec.send = send_results(self.outbox, self.sender, paths, **self.send_kw)
            except Exception as exc:  # never lose the record
                rec.send = f"failed: {type(exc).__name__} (pending)"
            self._record(rec)
