// The playground: one session follows the text as it is typed (a step for what was added, a new
// session when earlier text changes), and its prediction is drawn as bars. Everything goes through
// the HTTP face's routes, the same ones curl uses (see /openapi.json).
"use strict";

const TOP_K = 10;
const $ = (id) => document.getElementById(id);
const shown = (text) => text.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");

let session = null;   // {id, text}: the session that has read exactly `text`
let busy = false;     // one request in flight; typing meanwhile is caught up afterwards

// What a status means to someone at the keyboard; the server's message then says which field and limit.
const MEANINGS = {
  INVALID_ARGUMENT: "Not accepted", OUT_OF_RANGE: "Not accepted", FAILED_PRECONDITION: "Not accepted",
  UNAUTHENTICATED: "A bearer token the server knows is needed (top right)", NOT_FOUND: "The session is gone",
  RESOURCE_EXHAUSTED: "The server is full", UNAVAILABLE: "The server is unavailable", DEADLINE_EXCEEDED: "Too slow",
};

// A call the server answered with an error: its gRPC status name and its message, kept apart so that
// the page can say them in words rather than echo the wire format.
class Refused extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function readable(error) {
  if (!(error instanceof Refused)) return `Could not reach the server: ${error.message}`;
  return `${MEANINGS[error.status] || `The server failed (${error.status})`}: ${error.message}`;
}

// Shows `message` in the error place `id`, or empties and hides that place when there is none.
function say(id, message) {
  $(id).textContent = message;
  $(id).hidden = !message;
}

const report = (id, error) => say(id, error ? readable(error) : "");

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
    const { error } = await response.json().catch(() => (  // not ours: a proxy's page, say
      { error: { status: `HTTP ${response.status}`, message: response.statusText } }));
    throw new Refused(error.status, error.message);
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
  $("no-prediction").hidden = true;
}

// No prediction is current (nothing typed, or the text was refused): nothing of an earlier text stays shown.
function forget() {
  if (session) closeSession(session.id);
  session = null;
  draw({ texts: [], probabilities: [] }, "");
  $("no-prediction").hidden = $("text").value !== "";  // else the error place says why there is none
  $("position").textContent = "\u00a0";
}

async function follow() {
  if (busy) return;
  busy = true;
  let text;
  try {
    for (text = $("text").value; ; text = $("text").value) {
      if (session && session.text === text) break;
      if (!text) {
        forget();
        report("error", null);
        break;
      }
      let answer;
      if (session && text.startsWith(session.text)) {  // only what was added: the session keeps the rest
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
      report("error", null);
    }
  } catch (error) {
    forget();
    report("error", error);
    if ($("text").value !== text) setTimeout(follow);  // edited while refused: the error may be gone already
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
        if (event.startsWith("event: error")) throw new Refused(data.error.status, data.error.message);
        output.textContent += data.text;
      }
    }
  } catch (error) {
    report("generate-error", error);  // what streamed before it stays: it is the continuation so far
  } finally {
    closeSession(id);
    output.dataset.done = "true";
  }
}

// Fork the session that has read the text in two (no re-reading), and continue each with its own seed.
async function generateTwo() {
  const panes = [$("output-a"), $("output-b")];
  panes.forEach((pane) => { pane.textContent = ""; pane.dataset.done = "false"; });
  report("generate-error", null);
  while (busy) await new Promise((resolve) => setTimeout(resolve, 10));
  await follow();  // the session has read exactly the text now
  const source = session;
  try {
    if (!source) {  // nothing typed, or the text was refused: nothing to continue
      say("generate-error", $("text").value ? "Nothing to continue: the text above was not accepted."
                                            : "Type some text first: each fork continues it.");
      return;
    }
    const seed = Number($("seed").value);
    const { sessions } = await json("POST", `/v1/sessions/${source.id}/fork`, { count: 2 });
    await Promise.all(sessions.map((fork, i) => stream(panes[i], fork.session_id, seed + i)));
  } catch (error) {
    report("generate-error", error);
  } finally {
    panes.forEach((pane) => { pane.dataset.done = "true"; });
  }
}

async function describeModel() {
  try {
    const { models } = await json("GET", "/v1/models");
    // The version sessions get: the server's default model comes first, but in version order, not default first.
    const m = models.find((model) => model.is_default) || models[0];
    $("model").textContent = `${m.name} ${m.version}: ${m.cell.toUpperCase()} ${m.layers} \u00d7 ${m.hidden_size}, ` +
                             `${m.vocab_size} tokens`;
  } catch (error) {
    $("model").textContent = readable(error);
  }
}

$("token").value = localStorage.getItem("rnnserve-token") || "";
$("token").addEventListener("change", () => { session = null; describeModel(); follow(); });
$("text").addEventListener("input", () => { say("generate-error", ""); follow(); });  // it spoke of the old text
$("generate").addEventListener("click", generateTwo);
describeModel();
follow();
