// The device list refreshes from GET /devices every second; every button calls the REST API.
"use strict";

const tbody = document.querySelector("#devices tbody");
const notice = document.getElementById("notice");
const tokenInput = document.getElementById("token");
if (tokenInput) {
  tokenInput.value = sessionStorage.getItem("publisherToken") || "";
  tokenInput.addEventListener("change", () => sessionStorage.setItem("publisherToken", tokenInput.value));
}

function say(text, isError) {
  notice.textContent = text;
  notice.className = isError ? "error" : "ok";
}

async function api(method, path, body) {
  const headers = {};
  const options = {method, headers};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  if (tokenInput && tokenInput.value) headers["Authorization"] = "Bearer " + tokenInput.value;
  const response = await fetch(path, options);
  let answer = {};
  try { answer = await response.json(); } catch (error) { answer = {message: response.statusText}; }
  if (!response.ok) throw new Error(answer.message + (answer.error && answer.error !== answer.message ? " (" + answer.error + ")" : ""));
  return answer;
}

function ago(ts) {
  if (!ts) return "-";
  const seconds = Math.max(0, (Date.now() - ts) / 1000);
  const time = new Date(ts).toLocaleTimeString([], { hour12: false });  // 24-hour, as the live view
  return seconds < 60 ? `${time} (${seconds.toFixed(1)} s ago)` : time;
}

function cell(row, selector, text) {
  const element = row.querySelector(selector);
  if (element.textContent !== text) element.textContent = text;
}

function rowFor(id) {
  let row = tbody.querySelector(`tr[data-device="${CSS.escape(id)}"]`);
  if (row) return row;
  row = document.createElement("tr");
  row.dataset.device = id;
  row.innerHTML = `<td class="id"></td><td><span class="status"></span></td><td class="position"></td>
    <td class="count"></td><td class="last"></td><td class="connection"></td>
    <td class="actions"><button class="toggle" type="button"></button></td>`;
  row.querySelector(".id").textContent = id;
  tbody.appendChild(row);
  return row;
}

function addRemoveButton(row) {
  if (row.querySelector(".remove")) return;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "remove";
  button.textContent = "Remove";
  row.querySelector(".actions").appendChild(button);
}

function render(devices) {
  const seen = new Set();
  for (const device of devices) {
    seen.add(device.id);
    const row = rowFor(device.id);
    addRemoveButton(row);
    const badge = row.querySelector(".status");
    cell(row, ".status", device.status);
    badge.className = "status " + device.status.toLowerCase();
    cell(row, ".position", device.position.join(", "));
    cell(row, ".count", String(device.messages) + (device.dropped ? ` (${device.dropped} dropped)` : ""));
    cell(row, ".last", ago(device.last_message_ts));
    cell(row, ".connection", device.connected ? "connected" : "connecting");
    const toggle = row.querySelector(".toggle");
    if (!toggle.disabled) toggle.textContent = device.status === "Active" ? "Deactivate" : "Activate";
  }
  for (const row of [...tbody.rows]) if (!seen.has(row.dataset.device)) row.remove();
  const active = devices.filter(d => d.status === "Active").length;
  document.getElementById("summary").textContent = `${devices.length} devices, ${active} active`;
  const select = document.getElementById("message-device");
  const current = select.value;
  const ids = devices.map(d => d.id);
  if ([...select.options].map(o => o.value).join() !== ids.join()) {
    select.replaceChildren(...ids.map(id => new Option(id, id)));
    if (ids.includes(current)) select.value = current;
  }
}

async function refresh() {
  try {
    const answer = await api("GET", "/devices");
    render(answer.devices);
  } catch (error) {
    say("Cannot load devices: " + error.message, true);
  }
}

// One write call: its answer's message (or its error) in the status line; true when it worked.
async function act(method, path, body) {
  try {
    say((await api(method, path, body)).message);
    return true;
  } catch (error) {
    say(error.message, true);
    return false;
  }
}

const devicePath = (id) => `/devices/${encodeURIComponent(id)}`;

tbody.addEventListener("click", async (event) => {
  const row = event.target.closest("tr");
  if (!row) return;
  const id = row.dataset.device;
  if (event.target.classList.contains("toggle")) {
    const button = event.target;
    const wanted = row.querySelector(".status").textContent === "Active" ? "Inactive" : "Active";
    button.disabled = true;
    await act("POST", `/status/${encodeURIComponent(id)}`, {status: wanted});
    button.disabled = false;
    await refresh();
  } else if (event.target.classList.contains("remove")) {
    if (!confirm(`Remove device ${id}? Its queue is kept.`)) return;
    await act("DELETE", devicePath(id));
    await refresh();
  }
});

document.getElementById("add-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = {id: form.elements["id"].value.trim(),
                interval: [Number(form.elements["min"].value), Number(form.elements["max"].value)]};
  if (await act("POST", "/devices", body)) form.reset();
  await refresh();
});

document.getElementById("message-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = {type: form.type.value, text: form.text.value};
  if (await act("POST", `${devicePath(form.device.value)}/messages`, body)) form.text.value = "";
});

document.getElementById("broadcast-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  if (await act("POST", "/broadcast", {message: form.message.value})) form.reset();
});

refresh();
setInterval(refresh, 1000);
