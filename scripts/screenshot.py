"""Screenshot of the xraydx web page with a real X-ray uploaded (for docs/screenshot.png and the README).

    python scripts/screenshot.py --checkpoint runs/<run>/checkpoints/best.safetensors --overwrite

Starts the server in-process on a free 127.0.0.1 port, opens the page in headless Chromium (Debian's
``chromium`` package, driven by Python Playwright), uploads the image through the file input, waits
for the probabilities and the heatmap, and saves a full-page PNG (written atomically).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xraydx.cli import DEFAULT_CHECKPOINT  # noqa: E402
from xraydx.fsutil import atomic_write_bytes, refuse_overwrite  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip


def default_image() -> Path:
    found = sorted((ROOT / "data" / "sample" / "test" / "covid").glob("*.png"))
    if not found:
        raise SystemExit("no bundled sample image found; pass --image")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the model shipped with xraydx")
    ap.add_argument("--image", type=Path, default=None, help="X-ray to upload (default: a bundled sample)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing screenshot")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--opacity", type=int, default=45, help="heatmap opacity slider value (0-100)")
    args = ap.parse_args(argv)

    ckpt = args.checkpoint or DEFAULT_CHECKPOINT
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt}: checkpoint not found (pass --checkpoint)")
    image = args.image or default_image()
    refuse_overwrite(args.out, args.overwrite)
    if not Path(args.chromium).is_file():
        raise SystemExit(f"no Chromium at {args.chromium}: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    from xraydx.serve import create_app, serve_in_thread

    app = create_app(ckpt)
    with serve_in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_selector("#val-metrics table, #val-metrics .hint")
            page.set_input_files("#file", str(image))
            page.wait_for_selector('#result[data-ready="true"]', timeout=60_000)
            if page.locator("#heat").is_visible():
                page.locator("#opacity").fill(str(args.opacity))
            page.evaluate("document.fonts ? document.fonts.ready : null")
            # the notice is sticky: draw it where a reader first sees it
            page.evaluate("window.scrollTo(0, 0)")
            png = page.screenshot(full_page=True, type="png")
        finally:
            browser.close()
    atomic_write_bytes(args.out, png)
    print(f"wrote {args.out} ({len(png)} bytes): {image.name} on {app.state.service.model_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
