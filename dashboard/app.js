// token-service dashboard: plain JavaScript, no build step, no third-party code except Stripe.js
// (loaded from Stripe, or from localstripe offline, only when a card is added).
//
// It talks to the same public API as everyone else, logged in with an HttpOnly, SameSite=Strict
// session cookie. Every call that changes something sends Content-Type: application/json, which
// auth_svc requires of cookie-authenticated writes (a cross-site form cannot send it).
"use strict";

(() => {
  // Two calls a poll: well inside the per-account limit on session calls (120 a minute).
  const POLL_MS = 5000;
  const TOPUP_POLL_MS = 700;
  const TOPUP_WAIT_MS = 30000;
  const CHART_DAYS = 14;
  const COLORS = ["#4f46e5", "#0ea5e9", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#14b8a6", "#f97316"];
  const VIEWS = { "": "overview", keys: "keys", billing: "billing", limits: "limits" };
  const VERIFY_PATH = "/dashboard/verify";

  const state = {
    account: null, view: null, pollTimer: null, keysById: new Map(), seenCalls: null,
    config: null, stripe: null, cardElement: null, tiers: null,
  };

  const $ = (selector, root = document) => root.querySelector(selector);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // --- the API ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `The request failed (${status}).`);
      this.status = status;
      this.code = error.code;
    }
  }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET") {
      init.headers["Content-Type"] = "application/json";
      init.headers["X-Requested-With"] = "token-service-dashboard";
      if (body !== undefined) init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, { error: { message: "The server cannot be reached. Check your connection." } });
    }
    let data = null;
    try { data = await response.json(); } catch (err) { data = null; }
    if (response.status === 401 && !path.startsWith("/v1/sessions") && !path.startsWith("/v1/accounts")) {
      showAuth("login");
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // --- money, numbers, dates (money stays a decimal string: no float touches it) ---------------

  function usd(amount, places = 2) {
    // "9.9999985" -> "$9.99": cut toward zero, so the dashboard never shows more than there is.
    const text = String(amount || "0");
    const negative = text.startsWith("-");
    const [whole, frac = ""] = text.replace(/^[-+]/, "").split(".");
    const shown = places > 0 ? `${Number(whole).toLocaleString("en-US")}.${frac.padEnd(places, "0").slice(0, places)}`
      : Number(whole).toLocaleString("en-US");
    return `${negative ? "-" : ""}$${shown}`;
  }

  function usdExact(amount) {
    const text = String(amount || "0");
    return text.startsWith("-") ? `-$${text.slice(1)}` : `$${text}`;
  }

  function int(value) { return Number(value || 0); }

  function dateTime(unixSeconds) {
    // Today's times alone (a call list is mostly today's); other days with their date.
    const date = new Date(int(unixSeconds) * 1000);
    const time = { hour: "2-digit", minute: "2-digit", second: "2-digit" };
    if (date.toDateString() === new Date().toDateString()) return date.toLocaleTimeString(undefined, time);
    return date.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  function dateOnly(unixSeconds) {
    return new Date(int(unixSeconds) * 1000).toLocaleDateString(undefined, { year: "numeric", month: "short",
      day: "numeric" });
  }

  function ago(unixSeconds) {
    if (!int(unixSeconds)) return "Never";
    const seconds = Math.max(0, Date.now() / 1000 - int(unixSeconds));
    if (seconds < 60) return "Just now";
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return dateOnly(unixSeconds);
  }

  function titleCase(name) { return name ? name[0].toUpperCase() + name.slice(1) : ""; }

  function flash(message, kind = "good") {
    const box = $("#flash");
    box.textContent = message;
    box.className = `flash ${kind}`;
    box.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  function showError(node, error) {
    node.textContent = error instanceof Error ? error.message : String(error);
    node.hidden = false;
  }

  async function busy(button, work) {
    const label = button.textContent;
    button.disabled = true;
    try { return await work(); } finally { button.disabled = false; button.textContent = label; }
  }

  // --- signing up and logging in -----------------------------------------------------------

  function showAuth(mode) {
    stopPolling();
    state.account = null;
    $("#app").hidden = true;
    $("#welcome").hidden = true;
    $("#auth").hidden = false;
    setAuthMode(mode);
    document.title = "token-service";
  }

  function setAuthMode(mode) {
    $("#auth-form").dataset.mode = mode;
    for (const tab of document.querySelectorAll("[data-auth-tab]")) {
      tab.setAttribute("aria-selected", String(tab.dataset.authTab === mode));
    }
    const signup = mode === "signup";
    $("#auth-submit").textContent = signup ? "Create account" : "Log in";
    $("#auth-intro").textContent = signup ? "$10 of free credit on signup. No card required."
      : "Welcome back.";
    $("#auth-password").setAttribute("autocomplete", signup ? "new-password" : "current-password");
    $("#auth-error").hidden = true;
  }

  async function submitAuth(event) {
    event.preventDefault();
    const mode = $("#auth-form").dataset.mode;
    const credentials = { email: $("#auth-email").value.trim(), password: $("#auth-password").value };
    $("#auth-error").hidden = true;
    await busy($("#auth-submit"), async () => {
      $("#auth-submit").textContent = mode === "signup" ? "Creating your account…" : "Logging in…";
      try {
        let firstKey = null;
        if (mode === "signup") {
          const created = await api("POST", "/v1/accounts", credentials);
          firstKey = created.api_key;
          $("#welcome-credit").textContent = `${usd(created.account.balance_usd)} of free`;
        }
        const session = await api("POST", "/v1/sessions", credentials);
        state.account = session.account;
        $("#auth-password").value = "";
        if (firstKey) {
          $("#welcome-key").textContent = firstKey;
          $("#welcome").hidden = false;
          $("#welcome-done").focus();
        } else {
          enterApp();
        }
      } catch (error) {
        showError($("#auth-error"), error);
      }
    });
  }

  async function logout() {
    try { await api("DELETE", "/v1/sessions/current"); } catch (error) { /* the cookie goes either way */ }
    history.pushState(null, "", "/dashboard");
    showAuth("login");
  }

  function enterApp() {
    $("#auth").hidden = true;
    $("#welcome").hidden = true;
    $("#app").hidden = false;
    $("#who-email").textContent = state.account ? state.account.email : "";
    renderVerification();
    route();
  }

  // --- email verification ------------------------------------------------------------------

  function renderVerification() {
    const pending = Boolean(state.account) && state.account.email_verified === false;
    $("#verify-banner").hidden = !pending;
    if (pending) $("#verify-email").textContent = state.account.email;
  }

  async function resendVerification(event) {
    const button = event.currentTarget;
    await busy(button, async () => {
      try {
        const sent = await api("POST", "/v1/email-verifications/resend", {});
        flash(`We sent a new link to ${sent.sent_to}.`);
      } catch (error) {
        flash(error.message, "bad");
      }
    });
  }

  async function verifyFromLink() {
    // The mailed link is /dashboard/verify#TOKEN: the token stays out of every server's logs.
    // Returns what to tell the person once the page is up.
    const token = location.hash.slice(1);
    history.replaceState(null, "", "/dashboard");
    if (!token) return null;
    try {
      const verified = await api("POST", "/v1/email-verifications", { token });
      return [`${verified.email} is verified: your API keys can spend your credit now.`, "good"];
    } catch (error) {
      return [error.message, "bad"];
    }
  }

  // --- routing -------------------------------------------------------------------------------

  function viewOfPath() {
    const rest = location.pathname.replace(/^\/dashboard\/?/, "").replace(/\/+$/, "");
    return VIEWS[rest] || "overview";
  }

  function route() {
    if (!state.account) return;
    const view = viewOfPath();
    state.view = view;
    for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
    for (const link of document.querySelectorAll(".nav a")) {
      if (link.dataset.view === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = `${$(`#view-${view} h1`).textContent} · token-service`;
    $("#flash").hidden = true;
    stopPolling();
    const load = { overview: loadOverview, keys: loadKeys, billing: loadBilling, limits: loadLimits }[view];
    load().catch((error) => flash(error.message, "bad"));
    if (view === "overview") startPolling();
  }

  function navigate(event) {
    const link = event.target.closest("a[data-link]");
    if (!link || event.metaKey || event.ctrlKey || event.shiftKey) return;
    event.preventDefault();
    if (link.pathname !== location.pathname) history.pushState(null, "", link.pathname);
    route();
  }

  function startPolling() {
    state.pollTimer = setInterval(() => {
      if (document.visibilityState === "visible") refreshOverview().catch(() => {});
    }, POLL_MS);
  }

  function stopPolling() {
    clearInterval(state.pollTimer);
    state.pollTimer = null;
  }

  // --- overview ----------------------------------------------------------------------------

  async function loadOverview() {
    state.seenCalls = null;
    $(".origin").textContent = location.origin;
    await refreshKeyNames();
    await refreshOverview();
  }

  async function refreshKeyNames() {
    const keys = await api("GET", "/v1/keys?include_revoked=true");
    state.keysById = new Map(keys.data.map((key) => [key.id, key]));
  }

  async function refreshOverview() {
    const [account, usage, tiers] = await Promise.all([
      api("GET", "/v1/account"), api("GET", "/v1/usage?limit=25"), loadTiers()]);
    if (state.view !== "overview") return;
    state.account = account;
    renderBalance(account);
    const tier = tiers.data.find((t) => t.name === account.tier);
    $("#tier").textContent = titleCase(account.tier);
    $("#tier-note").textContent = tier ? `${tier.requests_per_minute} requests per minute per key` : "";
    const spent = usd(usage.total_cost_usd, 2);
    $("#spend-total").textContent = spent === "$0.00" && /[1-9]/.test(usage.total_cost_usd) ? "< $0.01" : spent;
    const calls = usage.daily.reduce((sum, day) => sum + int(day.requests), 0);
    $("#spend-calls").textContent = `${calls.toLocaleString("en-US")} call${calls === 1 ? "" : "s"} · exact: ${usdExact(usage.total_cost_usd)}`;
    renderChart(usage.daily);
    renderCalls(usage.data);
  }

  function renderBalance(account) {
    $("#balance").textContent = usd(account.balance_usd);
    const held = account.held_usd && account.held_usd !== "0.00" ? ` · ${usdExact(account.held_usd)} held` : "";
    $("#balance-detail").textContent = `exact: ${usdExact(account.balance_usd)}${held}`;
  }

  function unitsOf(row) {
    const u = row.units || {};
    if (int(u.images)) return ["—", `${int(u.images)} image${int(u.images) === 1 ? "" : "s"}`];
    if (int(u.video_ms)) return ["—", `${(int(u.video_ms) / 1000).toFixed(1)} s video`];
    if (int(u.characters)) return [`${int(u.characters).toLocaleString("en-US")} chars`, "—"];
    if (int(u.audio_ms)) return [`${(int(u.audio_ms) / 60000).toFixed(2)} min audio`, "—"];
    return [`${int(u.input_tokens).toLocaleString("en-US")} tok`, `${int(u.output_tokens).toLocaleString("en-US")} tok`];
  }

  function outcomePill(outcome) {
    const kind = { completed: "good", aborted: "wait", failed: "bad" }[outcome] || "plain";
    return el("span", { class: `pill ${kind}`, text: outcome });
  }

  function renderCalls(rows) {
    const body = $("#calls tbody");
    const first = state.seenCalls === null;
    const seen = state.seenCalls || new Set();
    body.replaceChildren(...rows.map((row) => {
      const key = state.keysById.get(row.key_id);
      const [input, output] = unitsOf(row);
      const fresh = !first && !seen.has(row.request_id);
      seen.add(row.request_id);
      return el("tr", { class: fresh ? "fresh" : null, "data-request": row.request_id },
        el("td", { text: dateTime(row.created) }),
        el("td", { text: row.model }),
        el("td", { class: "hide-sm", text: key ? (key.name || key.display) : (row.key_id || "—") }),
        el("td", { class: "num hide-sm", text: input }),
        el("td", { class: "num", text: output }),
        el("td", { class: "hide-sm" }, outcomePill(row.outcome)),
        el("td", { class: "num cost", text: usdExact(row.cost_usd) }));
    }));
    state.seenCalls = seen;
    $("#calls-empty").hidden = rows.length > 0;
    $("#calls").hidden = rows.length === 0;
  }

  function lastDays(count) {
    const days = [];
    const today = new Date();
    for (let i = count - 1; i >= 0; i -= 1) {
      const day = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - i));
      days.push(day.toISOString().slice(0, 10));
    }
    return days;
  }

  function niceStep(value) {
    // 1, 2 or 5 times a power of ten: axis labels stay short ($0.00002, not $0.0000175).
    if (value <= 0) return 0.0025;
    const power = 10 ** Math.floor(Math.log10(value));
    const scaled = value / power;
    return (scaled <= 1 ? 1 : scaled <= 2 ? 2 : scaled <= 5 ? 5 : 10) * power;
  }

  function axisLabel(value, step) {
    const digits = Math.min(9, Math.max(step >= 1 ? 0 : 2, -Math.floor(Math.log10(step))));
    let text = value.toFixed(digits);
    if (text.includes(".") && digits > 2) text = text.replace(/0+$/, "").replace(/\.$/, "");
    return `$${text}`;
  }

  function renderChart(daily) {
    // Spend per day (UTC), stacked by model, drawn as inline SVG: no chart library.
    const days = lastDays(CHART_DAYS);
    const models = [...new Set(daily.map((d) => d.model))].sort();
    const color = new Map(models.map((m, i) => [m, COLORS[i % COLORS.length]]));
    const spend = new Map(days.map((d) => [d, new Map()]));
    for (const row of daily) {
      if (spend.has(row.date)) spend.get(row.date).set(row.model, Number(row.cost_usd));
    }
    const totals = days.map((d) => [...spend.get(d).values()].reduce((a, b) => a + b, 0));
    const step = niceStep(Math.max(...totals) / 4);
    const max = step * 4;
    const labels = [0, 1, 2, 3, 4].map((i) => axisLabel(step * i, step));
    // Drawn at the size it is shown, so its text stays readable on a phone.
    const width = Math.max(320, Math.round($("#chart").clientWidth || 760));
    const height = width < 500 ? 200 : 240;
    const left = 14 + 7 * Math.max(...labels.map((l) => l.length));
    const bottom = 28;
    const top = 10;
    const plotHeight = height - bottom - top;
    const slot = (width - left - 8) / days.length;
    const barWidth = Math.min(34, slot * 0.62);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("role", "img");
    const add = (parent, tag, attrs, text) => {
      const node = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (text !== undefined) node.textContent = text;
      parent.append(node);
      return node;
    };
    for (let i = 0; i <= 4; i += 1) {
      const y = top + plotHeight - (plotHeight * i) / 4;
      add(svg, "line", { x1: left, x2: width - 4, y1: y, y2: y, class: "grid" });
      add(svg, "text", { x: left - 8, y: y + 4, "text-anchor": "end", class: "axis" }, labels[i]);
    }
    days.forEach((day, index) => {
      const x = left + slot * index + (slot - barWidth) / 2;
      let y = top + plotHeight;
      for (const model of models) {
        const value = spend.get(day).get(model) || 0;
        if (!value) continue;
        const h = Math.max(1.5, (value / max) * plotHeight);
        y -= h;
        const bar = add(svg, "rect", { x, y, width: barWidth, height: h, rx: 3, fill: color.get(model) });
        add(bar, "title", {}, `${day} · ${model}: ${usdExact(String(value))}`);
      }
      const every = width < 500 ? 3 : 2;
      if ((days.length - 1 - index) % every === 0) {
        const label = new Date(`${day}T00:00:00Z`).toLocaleDateString(undefined, { month: "short", day: "numeric",
          timeZone: "UTC" });
        add(svg, "text", { x: x + barWidth / 2, y: height - 8, "text-anchor": "middle", class: "axis" }, label);
      }
    });
    $("#chart").replaceChildren(svg);
    $("#chart-legend").replaceChildren(...(models.length ? models : ["No spend yet"]).map((model) =>
      el("span", {}, models.length ? el("i", { style: `background:${color.get(model)}` }) : null, model)));
  }

  // --- API keys --------------------------------------------------------------------------

  async function loadKeys() {
    const keys = await api("GET", "/v1/keys");
    const body = $("#keys tbody");
    body.replaceChildren(...keys.data.map((key) => el("tr", { "data-key": key.id },
      el("td", { text: key.name || "Untitled" }),
      el("td", {}, el("span", { class: "key-display", text: key.display })),
      el("td", { class: "hide-sm" }, el("span", { class: "pill plain", text: titleCase(key.tier) })),
      el("td", { class: "hide-sm", text: dateOnly(key.created) }),
      el("td", { class: "hide-sm", text: ago(key.last_used) }),
      el("td", { class: "num" }, el("button", { type: "button", class: "danger", text: "Revoke",
        onclick: (event) => revokeKey(event.currentTarget, key) })))));
    $("#keys-empty").hidden = keys.data.length > 0;
    $("#keys").hidden = keys.data.length === 0;
  }

  async function createKey(event) {
    event.preventDefault();
    const button = event.submitter || $("#create-key button");
    await busy(button, async () => {
      try {
        const created = await api("POST", "/v1/keys", { name: $("#key-name").value.trim() });
        $("#new-secret-value").textContent = created.secret;
        $("#new-secret").hidden = false;
        $("#key-name").value = "";
        await loadKeys();
      } catch (error) {
        flash(error.message, "bad");
      }
    });
  }

  async function revokeKey(button, key) {
    // Two steps, no browser dialog: the first click asks, the second revokes.
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = "Confirm revoke";
      setTimeout(() => { if (button.isConnected) { button.dataset.armed = ""; button.textContent = "Revoke"; } }, 5000);
      return;
    }
    await busy(button, async () => {
      try {
        await api("DELETE", `/v1/keys/${encodeURIComponent(key.id)}`);
        flash(`Key “${key.name || key.display}” revoked: it stops working on its next call.`);
        await loadKeys();
      } catch (error) {
        flash(error.message, "bad");
      }
    });
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch (error) {
      const range = document.createRange();
      range.selectNodeContents(button.previousElementSibling);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      button.textContent = "Selected";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 2000);
  }

  // --- billing -----------------------------------------------------------------------------

  async function loadBilling() {
    const [config, account] = await Promise.all([api("GET", "/v1/billing/config"), api("GET", "/v1/account")]);
    state.config = config;
    state.account = account;
    $("#billing-balance").textContent = usd(account.balance_usd);
    $("#billing-off").hidden = config.enabled;
    $("#add-card").hidden = !config.enabled;
    $("#topup-form").hidden = !config.enabled;
    $("#topup-note").textContent = `Any amount from ${usd(config.topup_min_usd)} to ${usd(config.topup_max_usd, 0)}. `
      + "The balance is added as soon as Stripe confirms the payment.";
    await Promise.all([config.enabled ? loadCards() : null, loadTopups()]);
  }

  async function loadCards(select) {
    const cards = (await api("GET", "/v1/billing/payment-methods")).data;
    $("#cards").replaceChildren(...cards.map((card) => el("li", { "data-card": card.id },
      el("span", { class: "brand-badge", text: card.brand || "card" }),
      el("span", { text: `•••• ${card.last4}` }),
      el("span", { class: "exp", text: card.exp_month ? `Expires ${String(card.exp_month).padStart(2, "0")}/${String(card.exp_year).slice(-2)}` : "" }))));
    $("#cards-empty").hidden = cards.length > 0 || !$("#card-form").hidden;
    const chooser = $("#topup-card");
    const keep = select || chooser.value;
    chooser.replaceChildren(...cards.map((card) => el("option", { value: card.id,
      text: `${titleCase(card.brand || "card")} •••• ${card.last4}` })));
    if (!cards.length) chooser.append(el("option", { value: "", text: "Add a card first" }));
    if (keep && cards.some((c) => c.id === keep)) chooser.value = keep;
    $("#topup-submit").disabled = cards.length === 0;
    return cards;
  }

  function statusPill(topup) {
    const label = { succeeded: "Succeeded", failed: "Failed", pending: "Processing", requires_action: "Needs authentication" };
    const kind = { succeeded: "good", failed: "bad" }[topup.status] || "wait";
    return el("span", { class: `pill ${kind}`, text: label[topup.status] || topup.status });
  }

  async function loadTopups() {
    const topups = (await api("GET", "/v1/billing/topups?limit=50")).data;
    $("#topups tbody").replaceChildren(...topups.map((t) => el("tr", { "data-topup": t.id, "data-status": t.status },
      el("td", { text: dateTime(t.created) }),
      el("td", { class: "num", text: usd(t.amount_usd) }),
      el("td", { text: t.card_last4 ? `${titleCase(t.card_brand)} •••• ${t.card_last4}` : "—" }),
      el("td", {}, statusPill(t), t.failure_message ? el("span", { class: "reason", text: t.failure_message }) : null))));
    $("#topups-empty").hidden = topups.length > 0;
    $("#topups").hidden = topups.length === 0;
  }

  function loadStripeJs(url) {
    if (window.Stripe) return Promise.resolve(window.Stripe);
    if (!loadStripeJs.loading) {
      loadStripeJs.loading = new Promise((resolve, reject) => {
        const script = el("script", { src: url });
        script.addEventListener("load", () => resolve(window.Stripe));
        script.addEventListener("error", () => {
          loadStripeJs.loading = null;
          reject(new Error("Stripe.js could not be loaded. Check your connection and try again."));
        });
        document.head.append(script);
      });
    }
    return loadStripeJs.loading;
  }

  async function openCardForm() {
    $("#card-error").hidden = true;
    $("#card-form").hidden = false;
    $("#add-card").hidden = true;
    $("#cards-empty").hidden = true;
    try {
      if (!state.stripe) {
        const Stripe = await loadStripeJs(state.config.stripe_js_url);
        state.stripe = Stripe(state.config.publishable_key);
        state.cardElement = state.stripe.elements().create("card", { hidePostalCode: false });
      }
      state.cardElement.mount("#card-element");
    } catch (error) {
      showError($("#card-error"), error);
    }
  }

  function closeCardForm() {
    $("#card-form").hidden = true;
    $("#add-card").hidden = false;
    $("#cards-empty").hidden = $("#cards").children.length > 0;
  }

  async function saveCard(event) {
    event.preventDefault();
    $("#card-error").hidden = true;
    await busy($("#save-card"), async () => {
      $("#save-card").textContent = "Saving…";
      try {
        const intent = await api("POST", "/v1/billing/setup-intents", {});
        const result = await state.stripe.confirmCardSetup(intent.client_secret,
          { payment_method: { card: state.cardElement } });
        if (result.error) throw new Error(result.error.message || "The card was not accepted.");
        const method = result.setupIntent.payment_method;
        const card = await api("POST", "/v1/billing/payment-methods",
          { payment_method: typeof method === "string" ? method : method.id });
        closeCardForm();
        await loadCards(card.id);
        flash(`Card •••• ${card.last4} saved.`);
      } catch (error) {
        showError($("#card-error"), error);
      }
    });
  }

  async function topUp(event) {
    event.preventDefault();
    const error = $("#topup-error");
    error.hidden = true;
    const amount = $("#topup-amount").value.trim().replace(/^\$/, "");
    await busy($("#topup-submit"), async () => {
      $("#topup-submit").textContent = "Charging your card…";
      try {
        let topup = await api("POST", "/v1/billing/topups", { amount_usd: amount, payment_method: $("#topup-card").value });
        if (topup.status === "requires_action" && state.stripe) {
          const result = await state.stripe.confirmCardPayment(topup.client_secret);
          if (result.error) throw new Error(result.error.message || "The payment was not authenticated.");
        }
        await loadTopups();
        topup = await settled(topup);
        await loadBilling();
        if (topup.status === "succeeded") flash(`${usd(topup.amount_usd)} added to your balance.`);
        else if (topup.status === "failed") showError(error, `The payment failed: ${topup.failure_message}`);
        else flash("Stripe has not confirmed the payment yet; your balance updates when it does.", "good");
      } catch (err) {
        showError(error, err);
      }
    });
  }

  async function settled(topup) {
    const deadline = Date.now() + TOPUP_WAIT_MS;
    let current = topup;
    while (!["succeeded", "failed"].includes(current.status) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, TOPUP_POLL_MS));
      current = await api("GET", `/v1/billing/topups/${encodeURIComponent(topup.id)}`);
    }
    return current;
  }

  // --- limits and upgrades ---------------------------------------------------------------------

  async function loadTiers() {
    if (!state.tiers) state.tiers = await api("GET", "/v1/tiers");
    return state.tiers;
  }

  async function loadLimits() {
    const [tiers, account, requests] = await Promise.all([loadTiers(), api("GET", "/v1/account"),
      api("GET", "/v1/upgrade-requests")]);
    state.account = account;
    $("#tiers tbody").replaceChildren(...tiers.data.map((tier) => el("tr", { class: tier.name === account.tier ? "current" : null },
      el("td", { text: tier.title }),
      el("td", { class: "num", text: tier.requests_per_minute }),
      el("td", {}, tier.name === account.tier ? el("span", { class: "pill good", text: "Your keys" }) : null))));
    renderUpgrade(account, requests.data, tiers);
  }

  function renderUpgrade(account, requests, tiers) {
    const pending = requests.find((r) => r.status === "pending");
    const latest = requests[0];
    const box = $("#upgrade-status");
    const rank = tiers.data.map((t) => t.name);
    const above = rank.indexOf(account.tier) >= rank.indexOf("elevated");
    let message = null;
    if (above) {
      const tier = tiers.data.find((t) => t.name === account.tier);
      message = `Your keys are on the ${titleCase(account.tier)} tier (${tier ? tier.requests_per_minute : "?"} requests per minute).`
        + (account.tier === "elevated" ? " Top up to move to Paid." : "");
    } else if (pending) {
      message = `Upgrade to Elevated requested on ${dateOnly(pending.created)}: pending review. We email you when it is approved.`;
    } else if (latest && latest.status === "rejected") {
      message = "Your last request was not approved. You can ask again, or top up to move to Paid.";
    }
    box.replaceChildren(...(message ? [el("div", { class: "status-box", id: "upgrade-message", text: message })] : []));
    $("#upgrade-form").hidden = above || Boolean(pending);
  }

  async function requestUpgrade(event) {
    event.preventDefault();
    $("#upgrade-error").hidden = true;
    const button = event.submitter || $("#upgrade-form button");
    await busy(button, async () => {
      try {
        await api("POST", "/v1/upgrade-requests", { tier: "elevated", reason: $("#upgrade-reason").value.trim() });
        flash("Upgrade requested. We email you when it is approved.");
        await loadLimits();
      } catch (error) {
        showError($("#upgrade-error"), error);
      }
    });
  }

  // --- start -------------------------------------------------------------------------------

  function wire() {
    for (const tab of document.querySelectorAll("[data-auth-tab]")) {
      tab.addEventListener("click", () => setAuthMode(tab.dataset.authTab));
    }
    $("#auth-form").addEventListener("submit", submitAuth);
    $("#welcome-done").addEventListener("click", enterApp);
    $("#copy-welcome").addEventListener("click", (e) => copy($("#welcome-key").textContent, e.currentTarget));
    $("#logout").addEventListener("click", logout);
    document.addEventListener("click", navigate);
    window.addEventListener("popstate", route);
    $("#create-key").addEventListener("submit", createKey);
    $("#copy-secret").addEventListener("click", (e) => copy($("#new-secret-value").textContent, e.currentTarget));
    $("#hide-secret").addEventListener("click", () => { $("#new-secret").hidden = true; });
    $("#add-card").addEventListener("click", openCardForm);
    $("#cancel-card").addEventListener("click", closeCardForm);
    $("#card-form").addEventListener("submit", saveCard);
    $("#topup-form").addEventListener("submit", topUp);
    for (const chip of document.querySelectorAll("[data-amount]")) {
      chip.addEventListener("click", () => { $("#topup-amount").value = chip.dataset.amount; });
    }
    $("#upgrade-form").addEventListener("submit", requestUpgrade);
    $("#verify-resend").addEventListener("click", resendVerification);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && state.view === "overview" && state.account) {
        refreshOverview().catch(() => {});
      }
    });
  }

  async function boot() {
    wire();
    const told = location.pathname === VERIFY_PATH ? await verifyFromLink() : null;
    try {
      state.account = await api("GET", "/v1/account");
      enterApp();
    } catch (error) {
      if (error.status !== 401) flash(error.message, "bad");
      showAuth(told ? "login" : "signup");
    }
    if (told) flash(...told);
  }

  boot();
})();
