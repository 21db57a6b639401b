"""The REST API (xraydx.serve) through FastAPI's TestClient: real sample X-rays, DICOM, bad files, limits."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from badfiles import dx_dataset
from PIL import Image

from conftest import sample_images

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from xraydx import serve  # noqa: E402
from xraydx.io import read_image, read_image_bytes  # noqa: E402
from xraydx.predict import Predictor  # noqa: E402

CLASSES = ["covid", "non_covid", "normal"]


# ---- builders ------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge image (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def dicom_bytes(img: np.ndarray, *, monochrome1: bool = False, **elements: object) -> bytes:
    """An uncompressed 16-bit (12 bits stored) DX DICOM holding a real X-ray."""
    arr = (img.astype(np.uint16) * 16).astype(np.uint16)  # 8 -> 12 bits
    if monochrome1:
        arr = (4095 - arr).astype(np.uint16)
    ds = dx_dataset()
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def decode_png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)), formats=["PNG"])
    im.load()
    return im


def upload(path: Path) -> dict[str, Any]:
    return {"file": (path.name, path.read_bytes(), "image/png")}


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(checkpoint: Path) -> Any:
    return serve.create_app(checkpoint)


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    # raise_server_exceptions=False: a server bug shows up as the 500 a real client would get
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor(checkpoint, "cpu")


# ---- predictions on real images ------------------------------------------------------------------


@pytest.mark.parametrize("label", CLASSES)
def test_predict_real_xray_matches_predictor(client: TestClient, predictor: Predictor, label: str,
                                             checkpoint: Path) -> None:  # fmt: skip
    path = sample_images("test", label)[0]
    r = client.post("/api/predict", files=upload(path))
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["file"] == path.name
    assert d["format"] == "png"
    assert d["classes"] == CLASSES
    probs = np.array([d["probabilities"][c] for c in CLASSES])
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    # the same calibrated probabilities as batch predict gives for this file
    expected = predictor.probs(predictor.prepare(read_image(path))[None])[0]
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert d["predicted_class"] == CLASSES[int(np.argmax(expected))]
    assert d["confidence"] == pytest.approx(float(expected.max()), abs=1e-6)
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert d["model_id"] == f"{predictor.meta['architecture']['name']}-{sha[:12]}"
    assert d["engine"] == "torch"
    assert d["processing_ms"]["total"] >= d["processing_ms"]["inference"] >= 0
    assert d["heatmap"] is None and d["image_png"] is None  # only on request
    assert isinstance(d["warnings"], list)
    assert r.headers["cache-control"] == "no-store"


def test_heatmap_and_rendered_image(client: TestClient, predictor: Predictor) -> None:
    pytest.importorskip("xraydx.explain")
    path = sample_images("test", "covid")[1]
    r = client.post("/api/predict?heatmap=true", files=upload(path))
    assert r.status_code == 200, r.text
    d = r.json()
    hm = d["heatmap"]
    assert hm is not None, d["warnings"]
    size = predictor.spec.size
    assert hm["class"] == d["predicted_class"]
    assert hm["size"] == [size, size]
    overlay = decode_png(hm["overlay_png"])
    assert overlay.size == (size, size) and overlay.mode == "RGB"
    heat = decode_png(hm["heat_png"])
    assert heat.mode == "RGBA" and heat.size == (size, size)
    alpha = np.asarray(heat)[..., 3].astype(np.float64) / 255.0  # heat_png: opacity = heat
    assert alpha.max() > 0  # some evidence somewhere
    explain = pytest.importorskip("xraydx.explain")
    prepared = predictor.prepare(read_image(path))
    want, _ = explain.GradCAM(predictor.model, predictor.spec)(
        np.array(prepared), class_idx=CLASSES.index(hm["class"])
    )
    np.testing.assert_allclose(
        alpha, want, atol=1.5 / 255
    )  # the server's batched Grad-CAM = the explain CLI's
    assert hm["aligned_to"] == "image"
    shown = decode_png(d["image_png"])
    original = read_image(path)
    assert shown.size == (original.shape[1], original.shape[0])
    np.testing.assert_array_equal(np.asarray(shown.convert("L")), original)


def test_image_only_on_request(client: TestClient) -> None:
    path = sample_images("val", "normal")[0]
    d = client.post("/api/predict?image=true", files=upload(path)).json()
    assert d["heatmap"] is None
    assert decode_png(d["image_png"]).size[0] > 0


def test_heatmap_degrades_without_explain(
    app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.state.service, "explain", None)
    r = client.post("/api/predict?heatmap=true", files=upload(sample_images("test", "normal")[0]))
    assert r.status_code == 200
    d = r.json()
    assert d["heatmap"] is None
    assert any("Grad-CAM" in w for w in d["warnings"])
    assert d["image_png"]  # the image is still rendered for the page
    assert client.get("/api/model").json()["heatmaps"] is False


def test_heatmap_failure_is_a_warning_not_a_500(
    app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken:
        def __init__(self, model: Any, spec: Any) -> None:
            pass

        def __call__(self, img: np.ndarray, class_idx: int | None = None) -> Any:
            raise RuntimeError("no gradient today")

    fake = types.SimpleNamespace(GradCAM=Broken, overlay_png=lambda *a: b"", heat_png=lambda *a: b"")
    svc = app.state.service
    monkeypatch.setattr(svc, "explain", fake)
    monkeypatch.setattr(svc, "_cam", None)
    r = client.post("/api/predict?heatmap=true", files=upload(sample_images("test", "covid")[0]))
    assert r.status_code == 200
    assert r.json()["heatmap"] is None
    assert any("no gradient today" in w for w in r.json()["warnings"])


# ---- DICOM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("monochrome1", [False, True])
def test_dicom_prediction_and_rendering(client: TestClient, predictor: Predictor, monochrome1: bool) -> None:
    path = sample_images("test", "non_covid")[0]
    data = dicom_bytes(read_image(path), monochrome1=monochrome1, ViewPosition="PA")
    r = client.post("/api/predict?image=true", files={"file": ("scan.dcm", data, "application/dicom")})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["format"] == "dicom"
    decoded = read_image_bytes(data)
    expected = predictor.probs(predictor.prepare(decoded)[None])[0]
    np.testing.assert_allclose([d["probabilities"][c] for c in CLASSES], expected, atol=1e-5)
    # the browser gets the DICOM rendered as PNG, bone bright whatever the photometric interpretation
    shown = np.asarray(decode_png(d["image_png"]).convert("L"))
    np.testing.assert_array_equal(shown, decoded)
    assert np.corrcoef(shown.ravel(), read_image(path).ravel().astype(float))[0, 1] > 0.99
    assert not any("ViewPosition" in w for w in d["warnings"])


def test_guard_rejection_of_a_dicom_without_window_points_at_windowing(client: TestClient) -> None:
    from xraydx.ood import DEFAULT_WINDOW_HINT

    noise = np.random.default_rng(0).integers(0, 256, (128, 128)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    reasons = []
    for name, data in (("noise.dcm", dicom_bytes(noise)), ("noise.png", buf.getvalue())):
        d = client.post("/api/predict", files={"file": (name, data)}).json()
        assert d["ood"]["flagged"] is True, d
        reasons.append(DEFAULT_WINDOW_HINT in d["ood"]["reasons"])
    assert reasons == [True, False]  # only the file read through the default window gets the hint


def test_dicom_lateral_view_is_not_frontal(client: TestClient) -> None:
    """The one view rule (xraydx.frontal): status not_cxr and the flag, as predict gives (issue 17 item 6)."""
    data = dicom_bytes(read_image(sample_images("test", "normal")[0]), ViewPosition="LL")
    d = client.post("/api/predict", files={"file": ("lat.dcm", data)}).json()
    assert d["status"] == "not_cxr" and d["flag"] == "not a frontal chest X-ray" and d["ood"]["flagged"]
    assert "ViewPosition LL" in d["row"]["ood_reason"] and "ViewPosition LL" in d["warnings"][0]


def test_dicom_named_png_is_sniffed(client: TestClient) -> None:
    data = dicom_bytes(read_image(sample_images("test", "normal")[0]))
    r = client.post("/api/predict", files={"file": ("looks-like.png", data, "image/png")})
    assert r.status_code == 200 and r.json()["format"] == "dicom"


# ---- bad files: 4xx with a reason, never 500 -----------------------------------------------------


def _truncated_png() -> bytes:
    data = sample_images("test", "covid")[0].read_bytes()
    return data[: len(data) // 2]


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(read_image(sample_images("test", "covid")[0])).save(buf, format="JPEG", quality=90)
    return buf.getvalue()[:600]


def _dicom_without_pixels() -> bytes:
    data = dicom_bytes(read_image(sample_images("test", "normal")[0]))
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom_bomb() -> bytes:
    data = dicom_bytes(read_image(sample_images("test", "normal")[0]))
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows, ds.Columns = 60000, 60000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


BAD_FILES = {
    "empty": (lambda: b"", 422, "empty"),
    "text_named_png": (lambda: b"patient notes, not an image\n" * 20, 415, "not an image"),
    "pdf": (lambda: b"%PDF-1.4\n" + b"0" * 500, 415, "PDF"),
    "truncated_png": (_truncated_png, 422, "truncated"),
    "truncated_jpeg": (_truncated_jpeg, 422, "JPEG"),
    "png_bomb": (png_bomb, 422, "pixel limit"),
    "tiny_png": (lambda: _png_of(np.zeros((8, 8), np.uint8)), 422, "too small"),
    "elongated_png": (lambda: _png_of(np.zeros((40, 400), np.uint8)), 422, "aspect ratio"),
    "dicom_no_pixels": (_dicom_without_pixels, 422, "no pixel data"),
    "dicom_bomb": (_dicom_bomb, 422, "pixel limit"),
}


def _png_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gets_4xx_naming_the_problem(client: TestClient, case: str) -> None:
    make, status, words = BAD_FILES[case]
    name = f"{case}.png"
    r = client.post("/api/predict", files={"file": (name, make(), "image/png")})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["file"] == name
    assert name in err["message"] and words.lower() in err["message"].lower()
    assert r.headers["content-type"].startswith("application/json")


def test_batch_reports_each_file(client: TestClient) -> None:
    good = sample_images("test", "covid")[:2]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in good]
    files.insert(1, ("files", ("bad.png", b"not an image at all", "image/png")))
    files.append(("files", ("bomb.png", png_bomb(), "image/png")))
    r = client.post("/api/predict/batch", files=files)
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["n"], d["ok"], d["errors"]) == (4, 2, 2)
    res = d["results"]
    assert [x["file"] for x in res] == [good[0].name, "bad.png", good[1].name, "bomb.png"]
    assert [x["ok"] for x in res] == [True, False, True, False]
    assert res[1]["error"]["status"] == 415 and res[3]["error"]["status"] == 422
    for x in (res[0], res[2]):
        assert sum(x["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_batch_same_answers_as_single(client: TestClient) -> None:
    paths = sample_images("val")[:5]
    batch = client.post(
        "/api/predict/batch", files=[("files", (p.name, p.read_bytes())) for p in paths]
    ).json()["results"]
    for p, b in zip(paths, batch, strict=True):
        single = client.post("/api/predict", files=upload(p)).json()
        for c in CLASSES:
            assert b["probabilities"][c] == pytest.approx(single["probabilities"][c], abs=1e-5)


def test_request_shape_errors(client: TestClient) -> None:
    r = client.post("/api/predict", content=b"\x89PNG....", headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart" in r.json()["error"]["message"]
    r = client.post("/api/predict", data={"note": "no file here"}, files={"other": (None, "x")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_file"
    body = b'--XB\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nabc'
    r = client.post(
        "/api/predict", content=body, headers={"content-type": "multipart/form-data; boundary=XB"}
    )
    assert r.status_code == 400 and "incomplete" in r.json()["error"]["message"]
    two = [("file", (p.name, p.read_bytes())) for p in sample_images("test", "covid")[:2]]
    r = client.post("/api/predict", files=two)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files"
    r = client.post("/api/predict?heatmap=perhaps", files=upload(sample_images("test", "covid")[0]))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = client.get("/api/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_unexpected_error_is_a_logged_500(app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    def boom(data: bytes, name: str) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.service, "decode", boom)
    r = client.post("/api/predict", files=upload(sample_images("test", "covid")[0]))
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "a bug" not in r.text  # no internals leak to the client
    assert any("unexpected error" in rec.message for rec in caplog.records)


def test_filename_is_sanitised(client: TestClient) -> None:
    path = sample_images("test", "covid")[0]
    r = client.post("/api/predict", files={"file": ("../../etc/pass\x07wd\\evil.png", path.read_bytes())})
    assert r.status_code == 200
    assert r.json()["file"] == "evil.png"
    assert serve.safe_filename("C:\\Users\\dr\\scan 1.dcm") == "scan 1.dcm"
    assert serve.safe_filename("") == "upload"
    assert len(serve.safe_filename("a" * 1000 + ".png")) <= 128


# ---- limits and the token ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_limit_client(checkpoint: Path) -> Iterator[TestClient]:
    app = serve.create_app(checkpoint, max_upload_bytes=10_000)
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        yield c


def test_oversized_upload_gets_413(small_limit_client: TestClient) -> None:
    big = max(sample_images("train"), key=lambda p: p.stat().st_size)
    assert big.stat().st_size > 10_000
    r = small_limit_client.post("/api/predict", files=upload(big))
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_large"
    small = _png_of(read_image(sample_images("test", "covid")[0])[::4, ::4])
    assert len(small) < 10_000
    assert small_limit_client.post("/api/predict", files={"file": ("s.png", small)}).status_code == 200


def test_oversized_streamed_body_without_length_gets_413(small_limit_client: TestClient) -> None:
    sent = {"bytes": 0}

    def body() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check up front
        yield b'--XB\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        for _ in range(200):
            sent["bytes"] += 4096
            yield b"\x89PNG" + b"\x00" * 4092

    r = small_limit_client.post(
        "/api/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=XB"}
    )
    assert r.status_code == 413
    assert "limit" in r.json()["error"]["message"]


def test_declared_length_over_limit_is_refused_before_reading(small_limit_client: TestClient) -> None:
    r = small_limit_client.post(
        "/api/predict",
        content=b"x" * 10,
        headers={"content-type": "multipart/form-data; boundary=XB", "content-length": "999999999"},
    )
    assert r.status_code == 413
    assert (
        "999999999" in r.json()["error"]["message"] and "10000 bytes per file" in r.json()["error"]["message"]
    )


def test_token(checkpoint: Path) -> None:
    app = serve.create_app(checkpoint, token="s3cret-token")
    files = upload(sample_images("test", "covid")[0])
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        assert c.get("/api/health").status_code == 200  # liveness stays open
        assert c.get("/").status_code == 200  # the page itself, which then asks for the token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Token": "s3cret-tokenX"},
                        {"Authorization": "Basic s3cret-token"}):  # fmt: skip
            r = c.post("/api/predict", files=files, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/api/model").status_code == 401
        assert c.post("/api/predict/batch", files=[("files", files["file"])]).status_code == 401
        assert (
            c.post("/api/predict", files=files, headers={"Authorization": "Bearer s3cret-token"}).status_code
            == 200
        )
        assert c.post("/api/predict", files=files, headers={"X-API-Token": "s3cret-token"}).status_code == 200
        assert c.get("/api/model", headers={"X-API-Token": "s3cret-token"}).status_code == 200


# ---- model information, uncertainty, OOD ---------------------------------------------------------


def test_model_info(client: TestClient, predictor: Predictor, checkpoint: Path) -> None:
    r = client.get("/api/model")
    assert r.status_code == 200
    info = json.loads(r.text)  # strict JSON: no NaN
    meta = predictor.meta
    assert info["classes"] == CLASSES
    assert info["architecture"] == meta["architecture"]
    assert info["preprocessing"] == predictor.spec.to_dict()
    assert info["calibration"]["temperature"] == pytest.approx(meta["calibration"]["temperature"])
    assert info["val_metrics"]["macro_f1"] == pytest.approx(meta["val_metrics"]["macro_f1"])
    assert info["val_metrics"]["n"] == meta["val_metrics"]["n"]
    assert info["training_data"]["counts"] == meta["training_data"]["counts"]
    # the server's own folders are not disclosed
    assert "/" not in info["training_data"]["root"] and info["checkpoint"] == checkpoint.name
    assert info["training_data"]["name"] == "sample"  # the dataset folder the model was trained on
    assert str(checkpoint.parent) not in r.text
    assert info["abstention"]["threshold"] == pytest.approx(meta["abstention"]["threshold"])


def _checkpoint_with(src: Path, dst: Path, **meta: Any) -> Path:
    from xraydx.models import load_checkpoint, save_checkpoint

    model, m = load_checkpoint(src)
    m.update(meta)
    save_checkpoint(dst, model, m)
    return dst


def test_abstention_rule_flags_low_confidence(checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint_with(
        checkpoint, tmp_path / "abst.safetensors", abstention={"threshold": 0.6, "target": 0.9}
    )
    paths = sample_images("test")
    with TestClient(serve.create_app(ckpt), raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        d = c.post("/api/predict/batch", files=[("files", (p.name, p.read_bytes())) for p in paths]).json()
        info = c.get("/api/model").json()
    assert info["abstention"]["threshold"] == 0.6 and info["abstention"]["rule"]["target"] == 0.9
    flags = []
    for x in d["results"]:
        assert x["uncertain"] is (x["confidence"] < 0.6)
        assert x["uncertainty"]["threshold"] == 0.6
        assert not any("no abstention rule" in w for w in x["warnings"])
        flags.append(x["uncertain"])
        if x["uncertain"]:
            assert "radiologist" in x["uncertainty"]["message"]


def test_uncertainty_flag_agrees_with_batch_predict(client: TestClient, predictor: Predictor) -> None:
    t = predictor.meta["abstention"]["threshold"]  # chosen on validation at the end of training
    for p in sample_images("test")[::3]:
        d = client.post("/api/predict", files=upload(p)).json()
        probs = [d["probabilities"][c] for c in CLASSES]
        assert d["uncertain"] is (predictor.flag(probs) != "")
        assert d["uncertainty"]["threshold"] == pytest.approx(t)


def test_no_abstention_rule_says_so(checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint_with(checkpoint, tmp_path / "noabst.safetensors", abstention=None)
    with TestClient(serve.create_app(ckpt), base_url="http://127.0.0.1") as c:
        d = c.post("/api/predict", files=upload(sample_images("test", "covid")[0])).json()
        info = c.get("/api/model").json()
    assert d["uncertain"] is None
    assert any("no abstention rule" in w for w in d["warnings"])
    assert info["abstention"]["threshold"] is None and "no abstention rule" in info["abstention"]["note"]


def test_uncalibrated_checkpoint_says_so(checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint_with(checkpoint, tmp_path / "raw.safetensors", calibration={"method": "none"})
    with TestClient(serve.create_app(ckpt), base_url="http://127.0.0.1") as c:
        d = c.post("/api/predict", files=upload(sample_images("test", "covid")[0])).json()
    assert d["calibrated"] is False
    assert any("not calibrated" in w for w in d["warnings"])


class _FakeGuard:
    """Stands in for the shipped OOD guard behind Predictor.check; records what it is given."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.seen: list[tuple[tuple[int, ...], float | None]] = []

    def check_many(
        self,
        imgs: list[np.ndarray],
        colours: list[float | None],
        batch_size: int = 16,
        windows: list[str | None] | None = None,
    ) -> list[Any]:
        self.seen += [(img.shape, c) for img, c in zip(imgs, colours, strict=True)]
        return [self.result for _ in imgs]


