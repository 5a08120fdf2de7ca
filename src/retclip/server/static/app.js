// retclip web page: segment via POST /segment, re-score via POST /rescore (no model pass),
// teach a class via POST /databases/{name}/rows. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  file: null, resultId: null, segments: [], pixels: null, width: 0, height: 0, seq: 0,
  defaultDb: null, selected: null,
};

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
  state.defaultDb = models.default_database;
  await loadDatabases();
  // the server's own database (the toy world): selected, with its labels as the vocabulary, so
  // the first segmentation already compares CLIP only, retrieval only and RetCLIP
  if (state.defaultDb && [...$("db").options].some((o) => o.value === state.defaultDb)) {
    $("db").value = state.defaultDb;
    if (!$("classes").value.trim()) $("vocab").value = "db";
  }
  document.body.dataset.ready = "1";
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
  state.width = result.width;
  state.height = result.height;
  renderLabels();
  renderCompare(result.compare);
  const still = state.segments.find((s) => s.id === state.selected);
  if (still) showSegment(still); else hideSegment();
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
  form.append("compare", "true");
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
    compare: true,
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

function shortName(name) {
  return name.split(",")[0].trim();
}

function segmentAt(event) {
  // the segment id under the pointer, read from the panoptic PNG (null: outside the image)
  if (!state.pixels) return null;
  const box = $("overlay").getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * state.width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * state.height);
  if (x < 0 || y < 0 || x >= state.width || y >= state.height) return null;
  const offset = (y * state.width + x) * 4;
  return state.pixels[offset] + 256 * state.pixels[offset + 1] + 65536 * state.pixels[offset + 2];
}

function labelAt(event) {
  const id = segmentAt(event);
  if (id === null) return "";
  const segment = state.segments.find((s) => s.id === id);
  return segment ? `${segment.category_name} (${segment.score.toFixed(2)})` : id === 0 ? "void" : "";
}

function renderLabels() {
  // one small label per segment at its interior point, positioned in % of the image, so it
  // stays put and readable whatever the zoom; the overlay itself carries no text
  const layer = $("labels");
  layer.replaceChildren(...state.segments.map((segment) => {
    const label = document.createElement("span");
    const [x, y] = segment.label_point;
    label.style.left = `${((x + 0.5) / state.width) * 100}%`;
    label.style.top = `${((y + 0.5) / state.height) * 100}%`;
    label.style.borderLeftColor = segment.color;
    label.textContent = shortName(segment.category_name);
    label.dataset.segment = String(segment.id);
    label.classList.toggle("selected", segment.id === state.selected);
    return label;
  }));
  layer.classList.toggle("hidden", !$("show-labels").checked);
}

function renderCompare(compare) {
  const box = $("compare");
  if (!compare) { box.hidden = true; return; }
  const gamma = Number($("gamma").value);
  $("compare-row").replaceChildren(...compare.map((mode) => {
    const figure = document.createElement("figure");
    figure.dataset.mode = mode.mode;
    figure.classList.toggle("active", Math.abs(mode.gamma - gamma) < 1e-9);
    const image = document.createElement("img");
    image.src = `data:image/png;base64,${mode.overlay_png}`;
    image.alt = mode.title;
    const caption = document.createElement("figcaption");
    const found = mode.classes.map((c) => `${shortName(c.name)}${c.segments > 1 ? ` ×${c.segments}` : ""}`);
    const title = document.createElement("strong");
    title.textContent = `${mode.title} (γ = ${mode.gamma})`;
    caption.append(title, document.createElement("br"), found.join(", ") || "nothing");
    figure.append(image, caption);
    figure.addEventListener("click", () => {
      $("gamma").value = String(mode.gamma);
      $("gamma").dispatchEvent(new Event("input"));
    });
    return figure;
  }));
  box.hidden = false;
}

function fmt(value) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(3);
}

function showSegment(segment) {
  state.selected = segment.id;
  const panel = $("segment-panel");
  $("segment-title").textContent =
    `${segment.category_name} — segment ${segment.id}, ${segment.area} pixels, ${segment.isthing ? "thing" : "stuff"}`;
  const rows = [["final score", segment.score], ["s_clip (CLIP text)", segment.s_clip],
    ["s_ret (retrieval)", segment.s_ret], ["s_iv (in-vocabulary)", segment.s_iv]];
  $("segment-scores").replaceChildren(...rows.map(([name, value]) => {
    const row = document.createElement("tr");
    const key = document.createElement("td");
    key.textContent = name;
    const cell = document.createElement("td");
    cell.textContent = fmt(value);
    row.append(key, cell);
    return row;
  }));
  const neighbours = segment.neighbours || [];
  $("neighbours-empty").hidden = neighbours.length > 0;
  $("neighbours").replaceChildren(...neighbours.map((n) => {
    const item = document.createElement("li");
    item.className = "neighbour";
    const label = document.createElement("span");
    label.className = "neighbour-label";
    label.textContent = n.label;
    label.classList.toggle("match", n.label === segment.category_name);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(0, n.similarity) * 8}rem`;
    const value = document.createElement("span");
    value.className = "neighbour-similarity";
    value.textContent = n.similarity.toFixed(3);
    const source = document.createElement("span");
    source.className = "hint";
    source.textContent = ` ${n.source}${n.database === 1 ? " (fallback)" : ""}`;
    item.append(label, bar, value, source);
    return item;
  }));
  panel.hidden = false;
  panel.dataset.segment = String(segment.id);
  for (const label of $("labels").children) {
    label.classList.toggle("selected", label.dataset.segment === String(segment.id));
  }
}

function hideSegment() {
  state.selected = null;
  $("segment-panel").hidden = true;
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
  const tooltip = $("tooltip");
  $("overlay").addEventListener("mousemove", (event) => {
    const text = labelAt(event);
    $("hover-label").textContent = text;
    const box = $("viewer").getBoundingClientRect();
    tooltip.textContent = text;
    tooltip.hidden = !text;
    tooltip.style.left = `${event.clientX - box.left}px`;
    tooltip.style.top = `${event.clientY - box.top}px`;
  });
  $("overlay").addEventListener("mouseleave", () => { tooltip.hidden = true; });
  $("overlay").addEventListener("click", (event) => {
    const id = segmentAt(event);
    const segment = state.segments.find((s) => s.id === id);
    if (segment) showSegment(segment); else hideSegment();
  });
  $("show-labels").addEventListener("change", renderLabels);
  $("add-btn").addEventListener("click", teach);
  syncOutputs();
  loadOptions().catch((error) => setStatus($("status"), error.message, true));
}

init();
