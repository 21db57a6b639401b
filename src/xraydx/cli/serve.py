"""``xraydx serve``: a REST API and a web page for one checkpoint (the server itself is :mod:`xraydx.serve`)."""

from __future__ import annotations

import argparse
import math

from xraydx.cli._common import SubParsers
from xraydx.config import MIB, ServeConfig
from xraydx.constants import ENGINES, TOKEN_ENV
from xraydx.errors import ConfigError


def _positive_float(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def _port(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {text}")
    return v


def add_parser(sub: SubParsers) -> None:
    """``xraydx serve``'s arguments; the defaults are :class:`~xraydx.config.ServeConfig`'s."""
    sp = sub.add_parser(
        "serve",
        help="REST API + web page for one checkpoint",
        description="Serve a checkpoint over HTTP: a web page at /, the API under /api, docs at /docs.",
    )
    sp.add_argument("--checkpoint", help="checkpoint (.safetensors); default: the model shipped with xraydx")
    sp.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    sp.add_argument("--port", type=_port, default=8000)
    sp.add_argument(
        "--token", help=f"API token required on /api/* (except /api/health); default: ${TOKEN_ENV} if set"
    )
    sp.add_argument("--max-upload-mb", type=float, default=ServeConfig.max_upload_bytes / MIB,
                    help="largest accepted file (MB; a finite number > 0)")  # fmt: skip
    sp.add_argument("--engine", choices=list(ENGINES), default=ServeConfig.engine, help="inference engine")
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torch engine; Grad-CAM)")
    sp.add_argument(
        "--workers-threads", type=_positive_int, default=None, help="intra-op threads for inference"
    )
    sp.add_argument("--max-batch", type=_positive_int, default=ServeConfig.max_batch,
                    help="most images per inference batch")  # fmt: skip
    sp.add_argument("--batch-window-ms", type=float, default=ServeConfig.batch_window_ms,
                    help="wait this long to group concurrent requests (0: greedy; finite, >= 0)")  # fmt: skip
    sp.add_argument("--limit-concurrency", type=_positive_int, default=64,
                    help="connections beyond this get 503 (memory bound)")  # fmt: skip
    sp.add_argument("--allowed-hosts", metavar="NAMES",
                    help="Host header values accepted, comma-separated ('*': any); default: the bound host,"
                         " localhost, 127.0.0.1 and ::1 (for 0.0.0.0 also this machine's names); against DNS"
                         " rebinding")  # fmt: skip
    sp.add_argument("--max-queue", type=_positive_int, default=ServeConfig.max_queue,
                    help="most images queued for inference; beyond it 503 (server busy)")  # fmt: skip
    sp.add_argument("--max-megapixels", type=_positive_float, default=ServeConfig.max_pixels / 1e6,
                    help="largest image decoded (width x height, millions of pixels)")  # fmt: skip
    sp.add_argument("--decode-memory-mb", type=_positive_float, default=ServeConfig.decode_memory_bytes / MIB,
                    help="memory all decodes in flight may take together (estimated from each header)")  # fmt: skip
    sp.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sp.set_defaults(func=run)


def check_flags(args: argparse.Namespace) -> None:
    """The numeric flags argparse cannot range-check, before anything loads (a ConfigError: one line, exit 2)."""
    mb = args.max_upload_mb
    if not (math.isfinite(mb) and mb > 0 and mb * MIB >= 1):
        raise ConfigError(f"--max-upload-mb must be a finite number > 0; got {mb:g}")
    window = args.batch_window_ms
    if not (math.isfinite(window) and window >= 0):
        raise ConfigError(f"--batch-window-ms must be a finite number >= 0 (0: greedy); got {window:g}")


def run(args: argparse.Namespace) -> int:
    from xraydx.serve import cmd_serve

    check_flags(args)
    return cmd_serve(args)
