// Sign-in page: POST /login (form fields username, password) keeps the answer's CSRF token in
// sessionStorage for the other pages; POST /logout signs out.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // Only our own pages are followed after signing in (no open redirect).
  function nextPage() {
    const next = new URLSearchParams(location.search).get("next") || "";
    return /^[a-z]+\.html$/.test(next) ? next : null;
  }

  function showSignedIn(user) {
    $("signed-in").classList.toggle("hidden", !user);
    if (user) {
      $("current-user").textContent = user.username;
      $("current-roles").textContent = `(${user.roles.join(", ") || "no role"})`;
    }
  }

  async function signIn(event) {
    event.preventDefault();
    const button = $("login-button");
    button.disabled = true;
    try {
      const response = await fetch("/login", {
        method: "POST", credentials: "same-origin",
        body: new URLSearchParams({ username: $("username").value, password: $("password").value }),
      });
      if (!response.ok) {
        const err = await HV.errorOf(response);
        let text = err.detail;
        if (err.status === 401) text = "Wrong user name or password (or the account is disabled).";
        if (err.status === 429) text = `Too many failed sign-ins. Try again in ${err.retryAfter || "a few"} seconds.`;
        HV.notice($("message"), "error", text);
        $("password").select();
        return;
      }
      const user = await response.json();
      HV.setCsrf(user.csrf_token);
      $("password").value = "";
      const next = nextPage();
      if (next) { location.href = next; return; }
      location.reload(); // the header and this page show who is signed in
    } catch (e) {
      HV.notice($("message"), "error", `The service did not answer: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", signIn);
    $("logout").addEventListener("click", HV.signOut);
    HV.me().then((user) => {
      showSignedIn(user);
      if (user && nextPage()) HV.notice($("message"), "ok", "You are signed in. ", HV.el("a", { href: nextPage(), text: "Continue" }));
    });
  });
})();
