// The chat page's logic: keep the conversation, send it to /v1/chat/completions with
// stream: true, and show the reply as its server-sent events arrive. Plain browser
// JavaScript (fetch, ReadableStream, AbortController): no library, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,         // the served model's id (GET /v1/models)
  messages: [],        // the conversation as the API takes it: {role, content}
  controller: null,    // the AbortController of the reply being written, if any
};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

// An error body of the API ({"error": {"message": ...}}), or the status line.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status + " " + response.statusText;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      $("model-info").textContent = "not connected";
      showError(await errorText(response));
      return;
    }
    const card = (await response.json()).data[0];
    state.model = card.id;
    $("model-info").textContent =
      card.id + " \u00b7 context " + card.context_length + " tokens";
    $("max-tokens").max = card.max_tokens;
    showError("");
  } catch (e) {
    $("model-info").textContent = "not connected";
    showError("cannot reach the server: " + e.message);
  }
}

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  scrollDown();
  return div;
}

function addNote(text) {
  const div = document.createElement("div");
  div.className = "note";
  div.textContent = text;
  $("messages").appendChild(div);
  scrollDown();
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function requestBody() {
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.messages);
  const body = { model: state.model, messages: messages, stream: true };
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

// Read "data: ..." events from the response body; call onEvent with each parsed object.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  if (!state.model) await loadModel();
  if (!state.model) return;
  showError("");
  $("input").value = "";
  state.messages.push({ role: "user", content: text });
  const question = addBubble("user", text);
  const bubble = addBubble("assistant streaming", "");
  let reply = "";           // exactly what the model wrote (it may start with a space)
  let finish = null;
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const dropped = parseInt(response.headers.get("X-Dropped-Messages") || "0", 10);
    if (dropped > 0) {
      addNote("(the conversation outgrew the context: its " + dropped +
              " oldest message(s) were left out)");
      $("messages").appendChild(bubble);
    }
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      for (const choice of event.choices) {
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          bubble.textContent = reply.trimStart();
          scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    if (finish === "length") addNote("(the reply reached its token limit)");
  } catch (e) {
    if (e.name === "AbortError") {
      addNote("(stopped)");
    } else {
      showError(e.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    if (reply || finish) {
      state.messages.push({ role: "assistant", content: reply });
    } else {  // nothing came back: take the question back into the box
      bubble.remove();
      question.remove();
      state.messages.pop();
      $("input").value = text;
    }
    state.controller = null;
    setBusy(false);
    $("input").focus();
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.messages = [];
  $("messages").replaceChildren();
  showError("");
  $("input").focus();
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
$("api-key").addEventListener("change", loadModel);
loadModel();
