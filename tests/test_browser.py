"""End to end: the web page in headless Chromium (Debian's package, driven by Python Playwright).

The server runs in a thread on a free 127.0.0.1 port; the browser uploads real X-rays through the file
input and by drag and drop, and the test checks what a person would see: probability bars that match
the API, the Grad-CAM overlay and its opacity slider, the uncertainty flag, the validation metrics, the
research-use notice, a rendered DICOM, and a readable error for a bad file. It also checks that the
page fetches nothing from anywhere but this server and breaks no Content-Security-Policy rule.

Needs: ``apt-get install chromium`` and ``pip install playwright==1.65.2`` (no ``playwright install``:
the browser is Debian's). Skipped, with the reason, where either is missing.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import sample_images

CHROMIUM = os.environ.get("XRAYDX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

if importlib.util.find_spec("playwright") is None:
    pytest.skip(
        "Python playwright is not installed (pip install playwright==1.65.2)", allow_module_level=True
    )
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402

from xraydx import serve  # noqa: E402
from xraydx.io import read_image  # noqa: E402

HAS_EXPLAIN = importlib.util.find_spec("xraydx.explain") is not None
CLASSES = ["covid", "non_covid", "normal"]


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[tuple[str, Any]]:
    app = serve.create_app(checkpoint)
    with serve.serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser: Browser, server: tuple[str, Any]) -> Iterator[Page]:
    url, _ = server
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    requests: list[str] = []
    problems: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.on(
        "response",
        lambda r: (
            problems.append(f"{r.status} {r.url}") if r.status >= 400 and "/api/" not in r.url else None
        ),
    )
    pg.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.goto(url + "/")
    yield pg
    outside = [u for u in requests if not (u.startswith(url + "/") or u.startswith("data:"))]
    assert not outside, f"the page fetched from elsewhere: {outside}"
    # the bad-file test makes the API answer 415, which Chromium logs as a failed resource load
    unexpected = [m for m in problems if "status of 415" not in m]
    assert not unexpected, f"console errors / CSP violations: {unexpected}"
    ctx.close()


def _api(url: str, path: Path) -> dict[str, Any]:
    import httpx

    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/api/predict", files={"file": (path.name, path.read_bytes())})
        r.raise_for_status()
        return r.json()


def _bars(page: Page) -> dict[str, float]:
    rows = page.locator("#bars .bar-row")
    return {rows.nth(i).get_attribute("data-class"): float(rows.nth(i).get_attribute("data-prob"))
            for i in range(rows.count())}  # fmt: skip


def test_upload_shows_probabilities_heatmap_and_metrics(page: Page, server: tuple[str, Any]) -> None:
    url, app = server
    # permanent notice and the model's validation metrics, before anything is uploaded
    notice = page.locator("#notice")
    assert "Research use only" in notice.inner_text() and "not a diagnostic device" in notice.inner_text()
    page.wait_for_selector("#val-metrics table")
    val = app.state.service.meta["val_metrics"]
    assert f"macro-F1 {val['macro_f1']:.3f}" in page.locator("#val-metrics").inner_text()
    assert app.state.service.model_id in page.locator("#model-id").inner_text()

    path = sample_images("test", "covid")[2]
    page.set_input_files("#file", str(path))
    page.wait_for_selector('#result[data-ready="true"]')

    expected = _api(url, path)
    bars = _bars(page)
    assert set(bars) == set(CLASSES)
    for c in CLASSES:
        assert bars[c] == pytest.approx(expected["probabilities"][c], abs=1e-6)
    assert page.locator("#predicted").inner_text() == expected["predicted_class"]
    assert page.locator(".bar-row.top").get_attribute("data-class") == expected["predicted_class"]
    widths = page.eval_on_selector_all(".bar-fill", "els => els.map(e => e.getBoundingClientRect().width)")
    assert max(widths) > 0
    flag = page.locator("#flag")
    assert flag.get_attribute("data-uncertain") == str(expected["uncertain"]).lower()
    if expected["uncertain"]:
        assert "refer to a radiologist" in flag.inner_text()

    # the image and the Grad-CAM overlay, with a working opacity slider
    assert page.eval_on_selector("#image", "e => e.naturalWidth") == read_image(path).shape[1]
    if not HAS_EXPLAIN:
        assert "Grad-CAM" in page.locator("#warnings").inner_text()
        return
    heat = page.locator("#heat")
    assert heat.is_visible()
    assert page.eval_on_selector("#heat", "e => e.complete && e.naturalWidth") == app.state.service.spec.size
    box_img = page.locator("#image").bounding_box()
    box_heat = heat.bounding_box()
    assert box_img and box_heat and abs(box_img["width"] - box_heat["width"]) < 1.5  # drawn over the image
    page.locator("#opacity").fill("80")
    assert page.eval_on_selector("#heat", "e => e.style.opacity") == "0.8"
    assert page.locator("#opacity-value").inner_text() == "80%"
    # the second view, labelled: the model's input at its input size; no crop box for a whole-image model
    assert page.locator("#view-input").is_visible()
    assert page.eval_on_selector("#model-input", "e => e.naturalWidth") == app.state.service.spec.size
    assert "Model input" in page.locator("#input-meta").inner_text()
    assert "Uploaded image" in page.locator("#image-meta").inner_text()
    assert page.locator("#crop-box").is_hidden()


def test_drag_and_drop_and_dicom(page: Page, tmp_path: Path) -> None:
    from test_serve import dicom_bytes

    path = sample_images("test", "normal")[0]
    img = read_image(path)
    data = dicom_bytes(img, monochrome1=True, ViewPosition="PA")
    b64 = base64.b64encode(data).decode()
    dt = page.evaluate_handle(
        """(b64) => {
            const raw = atob(b64); const bytes = new Uint8Array(raw.length);
            for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "chest.dcm", {type: "application/dicom"}));
            return dt;
        }""",
        b64,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dt})
    page.wait_for_selector('#result[data-ready="true"]')
    assert page.locator("#file-name").inner_text() == "chest.dcm"
    assert "DICOM" in page.locator("#image-meta").inner_text()
    # the browser cannot show DICOM itself: it shows the server's rendering, bone bright
    shown = page.eval_on_selector(
        "#image",
        """e => { const c = document.createElement('canvas'); c.width = e.naturalWidth; c.height = e.naturalHeight;
                  const g = c.getContext('2d'); g.drawImage(e, 0, 0);
                  return Array.from(g.getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 0)); }""",
    )
    arr = np.array(shown, dtype=np.float64).reshape(img.shape)
    assert np.corrcoef(arr.ravel(), img.ravel().astype(np.float64))[0, 1] > 0.99
    assert abs(sum(_bars(page).values()) - 1.0) < 1e-4


def test_bad_file_shows_the_reason(page: Page, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file with an image's name\n")
    page.set_input_files("#file", str(bad))
    err = page.locator("#error")
    err.wait_for(state="visible")
    text = err.inner_text()
    assert "notes.png" in text and "not an image" in text and "415" in text
    assert text.count("notes.png") == 1  # the file name once, not once from the page and once from the server
    assert page.locator("#result").is_hidden()
    junk = tmp_path / "junk.png"
    junk.write_bytes(bytes(range(7, 250)) * 3)  # binary, no known format: no hex dump on the page
    page.set_input_files("#file", str(junk))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('junk.png')")
    text = err.inner_text()
    assert text.count("junk.png") == 1 and "0x" not in text and "not an image" in text
    # and the page still works afterwards
    page.set_input_files("#file", str(sample_images("val", "covid")[0]))
    page.wait_for_selector('#result[data-ready="true"]')
    assert err.is_hidden()


def test_shipped_model_shows_the_crop_box_and_no_headline_for_a_photo(browser: Browser) -> None:
    """The shipped default model: the page draws the crop box on the uploaded image where the model crops
    to the lungs (none where it only blanks outside them) and shows the model's input as a second view; a colour photo gets no headline class and a sensible reason."""
    from PIL import Image

    from xraydx.constants import DEFAULT_CHECKPOINT

    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("no shipped default model")
    app = serve.create_app(DEFAULT_CHECKPOINT)
    if app.state.service.unavailable:
        pytest.skip("no lung segmenter in this installation")
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:300, 0:400] / 300.0
    photo = np.stack([128 + 100 * np.sin(5 * x), 128 + 100 * np.cos(7 * y), 60 + 0 * x], -1)
    photo = (photo + rng.normal(0, 10, photo.shape)).clip(0, 255).astype(np.uint8)
    with serve.serve_in_thread(app) as url, tempfile.TemporaryDirectory() as tmp:
        photo_path = Path(tmp) / "cat.png"
        Image.fromarray(photo).save(photo_path)
        ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
        pg = ctx.new_page()
        pg.goto(url + "/")
        pg.set_input_files("#file", str(sample_images("test", "normal")[0]))
        pg.wait_for_selector('#result[data-ready="true"]')
        if app.state.service.spec.lung_mask == "crop":
            box, shown = pg.locator("#crop-box").bounding_box(), pg.locator("#image").bounding_box()
            assert pg.locator("#crop-box").is_visible() and box and shown
            assert shown["x"] - 1 <= box["x"] and box["x"] + box["width"] <= shown["x"] + shown["width"] + 1
            assert shown["y"] - 1 <= box["y"] and box["y"] + box["height"] <= shown["y"] + shown["height"] + 1
            assert (
                box["width"] * box["height"] < shown["width"] * shown["height"]
            )  # a crop, not the whole image
            assert "lung crop" in pg.locator("#input-meta").inner_text()
        else:  # the shipped model blanks outside the lungs without cropping: no box to draw
            assert pg.locator("#crop-box").is_hidden()
        assert pg.locator("#view-input").is_visible()
        pg.set_input_files("#file", str(photo_path))
        pg.wait_for_function("() => document.getElementById('file-name').textContent === 'cat.png'")
        pg.wait_for_selector('#result[data-ready="true"]')
        assert pg.locator("#predicted-line").is_hidden()  # no predicted class for a photo
        assert pg.eval_on_selector("#reference", "e => e.open") is False
        assert "reference only" in pg.locator("#reference summary").inner_text()
        flag = pg.locator("#flag").inner_text()
        assert "Not a frontal chest X-ray" in flag and "colour image" in flag and "rotated" not in flag
        ctx.close()


