"""xraydx.errors and xraydx.constants: one error base carrying the exit code; one home per vocabulary."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from xraydx import constants, errors
from xraydx.config import CHOICES, ConfigError, parse_overrides


def test_every_kind_is_an_xraydx_error_with_its_exit_code() -> None:
    usage = {errors.UsageError, errors.ConfigError, errors.DeviceError, errors.OutputExistsError}
    kinds = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(kinds) == 14  # the base and its thirteen kinds
    for kind in kinds:
        assert issubclass(kind, errors.XraydxError)
        assert kind.exit_code == (errors.EXIT_USAGE if kind in usage else errors.EXIT_FATAL), kind
    assert (errors.EXIT_OK, errors.EXIT_FATAL, errors.EXIT_USAGE, errors.EXIT_PARTIAL) == (0, 1, 2, 3)
    assert errors.EXIT_INTERRUPTED == 130


def test_old_homes_still_export_the_same_classes() -> None:
    from xraydx.audit import AuditError
    from xraydx.data import DatasetError
    from xraydx.export import ExportError
    from xraydx.fsutil import OutputExistsError
    from xraydx.io import ImageReadError
    from xraydx.models import CheckpointError
    from xraydx.ood import OODError
    from xraydx.segment import SegmenterError
    from xraydx.serve import ServeError
    from xraydx.train import TrainError

    assert (AuditError, DatasetError, ExportError, OutputExistsError, CheckpointError, ServeError, TrainError) == (
        errors.AuditError, errors.DatasetError, errors.ExportError, errors.OutputExistsError,
        errors.CheckpointError, errors.ServeError, errors.TrainError,
    )  # fmt: skip
    # the built-in bases callers catch today are kept
    assert issubclass(CheckpointError, ValueError) and issubclass(DatasetError, ValueError)
    assert issubclass(ExportError, ValueError) and issubclass(TrainError, RuntimeError)
    assert issubclass(OutputExistsError, FileExistsError) and issubclass(ServeError, RuntimeError)
    assert issubclass(OODError, CheckpointError) and issubclass(SegmenterError, CheckpointError)
    assert SegmenterError is errors.SegmenterError  # moved to errors (xraydx.data.lungseg raises it)
    err = ImageReadError("x.png", "truncated")
    assert isinstance(err, errors.XraydxError) and err.exit_code == errors.EXIT_FATAL
    assert str(err) == "x.png: truncated"


def test_one_home_for_vocabularies_and_texts() -> None:
    from xraydx import data, predict, report, transforms

    assert data.CLASSES is constants.CLASSES and data.SPLITS is constants.SPLITS
    assert transforms.LUNG_MASK_MODES is constants.LUNG_MASK_MODES is CHOICES["data.lung_mask"]
    assert transforms.INTENSITY_MODES is CHOICES["data.intensity"]
    assert transforms.AUGMENT_INTERPOLATIONS is CHOICES["train.augment_interpolation"]
    assert predict.UNCERTAIN_FLAG is constants.UNCERTAIN_FLAG
    assert report.RESEARCH_NOTE is constants.RESEARCH_NOTE
    for asset in (constants.DEFAULT_CHECKPOINT, constants.DEFAULT_SEGMENTER, constants.DEFAULT_GUARD):
        assert asset.is_file(), asset
    assert (constants.sample_dir() / "test").is_dir()


def test_checkpoint_or_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert constants.checkpoint_or_default("a.safetensors") == Path("a.safetensors")
    assert constants.checkpoint_or_default(None) == constants.DEFAULT_CHECKPOINT
    monkeypatch.setattr(constants, "DEFAULT_CHECKPOINT", tmp_path / "missing.safetensors")
    with pytest.raises(errors.UsageError, match="--checkpoint is required"):
        constants.checkpoint_or_default(None)


def test_parse_overrides() -> None:
    assert parse_overrides(["train.lr = 0.1", "name=a=b"]) == {"train.lr": "0.1", "name": "a=b"}
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["train.lr"])


def test_json_safe() -> None:
    from xraydx.fsutil import json_safe, printable_path

    got = json_safe(
        {1: np.float32(0.5), "a": [np.int64(3), math.nan, (math.inf,)], "p": Path("x"), "n": None}
    )
    assert got == {"1": 0.5, "a": [3, None, [None]], "p": "x", "n": None}
    assert json_safe(np.array([[1, 2]])) == [[1, 2]]
    assert printable_path("a\udcffb.png") == "a\\xffb.png"


def test_printable_escapes_control_characters_and_undecodable_bytes() -> None:
    """One helper for every message holding a file name (issue 16 item 16): ESC, CR, LF, TAB, DEL, C1,
    bidi overrides and the surrogate escapes of non-UTF-8 bytes become visible escapes; the rest stays."""
    from xraydx.errors import printable

    assert printable("scan\x1b[2J\r\n\t\x7f\x9b.png") == "scan\\x1b[2J\\x0d\\x0a\\x09\\x7f\\x9b.png"
    assert printable("caf\udce9-\u202egnp.exe") == "caf\\xe9-\\u202egnp.exe"
    assert printable(b"caf\xe9") == "caf\\xe9"
    assert printable("Ærø/röntgen 1.png") == "Ærø/röntgen 1.png"
    assert all(ch.isprintable() for ch in printable("".join(map(chr, range(0x00, 0xA0)))))
