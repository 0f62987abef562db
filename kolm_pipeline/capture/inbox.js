// The inbox page: reads the JSON API with the kolm key typed in (or passed as #key=… and removed from the
// address at once); every text from a capture is set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let key = "";

function say(text) {
  $("message").textContent = text || "";
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { authorization: "Bearer " + key, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) {
    throw new Error((data.error && data.error.message) || response.statusText);
  }
  return data;
}

function lastUser(messages) {
  for (let i = messages.length - 1; i >= 0; i--) {
    const content = messages[i].content;
    if (messages[i].role === "user") {
      return typeof content === "string" ? content : JSON.stringify(content);
    }
  }
  return "";
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

async function loadNamespaces() {
  const select = $("namespace");
  const chosen = select.value;
  const { namespaces } = await api("GET", "/v1/namespaces");
  select.replaceChildren();
  for (const name of namespaces) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.appendChild(option);
  }
  if (namespaces.includes(chosen)) select.value = chosen;
}

async function refresh() {
  const namespace = $("namespace").value;
  if (!namespace) {
    say("no captures yet");
    return;
  }
  const status = await api("GET", "/v1/namespaces/" + encodeURIComponent(namespace) + "/status");
  for (const [name, value] of Object.entries(status.counters)) {
    const element = $("counter-" + name);
    if (element) element.textContent = String(value);
  }
  for (const [name, value] of Object.entries(status.switches)) {
    const element = $("switch-" + name);
    if (element) element.textContent = value === true ? "on" : value === false ? "off" : String(value);
  }
  const params = new URLSearchParams({ namespace, limit: "100" });
  if ($("state").value) params.set("state", $("state").value);
  const { captures } = await api("GET", "/v1/captures?" + params);
  const body = $("captures");
  body.replaceChildren();
  for (const capture of captures) {
    const row = document.createElement("tr");
    row.dataset.id = String(capture.id);
    cell(row, String(capture.id));
    cell(row, capture.model);
    cell(row, capture.status);
    cell(row, capture.expired_at ? "(expired)" : lastUser(capture.messages), "text");
    cell(row, capture.expired_at ? "(expired)" : capture.feedback_output ?? capture.output_text, "text");
    cell(row, capture.triage_state, "state-" + capture.triage_state);
    const actions = cell(row, "");
    for (const [label, state] of [["Keep", "kept"], ["Discard", "discarded"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.dataset.action = state;
      button.disabled = capture.triage_state === state || (state === "kept" && capture.status !== "ok");
      button.addEventListener("click", () => triage(capture.id, state));
      actions.appendChild(button);
    }
    body.appendChild(row);
  }
  say(captures.length ? "" : "nothing to show");
}

async function triage(id, state) {
  try {
    await api("POST", "/v1/captures/" + id + "/triage", { state });
    await refresh();
  } catch (error) {
    say(error.message);
  }
}

async function load(event) {
  if (event) event.preventDefault();
  key = $("key").value.trim();
  try {
    await loadNamespaces();
    await refresh();
  } catch (error) {
    say(error.message);
  }
}

$("login").addEventListener("submit", load);
$("namespace").addEventListener("change", () => refresh().catch((error) => say(error.message)));
$("state").addEventListener("change", () => refresh().catch((error) => say(error.message)));

const fromHash = new URLSearchParams(location.hash.slice(1));
if (fromHash.get("key")) {
  $("key").value = fromHash.get("key");
  history.replaceState(null, "", location.pathname + location.search);
  load();
}
