"""A real Orthanc (Debian's orthanc + orthanc-dicomweb) for the DICOM tests, started from a JSON config on free
loopback ports, storage in a temp folder, stopped by its pid. Tests skip, saying why, where it is missing."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PLUGINS = Path("/usr/share/orthanc/plugins")
AET = "ORTHANC"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)


def missing_reason() -> str | None:
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
    if not (PLUGINS / "libOrthancDicomWeb.so").is_file():
        return f"the Orthanc DICOMweb plugin is not installed ({PLUGINS}/libOrthancDicomWeb.so; apt-get install orthanc-dicomweb)"
    return None


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives client sockets (Linux: ip_local_port_range; 32768 elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range, never handed out twice. A port from
    bind(0) lies inside that range, so while a test has Orthanc stopped (to make a send fail) one of its
    client sockets can take the server's port, and the restart fails with "already in use" (seen in CI)."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(max(1025, low - 10_000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port below {low}")


class Orthanc:
    """One Orthanc process; ``node_port``: where its modality entry ``xraydx`` (AE XRAYDX) points."""

    def __init__(self, root: Path, node_port: int) -> None:
        self.root = Path(root)
        self.http_port, self.dicom_port, self.node_port = free_port(), free_port(), node_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = self.root / "orthanc.json"
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "Name": "xraydx-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(PLUGINS)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "DicomModalities": {"xraydx": ["XRAYDX", "127.0.0.1", node_port]},
            "DicomCheckCalledAet": False,
            "DicomScuTimeout": 30,
            "HttpTimeout": 30,
            "StableAge": 1,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 8,
            "DeidentifyLogs": True,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }
        self.config.write_text(json.dumps(cfg, indent=1))
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"

    def start(self, timeout: float = 60.0) -> Orthanc:
        binary = orthanc_binary()
        assert binary is not None
        logf = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logf = logf
        self.proc = subprocess.Popen([binary, str(self.config)], stdout=logf, stderr=subprocess.STDOUT,
                                     cwd=self.root)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.get("/system").get("DicomAet") == AET:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        self._logf.close()

    def log_tail(self, n: int = 2000) -> str:
        p = self.root / "orthanc.log"
        return p.read_text(errors="replace")[-n:] if p.is_file() else ""

    # -- REST ---------------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: Any = None, raw: bool = False, timeout: float = 30
    ) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
        return payload if raw else (json.loads(payload) if payload else None)

    def get(self, path: str, raw: bool = False) -> Any:
        return self._request("GET", path, raw=raw)

    def post(self, path: str, body: Any = None, raw: bool = False, timeout: float = 60) -> Any:
        return self._request("POST", path, body if body is not None else b"", raw=raw, timeout=timeout)

    def put(self, path: str, body: Any) -> Any:
        return self._request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", path)

    def upload(self, dicom_file: Path) -> str:
        return str(self.post("/instances", dicom_file.read_bytes())["ID"])

    def clear(self) -> None:
        for pid in self.get("/patients"):
            self.delete(f"/patients/{pid}")

    def instances_of_class(self, sop_class: str) -> list[str]:
        out = []
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            if tags.get("SOPClassUID") == sop_class:
                out.append(iid)
        return out

    def wait_for_class(self, sop_class: str, n: int = 1, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.instances_of_class(sop_class)
            if len(found) >= n:
                return found
            time.sleep(0.3)
        return self.instances_of_class(sop_class)

    def file(self, orthanc_id: str) -> bytes:
        return bytes(self.get(f"/instances/{orthanc_id}/file", raw=True))

    def set_node_port(self, port: int) -> None:
        self.node_port = port
        self.put("/modalities/xraydx", {"AET": "XRAYDX", "Host": "127.0.0.1", "Port": port})


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


# ---- fixtures (import them into a test module) ---------------------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):  # -> Orthanc
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def empty_orthanc(orthanc: Orthanc) -> Orthanc:
    if orthanc.proc is None:
        orthanc.start()
    orthanc.clear()
    return orthanc
