// The live page: state from /events (server-sent events), drawn as an SVG map and tables.
// Plain browser JavaScript, no build step. Text from records goes in with textContent only.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const MAP = { width: 640, height: 440, pad: 40 };
const STALE_MS = 5000;
const LOG_LIMIT = 200;

const state = { devices: new Map(), log: [], lag: [], lagError: null, totals: {}, clockSkew: 0 };
let renderPending = false;

function statusClass(status) {
  if (status === "Active") return "status-active";
  if (status === "Inactive") return "status-inactive";
  return "status-other";
}

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4))
                                      : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(ms) {
  if (!ms) return "–";
  const time = new Date(ms);
  return time.toLocaleTimeString([], { hour12: false }) + "." + String(time.getMilliseconds()).padStart(3, "0");
}

function clockSeconds(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function ago(ms) {
  if (!ms) return "";
  const seconds = Math.max(0, (Date.now() + state.clockSkew - ms) / 1000);
  return seconds < 60 ? `${seconds.toFixed(0)} s ago` : `${Math.floor(seconds / 60)} min ago`;
}

function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  setTimeout(() => { renderPending = false; render(); }, 30);
}

// -- events -------------------------------------------------------------------------------
function onSnapshot(data) {
  state.devices = new Map(data.devices.map((device) => [device.id, device]));
  state.log = data.log.slice(-LOG_LIMIT).reverse();
  state.lag = data.lag;
  state.lagError = data.lag_error;
  state.totals = data.totals;
  state.clockSkew = data.now - Date.now();
  scheduleRender();
}

function onRecord(data) {
  if (data.device) state.devices.set(data.device.id, data.device);
  state.log.unshift(data.record);
  if (state.log.length > LOG_LIMIT) state.log.length = LOG_LIMIT;
  state.totals = data.totals;
  scheduleRender();
}

function onPresence(data) {
  state.devices.set(data.device.id, data.device);
  scheduleRender();
}

function onStats(data) {
  for (const [id, rate] of Object.entries(data.rates)) {
    const device = state.devices.get(id);
    if (device) device.rate = rate;
  }
  state.lag = data.lag;
  state.lagError = data.lag_error;
  state.totals = data.totals;
  state.clockSkew = data.now - Date.now();
  scheduleRender();
}

