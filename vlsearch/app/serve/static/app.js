// vlsearch search page: plain JavaScript, no build step. Talks to the JSON API under /api.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { collections: {}, query: null, offset: 0, nextOffset: null, loading: false, token: null, seq: 0 };

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
  const exact = document.querySelector("input[name=mode][value=exact]");
  const ann = document.querySelector("input[name=mode][value=ann]");
  ann.disabled = !c.index;
  if (!c.index) exact.checked = true;
  $("where").disabled = !c.filters;
  $("where-help").textContent = c.filters ? "" : "Filters are not supported by this collection yet.";
}

function params() {
  const k = parseInt($("k").value, 10);
  const p = { k: Number.isFinite(k) ? k : 24, exact: document.querySelector("input[name=mode]:checked").value === "exact" };
  const where = $("where").value.trim();
  if (where && !$("where").disabled) p.where = where;
  return p;
}

function request(query, offset) {
  const c = encodeURIComponent($("collection").value);
  const p = Object.assign(params(), { offset: offset });
  if (query.kind === "image") {
    const form = new FormData();
    form.append("file", query.file, query.file.name || "photo");
    for (const [key, value] of Object.entries(p)) form.append(key, String(value));
    return api("/api/collections/" + c + "/search/image", { method: "POST", body: form });
  }
  const body = Object.assign(p, query.kind === "text" ? { text: query.text } : { id: query.id });
  return api("/api/collections/" + c + "/search", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
}

async function search(query, append) {
  if (append && (state.loading || state.nextOffset === null)) return;
  const seq = ++state.seq;  // a newer search makes this one's answer stale
  state.loading = true;
  const offset = append ? state.nextOffset : 0;
  $("more").disabled = true;
  showError("");
  if (!append) { state.query = query; describeQuery(query); setStatus("Searching…"); }
  const started = performance.now();
  try {
    const body = await (await request(query, offset)).json();
    if (seq !== state.seq) return;
    const ms = performance.now() - started;
    if (!append) $("results").replaceChildren();
    render(body.hits);
    state.nextOffset = body.next_offset;
    const shown = $("results").children.length;
    setStatus(shown ? `${shown} results · ${ms.toFixed(0)} ms (server ${body.took_ms.toFixed(1)} ms, ` +
      `${body.exact ? "exact" : "approximate"})` : `No results · ${ms.toFixed(0)} ms`);
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

function describeQuery(query) {
  const info = $("query-info");
  info.replaceChildren();
  info.hidden = query.kind === "text";
  if (query.kind === "image") {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(query.file);
    img.alt = "your photo";
    info.append(img, document.createTextNode("Pictures like your photo " + (query.file.name || "")));
  } else if (query.kind === "id") {
    const img = document.createElement("img");
    img.alt = query.label;
    loadImage(img, itemUrl(query.id, "thumbnail", 128));
    info.append(img, document.createTextNode("More like: " + query.label));
  }
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
    button.addEventListener("click", () => {
      search({ kind: "id", id: hit.id, label: label }, false);
      $("results").focus();
    });
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
    const open = document.createElement("a");
    const url = itemUrl(hit.id, "image");
    open.href = url;
    open.target = "_blank";
    open.rel = "noopener";
    open.textContent = "Open image";
    open.addEventListener("click", (event) => openImage(event, url).catch((e) => showError(e.message)));
    meta.append(score, caption, path, open);
    li.append(button, meta);
    list.appendChild(li);
  }
}

function searchFile(file) {
  if (!file) return;
  search({ kind: "image", file: file }, false);
}

function init() {
  state.token = sessionStorage.getItem("vlsearch-token");
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (!text) { showError("Type some words to search for, or choose a photo."); $("query").focus(); return; }
    search({ kind: "text", text: text }, false);
  });
  $("collection").addEventListener("change", () => {
    collectionChanged();
    if (state.query && state.query.kind !== "id") search(state.query, false);
  });
  $("photo").addEventListener("change", (event) => { searchFile(event.target.files[0]); event.target.value = ""; });
  $("more").addEventListener("click", () => search(state.query, true));
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
      if (entries[0].isIntersecting && state.query && state.nextOffset !== null && !state.loading) {
        search(state.query, true);
      }
    }, { rootMargin: "400px" }).observe($("sentinel"));
  }
  loadCollections();
}

init();
