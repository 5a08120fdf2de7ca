// retclip web page: segment via POST /segment, re-score via POST /rescore (no model pass),
// teach a class via POST /databases/{name}/rows. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, resultId: null, segments: [], pixels: null, width: 0, seq: 0 };

function setStatus(element, text, isError = false) {
  element.textContent = text;
  element.classList.toggle("error", isError);
}

async function callApi(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = { error: `HTTP ${response.status}` };
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function loadOptions() {
  const models = await callApi("/models");
  for (const [key, select] of [["backbones", $("backbone")], ["proposers", $("proposer")]]) {
    select.replaceChildren(...models[key].map((m) => new Option(m.name, m.name, m.default, m.default)));
  }
  await loadDatabases();
}

async function loadDatabases() {
  const select = $("db");
  const chosen = select.value;
  const listed = await callApi("/databases");
  select.replaceChildren(new Option("none (CLIP only)", ""));
  for (const db of listed.databases) {
    if (db.error) continue;
    select.append(new Option(`${db.name} (${db.rows} rows)`, db.name));
  }
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
}

function pickFile(file) {
  if (!file) return;
  state.file = file;
  $("image-name").textContent = file.name;
}

function showResult(result) {
  state.resultId = result.result_id;
  state.segments = result.segments;
  const overlay = $("overlay");
  overlay.src = `data:image/png;base64,${result.overlay_png}`;
  overlay.dataset.resultId = result.result_id;
  const legend = $("legend");
  const byLabel = new Map();
  for (const segment of result.segments) {
    const seen = byLabel.get(segment.category_name);
    if (!seen) byLabel.set(segment.category_name, { color: segment.color, count: 1, best: segment.score });
    else { seen.count += 1; seen.best = Math.max(seen.best, segment.score); }
  }
  legend.replaceChildren(...[...byLabel.entries()].map(([label, entry]) => {
    const item = document.createElement("li");
    item.className = "legend-item";
    item.dataset.label = label;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = entry.color;
    const text = document.createElement("span");
    text.className = "legend-label";
    text.textContent = label;
    const detail = document.createElement("span");
    detail.className = "hint";
    detail.textContent = `×${entry.count}, best ${entry.best.toFixed(2)}`;
    item.append(swatch, text, detail);
    return item;
  }));
  const image = new Image();
  image.onload = () => {
    const canvas = $("panoptic");
    canvas.width = image.width;
    canvas.height = image.height;
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(image, 0, 0);
    state.pixels = context.getImageData(0, 0, image.width, image.height).data;
    state.width = image.width;
  };
  image.src = `data:image/png;base64,${result.panoptic_png}`;
  $("hover-label").textContent = "";
}

async function segment() {
  if (!state.file) { setStatus($("status"), "pick an image first", true); return; }
  const form = new FormData();
  form.append("image", state.file);
  const vocab = $("vocab").value;
  if (vocab) form.append("vocab", vocab);
  else form.append("classes", $("classes").value);
  for (const key of ["backbone", "proposer", "db"]) form.append(key, $(key).value);
  form.append("alpha", $("alpha").value);
  form.append("beta", $("beta").value);
  form.append("gamma", $("gamma").value);
  form.append("score_threshold", $("threshold").value);
  const seq = ++state.seq;
  document.body.dataset.busy = "1";
  setStatus($("status"), "segmenting…");
  try {
    const result = await callApi("/segment", { method: "POST", body: form });
    if (seq !== state.seq) return;
    showResult(result);
    const note = result.has_retrieval ? "" : " — no database: retrieval scores are 0";
    setStatus($("status"), `${result.segments.length} segments${note}`);
  } catch (error) {
    if (seq === state.seq) setStatus($("status"), error.message, true);
  } finally {
    if (seq === state.seq) document.body.dataset.busy = "";
  }
}

async function rescore() {
  if (!state.resultId) return;
  const body = {
    result_id: state.resultId,
    alpha: Number($("alpha").value),
    beta: Number($("beta").value),
    gamma: Number($("gamma").value),
    score_threshold: Number($("threshold").value),
  };
  const seq = ++state.seq;
  document.body.dataset.busy = "1";
  try {
    const result = await callApi("/rescore", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (seq !== state.seq) return;
    showResult(result);
    document.body.dataset.rescores = String(Number(document.body.dataset.rescores || 0) + 1);
    setStatus($("status"), `${result.segments.length} segments (re-scored, γ = ${body.gamma})`);
  } catch (error) {
    if (seq === state.seq) setStatus($("status"), error.message, true);
  } finally {
    if (seq === state.seq) document.body.dataset.busy = "";
  }
}

let timer = null;
function scheduleRescore() {
  clearTimeout(timer);
  timer = setTimeout(rescore, 120);
}

function syncOutputs() {
  for (const id of ["gamma", "alpha", "beta", "threshold"]) {
    $(`${id}-value`).textContent = Number($(id).value).toFixed(2);
  }
}

function labelAt(event) {
  if (!state.pixels) return "";
  const overlay = $("overlay");
  const box = overlay.getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * state.width);
  const height = state.pixels.length / 4 / state.width;
  const y = Math.floor(((event.clientY - box.top) / box.height) * height);
  if (x < 0 || y < 0 || x >= state.width || y >= height) return "";
  const offset = (y * state.width + x) * 4;
  const id = state.pixels[offset] + 256 * state.pixels[offset + 1] + 65536 * state.pixels[offset + 2];
  const segment = state.segments.find((s) => s.id === id);
  return segment ? `${segment.category_name} (${segment.score.toFixed(2)})` : id === 0 ? "void" : "";
}

async function teach() {
  const status = $("add-status");
  const files = $("add-images").files;
  const name = $("add-db").value.trim();
  const label = $("add-label").value.trim();
  if (!name || !label || files.length === 0) {
    setStatus(status, "give a database name, a class and at least one example image", true);
    return;
  }
  const form = new FormData();
  for (const file of files) form.append("images", file);
  form.append("labels", label);
  form.append("backbone", $("backbone").value);
  const headers = {};
  const token = $("add-token").value;
  if (token) headers.Authorization = `Bearer ${token}`;
  setStatus(status, "adding…");
  try {
    const result = await callApi(`/databases/${encodeURIComponent(name)}/rows`, {
      method: "POST", body: form, headers,
    });
    const rows = result.database.rows_per_class[label] || 0;
    setStatus(status, `added ${result.added_rows} rows: ${label} has ${rows} rows in ${name}`);
    await loadDatabases();
    $("db").value = name;
  } catch (error) {
    setStatus(status, error.message, true);
  }
}

function init() {
  const drop = $("drop");
  $("image-input").addEventListener("change", (event) => pickFile(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    pickFile(event.dataTransfer.files[0]);
  });
  $("segment-btn").addEventListener("click", segment);
  $("classes").addEventListener("keydown", (event) => { if (event.key === "Enter") segment(); });
  for (const id of ["gamma", "alpha", "beta", "threshold"]) {
    $(id).addEventListener("input", () => {
      syncOutputs();
      if (id === "gamma") {
        const match = [...document.querySelectorAll("input[name=mode]")]
          .find((radio) => Number(radio.value) === Number($("gamma").value));
        for (const radio of document.querySelectorAll("input[name=mode]")) radio.checked = radio === match;
      }
      scheduleRescore();
    });
  }
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => {
      $("gamma").value = radio.value;
      syncOutputs();
      scheduleRescore();
    });
  }
  $("overlay").addEventListener("mousemove", (event) => { $("hover-label").textContent = labelAt(event); });
  $("add-btn").addEventListener("click", teach);
  syncOutputs();
  loadOptions().catch((error) => setStatus($("status"), error.message, true));
}

init();
