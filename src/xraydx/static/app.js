// xraydx web page: plain JavaScript, no dependencies, no build step. Talks to /api on this origin only.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "xraydx-token";
  let busy = false;

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function headers() {
    const t = token();
    return t ? { "Authorization": "Bearer " + t } : {};
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
    return Number(v).toFixed(digits === undefined ? 3 : digits);
  }

  function pct(v) {
    return (100 * v).toFixed(1) + "%";
  }

  function setStatus(text) { $("status").textContent = text || ""; }

  function showError(text) {
    const box = $("error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  // The server's reason in words (without the file name its message starts with, and without a hex dump
  // of unrecognised content): the page puts the file name in front once.
  async function errorText(resp) {
    try {
      const body = await resp.json();
      const err = body && body.error;
      if (err && (err.reason || err.message)) return (err.reason || err.message) + " (HTTP " + resp.status + ")";
    } catch (e) { /* not JSON */ }
    return "HTTP " + resp.status + " " + resp.statusText;
  }

  // ---- model information ----------------------------------------------------------------------

  function fact(dl, name, value) {
    if (value === null || value === undefined || value === "") return;
    dl.appendChild(el("dt", null, name));
    dl.appendChild(el("dd", null, value));
  }

  function metricsTable(m, classes) {
    const wrap = el("div", "metrics");
    if (!m) {
      wrap.appendChild(el("p", "hint", "not recorded in this checkpoint"));
      return wrap;
    }
    const summary = el("p", "summary");
    summary.textContent = "n = " + m.n + " \u00b7 accuracy " + fmt(m.accuracy) + " \u00b7 macro-F1 " +
      fmt(m.macro_f1) + " \u00b7 macro ROC-AUC " + fmt(m.macro_roc_auc) + " \u00b7 ECE " + fmt(m.ece);
    wrap.appendChild(summary);
    if (!m.per_class) return wrap;
    const table = el("table");
    const head = el("tr");
    ["class", "n", "sensitivity", "specificity", "PPV", "F1", "AUC"].forEach((h) => head.appendChild(el("th", null, h)));
    table.appendChild(head);
    (classes || Object.keys(m.per_class)).forEach((c) => {
      const r = m.per_class[c];
      if (!r) return;
      const tr = el("tr");
      [c, r.support, fmt(r.sensitivity), fmt(r.specificity), fmt(r.ppv), fmt(r.f1), fmt(r.roc_auc)]
        .forEach((v) => tr.appendChild(el("td", null, v)));
      table.appendChild(tr);
    });
    wrap.appendChild(table);
    return wrap;
  }

  function showModel(info) {
    $("model-id").textContent = info.model_id + " \u00b7 " + info.engine;
    const dl = $("facts");
    dl.replaceChildren();
    const arch = info.architecture || {};
    const pre = info.preprocessing || {};
    fact(dl, "Model", info.model_id);
    fact(dl, "Architecture", (arch.name || "?") + (arch.pretrained ? " (init: " + arch.pretrained + ")" : ""));
    fact(dl, "Input", pre.size + " \u00d7 " + pre.size + " px grayscale, lung mask: " + pre.lung_mask);
    fact(dl, "Classes", (info.classes || []).join(", "));
    const cal = info.calibration || {};
    fact(dl, "Calibration", info.calibrated
      ? "temperature " + fmt(cal.temperature) + " fitted on " + (cal.fit_on || "val") +
        " (ECE " + fmt(cal.val_ece_before) + " \u2192 " + fmt(cal.val_ece_after) + ")"
      : "none: probabilities are not calibrated");
    if (Array.isArray(cal.warnings) && cal.warnings.length) fact(dl, "Calibration warnings", cal.warnings.join(" "));
    fact(dl, "Uncertainty rule", info.abstention ? info.abstention.note : "none");
    fact(dl, "Out-of-distribution check", (info.ood_check ? "on: " : "off: ") + (info.ood_note || ""));
    fact(dl, "Heatmaps", info.heatmaps ? "Grad-CAM" : "not available in this build");
    const td = info.training_data || {};
    if (td.counts) {
      const parts = [];
      Object.keys(td.counts).forEach((split) => {
        const c = td.counts[split];
        const n = typeof c === "object" && c !== null ? Object.values(c).reduce((a, b) => a + b, 0) : c;
        parts.push(split + " " + n);
      });
      const name = td.name || td.root;
      fact(dl, "Training data", (name ? name + ": " : "") + parts.join(", "));
    }
    if (td.sources && typeof td.sources === "object") {
      const names = Object.keys(td.sources).map((k) => k + " (" + td.sources[k] + ")");
      if (names.length) fact(dl, "Sources", names.join(", "));
    }
    fact(dl, "Created", info.created);
    $("metrics-note").textContent =
      "Measured on the validation split, which comes from the same sources as the training data. " +
      "These figures do not tell you how the model does on another hospital's images.";
    const vm = $("val-metrics");
    vm.replaceChildren(metricsTable(info.val_metrics, info.classes));
    const tm = $("test-metrics");
    tm.replaceChildren();
    if (info.test_metrics) {
      $("test-title").hidden = false;
      tm.appendChild(metricsTable(info.test_metrics, info.classes));
    }
  }

  async function loadModel() {
    try {
      const resp = await fetch("/api/model", { headers: headers() });
      if (resp.status === 401) {
        $("token-panel").hidden = false;
        $("model-id").textContent = "token needed";
        return;
      }
      if (!resp.ok) throw new Error(await errorText(resp));
      $("token-panel").hidden = true;
      showModel(await resp.json());
    } catch (e) {
      $("model-id").textContent = "model information unavailable";
      showError("Could not load the model information: " + e.message);
    }
  }

  // ---- prediction -------------------------------------------------------------------------------

  function showBars(r) {
    const bars = $("bars");
    bars.replaceChildren();
    r.classes.forEach((c) => {
      const p = r.probabilities[c];
      const row = el("div", "bar-row" + (c === r.predicted_class && !notFrontal(r) ? " top" : ""));
      row.dataset.class = c;
      row.dataset.prob = String(p);
      row.appendChild(el("span", "bar-label", c));
      const track = el("div", "bar-track");
      track.setAttribute("role", "meter");
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "1");
      track.setAttribute("aria-valuenow", String(p));
      track.setAttribute("aria-label", "probability of " + c);
      const fill = el("div", "bar-fill");
      fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(2) + "%";
      track.appendChild(fill);
      row.appendChild(track);
      row.appendChild(el("span", "bar-value", pct(p)));
      bars.appendChild(row);
    });
  }

  // the prediction schema's flag for an input that is not a frontal chest X-ray (OOD guard, lateral view)
  const NOT_FRONTAL = "not a frontal chest X-ray";

  function notFrontal(r) {
    return r.flag === NOT_FRONTAL || (r.ood && r.ood.flagged) || false;
  }

  // no headline class for a non-frontal input: the bars go into a closed "for reference only" box
  function showHeadline(r) {
    const hide = notFrontal(r);
    $("predicted-line").hidden = hide;
    $("predicted").textContent = hide ? "\u2013" : r.predicted_class;
    const ref = $("reference");
    ref.hidden = !hide;
    if (hide) {
      ref.open = false;
      ref.appendChild($("bars"));
    } else {
      $("flag").after($("bars"));
    }
  }

  // training could not reach the abstention target: every prediction is flagged, never the green box
  function flagAll(r) {
    return Boolean(r.uncertainty && r.uncertainty.flag_all);
  }

  function showFlag(r) {
    const flag = $("flag");
    flag.replaceChildren();
    let cls = "flag none";
    let text;
    if (notFrontal(r)) {
      cls = "flag ood";
      // the reasons that fit this image (the server leaves out "looks rotated" for a photo)
      const why = r.ood_message || (r.row && r.row.ood_reason) || (r.ood && r.ood.reason);
      text = "Not a frontal chest X-ray: no class is shown" + (why ? " (" + why + ")" : "") +
        ". The model's output is not trustworthy for this image.";
    } else if (flagAll(r)) {
      cls = "flag uncertain";
      text = "Uncertain: refer to a radiologist. Every prediction of this model is flagged (" +
        (r.uncertainty.reason || "its abstention target was not reached") + ").";
    } else if (r.uncertain === true && r.uncertainty.members_agree === false &&
               r.confidence >= r.uncertainty.threshold) {
      cls = "flag uncertain";
      text = "Uncertain: refer to a radiologist (the ensemble's networks pick different classes; highest" +
        " probability " + fmt(r.confidence) + ")";
    } else if (r.uncertain === true) {
      cls = "flag uncertain";
      text = "Uncertain: refer to a radiologist (highest probability " + fmt(r.confidence) +
        " is below the model's threshold " + fmt(r.uncertainty.threshold) + ")";
    } else if (r.uncertain === false) {
      cls = "flag confident";
      text = "Within the model's confidence rule (highest probability " + fmt(r.confidence) +
        " \u2265 " + fmt(r.uncertainty.threshold) +
        (r.uncertainty.members_agree === true ? "; the ensemble's networks agree" : "") + ")";
    } else {
      text = "No uncertainty flag: this model has no abstention rule.";
    }
    flag.className = cls;
    flag.dataset.uncertain = String(r.uncertain);
    flag.textContent = text;
  }

  // Two views: the uploaded image (as the server windowed it) with the lung crop box drawn on it, and the
  // model's input (what the classifier sees). The Grad-CAM heat goes over whichever it is aligned to.
  function showImage(r) {
    const img = $("image");
    const heat = $("heat");
    const hm = r.heatmap;
    if (r.image_png) {
      img.src = "data:image/png;base64," + r.image_png;
      img.hidden = false;
    } else {
      img.removeAttribute("src");
      img.hidden = true;
    }
    const box = $("crop-box");
    const b = r.crop_box;
    if (b && r.width > 0 && r.height > 0 && r.image_png) {
      box.style.left = (100 * b.left / r.width).toFixed(3) + "%";
      box.style.top = (100 * b.top / r.height).toFixed(3) + "%";
      box.style.width = (100 * (b.right - b.left) / r.width).toFixed(3) + "%";
      box.style.height = (100 * (b.bottom - b.top) / r.height).toFixed(3) + "%";
      box.hidden = false;
    } else {
      box.hidden = true;
    }
    const inputPng = r.model_input_png || (hm && hm.model_input_png);
    const size = hm && hm.size ? hm.size[0] : null;
    if (inputPng) {
      $("model-input").src = "data:image/png;base64," + inputPng;
      $("view-input").hidden = false;
      $("input-meta").textContent = "Model input" + (size ? " (" + size + " \u00d7 " + size + " px)" : "") +
        ": what the classifier sees" + (b ? ", the lung crop (yellow box) resized" : ", the whole image resized") +
        " and normalised as in training.";
    } else {
      $("view-input").hidden = true;
    }
    if (hm && hm.heat_png) {
      const onInput = hm.aligned_to === "model_input" && inputPng;
      (onInput ? $("stack-input") : $("stack")).appendChild(heat);
      heat.src = "data:image/png;base64," + hm.heat_png;
      heat.hidden = false;
      $("heat-controls").hidden = false;
      $("heat-caption").textContent = "Grad-CAM for \u201c" + hm.class + "\u201d" +
        (onInput ? " (on the model input)" : "") + ": where the network's evidence " +
        "for this class lies. Bright regions outside the lungs suggest a shortcut.";
      applyOpacity();
    } else {
      heat.removeAttribute("src");
      heat.hidden = true;
      $("heat-controls").hidden = true;
    }
    $("image-meta").textContent = "Uploaded image: " + r.format.toUpperCase() + ", " + r.width + " \u00d7 " +
      r.height + " px, as windowed for display" + (b ? "; yellow box: the lung crop the model sees" : "") + ".";
  }

  function applyOpacity() {
    const v = Number($("opacity").value);
    $("heat").style.opacity = String(v / 100);
    $("opacity-value").textContent = v + "%";
  }

  function showResult(r) {
    $("file-name").textContent = r.file;
    showBars(r);
    showHeadline(r);
    showFlag(r);
    showImage(r);
    const ul = $("warnings");
    ul.replaceChildren();
    (r.warnings || []).forEach((w) => ul.appendChild(el("li", null, w)));
    const t = r.processing_ms || {};
    $("timing").textContent = "Processed in " + fmt(t.total, 0) + " ms on the server (" + r.engine + ", " +
      r.model_id + ")" + (r.calibrated ? "; probabilities calibrated." : "; probabilities NOT calibrated.");
    $("result").hidden = false;
    $("result").dataset.ready = "true";
  }

  async function predict(file) {
    if (!file || busy) return;
    busy = true;
    showError("");
    $("result").dataset.ready = "false";
    setStatus("Analysing " + file.name + "\u2026");
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const resp = await fetch("/api/predict?heatmap=true&image=true", { method: "POST", body: form, headers: headers() });
      if (resp.status === 401) $("token-panel").hidden = false;
      if (!resp.ok) throw new Error(await errorText(resp));
      showResult(await resp.json());
      setStatus("");
    } catch (e) {
      setStatus("");
      $("result").hidden = true;
      showError(file.name + ": " + e.message);
    } finally {
      busy = false;
      $("file").value = "";
    }
  }

  // ---- wiring -----------------------------------------------------------------------------------

  function init() {
    const drop = $("drop");
    $("file").addEventListener("change", (ev) => predict(ev.target.files[0]));
    ["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (ev) => {
      ev.preventDefault();
      drop.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((name) => drop.addEventListener(name, (ev) => {
      ev.preventDefault();
      drop.classList.remove("over");
    }));
    drop.addEventListener("drop", (ev) => {
      const files = ev.dataTransfer && ev.dataTransfer.files;
      if (files && files.length) predict(files[0]);
    });
    drop.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("file").click(); }
    });
    // dropping a file elsewhere on the page must not make the browser navigate away to it
    window.addEventListener("dragover", (ev) => ev.preventDefault());
    window.addEventListener("drop", (ev) => ev.preventDefault());
    $("opacity").addEventListener("input", applyOpacity);
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      try { sessionStorage.setItem(TOKEN_KEY, $("token").value.trim()); } catch (e) { /* private mode */ }
      $("token").value = "";
      showError("");
      loadModel();
    });
    loadModel();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
