// Predict page: upload images (pick or drop), POST /predict_batch in chunks of at most 64,
// then POST /explain for each good one's Grad-CAM overlay; results as CSV built in the browser.
// An answer "unknown" (a cell beyond the model's open-set threshold: a type it was not trained on)
// is shown as such, with the class it most resembles, never as that class; it goes to review.
// Uploads carry the session cookie (HV.request: same origin); a service that predicts only for
// signed-in users and API tokens (the default) answers 401 to nobody, and the page then says so
// with a sign-in link that comes back here, sending none of the remaining images.
"use strict";

(() => {
  const { el, request, errorOf, pct, title } = HV;
  const MAX_PER_REQUEST = 64;     // the service refuses more files in one request
  const EXPLAIN_PARALLEL = 2;     // Grad-CAM requests in flight at once
  const entries = [];             // {file, name, card, status: pending|done|error, result, error}
  let classes = [];               // every class the answers named, in order (a new model may add one)
  const UNKNOWN = "unknown";      // the model's answer for a cell it does not know
  let busy = 0;
  let needsSignIn = false;        // the service refused this upload to nobody: send no more of it
  const explainQueue = [];
  let explaining = 0;

  const $ = (id) => document.getElementById(id);

  const SIGN_IN_REQUIRED = { error: "sign-in required", detail: "not sent to the model: sign in first" };

  function signInRequired(err) { return err.status === 401 || err.status === 403; }

  function describeError(err) {
    if (signInRequired(err)) return "predicting needs a sign-in";
    return `${err.error}: ${err.detail}`;
  }

  // The service refused to predict for nobody: say so once, above the results, with the way back.
  function authNotice() {
    HV.notice($("message"), "warn", "Predicting needs a sign-in: this service classifies images only for " +
      "signed-in users (any account) and API tokens. ", HV.loginLink("Sign in"),
      ", then upload the images again on this page.");
  }

  // --- cards ------------------------------------------------------------------------------------
  function newCard(entry) {
    const original = el("img", { alt: `uploaded image ${entry.name}`, class: "original" });
    original.src = URL.createObjectURL(entry.file);
    entry.card = el("article", { class: "card result pending", "data-name": entry.name },
      el("figure", {}, original, el("figcaption", { text: "uploaded" })),
      el("div", { class: "placeholder gradcam-slot", text: "predicting…" }),
      el("div", { class: "info" }, el("div", { class: "name", text: entry.name }), el("div", { class: "muted", text: "waiting for the model…" })));
    $("results").append(entry.card);
  }

  function showError(entry) {
    const card = entry.card;
    card.className = "card result failed";
    card.replaceChildren(card.querySelector("figure"),
      el("div", { class: "info" },
        el("div", { class: "name", text: entry.name }),
        el("div", {}, el("span", { class: "badge error", text: "not classified" })),
        el("p", { class: "err", text: entry.error.error }),
        el("p", { class: "detail", text: entry.error.detail })));
  }

  // What the localiser saw, in words a reader of the answer needs (absent for a whole cell).
  const VIEW_NOTES = {
    cut: "The cell is cut by the picture's edge: part of it was not seen.",
    none: "No white cell found in the picture: the label is a guess.",
  };

  function isUnknown(r) { return r.unknown === true || r.label === UNKNOWN; }

  function reviewReason(r) {
    if (isUnknown(r)) return "not a type the model knows: a pathologist names it";
    return r.cell_in_view === "none" ? "no white cell found in the picture" : "confidence below the review threshold";
  }

  function showResult(entry) {
    const r = entry.result;
    const card = entry.card;
    const unknown = isUnknown(r);
    const [resembles] = Object.entries(r.probabilities).sort((a, b) => b[1] - a[1])[0] || [null];
    card.className = `card result done${unknown ? " unknown" : ""}`;
    card.dataset.label = r.label;
    const info = el("div", { class: "info" },
      el("div", { class: "name", text: entry.name }),
      el("div", {}, el("span", { class: "label", text: unknown ? "Unknown cell type" : title(r.label) }), " ",
        r.needs_review ? el("span", { class: "badge review", text: "needs review", title: reviewReason(r) })
                       : el("span", { class: "badge sure", text: "confident" })),
      unknown ? el("p", { class: "unknown-note" }, "Not one of the types this model knows: it resembles ",
                   el("strong", { class: "resembles", text: title(resembles) }),
                   " most, and goes to the pathologists' review queue.") : "",
      VIEW_NOTES[r.cell_in_view] ? el("p", { class: "view-note", text: VIEW_NOTES[r.cell_in_view] }) : "",
      el("div", { class: "conf" }, el("span", { text: unknown ? `resembles ${title(resembles)}` : "confidence" }),
        HV.bar(r.confidence, r.needs_review ? "big warn" : "big ok"),
        el("span", { class: "num confidence", text: pct(r.confidence) })),
      HV.probabilities(r.probabilities, unknown ? null : r.label),
      el("div", { class: "meta" }, `model version ${r.model_version} · id `, el("code", { text: r.prediction_id }),
        r.open_set_score === null || r.open_set_score === undefined ? ""
          : el("span", { class: "open-set-score", title: "distance from the model's classes: above its threshold a cell is unknown" },
               ` · open-set score ${Number(r.open_set_score).toFixed(1)}`)));
    card.replaceChildren(card.querySelector("figure"),
      el("div", { class: "placeholder gradcam-slot", text: "Grad-CAM…" }), info);
    explainQueue.push(entry);
    pumpExplain();
  }

  // --- Grad-CAM -------------------------------------------------------------------------------
  function pumpExplain() {
    while (explaining < EXPLAIN_PARALLEL && explainQueue.length) {
      const entry = explainQueue.shift();
      explaining++;
      explain(entry).finally(() => { explaining--; pumpExplain(); });
    }
  }

  async function explain(entry) {
    const slot = entry.card.querySelector(".gradcam-slot");
    const form = new FormData();
    form.append("image", entry.file, entry.name);
    try {
      const response = await request("/explain", { method: "POST", body: form });
      if (!response.ok) {
        const err = await errorOf(response);
        if (signInRequired(err)) authNotice();  // e.g. the session ended since the prediction
        slot.textContent = `no heat-map: ${describeError(err)}`;
        return;
      }
      const url = URL.createObjectURL(await response.blob());
      const img = el("img", { alt: `Grad-CAM of ${entry.name}`, class: "gradcam",
        title: `Grad-CAM for ${response.headers.get("x-hematovision-class") || entry.result.label}` });
      await new Promise((resolve) => { img.onload = img.onerror = resolve; img.src = url; });
      slot.replaceWith(el("figure", {}, img, el("figcaption", { text: `Grad-CAM · ${response.headers.get("x-hematovision-class") || ""}` })));
    } catch (e) {
      slot.textContent = `no heat-map: ${e.message}`;
    }
  }

  // --- predicting -------------------------------------------------------------------------------
  async function predictChunk(chunk) {
    const form = new FormData();
    for (const entry of chunk) form.append("images", entry.file, entry.name);
    let response;
    try {
      response = await request("/predict_batch", { method: "POST", body: form });
    } catch (e) {
      return chunk.forEach((entry) => fail(entry, { error: "network", detail: e.message }));
    }
    if (response.ok) {
      const results = await response.json();
      chunk.forEach((entry, i) => {
        const r = results[i];
        if (!r || r.error) fail(entry, r || { error: "missing", detail: "no answer for this image" });
        else succeed(entry, r);
      });
      return;
    }
    const err = await errorOf(response);
    if (err.status === 413 && err.error === "too_large" && chunk.length > 1) {  // the request body was too big: halve it
      const half = Math.ceil(chunk.length / 2);
      await predictChunk(chunk.slice(0, half));
      return predictChunk(chunk.slice(half));
    }
    if (signInRequired(err)) { needsSignIn = true; authNotice(); }
    chunk.forEach((entry) => fail(entry, signInRequired(err) ? SIGN_IN_REQUIRED : err));
  }

  function succeed(entry, result) {
    entry.status = "done";
    entry.result = result;
    Object.keys(result.probabilities).forEach((c) => { if (!classes.includes(c)) classes.push(c); });
    showResult(entry);
    update();
  }

  function fail(entry, error) {
    entry.status = "error";
    entry.error = { error: error.error || "error", detail: error.detail || "" };
    showError(entry);
    update();
  }

  async function add(files) {
    const fresh = Array.from(files).map((file) => ({ file, name: file.name || "image", status: "pending" }));
    if (!fresh.length) return;
    $("message").replaceChildren();
    needsSignIn = false;
    fresh.forEach((entry) => { entries.push(entry); newCard(entry); });
    busy++;
    update();
    try {
      for (let i = 0; i < fresh.length; i += MAX_PER_REQUEST) {
        const chunk = fresh.slice(i, i + MAX_PER_REQUEST);
        if (needsSignIn) chunk.forEach((entry) => fail(entry, SIGN_IN_REQUIRED));
        else await predictChunk(chunk);
      }
    } finally {
      busy--;
      update();
    }
  }

  function update() {
    const done = entries.filter((e) => e.status === "done");
    const failed = entries.filter((e) => e.status === "error").length;
    const review = done.filter((e) => e.result.needs_review).length;
    const unknown = done.filter((e) => isUnknown(e.result)).length;
    const pending = entries.length - done.length - failed;
    $("summary").classList.toggle("hidden", entries.length === 0);
    $("counts").textContent = `${entries.length} image${entries.length === 1 ? "" : "s"}: ${done.length} classified` +
      (unknown ? `, ${unknown} unknown` : "") + (review ? `, ${review} need review` : "") + (failed ? `, ${failed} not classified` : "") +
      (pending ? `, ${pending} waiting…` : "");
    $("download-csv").disabled = busy > 0 || pending > 0 || entries.length === 0;
  }

  // --- CSV --------------------------------------------------------------------------------------
  function csvField(value) {
    let text = value === null || value === undefined ? "" : String(value);
    if (/^[=+\-@\t\r]/.test(text) && isNaN(Number(text))) text = `'${text}`; // no formulas in spreadsheets
    return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function csv() {
    const cls = classes;
    // label is "unknown" for a cell the model does not know (the p_ columns say what it resembles);
    // open_set_score is empty for a model without an open set, a p_ column for a class the
    // answering model lacked is empty too.
    const header = ["filename", "label", "unknown", "confidence", "open_set_score", ...cls.map((c) => `p_${c}`),
      "needs_review", "cell_in_view", "model_version", "prediction_id", "error"];
    const rows = entries.filter((e) => e.status !== "pending").map((e) => {
      const r = e.result;
      return r
        ? [e.name, r.label, isUnknown(r), r.confidence.toFixed(6), r.open_set_score ?? "",
          ...cls.map((c) => (c in r.probabilities ? r.probabilities[c].toFixed(6) : "")),
          r.needs_review, r.cell_in_view ?? "", r.model_version, r.prediction_id, ""]
        : [e.name, "", "", "", "", ...cls.map(() => ""), "", "", "", "", `${e.error.error}: ${e.error.detail}`];
    });
    return [header, ...rows].map((row) => row.map(csvField).join(",")).join("\r\n") + "\r\n";
  }

  function download() {
    const blob = new Blob([csv()], { type: "text/csv;charset=utf-8" });
    const stamp = new Date().toISOString().replace(/[:T.]/g, "-").slice(0, 23);  // one name per download
    const a = el("a", { href: URL.createObjectURL(blob), download: `hematovision-predictions-${stamp}.csv` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
  }

  function clear() {
    entries.splice(0).forEach((e) => e.card.querySelectorAll("img").forEach((img) => URL.revokeObjectURL(img.src)));
    explainQueue.length = 0;
    classes = [];
    $("results").replaceChildren();
    $("message").replaceChildren();
    update();
  }

  // --- wiring -----------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    const input = $("files");
    const zone = $("dropzone");
    input.addEventListener("change", () => { add(input.files); input.value = ""; });
    ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); }));
    ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("over"); }));
    zone.addEventListener("drop", (e) => add(e.dataTransfer.files));
    // A file dropped beside the zone must not make the browser leave the page to show it.
    ["dragover", "drop"].forEach((type) => window.addEventListener(type, (e) => e.preventDefault()));
    $("download-csv").addEventListener("click", download);
    $("clear").addEventListener("click", clear);
    request("/model").then((r) => (r.ok ? r.json() : null)).then((model) => {
      $("model-line").textContent = model && model.version
        ? `Model: ${model.model} version ${model.version} (${model.alias}) · flagged for review below ${pct(model.review_threshold, 0)} confidence`
        : "Model: not loaded yet";
    }).catch(() => { $("model-line").textContent = "Model: unknown"; });
  });

  window.HVPredict = { csv, entries };  // for people debugging in the console (and the browser test)
})();