function connect() {
  const connection = document.getElementById("connection");
  const source = new EventSource("events");
  const show = (name, text) => {
    connection.className = "connection " + name;
    connection.dataset.state = name;
    connection.textContent = text;
  };
  source.onopen = () => show("open", "live");
  source.onerror = () => show(source.readyState === EventSource.CLOSED ? "closed" : "connecting",
                              source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…");
  source.addEventListener("snapshot", (event) => onSnapshot(JSON.parse(event.data)));
  source.addEventListener("record", (event) => onRecord(JSON.parse(event.data)));
  source.addEventListener("stats", (event) => onStats(JSON.parse(event.data)));
  source.addEventListener("presence", (event) => onPresence(JSON.parse(event.data)));
}

// -- drawing ------------------------------------------------------------------------------
function bounds(devices) {
  const xs = [], ys = [];
  for (const device of devices) {
    for (const [x, y] of device.trail) { xs.push(x); ys.push(y); }
    if (typeof device.x === "number") { xs.push(device.x); ys.push(device.y); }
  }
  if (!xs.length) return { minX: 0, maxX: 10, minY: 0, maxY: 10 };
  let minX = Math.min(...xs), maxX = Math.max(...xs), minY = Math.min(...ys), maxY = Math.max(...ys);
  const span = Math.max(maxX - minX, maxY - minY, 10);
  const cx = (minX + maxX) / 2, cy = (minY + maxY) / 2;
  return { minX: cx - span / 2 - 1, maxX: cx + span / 2 + 1, minY: cy - span / 2 - 1, maxY: cy + span / 2 + 1 };
}

function projector(box) {
  const scale = Math.min((MAP.width - 2 * MAP.pad) / (box.maxX - box.minX),
                         (MAP.height - 2 * MAP.pad) / (box.maxY - box.minY));
  const offsetX = (MAP.width - scale * (box.maxX - box.minX)) / 2;
  const offsetY = (MAP.height - scale * (box.maxY - box.minY)) / 2;
  // y grows upwards on the map, as on paper
  return (x, y) => [offsetX + (x - box.minX) * scale, MAP.height - offsetY - (y - box.minY) * scale];
}

function drawGrid(box, project) {
  const grid = document.getElementById("grid");
  grid.replaceChildren();
  const step = Math.max(1, Math.pow(10, Math.floor(Math.log10((box.maxX - box.minX) / 2))));
  for (let x = Math.ceil(box.minX / step) * step; x <= box.maxX; x += step) {
    const [px] = project(x, 0);
    grid.append(el("svg:line", { x1: px, x2: px, y1: 0, y2: MAP.height }));
    grid.append(el("svg:text", { x: px + 2, y: MAP.height - 4 }, String(+x.toFixed(2))));
  }
  for (let y = Math.ceil(box.minY / step) * step; y <= box.maxY; y += step) {
    const [, py] = project(0, y);
    grid.append(el("svg:line", { x1: 0, x2: MAP.width, y1: py, y2: py }));
    grid.append(el("svg:text", { x: 2, y: py - 2 }, String(+y.toFixed(2))));
  }
}

function isStale(device) {
  return device.status === "Active" && device.last_ts && Date.now() + state.clockSkew - device.last_ts > STALE_MS;
}

function drawMap(devices) {
  const box = bounds(devices);
  const project = projector(box);
  drawGrid(box, project);
  const trails = document.getElementById("trails");
  const markers = document.getElementById("markers");
  trails.replaceChildren();
  markers.replaceChildren();
  for (const device of devices) {
    if (typeof device.x !== "number" || typeof device.y !== "number") continue;
    const cls = statusClass(device.status);
    if (device.trail.length > 1) {
      const points = device.trail.map(([x, y]) => project(x, y).join(",")).join(" ");
      trails.append(el("svg:polyline", { points, class: cls }));
    }
    const [px, py] = project(device.x, device.y);
    const marker = el("svg:g", { class: `device ${cls}${isStale(device) ? " stale" : ""}`,
                                 "data-device": device.id, "data-status": device.status || "",
                                 transform: `translate(${px.toFixed(1)},${py.toFixed(1)})` });
    marker.append(el("svg:title", {}, `${device.id}: ${device.status} at (${device.x}, ${device.y})`));
    marker.append(el("svg:circle", { r: 9 }));
    marker.append(el("svg:text", { x: 12, y: 4 }, device.id));
    markers.append(marker);
  }
}

function drawDevices(devices) {
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  document.getElementById("no-devices").hidden = devices.length > 0;
  for (const device of devices) {
    const row = el("tr", { "data-device": device.id, "data-status": device.status || "" });
    row.append(el("td", {}, device.id));
    const status = el("td");
    // Its last message's status; before any message, what it reported to the platform.
    const shown = device.status || (device.reported || {}).status;
    status.append(el("span", { class: "badge " + statusClass(shown) }, shown || "?"));
    row.append(status);
    const presence = el("td", { class: "presence" });
    if (device.online !== null && device.online !== undefined) {
      const word = device.online ? "online" : "offline";
      presence.append(el("span", { class: "badge presence-" + word, "data-online": word }, word));
      if (device.online_since) {
        presence.append(" since ", el("span", { title: clock(device.online_since) },
                                       clockSeconds(device.online_since)));
      }
    } else {
      presence.append("–");
    }
    row.append(presence);
    row.append(el("td", {}, typeof device.x === "number" ? `${device.x}, ${device.y}` : "–"));
    row.append(el("td", {}, device.seq ?? "–"));
    row.append(el("td", { class: "last", title: clock(device.last_ts) },
                  device.last_ts ? ago(device.last_ts) : "–"));
    row.append(el("td", { class: "rate" }, `${(device.rate || 0).toFixed(1)}/s`));
    row.append(el("td", { class: "count" }, device.count));
    row.append(desiredCell(device));
    body.append(row);
  }
}

// The device's switch on the platform's side: desired status, what it reported, and a button
// that asks it to change (a set-status command through Kafka); "pending" until it reports so.
function desiredCell(device) {
  const desired = (device.desired || {}).status;
  const reported = (device.reported || {}).status;
  const cell = el("td", { class: "desired", "data-desired": desired || "", "data-reported": reported || "",
                          title: `desired ${desired || "–"}, reported ${reported || "–"}` });
  const current = desired || reported || device.status;
  if (!current) { cell.append("–"); return cell; }
  const target = current === "Active" ? "Inactive" : "Active";
  // A narrow switch (the table must fit the panel): "off" asks for Inactive, "on" for Active.
  cell.append(el("button", { type: "button", class: "switch", "data-device": device.id,
                             "data-target": target, title: `ask ${device.id} to turn ${target}`,
                             "aria-label": `turn ${target}` }, target === "Inactive" ? "off" : "on"));
  if (device.pending) cell.append(" ", el("span", { class: "badge pending" }, "pending"));
  return cell;
}

async function onSwitch(event) {
  const button = event.target.closest("button.switch");
  if (!button) return;
  button.disabled = true;
  const notice = document.getElementById("command-notice");
  try {
    const response = await fetch(`api/devices/${encodeURIComponent(button.dataset.device)}/desired`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ status: button.dataset.target }) });
    const answer = await response.json();
    notice.textContent = response.ok
      ? `asked ${answer.device} to be ${answer.desired.status} (command ${answer.command_id})`
      : `refused: ${answer.message}`;
  } catch (error) {
    notice.textContent = `could not send: ${error}`;
  }
}

