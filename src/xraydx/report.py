"""The evaluation report, the audit page and the HTML helpers every page uses; renders, computes nothing.

The crossval page is :mod:`xraydx.report_crossval` (built on this module's helpers).

The evaluation report: one self-contained HTML file (figures embedded as base64 PNG, no scripts, no
external resources) built from the data :func:`xraydx.metrics.evaluation_summary` puts in metrics.json,
with the worst errors' thumbnails and Grad-CAM computed by :func:`xraydx.evaluate.error_thumbnails`.
Also the shortcut audit's page and section (numbers from :mod:`xraydx.audit`).

Sections: summary, metrics with bootstrap 95% CIs, confusion matrix (counts and row-normalised),
one-vs-rest ROC curves, calibration (reliability diagrams and ECE before / after temperature scaling),
abstention (coverage vs accuracy), the most confident errors as thumbnails with their Grad-CAM, metrics
per source, and (where given) the shortcut audit. Figures are drawn with matplotlib's Agg canvas
directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xraydx import __version__
from xraydx.audit import BORDER_DROP, HIDDEN_MARGIN, LUNGS_ONLY_DROP, SALIENCY_MIN, VARIANTS
from xraydx.constants import RESEARCH_NOTE
from xraydx.fsutil import atomic_write_json, refuse_overwrite
from xraydx.render import fig_png, figure, png_uri

# ---- small HTML helpers (also used by xraydx.report_crossval and xraydx.ensemble) ---------------


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def fmt_ci(v: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if not ci:
        return fmt(v, digits)
    return f"{fmt(v, digits)} <span class=ci>({fmt(ci[0], digits)}&ndash;{fmt(ci[1], digits)})</span>"


def small_mark(n: int | None) -> str:
    """The mark of a cell computed on fewer than SMALL_N cases (its interval is wide; read it as such)."""
    from xraydx.metrics import SMALL_N

    return f" <span class=muted>(n&lt;{SMALL_N})</span>" if n is not None and n < SMALL_N else ""


def recall_cell(cell: dict[str, Any] | None) -> str:
    """A recall k/n with its Wilson interval (xraydx.metrics.recall_cells), marked where n < 30."""
    if not cell:
        return "&mdash;"
    return (
        f"{fmt_ci(cell['recall'], cell['ci'])} <span class=muted>{cell['correct']}/{cell['n']}</span>"
        + small_mark(cell["n"])
    )


def img_tag(data: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{png_uri(data)}" alt="{esc(alt)}"{w}>'


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """Cells are HTML (escape text before passing it)."""
    c = f' class="{cls}"' if cls else ""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .55em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ci{color:#666;font-size:.9em}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em .8em;margin:.6em 0}
.bad{background:#fdecea;border-left:4px solid #d9302c;padding:.5em .8em;margin:.6em 0}
.good{background:#eaf6ec;border-left:4px solid #2e8540;padding:.5em .8em;margin:.6em 0}
.thumbs{display:flex;flex-wrap:wrap;gap:12px}.thumbs figure{margin:0;font-size:.85em;max-width:260px}
.muted{color:#666;font-size:.9em}code{background:#f3f3f3;padding:0 .2em}
"""


def html_page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_html(path: Path, text: str, overwrite: bool = False) -> None:
    """Write atomically; refuse to replace an existing file unless ``overwrite``."""
    from xraydx.fsutil import atomic_write_text, refuse_overwrite

    refuse_overwrite(path, overwrite)
    atomic_write_text(path, text)


# ---- figures -------------------------------------------------------------------------------------


