// vlsearch search page: plain JavaScript, no build step. Talks to the JSON API under /api.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { collections: {}, terms: [], filters: [], nextOffset: null, loading: false, token: null, seq: 0 };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { const body = await response.json(); message = body.error || message; } catch (e) { /* not JSON */ }
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return response;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) { $("status").textContent = text; }

function itemUrl(id, what, size) {
  const c = encodeURIComponent($("collection").value);
  const base = "/api/collections/" + c + "/items/" + encodeURIComponent(id) + "/" + what;
  return size ? base + "?size=" + size : base;
}

// Images: a plain src without a token; fetched with the Authorization header (blob URL) with one.
async function loadImage(img, url) {
  if (!state.token) { img.src = url; return; }
  try {
    const blob = await (await api(url)).blob();
    img.src = URL.createObjectURL(blob);
  } catch (e) { img.alt = "(image unavailable: " + e.message + ")"; }
}

async function openImage(event, url) {
  if (!state.token) return;  // the link opens the image itself
  event.preventDefault();
  const blob = await (await api(url)).blob();
  window.open(URL.createObjectURL(blob), "_blank", "noopener");
}

async function loadCollections() {
  showError("");
  let list;
  try {
    list = await (await api("/api/collections")).json();
  } catch (e) {
    if (e.status === 401) { $("token-row").hidden = false; $("token").focus(); }
    showError("Cannot list collections: " + e.message);
    return;
  }
  const select = $("collection");
  select.replaceChildren();
  for (const c of list) {
    state.collections[c.name] = c;
    const option = document.createElement("option");
    option.value = c.name;
    option.textContent = c.name + " (" + c.images.toLocaleString() + " images)";
    select.appendChild(option);
  }
  collectionChanged();
}

function collectionChanged() {
  const c = state.collections[$("collection").value];
  if (!c) return;
  const index = c.index ? c.index.factory : "no index: exact search only";
  $("collection-info").textContent = c.model.name + " · " + index;
  const exact = document.querySelector("input[name=engine][value=exact]");
  const ann = document.querySelector("input[name=engine][value=ann]");
  ann.disabled = !c.index;
  if (!c.index) exact.checked = true;
  $("where").disabled = !c.filters;
  $("where-help").textContent = c.filters ? "" : "Filters are not supported by this collection yet.";
  const single = (name) => !isListColumn(name);  // a list has no single value to sort or group by
  fillSelect($("order-by"), (Array.isArray(c.columns) ? c.columns : []).filter(single), "relevance");
  fillSelect($("group-by"), facetColumns().filter(single), "none");
  state.filters = [];  // facet filters name this collection's columns
  renderFilters();
  renderFacets(null);
}

// A select of column names after its first option ("relevance"/"none"), keeping the choice if still there.
function fillSelect(select, names, first) {
  const kept = select.value;
  const none = document.createElement("option");
  none.value = "";
  none.textContent = first;
  select.replaceChildren(none);
  for (const name of names) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.appendChild(option);
  }
  select.value = names.includes(kept) ? kept : "";
}

function setDirection(descending) {
  const button = $("order-dir");
  button.setAttribute("aria-pressed", descending ? "true" : "false");
  button.textContent = descending ? "↓ largest first" : "↑ smallest first";
}

// ---- the current query: a list of weighted terms ------------------------------------------------
// The typed words (or a photo) are a term of weight 1; "more like this" on a hit adds the item with
// weight +1, "less like this" with weight -0.5 (again on the same item: the weights add up). The
// server searches the normalised weighted sum of the normalised term embeddings and leaves the
// items themselves out of the hits (see the `terms` field of POST /api/collections/{name}/search).
const MORE_WEIGHT = 1;
const LESS_WEIGHT = -0.5;

function sameTerm(a, b) { return a.kind === "id" && b.kind === "id" && a.id === b.id; }

function steer(hit, label, weight) {
  const terms = state.terms.slice();
  const term = { kind: "id", id: hit.id, label: label, weight: weight };
  const i = terms.findIndex((t) => sameTerm(t, term));
  if (i < 0) terms.push(term);
  else if (Math.abs(terms[i].weight + weight) < 1e-9) terms.splice(i, 1);
  else terms[i] = Object.assign({}, terms[i], { weight: terms[i].weight + weight });
  runTerms(terms);
  $("results").focus();
}

