// The operator dashboard: asks GET /v1/ops/summary with the operator's token and draws its
// figures as SVG charts. The token lives in this tab's sessionStorage only. No dependencies.

const KEY = "token-billing.operator-token";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fdf", "#d9822b", "#2e9d5b", "#b42318", "#7c4dcc", "#57606a"];

const $ = (id) => document.getElementById(id);

function money(cents, currency) {
  return new Intl.NumberFormat("en", { style: "currency", currency: currency.toUpperCase() })
    .format(cents / 100);
}

function month(iso) {
  return iso.slice(0, 7);
}

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function legend(container, names) {
  const box = document.createElement("div");
  box.className = "legend";
  names.forEach((name, i) => {
    const item = document.createElement("span");
    item.style.setProperty("--c", COLORS[i % COLORS.length]);
    item.textContent = name;
    box.append(item);
  });
  container.append(box);
}

// A chart of one or more series over the same x labels: lines or (stacked) bars. Values may be
// negative; the zero line is drawn.
function chart(container, labels, series, { kind = "line", format = String } = {}) {
  container.replaceChildren();
  const width = 600, height = 220, left = 64, bottom = 20, top = 8;
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  const values = series.flatMap((s) => s.values);
  let max = Math.max(0, ...values), min = Math.min(0, ...values);
  if (kind === "stack") {
    max = Math.max(0, ...labels.map((_, i) => series.reduce((a, s) => a + Math.max(s.values[i], 0), 0)));
    min = Math.min(0, ...labels.map((_, i) => series.reduce((a, s) => a + Math.min(s.values[i], 0), 0)));
  }
  if (max === min) max = min + 1;
  const y = (v) => top + (height - top - bottom) * (max - v) / (max - min);
  const step = (width - left) / Math.max(labels.length, 1);
  const x = (i) => left + step * (i + 0.5);
  for (const v of [max, (max + min) / 2, min]) {
    svg.append(el("line", { x1: left, x2: width, y1: y(v), y2: y(v), stroke: "#eef0f2" }));
    svg.append(el("text", { x: left - 4, y: y(v) + 3, "text-anchor": "end" }, format(Math.round(v))));
  }
  svg.append(el("line", { x1: left, x2: width, y1: y(0), y2: y(0), stroke: "#8c959f" }));
  labels.forEach((label, i) => {
    if (labels.length <= 14 || i % 2 === 0) {
      svg.append(el("text", { x: x(i), y: height - 4, "text-anchor": "middle" }, label));
    }
  });
  series.forEach((s, n) => {
    const color = COLORS[n % COLORS.length];
    if (kind === "line") {
      const points = s.values.map((v, i) => `${x(i)},${y(v)}`).join(" ");
      svg.append(el("polyline", { points, fill: "none", stroke: color, "stroke-width": 2, "data-series": s.name }));
      s.values.forEach((v, i) => {
        const dot = el("circle", { cx: x(i), cy: y(v), r: 3, fill: color, "data-value": v });
        dot.append(el("title", {}, `${s.name} ${labels[i]}: ${format(v)}`));
        svg.append(dot);
      });
    }
  });
  if (kind !== "line") {
    const barWidth = step * 0.7 / (kind === "stack" ? 1 : series.length);
    labels.forEach((label, i) => {
      let up = 0, down = 0;
      series.forEach((s, n) => {
        const v = s.values[i];
        let from, to, offset;
        if (kind === "stack") {
          from = v >= 0 ? up : down;
          to = from + v;
          if (v >= 0) up = to; else down = to;
          offset = 0;
        } else {
          from = 0; to = v; offset = n * barWidth;
        }
        const rect = el("rect", {
          x: x(i) - step * 0.35 + offset, width: barWidth,
          y: Math.min(y(from), y(to)), height: Math.abs(y(from) - y(to)),
          fill: COLORS[n % COLORS.length], "data-series": s.name, "data-value": v,
        });
        rect.append(el("title", {}, `${s.name} ${label}: ${format(v)}`));
        svg.append(rect);
      });
    });
  }
  container.append(svg);
  legend(container, series.map((s) => s.name));
}

