// Lab statistics page: GET /feedback/stats as tables with bars. The model's answers include
// "unknown" (a cell beyond its open-set threshold) and any class the lab added; reviewers answer
// with the laboratory's whole vocabulary, so the confusion is not square: its rows are
// `predicted` (older services sent only `classes`, for both), its columns `classes`.
"use strict";

(() => {
  const { el, request, errorOf, pct, title } = HV;
  const $ = (id) => document.getElementById(id);
  const UNKNOWN = "unknown";

  function typeName(label) { return label === UNKNOWN ? "Unknown type" : title(label); }

  function agreementTable(groups, keyName, format = (k) => k) {
    const keys = Object.keys(groups);
    if (!keys.length) return el("p", { class: "muted", text: "No reviews yet." });
    return el("div", { class: "scroll" }, el("table", { class: "data agreement" },
      el("thead", {}, el("tr", {}, el("th", { text: keyName }), el("th", { class: "num", text: "reviewed" }),
        el("th", { class: "num", text: "confirmed" }), el("th", { text: "agreement" }), el("th", { class: "num", text: "" }))),
      el("tbody", {}, keys.map((key) => {
        const g = groups[key];
        const kind = g.agreement === null ? "" : g.agreement >= 0.9 ? "ok" : g.agreement < 0.7 ? "warn" : "";
        return el("tr", { "data-key": key }, el("th", { scope: "row", text: format(key) }),
          el("td", { class: "num", text: g.reviewed }), el("td", { class: "num", text: g.confirmed }),
          el("td", { class: "barcell" }, HV.bar(g.agreement, kind)), el("td", { class: "num", text: pct(g.agreement) }));
      }))));
  }

  function confusionTable(confusion) {
    const columns = confusion.classes;
    const rows = confusion.predicted || confusion.classes;
    const max = Math.max(1, ...confusion.matrix.flat());
    return el("div", { class: "scroll" }, el("table", { class: "data confusion" },
      el("thead", {}, el("tr", {}, el("th", { text: "model \\ reviewer" }), columns.map((c) => el("th", { scope: "col", text: title(c) })))),
      el("tbody", {}, rows.map((predicted, i) => el("tr", { "data-predicted": predicted, class: predicted === UNKNOWN ? "unknown" : null },
        el("th", { scope: "row", text: typeName(predicted) }),
        (confusion.matrix[i] || []).map((n, j) => {
          const agree = predicted === columns[j];
          return el("td", {
            class: agree ? "diag" : null, "data-predicted": predicted, "data-corrected": columns[j],
            style: n ? `background: rgba(${agree ? "46,125,79" : predicted === UNKNOWN ? "47,93,138" : "179,38,30"}, ${(0.12 + 0.5 * n / max).toFixed(2)})` : null,
            text: n });
        }))))));
  }

  function disputedTable(disputed) {
    const entries = Object.entries(disputed);
    if (!entries.length) return el("p", { class: "muted", text: "None: every reviewed image has one agreed type." });
    return el("table", { class: "data" },
      el("thead", {}, el("tr", {}, el("th", { text: "image (sha256)" }), el("th", { text: "labels by reviewer" }))),
      el("tbody", {}, entries.map(([sha, labels]) => el("tr", {}, el("td", {}, el("code", { title: sha, text: sha.slice(0, 12) + "…" })),
        el("td", { text: Object.entries(labels).map(([who, cls]) => `${who}: ${cls}`).join(" · ") })))));
  }

  function tile(value, what, id) {
    return el("div", { class: "tile", id }, el("div", { class: "value", text: value }), el("div", { class: "what", text: what }));
  }

  async function load() {
    const response = await request("/feedback/stats");
    if (!response.ok) {
      const err = await errorOf(response);
      $("stats").classList.add("hidden");
      if (err.status === 401) HV.notice($("message"), "warn", "The lab statistics are for signed-in staff. ", HV.loginLink("Sign in"), ".");
      else HV.notice($("message"), "error", `Could not load the statistics: ${err.error}: ${err.detail}`);
      return;
    }
    const stats = await response.json();
    $("message").replaceChildren();
    $("stats").classList.remove("hidden");
    const o = stats.overall;
    $("tiles").replaceChildren(
      tile(stats.corrections, "reviews stored", "tile-corrections"),
      tile(o.reviewed, "reviews of a model prediction", "tile-reviewed"),
      tile(o.confirmed, "model confirmed", "tile-confirmed"),
      tile(o.reviewed - o.confirmed, "model corrected", "tile-corrected"),
      tile(pct(o.agreement), "agreement model vs. reviewers", "tile-agreement"),
      tile(Object.keys(stats.disputed_images).length, "images in dispute", "tile-disputed"));
    $("per-class").replaceChildren(agreementTable(stats.per_class, "predicted type", typeName));
    $("per-version").replaceChildren(agreementTable(stats.per_model_version, "model version", (v) => `version ${v}`));
    $("per-day").replaceChildren(agreementTable(stats.per_day, "day"));
    $("confusion").replaceChildren(confusionTable(stats.confusion));
    $("disputed").replaceChildren(disputedTable(stats.disputed_images));
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("refresh").addEventListener("click", load);
    load();
  });
})();
