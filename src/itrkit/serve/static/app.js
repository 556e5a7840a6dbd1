// itrkit search page: vanilla JS, talks to the JSON API of the same server.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_QUERY = 500;
const TOKEN_KEY = "itrkit-token";
// A server started with --token answers 401 until the page sends "Authorization: Bearer <token>".
let token = sessionStorage.getItem(TOKEN_KEY) || "";

function authHeaders() {
  return token ? { Authorization: "Bearer " + token } : {};
}

// <img src> cannot carry a header: with a token, images come through fetch as blob URLs.
async function loadImage(img, url) {
  if (!token) {
    img.src = url;
    return;
  }
  try {
    const response = await fetch(url, { headers: authHeaders() });
    if (response.ok) img.src = URL.createObjectURL(await response.blob());
  } catch (err) {
    // leave the alt text showing
  }
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

// Build DOM nodes with textContent only: captions and ids never become HTML.
function card(result, rank) {
  const fig = document.createElement("figure");
  fig.className = "card";

  const img = document.createElement("img");
  loadImage(img, result.url);
  img.alt = result.captions.length ? result.captions[0] : result.id;
  img.loading = "lazy";
  fig.appendChild(img);

  const cap = document.createElement("figcaption");
  const meta = document.createElement("div");
  meta.className = "meta";
  const r = document.createElement("span");
  r.className = "rank";
  r.textContent = "#" + rank;
  const s = document.createElement("span");
  s.className = "score";
  s.textContent = result.score.toFixed(3);
  meta.append(r, s);
  cap.appendChild(meta);

  const id = document.createElement("div");
  id.className = "id";
  id.textContent = result.id;
  cap.appendChild(id);

  if (result.captions.length) {
    const ul = document.createElement("ul");
    for (const text of result.captions.slice(0, 3)) {
      const li = document.createElement("li");
      li.textContent = text;
      ul.appendChild(li);
    }
    cap.appendChild(ul);
  }
  fig.appendChild(cap);
  return fig;
}

function show(results, what) {
  const grid = $("results");
  grid.replaceChildren(...results.map((res, i) => card(res, i + 1)));
  setStatus(results.length ? `${results.length} results for ${what}` : `no results for ${what}`);
}

async function callApi(url, options, retried) {
  let response;
  const opts = Object.assign({}, options || {});
  opts.headers = Object.assign({}, opts.headers || {}, authHeaders());
  try {
    response = await fetch(url, opts);
  } catch (err) {
    throw new Error("the server cannot be reached");
  }
  if (response.status === 401 && !retried) {
    const given = window.prompt("This server needs an access token:");
    if (given && given.trim()) {
      token = given.trim();
      sessionStorage.setItem(TOKEN_KEY, token);
      return callApi(url, options, true);
    }
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    throw new Error((body && body.error) || `request failed (${response.status})`);
  }
  return body;
}

async function searchText(event) {
  event.preventDefault();
  const q = $("q").value.trim();
  if (!q) {
    setStatus("type a description to search for", true);
    return;
  }
  if (q.length > MAX_QUERY) {
    setStatus(`the query is too long (at most ${MAX_QUERY} characters)`, true);
    return;
  }
  const k = $("k").value;
  setStatus("searching…");
  $("search-button").disabled = true;
  try {
    const body = await callApi(`/api/search?q=${encodeURIComponent(q)}&k=${encodeURIComponent(k)}`);
    show(body.results, `“${q}”`);
  } catch (err) {
    $("results").replaceChildren();
    setStatus(err.message, true);
  } finally {
    $("search-button").disabled = false;
  }
}

async function searchPhoto(event) {
  event.preventDefault();
  const file = $("photo").files[0];
  if (!file) {
    setStatus("choose a photo first", true);
    return;
  }
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value);
  form.append("mode", $("mode").value);
  setStatus("searching by photo…");
  $("photo-button").disabled = true;
  try {
    const body = await callApi("/api/search/image", { method: "POST", body: form });
    show(body.results, file.name);
  } catch (err) {
    $("results").replaceChildren();
    setStatus(err.message, true);
  } finally {
    $("photo-button").disabled = false;
  }
}

async function loadInfo() {
  try {
    const h = await callApi("/api/health");
    $("info").textContent = `${h.images} images, ${h.captions} captions · ${h.backend} index`;
    const imageOption = $("mode").querySelector('option[value="image"]');
    const captionOption = $("mode").querySelector('option[value="caption"]');
    imageOption.disabled = !h.image_search;
    captionOption.disabled = !h.caption_search;
    if (!h.image_search && h.caption_search) $("mode").value = "caption";
    if (!h.image_search && !h.caption_search) $("photo-button").disabled = true;
  } catch (err) {
    $("info").textContent = "index information unavailable: " + err.message;
  }
}

$("text-form").addEventListener("submit", searchText);
$("photo-form").addEventListener("submit", searchPhoto);
loadInfo();
