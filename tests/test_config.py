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
