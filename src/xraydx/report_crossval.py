"""The page of a leave-source-out crossval run (``<runs>/<name>/report.html``); renders, computes nothing.

:func:`crossval_page` turns :func:`xraydx.crossval_metrics.summarize`'s output (with ``copies_left_out``
from :mod:`xraydx.crossval`) into one self-contained HTML page: pooled out-of-source metrics, recall per
class with Wilson intervals, the confusion matrix, per held-out source and per fold tables, and the
uncertainty flag on out-of-source images (with the source-shift score where given). :mod:`xraydx.ensemble`
appends its own section through ``extra``. The HTML helpers and the coverage figure are
:mod:`xraydx.report`'s.
"""

from __future__ import annotations

from typing import Any

from xraydx.report import coverage_png, esc, fmt, fmt_ci, html_page, img_tag, recall_cell, table


def _copies_note(left_out: Any) -> str:
    """What the page says about copies of held-out images in other sources (xraydx.crossval)."""
    if left_out == "absent":  # an ensemble's or an older summary: nothing to say
        return ""
    if left_out is None:
        return (
            "<p class=warn>The fold models' run predates the search for copies of held-out images in other"
            " sources: they may have trained on some (public collections share images).</p>"
        )
    n = sum(left_out.values())
    per = ", ".join(f"{esc(k)}: {v}" for k, v in left_out.items() if v)
    return (
        f"<p>Copies of held-out images found in other sources and left out of their fold: {n}"
        f"{f' ({per})' if per else ''}; no fold model saw any held-out radiograph.</p>"
    )


def _one_source_cell(v: dict[str, Any]) -> str:
    """A fold's held-out classes that its model learned from one source, with that source's share."""
    cov = v.get("trained_on")
    if not cov:
        return "—"
    got = [
        f"{esc(c)} ({esc(str(cov[c]['top_source']))} {cov[c]['top_share']:.0%})"
        for c in v["recall"]
        if c in cov and cov[c]["one_source"] and cov[c]["top_share"] is not None
    ]
    return ", ".join(got) or "none"


def _one_source_note(o: dict[str, Any] | None) -> str:
    if not o or not o["n"]:
        return ""
    rest = fmt(o["recall_rest"]) if o["recall_rest"] is not None else "—"
    return (
        f"<p class=warn>{o['n']:,} of {o['of']:,} held-out images ({o['share']:.0%}) are of a class their fold's"
        f" model learned from one source (≥ {o['threshold']:.0%} of that class's training images): their"
        " recall measures how that one hospital's images transfer, not how a mixture of hospitals does."
        f" Recall {fmt(o['recall'])} on them, {rest} on the rest.</p>"
    )


def crossval_page(s: dict[str, Any], title: str, extra: str = "") -> str:
    """The page of a leave-source-out crossval (xraydx.crossval_metrics.summarize's output); ``extra``: more
    HTML at its end (an ensemble's section)."""
    classes = s["classes"]
    p = s["pooled"]
    ci = p["ci"]
    fl = s["flag"]
    parts = [
        f"<h1>{esc(title)}</h1>",
        "<p class=warn>Every image below was predicted by the fold model that never saw its source (hospital /"
        " collection): what a new site can expect from this recipe, not what a random split of the same"
        " sources shows.</p>",
        _copies_note(s.get("copies_left_out", "absent")),
        "<h2>Pooled out-of-source</h2>",
        table(
            ["n", "balanced accuracy", "macro-F1", "accuracy"],
            [
                [
                    str(p["n"]),
                    fmt_ci(p["balanced_accuracy"], ci.get("balanced_accuracy")),
                    fmt_ci(p["macro_f1"], ci.get("macro_f1")),
                    fmt_ci(p["accuracy"], ci.get("accuracy")),
                ]
            ],
        ),  # fmt: skip
        table(["class", "recall (Wilson 95%)"], [[esc(c), recall_cell(p["recall"].get(c))] for c in classes]),
        "<p>Confusion matrix (rows true, columns predicted):</p>",
        table(
            ["", *map(esc, classes)],
            [[esc(c), *map(str, row)] for c, row in zip(classes, p["confusion_matrix"], strict=True)],
        ),
        "<h2>Per held-out source</h2>",
        table(
            ["source", "fold", "n", "accuracy", *[f"recall {esc(c)}" for c in classes], "flagged"],
            [
                [
                    esc(src),
                    esc(v["fold"]),
                    str(v["n"]),
                    fmt(v["accuracy"]),
                    *[recall_cell(v["recall"].get(c)) for c in classes],
                    f"{v['flagged']:.0%}",
                ]
                for src, v in s["per_source"].items()
            ],
        ),  # fmt: skip
        "<h2>Per fold</h2>",
        table(
            [
                "fold",
                "n held out",
                "balanced accuracy (held-out)",
                "in-source test macro-F1",
                "held-out classes learned from one source",
            ],
            [
                [
                    esc(f),
                    str(v["n"]),
                    fmt(v["balanced_accuracy"]),
                    fmt((v.get("in_source_test") or {}).get("macro_f1")),
                    _one_source_cell(v),
                ]
                for f, v in s["per_fold"].items()
            ],
        ),  # fmt: skip
        _one_source_note(s.get("one_source")),
        "<h2>The uncertainty flag on out-of-source images</h2>",
        table(
            [
                "images",
                "errors",
                "flagged",
                "errors flagged",
                "coverage",
                "accuracy accepted",
                "accuracy all",
            ],
            [
                [
                    str(fl["n"]),
                    str(fl["n_errors"]),
                    str(fl["n_flagged"]),
                    fmt(fl["errors_flagged"]),
                    fmt(fl["coverage"]),
                    fmt(fl["accuracy_accepted"]),
                    fmt(fl["accuracy_all"]),
                ]
            ],
        ),  # fmt: skip
    ]
    t = fl.get("oos_threshold")
    if t:
        parts.append(
            f"<p>Flagging below a top probability of {fmt(t['threshold'])} would flag {fmt(t['errors_flagged'])}"
            f" of these errors, keep {fmt(t['coverage'])} of the cases, at accuracy {fmt(t['accuracy_accepted'])}"
            " on those kept.</p>"
        )
    sf = s.get("shift_flag")
    if sf:
        h, au = sf["honest"], sf.get("auroc_errors") or {}
        parts.append(
            "<h3>The flag with the source-shift score</h3><p>Flagged where the shipped flag fires <em>or</em>"
            " the image's classifier features are far from the fold's training images (k-NN distance, in"
            " units of its 95th percentile on in-source validation images). Each fold's distance threshold"
            f" was chosen on the other folds: errors flagged {fmt(h['errors_flagged'])}, coverage"
            f" {fmt(h['coverage'])}, accuracy of the accepted {fmt(h['accuracy_accepted'])}. AUROC for"
            f" ranking errors first: shift score {fmt(au.get('shift_score'))}, 1 − top probability"
            f" {fmt(au.get('one_minus_top_probability'))}. Threshold from all folds: {fmt(sf['threshold'])}.</p>"
        )
    if fl["coverage_curve"]:
        parts.append(img_tag(coverage_png({"coverage_curve": fl["coverage_curve"]}), "coverage vs accuracy"))
    if extra:
        parts.append(extra)
    return html_page(title, "\n".join(parts))