function drawLag() {
  const body = document.querySelector("#lag tbody");
  body.replaceChildren();
  let total = 0;
  for (const partition of state.lag || []) {
    total += partition.lag;
    const row = el("tr", { "data-partition": partition.partition });
    row.append(el("td", {}, partition.partition));
    row.append(el("td", {}, partition.committed ?? "–"));
    row.append(el("td", {}, partition.high));
    row.append(el("td", { class: "lag" }, partition.lag));
    body.append(row);
  }
  document.getElementById("lag-total").textContent = state.lag && state.lag.length ? total : "–";
  const error = document.getElementById("lag-error");
  error.hidden = !state.lagError;
  error.textContent = state.lagError || "";
}

function drawLog() {
  const list = document.getElementById("log");
  list.replaceChildren();
  for (const entry of state.log) {
    const item = el("li", { "data-device": entry.device || "", class: "type-" + (entry.type || "none") });
    const parts = [clock(entry.ts), (entry.device || "?").padEnd(12), (entry.type || "-").padEnd(7),
                   `p${entry.partition}@${entry.offset}`];
    if (!entry.json) {
      item.classList.add("non-json");
      parts.push("non-JSON " + JSON.stringify(entry.raw));
    } else {
      if (entry.seq !== null && entry.seq !== undefined) parts.push(`seq=${entry.seq}`);
      if (entry.x !== null && entry.x !== undefined) parts.push(`(${entry.x}, ${entry.y})`);
      if (entry.command) parts.push(entry.command);
    }
    item.append(document.createTextNode(parts.join(" ") + " "));
    if (entry.status) item.append(el("span", { class: statusClass(entry.status) }, entry.status));
    if (entry.note) item.append(el("span", { class: "note" }, ` [${entry.note}]`));
    list.append(item);
  }
}

function render() {
  const devices = [...state.devices.values()].sort((a, b) => a.id.localeCompare(b.id));
  drawMap(devices);
  drawDevices(devices);
  drawLag();
  drawLog();
  document.getElementById("total-records").textContent = state.totals.records ?? 0;
  document.getElementById("total-non-json").textContent = state.totals.non_json ?? 0;
}

connect();
document.querySelector("#devices tbody").addEventListener("click", onSwitch);
setInterval(scheduleRender, 1000);  // "n s ago" and staleness move even when nothing arrives
