from __future__ import annotations

from pathlib import Path

import pytest

from xraydx.config import MIB, Config, ConfigError, ServeConfig, validate
from xraydx.errors import ServeError


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  lr: 0.01\nmodel:\n  name: resnet18\n")
    cfg = Config.load(f)
    assert cfg.train.epochs == 7 and cfg.model.name == "resnet18"
    cfg.override({"train.epochs": "3", "data.lung_mask": "crop", "train.amp": "false", "model.name": None})
    assert cfg.train.epochs == 3 and cfg.data.lung_mask == "crop" and cfg.train.amp is False
    assert cfg.model.name == "resnet18"
    cfg.save(tmp_path / "out.yaml")
    assert Config.load(tmp_path / "out.yaml") == cfg


def test_bad_configs_name_the_problem(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epoch: 7\n")
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        Config.load(f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        Config.load(f)
    f.write_text("train: {epochs: [1, }\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(f)
    with pytest.raises(ConfigError, match="cannot use 'many' as int"):
        Config().override({"train.epochs": "many"})
    cfg = Config()
    cfg.data.lung_mask = "everything"
    with pytest.raises(ConfigError, match="data.lung_mask must be one of"):
        validate(cfg)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    f = tmp_path / "evil.yaml"
    f.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(f)


def test_serve_config_defaults_and_checks(tmp_path: Path) -> None:
    cfg = ServeConfig(str(tmp_path / "m.safetensors"))
    assert cfg.checkpoint == tmp_path / "m.safetensors"  # a Path, whatever was given
    assert (cfg.engine, cfg.device, cfg.max_upload_bytes, cfg.token) == ("torch", "cpu", 20 * MIB, None)
    for bad, words in (({"engine": "tensorrt"}, "torch or onnx"), ({"max_batch": 0}, "max_batch"),
                       ({"max_upload_bytes": 0}, "max_upload_bytes"), ({"batch_window_ms": -1}, "batch_window_ms"),
                       ({"max_batch_files": 0}, "max_batch_files")):  # fmt: skip
        with pytest.raises(ServeError, match=words):
            ServeConfig(tmp_path, **bad)


def test_every_numeric_field_is_range_checked_and_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    """validate() refuses, with one line naming the key, every value the run would trip over later (NaN and
    inf in any float field, out-of-range values, a grayscale stem that is not 1 channel, no data, a bad
    XRAYDX_MEMMAP_BYTES); the defaults with a data path pass."""
    import dataclasses

    from xraydx.config import RANGES

    ok = Config()
    ok.data.path = "somewhere"
    validate(ok)
    with pytest.raises(ConfigError, match="no data given: pass --data PATH"):
        validate(Config())  # there is no default dataset (xraydx demo uses the bundled sample)
    floats = [f"{s}.{f.name}" for s in ("data", "model", "train")
              for f in dataclasses.fields(getattr(ok, s)) if isinstance(getattr(getattr(ok, s), f.name), float)]  # fmt: skip
    for key in floats:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
                validate(Config().override({"data.path": "x", key: bad}))
    for key, (low, low_in, high, _) in RANGES.items():
        below = low - 1 if low_in else low
        with pytest.raises(ConfigError, match=f"{key} must be"):
            validate(Config().override({"data.path": "x", key: below}))
        if high is not None:
            with pytest.raises(ConfigError, match=f"{key} must be"):
                validate(Config().override({"data.path": "x", key: high + 1}))
    with pytest.raises(ConfigError, match="model.in_chans must be 1"):
        validate(Config().override({"data.path": "x", "model.in_chans": 3}))
    for raw in ("abc", "-1", "1.5"):
        monkeypatch.setenv("XRAYDX_MEMMAP_BYTES", raw)
        with pytest.raises(ConfigError, match="XRAYDX_MEMMAP_BYTES must be a whole number of bytes"):
            validate(ok)
    monkeypatch.setenv("XRAYDX_MEMMAP_BYTES", "0")
    validate(ok)


def test_a_config_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes("data:\n  path: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not a UTF-8 text file \(byte 0xe9 at offset 17\)"):
        Config.load(f)