def test_ood_guard_flag_warns(app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from xraydx.ood import OODResult, colourfulness_of_bytes

    svc = app.state.service
    guard = _FakeGuard(OODResult(False, 0.93, ["no lungs found"]))
    monkeypatch.setattr(svc.predictor, "ood_guard", lambda: guard)
    path = sample_images("test", "covid")[0]
    d = client.post("/api/predict", files=upload(path)).json()
    # the guard sees the decoded full image and the upload's colourfulness (colour photos are not X-rays)
    assert guard.seen == [(read_image(path).shape, colourfulness_of_bytes(path.read_bytes()))]
    assert d["ood"]["flagged"] is True and d["ood"]["status"] == "not_cxr"
    assert "not look like a frontal chest X-ray" in d["warnings"][0] and "no lungs found" in d["warnings"][0]
    assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)  # still reported

    monkeypatch.setattr(svc.predictor, "ood_guard", lambda: _FakeGuard(OODResult(True, 0.1, [])))
    d = client.post("/api/predict", files=upload(path)).json()
    assert d["ood"]["flagged"] is False and not any("frontal" in w for w in d["warnings"])


def test_ood_verdict_is_the_predictors(client: TestClient, predictor: Predictor, tmp_path: Path) -> None:
    """The server reports Predictor.check's verdict (the one OOD check predict and explain use), for a
    chest X-ray and for a colour photo-like image that is not one."""
    from xraydx.fsutil import json_safe
    from xraydx.ood import colourfulness_of_bytes

    rng = np.random.default_rng(0)
    photo = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(photo, format="PNG")
    for name, data in (
        ("cxr.png", sample_images("test", "normal")[0].read_bytes()),
        ("photo.png", photo.getvalue()),
    ):
        d = client.post("/api/predict", files={"file": (name, data, "image/png")}).json()
        want = predictor.check([read_image_bytes(data)], [colourfulness_of_bytes(data)])[0]
        assert not isinstance(want, str)
        assert d["ood"] == json_safe(want.ood_info()), name
        assert d["ood"]["flagged"] is (name == "photo.png")


