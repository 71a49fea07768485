// Review page: GET /review/queue (least certain first), show each item's image and Grad-CAM,
// one key or click per class to confirm or correct (POST /feedback), then the next at once.
// The next items' image and heat-map are fetched while the current one is on screen.
"use strict";

(() => {
  const { el, request, errorOf, pct, title } = HV;
  const $ = (id) => document.getElementById(id);
  const PAGE = 50;        // queue items fetched at a time
  const PREFETCH = 2;     // items loaded ahead of the one shown

  let classes = [];
  let keys = {};          // key -> class
  let queue = [];
  let pos = 0;
  let submitting = false;
  const cache = new Map();          // prediction id -> Promise<{image, gradcam, gradcamClass}>
  const done = new Set();           // ids reviewed or skipped this sitting (not shown again)
  const sitting = JSON.parse(sessionStorage.getItem("hv_review_sitting") || '{"reviewed":0,"confirmed":0,"corrected":0}');

  // --- loading ----------------------------------------------------------------------------------
  function filters() {
    const params = new URLSearchParams({ limit: String(PAGE) });
    if ($("f-label").value) params.set("label", $("f-label").value);
    if ($("f-version").value.trim()) params.set("model_version", $("f-version").value.trim());
    if ($("f-since").value) params.set("since", $("f-since").value);
    if ($("f-until").value) {  // inclusive day: up to the start of the next one
      const next = new Date(`${$("f-until").value}T00:00:00Z`);
      next.setUTCDate(next.getUTCDate() + 1);
      params.set("until", next.toISOString().slice(0, 10));
    }
    return params;
  }

  async function loadQueue() {
    const response = await request(`/review/queue?${filters()}`);
    if (!response.ok) {
      const err = await errorOf(response);
      $("workspace").classList.add("hidden");
      if (err.status === 401) HV.notice($("message"), "warn", "Reviewing needs a pathologist's account. ", HV.loginLink("Sign in"), ".");
      else if (err.status === 403) HV.notice($("message"), "warn", `Your account cannot review: ${err.detail}.`);
      else HV.notice($("message"), "error", `The queue could not be loaded: ${err.error}: ${err.detail}`);
      return false;
    }
    const body = await response.json();
    setClasses(body.classes);
    queue = body.items.filter((item) => !done.has(item.id));
    pos = 0;
    return true;
  }

  function setClasses(list) {
    if (classes.length) return;
    classes = list;
    const letters = {};
    list.forEach((c) => { letters[c[0]] = (letters[c[0]] || 0) + 1; });
    keys = {};
    const select = $("f-label");
    list.forEach((cls, i) => {
      const keyHints = [String(i + 1)];
      if (letters[cls[0]] === 1) keyHints.push(cls[0]);
      keyHints.forEach((k) => { keys[k] = cls; });
      select.append(el("option", { value: cls, text: title(cls) }));
      $("answers").append(el("button", { type: "button", "data-class": cls, id: `answer-${cls}`, onclick: () => answer(cls) },
        ...keyHints.map((k) => el("kbd", { text: k.toUpperCase() })), el("span", { text: title(cls) })));
    });
  }

  function blobImage(blob, alt) {
    return new Promise((resolve) => {
      const img = el("img", { alt });
      img.onload = img.onerror = () => resolve(img);
      img.src = URL.createObjectURL(blob);
    });
  }

  function load(item) {
    if (!cache.has(item.id)) {
      const image = request(item.image_url).then(async (r) => (r.ok ? blobImage(await r.blob(), "the cell under review") : null)).catch(() => null);
      const form = new FormData();
      form.append("prediction_id", item.id);
      const gradcam = request("/explain", { method: "POST", body: form }).then(async (r) =>
        (r.ok ? { img: await blobImage(await r.blob(), "Grad-CAM heat-map"), cls: r.headers.get("x-hematovision-class") } : null)).catch(() => null);
      cache.set(item.id, Promise.all([image, gradcam]).then(([img, cam]) => ({ image: img, gradcam: cam })));
    }
    return cache.get(item.id);
  }

  // --- showing ----------------------------------------------------------------------------------
  async function show() {
    while (pos >= queue.length) {
      if (!(await loadQueue())) return;
      if (!queue.length) {
        $("workspace").classList.add("hidden");
        HV.notice($("message"), "ok", done.size ? `The queue is empty: ${sitting.reviewed} reviewed this sitting. Thank you.`
                                                : "Nothing awaits review with these filters.");
        return;
      }
    }
    $("message").replaceChildren();
    $("workspace").classList.remove("hidden");
    const item = queue[pos];
    $("item").dataset.predictionId = item.id;
    $("item-label").textContent = `Model says: ${title(item.label)}`;
    $("item-badge").replaceChildren(el("span", { class: "badge review", text: `${pct(item.confidence)} confident` }));
    $("item-meta").textContent = `version ${item.model_version} · ${item.created_at.slice(0, 16).replace("T", " ")}`;
    $("item-probs").replaceChildren(HV.probabilities(item.probabilities, item.label));
    document.querySelectorAll("#answers button").forEach((b) => {
      const predicted = b.dataset.class === item.label;
      b.classList.toggle("predicted", predicted);
      b.title = predicted ? "confirm the model's type" : `correct to ${title(b.dataset.class)}`;
    });
    $("queue-pos").textContent = `Item ${pos + 1} of ${queue.length} loaded · least certain first`;
    $("image-slot").replaceChildren();
    $("image-slot").className = "placeholder";
    $("image-slot").textContent = "loading…";
    $("gradcam-slot").replaceChildren();
    $("gradcam-slot").className = "placeholder";
    $("gradcam-slot").textContent = "loading…";
    const current = load(item);
    queue.slice(pos + 1, pos + 1 + PREFETCH).forEach(load);  // the next ones, while this one is looked at
    const loaded = await current;
    if (queue[pos] !== item) return;  // answered before its images arrived
    put("image-slot", loaded.image, "image not available");
    put("gradcam-slot", loaded.gradcam && loaded.gradcam.img, "no heat-map");
    if (loaded.gradcam) $("gradcam-caption").textContent = `Grad-CAM of ${title(loaded.gradcam.cls)}`;
  }

  function put(slotId, img, fallback) {
    const slot = $(slotId);
    if (img) {
      img.classList.add(slotId.replace("-slot", ""));
      slot.className = "slot";
      slot.replaceChildren(img);
    } else slot.textContent = fallback;
  }

  function renderCount() {
    $("reviewed-count").textContent = String(sitting.reviewed);
    $("reviewed-split").textContent = `${sitting.confirmed} confirmed · ${sitting.corrected} corrected`;
    sessionStorage.setItem("hv_review_sitting", JSON.stringify(sitting));
  }

  // --- answering --------------------------------------------------------------------------------
  async function answer(trueClass) {
    if (submitting || pos >= queue.length) return;
    submitting = true;
    const item = queue[pos];
    const body = new URLSearchParams({ prediction_id: item.id, true_class: trueClass, comment: $("comment").value });
    try {
      let response = await request("/feedback", { method: "POST", body });
      if (response.status === 403) {  // maybe a stale CSRF token: ask /me for the current one, once
        await HV.me(true);
        response = await request("/feedback", { method: "POST", body });
      }
      if (!response.ok) {
        const err = await errorOf(response);
        if (err.status === 401) {
          HV.notice($("message"), "warn", "Your session has ended. ", HV.loginLink("Sign in again"), ".");
          return;
        }
        $("flash").textContent = "";
        HV.notice($("message"), "error", `Not saved: ${err.error}: ${err.detail}`);
        if (err.status === 404 || err.status === 409) next(item);  // gone: move on
        return;
      }
      const confirmed = trueClass === item.label;
      sitting.reviewed++;
      sitting[confirmed ? "confirmed" : "corrected"]++;
      renderCount();
      $("flash").textContent = confirmed ? `Saved: confirmed ${title(trueClass)}.` : `Saved: corrected ${title(item.label)} → ${title(trueClass)}.`;
      $("comment").value = "";
      next(item);
    } catch (e) {
      HV.notice($("message"), "error", `Not saved, the service did not answer: ${e.message}`);
    } finally {
      submitting = false;
    }
  }

  function next(item) {
    done.add(item.id);
    const loaded = cache.get(item.id);
    cache.delete(item.id);
    if (loaded) loaded.then(({ image, gradcam }) => [image, gradcam && gradcam.img].forEach((img) => img && URL.revokeObjectURL(img.src)));
    pos++;
    show();
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement && document.activeElement.tagName);
    if (typing) {
      if (event.key === "Escape") document.activeElement.blur();
      return;
    }
    if ($("workspace").classList.contains("hidden") || pos >= queue.length) return;
    const key = event.key.toLowerCase();
    if (keys[key]) { event.preventDefault(); answer(keys[key]); }
    else if (key === "enter") { event.preventDefault(); answer(queue[pos].label); }
    else if (key === "s") { event.preventDefault(); $("flash").textContent = "Skipped."; next(queue[pos]); }
  }

  document.addEventListener("DOMContentLoaded", () => {
    renderCount();
    document.addEventListener("keydown", onKey);
    $("filters").addEventListener("submit", (e) => { e.preventDefault(); queue = []; pos = 0; document.activeElement.blur(); show(); });
    show();
  });
})();
