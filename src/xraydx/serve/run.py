"""Running the app: ``xraydx serve`` (:func:`cmd_serve`, under uvicorn) and :func:`serve_in_thread` (tests,
screenshots). FastAPI and uvicorn are imported only when a server starts, so the ``xraydx`` command starts
without them."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from xraydx.config import LOOPBACK_HOSTS, MIB, ServeConfig
from xraydx.constants import checkpoint_or_default
from xraydx.errors import EXIT_FATAL, EXIT_OK, ServeError
from xraydx.serve.security import ANY_HOST, LOOPBACK, TOKEN_ENV

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


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


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host header values a server bound to ``host`` accepts by default: the loopback names, the bound
    name or address, and for a wildcard bind (0.0.0.0, ::) this machine's host name, FQDN and addresses."""
    names = [*LOOPBACK_HOSTS]
    if host not in WILDCARD_HOSTS:
        names.append(host)
    else:
        with contextlib.suppress(OSError):
            hostname = socket.gethostname()
            names += [hostname, socket.getfqdn()]
            names += socket.gethostbyname_ex(hostname)[2]
    return tuple(dict.fromkeys(n.lower() for n in names if n))


def allowed_hosts_from(text: str | None, host: str) -> tuple[str, ...]:
    """``--allowed-hosts`` (comma-separated; ``*`` = any), else :func:`default_allowed_hosts`."""
    if text is None:
        return default_allowed_hosts(host)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ServeError(f"--allowed-hosts names no host ({text!r}); give names, or '{ANY_HOST}' for any")
    return names


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening), or a ServeError "cannot bind HOST:PORT: why"."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeError(f"cannot bind {shown}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in WILDCARD_HOSTS:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot bind {shown}: {exc.strerror or exc}") from None
    return sock


def run_uvicorn(app: Any, sock: socket.socket, **options: Any) -> None:
    """Serve ``app`` under uvicorn on the already bound ``sock`` until stopped."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, server_header=False, **options)).run(sockets=[sock])


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
        allowed_hosts=allowed_hosts_from(args.allowed_hosts, args.host),
        max_queue=args.max_queue,
        max_pixels=int(args.max_megapixels * 1_000_000),
        decode_memory_bytes=int(args.decode_memory_mb * MIB),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """``xraydx serve``: build the app from the arguments and run it under uvicorn until stopped."""
    cfg = config_from_args(args)
    try:
        import uvicorn  # noqa: F401

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
    sock = bind_socket(args.host, args.port)  # before the model loads and before "serving on"
    try:
        app = create_app(cfg)
        svc = app.state.service
        url_host = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"xraydx: serving {svc.model_id} ({svc.engine_name}) on http://{url_host}:{sock.getsockname()[1]}/"
            f"  (API docs at /docs; research use only - not a diagnostic device)",
            file=sys.stderr,
        )
        run_uvicorn(app, sock, host=args.host, port=args.port, log_level=args.log_level,
                    limit_concurrency=args.limit_concurrency)  # fmt: skip
    finally:
        sock.close()
    return EXIT_OK
