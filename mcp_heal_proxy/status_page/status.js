// The status page: one snapshot from /_proxy/api/status, then live events from /_proxy/api/events.
// Everything is written with textContent: names a client chose never become markup.
"use strict";

const API = "/_proxy/api";
const KEEP_REQUESTS = 100;
const KEEP_HEALS = 50;
const state = { status: null, requests: [], heals: [], seq: 0, clockSkew: 0 };
let refreshTimer = null;
let bannerTimer = null;

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function now() {
  return Date.now() / 1000 + state.clockSkew;
}

function ago(when) {
  if (when === null || when === undefined) return "never";
  const seconds = Math.max(0, now() - when);
  if (seconds < 1) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

function clock(when) {
  const date = new Date(when * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  if (value >= 1000) return `${(value / 1000).toFixed(2)} s`;
  if (value >= 100) return `${Math.round(value)} ms`;
  return `${value.toFixed(1)} ms`;
}

function timeCell(when) {
  const cell = el("td", clock(when), "mono");
  cell.title = `${new Date(when * 1000).toLocaleString()} (${ago(when)})`;
  return cell;
}

function badge(text, kind) {
  return el("span", text, `badge ${kind}`);
}

// --- rendering ---------------------------------------------------------------------------------

function renderHeader() {
  const s = state.status;
  if (!s) return;
  const uptime = ago(s.proxy.started).replace(" ago", "");
  $("proxy-info").textContent = `v${s.proxy.version} · store: ${s.proxy.store} · up ${uptime}`;
  $("total-sessions").textContent = s.sessions.count ?? "?";
  let requests = 0;
  let healed = 0;
  let failed = 0;
  for (const upstream of s.upstreams) {
    requests += upstream.requests;
    healed += upstream.heals.healed;
    failed += upstream.heals.failed;
  }
  $("total-requests").textContent = requests;
  $("total-heals").textContent = healed;
  $("total-failed").textContent = failed;
  $("total-failed").parentElement.classList.toggle("nonzero", failed > 0);
}

function health(upstream) {
  const failure = upstream.last_failure;
  if (failure && (upstream.last_success === null || failure.at > upstream.last_success)) return ["failing", "bad", "failing"];
  if (upstream.last_success !== null) return ["ok", "ok", "healthy"];
  return ["idle", "idle", "no traffic yet"];
}

function renderUpstreams() {
  const box = $("upstreams");
  box.replaceChildren();
  for (const upstream of state.status.upstreams) {
    const [cardClass, badgeClass, label] = health(upstream);
    const card = el("div", null, `card ${cardClass}`);
    card.dataset.upstream = upstream.name;
    const head = el("div", null, "card-head");
    head.append(el("span", upstream.name, "name"), badge(label, badgeClass));
    const via = upstream.proxy ? `  via proxy ${upstream.proxy}` : "";
  card.append(head, el("div", `${upstream.path}  →  ${upstream.url}${via}`, "route"));
    const facts = el("div", null, "facts");
    const add = (label, value, className) => {
      const fact = el("div", null, `fact ${className ?? ""}`);
      const shown = el("div", null, "value");
      if (value instanceof Node) shown.append(value);
      else shown.textContent = value;
      fact.append(el("div", label, "label"), shown);
      facts.append(fact);
      return fact;
    };
    add("era", upstream.era === "modern" ? "2026-07-28 only: legacy clients bridged" : upstream.era ?? "unknown");
    add("last success", ago(upstream.last_success));
    if (upstream.last_failure) {
      const fact = add("last failure", `${ago(upstream.last_failure.at)}: ${upstream.last_failure.why}`, "why");
      fact.title = new Date(upstream.last_failure.at * 1000).toLocaleString();
    } else {
      add("last failure", "none");
    }
    const latency = upstream.latency;
    for (const p of ["p50", "p90", "p99"]) add(`latency ${p}`, latency.window ? ms(latency[`${p}_ms`]) : "–", "num");
    const over = add("latency over", latency.window ? `last ${latency.window}` : "no requests", "muted");
    over.title = "percentiles over this many recent requests (GET streams excluded)";
    add("requests", upstream.requests, "num");
    const heals = el("span");
    heals.append(badge(`${upstream.heals.healed} healed`, upstream.heals.healed ? "heal" : "idle"), " ");
    if (upstream.heals.failed) heals.append(badge(`${upstream.heals.failed} failed`, "bad"));
    add("heals", heals);
    card.append(facts);
    box.append(card);
  }
}

function renderSessions() {
  const sessions = state.status.sessions;
  const body = $("sessions").tBodies[0];
  body.replaceChildren();
  for (const s of sessions.shown) {
    const row = el("tr");
    row.dataset.session = s.id;
    if (s.heals > 0) row.className = "healed";
    const client = s.client ? `${s.client}${s.client_version ? " " + s.client_version : ""}` : "–";
    const heals = el("td", null, "r");
    heals.append(s.heals > 0 ? badge(`${s.heals}`, "heal") : el("span", "0"));
    const created = el("td", ago(s.created), "muted");
    created.title = new Date(s.created * 1000).toLocaleString();
    const used = el("td", ago(s.last_used));
    used.title = new Date(s.last_used * 1000).toLocaleString();
    row.append(
      el("td", s.id, "id"),
      el("td", s.upstream),
      el("td", client),
      el("td", (s.protocol_version ?? "–") + (s.bridged ? " (bridged to 2026-07-28)" : ""), "mono"),
      heals,
      created,
      used,
      el("td", s.subscriptions, "r"),
      el("td", s.log_level ?? "–", "muted"),
    );
    body.append(row);
  }
  $("sessions-empty").hidden = sessions.shown.length > 0;
  const hint = sessions.error
    ? `store unavailable: ${sessions.error}`
    : sessions.count > sessions.shown.length
      ? `the ${sessions.shown.length} most recently used of ${sessions.count}`
      : "most recently used first";
  $("sessions-hint").textContent = hint;
}

function requestRow(r, fresh) {
  const row = el("tr");
  row.dataset.seq = r.seq;
  if (r.healed) row.classList.add("healed");
  if (fresh) row.classList.add("fresh");
  const status = el("td", r.status, `r status-${String(r.status)[0]}`);
  const flag = el("td");
  if (r.healed) flag.append(badge("healed", "heal"));
  row.append(
    timeCell(r.at),
    el("td", r.upstream),
    el("td", r.session ?? "–", "id"),
    el("td", r.method, "mono"),
    el("td", r.tool ?? "", "mono"),
    status,
    el("td", ms(r.duration_ms), "r"),
    flag,
  );
  return row;
}

const REASONS = { get_stream_lost: "GET stream lost" };

function reasonCell(reason) {
  // http_404 is "the upstream answered 404 on a session it no longer knows".
  const match = /^http_(\d{3})$/.exec(reason);
  const cell = el("td", match ? `upstream said ${match[1]}` : REASONS[reason] ?? reason);
  cell.title = reason;
  return cell;
}

function healRow(h, fresh) {
  const row = el("tr", null, h.outcome === "healed" ? "healed" : "failed");
  row.dataset.seq = h.seq;
  if (fresh) row.classList.add("fresh");
  const outcome = el("td");
  outcome.append(badge(h.outcome, h.outcome === "healed" ? "heal" : "bad"));
  row.append(
    timeCell(h.at),
    el("td", h.upstream),
    el("td", h.session, "id"),
    reasonCell(h.reason),
    outcome,
    el("td", ms(h.duration_ms), "r"),
    el("td", h.generation, "r"),
    el("td", h.error ?? (h.outcome === "healed" ? "new upstream session; request replayed" : ""), "detail"),
  );
  return row;
}

function renderList(tableId, emptyId, items, makeRow, freshSeq) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...items.map((item) => makeRow(item, item.seq > freshSeq)));
  $(emptyId).hidden = items.length > 0;
}

