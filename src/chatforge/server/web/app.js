// The chat page: conversations from the server's SQLite store (/api/conversations...), replies
// streamed as server-sent events over fetch, a stop button that aborts the request (the server
// cancels the generation and keeps what was said), and an inspect view backed by POST /v1/inspect.
"use strict";

const $ = (sel) => document.querySelector(sel);
keyFromAddress();
const state = {
  key: localStorage.getItem("chatforge.apiKey") || "",
  info: null,          // GET /api/info: model, context, default settings
  conversations: [],   // summaries, newest first
  current: null,       // the open conversation with its messages
  streaming: null,     // {controller} while a reply streams
};

// --- talking to the server ---------------------------------------------------------------------

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h["Authorization"] = `Bearer ${state.key}`;
  return h;
}

// A server that made up its API key prints the page's address as http://host:port/#key=KEY: the
// part after # never leaves the browser; keep the key and take it out of the address bar.
function keyFromAddress() {
  const match = location.hash.match(/^#key=(.+)$/);
  if (!match) return;
  localStorage.setItem("chatforge.apiKey", decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search);
}

async function request(method, path, body, signal) {
  for (;;) {
    const res = await fetch(path, {
      method, signal, headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (res.status === 401) { await askKey(); continue; }
    return res;
  }
}

async function api(method, path, body) {
  const res = await request(method, path, body);
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error((data && data.error && data.error.message) || `${res.status} ${res.statusText}`);
  return data;
}

function askKey() {
  return new Promise((resolve) => {
    const dialog = $("#key-dialog");
    $("#key-input").value = state.key;
    dialog.addEventListener("close", () => {
      state.key = $("#key-input").value.trim();
      localStorage.setItem("chatforge.apiKey", state.key);
      resolve();
    }, { once: true });
    if (!dialog.open) dialog.showModal();
  });
}

// Server-sent events from a fetch response: calls onEvent(object) for every `data:` line.
async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") onEvent(JSON.parse(line.slice(6)));
      }
    }
  }
}

function showBanner(text, kind = "info") {
  const el = $("#banner");
  el.textContent = text;
  el.className = `banner ${kind}`;
  el.hidden = !text;
}

// --- conversations -------------------------------------------------------------------------------

async function loadConversations() {
  state.conversations = (await api("GET", "/api/conversations")).data;
  const open = state.current && state.conversations.find((c) => c.id === state.current.id);
  if (open && open.title !== state.current.title) {  // the server names a conversation after its first message
    state.current.title = open.title;
    if (document.activeElement !== $("#title")) $("#title").value = open.title;
  }
  renderConversationList();
}

