// Review page: GET /review/queue (least certain first), show each item's image and Grad-CAM,
// one key or click per type to confirm or correct (POST /feedback), then the next at once.
// The types are the queue's `classes`: the model's classes and the laboratory's vocabulary
// (any number of them): digits 1-9 answer the first nine, a letter the one type it alone starts
// (S skips), and the type-ahead (/ or any other letter) answers any type by name.
// An item the model answered "unknown" (a cell beyond its open-set threshold) is shown as such,
// with the class it most resembles. The next items' image and heat-map are fetched while the
// current one is on screen.
"use strict";

(() => {
  const { el, request, errorOf, pct, title } = HV;
  const $ = (id) => document.getElementById(id);
  const PAGE = 50;        // queue items fetched at a time
  const PREFETCH = 2;     // items loaded ahead of the one shown
  const UNKNOWN = "unknown";           // the model's answer for a cell beyond its open-set threshold
  const RESERVED = new Set(["s"]);     // S skips: never a type's key

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

  // The answer buttons, the type-ahead's list and the filter's options, once, from the queue's types.
  function setClasses(list) {
    if (classes.length || !list || !list.length) return;
    classes = list;
    const letters = {};
    list.forEach((c) => { letters[c[0]] = (letters[c[0]] || 0) + 1; });
    keys = {};
    const select = $("f-label");
    select.append(el("option", { value: UNKNOWN, text: "Unknown (not a type the model knows)" }));
    list.forEach((cls, i) => {
      const keyHints = i < 9 ? [String(i + 1)] : [];
      if (letters[cls[0]] === 1 && /[a-z]/.test(cls[0]) && !RESERVED.has(cls[0])) keyHints.push(cls[0]);
      keyHints.forEach((k) => { keys[k] = cls; });
      const shown = keyHints.map((k) => k.toUpperCase());
      select.append(el("option", { value: cls, text: title(cls) }));
      $("type-list").append(el("option", { value: cls }));
      $("answers").append(el("button", {
        type: "button", "data-class": cls, "data-keys": keyHints.join(" "), id: `answer-${cls.replace(/\W+/g, "-")}`,
        "aria-keyshortcuts": shown.length ? shown.join(" ") : null,
        "aria-label": `${title(cls)}: ${shown.length ? `key ${shown.join(" or ")}` : "type its name after /"}`,
        onclick: () => answer(cls),
      },
      ...(shown.length ? shown.map((k) => el("kbd", { text: k })) : [el("kbd", { text: "/", title: "type its name" })]),
      el("span", { text: title(cls) })));
    });
  }

  // --- type-ahead: any type by (part of) its name ---------------------------------------------
  function matching(text) {
    const q = text.trim().toLowerCase().replace(/\s+/g, " ");
    if (!q) return [];
    const exact = classes.filter((c) => c === q);
    if (exact.length) return exact;
    const starts = classes.filter((c) => c.startsWith(q) || c.split(" ").some((word) => word.startsWith(q)));
    return starts.length ? starts : classes.filter((c) => c.includes(q));
  }

  function showMatches() {
    const text = $("type-ahead").value;
    const found = matching(text);
    document.querySelectorAll("#answers button").forEach((b) => b.classList.toggle("match", found.includes(b.dataset.class)));
    $("type-ahead-match").textContent = !text.trim() ? ""
      : found.length === 1 ? `Enter answers: ${title(found[0])}`
      : found.length ? `${found.length} types match (${found.map(title).join(", ")}): type more`
      : "No type has this name.";
    return found;
  }

  function closeTypeAhead() {
    $("type-ahead").value = "";
    showMatches();
    $("type-ahead").blur();
  }

  function onTypeAheadKey(event) {
    if (event.key !== "Escape" && event.key !== "Enter") return;
    event.preventDefault();
    event.stopPropagation();  // the page's keys (Enter confirms) are not for this box
    if (event.key === "Escape") { closeTypeAhead(); return; }
    const found = showMatches();
    if (found.length !== 1) return;  // the line under the box says why
    closeTypeAhead();
    if (!$("workspace").classList.contains("hidden") && pos < queue.length) answer(found[0]);
  }

  function topClass(probabilities) {
    return Object.entries(probabilities).sort((a, b) => b[1] - a[1])[0] || [null, null];
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
    const unknown = item.unknown || item.label === UNKNOWN;
    $("item").dataset.predictionId = item.id;
    $("item").dataset.unknown = String(unknown);
    $("item").classList.toggle("unknown", unknown);
    if (unknown) {  // not one of the model's classes: say what it resembles, never answer as it
      const [resembles, p] = topClass(item.probabilities);
      $("item-label").textContent = `Model says: unknown cell type — resembles ${title(resembles)} ${pct(p)}`;
      $("item-badge").replaceChildren(el("span", { class: "badge unknown", text: "not a type the model knows",
        title: "beyond the model's open-set threshold: name its type" }));
      $("probs-title").textContent = "What it resembles (the model's classes)";
    } else {
      $("item-label").textContent = `Model says: ${title(item.label)}`;
      $("item-badge").replaceChildren(el("span", { class: "badge review", text: `${pct(item.confidence)} confident` }));
      $("probs-title").textContent = "Model's probabilities";
    }
    $("item-meta").textContent = `version ${item.model_version} · ${item.created_at.slice(0, 16).replace("T", " ")}` +
      (item.open_set_score === null || item.open_set_score === undefined ? "" : ` · open-set score ${Number(item.open_set_score).toFixed(1)}`);
    $("item-probs").replaceChildren(HV.probabilities(item.probabilities, unknown ? null : item.label));
    document.querySelectorAll("#answers button").forEach((b) => {
      const predicted = b.dataset.class === item.label;
      b.classList.toggle("predicted", predicted);
      b.title = predicted ? "confirm the model's type" : unknown ? `answer ${title(b.dataset.class)}` : `correct to ${title(b.dataset.class)}`;
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
      $("flash").textContent = confirmed ? `Saved: confirmed ${title(trueClass)}.`
        : item.label === UNKNOWN ? `Saved: unknown → ${title(trueClass)}.`
        : `Saved: corrected ${title(item.label)} → ${title(trueClass)}.`;
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
    else if (key === "enter") {
      event.preventDefault();
      if (classes.includes(queue[pos].label)) answer(queue[pos].label);
      else $("flash").textContent = "The model named no type here: answer with a type's key or name.";
    }
    else if (key === "s") { event.preventDefault(); $("flash").textContent = "Skipped."; next(queue[pos]); }
    else if (key === "/" || /^[a-z]$/.test(key)) {  // the type-ahead, with the letter typed
      event.preventDefault();
      $("type-ahead").value = key === "/" ? "" : key;
      $("type-ahead").focus();
      showMatches();
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    renderCount();
    document.addEventListener("keydown", onKey);
    $("type-ahead").addEventListener("keydown", onTypeAheadKey);
    $("type-ahead").addEventListener("input", showMatches);
    $("filters").addEventListener("submit", (e) => {
      e.preventDefault();
      queue = []; pos = 0; document.activeElement.blur();
      // Until the filtered queue arrives the shown item is not in it: hide it, so that no key (and no
      // reader) acts on a cell the new filter may not hold.
      $("workspace").classList.add("hidden");
      $("item").dataset.predictionId = "";
      HV.notice($("message"), "ok", "Loading the queue…");
      show();
    });
    show();
  });
})();
