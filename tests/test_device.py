"""xraydx.device: the torch device for a --device name, the CPUs this process may use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import xraydx.device as device_mod
from conftest import sample_images
from xraydx.cache import available_cpus as cache_available_cpus
from xraydx.cli import EXIT_USAGE, main
from xraydx.errors import DeviceError
from xraydx.predict import resolve_device as predict_resolve_device


def test_available_cpus_respects_a_cgroup_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "_cgroup_cpu_quota", lambda: None)
    free = device_mod.available_cpus()
    assert free >= 1
    monkeypatch.setattr(device_mod, "_cgroup_cpu_quota", lambda: 0.5)  # docker --cpus=0.5
    assert device_mod.available_cpus() == 1
    monkeypatch.setattr(device_mod, "_cgroup_cpu_quota", lambda: 1000.0)
    assert device_mod.available_cpus() == free
    assert cache_available_cpus is device_mod.available_cpus  # the old import path still works


def test_resolve_device_names_and_errors() -> None:
    assert device_mod.resolve_device("cpu") == torch.device("cpu")
    assert device_mod.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert predict_resolve_device is device_mod.resolve_device
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        device_mod.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            device_mod.resolve_device("cuda")


def test_bad_device_is_a_usage_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(sample_images("test")[0])
    assert main(["predict", image, "--out", str(tmp_path / "p.csv"), "--device", "gpu0", "-q"]) == EXIT_USAGE
    assert "unknown device 'gpu0'" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_single_process_distributed_helpers_are_no_ops() -> None:
    d, dev = device_mod.init_distributed("cpu")
    assert (d.rank, d.world, d.main, d.active) == (0, 1, True, False)
    assert dev == torch.device("cpu")
    x = torch.arange(3)
    assert device_mod.gather_concat(x, d) is x
    assert device_mod.broadcast_obj({"a": 1}, d) == {"a": 1}
