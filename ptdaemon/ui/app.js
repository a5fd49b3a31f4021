// The dashboard: talks to this daemon's control API with the token the user
// gives, kept in session storage. Every value from the API is shown through
// textContent, never as HTML.
"use strict";

const TOKEN_KEY = "ptdaemon.token";
const PAGE_SIZE = 50;
const PREVIEW_DELAY_MS = 200;
// After a retry, look again this many times while the submission is on its way.
const RETRY_CHECKS = 20;
const RETRY_CHECK_MS = 500;
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const state = { templates: [], cursor: null, previewTimer: null, previewSeq: 0 };

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const answer = await fetch(path, init);
  const text = await answer.text();
  const data = text ? JSON.parse(text) : null;
  if (answer.status === 401) {
    signOut("The token was refused; sign in again.");
  }
  if (!answer.ok) {
    const message = data && data.error ? data.error.message : answer.statusText;
    throw new ApiError(answer.status, message);
  }
  return data;
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function when(text) {
  return text ? new Date(text).toLocaleString() : "–";
}

function templateName(id) {
  const found = state.templates.find((t) => t.id === id);
  return found ? found.name : id;
}

// -- signing in ---------------------------------------------------------------

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await loadTemplates();
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("sign-in-error").textContent = error.status === 401
      ? "That token was refused." : "Cannot reach the daemon: " + error.message;
    return;
  }
  $("sign-in").hidden = true;
  $("tabs").hidden = false;
  $("sign-out").hidden = false;
  show("submissions");
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  for (const id of ["submissions", "stats", "mapping", "tabs", "sign-out"]) {
    $(id).hidden = true;
  }
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("token").value = "";
}

function show(view) {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.setAttribute("aria-pressed", String(button.dataset.view === view));
  }
  for (const id of ["submissions", "stats", "mapping"]) $(id).hidden = id !== view;
  const load = { submissions: () => loadSubmissions(false), stats: loadStats, mapping: openEditor };
  load[view]().catch(report);
}

function report(error) {
  const visible = ["list-message", "queue", "map-message"].map($).find((n) => n.offsetParent);
  if (visible) visible.textContent = "Error: " + error.message;
}

async function loadTemplates() {
  const page = await api("GET", "/v1/templates");
  state.templates = page.items;
  for (const select of [$("filter-template"), $("map-template")]) {
    const chosen = select.value;
    const keep = select.id === "filter-template" ? 1 : 0;
    while (select.options.length > keep) select.remove(keep);
    for (const template of state.templates) {
      const option = element("option", template.name);
      option.value = template.id;
      select.append(option);
    }
    if (chosen) select.value = chosen;
  }
}

// -- submissions --------------------------------------------------------------

async function loadSubmissions(more) {
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if ($("filter-status").value) query.set("status", $("filter-status").value);
  if ($("filter-template").value) query.set("form_template_id", $("filter-template").value);
  if (more && state.cursor) query.set("cursor", state.cursor);
  const page = await api("GET", "/v1/submissions?" + query);
  const list = $("submission-list");
  if (!more) list.replaceChildren();
  for (const sub of page.items) list.append(submissionCard(sub));
  state.cursor = page.next_cursor;
  $("more").hidden = !page.next_cursor;
  $("list-message").textContent = list.children.length
    ? "" : "No submissions match these filters.";
}

function submissionCard(sub) {
  const card = element("li", null, "card");
  card.dataset.id = sub.id;
  fillCard(card, sub);
  return card;
}

function fillCard(card, sub) {
  const title = element("h3");
  title.append(element("span", sub.status, "badge " + sub.status), " ", templateName(sub.form_template_id));
  const meta = element("p", `${sub.id} · created ${when(sub.created_at)}` +
    ` · retries ${sub.retry_count}/${sub.max_retries}`, "meta");
  const parts = [title, meta];
  if (sub.error_message) {
    parts.push(element("p", `${sub.error_category}: ${sub.error_message}`, "error"));
  }
  if (sub.next_retry_at) parts.push(element("p", "due " + when(sub.next_retry_at), "meta"));
  const actions = element("div", null, "actions");
  if (sub.status === "failed" || sub.status === "retrying") {
    actions.append(actionButton("Retry", "primary", () => retry(card, sub.id)));
  }
  if (sub.status === "pending" || sub.status === "retrying") {
    actions.append(actionButton("Cancel", "danger", () => cancel(card, sub.id)));
  }
  const details = element("details");
  details.append(element("summary", "Attempts"), element("ul", null, "attempts"));
  details.addEventListener("toggle", () => {
    if (details.open) loadAttempts(card, sub.id).catch(report);
  });
  card.replaceChildren(...parts, actions, details);
}

