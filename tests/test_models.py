from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from xraydx.models import (
    OFFLINE_WEIGHTS,
    CheckpointError,
    ConfigError,
    check_model,
    create_model,
    load_checkpoint,
    offline_weights_path,
    read_metadata,
    save_checkpoint,
)


def test_offline_mobilenet_weights_load_into_timm_with_gray_stem() -> None:
    path = offline_weights_path("mobilenetv2_100")
    src = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model("mobilenetv2_100", 3, in_chans=1, pretrained="offline")
    stem = model.conv_stem.weight
    assert stem.shape[1] == 1
    # the gray stem is the sum of the pretrained RGB filters
    torch.testing.assert_close(stem, src["features.0.0.weight"].sum(dim=1, keepdim=True))
    # a deep layer came across unchanged, and the head is new (3 classes)
    torch.testing.assert_close(model.blocks[6][0].conv_pw.weight, src["features.17.conv.0.0.weight"])
    assert model.get_classifier().out_features == 3


def test_offline_efficientnet_lite0_maps_onto_timm() -> None:
    assert "tf_efficientnet_lite0" in OFFLINE_WEIGHTS
    model = create_model("tf_efficientnet_lite0", 3, in_chans=3, pretrained="offline")
    src = torch.load(offline_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.conv_stem.weight, src["_conv_stem.weight"])


def test_pretrained_weights_recognise_a_natural_image() -> None:
    """The mapped weights are real ImageNet weights: Grace Hopper's photo -> 'military uniform' (652)."""
    import matplotlib.cbook as cbook
    import timm
    from PIL import Image

    img = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((224, 224))
    x = torch.tensor(np.asarray(img)).permute(2, 0, 1).float()[None] / 255
    m = timm.create_model("mobilenetv2_100", pretrained=False).eval()
    sd = torch.load(offline_weights_path("mobilenetv2_100"), weights_only=True)
    m.load_state_dict(dict(zip(m.state_dict().keys(), sd.values(), strict=True)))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        assert int(m((x - mean) / std).argmax()) == 652


def test_unknown_model_and_missing_offline_weights() -> None:
    with pytest.raises(CheckpointError, match="unknown model"):
        create_model("no_such_net", 3)
    with pytest.raises(ConfigError, match="no offline ImageNet weights") as exc:  # bad usage: exit 2
        create_model("resnet18", 3, pretrained="offline")
    assert exc.value.exit_code == 2 and "pass --pretrained none" in str(exc.value)
    with pytest.raises(ConfigError, match="unknown model 'no_such_net'"):  # the check before training
        check_model("no_such_net", "none")
    check_model("test_resnet", "none")
    check_model("mobilenetv2_100", "offline")


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    model = create_model("test_resnet", 3, in_chans=1, pretrained="none").eval()
    meta = {
        "classes": ["covid", "non_covid", "normal"],
        "architecture": {"name": "test_resnet", "in_chans": 1},
        "preprocessing": {"size": 64, "lung_mask": "none", "mean": 0.5, "std": 0.25},
    }
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, model, meta)
    back, meta2 = load_checkpoint(p)
    assert meta2["classes"] == meta["classes"] and meta2["format"] == "xraydx-checkpoint"
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), back(x))
    assert read_metadata(p)["architecture"]["name"] == "test_resnet"
    assert not list(tmp_path.glob("*.tmp"))


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_pickle_named_like_a_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("best.safetensors", "model.pt"):
        p = tmp_path / name
        p.write_bytes(pickle.dumps({"x": _Boom()}))
        with pytest.raises(CheckpointError, match="refusing a pickle"):
            load_checkpoint(p)
    torch.save({"w": torch.zeros(1)}, tmp_path / "zip.safetensors")
    with pytest.raises(CheckpointError, match="refusing a pickle"):
        load_checkpoint(tmp_path / "zip.safetensors")
    assert "pwned" not in capsys.readouterr().out


def test_garbage_and_foreign_safetensors_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "g.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(tmp_path / "g.safetensors")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointError, match="not an xraydx checkpoint"):
        load_checkpoint(tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
