// The playground: keeps the conversation in the page, asks the console for the rendered prompt, and sends
// the conversation to /v1/chat/completions through the console (the API key stays in its HttpOnly cookie).
"use strict";
(function () {
  const prefix = document.currentScript.dataset.prefix;
  const form = document.getElementById("chat");
  const model = document.getElementById("model");
  const input = document.getElementById("message");
  const send = document.getElementById("send");
  const transcript = document.getElementById("transcript");
  const problem = document.getElementById("chat-error");
  const promptBox = document.getElementById("prompt");
  const promptMeta = document.getElementById("prompt-meta");
  let messages = [];
  // Each playground conversation is its own stored conversation of the key (the API's `user` field).
  let conversation = newConversation();

  function newConversation() {
    return "console-playground-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 8);
  }

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "bubble " + role;
    div.textContent = text; // text, never markup
    transcript.appendChild(div);
    return div;
  }

  function fail(text) {
    problem.textContent = text;
    problem.hidden = false;
  }

  async function post(path, body) {
    const response = await fetch(prefix + path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      credentials: "same-origin",
      body: JSON.stringify(body),
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = {}; }
    if (!response.ok) {
      const why = (data.error && data.error.message) || response.statusText;
      throw new Error(response.status + ": " + why);
    }
    return data;
  }

  async function showPrompt(body) {
    try {
      const view = await post("/api/prompt", body);
      promptBox.textContent = view.text;
      promptMeta.textContent = view.tokens + " tokens (limit " + view.max_prompt_tokens + "), template " +
        view.template + ", dropped turns " + view.dropped_turns + (view.truncated ? ", newest message cut" : "");
    } catch (e) {
      promptMeta.textContent = "Could not render the prompt: " + e.message;
    }
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    problem.hidden = true;
    messages.push({ role: "user", content: text });
    bubble("user", text);
    input.value = "";
    send.disabled = true;
    const body = { model: model.value, messages: messages.slice(), user: conversation };
    const pending = bubble("assistant", "…");
    showPrompt(body);
    try {
      const data = await post("/api/chat", body);
      const reply = data.choices[0].message.content;
      pending.textContent = reply;
      messages.push({ role: "assistant", content: reply });
    } catch (e) {
      pending.remove();
      messages.pop();
      fail("The reply failed: " + e.message);
    } finally {
      send.disabled = false;
    }
  });

  document.getElementById("reset").addEventListener("click", function () {
    messages = [];
    conversation = newConversation();
    transcript.replaceChildren();
    promptBox.textContent = "";
  });
  model.addEventListener("change", function () { document.getElementById("reset").click(); });
})();