def test_ood_warning_names_the_reasons() -> None:
    from xraydx.ood import OODResult
    from xraydx.predict import Checked

    r = OODResult(False, 2.5, ["blank or nearly constant image", "no clear lung fields"], {"thumb_std": 0.0})
    info = Checked(np.zeros((8, 8), np.uint8), r).ood_info()
    assert (
        info is not None and info["flagged"] is True and info["status"] == "not_cxr" and info["score"] == 2.5
    )
    warning = serve.ood_warning(info)
    assert "blank" in warning and "no clear lung fields" in warning and "(score 2.5)" in warning
    assert Checked(np.zeros((8, 8), np.uint8), OODResult(True, 0.4, [])).ood_info()["flagged"] is False


# ---- the page, headers, docs ---------------------------------------------------------------------


def test_page_and_security_headers(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "Research use only" in r.text and "not a diagnostic device" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "http" not in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    for asset in ("/static/app.js", "/static/style.css"):
        a = client.get(asset)
        assert a.status_code == 200 and a.headers["x-content-type-options"] == "nosniff"
        assert "http://" not in a.text and "https://" not in a.text  # nothing fetched from elsewhere
    assert "<script>" not in r.text and "style=" not in r.text  # CSP forbids inline code and styles


def test_static_files_stay_inside_the_package(client: TestClient) -> None:
    for path in ("/static/../serve/app.py", "/static/%2e%2e/serve/app.py", "/static/..%2fserve/app.py",
                 "/static/../serve/__init__.py"):  # fmt: skip
        r = client.get(path)
        assert r.status_code == 404, path
        assert "def create_app" not in r.text


def test_openapi_and_docs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/predict/batch", "/api/health", "/api/model"} <= set(schema["paths"])
    body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["file"]["format"] == "binary"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    if serve.offline_docs_assets() is not None:  # fastapi-offline installed: no CDN
        assert "cdn." not in docs.text
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_health(client: TestClient, app: Any) -> None:
    d = client.get("/api/health").json()
    assert d["status"] == "ok" and d["model_id"] == app.state.service.model_id


# ---- engines -------------------------------------------------------------------------------------


def test_onnx_engine_matches_torch(checkpoint: Path, predictor: Predictor) -> None:
    pytest.importorskip("onnxruntime")
    app = serve.create_app(checkpoint, engine="onnx")
    paths = sample_images("test")[::4]
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/api/health").json()["engine"] == "onnx"
        for p in paths:
            d = c.post("/api/predict", files=upload(p)).json()
            assert d["engine"] == "onnx"
            expected = predictor.probs(predictor.prepare(read_image(p))[None])[0]
            np.testing.assert_allclose([d["probabilities"][k] for k in CLASSES], expected, atol=1e-4)


def test_unknown_engine_refused(checkpoint: Path) -> None:
    with pytest.raises(serve.ServeError, match="torch or onnx"):
        serve.create_app(checkpoint, engine="tensorrt")


def test_bad_options_refused_before_the_model_loads(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"  # a ServeError, not "checkpoint not found": checked first
    for option, value in (("max_batch", 0), ("max_upload_bytes", 0), ("batch_window_ms", -1.0),
                          ("max_batch_files", 0)):  # fmt: skip
        with pytest.raises(serve.ServeError, match=option):
            serve.create_app(missing, **{option: value})
    with pytest.raises(TypeError, match="colour"):
        serve.create_app(missing, colour="red")  # only ServeConfig's fields


# ---- CLI -----------------------------------------------------------------------------------------


def test_cli_serve_without_default_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import xraydx.cli as cli
    import xraydx.constants as constants

    monkeypatch.setattr(constants, "DEFAULT_CHECKPOINT", tmp_path / "missing.safetensors")
    assert cli.main(["serve"]) == cli.EXIT_USAGE
    assert "--checkpoint is required" in capsys.readouterr().err


def test_cli_serve_starts_uvicorn_on_loopback(checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import xraydx.cli as cli
    import xraydx.serve.run as run

    got: dict[str, Any] = {}
    monkeypatch.setattr(run, "run_uvicorn", lambda app, sock, **kw: got.update(app=app, sock=sock, **kw))
    monkeypatch.setenv(serve.TOKEN_ENV, "from-env")
    assert cli.main(["serve", "--checkpoint", str(checkpoint), "--max-upload-mb", "2", "--port", "0"]) == 0
    assert got["host"] == "127.0.0.1" and got["port"] == 0 and got["sock"].family.name == "AF_INET"
    svc = got["app"].state.service
    assert svc.token == b"from-env" and svc.max_upload_bytes == 2 * 1024 * 1024
    assert "research use only" in capsys.readouterr().err


def test_cli_warns_when_exposed_without_token(checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import xraydx.cli as cli
    import xraydx.serve.run as run

    monkeypatch.setattr(run, "run_uvicorn", lambda app, sock, **kw: None)
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    assert cli.main(["serve", "--checkpoint", str(checkpoint), "--host", "0.0.0.0", "--port", "0"]) == 0
    assert "without a token" in capsys.readouterr().err


def test_cli_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import xraydx.cli as cli

    assert cli.main(["serve", "--checkpoint", str(tmp_path / "nope.safetensors")]) == cli.EXIT_FATAL
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["crop", "crop_mask"])
def test_lung_mask_model_without_or_with_segmenter(checkpoint: Path, tmp_path: Path, mode: str) -> None:
    """A model trained with lung_mask=crop (or crop_mask) needs the lung segmenter: without one the answer is a clear 503
    (the server's limitation, not the file's), with one the heatmap is drawn on the cropped model input."""
    from xraydx.models import read_metadata

    pre = {**read_metadata(checkpoint)["preprocessing"], "lung_mask": mode}
    ckpt = _checkpoint_with(checkpoint, tmp_path / f"{mode}.safetensors", preprocessing=pre)
    with TestClient(serve.create_app(ckpt), raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        r = c.post("/api/predict?heatmap=true", files=upload(sample_images("test", "covid")[0]))
    if r.status_code == 503:
        err = r.json()["error"]
        assert err["code"] == "model_unavailable" and "segmenter" in err["message"]
    else:
        assert r.status_code == 200, r.text
        hm = r.json()["heatmap"]
        if hm is not None:
            assert hm["aligned_to"] == "model_input" and decode_png(hm["model_input_png"]).size[0] > 0
