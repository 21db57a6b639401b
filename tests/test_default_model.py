"""The model shipped with xraydx (src/xraydx/weights/default.safetensors, MODEL_CARD.md): it is what
predict, explain, evaluate and serve use without --checkpoint, and it works on real X-rays.

The bundled sample was drawn from the same collection the model was trained on (cxr3), so most sample
images were training images: the accuracy check below is a smoke test that the shipped weights load
and read chest X-rays, not a measure of accuracy (MODEL_CARD.md has that, on a patient-held-out split).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import SAMPLE, sample_images
from xraydx.cli import DEFAULT_CHECKPOINT, main
from xraydx.models import read_metadata

ROOT = Path(__file__).resolve().parents[1]


def test_default_model_is_shipped_small_and_documented() -> None:
    assert DEFAULT_CHECKPOINT.is_file(), "the default model is part of the package"
    assert DEFAULT_CHECKPOINT.stat().st_size <= 40 * 1024 * 1024
    meta = read_metadata(DEFAULT_CHECKPOINT)
    assert meta["classes"] == ["covid", "non_covid", "normal"]
    assert 0.05 < meta["calibration"]["temperature"] < 20
    test = meta["test_metrics"]
    assert test["n"] > 500  # evaluated on a real held-out split, recorded in the file
    card = (ROOT / "MODEL_CARD.md").read_text(encoding="utf-8")
    # the card states the file's own test figures (rounded as written there)
    assert f"{test['macro_f1']:.3f}" in card
    assert f"{test['per_class']['covid']['sensitivity']:.3f}" in card
    assert meta["architecture"]["name"] in card


def _rows(p: Path) -> list[dict[str, str]]:
    with open(p, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_predict_without_checkpoint_uses_the_shipped_model(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", str(SAMPLE), "--out", str(out), "-q"]) == 0
    rows = _rows(out)
    assert len(rows) == len(list(SAMPLE.rglob("*.png")))
    truth = {p.name: p.parent.name for p in SAMPLE.rglob("*.png")}
    correct = sum(r["prediction"] == truth[Path(r["path"]).name] for r in rows)
    assert correct / len(rows) >= 0.8, f"shipped model: {correct}/{len(rows)} of the sample correct"
    assert all(r["status"] == "ok" for r in rows)
    # the same file given explicitly gives the same probabilities
    out2 = tmp_path / "p2.csv"
    imgs = sample_images("test", "normal")[:3]
    assert (
        main(["predict", *map(str, imgs), "--checkpoint", str(DEFAULT_CHECKPOINT), "--out", str(out2), "-q"])
        == 0
    )
    by_name = {Path(r["path"]).name: r for r in rows}
    for r in _rows(out2):
        assert r["prob_covid"] == by_name[Path(r["path"]).name]["prob_covid"]


def test_explain_and_evaluate_without_checkpoint(tmp_path: Path) -> None:
    img = sample_images("test", "covid")[0]
    assert main(["explain", str(img), "--out", str(tmp_path / "ex"), "-q"]) == 0
    assert len(list((tmp_path / "ex").glob("*.png"))) >= 1
    assert (
        main(["evaluate", "--data", str(SAMPLE), "--split", "test", "--out", str(tmp_path / "ev"), "-q"]) == 0
    )
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 30 and m["checkpoint"].endswith("default.safetensors")


def test_serve_without_checkpoint_serves_the_shipped_model(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import xraydx.serve.run as run

    got: dict[str, object] = {}
    monkeypatch.setattr(run, "run_uvicorn", lambda app, sock, **kw: got.update(app=app, **kw))
    assert main(["serve", "--port", "0"]) == 0
    client = TestClient(got["app"], base_url="http://127.0.0.1")  # type: ignore[arg-type]
    info = client.get("/api/model").json()
    assert info["architecture"] == read_metadata(DEFAULT_CHECKPOINT)["architecture"]
    # the manifest scripts/train_default.sh writes (MODEL_CARD.md)
    assert info["training_data"]["name"] == "default-data.csv"
    img = sample_images("test", "non_covid")[0]
    r = client.post("/api/predict", files={"file": (img.name, img.read_bytes(), "image/png")})
    assert r.status_code == 200 and set(r.json()["probabilities"]) == {"covid", "non_covid", "normal"}
