// The inbox page: reads the JSON API with the kolm key typed in (or passed as #key=… and removed from the
// address at once); every text from a capture is set with textContent, never parsed as HTML. A dataset view:
// captures filtered by state, tag and text, a page at a time; each row can be kept, discarded or corrected.
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

const PAGE_SIZE = 50;
let offset = 0;
let total = 0;

function filters(namespace) {
  const params = new URLSearchParams({ namespace, limit: String(PAGE_SIZE), offset: String(offset) });
  for (const name of ["state", "tag", "search"]) {
    const value = $(name).value.trim();
    if (value) params.set(name, value);
  }
  return params;
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
  showRouting(status.routing);
  await showDisagreements(namespace, status.routing);
  let page = await api("GET", "/v1/captures?" + filters(namespace));
  if (!page.captures.length && offset > 0) {
    // The last row of the last page was triaged out of the view: show the page before it.
    offset = Math.max(0, offset - PAGE_SIZE);
    page = await api("GET", "/v1/captures?" + filters(namespace));
  }
  total = page.total;
  const body = $("captures");
  body.replaceChildren();
  for (const capture of page.captures) body.appendChild(captureRow(capture));
  const last = offset + page.captures.length;
  $("page").textContent = total ? `${offset + 1}–${last} of ${total}` : "0 of 0";
  $("prev").disabled = offset === 0;
  $("next").disabled = last >= total;
  say(page.captures.length ? "" : "nothing to show");
}

function fixed(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function showRouting(routing) {
  const parts = [`agreement ${fixed(routing.agreement, 3)} over ${routing.compared} compared`];
  if (routing.threshold !== null) parts.push(`threshold ${fixed(routing.threshold, 3)} keeps ${fixed(routing.kept_share * 100, 1)} %`);
  if (routing.student_share !== null) {
    parts.push(`student answered ${fixed(routing.student_share * 100, 1)} %`,
               `escalated ${fixed(routing.escalation_rate * 100, 1)} %`,
               `$${fixed(routing.dollars_avoided, 4)} avoided`);
  }
  if (routing.missing && routing.mode !== "teacher") parts.push(`student not ready: ${routing.missing}`);
  $("routing").textContent = routing.mode === "teacher" && !routing.compared ? "" : parts.join(" · ");
}

async function showDisagreements(namespace, routing) {
  const section = $("disagreements-section");
  section.hidden = !routing.disagreements;
  if (!routing.disagreements) return;
  const data = await api("GET", "/v1/namespaces/" + encodeURIComponent(namespace) + "/disagreements?limit=50");
  const body = $("disagreements");
  body.replaceChildren();
  for (const item of data.disagreements) {
    const row = document.createElement("tr");
    row.dataset.id = String(item.capture_id);
    cell(row, String(item.capture_id));
    cell(row, item.kind);
    cell(row, fixed(item.agreement, 2));
    cell(row, fixed(item.confidence, 3));
    cell(row, item.teacher_output, "text output");
    cell(row, item.student_output, "text output");
    cell(row, item.triage_state, "state-" + item.triage_state);
    triageButtons(cell(row, ""), item.capture_id, item.triage_state, false);
    body.appendChild(row);
  }
}

// Keep and Discard for one capture; `unkeepable` (an error, or text past its window) disables Keep.
function triageButtons(actions, id, current, unkeepable) {
  for (const [label, state] of [["Keep", "kept"], ["Discard", "discarded"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.dataset.action = state;
    button.disabled = current === state || (state === "kept" && unkeepable);
    button.addEventListener("click", () => triage(id, state));
    actions.appendChild(button);
  }
}

function captureRow(capture) {
  const row = document.createElement("tr");
  row.dataset.id = String(capture.id);
  const expired = Boolean(capture.expired_at);
  cell(row, String(capture.id));
  cell(row, capture.created_at.slice(0, 16).replace("T", " "));
  cell(row, capture.model);
  cell(row, capture.status);
  cell(row, capture.tags.join(", "));
  cell(row, expired ? "(expired)" : lastUser(capture.messages), "text");
  const output = cell(row, "", "text output");
  if (expired) {
    output.textContent = "(expired)";
  } else if (capture.feedback_output !== null) {
    const badge = document.createElement("span");
    badge.className = "corrected";
    badge.textContent = "corrected";
    badge.title = "teacher's answer: " + capture.output_text;
    output.append(badge, document.createTextNode(capture.feedback_output));
  } else {
    output.textContent = capture.output_text;
  }
  cell(row, capture.triage_state, "state-" + capture.triage_state);
  const actions = cell(row, "");
  triageButtons(actions, capture.id, capture.triage_state, capture.status !== "ok" || expired);
  const correct = document.createElement("button");
  correct.type = "button";
  correct.textContent = "Correct";
  correct.dataset.action = "correct";
  correct.disabled = expired;
  correct.addEventListener("click", () => openEditor(row, capture));
  actions.appendChild(correct);
  return row;
}

function openEditor(row, capture) {
  const open = row.nextElementSibling;
  if (open && open.classList.contains("editor")) {
    open.querySelector("textarea").focus();
    return;
  }
  const editor = document.createElement("tr");
  editor.className = "editor";
  editor.dataset.for = String(capture.id);
  const td = document.createElement("td");
  td.colSpan = row.children.length;
  const label = document.createElement("label");
  label.textContent = "Corrected answer for capture " + capture.id + " (it replaces the teacher's when trained):";
  const text = document.createElement("textarea");
  text.value = capture.feedback_output ?? capture.output_text;
  const save = document.createElement("button");
  save.type = "button";
  save.textContent = "Save correction";
  save.dataset.action = "save-correction";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  cancel.addEventListener("click", () => editor.remove());
  save.addEventListener("click", () => correct(capture.id, text.value, save));
  td.append(label, text, save, cancel);
  editor.appendChild(td);
  row.after(editor);
  text.focus();
}

async function correct(id, output, button) {
  if (!output.trim()) {
    say("the corrected answer is empty");
    return;
  }
  button.disabled = true;
  try {
    const saved = await api("POST", "/v1/captures/" + id + "/feedback", { output });
    await refresh();
    say(saved.feedback_output === output ? "correction saved" : "correction saved (redacted before it was stored)");
  } catch (error) {
    button.disabled = false;
    say(error.message);
  }
}

async function triage(id, state) {
  try {
    await api("POST", "/v1/captures/" + id + "/triage", { state });
    await refresh();
  } catch (error) {
    say(error.message);
  }
}

function reload() {
  offset = 0;
  refresh().catch((error) => say(error.message));
}

async function load(event) {
  if (event) event.preventDefault();
  key = $("key").value.trim();
  offset = 0;
  try {
    await loadNamespaces();
    await refresh();
  } catch (error) {
    say(error.message);
  }
}

$("login").addEventListener("submit", load);
$("namespace").addEventListener("change", reload);
$("state").addEventListener("change", reload);
$("tag").addEventListener("change", reload);
$("search").addEventListener("change", reload);
$("prev").addEventListener("click", () => {
  offset = Math.max(0, offset - PAGE_SIZE);
  refresh().catch((error) => say(error.message));
});
$("next").addEventListener("click", () => {
  if (offset + PAGE_SIZE < total) offset += PAGE_SIZE;
  refresh().catch((error) => say(error.message));
});

const fromHash = new URLSearchParams(location.hash.slice(1));
if (fromHash.get("key")) {
  $("key").value = fromHash.get("key");
  history.replaceState(null, "", location.pathname + location.search);
  load();
}
