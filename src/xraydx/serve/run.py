"""Running the app: ``xraydx serve`` (:func:`cmd_serve`, under uvicorn) and :func:`serve_in_thread` (tests,
screenshots). FastAPI and uvicorn are imported only when a server starts, so the ``xraydx`` command starts
without them."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from xraydx.config import MIB, ServeConfig
from xraydx.constants import checkpoint_or_default
from xraydx.errors import EXIT_FATAL, EXIT_OK, ServeError
from xraydx.serve.security import LOOPBACK, TOKEN_ENV


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread on a free port of ``host``; yield its base URL.

    The socket is bound before the server starts (no port race); the server stops on exit."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="xraydx-uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise ServeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The server's :class:`~xraydx.config.ServeConfig` from ``xraydx serve``'s arguments."""
    return ServeConfig(
        checkpoint=checkpoint_or_default(args.checkpoint),
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        max_upload_bytes=int(args.max_upload_mb * MIB),
        engine=args.engine,
        device=args.device,
        threads=args.workers_threads,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """``xraydx serve``: build the app from the arguments and run it under uvicorn until stopped."""
    cfg = config_from_args(args)
    try:
        import uvicorn

        from xraydx.serve.app import create_app
    except ImportError as exc:
        print(
            f"xraydx: error: serve needs FastAPI and uvicorn ({exc}): pip install 'xraydx[serve]'",
            file=sys.stderr,
        )
        return EXIT_FATAL
    if args.host not in LOOPBACK and cfg.token is None:
        print(
            f"xraydx: warning: serving on {args.host} without a token: anyone who can reach port {args.port} can"
            f" use this API. Set {TOKEN_ENV} (or --token) and put TLS in front of it.",
            file=sys.stderr,
        )
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s"
    )
    app = create_app(cfg)
    svc = app.state.service
    print(
        f"xraydx: serving {svc.model_id} ({svc.engine_name}) on http://{args.host}:{args.port}/"
        f"  (API docs at /docs; research use only - not a diagnostic device)",
        file=sys.stderr,
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, limit_concurrency=args.limit_concurrency,
        server_header=False,
    )  # fmt: skip
    return EXIT_OK
