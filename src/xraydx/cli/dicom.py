"""``xraydx dicom listen|resend|pull``: the DICOM node, re-sending pending results, the DICOMweb pull
(xraydx.dicom; docs/pacs.md)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

from xraydx.cli._common import SubParsers, checkpoint
from xraydx.constants import ENGINES
from xraydx.errors import EXIT_OK, EXIT_PARTIAL, UsageError

HELP = "DICOM node and DICOMweb client: classify chest X-rays from a PACS, send the results back as SR"


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("dicom", help=HELP, description=__doc__)
    dsub = p.add_subparsers(dest="dicom_command", required=True)

    li = dsub.add_parser("listen", help="C-ECHO/C-STORE SCP: classify what a PACS sends, send SRs back")
    li.add_argument("--aet", default="XRAYDX", help="this node's AE title (default XRAYDX)")
    li.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    li.add_argument(
        "--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)"
    )
    li.add_argument(
        "--allow", metavar="AET[,AET]", help="calling AE titles accepted; others are rejected at association"
    )
    li.add_argument("--max-associations", type=int, default=8, help="associations at a time (default 8)")
    li.add_argument(
        "--keep", action="store_true", help="keep received files in OUT/received (default: deleted)"
    )
    _model_flags(li)
    _send_flags(li)
    li.set_defaults(func=run_listen)

    rs = dsub.add_parser("resend", help="send the results left pending by failed sends")
    rs.add_argument("--out", required=True, help="the node's or pull's output folder")
    rs.add_argument("--aet", default="XRAYDX", help="calling AE title for C-STORE (default XRAYDX)")
    _send_flags(rs, with_out=False)
    rs.set_defaults(func=run_resend)

    pu = dsub.add_parser("pull", help="DICOMweb: QIDO-RS search, WADO-RS retrieve, classify (resumable)")
    pu.add_argument("--url", required=True, help="DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web")
    which = pu.add_mutually_exclusive_group()
    which.add_argument("--study", metavar="UID", help="only this study")
    which.add_argument("--since", metavar="YYYYMMDD", help="only studies from this date on")
    pu.add_argument("--modality", default="CR,DX", help="series modalities to search (default CR,DX)")
    pu.add_argument("--push-results", action="store_true", help="STOW-RS the SRs back to --url")
    pu.add_argument("--limit", type=int, help="classify at most N instances this run")
    pu.add_argument("--keep", action="store_true", help="keep retrieved files in OUT/received")
    pu.add_argument("--retries", type=int, default=3, help="retries per send and per retrieve (default 3)")
    pu.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")
    pu.add_argument("--out", required=True, help="output folder: results.jsonl/.csv, results/, pending/")
    _model_flags(pu)
    pu.set_defaults(func=run_pull)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model (default: the shipped model)")
    p.add_argument("--engine", choices=list(ENGINES), default="torch", help="torch, or onnx (onnxruntime)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--heatmap", action="store_true", help="also send a Grad-CAM Secondary Capture")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")


def _send_flags(p: argparse.ArgumentParser, with_out: bool = True) -> None:
    dest = p.add_mutually_exclusive_group(required=not with_out)
    dest.add_argument("--send-to", metavar="AET@HOST:PORT", help="C-STORE the results to this DICOM node")
    dest.add_argument("--stow", metavar="URL", help="STOW-RS the results to this DICOMweb base URL")
    if with_out:
        p.add_argument("--out", required=True, help="output folder: results.jsonl/.csv, results/, pending/")
        p.add_argument("--retries", type=int, default=3, help="retries per send (default 3)")
        p.add_argument(
            "--timeout", type=float, default=30.0, help="seconds per network operation (default 30)"
        )
    else:
        p.add_argument("--retries", type=int, default=1, help="retries per file (default 1)")
        p.add_argument(
            "--timeout", type=float, default=30.0, help="seconds per network operation (default 30)"
        )


def _logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("xraydx.dicom")
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    for noisy in ("highdicom", "pynetdicom", "dicomweb_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _sender(args: argparse.Namespace, aet: str) -> Any:
    from xraydx.dicom.send import CStoreSender, Destination, StowSender

    if getattr(args, "send_to", None):
        try:
            return CStoreSender(Destination.parse(args.send_to), calling_aet=aet, timeout=args.timeout)
        except ValueError as exc:
            raise UsageError(f"--send-to: {exc}") from None
    if getattr(args, "stow", None):
        return StowSender(args.stow, timeout=args.timeout)
    return None


def _pipeline(args: argparse.Namespace) -> tuple[Any, Any]:
    """The Predictor exactly as ``xraydx predict`` builds it, the pipeline and the results log."""
    from xraydx.dicom.pipeline import Pipeline
    from xraydx.dicom.results import ResultsLog
    from xraydx.predict import Predictor

    pred = Predictor(checkpoint(args), args.device, engine=args.engine)
    try:
        pipeline = Pipeline(pred, Path(args.out), heatmap=args.heatmap, keep=args.keep)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return pipeline, ResultsLog(Path(args.out), pred.classes, pred.model_id)


def _check_listen(args: argparse.Namespace) -> list[str]:
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be 0..65535; got {args.port}")
    if args.max_associations < 1:
        raise UsageError("--max-associations must be at least 1")
    allow = [a.strip() for a in (args.allow or "").split(",") if a.strip()]
    if any(len(a) > 16 for a in allow):
        raise UsageError("--allow: AE titles have at most 16 characters")
    try:
        loopback = ipaddress.ip_address(args.bind).is_loopback
    except ValueError:
        loopback = args.bind == "localhost"
    if not loopback and not allow:
        raise UsageError(f"--bind {args.bind} is reachable from the network: give --allow AET[,AET] as well")
    return allow


def run_listen(args: argparse.Namespace) -> int:
    from xraydx.dicom.node import Node

    _logging(args.quiet)
    allow = _check_listen(args)
    sender = _sender(args, args.aet)
    pipeline, results = _pipeline(args)
    pipeline.warm_up()
    node = Node(
        pipeline, results, aet=args.aet, bind=args.bind, port=args.port, allow=allow,
        max_associations=args.max_associations, sender=sender, retries=args.retries,
        network_timeout=max(args.timeout, 1.0),
    )  # fmt: skip

    def ready(n: Node) -> None:
        to = f"; results to {sender.name}" if sender is not None else ""
        who = ",".join(allow) if allow else "any AE title"
        print(f"xraydx: DICOM node {n.aet} on {n.bind}:{n.port} (accepting {who}){to}; log in {args.out}"
              " (SIGTERM or Ctrl-C stops it)", file=sys.stderr, flush=True)  # fmt: skip

    try:
        node.serve_forever(ready=ready)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.bind}:{args.port} ({exc.strerror or exc})") from None
    c = node.counts
    print(f"xraydx: stopped; {c.get('ok', 0)} classified, {c.get('skipped', 0)} skipped, {c.get('error', 0)} errors",
          file=sys.stderr)  # fmt: skip
    return EXIT_OK


def run_resend(args: argparse.Namespace) -> int:
    from xraydx.dicom.results import ResultsLog
    from xraydx.dicom.send import Outbox, resend

    _logging(False)
    out = Path(args.out)
    log = ResultsLog.open_existing(out)
    sender = _sender(args, args.aet)
    sent, failed = resend(Outbox(out), sender, log, retries=args.retries)
    print(f"xraydx: {sent} sent to {sender.name}, {failed} still pending", file=sys.stderr)
    return EXIT_PARTIAL if failed else EXIT_OK


def run_pull(args: argparse.Namespace) -> int:
    from xraydx.dicom.pull import connect, pull
    from xraydx.dicom.send import Outbox, StowSender

    _logging(args.quiet)
    modalities = [m.strip().upper() for m in args.modality.split(",") if m.strip()]
    if not modalities:
        raise UsageError("--modality needs at least one modality, e.g. CR,DX")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    pipeline, results = _pipeline(args)
    sender = StowSender(args.url, timeout=args.timeout) if args.push_results else None
    try:
        counts = pull(
            connect(args.url, timeout=args.timeout, retries=args.retries), pipeline, results, study=args.study,
            since=args.since, modalities=modalities, sender=sender, retries=args.retries, limit=args.limit,
        )  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    pending = len(Outbox(Path(args.out)).pending())
    print(f"xraydx: pulled {counts['ok']} classified, {counts['skipped']} skipped, {counts['error']} errors,"
          f" {counts['already']} already done; log in {args.out}", file=sys.stderr)  # fmt: skip
    return EXIT_PARTIAL if counts["error"] or pending else EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Dispatch to the sub-command (each sub-parser sets ``func`` to its own runner)."""
    return int(args.func(args))
