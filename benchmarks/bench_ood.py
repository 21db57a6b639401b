#!/usr/bin/env python3
"""Measure the OOD guard: acceptance on real chest X-rays, rejection on things that are not one.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_ood.py \\
        --cxr3 DATA_DIR/cxr3 --adult DATA_DIR/cxr3_adult_pneumonia \\
        --lungseg DATA_DIR/lungseg --json benchmarks/results/bench_ood.json

Real CXRs: every cxr3 image (reported per part of the guard's own patient split: ``fit`` = the guard
saw it, ``calib`` = its threshold was set on it, ``test`` = held out), the bundled sample
(``data/sample``, 224-px copies of cxr3 images), cxr3_adult_pneumonia and the lungseg images (a
source the cxr3 part of the fit never saw; its segmenter-test split is held out from everything).

Not CXRs: scikit-image's bundled sample images (if scikit-image is installed) and matplotlib's
(photos, microscopy, astronomy, a CT phantom, an MRI slice, logos, a scanned page, text); charts
rendered with matplotlib; documents and screenshots rendered with Pillow; noise; blank images;
synthetic CT-like axial slices; real CXRs rotated by 90, 180 and 270 degrees; real CXRs inverted.
Lateral chest views: none available offline, so not measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xraydx.io import ImageReadError, read_image, read_image_bytes  # noqa: E402
from xraydx.ood import OODGuard, colourfulness_of_bytes, colourfulness_of_file  # noqa: E402

Item = tuple[str, str, np.ndarray, float | None]  # category, name, gray image, colourfulness


# ---- non-CXR images --------------------------------------------------------------------------------

PHOTO_LIKE = {  # skimage.data file -> category
    "astronaut.png": "photo",
    "camera.png": "photo",
    "chelsea.png": "photo",
    "coffee.png": "photo",
    "rocket.jpg": "photo",
    "motorcycle_left.png": "photo",
    "motorcycle_right.png": "photo",
    "hubble_deep_field.jpg": "photo",
    "moon.png": "photo",
    "coins.png": "photo",
    "brick.png": "texture",
    "grass.png": "texture",
    "gravel.png": "texture",
    "color.png": "photo",
    "clock_motion.png": "photo",
    "cell.png": "microscopy",
    "ihc.png": "microscopy",
    "retina.jpg": "medical-other",
    "microaneurysms.png": "medical-other",
    "phantom.png": "ct",
    "horse.png": "graphic",
    "logo.png": "graphic",
    "chessboard_GRAY.png": "graphic",
    "chessboard_RGB.png": "graphic",
    "page.png": "document",
    "text.png": "document",
}


def package_images() -> Iterator[Item]:
    try:
        import skimage

        d = Path(skimage.__file__).parent / "data"
        for name, cat in PHOTO_LIKE.items():
            p = d / name
            if p.is_file():
                yield from _file_item(cat, f"skimage:{name}", p)
    except ImportError:
        print("scikit-image not installed: its sample images are left out", file=sys.stderr)
    import matplotlib

    md = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
    for name, cat in (
        ("grace_hopper.jpg", "photo"),
        ("logo2.png", "graphic"),
        ("Minduka_Present_Blue_Pack.png", "graphic"),
    ):
        if (md / name).is_file():
            yield from _file_item(cat, f"matplotlib:{name}", md / name)
    mri = md / "s1045.ima.gz"
    if mri.is_file():  # 256x256 16-bit MRI slice (raw), as in matplotlib's mri demo
        import gzip

        raw = (
            np.frombuffer(gzip.decompress(mri.read_bytes()), dtype=np.uint16)
            .reshape(256, 256)
            .astype(np.float64)
        )
        yield "mri", "matplotlib:s1045.ima.gz", (255 * raw / raw.max()).astype(np.uint8), None
    for name in ("topobathy.npz", "jacksboro_fault_dem.npz"):
        if (md / name).is_file():
            with np.load(md / name) as z:
                a = z[z.files[0]].astype(np.float64)
            a = (255 * (a - a.min()) / max(1e-9, np.ptp(a))).astype(np.uint8)
            if min(a.shape) >= 32:
                yield "graphic", f"matplotlib:{name}", a, None


def _file_item(cat: str, name: str, p: Path) -> Iterator[Item]:
    try:
        yield cat, name, read_image(p), colourfulness_of_file(p)
    except ImageReadError as exc:
        print(f"skipped {exc}", file=sys.stderr)


def charts(rng: np.random.Generator) -> Iterator[Item]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["line", "bar", "scatter", "hist", "pie", "image"]
    for i, kind in enumerate(kinds):
        fig, ax = plt.subplots(figsize=(5 + i % 3, 4), dpi=80)
        x = np.arange(30)
        if kind == "line":
            ax.plot(x, np.cumsum(rng.normal(size=30)), x, np.cumsum(rng.normal(size=30)))
        elif kind == "bar":
            ax.bar(list("ABCDEFG"), rng.integers(1, 10, 7))
        elif kind == "scatter":
            ax.scatter(rng.normal(size=200), rng.normal(size=200), s=6)
        elif kind == "hist":
            ax.hist(rng.normal(size=1000), bins=30)
        elif kind == "pie":
            ax.pie(rng.integers(1, 10, 5))
        else:
            ax.imshow(rng.normal(size=(20, 20)), cmap="gray")
        ax.set_title(f"figure {i}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        data = buf.getvalue()
        yield (
            "chart",
            f"matplotlib-{kind}",
            read_image_bytes(data, f"{kind}.png"),
            colourfulness_of_bytes(data),
        )


WORDS = [
    "patient",
    "report",
    "radiograph",
    "findings",
    "impression",
    "clinical",
    "history",
    "the",
    "of",
    "and",
    "lung",
    "chest",
    "normal",
    "heart",
    "size",
    "within",
    "limits",
    "no",
    "acute",
    "consolidation",
    "effusion",
    "pneumothorax",
    "date",
    "signed",
    "doctor",
]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def documents(rng: np.random.Generator) -> Iterator[Item]:
    r = random.Random(int(rng.integers(1 << 30)))
    for i in range(8):  # pages of text, dark on light
        w, h = r.choice([(850, 1100), (1100, 850), (600, 800), (1024, 768)])
        im = Image.new("L", (w, h), r.randint(225, 255))
        dr = ImageDraw.Draw(im)
        size = r.choice([12, 16, 20, 28, 40])
        y = r.randint(20, 60)
        while y < h - size:
            line = " ".join(r.choice(WORDS) for _ in range(r.randint(4, 14)))
            dr.text((r.randint(20, 60), y), line, fill=r.randint(0, 60), font=_font(size))
            y += int(size * 1.5)
        yield "document", f"text-page-{i}", np.asarray(im), 0.0
    for i in range(4):  # terminal-style screenshot, light on dark
        im = Image.new("L", (800, 600), r.randint(0, 40))
        dr = ImageDraw.Draw(im)
        for j in range(30):
            dr.text(
                (10, 10 + 19 * j),
                "$ " + " ".join(r.choice(WORDS) for _ in range(r.randint(2, 9))),
                fill=r.randint(180, 255),
                font=_font(14),
            )
        yield "screenshot", f"terminal-{i}", np.asarray(im), 0.0
    for i in range(4):  # a window with a title bar, buttons, and text; colour
        im = Image.new("RGB", (1024, 700), (240, 240, 240))
        dr = ImageDraw.Draw(im)
        dr.rectangle([0, 0, 1024, 40], fill=(40, 90, 200))
        dr.text((12, 8), "Viewer - study.dcm", fill=(255, 255, 255), font=_font(20))
        for j in range(5):
            dr.rounded_rectangle([20 + 150 * j, 60, 150 + 150 * j, 100], 8, fill=(r.randint(0, 255), 120, 80))
        for j in range(20):
            dr.text(
                (30, 130 + 26 * j),
                " ".join(r.choice(WORDS) for _ in range(10)),
                fill=(20, 20, 20),
                font=_font(18),
            )
        if i % 2:  # a small gray X-ray-ish thumbnail inside the screenshot
            dr.ellipse([700, 200, 950, 600], fill=(90, 90, 90))
        rgb = np.asarray(im)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        yield (
            "screenshot",
            f"window-{i}",
            read_image_bytes(buf.getvalue(), "w.png"),
            colourfulness_of_bytes(buf.getvalue()),
        )
        del rgb


def noise_and_blank(rng: np.random.Generator) -> Iterator[Item]:
    for i, (h, w) in enumerate([(256, 256), (512, 512), (1024, 800), (300, 400)]):
        yield "noise", f"uniform-{i}", rng.integers(0, 256, (h, w), dtype=np.uint8), None
        yield "noise", f"gaussian-{i}", np.clip(rng.normal(128, 40, (h, w)), 0, 255).astype(np.uint8), None
        sp = np.full((h, w), 128, np.uint8)
        sp[rng.random((h, w)) < 0.1] = 0
        sp[rng.random((h, w)) < 0.1] = 255
        yield "noise", f"salt-pepper-{i}", sp, None
        blur = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).filter(
            ImageFilter.GaussianBlur(6)
        )
        a = np.asarray(blur).astype(np.float64)
        a = (255 * (a - a.min()) / max(1e-9, np.ptp(a))).astype(np.uint8)
        yield "noise", f"smooth-noise-{i}", a, None
    for v in (0, 255, 128, 30):
        yield "blank", f"constant-{v}", np.full((512, 512), v, np.uint8), None
    yield "blank", "gradient", np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1)), None
    yield (
        "blank",
        "radial-gradient",
        (255 * np.hypot(*np.mgrid[-1:1:512j, -1:1:512j]) / 1.42).astype(np.uint8),
        None,
    )


def synthetic_ct(rng: np.random.Generator, n: int = 8) -> Iterator[Item]:
    """Axial CT-like slices in a lung window: body ellipse, two dark lungs, heart, spine, table."""
    for i in range(n):
        s = 512
        yy, xx = np.mgrid[0:s, 0:s] / s
        img = np.zeros((s, s))
        bw, bh = rng.uniform(0.38, 0.46), rng.uniform(0.28, 0.36)
        cy = rng.uniform(0.45, 0.52)
        body = ((xx - 0.5) / bw) ** 2 + ((yy - cy) / bh) ** 2 < 1
        img[body] = rng.uniform(150, 190)
        fat = body & (((xx - 0.5) / (bw * 0.93)) ** 2 + ((yy - cy) / (bh * 0.9)) ** 2 > 1)
        img[fat] = rng.uniform(110, 140)
        for side in (-1, 1):
            lx = 0.5 + side * rng.uniform(0.16, 0.2)
            lung = ((xx - lx) / rng.uniform(0.12, 0.16)) ** 2 + (
                (yy - cy + 0.02) / rng.uniform(0.18, 0.24)
            ) ** 2 < 1
            img[lung & body] = rng.uniform(10, 35)
        heart = ((xx - 0.53) / 0.1) ** 2 + ((yy - cy + 0.06) / 0.09) ** 2 < 1
        img[heart] = rng.uniform(160, 185)
        spine = ((xx - 0.5) / 0.045) ** 2 + ((yy - cy - bh + 0.08) / 0.045) ** 2 < 1
        img[spine] = 240
        img[(yy > cy + bh + 0.03) & (yy < cy + bh + 0.045) & (np.abs(xx - 0.5) < 0.45)] = 120  # table
        for _ in range(40):  # vessels
            vx, vy = rng.uniform(0.25, 0.75), rng.uniform(cy - 0.2, cy + 0.2)
            img[((xx - vx) ** 2 + (yy - vy) ** 2) < rng.uniform(2e-5, 1e-4)] = 150
        img = np.asarray(
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
        )
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        yield "ct", f"synthetic-ct-{i}", img, None


def transformed_cxrs(paths: list[Path]) -> Iterator[Item]:
    for p in paths:
        img = read_image(p)
        for k in (1, 2, 3):
            yield f"rotated-{90 * k}", f"{p.name}@rot{90 * k}", np.ascontiguousarray(np.rot90(img, k)), None
        yield "inverted", f"{p.name}@inverted", 255 - img, None


# ---- real CXRs -------------------------------------------------------------------------------------


def cxr_sets(args: argparse.Namespace) -> dict[str, list[Path]]:
    from xraydx.ood import cxr3_parts, lungseg_parts

    sets: dict[str, list[Path]] = {}
    if args.cxr3:
        for part, paths in cxr3_parts(Path(args.cxr3), 0).items():
            sets[f"cxr3 ({part} part of the guard's split)"] = paths
    sample = ROOT / "data" / "sample"
    sets["bundled sample (data/sample)"] = sorted(sample.glob("*/*/*.png"))
    if args.adult:
        sets["cxr3_adult_pneumonia"] = sorted(Path(args.adult).glob("*/*.png"))
    if args.lungseg:
        for part, paths in lungseg_parts(Path(args.lungseg), 0).items():
            sets[f"lungseg ({part})"] = paths
    if args.limit:
        rnd = random.Random(0)
        sets = {k: sorted(rnd.sample(v, min(len(v), args.limit))) for k, v in sets.items()}
    return sets


def leave_source_out(args: argparse.Namespace, seg: object) -> dict[str, dict[str, float]]:
    """Refit and recalibrate the guard with one source left out; acceptance on that source's images."""
    from xraydx.ood import Descriptors, OODGuard, cached_features, cxr3_parts, fit_guard, lungseg_parts

    cache = Path(args.features_cache) if args.features_cache else None
    sets = {f"cxr3-{k}": v for k, v in cxr3_parts(Path(args.cxr3), 0).items()}
    sets.update({f"lungseg-{k}": v for k, v in lungseg_parts(Path(args.lungseg), 0).items()})
    sets["adult"] = sorted(Path(args.adult).glob("*/*.png"))
    d = {n: cached_features(seg, p, n, cache, variants=True) for n, p in sets.items()}  # type: ignore[arg-type]

    def sub(x: Descriptors, keep: np.ndarray) -> Descriptors:
        assert x.variants is not None
        return Descriptors(x.features[keep], x.signals[keep], x.variants[keep])

    def cat(xs: list[Descriptors]) -> Descriptors:
        return Descriptors(
            *(np.concatenate([getattr(x, a) for x in xs]) for a in ("features", "signals", "variants"))
        )

    def rejected(g: OODGuard, x: Descriptors) -> np.ndarray:
        assert x.variants is not None
        dist = g.distance(x.features)
        dv = g.distance(x.variants.reshape(len(dist) * 4, -1)).reshape(len(dist), 4)
        r, f = g.meta["rules"], x.signals[:, 0]
        return (
            (dist > g.threshold)
            | (dist - dv[:, :3].min(1) > r["rotation_gap"])
            | (dist - dv[:, 3] > r["inversion_gap"])
            | (f < r["min_lung_fraction"])
            | (f > r["max_lung_fraction"])
        )

    out: dict[str, dict[str, float]] = {}
    for name in ("kermany", "nihcxr8", "radiographydb", "ieee8023"):
        if name == "ieee8023":  # lungseg + adult pneumonia: fit on cxr3 alone
            fit, cal = d["cxr3-fit"], d["cxr3-calib"]
            held = cat([d["lungseg-fit"], d["lungseg-calib"], d["lungseg-test"], d["adult"]])
        else:

            def m(n: str, pre: str = f"{name}__") -> np.ndarray:
                return np.array([p.name.startswith(pre) for p in sets[n]])

            fit = cat([sub(d["cxr3-fit"], ~m("cxr3-fit")), d["lungseg-fit"]])
            cal = cat([sub(d["cxr3-calib"], ~m("cxr3-calib")), d["lungseg-calib"]])
            held = cat([sub(d[n], m(n)) for n in ("cxr3-fit", "cxr3-calib", "cxr3-test")])
        tensors, meta = fit_guard(seg, fit, cal)  # type: ignore[arg-type]
        rej = rejected(OODGuard(seg, tensors, meta), held)  # type: ignore[arg-type]
        out[name] = {"n": int(len(rej)), "accept_rate": float(1 - rej.mean())}
        print(f"  left out {name}: {len(rej) - int(rej.sum())}/{len(rej)} accepted", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cxr3")
    ap.add_argument("--adult")
    ap.add_argument("--lungseg")
    ap.add_argument(
        "--limit", type=int, default=0, help="at most this many images per real-CXR set (quick run)"
    )
    ap.add_argument(
        "--transformed", type=int, default=40, help="real CXRs (sample test split) to rotate / invert"
    )
    ap.add_argument("--guard", help="OOD statistics file (default: the shipped one)")
    ap.add_argument(
        "--segmenter", help="lung-segmenter checkpoint the statistics were fit with (default: shipped)"
    )
    ap.add_argument("--json", help="write all figures (and every rejected real CXR / accepted non-CXR) here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--leave-source-out",
        action="store_true",
        help="also refit with each source left out and measure acceptance on it (needs --cxr3, --lungseg,"
        " --adult; computes rotated/inverted descriptors of every image)",
    )
    ap.add_argument(
        "--features-cache", help="folder for descriptors (python -m xraydx ood fit --features-cache)"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from xraydx.segment import LungSegmenter

    seg = LungSegmenter.load(args.segmenter) if args.segmenter else None
    guard = OODGuard.load(args.guard, seg) if args.guard else OODGuard.default()
    t0 = time.perf_counter()
    results: dict[str, object] = {
        "guard": {k: guard.meta.get(k) for k in ("threshold", "rules", "percentile", "k")}
    }

    real: dict[str, dict[str, object]] = {}
    for name, paths in cxr_sets(args).items():
        flagged = []
        n = 0
        for i in range(0, len(paths), 32):
            imgs, cols, ok_paths = [], [], []
            for p in paths[i : i + 32]:
                try:
                    imgs.append(read_image(p))
                except ImageReadError:
                    continue
                cols.append(colourfulness_of_file(p))
                ok_paths.append(p)
            for p, r in zip(ok_paths, guard.check_many(imgs, cols), strict=True):
                n += 1
                if not r.is_cxr:
                    flagged.append({"path": str(p), "score": round(r.score, 3), "reasons": r.reasons})
        real[name] = {
            "n": n,
            "accepted": n - len(flagged),
            "accept_rate": (n - len(flagged)) / max(1, n),
            "rejected": flagged,
        }
        print(f"  {name}: {n - len(flagged)}/{n} accepted", file=sys.stderr)
    results["real_cxr"] = real

    rng = np.random.default_rng(0)
    tsrc = sorted((ROOT / "data" / "sample" / "test").glob("*/*.png"))[: args.transformed]
    items: list[Item] = [
        *package_images(),
        *charts(rng),
        *documents(rng),
        *noise_and_blank(rng),
        *synthetic_ct(rng),
        *transformed_cxrs(tsrc),
    ]
    by_cat: dict[str, dict[str, object]] = {}
    accepted = []
    for cat, name, img, col in items:
        r = guard.check(img, col)
        c = by_cat.setdefault(cat, {"n": 0, "rejected": 0})
        c["n"] = int(c["n"]) + 1  # type: ignore[call-overload]
        if not r.is_cxr:
            c["rejected"] = int(c["rejected"]) + 1  # type: ignore[call-overload]
        else:
            accepted.append(
                {"category": cat, "name": name, "score": round(r.score, 3), "details": r.to_dict()["details"]}
            )
    for c in by_cat.values():
        c["reject_rate"] = int(c["rejected"]) / int(c["n"])  # type: ignore[call-overload]
    results["non_cxr"] = by_cat
    results["non_cxr_accepted"] = accepted
    tot_n = sum(int(c["n"]) for c in by_cat.values())  # type: ignore[call-overload]
    tot_r = sum(int(c["rejected"]) for c in by_cat.values())  # type: ignore[call-overload]
    results["non_cxr_total"] = {"n": tot_n, "rejected": tot_r, "reject_rate": tot_r / max(1, tot_n)}
    cx_n = sum(int(v["n"]) for k, v in real.items() if "sample" not in k)  # type: ignore[call-overload]
    cx_a = sum(int(v["accepted"]) for k, v in real.items() if "sample" not in k)  # type: ignore[call-overload]
    results["real_cxr_total"] = {
        "n": cx_n,
        "accepted": cx_a,
        "accept_rate": cx_a / max(1, cx_n),
        "note": "all sets except the bundled sample (its images are copies of cxr3 ones)",
    }
    if args.leave_source_out:
        if not (args.cxr3 and args.lungseg and args.adult):
            ap.error("--leave-source-out needs --cxr3, --lungseg and --adult")
        results["leave_source_out"] = leave_source_out(args, guard.segmenter)
    results["seconds"] = round(time.perf_counter() - t0, 1)

    print("\n| real chest X-rays | n | accepted |\n|---|---:|---:|")
    for k, v in real.items():
        print(f"| {k} | {v['n']} | {100 * float(v['accept_rate']):.1f}% |")  # type: ignore[arg-type]
    print(f"| **all (sample excluded)** | {cx_n} | {100 * cx_a / max(1, cx_n):.1f}% |")
    print("\n| not chest X-rays | n | rejected |\n|---|---:|---:|")
    for k, v in sorted(by_cat.items()):
        print(f"| {k} | {v['n']} | {100 * float(v['reject_rate']):.1f}% |")  # type: ignore[arg-type]
    print(f"| **all** | {tot_n} | {100 * tot_r / max(1, tot_n):.1f}% |")
    for k, v in dict(results.get("leave_source_out", {})).items():  # type: ignore[call-overload]
        print(f"| left out of the fit: {k} | {v['n']} | {100 * v['accept_rate']:.1f}% accepted |")
    if accepted:
        print("\naccepted non-CXRs: " + ", ".join(f"{a['name']} ({a['score']})" for a in accepted))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