function actionButton(label, className, onClick) {
  const button = element("button", label, className);
  button.type = "button";
  button.addEventListener("click", () => {
    button.disabled = true;
    onClick().catch((error) => {
      button.disabled = false;
      report(error);
    });
  });
  return button;
}

async function loadAttempts(card, id) {
  const page = await api("GET", `/v1/submissions/${id}/attempts`);
  const list = card.querySelector(".attempts");
  list.replaceChildren();
  if (!page.items.length) list.append(element("li", "No attempt yet."));
  for (const attempt of page.items) {
    let text = `#${attempt.number} ${attempt.outcome} · ${when(attempt.started_at)}`;
    if (attempt.duration_ms !== null) text += ` · ${attempt.duration_ms} ms`;
    if (attempt.status !== null) text += ` · ${attempt.status}`;
    if (attempt.error_message) text += ` · ${attempt.error_category}: ${attempt.error_message}`;
    list.append(element("li", text));
  }
}

async function refreshCard(card, id) {
  const sub = await api("GET", `/v1/submissions/${id}`);
  fillCard(card, sub);
  return sub;
}

async function retry(card, id) {
  let sub = await api("POST", `/v1/submissions/${id}/retry`);
  fillCard(card, sub);
  // Follow it to its next state: a bounded number of looks, then stop.
  for (let look = 0; look < RETRY_CHECKS; look++) {
    if (!["pending", "processing"].includes(sub.status)) return;
    await new Promise((done) => setTimeout(done, RETRY_CHECK_MS));
    sub = await refreshCard(card, id);
  }
}

async function cancel(card, id) {
  fillCard(card, await api("POST", `/v1/submissions/${id}/cancel`));
}

// -- statistics ---------------------------------------------------------------

async function loadStats() {
  const stats = await api("GET", "/v1/stats");
  const age = stats.queue.oldest_due_age_seconds;
  $("queue").textContent = `Due now: ${stats.queue.depth}` +
    (age === null ? "" : ` · oldest waiting ${age.toFixed(1)} s`) +
    ` · since ${when(stats.since)}`;
  const cards = $("stats-cards");
  cards.replaceChildren(...stats.templates.map(statsCard));
  if (!stats.templates.length) cards.append(element("p", "No templates yet.", "note"));
}

function statsCard(template) {
  const card = element("article", null, "card");
  card.dataset.id = template.id;
  const rate = template.success_rate === null
    ? "–" : (template.success_rate * 100).toFixed(1) + " %";
  const d = template.duration_ms;
  const ms = (v) => (v === null ? "–" : v + " ms");
  const counts = Object.entries(template.counts)
    .filter(([, n]) => n).map(([s, n]) => `${s} ${n}`).join(", ") || "none";
  const errors = Object.entries(template.error_categories)
    .map(([c, n]) => `${c} ${n}`).join(", ") || "none";
  const figures = element("dl", null, "figures");
  for (const [label, value] of [
    ["Submissions", counts],
    ["Success rate", rate],
    ["Duration", `p50 ${ms(d.p50)} · p95 ${ms(d.p95)} · p99 ${ms(d.p99)}`],
    ["Failed attempts", errors],
  ]) {
    figures.append(element("dt", label), element("dd", value));
  }
  card.append(element("h3", template.name), figures, hourChart(template.hourly));
  return card;
}

