// Operations page: GET /ops/status (drift now, alerts, the latest windows with their reports);
// engineers approve an alert's retraining here (POST /ops/alerts/{id}/approve).
"use strict";

(() => {
  const { el, request, errorOf } = HV;
  const $ = (id) => document.getElementById(id);
  const SIGNALS = ["image_stats", "embeddings", "prediction", "confidence"];
  let roles = [];

  function when(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : ""; }

  function reportLink(url, text) {
    return url ? el("a", { href: url, target: "_blank", rel: "noopener", text }) : "";
  }

  function tile(value, what, id) {
    return el("div", { class: "tile", id }, el("div", { class: "value", text: value }), el("div", { class: "what", text: what }));
  }

  function approveButton(alert) {
    if (alert.status !== "awaiting_approval" || !roles.includes("engineer")) return "";
    const button = el("button", { type: "button", text: "Approve retraining" });
    button.addEventListener("click", async () => {
      button.disabled = true;
      const response = await request(`/ops/alerts/${alert.id}/approve`, { method: "POST" });
      if (!response.ok) {
        const err = await errorOf(response);
        HV.notice($("message"), "error", `Could not approve alert ${alert.id}: ${err.detail}`);
        button.disabled = false;
        return;
      }
      await load();
    });
    return button;
  }

  function render(status) {
    if (status.model_version === null) {
      HV.notice($("status"), "warn", "No monitoring run yet: run ", el("code", { text: "hematovision monitor run" }),
        " (or schedule the monitoring flow).");
    } else if (status.drifting) {
      HV.notice($("status"), "error", el("strong", { text: "Drifting" }),
        ` since ${when(status.since)}: ${status.drift_windows} window(s) in a row; signals: ${status.signals.join(", ")}.`);
    } else {
      HV.notice($("status"), "ok", el("strong", { text: "No drift" }), " in the latest window.");
    }
    const c = status.corrections;
    $("tiles").replaceChildren(
      tile(status.model_version ? `v${status.model_version}` : "–", "champion monitored", "tile-version"),
      tile(when(status.champion_registered_at).slice(0, 10) || "–", "champion registered", "tile-since"),
      tile(`${c.since_champion} / ${c.alert_at}`, "corrections since this champion / alert at", "tile-corrections"),
      tile(c.total, "corrections in all", "tile-corrections-total"),
      tile(status.retrain_trigger, "retraining trigger", "tile-trigger"),
      tile(status.last_run ? when(status.last_run.at).slice(11, 16) : "never", "last monitoring run (UTC)", "tile-last-run"));

    $("alerts").tBodies[0].replaceChildren(...(status.alerts.length ? status.alerts.map((a) => el("tr", { "data-alert": a.id },
      el("td", { class: "num", text: a.id }), el("td", { text: when(a.created_at) }), el("td", { text: a.kind }),
      el("td", { text: `v${a.model_version}` }), el("td", {}, a.message, " ", reportLink(a.report_url, "(report)")),
      el("td", { text: a.status + (a.decided_by ? ` (${a.decided_by})` : "") }), el("td", {}, approveButton(a))))
      : [el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No alerts." }))]));

    const score = (w, name) => {
      const s = w.signals[name];
      return s ? `${s.score.toFixed(3)}${s.drift ? " ▲" : ""}` : "";
    };
    $("windows").tBodies[0].replaceChildren(...(status.windows.length ? status.windows.map((w) => el("tr", { class: w.drifting ? "drifting" : null },
      el("td", { class: "num", text: w.id }), el("td", { text: when(w.start_at) }), el("td", { text: when(w.end_at) }),
      el("td", { class: "num", text: w.n }), el("td", { text: w.drifting ? "yes" : "no" }),
      SIGNALS.map((name) => el("td", { class: "num", text: score(w, name) })),
      el("td", {}, reportLink(w.report_url, "Evidently report"))))
      : [el("tr", {}, el("td", { colspan: 10, class: "muted", text: "No window judged yet." }))]));
  }

  async function load() {
    const response = await request("/ops/status");
    if (!response.ok) {
      const err = await errorOf(response);
      $("ops").classList.add("hidden");
      if (err.status === 401) HV.notice($("message"), "warn", "The operations page is for ops, engineers and admins. ", HV.loginLink("Sign in"), ".");
      else HV.notice($("message"), "error", `Could not load the status: ${err.detail}`);
      return;
    }
    $("message").replaceChildren();
    render(await response.json());
    $("ops").classList.remove("hidden");
  }

  document.addEventListener("DOMContentLoaded", async () => {
    const user = await HV.me();
    roles = user ? user.roles : [];
    $("refresh").addEventListener("click", load);
    await load();
    setInterval(load, 30000);
  });
})();
