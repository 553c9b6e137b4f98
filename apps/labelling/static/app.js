// The labelling page: fetch the next pair for this rater, draw it, post the label, repeat.
// All text goes in with textContent (never innerHTML); the token travels in a header.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const RATER_RE = /^[A-Za-z0-9_.@+-]{1,64}$/;
const SECONDS_PER_QUARTER = 0.22;  // a whole note lasts 0.88 s when played
const $ = (id) => document.getElementById(id);

let rater = "";
let current = null;      // the pair shown
let history = [];        // pair ids labelled in this session, for Back
let busy = false;        // one request at a time: no double labels from key repeat
let audio = null;        // AudioContext, created on the first Play (browsers require a gesture)
let playing = [];        // oscillators of the piece being played

function setBusy(value) {  // exposed as data-busy so a test (or a stylesheet) can tell when the page is idle
  busy = value;
  document.body.dataset.busy = value ? "1" : "0";
}

function status(msg, isError = false) {
  $("status").textContent = msg;
  $("status").className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const headers = { "X-Access-Token": token };
  if (options.body) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { ...options, headers, cache: "no-store" });
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : res.statusText;
    throw new Error(`${res.status}: ${detail}`);
  }
  return data;
}

function showProgress(p) {
  $("progress").textContent = `${p.done} of ${p.total}`;
  $("progress").dataset.done = String(p.done);
  $("progress").dataset.total = String(p.total);
}

// ------------------------------------------------------------------ piano roll

function pitchRange(pair) {
  let lo = 127, hi = 0;
  for (const side of [pair.a, pair.b]) {
    for (const v of side.notes || []) {
      for (const p of v.pitches) { if (p !== null) { lo = Math.min(lo, p); hi = Math.max(hi, p); } }
    }
  }
  return [lo - 2, hi + 2];
}

function drawRoll(canvas, voices, lo, hi) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, left = 34;
  ctx.clearRect(0, 0, W, H);
  const total = Math.max(...voices.map((v) => v.durations.reduce((s, d) => s + d, 0)), 1);
  const row = H / (hi - lo + 1);
  const style = getComputedStyle(document.documentElement);
  ctx.font = "10px sans-serif";
  for (let p = lo; p <= hi; p++) {          // a line and a name at every C
    if (p % 12 !== 0) continue;
    const y = (hi - p) * row;
    ctx.fillStyle = "#e4e4e4"; ctx.fillRect(left, y + row - 1, W - left, 1);
    ctx.fillStyle = "#777"; ctx.fillText(`C${Math.floor(p / 12) - 1}`, 2, y + row);
  }
  for (const v of voices) {
    ctx.fillStyle = v.role === "cantus" ? style.getPropertyValue("--cf") : style.getPropertyValue("--a");
    let t = 0;
    v.pitches.forEach((p, i) => {
      const d = v.durations[i];
      if (p !== null) {
        const x = left + (t / total) * (W - left), w = (d / total) * (W - left);
        ctx.fillRect(x + 1, (hi - p) * row + 1, Math.max(w - 2, 1), Math.max(row - 2, 2));
      }
      t += d;
    });
  }
}

// ------------------------------------------------------------------ sound

function stop() {
  for (const o of playing) { try { o.stop(); } catch (e) { /* already stopped */ } }
  playing = [];
}

function play(voices) {
  stop();
  audio = audio || new (window.AudioContext || window.webkitAudioContext)();
  const t0 = audio.currentTime + 0.05;
  for (const v of voices) {
    let t = 0;
    v.pitches.forEach((p, i) => {
      const d = v.durations[i] * SECONDS_PER_QUARTER;
      if (p !== null) {
        const osc = audio.createOscillator(), gain = audio.createGain();
        osc.type = "triangle";
        osc.frequency.value = 440 * Math.pow(2, (p - 69) / 12);
        gain.gain.setValueAtTime(0, t0 + t);
        gain.gain.linearRampToValueAtTime(0.18, t0 + t + 0.02);
        gain.gain.setTargetAtTime(0.0, t0 + t + d * 0.8, 0.05);
        osc.connect(gain).connect(audio.destination);
        osc.start(t0 + t);
        osc.stop(t0 + t + d);
        playing.push(osc);
      }
      t += d;
    });
  }
}