function svgNode(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Attempts per hour over the last 24 hours: succeeded in green, failed in red
// stacked on top.
function hourChart(hours) {
  const width = 240, height = 64, top = 4, bottom = 12;
  const bar = width / hours.length;
  const peak = Math.max(1, ...hours.map((h) => h.succeeded + h.failed));
  const scale = (n) => (n / peak) * (height - top - bottom);
  const total = hours.reduce((sum, h) => sum + h.succeeded + h.failed, 0);
  const chart = svgNode("svg", {
    viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
    "aria-label": `Attempts per hour, last 24 hours: ${total} in all`,
  });
  chart.append(svgNode("line", { x1: 0, x2: width, y1: height - bottom, y2: height - bottom }));
  hours.forEach((hour, index) => {
    const x = index * bar + 1;
    const okHeight = scale(hour.succeeded);
    const badHeight = scale(hour.failed);
    const base = height - bottom;
    const label = `${when(hour.start)}: ${hour.succeeded} succeeded, ${hour.failed} failed`;
    const group = svgNode("g", {});
    group.append(svgNode("title", {}, label));
    group.append(svgNode("rect", { x, y: base - okHeight, width: bar - 2, height: okHeight, class: "ok" }));
    group.append(svgNode("rect", {
      x, y: base - okHeight - badHeight, width: bar - 2, height: badHeight, class: "bad",
    }));
    chart.append(group);
  });
  chart.append(svgNode("text", { x: 0, y: height - 2, class: "axis" }, "24 h ago"));
  chart.append(svgNode("text", { x: width, y: height - 2, class: "axis", "text-anchor": "end" }, "now"));
  return chart;
}

// -- field-map editor ---------------------------------------------------------

async function openEditor() {
  await loadTemplates();
  const template = state.templates.find((t) => t.id === $("map-template").value)
    || state.templates[0];
  $("map-rows").replaceChildren();
  $("map-message").textContent = "";
  if (!template) {
    $("map-message").textContent = "No templates yet.";
    return;
  }
  $("map-template").value = template.id;
  for (const [name, path] of Object.entries(template.field_map)) addRow(name, path);
  schedulePreview();
}

function addRow(name, path) {
  const row = element("li");
  const field = element("input");
  field.className = "field-name";
  field.placeholder = "outgoing field";
  field.value = name || "";
  const source = element("input");
  source.className = "field-path";
  source.placeholder = "path in data";
  source.value = Array.isArray(path) ? JSON.stringify(path) : path || "";
  const remove = element("button", "✕", "danger");
  remove.type = "button";
  remove.setAttribute("aria-label", "Remove this field");
  remove.addEventListener("click", () => {
    row.remove();
    schedulePreview();
  });
  for (const input of [field, source]) input.addEventListener("input", schedulePreview);
  row.append(field, element("span", "←", "arrow"), source, remove);
  $("map-rows").append(row);
  return row;
}

function editedMap() {
  const map = {};
  for (const row of $("map-rows").children) {
    const name = row.querySelector(".field-name").value.trim();
    const text = row.querySelector(".field-path").value.trim();
    if (!name || !text) continue;
    map[name] = text.startsWith("[") ? JSON.parse(text) : text;
  }
  return map;
}

function schedulePreview() {
  clearTimeout(state.previewTimer);
  state.previewTimer = setTimeout(() => preview().catch(report), PREVIEW_DELAY_MS);
}

async function preview() {
  const seq = ++state.previewSeq;
  let data, map;
  try {
    data = JSON.parse($("sample").value || "{}");
    map = editedMap();
  } catch (error) {
    $("preview").textContent = "The sample or a path is not valid JSON: " + error.message;
    return;
  }
  const id = $("map-template").value;
  try {
    const answer = await api("POST", `/v1/templates/${id}/preview`, { data, field_map: map });
    if (seq === state.previewSeq) $("preview").textContent = JSON.stringify(answer.payload, null, 2);
  } catch (error) {
    if (seq === state.previewSeq) $("preview").textContent = "Not deliverable: " + error.message;
  }
}

async function saveMap() {
  const id = $("map-template").value;
  const template = state.templates.find((t) => t.id === id);
  const map = editedMap();
  // A merge patch: fields taken out of the map are sent as null to remove them.
  const patch = {};
  for (const name of Object.keys(template.field_map)) patch[name] = null;
  Object.assign(patch, map);
  await api("PATCH", `/v1/templates/${id}`, { field_map: patch });
  await openEditor();
  $("map-message").textContent = "Saved.";
}

// -- wiring -------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token").value.trim());
  });
  $("sign-out").addEventListener("click", () => signOut());
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => show(button.dataset.view));
  }
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadSubmissions(false).catch(report);
  });
  for (const id of ["filter-status", "filter-template"]) {
    $(id).addEventListener("change", () => loadSubmissions(false).catch(report));
  }
  $("more").addEventListener("click", () => loadSubmissions(true).catch(report));
  $("stats-refresh").addEventListener("click", () => loadStats().catch(report));
  $("map-template").addEventListener("change", () => openEditor().catch(report));
  $("add-row").addEventListener("click", () => addRow("", "").querySelector("input").focus());
  $("sample").addEventListener("input", schedulePreview);
  $("save-map").addEventListener("click", () => {
    saveMap().catch((error) => { $("map-message").textContent = "Not saved: " + error.message; });
  });
  if (sessionStorage.getItem(TOKEN_KEY)) signIn(sessionStorage.getItem(TOKEN_KEY));
});
