// The playground: one session follows the text as it is typed (a step for what was added, a new
// session when earlier text changes, or for a subword model every time: see `follow`), and its
// prediction is drawn as bars. Everything goes through
// the HTTP face's routes, the same ones curl uses (see /openapi.json).
"use strict";

const TOP_K = 10;
const $ = (id) => document.getElementById(id);
const shown = (text) => text.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");

let session = null;   // {id, text}: the session that has read exactly `text`
let busy = false;     // one request in flight; typing meanwhile is caught up afterwards
let characters = true;  // the model's ids are characters (GET /v1/models says "vocabulary")

function headers(extra = {}) {
  const token = $("token").value.trim();
  localStorage.setItem("rnnserve-token", token);
  return token ? { ...extra, authorization: `Bearer ${token}` } : extra;
}

async function call(method, path, body, accept = "application/json") {
  const response = await fetch(path, {
    method, headers: headers({ "content-type": "application/json", accept }),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    const { error } = await response.json();
    throw new Error(`${error.status}: ${error.message}`);
  }
  return response;
}

const json = async (...args) => (await call(...args)).json();

function closeSession(id) {
  call("DELETE", `/v1/sessions/${id}`).catch(() => {});  // it expires anyway
}

function draw(prediction, text) {
  const list = $("predictions");
  list.replaceChildren(...prediction.texts.map((token, i) => {
    const p = prediction.probabilities[i];
    const row = document.createElement("li");
    row.dataset.token = token;
    row.dataset.probability = String(p);
    row.innerHTML = `<span class="token"></span><span class="track"><span class="bar"></span></span>
                     <span class="probability"></span>`;
    row.querySelector(".token").textContent = shown(token);
    row.querySelector(".bar").style.width = `${(p * 100).toFixed(2)}%`;
    row.querySelector(".probability").textContent = `${(p * 100).toFixed(2)}%`;
    return row;
  }));
  list.dataset.for = text;
}

async function follow() {
  if (busy) return;
  busy = true;
  try {
    for (let text = $("text").value; ; text = $("text").value) {
      if (session && session.text === text) break;
      if (!text) {
        if (session) closeSession(session.id);
        session = null;
        $("predictions").replaceChildren();
        $("predictions").dataset.for = "";
        break;
      }
      let answer;
      // Only what was added, the session keeps the rest: exact for characters. Subwords of the added text alone
      // are not the whole text's (" kin" + "g" is not " king"), so a subword model reads the whole text anew,
      // the prefix-state cache sparing it what it read before.
      if (session && characters && text.startsWith(session.text)) {
        answer = await json("POST", `/v1/sessions/${session.id}/step`,
                            { text: text.slice(session.text.length), top_k: TOP_K });
        session.text = text;
      } else {  // earlier text changed: start over from the whole text
        if (session) closeSession(session.id);
        answer = await json("POST", "/v1/sessions", { prompt_text: text, top_k: TOP_K });
        session = { id: answer.session.session_id, text };
        answer.position = answer.session.position;
      }
      draw(answer.prediction, text);
      $("position").textContent = `session ${session.id.slice(0, 8)}\u2026 at position ${answer.position}`;
      $("error").hidden = true;
    }
  } catch (error) {
    session = null;
    $("error").textContent = error.message;
    $("error").hidden = false;
  } finally {
    busy = false;
  }
}

async function stream(output, id, seed) {
  output.textContent = "";
  output.dataset.done = "false";
  try {
    const response = await call("POST", `/v1/sessions/${id}/generate`, {
      max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value), seed: String(seed),
    }, "text/event-stream");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += value;
      const events = pending.split("\n\n");
      pending = events.pop();
      for (const event of events) {
        const data = JSON.parse(event.slice(event.indexOf("data: ") + 6));
        if (event.startsWith("event: error")) throw new Error(`${data.error.status}: ${data.error.message}`);
        output.textContent += data.text;
      }
    }
  } catch (error) {
    output.textContent += `\n[${error.message}]`;
  } finally {
    closeSession(id);
    output.dataset.done = "true";
  }
}

// Fork the session that has read the text in two (no re-reading), and continue each with its own seed.
async function generateTwo() {
  const panes = [$("output-a"), $("output-b")];
  panes.forEach((pane) => { pane.dataset.done = "false"; });
  while (busy) await new Promise((resolve) => setTimeout(resolve, 10));
  await follow();  // the session has read exactly the text now
  let source = session;
  if (!source) {  // no text: fork a session that has read nothing
    const created = await json("POST", "/v1/sessions", {});
    source = { id: created.session.session_id, text: "" };
  }
  const seed = Number($("seed").value);
  try {
    const { sessions } = await json("POST", `/v1/sessions/${source.id}/fork`, { count: 2 });
    await Promise.all(sessions.map((fork, i) => stream(panes[i], fork.session_id, seed + i)));
  } catch (error) {
    panes.forEach((pane) => { pane.textContent = error.message; pane.dataset.done = "true"; });
  } finally {
    if (source !== session) closeSession(source.id);
  }
}

async function describeModel() {
  try {
    const { models } = await json("GET", "/v1/models");
    // The version sessions get: the server's default model comes first, but in version order, not default first.
    const m = models.find((model) => model.is_default) || models[0];
    characters = (m.vocabulary || "characters") === "characters";
    // A recurrent cell by its layers and width; another architecture (no such sizes) by its state tensors.
    const size = m.layers ? `${m.layers} \u00d7 ${m.hidden_size}`
      : (m.states || []).map((s) => `${s.name} [${(s.shape || []).join(" \u00d7 ")}]`).join(", ");
    $("model").textContent = `${m.name} ${m.version}: ${m.cell.toUpperCase()} ${size}, ${m.vocab_size} tokens`;
  } catch (error) {
    $("model").textContent = error.message;
  }
}

$("token").value = localStorage.getItem("rnnserve-token") || "";
$("token").addEventListener("change", () => { session = null; describeModel(); follow(); });
$("text").addEventListener("input", follow);
$("generate").addEventListener("click", generateTwo);
describeModel();
follow();