function renderConversationList() {
  const list = $("#conversations");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const li = document.createElement("li");
    li.className = "conversation" + (state.current && state.current.id === conv.id ? " active" : "");
    li.dataset.id = conv.id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conv.title;
    open.title = conv.title;
    open.addEventListener("click", () => openConversation(conv.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.title = "delete this conversation";
    del.setAttribute("aria-label", `delete ${conv.title}`);
    del.textContent = "×";
    del.addEventListener("click", () => deleteConversation(conv));
    li.append(open, del);
    list.append(li);
  }
}

async function openConversation(id) {
  if (state.streaming) return;
  state.current = await api("GET", `/api/conversations/${id}`);
  localStorage.setItem("chatforge.open", id);
  renderConversation();
  renderConversationList();
  document.body.classList.remove("sidebar-open");
}

function newConversation() {
  if (state.streaming) return;
  state.current = null;
  localStorage.removeItem("chatforge.open");
  renderConversation();
  renderConversationList();
  $("#input").focus();
  document.body.classList.remove("sidebar-open");
}

async function deleteConversation(conv) {
  if (!confirm(`Delete "${conv.title}"?`)) return;
  await api("DELETE", `/api/conversations/${conv.id}`);
  if (state.current && state.current.id === conv.id) newConversation();
  await loadConversations();
}

async function rename() {
  const title = $("#title").value.trim();
  if (!state.current || !title || title === state.current.title) return;
  state.current = await api("PATCH", `/api/conversations/${state.current.id}`, { title });
  await loadConversations();
}

// --- messages ----------------------------------------------------------------------------------------

function renderConversation() {
  const conv = state.current;
  $("#title").value = conv ? conv.title : "";
  $("#title").disabled = !conv;
  $("#open-settings").disabled = !conv;
  const box = $("#messages");
  box.replaceChildren();
  if (!conv || !conv.messages.length) {
    box.append(emptyState());
    return;
  }
  conv.messages.forEach((m, i) => box.append(messageElement(m, i)));
  box.scrollTop = box.scrollHeight;
}

function emptyState() {
  const div = document.createElement("div");
  div.id = "empty";
  div.className = "empty";
  const model = state.info ? state.info.model : "the model";
  div.innerHTML = `<h1>chatforge</h1><p>Chatting with <b>${Markdown.escape(model)}</b>. Type a message below;
    replies stream as they are generated and conversations are kept on the server.</p>`;
  return div;
}

function messageElement(m, index) {
  const el = document.createElement("article");
  el.className = `message ${m.role}`;
  if (m.id !== undefined) el.dataset.id = m.id;
  const body = document.createElement("div");
  body.className = "body";
  setBody(body, m);
  el.append(body);
  const actions = document.createElement("div");
  actions.className = "actions";
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = metaText(m);
  actions.append(meta);
  const last = state.current && index === state.current.messages.length - 1;
  if (m.role === "user") {
    actions.append(button("edit", "edit this message and send it again", () => editMessage(el, m)));
  } else {
    actions.append(button("inspect", "show each token's probability, alternatives and attention",
      () => toggleInspect(el, m, index)));
    if (last) actions.append(button("regenerate", "replace this reply with a new one", () => regenerate(m)));
  }
  el.append(actions);
  return el;
}

function setBody(body, m) {
  if (m.role === "assistant") {
    body.innerHTML = Markdown.render(m.content);
  } else {
    body.textContent = m.content;
  }
}

function metaText(m) {
  const meta = m.meta || {};
  const parts = [];
  if (m.unfinished) parts.push("unfinished: the server stopped before this reply was complete");
  if (meta.finish_reason === "stopped") parts.push("stopped");
  if (meta.finish_reason === "length") parts.push("cut at max tokens");
  if (meta.completion_tokens) parts.push(`${meta.completion_tokens} tokens`);
  if (meta.tokens_per_second) parts.push(`${meta.tokens_per_second} tok/s`);
  if (meta.dropped_messages) parts.push(`${meta.dropped_messages} oldest messages left out to fit the context`);
  return parts.join(" · ");
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `action ${label}`;
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

async function ensureConversation() {
  if (state.current) return state.current;
  state.current = await api("POST", "/api/conversations", {});
  localStorage.setItem("chatforge.open", state.current.id);
  return state.current;
}

async function send(event) {
  if (event) event.preventDefault();
  const input = $("#input");
  const text = input.value.trim();
  if (!text || state.streaming) return;
  try {
    const conv = await ensureConversation();
    const message = await api("POST", `/api/conversations/${conv.id}/messages`, { content: text });
    conv.messages.push(message);
    input.value = "";
    autosize();
    renderConversation();
    await loadConversations();
    await streamReply();
  } catch (e) {
    showBanner(e.message, "error");
  }
}

async function regenerate(m) {
  if (state.streaming) return;
  try {
    state.current = await api("DELETE", `/api/conversations/${state.current.id}/messages/${m.id}`);
    renderConversation();
    await streamReply();
  } catch (e) {
    showBanner(e.message, "error");
  }
}

function editMessage(el, m) {
  if (state.streaming) return;
  const body = el.querySelector(".body");
  const area = document.createElement("textarea");
  area.className = "edit-box";
  area.value = m.content;
  const save = button("send", "save the edit and get a new reply (later messages are replaced)", async () => {
    const content = area.value.trim();
    if (!content) return;
    try {
      state.current = await api("PATCH", `/api/conversations/${state.current.id}/messages/${m.id}`, { content });
      renderConversation();
      await streamReply();
    } catch (e) {
      showBanner(e.message, "error");
    }
  });
  const cancel = button("cancel", "keep the message as it was", () => renderConversation());
  body.replaceChildren(area, save, cancel);
  area.focus();
}

// Stream the assistant's reply to the open conversation into a new message element.
async function streamReply() {
  const conv = state.current;
  const controller = new AbortController();
  state.streaming = { controller };
  setStreaming(true);
  showBanner("");
  const draft = { role: "assistant", content: "", meta: {} };
  const el = messageElement(draft, conv.messages.length);
  el.classList.add("streaming");
  const body = el.querySelector(".body");
  $("#empty") && $("#empty").remove();
  $("#messages").append(el);
  let pending = false;
  const paint = () => {
    pending = false;
    body.innerHTML = Markdown.render(draft.content);
    $("#messages").scrollTop = $("#messages").scrollHeight;
  };
  let finished = false;
  try {
    const res = await request("POST", `/api/conversations/${conv.id}/reply`, undefined, controller.signal);
    if (!res.ok) {
      const data = await res.json().catch(() => null);
      throw new Error((data && data.error && data.error.message) || `${res.status} ${res.statusText}`);
    }
    await readEvents(res, (ev) => {
      if (ev.type === "start" && ev.dropped_messages) {
        showBanner(`${ev.dropped_messages} oldest messages were left out so the conversation fits the model's context.`);
      } else if (ev.type === "delta") {
        draft.content += ev.text;
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      } else if (ev.type === "done") {
        conv.messages.push(ev.message);
        finished = true;
      } else if (ev.type === "error") {
        throw new Error(ev.error.message);
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") showBanner(e.message, "error");
  } finally {
    state.streaming = null;
    setStreaming(false);
    if (!finished) await reloadAfterStop(conv);
    renderConversation();
    await loadConversations();
  }
}

// After a stop the server saves what was said (the reply is kept as it grows, marked unfinished
// until the server has finished it); wait (briefly) for it to be there, finished.
async function reloadAfterStop(conv) {
  const before = conv.messages.length;
  for (let i = 0; i < 30; i++) {
    const fresh = await api("GET", `/api/conversations/${conv.id}`);
    const last = fresh.messages[fresh.messages.length - 1];
    if ((fresh.messages.length > before && !last.unfinished) || i === 29) {
      if (state.current && state.current.id === conv.id) state.current = fresh;
      return;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

function setStreaming(on) {
  $("#send").hidden = on;
  $("#stop").hidden = !on;
  $("#input").disabled = false;
}

function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

// --- settings ----------------------------------------------------------------------------------------

const SETTING_FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed"];
const INTEGER_FIELDS = new Set(["top_k", "max_tokens", "seed"]);

function openSettings() {
  const conv = state.current;
  if (!conv) return;
  const form = $("#settings-form");
  form.system.value = conv.system || "";
  const defaults = (state.info && state.info.defaults) || {};
  for (const name of SETTING_FIELDS) {
    form[name].value = conv.settings[name] ?? "";
    form[name].placeholder = defaults[name] ?? "";
  }
  $("#settings-error").hidden = true;
  $("#settings").showModal();
}

async function saveSettings(event) {
  event.preventDefault();
  const form = $("#settings-form");
  const settings = {};
  for (const name of SETTING_FIELDS) {
    const raw = form[name].value.trim();
    if (raw !== "") settings[name] = INTEGER_FIELDS.has(name) ? parseInt(raw, 10) : parseFloat(raw);
  }
  try {
    state.current = await api("PATCH", `/api/conversations/${state.current.id}`,
      { system: form.system.value, settings });
    $("#settings").close();
    renderConversation();
  } catch (e) {
    const err = $("#settings-error");
    err.textContent = e.message;
    err.hidden = false;
  }
}

// --- inspect view --------------------------------------------------------------------------------------

async function toggleInspect(el, m, index) {
  const body = el.querySelector(".body");
  if (el.classList.contains("inspecting")) {
    el.classList.remove("inspecting");
    setBody(body, m);
    return;
  }
  const history = state.current.messages.slice(0, index).map((x) => ({ role: x.role, content: x.content }));
  if (state.current.system) history.unshift({ role: "system", content: state.current.system });
  body.classList.add("loading");
  try {
    const data = await api("POST", "/v1/inspect", { messages: history, reply: m.content, top_k: 5, top_attn: 5 });
    el.classList.add("inspecting");
    renderInspect(body, data);
  } catch (e) {
    showBanner(e.message, "error");
  } finally {
    body.classList.remove("loading");
  }
}

function renderInspect(body, data) {
  body.replaceChildren();
  const legend = document.createElement("div");
  legend.className = "inspect-legend";
  legend.textContent = "Hover a token: its probability, the alternatives the model weighed, and the earlier " +
    "tokens it attended to most. Paler = less likely.";
  const text = document.createElement("div");
  text.className = "inspect-text";
  data.reply.forEach((step, j) => {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = step.text;
    span.dataset.index = data.prompt_tokens + j;
    span.style.setProperty("--p", Math.max(0.08, step.prob).toFixed(3));
    span.addEventListener("mouseenter", () => showTip(span, step, data, text));
    span.addEventListener("mouseleave", () => hideTip(text));
    text.append(span);
  });
  body.append(legend, text);
}

function bar(label, p, chosen) {
  const row = document.createElement("div");
  row.className = "tip-row" + (chosen ? " chosen" : "");
  const name = document.createElement("span");
  name.className = "tip-label";
  name.textContent = label;
  const track = document.createElement("span");
  track.className = "tip-bar";
  const fill = document.createElement("span");
  fill.style.width = `${(p * 100).toFixed(1)}%`;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "tip-value";
  value.textContent = `${(p * 100).toFixed(1)}%`;
  row.append(name, track, value);
  return row;
}

function showTip(span, step, data, text) {
  const tip = $("#inspect-tip");
  tip.replaceChildren();
  const head = document.createElement("div");
  head.className = "tip-head";
  head.textContent = `“${step.token}” · p = ${(step.prob * 100).toFixed(1)}% · rank ${step.rank}`;
  const alts = document.createElement("div");
  alts.className = "tip-section alternatives";
  alts.append(Object.assign(document.createElement("h4"), { textContent: "Top alternatives" }));
  for (const a of step.alternatives) alts.append(bar(a.token, a.prob, a.id === step.id));
  const att = document.createElement("div");
  att.className = "tip-section attended";
  att.append(Object.assign(document.createElement("h4"), { textContent: "Attended to most" }));
  for (const a of step.attended) {
    const where = a.index >= data.prompt_tokens ? "reply" : "prompt";
    att.append(bar(`${a.token} (${where} #${a.index})`, a.weight, false));
    const target = text.querySelector(`.token[data-index="${a.index}"]`);
    if (target) {
      target.classList.add("attended");
      target.style.setProperty("--w", Math.min(1, 0.25 + a.weight).toFixed(3));
    }
  }
  tip.append(head, alts, att);
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  const width = Math.min(340, window.innerWidth - 16);
  tip.style.width = `${width}px`;
  tip.style.left = `${Math.max(8, Math.min(r.left, window.innerWidth - width - 8))}px`;
  const below = r.bottom + 8;
  tip.style.top = `${below + tip.offsetHeight < window.innerHeight ? below : Math.max(8, r.top - tip.offsetHeight - 8)}px`;
  span.classList.add("hovered");
}

function hideTip(text) {
  $("#inspect-tip").hidden = true;
  text.querySelectorAll(".token.attended, .token.hovered").forEach((t) => t.classList.remove("attended", "hovered"));
}

// --- wiring -----------------------------------------------------------------------------------------------

function autosize() {
  const input = $("#input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
}

async function loadInfo() {
  for (;;) {
    const res = await request("GET", "/api/info");
    if (res.ok) {
      state.info = await res.json();
      showBanner("");
      $("#model-info").textContent = `${state.info.model} · ${state.info.context_length} tokens of context`;
      return;
    }
    const data = await res.json().catch(() => null);
    showBanner((data && data.error && data.error.message) || "waiting for the server…", "info");
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function start() {
  $("#composer").addEventListener("submit", send);
  $("#input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("#input").addEventListener("input", autosize);
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", newConversation);
  $("#title").addEventListener("change", rename);
  $("#open-settings").addEventListener("click", openSettings);
  $("#settings-form").addEventListener("submit", saveSettings);
  $("#settings-cancel").addEventListener("click", () => $("#settings").close());
  $("#toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
  $("#messages").addEventListener("click", (e) => {
    if (!e.target.classList.contains("copy")) return;
    navigator.clipboard && navigator.clipboard.writeText(e.target.parentElement.querySelector("code").textContent);
    e.target.textContent = "copied";
  });
  await loadInfo();
  await loadConversations();
  const open = localStorage.getItem("chatforge.open");
  if (open && state.conversations.some((c) => c.id === open)) await openConversation(open);
  else renderConversation();
  document.body.dataset.ready = "1";
}

start().catch((e) => showBanner(e.message, "error"));