function figure(label, value, testid) {
  const box = document.createElement("div");
  box.className = "figure";
  box.dataset.testid = testid;
  const v = document.createElement("div");
  v.className = "value";
  v.textContent = value;
  const l = document.createElement("div");
  l.className = "label";
  l.textContent = label;
  box.append(v, l);
  return box;
}

function render(data) {
  const currencies = [...new Set(data.mrr.map((r) => r.currency))].sort();
  const months = [...new Set(data.mrr.map((r) => month(r.month_start)))].sort();
  const at = (currency, m) => data.mrr.find((r) => r.currency === currency && month(r.month_start) === m);

  const headline = $("headline");
  headline.replaceChildren();
  for (const c of currencies) {
    const last = data.mrr.filter((r) => r.currency === c).at(-1);
    headline.append(
      figure(`MRR (${c.toUpperCase()}), ${month(last.month_start)} end`, money(last.mrr_end_cents, c), `mrr-${c}`),
      figure(`subscribers (${c.toUpperCase()})`, String(last.subscribers_end), `subscribers-${c}`),
      figure(`churn (${c.toUpperCase()})`, last.churn_rate_bp == null ? "–" : `${(last.churn_rate_bp / 100).toFixed(2)}%`, `churn-${c}`),
      figure(`ARPU (${c.toUpperCase()})`, last.arpu_cents == null ? "–" : money(last.arpu_cents, c), `arpu-${c}`),
      figure(`LTV (${c.toUpperCase()}) = ARPU / churn`, last.ltv_cents == null ? "–" : money(last.ltv_cents, c), `ltv-${c}`),
    );
  }
  const cents = (c) => (v) => money(v, c);
  const revCurrencies = [...new Set(data.revenue.map((r) => r.currency))].sort();
  const revMonths = [...new Set(data.revenue.map((r) => month(r.period_start)))].sort();
  const rev = (c, m) => data.revenue.find((r) => r.currency === c && month(r.period_start) === m);
  const biggest = (c) => data.revenue.filter((r) => r.currency === c).reduce((a, r) => a + r.net_cents, 0);
  const rc = [...revCurrencies].sort((a, b) => biggest(b) - biggest(a))[0] ?? "usd";
  for (const c of revCurrencies) {
    const total = data.revenue.filter((r) => r.currency === c).reduce((a, r) => a + r.net_cents, 0);
    headline.append(figure(`net revenue (${c.toUpperCase()}), the period`, money(total, c), `revenue-${c}`));
  }
  chart($("revenue-chart"), revMonths, [
    { name: `packs (${rc.toUpperCase()})`, values: revMonths.map((m) => rev(rc, m)?.packs_cents ?? 0) },
    { name: "plans", values: revMonths.map((m) => rev(rc, m)?.plans_cents ?? 0) },
    { name: "refunded", values: revMonths.map((m) => -(rev(rc, m)?.refunded_cents ?? 0)) },
    { name: "lost in disputes", values: revMonths.map((m) => -(rev(rc, m)?.disputed_cents ?? 0)) },
  ], { kind: "stack", format: cents(rc) });
  const major = (v) => (v / 100).toLocaleString("en", { maximumFractionDigits: 2 });
  chart($("mrr-chart"), months,
    currencies.map((c) => ({ name: `MRR ${c.toUpperCase()}`, values: months.map((m) => at(c, m)?.mrr_end_cents ?? 0) })),
    { kind: "line", format: currencies.length === 1 ? cents(currencies[0]) : major });
  // Movements in the currency with the largest MRR now (currencies are never mixed).
  const latest = (c) => data.mrr.filter((r) => r.currency === c).at(-1)?.mrr_end_cents ?? 0;
  const c0 = [...currencies].sort((a, b) => latest(b) - latest(a))[0] ?? "usd";
  chart($("movement-chart"), months, [
    { name: `new (${c0.toUpperCase()})`, values: months.map((m) => at(c0, m)?.new_cents ?? 0) },
    { name: "expansion", values: months.map((m) => at(c0, m)?.expansion_cents ?? 0) },
    { name: "contraction", values: months.map((m) => -(at(c0, m)?.contraction_cents ?? 0)) },
    { name: "churned", values: months.map((m) => -(at(c0, m)?.churned_cents ?? 0)) },
  ], { kind: "stack", format: cents(c0) });
  chart($("churn-chart"), months,
    currencies.map((c) => ({ name: `churn ${c.toUpperCase()}`, values: months.map((m) => at(c, m)?.churn_rate_bp ?? 0) })),
    { kind: "line", format: (bp) => `${(bp / 100).toFixed(1)}%` });

  const flowMonths = [...new Set(data.token_flow.map((r) => month(r.period_start)))].sort();
  const sum = (m, kinds) => data.token_flow
    .filter((r) => month(r.period_start) === m && kinds.includes(r.kind))
    .reduce((a, r) => a + r.tokens, 0);
  chart($("token-chart"), flowMonths, [
    { name: "granted", values: flowMonths.map((m) => sum(m, ["purchase", "subscription", "signup", "promotion", "adjustment", "refund", "dispute_won"])) },
    { name: "used", values: flowMonths.map((m) => -sum(m, ["usage"])) },
    { name: "expired", values: flowMonths.map((m) => -sum(m, ["expiry"])) },
  ], { kind: "bars" });

  fillTable($("parked"), data.parked_events.map((e) => [
    e.event_id, e.type, e.created.slice(0, 16).replace("T", " "), e.attempts, e.detail ?? "",
  ]));
  fillTable($("alerts"), (data.alerts ?? []).map((a) => [
    a.kind, `${a.subject} (${a.currency})`, a.period_start.slice(0, 10),
    a.kind === "margin_below_floor"
      ? `margin ${(a.detail.margin_bp / 100).toFixed(2)}% < floor ${(a.detail.floor_bp / 100).toFixed(2)}%`
      : JSON.stringify(a.detail),
    a.updated_at.slice(0, 16).replace("T", " "),
  ]));
}