function removeTerm(index) {
  const terms = state.terms.slice();
  terms.splice(index, 1);
  runTerms(terms);
}

function runTerms(terms) {
  if (!terms.some((t) => t.weight > 0)) {
    state.terms = terms;
    describeQuery();
    state.seq++;  // an answer still on its way is stale
    $("results").replaceChildren();
    $("more").hidden = true;
    state.nextOffset = null;
    renderFacets(null);
    setStatus(terms.length ? "Add words, a photo or “more like this” to search: a query needs a positive term." : "");
    return;
  }
  search(terms, false);
}

function weightText(w) { return (w > 0 ? "+" : "−") + String(Math.abs(w)); }

function termLabel(term) {
  if (term.kind === "text") return "Words: " + term.text;
  if (term.kind === "image") return "Pictures like your photo " + (term.file.name || "");
  return (term.weight > 0 ? "More like: " : "Less like: ") + term.label;
}

function describeQuery() {
  const info = $("query-info");
  info.replaceChildren();
  info.hidden = state.terms.length === 0;
  state.terms.forEach((term, index) => {
    const chip = document.createElement("span");
    chip.className = "chip " + (term.weight > 0 ? "plus" : "minus");
    chip.dataset.kind = term.kind;
    if (term.kind === "id") chip.dataset.id = term.id;
    if (term.kind !== "text") {
      const img = document.createElement("img");
      img.alt = "";
      if (term.kind === "image") img.src = URL.createObjectURL(term.file);
      else loadImage(img, itemUrl(term.id, "thumbnail", 128));
      chip.appendChild(img);
    }
    const text = document.createElement("span");
    text.className = "chip-label";
    text.textContent = termLabel(term);
    chip.appendChild(text);
    if (term.kind === "id") {
      const weight = document.createElement("span");
      weight.className = "weight";
      weight.textContent = weightText(term.weight);
      chip.appendChild(weight);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", "Remove " + termLabel(term));
    remove.addEventListener("click", () => removeTerm(index));
    chip.appendChild(remove);
    info.appendChild(chip);
  });
}

// ---- facet filters ------------------------------------------------------------------------------
function sqlString(value) { return "'" + String(value).replace(/'/g, "''") + "'"; }
function sqlName(name) { return '"' + String(name).replace(/"/g, '""') + '"'; }
// GLOB metacharacters (and the backslash) taken literally: each inside brackets.
function globLiteral(text) { return String(text).replace(/[\\*?[]/g, (c) => "[" + c + "]"); }

function isPseudoFolder(column) {
  const c = state.collections[$("collection").value];
  return column === "folder" && !!c && Array.isArray(c.columns) && !c.columns.includes("folder");
}

function isListColumn(column) {
  const c = state.collections[$("collection").value];
  return !!c && Array.isArray(c.list_columns) && c.list_columns.includes(column);
}

// The SQL condition "column = value" of a facet value (of a list column: "holds value"), names and
// strings quoted, never pasted.
function condition(column, value) {
  if (isPseudoFolder(column)) {  // the directory part of `path`
    if (value === "") return "NOT contains(path, '/')";
    const inside = globLiteral(value) + "/*";
    return "(path GLOB " + sqlString(inside) + " AND NOT path GLOB " + sqlString(inside + "/*") + ")";
  }
  const name = sqlName(column);
  if (value === null) return name + " IS NULL";
  if (isListColumn(column)) return "list_contains(" + name + ", " + sqlString(value) + ")";
  if (typeof value === "number" && Number.isFinite(value)) return name + " = " + String(value);
  if (typeof value === "boolean") return name + " = " + (value ? "TRUE" : "FALSE");
  return name + " = " + sqlString(value);
}

function valueText(value) { return value === null ? "(none)" : value === "" ? "(top level)" : String(value); }

function whereClause() {
  const parts = [];
  const typed = $("where").value.trim();
  if (typed && !$("where").disabled) parts.push(state.filters.length ? "(" + typed + ")" : typed);
  for (const f of state.filters) parts.push(condition(f.column, f.value));
  return parts.join(" AND ");
}

function addFilter(column, value) {
  if (state.filters.some((f) => f.column === column && f.value === value)) return;
  state.filters = state.filters.concat([{ column: column, value: value }]);
  renderFilters();
  if (state.terms.length) search(state.terms, false);
}

function removeFilter(index) {
  state.filters = state.filters.filter((_, i) => i !== index);
  renderFilters();
  if (state.terms.length) search(state.terms, false);
}

function renderFilters() {
  const box = $("filters");
  box.replaceChildren();
  box.hidden = state.filters.length === 0;
  state.filters.forEach((f, index) => {
    const chip = document.createElement("span");
    chip.className = "chip filter";
    chip.dataset.column = f.column;
    const label = f.column + ": " + valueText(f.value);
    chip.append(document.createTextNode(label));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", "Remove filter " + label);
    remove.addEventListener("click", () => removeFilter(index));
    chip.appendChild(remove);
    box.appendChild(chip);
  });
}

function facetColumns() {
  const c = state.collections[$("collection").value];
  return c && Array.isArray(c.facets) ? c.facets : [];
}

// The facet counts of the last answer, as buttons: a value seen in 2+ hits of a column with 2+ values.
function renderFacets(facets) {
  const panel = $("facets");
  const list = $("facet-list");
  list.replaceChildren();
  const active = new Set(state.filters.map((f) => f.column));
  for (const [column, values] of Object.entries(facets || {})) {
    if (active.has(column) || !values || values.length < 2) continue;
    const group = document.createElement("div");
    group.className = "facet";
    group.dataset.column = column;
    const title = document.createElement("h3");
    title.textContent = column;
    const items = document.createElement("ul");
    for (const { value, count } of values.slice(0, 12)) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = valueText(value) + " (" + count + ")";
      button.dataset.value = value === null ? "" : String(value);
      button.setAttribute("aria-label", "Only " + column + " " + valueText(value) + ", " + count + " matches");
      button.addEventListener("click", () => addFilter(column, value));
      li.appendChild(button);
      items.appendChild(li);
    }
    group.append(title, items);
    list.appendChild(group);
  }
  panel.hidden = list.children.length === 0;
}

// ---- requests -----------------------------------------------------------------------------------
function params() {
  const k = parseInt($("k").value, 10);
  const p = { k: Number.isFinite(k) ? k : 24,
    exact: document.querySelector("input[name=engine]:checked").value === "exact" };
  const where = whereClause();
  if (where) p.where = where;
  const cut = $("autocut").checked;
  if (cut) p.autocut = 1;
  const columns = facetColumns();
  if (columns.length) p.facets = columns;
  const order = $("order-by").value;
  if (order) p.order_by = order + ($("order-dir").getAttribute("aria-pressed") === "true" ? " DESC" : " ASC");
  const group = $("group-by").value;
  if (group) {
    p.group_by = group;
    const per = parseInt($("per-group").value, 10);
    if (Number.isFinite(per) && per > 1) p.per_group = per;
  }
  const min = parseFloat($("min-score").value);
  if ($("min-score").value.trim() !== "" && Number.isFinite(min)) p.min_score = min;
  if ($("dedup").checked) p.dedup = true;
  return p;
}

function textMode() { return $("match").value; }

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
    reader.onerror = () => reject(new Error("cannot read " + (file.name || "the photo")));
    reader.readAsDataURL(file);
  });
}

async function termBody(term) {
  if (term.kind === "text") return { text: term.text, weight: term.weight };
  if (term.kind === "image") return { image_base64: await readBase64(term.file), weight: term.weight };
  return { id: term.id, weight: term.weight };
}

async function request(terms, offset) {
  const c = encodeURIComponent($("collection").value);
  const p = Object.assign(params(), { offset: offset });
  const only = terms.length === 1 && terms[0].weight === 1 ? terms[0] : null;
  if (only && only.kind === "image") {
    const form = new FormData();
    form.append("file", only.file, only.file.name || "photo");
    for (const [key, value] of Object.entries(p)) {
      for (const v of Array.isArray(value) ? value : [value]) form.append(key, String(v));
    }
    return api("/api/collections/" + c + "/search/image", { method: "POST", body: form });
  }
  let body;
  if (only && only.kind === "text") {
    body = Object.assign(p, { text: only.text });
    if (textMode() !== "vector") body.mode = textMode();  // keyword and hybrid search the words alone
    const alpha = parseFloat($("alpha").value);
    if (textMode() === "hybrid" && $("alpha").value.trim() !== "" && Number.isFinite(alpha)) body.alpha = alpha;
  } else {
    body = Object.assign(p, { terms: await Promise.all(terms.map(termBody)) });
  }
  return api("/api/collections/" + c + "/search", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
}

function statusText(body, shown, ms, terms) {
  if (!shown) return `No results · ${ms.toFixed(0)} ms`;
  const words = terms.length === 1 && terms[0].kind === "text";
  const how = words && textMode() !== "vector" ? textMode() : body.exact ? "exact" : "approximate";
  const note = !words && textMode() !== "vector" ? "; steered queries search by meaning" : "";
  return `${shown} results · ${ms.toFixed(0)} ms (server ${body.took_ms.toFixed(1)} ms, ${how}${note})`;
}

async function search(terms, append) {
  if (append && (state.loading || state.nextOffset === null)) return;
  const seq = ++state.seq;  // a newer search makes this one's answer stale
  state.loading = true;
  const offset = append ? state.nextOffset : 0;
  $("more").disabled = true;
  showError("");
  if (!append) { state.terms = terms; describeQuery(); setStatus("Searching…"); }
  const started = performance.now();
  try {
    const body = await (await request(terms, offset)).json();
    if (seq !== state.seq) return;
    const ms = performance.now() - started;
    if (!append) { $("results").replaceChildren(); renderFacets(body.facets); }
    render(body.hits);
    state.nextOffset = body.next_offset;
    setStatus(statusText(body, $("results").children.length, ms, terms));
    $("more").hidden = state.nextOffset === null;
  } catch (e) {
    if (seq !== state.seq) return;
    showError(e.message);
    setStatus("Search failed.");
    if (!append) { $("results").replaceChildren(); $("more").hidden = true; state.nextOffset = null; }
  } finally {
    if (seq === state.seq) {
      state.loading = false;
      $("more").disabled = false;
    }
  }
}

function steerButton(text, title, label, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "steer";
  button.textContent = text;
  button.title = title;
  button.setAttribute("aria-label", title + ": " + label);
  button.addEventListener("click", onClick);
  return button;
}

// ---- photo details on a card: when and with what it was taken, its auto-tags -------------------
const MAX_TAGS = 5;

function takenAt(meta) {
  const iso = meta && meta.taken_at;
  const date = typeof iso === "string" ? new Date(iso) : null;
  if (!date || Number.isNaN(date.getTime())) return null;
  const time = document.createElement("time");
  time.className = "taken";
  time.dateTime = iso;
  time.title = iso;
  time.textContent = date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  return time;
}

function camera(meta) {
  const make = meta && typeof meta.camera_make === "string" ? meta.camera_make.trim() : "";
  const model = meta && typeof meta.camera_model === "string" ? meta.camera_model.trim() : "";
  if (!make && !model) return null;
  const span = document.createElement("span");
  span.className = "camera";
  // models often repeat the make ("Canon" + "Canon EOS R5"): say it once
  span.textContent = make && model.toLowerCase().startsWith(make.toLowerCase()) ? model : [make, model].join(" ").trim();
  return span;
}

// The hit's first tags as buttons (score in the tooltip); a click filters on the tag like a facet value.
function tagChips(meta) {
  const tags = meta && Array.isArray(meta.tags) ? meta.tags.filter((t) => typeof t === "string") : [];
  if (!tags.length) return null;
  const scores = Array.isArray(meta.tag_scores) ? meta.tag_scores : [];
  const list = document.createElement("div");  // not a list: "#results li" are the cards
  list.className = "tags";
  list.setAttribute("role", "group");
  list.setAttribute("aria-label", "Tags");
  tags.slice(0, MAX_TAGS).forEach((tag, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "tag";
    button.textContent = tag;
    button.dataset.tag = tag;
    const score = Number(scores[i]);
    if (scores[i] !== null && Number.isFinite(score)) button.title = "score " + score.toFixed(3);
    button.setAttribute("aria-label", "Only pictures tagged " + tag);
    button.addEventListener("click", () => addFilter("tags", tag));
    list.appendChild(button);
  });
  return list;
}

function render(hits) {
  const list = $("results");
  for (const hit of hits) {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.id = hit.id;
    const label = hit.caption || hit.path || hit.id;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.setAttribute("aria-label", "More like this: " + label);
    button.title = "More like this";
    button.addEventListener("click", () => steer(hit, label, MORE_WEIGHT));
    const img = document.createElement("img");
    img.alt = hit.caption || hit.path || "";
    img.loading = "lazy";
    img.width = 256;
    img.height = 256;
    loadImage(img, itemUrl(hit.id, "thumbnail", 256));
    button.appendChild(img);
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = "#" + hit.rank + " · " + hit.score.toFixed(3);
    const caption = document.createElement("span");
    caption.className = "caption";
    caption.textContent = hit.caption || "";
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = hit.path || "";
    const actions = document.createElement("div");
    actions.className = "actions";
    const open = document.createElement("a");
    const url = itemUrl(hit.id, "image");
    open.href = url;
    open.target = "_blank";
    open.rel = "noopener";
    open.textContent = "Open image";
    open.addEventListener("click", (event) => openImage(event, url).catch((e) => showError(e.message)));
    actions.append(
      steerButton("＋ More", "More like this", label, () => steer(hit, label, MORE_WEIGHT)),
      steerButton("− Less", "Less like this", label, () => steer(hit, label, LESS_WEIGHT)),
      open);
    const details = [takenAt(hit.metadata), camera(hit.metadata), tagChips(hit.metadata)].filter(Boolean);
    meta.append(score, caption, path, ...details, actions);
    li.append(button, meta);
    list.appendChild(li);
  }
}

function searchFile(file) {
  if (!file) return;
  search([{ kind: "image", file: file, weight: 1 }], false);
}

function init() {
  state.token = sessionStorage.getItem("vlsearch-token");
  state.terms = [];
  state.filters = [];
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (!text) { showError("Type some words to search for, or choose a photo."); $("query").focus(); return; }
    search([{ kind: "text", text: text, weight: 1 }], false);  // new words: a new query
  });
  $("collection").addEventListener("change", () => {
    collectionChanged();
    const kept = state.terms.filter((t) => t.kind !== "id");  // items belong to the other collection
    if (kept.length) search(kept, false); else runTerms([]);
  });
  const rerun = () => { if (state.terms.length) runTerms(state.terms); };
  $("match").addEventListener("change", () => { $("alpha-row").hidden = textMode() !== "hybrid"; rerun(); });
  $("autocut").addEventListener("change", rerun);
  $("dedup").addEventListener("change", rerun);
  for (const id of ["order-by", "group-by", "per-group", "min-score", "alpha"]) $(id).addEventListener("change", rerun);
  $("order-dir").addEventListener("click", () => {
    setDirection($("order-dir").getAttribute("aria-pressed") !== "true");
    if ($("order-by").value) rerun();
  });
  $("photo").addEventListener("change", (event) => { searchFile(event.target.files[0]); event.target.value = ""; });
  $("more").addEventListener("click", () => search(state.terms, true));
  $("token-save").addEventListener("click", () => {
    state.token = $("token").value.trim() || null;
    if (state.token) sessionStorage.setItem("vlsearch-token", state.token);
    $("token-row").hidden = true;
    loadCollections();
  });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; document.body.classList.remove("dragging"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    searchFile(e.dataTransfer && e.dataTransfer.files[0]);
  });
  if ("IntersectionObserver" in window) {
    new IntersectionObserver((entries) => {
      if (entries[0].isIntersecting && state.terms.length && state.nextOffset !== null && !state.loading) {
        search(state.terms, true);
      }
    }, { rootMargin: "400px" }).observe($("sentinel"));
  }
  loadCollections();
}

init();