function renderAll(freshSeq = Infinity) {
  renderHeader();
  renderUpstreams();
  renderSessions();
  renderList("heals", "heals-empty", state.heals, healRow, freshSeq);
  renderList("requests", "requests-empty", state.requests, requestRow, freshSeq);
}

// --- data --------------------------------------------------------------------------------------

function merge(snapshot, local, keep, seq) {
  // The snapshot holds everything up to its seq; events that arrived live after it are kept.
  const newer = local.filter((item) => item.seq > seq);
  return [...newer, ...snapshot].sort((a, b) => b.seq - a.seq).slice(0, keep);
}

async function refresh() {
  refreshTimer = null;
  try {
    const response = await fetch(`${API}/status`, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const status = await response.json();
    state.clockSkew = status.proxy.now - Date.now() / 1000;
    state.status = status;
    state.requests = merge(status.requests, state.requests, KEEP_REQUESTS, status.seq);
    state.heals = merge(status.heals, state.heals, KEEP_HEALS, status.seq);
    state.seq = Math.max(state.seq, status.seq);
    renderAll();
  } catch (error) {
    setLive("down", "proxy unreachable");
  }
}

function scheduleRefresh(delay = 300) {
  if (refreshTimer === null) refreshTimer = setTimeout(refresh, delay);
}

function setLive(mode, text) {
  $("live").dataset.state = mode;
  $("live-text").textContent = text;
}

function announce(heal) {
  // A banner in the page's flow (it covers nothing), for a while after each heal.
  const banner = $("banner");
  banner.className = heal.outcome === "healed" ? "banner" : "banner failed";
  banner.textContent =
    heal.outcome === "healed"
      ? `Healed session ${heal.session} on ${heal.upstream} (${heal.reason}) in ${ms(heal.duration_ms)}: the client kept its session.`
      : `Heal failed for session ${heal.session} on ${heal.upstream}: ${heal.error ?? heal.reason}`;
  banner.hidden = false;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => (banner.hidden = true), 15000);
}

function onEvent(kind, item) {
  if (!state.status) return;
  const freshFrom = state.seq;
  if (kind === "request") {
    if (state.requests.some((r) => r.seq === item.seq)) return;
    state.requests = [item, ...state.requests].slice(0, KEEP_REQUESTS);
    renderList("requests", "requests-empty", state.requests, requestRow, freshFrom);
  } else {
    if (state.heals.some((h) => h.seq === item.seq)) return;
    state.heals = [item, ...state.heals].slice(0, KEEP_HEALS);
    renderList("heals", "heals-empty", state.heals, healRow, freshFrom);
    announce(item);
  }
  state.seq = Math.max(state.seq, item.seq);
  // Health, totals and the sessions table come from the proxy: fetch them again, at most a few times a second.
  scheduleRefresh();
}

function connect() {
  const source = new EventSource(`${API}/events`);
  source.addEventListener("open", () => {
    setLive("live", "live");
    scheduleRefresh(0);
  });
  source.addEventListener("error", () => setLive("down", "reconnecting…"));
  source.addEventListener("request", (event) => onEvent("request", JSON.parse(event.data)));
  source.addEventListener("heal", (event) => onEvent("heal", JSON.parse(event.data)));
  source.addEventListener("dropped", () => scheduleRefresh(0));
}

refresh().then(connect);
// Ages ("12 s ago") move on their own; sessions and health are fetched again now and then.
setInterval(() => state.status && (renderHeader(), renderUpstreams(), renderSessions()), 1000);
setInterval(() => scheduleRefresh(0), 5000);