def confusion_png(cm: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    a = np.asarray(cm, dtype=np.float64)
    rows = a.sum(axis=1, keepdims=True)
    norm = np.divide(a, rows, out=np.zeros_like(a), where=rows > 0)
    fig = figure(8.0, 3.4)
    for j, (data, title) in enumerate(((a, "counts"), (norm, "row-normalised (recall)"))):
        ax = fig.add_subplot(1, 2, j + 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for r in range(len(classes)):
            for c in range(len(classes)):
                txt = f"{int(data[r, c])}" if j == 0 else f"{data[r, c]:.2f}"
                ax.text(c, r, txt, ha="center", va="center", color="white" if norm[r, c] > 0.6 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=20)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    return fig_png(fig)


def roc_png(m: dict[str, Any]) -> bytes:
    fig = figure(4.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for c in m["classes"]:
        curve = m["roc_curves"].get(c)
        if curve is None:
            continue
        auc = m["per_class"][c]["roc_auc"]
        ax.plot(curve["fpr"], curve["tpr"], label=f"{c} (AUC {fmt(auc)})")
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("one-vs-rest ROC")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no class with both positives and negatives", ha="center", fontsize=8)
    ax.set_aspect("equal")
    return fig_png(fig)


def reliability_png(cal: dict[str, Any]) -> bytes:
    fig = figure(8.0, 3.6)
    for j, (key, title, ece) in enumerate(
        (
            ("reliability_before", "before (softmax of logits)", cal["ece_before"]),
            ("reliability_after", f"after (temperature {cal['temperature']:.2f})", cal["ece_after"]),
        )
    ):
        ax = fig.add_subplot(1, 2, j + 1)
        bins = cal[key]
        mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
        acc = [b["accuracy"] if b["count"] else 0.0 for b in bins]
        ax.bar(mids, acc, width=1 / len(bins), edgecolor="#246", color="#7aa6d6", label="accuracy")
        pts = [((b["lo"] + b["hi"]) / 2, b["confidence"]) for b in bins if b["count"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), "_", color="#d9302c", ms=9, mew=2, label="mean confidence")
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: ECE {fmt(ece)}", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    return fig_png(fig)


def coverage_png(m: dict[str, Any]) -> bytes:
    fig = figure(4.6, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    curve = m["coverage_curve"]
    ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], color="#246")
    ab = m.get("abstention")
    if ab:
        ax.axhline(
            ab["target_accuracy"], color="#999", ls="--", lw=0.8, label=f"target {ab['target_accuracy']:.2f}"
        )
        if ab["accuracy_accepted"] is not None:
            ax.plot(
                [ab["coverage"]], [ab["accuracy_accepted"]], "o", color="#d9302c", label="chosen threshold"
            )
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (share of cases not referred)")
    ax.set_ylabel("accuracy on accepted cases")
    ax.set_title("coverage vs accuracy")
    return fig_png(fig)


# ---- sections ------------------------------------------------------------------------------------


def _summary(m: dict[str, Any], meta: dict[str, Any]) -> str:
    ci = m.get("ci") or {}
    cal = m.get("calibration") or {}
    rows = [
        ["images", esc(m["n"]) + small_mark(m["n"])],
        ["accuracy", fmt_ci(m["accuracy"], ci.get("accuracy"))],
        ["balanced accuracy", fmt_ci(m["balanced_accuracy"], ci.get("balanced_accuracy"))],
        ["macro-F1", fmt_ci(m["macro_f1"], ci.get("macro_f1"))],
        ["macro ROC-AUC", fmt_ci(m["macro_roc_auc"], ci.get("macro_roc_auc"))],
        ["ECE before / after calibration", f"{fmt(cal.get('ece_before'))} / {fmt(cal.get('ece_after'))}"],
    ]
    ab = m.get("abstention")
    if ab:
        rows.append(
            [
                "referred as uncertain",
                f"{ab['n_flagged']} of {m['n']} ({1 - ab['coverage']:.0%}); accuracy on the rest "
                f"{fmt(ab['accuracy_accepted'])}",
            ]
        )
    facts = "".join(
        f"<li>{esc(k)}: <code>{esc(v)}</code></li>" for k, v in meta.items() if v not in (None, "")
    )
    notes = ""
    ps = m.get("per_source")
    if ps and ps.get("notes"):
        notes = (
            '<div class="warn"><b>Classes and sources are confounded in this data:</b> '
            + "; ".join(esc(n) for n in ps["notes"])
            + ". A model can score well here by recognising the source (hospital, scanner, processing) rather "
            "than disease. See <a href='#sources'>per source</a> and the shortcut audit "
            "(<code>xraydx audit</code>).</div>"
        )
    return (
        f"<section id=summary><h2>Summary</h2><ul>{facts}</ul>"
        + table(["metric", "value (95% CI)"], rows)
        + notes
        + f"<p class=muted>{esc(RESEARCH_NOTE)}</p></section>"
    )


def _metrics(m: dict[str, Any]) -> str:
    ci = m.get("ci") or {}
    pc_ci = ci.get("per_class", {})
    keys = ("sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc")
    rows = []
    for c in m["classes"]:
        r = m["per_class"][c]
        cc = pc_ci.get(c, {})
        rows.append(
            [esc(c), esc(r["support"]) + small_mark(r["support"]), *[fmt_ci(r[k], cc.get(k)) for k in keys]]
        )
    method = ""
    if ci:
        method = (
            f"<p class=muted>95% confidence intervals: {esc(ci['method'])} ({ci['n_boot']} resamples, seed "
            f"{ci['seed']}). Cells marked n&lt;30 rest on few cases: read their intervals, not the point. They "
            "describe sampling noise in this test set only, not a shift to other hospitals.</p>"
        )
    return (
        "<section id=metrics><h2>Metrics per class</h2>"
        + table(["class", "n", "sensitivity", "specificity", "PPV", "NPV", "F1", "ROC-AUC"], rows)
        + method
        + "</section>"
    )


def _confusion(m: dict[str, Any]) -> str:
    return (
        "<section id=confusion><h2>Confusion matrix</h2><p>Rows: true class; columns: predicted class.</p>"
        + img_tag(confusion_png(m["confusion_matrix"], m["classes"]), "confusion matrix")
        + "</section>"
    )


def _roc(m: dict[str, Any]) -> str:
    return "<section id=roc><h2>ROC curves</h2>" + img_tag(roc_png(m), "ROC curves") + "</section>"


def _calibration(m: dict[str, Any]) -> str:
    cal = m["calibration"]
    rows = [
        ["ECE (15 bins)", fmt(cal["ece_before"]), fmt(cal["ece_after"])],
        ["NLL", fmt(cal["nll_before"]), fmt(cal["nll_after"])],
    ]
    return (
        "<section id=calibration><h2>Calibration</h2>"
        f"<p>Temperature scaling fitted on the validation split: T = {cal['temperature']:.3f} "
        "(probabilities = softmax(logits / T); T &gt; 1 softens over-confident outputs). "
        "The report's other figures use the calibrated probabilities.</p>"
        + table(["", "before", "after"], rows)
        + img_tag(reliability_png(cal), "reliability diagrams")
        + "</section>"
    )


def _abstention(m: dict[str, Any]) -> str:
    ab = m.get("abstention")
    if ab and ab.get("flag_all"):
        text = (
            f"<p><b>Every prediction is marked <i>uncertain: refer to a radiologist</i></b>: "
            f"{html.escape(ab.get('reason') or 'the target accuracy was not reached on validation')}. "
            f"Here that flags all {m['n']} cases.</p>"
        )
    elif ab:
        text = (
            f"<p>Rule (from the checkpoint, chosen on validation): a prediction whose top calibrated probability is "
            f"below <b>{ab['threshold']:.3f}</b> is marked <i>uncertain: refer to a radiologist</i>. On validation it "
            f"kept {fmt(ab.get('val_coverage'), 2)} of the cases at accuracy {fmt(ab.get('val_accuracy_accepted'))} "
            f"(target {ab['target_accuracy']:.2f}"
            + (
                ""
                if ab.get("target_reached", True)
                else "; not reached on validation, so the threshold with the best "
                "accuracy at 50% coverage or more was used"
            )
            + f"). Here it keeps {ab['coverage']:.0%} "
            f"({m['n'] - ab['n_flagged']} of {m['n']}) at accuracy {fmt(ab['accuracy_accepted'])}; "
            f"accuracy on the referred cases {fmt(ab['accuracy_flagged'])}.</p>"
        )
    else:
        text = "<p>The checkpoint has no abstention rule (trained before abstention was added).</p>"
    return (
        "<section id=abstention><h2>Abstention: coverage vs accuracy</h2>"
        + text
        + img_tag(coverage_png(m), "coverage vs accuracy")
        + "</section>"
    )


def _errors(m: dict[str, Any], thumbs: Sequence[tuple[bytes, bytes | None]] | None) -> str:
    errs = m.get("worst_errors") or []
    if not errs:
        return "<section id=errors><h2>Most confident errors</h2><p>No errors.</p></section>"
    items = []
    for j, e in enumerate(errs):
        pics = ""
        if thumbs and j < len(thumbs):
            gray, cam = thumbs[j]
            pics = img_tag(gray, "image", 120) + (img_tag(cam, "Grad-CAM", 120) if cam else "")
        items.append(
            f"<figure>{pics}<figcaption>true <b>{esc(e['label'])}</b>, predicted <b>{esc(e['prediction'])}</b> "
            f"({e['confidence']:.2f})<br><span class=muted>{esc(Path(e['path']).name)}"
            f"{' &middot; ' + esc(e['source']) if e['source'] else ''}</span></figcaption></figure>"
        )
    return (
        "<section id=errors><h2>Most confident errors</h2><p>The wrong predictions with the highest confidence, "
        "as the model saw them (after preprocessing), each with the Grad-CAM of the predicted class.</p>"
        f"<div class=thumbs>{''.join(items)}</div></section>"
    )


def _sources(m: dict[str, Any]) -> str:
    ps = m.get("per_source")
    if not ps:
        return "<section id=sources><h2>Per source</h2><p>The data records no source for its images.</p></section>"
    classes = m["classes"]
    rows = []
    for s, v in ps["sources"].items():
        counts = " / ".join(str(v["counts"][c]) for c in classes)
        cells = v.get("recall_cells")
        recall = [recall_cell(cells.get(c)) if cells is not None else fmt(v["recall"][c], 2) for c in classes]
        acc = fmt_ci(v["accuracy"], v["accuracy_ci"])
        rows.append([esc(s), esc(v["n"]) + small_mark(v["n"]), counts, acc, *recall])
    notes = "".join(f"<li>{esc(n)}</li>" for n in ps.get("notes", []))
    return (
        "<section id=sources><h2>Per source</h2>"
        + table(
            [
                "source",
                "n",
                f"n per class ({' / '.join(classes)})",
                "accuracy (Wilson 95%)",
                *[f"recall {esc(c)} (Wilson 95%)" for c in classes],
            ],
            rows,
        )
        + (f"<div class=warn>Confounding:<ul>{notes}</ul></div>" if notes else "")
        + "</section>"
    )


def render_report(
    m: dict[str, Any],
    *,
    title: str = "xraydx evaluation",
    meta: dict[str, Any] | None = None,
    thumbs: Sequence[tuple[bytes, bytes | None]] | None = None,
    audit: dict[str, Any] | None = None,
) -> str:
    """HTML of an evaluation summary (the dict from evaluation_summary); ``audit`` a run_audit result."""
    parts = [
        f"<h1>{esc(title)}</h1>",
        _summary(m, meta or {}),
        _metrics(m),
        _confusion(m),
        _roc(m),
        _calibration(m),
        _abstention(m),
        _errors(m, thumbs),
        _sources(m),
    ]
    if audit is not None:
        parts.append(audit_section(audit))
    parts.append(
        "<section id=methods><h2>Method notes</h2><p class=muted>Metrics: one-vs-rest per class; balanced accuracy "
        "= mean recall; ECE = top-label expected calibration error, 15 equal-width bins. Everything here is also in "
        "metrics.json beside this file. See docs/trust.md.</p></section>"
    )
    return html_page(title, "\n".join(parts))


# ---- the shortcut audit (numbers: xraydx.audit) ----------------------------------------------------------------------------------------

_VARIANT_TEXT = {
    "baseline": "unmodified",
    "lungs_only": "only the lungs visible",
    "lungs_hidden": "lungs blacked out",
    "border_blanked": "border band and corners of the original image blacked out, then preprocessed",
}
_LEVEL_CLASS = {"shortcut": "bad", "possible": "warn", "none_found": "good", "inconclusive": "warn"}


def audit_name(a: dict[str, Any]) -> str:
    """A model's label in the audit: its run name and model id (``<architecture>-<sha256[:12]>``), not the
    folder its file sits in (audits written before these were recorded: the file's stem)."""
    name = a.get("name") or Path(a["checkpoint"]).stem
    mid = f" [{a['model_id']}]" if a.get("model_id") else ""
    return f"{name}{mid} (lung_mask={a['lung_mask']})"


def audit_section(audits: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """The audit as an HTML section (one column per checkpoint), for audit.html and report.html."""
    items = [audits] if isinstance(audits, dict) else list(audits)
    verdicts = "".join(
        f'<div class="{_LEVEL_CLASS.get(a["verdict"]["level"], "warn")}"><b>'
        f"{'' if len(items) == 1 else f'model {i + 1}: '}{esc(audit_name(a))}</b>: {esc(a['verdict']['text'])}</div>"
        for i, a in enumerate(items)
    )
    rows = []
    for name in VARIANTS:
        cells = [f"{esc(name)}<br><span class=muted>{esc(_VARIANT_TEXT[name])}</span>"]
        for a in items:
            r = a["variants"][name]
            cells.append(
                f"{fmt_ci(r['balanced_accuracy'], r['ci']['balanced_accuracy'], 2)}<br>"
                f"<span class=muted>acc {fmt(r['accuracy'], 2)} &middot; macro-F1 {fmt(r['macro_f1'], 2)}"
                f" &middot; same as baseline {r['agreement_with_baseline']:.0%}</span>"
            )
        rows.append(cells)
    sal = ["Grad-CAM mass inside the lung field<br><span class=muted>mean (median); lung area share</span>"]
    for a in items:
        s = a["saliency"]
        sal.append(
            f"{fmt(s['mean_lung_share'], 2)} ({fmt(s['median_lung_share'], 2)}); {fmt(s['lung_area'], 2)}"
        )
    rows.append(sal)
    rows.append(["lung field"] + [esc(a["lung_field_text"]) for a in items])
    rows.append(["checkpoint"] + [f"<code>{esc(a['checkpoint'])}</code>" for a in items])
    label = [
        esc(audit_name(a)) if len(items) == 1 else f"model {i + 1}: {esc(audit_name(a))}"
        for i, a in enumerate(items)
    ]
    header = ["check (balanced accuracy, 95% CI)", *label]
    first = items[0]
    st = first["settings"]
    pics = ""
    for i, a in enumerate(items):  # every model: a crop model is shown something else than a full-image one
        ex = a.get("examples")
        if not ex:
            continue
        figs = "".join(
            f'<figure><img src="{ex[k]}" alt="{esc(k)}" width=150><figcaption>{esc(k)}</figcaption></figure>'
            for k in (*VARIANTS, "gradcam")
            if k in ex
        )
        who = "" if len(items) == 1 else f" to model {i + 1}, {esc(audit_name(a))}"
        pics += (
            f"<p>What is shown{who} in each check (first image; Grad-CAM with the lung field outlined):</p>"
            f"<div class=thumbs>{figs}</div>"
        )
    notes = "".join(f"<li>{esc(n)}</li>" for a in items for n in a.get("notes", []))
    return (
        "<section id=audit><h2>Shortcut audit</h2>"
        + verdicts
        + table(header, rows)
        + pics
        + (f"<ul>{notes}</ul>" if notes else "")
        + f"<p class=muted>{esc(first['data'])} [{esc(first['split'])}], n = {first['n']}; chance = "
        f"{first['chance']:.2f}. Lungs only / lungs hidden: pixels set to 0 in the preprocessed image (what the model"
        f" sees). Border blanked: a band of {st['border']:.0%} of each side and corner squares of {st['corner']:.0%}"
        " set to 0 in the <b>original</b> image, before the model's own preprocessing (for a lung-crop model the"
        " preprocessed image is already the lung box). Intervals: Wilson for accuracy, the classes' Jeffreys"
        " posteriors for balanced accuracy. Verdict: <i>reads shortcuts</i> when the 95% CI of balanced accuracy"
        f" with the lungs hidden lies above chance + {HIDDEN_MARGIN:.2f}, or blanking the border and corners costs"
        f" more than {BORDER_DROP:.2f} with its CI wholly below the baseline's; <i>possible shortcuts</i> when the"
        f" score with the lungs hidden is above chance + {HIDDEN_MARGIN:.2f} with its CI above chance, the Grad-CAM"
        f" mass in the lungs is under {SALIENCY_MIN:.0%} with its CI, or showing only the lungs costs more than"
        f" {LUNGS_ONLY_DROP:.2f} with its CI wholly below the baseline's. Where intervals overlap there is no"
        " verdict. See docs/trust.md.</p></section>"
    )


def render_audit_html(audits: Sequence[dict[str, Any]], title: str = "xraydx shortcut audit") -> str:
    body = f"<h1>{esc(title)}</h1>" + audit_section(audits) + f"<p class=muted>{esc(RESEARCH_NOTE)}</p>"
    return html_page(title, body)


def write_audit(audits: Sequence[dict[str, Any]], out: Path, overwrite: bool = False) -> None:
    """audit.json (without the illustration images) and audit.html into ``out``, atomically."""
    out = Path(out)
    refuse_overwrite(out / "audit.json", overwrite)
    refuse_overwrite(out / "audit.html", overwrite)
    doc = {
        "tool": "xraydx",
        "tool_version": __version__,
        "audits": [{k: v for k, v in a.items() if k != "examples"} for a in audits],
    }
    atomic_write_json(out / "audit.json", doc)
    write_html(out / "audit.html", render_audit_html(audits), overwrite=True)
