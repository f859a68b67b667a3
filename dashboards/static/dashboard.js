// tokentill dashboard: draws the figures the server rendered (JSON in
// <script type="application/json" data-chart>), fills the quota and alert tables from
// the admin API when tokentill serves them, and keeps empty filters out of URLs.
// body[data-ready] is set once everything is drawn (the browser tests wait for it).
"use strict";

function drawCharts() {
  const drawn = [];
  for (const block of document.querySelectorAll('script[type="application/json"][data-chart]')) {
    const figure = JSON.parse(block.textContent);
    const target = document.getElementById(block.dataset.chart);
    drawn.push(
      Plotly.newPlot(target, figure.data, figure.layout, { displaylogo: false, responsive: true }),
    );
  }
  return Promise.all(drawn);
}

function text(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "object") {
    return Object.entries(value)
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`)
      .join("; ");
  }
  return String(value);
}

function rowsOf(body, kind) {
  if (Array.isArray(body)) return body;
  for (const key of [kind, "data", "items"]) {
    if (Array.isArray(body[key])) return body[key];
  }
  return [];
}

// GET /api/quotas answers quotas, each with its limits (unit, period, used, percent_used,
// ...): one row per limit. Flat rows (limit_usd, used_usd, ...) are taken as they are.
function quotaRows(quotas) {
  const rows = [];
  for (const quota of quotas) {
    if (!Array.isArray(quota.limits)) {
      rows.push(quota);
      continue;
    }
    const { limits, ...about } = quota;
    for (const limit of limits) rows.push({ ...about, ...limit });
  }
  return rows;
}

// How much of its limit a row has used, as a fraction (null when it does not say).
function used(row) {
  if (row.percent_used !== null && row.percent_used !== undefined) {
    return Number(row.percent_used) / 100;
  }
  if (Number(row.limit) > 0 && row.used !== null && row.used !== undefined) {
    return Number(row.used) / Number(row.limit);
  }
  if (typeof row.used_share === "number") return row.used_share;
  for (const unit of ["usd", "tokens", "requests"]) {
    const limit = Number(row[`limit_${unit}`]);
    const spent = Number(row[`used_${unit}`]);
    if (limit > 0 && Number.isFinite(spent)) return spent / limit;
  }
  return null;
}

const COLUMNS = {
  quotas: ["subject", "user_id", "unit", "period", "mode", "limit", "used", "remaining",
    "limit_usd", "used_usd", "remaining_usd", "limit_tokens", "used_tokens", "limit_requests",
    "used_requests", "hard", "resets_at", "burn_rate_per_hour", "projected_limit_at"],
  alerts: ["created_at", "detected_at", "severity", "kind", "rule", "subject", "user_id",
    "message", "window_start", "window_end", "window", "evidence", "acknowledged_at",
    "acknowledged"],
};

function render(element, kind, rows) {
  if (rows.length === 0) {
    element.textContent = kind === "quotas" ? "No quotas set." : "No flags.";
    return;
  }
  let columns = COLUMNS[kind].filter((c) => rows.some((r) => r[c] !== undefined));
  // A subject (user:<id>, tag:<key>=<value>, default) already names the user.
  if (columns.includes("subject")) columns = columns.filter((c) => c !== "user_id");
  if (kind === "quotas") columns.push("use");
  const table = document.createElement("table");
  table.id = `${kind}-table`;
  const head = table.createTHead().insertRow();
  for (const c of columns) head.appendChild(document.createElement("th")).textContent = c;
  const body = table.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    const share = kind === "quotas" ? used(row) : null;
    if (share !== null && share >= 1) tr.className = "over";
    else if (share !== null && share >= 0.8) tr.className = "near";
    if (kind === "alerts" && row.severity) tr.className = `severity-${row.severity}`;
    for (const c of columns) {
      const value = c === "use" ? (share === null ? "" : `${(share * 100).toFixed(1)}%`) : row[c];
      tr.insertCell().textContent = text(value);
    }
  }
  element.replaceChildren(table);
}

async function fill(element) {
  const kind = element.dataset.kind;
  const answer = await fetch(element.dataset.source, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (!answer.ok) {
    element.textContent = `GET ${element.dataset.source} answered ${answer.status}.`;
    return;
  }
  let rows = rowsOf(await answer.json(), kind);
  if (kind === "quotas") rows = quotaRows(rows);
  const users = element.dataset.users ? element.dataset.users.split(",") : [];
  if (users.length) rows = rows.filter((r) => users.includes(r.user_id));
  if (kind === "quotas") rows.sort((a, b) => (used(b) ?? -1) - (used(a) ?? -1));
  render(element, kind, rows);
}

function cleanFilterForm() {
  const form = document.getElementById("filters");
  if (!form) return;
  form.addEventListener("submit", () => {
    for (const input of form.querySelectorAll("input, select")) {
      if (!input.value) input.disabled = true;
    }
  });
}

document.addEventListener("DOMContentLoaded", async () => {
  cleanFilterForm();
  try {
    await drawCharts();
    await Promise.all([...document.querySelectorAll("[data-source]")].map(fill));
  } finally {
    document.body.dataset.ready = "1";
  }
});