// ------------------------------------------------------------------ pairs

function render(pair, label) {
  stop();
  current = pair;
  $("main").hidden = false;
  $("done").hidden = true;
  $("prompt").textContent = pair.prompt;
  const music = !!(pair.a.notes && pair.b.notes);
  $("legend").hidden = !music || pair.a.notes.length < 2;
  const [lo, hi] = music ? pitchRange(pair) : [0, 0];
  for (const key of ["a", "b"]) {
    const side = pair[key];
    $(`text-${key}`).textContent = side.text;
    $(`roll-${key}`).hidden = !music;
    $(`play-${key}`).hidden = !music;
    if (music) drawRoll($(`roll-${key}`), side.notes, lo, hi);
  }
  for (const b of document.querySelectorAll("button.choice")) {
    b.classList.toggle("current", !!label && b.dataset.choice === label.choice);
  }
  document.body.dataset.pairId = pair.pair_id;
}

function finished(progress) {
  current = null;
  stop();
  $("main").hidden = true;
  $("done").hidden = false;
  $("done").textContent = `All ${progress.total} pairs are labelled (${progress.skipped} skipped). Thank you!`;
  document.body.dataset.pairId = "";
}

async function loadNext() {
  const data = await api(`api/next?rater=${encodeURIComponent(rater)}`);
  showProgress(data.progress);
  if (data.pair) render(data.pair, null); else finished(data.progress);
}

async function choose(choice) {
  if (!current || busy) return;
  setBusy(true);
  const pairId = current.pair_id;
  try {
    await api("api/labels", { method: "POST", body: JSON.stringify({ pair_id: pairId, rater, choice }) });
    history.push(pairId);
    status(`Saved: ${choice === "skip" ? "skipped" : choice === "tie" ? "tie" : choice + " is better"}.`);
    await loadNext();
  } catch (e) {
    status(`Not saved (${e.message}). Try again.`, true);
  } finally {
    setBusy(false);
  }
}

async function back() {
  if (busy || !history.length) return;
  setBusy(true);
  try {
    const id = history.pop();
    const data = await api(`api/pairs/${encodeURIComponent(id)}?rater=${encodeURIComponent(rater)}`);
    render(data.pair, data.label);
    showProgress(data.progress);
    status("Back: choose again to change this label.");
  } catch (e) {
    status(e.message, true);
  } finally {
    setBusy(false);
  }
}

async function start() {
  const name = $("rater").value.trim();
  if (!RATER_RE.test(name)) {
    status("Enter your name: 1-64 letters, digits or _ . @ + -", true);
    return;
  }
  if (busy) return;
  rater = name;
  localStorage.setItem("rlhf-rater", rater);
  history = [];
  setBusy(true);
  try {
    await loadNext();
    status(`Labelling as ${rater}. Keys: A, B, T (tie), S (skip), U (back).`);
  } catch (e) {
    status(e.message, true);
  } finally {
    setBusy(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("rater").value = localStorage.getItem("rlhf-rater") || "";
  $("start").addEventListener("click", start);
  $("rater").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
  for (const b of document.querySelectorAll("button.choice")) b.addEventListener("click", () => choose(b.dataset.choice));
  $("btn-back").addEventListener("click", back);
  $("play-a").addEventListener("click", () => current && play(current.a.notes));
  $("play-b").addEventListener("click", () => current && play(current.b.notes));
  document.addEventListener("keydown", (e) => {
    if (e.target instanceof HTMLInputElement || e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const k = e.key.toLowerCase();
    const map = { a: "A", b: "B", t: "tie", s: "skip" };
    if (map[k]) { e.preventDefault(); choose(map[k]); } else if (k === "u") { e.preventDefault(); back(); }
  });
  if ($("rater").value) start();
});