def test_page_asks_for_the_token(browser: Browser, checkpoint: Path) -> None:
    app = serve.create_app(checkpoint, token="let-me-in")
    with serve.serve_in_thread(app) as url:
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.goto(url + "/")
        pg.locator("#token-panel").wait_for(state="visible")
        pg.fill("#token", "let-me-in")
        pg.click("#token-form button")
        pg.wait_for_selector("#val-metrics table")
        assert pg.locator("#token-panel").is_hidden()
        pg.set_input_files("#file", str(sample_images("test", "covid")[0]))
        pg.wait_for_selector('#result[data-ready="true"]')
        ctx.close()


def test_api_docs_render_offline(page: Page, server: tuple[str, Any]) -> None:
    if serve.offline_docs_assets() is None:
        pytest.skip("fastapi-offline is not installed: /docs would load Swagger UI from a CDN")
    url, _ = server
    page.goto(url + "/docs")
    page.wait_for_selector(".swagger-ui .opblock-summary-path")
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/api/predict", "/api/predict/batch", "/api/health", "/api/model"} <= {p.strip() for p in paths}


def test_non_frontal_input_gets_no_headline_class(page: Page, tmp_path: Path) -> None:
    """Issue 17 item 3: a lateral DICOM (the one view rule) shows no predicted class; its probabilities are
    folded, closed, under "shown for reference only", and the flag says why."""
    from test_serve import dicom_bytes

    lat = tmp_path / "lateral.dcm"
    lat.write_bytes(dicom_bytes(read_image(sample_images("test", "normal")[0]), ViewPosition="LL"))
    page.set_input_files("#file", str(lat))
    page.wait_for_selector('#result[data-ready="true"]')
    assert page.locator("#predicted-line").is_hidden()
    ref = page.locator("#reference")
    assert ref.is_visible() and "shown for reference only" in ref.inner_text()
    assert page.eval_on_selector("#reference", "e => e.open") is False
    assert page.locator("#reference #bars .bar-row").count() == len(CLASSES)
    assert page.locator(".bar-row.top").count() == 0
    flag = page.locator("#flag")
    assert "Not a frontal chest X-ray" in flag.inner_text() and "ViewPosition LL" in flag.inner_text()
    # a frontal image afterwards: the headline and the bars are back
    frontal = sample_images("test", "covid")[0]
    page.set_input_files("#file", str(frontal))
    page.locator("#file-name", has_text=frontal.name).wait_for()
    page.wait_for_selector('#result[data-ready="true"]')
    assert page.locator("#predicted-line").is_visible() and page.locator("#reference").is_hidden()
    assert page.locator("#bars").is_visible()
