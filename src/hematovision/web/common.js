// Shared by every page: the navigation header, who is signed in, and fetch helpers that send the
// session's CSRF token (kept in sessionStorage after POST /login) on every POST.
"use strict";

const HV = (() => {
  const PAGES = [
    ["index.html", "Predict"],
    ["review.html", "Review"],
    ["lab.html", "Lab statistics"],
    ["ops.html", "Ops"],
    ["/docs", "API docs"],
  ];
  const CSRF_KEY = "hv_csrf_token";
  let mePromise = null;

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function csrf() { return sessionStorage.getItem(CSRF_KEY) || ""; }
  function setCsrf(token) {
    if (token) sessionStorage.setItem(CSRF_KEY, token); else sessionStorage.removeItem(CSRF_KEY);
  }

  // fetch() with the CSRF header on anything but GET/HEAD.
  function request(path, options = {}) {
    const method = (options.method || "GET").toUpperCase();
    const headers = new Headers(options.headers || {});
    if (method !== "GET" && method !== "HEAD" && csrf()) headers.set("X-CSRF-Token", csrf());
    return fetch(path, { credentials: "same-origin", ...options, method, headers });
  }

  // The service's error shape is {"error": code, "detail": message}; anything else becomes one.
  async function errorOf(response) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    return {
      status: response.status,
      error: (body && body.error) || `http_${response.status}`,
      detail: (body && body.detail) || response.statusText || "request failed",
      retryAfter: response.headers.get("retry-after"),
    };
  }

  // GET /me once per page: {username, roles, csrf_token} or null when nobody is signed in.
  function me(refresh = false) {
    if (!mePromise || refresh) {
      mePromise = request("/me").then(async (response) => {
        if (!response.ok) { setCsrf(null); return null; }
        const who = await response.json();
        if (who.csrf_token) setCsrf(who.csrf_token); // e.g. a new tab of a signed-in browser
        return who;
      }).catch(() => null);
    }
    return mePromise;
  }

  async function signOut() {
    await request("/logout", { method: "POST" }).catch(() => null);
    setCsrf(null);
    location.href = "login.html";
  }

  function loginLink(text = "Sign in") {
    const here = location.pathname.split("/").pop() || "index.html";
    return el("a", { href: `login.html?next=${encodeURIComponent(here)}`, text });
  }

  function header() {
    const here = location.pathname.split("/").pop() || "index.html";
    const links = PAGES.map(([href, label]) =>
      el("a", { href, class: href === here ? "active" : null, "aria-current": href === here ? "page" : null, text: label }));
    const who = el("span", { id: "whoami", class: "whoami" }, "…");
    const bar = el("header", { class: "topbar" },
      el("a", { href: "index.html", class: "brand" }, el("span", { class: "logo", "aria-hidden": "true" }), "HematoVision"),
      el("nav", {}, links), who);
    document.body.prepend(bar);
    me().then((user) => {
      who.replaceChildren();
      if (user) {
        who.append(el("span", { class: "user", title: user.roles.join(", ") },
          el("strong", { text: user.username }), ` (${user.roles.join(", ")})`), " ",
          el("button", { type: "button", class: "link", id: "signout", onclick: signOut, text: "Sign out" }));
      } else {
        who.append(el("span", { class: "muted", text: "not signed in" }), " ", loginLink());
      }
    });
  }

  function pct(x, digits = 1) { return x === null || x === undefined ? "–" : `${(100 * x).toFixed(digits)} %`; }
  function title(s) { return s ? s.charAt(0).toUpperCase() + s.slice(1) : s; }

  function bar(fraction, kind = "") {
    const f = Math.max(0, Math.min(1, Number(fraction) || 0));
    return el("span", { class: `bar ${kind}`, role: "meter", "aria-valuemin": "0", "aria-valuemax": "1",
      "aria-valuenow": f.toFixed(4) }, el("span", { class: "fill", style: `width:${(100 * f).toFixed(1)}%` }));
  }

  // One row per class, largest first: name, bar, percentage.
  function probabilities(probs, highlight) {
    const rows = Object.entries(probs).sort((a, b) => b[1] - a[1]);
    return el("table", { class: "probs" }, el("tbody", {}, rows.map(([cls, p]) =>
      el("tr", { class: cls === highlight ? "top" : null, "data-class": cls },
        el("th", { scope: "row", text: title(cls) }), el("td", {}, bar(p)), el("td", { class: "num", text: pct(p) })))));
  }

  function notice(container, kind, ...content) {
    container.replaceChildren(el("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, ...content));
  }

  document.addEventListener("DOMContentLoaded", header);
  return { el, request, errorOf, me, csrf, setCsrf, signOut, loginLink, pct, title, bar, probabilities, notice };
})();