function fillTable(table, rows) {
  const body = table.querySelector("tbody");
  body.replaceChildren();
  for (const values of rows) {
    const row = document.createElement("tr");
    for (const v of values) {
      const td = document.createElement("td");
      td.textContent = String(v);
      row.append(td);
    }
    body.append(row);
  }
  if (!rows.length) {
    const row = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = table.querySelectorAll("th").length;
    td.textContent = "none";
    row.append(td);
    body.append(row);
  }
}

async function load() {
  const token = $("token").value.trim();
  sessionStorage.setItem(KEY, token);
  const params = new URLSearchParams();
  if ($("from").value) params.set("from", $("from").value);
  if ($("to").value) params.set("to", $("to").value);
  const status = $("status");
  status.className = "";
  status.textContent = "loading…";
  const response = await fetch(`/v1/ops/summary?${params}`, {
    headers: { Authorization: `Bearer ${token}` },
    cache: "no-store",
  });
  const data = await response.json();
  if (!response.ok) {
    status.className = "error";
    status.textContent = data.error?.message ?? `HTTP ${response.status}`;
    $("dashboard").hidden = true;
    return;
  }
  status.textContent = `${data.period_from} to ${data.period_to}`;
  $("dashboard").hidden = false;
  render(data);
}

$("query").addEventListener("submit", (event) => {
  event.preventDefault();
  load().catch((err) => {
    $("status").className = "error";
    $("status").textContent = String(err);
  });
});
const saved = sessionStorage.getItem(KEY);
if (saved) {
  $("token").value = saved;
  load();
}
