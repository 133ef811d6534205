// openedits playground: the page's behaviour. Speaks only the public wire contract
// (POST /midjourney/edits with async, POST /midjourney/tasks), like any other client.
"use strict";

(() => {
  const TOKEN_KEY = "openedits.token";
  const $ = (id) => document.getElementById(id);

  const state = {
    imageUrl: null,     // what goes up as image_url: the file's data: URI, or the URL as typed
    width: 0,
    height: 0,
    tool: "brush",
    painting: false,
    last: null,
    painted: false,     // whether any mask pixel was ever drawn (cheap check before export)
    taskId: null,
    polling: null,
  };

  const mask = $("mask");
  const ctx = mask.getContext("2d", { willReadFrequently: true });
  const MASK_COLOR = "rgba(255, 48, 96, 1)"; // shown through the canvas' CSS opacity

  // ---- talking to the server -------------------------------------------------------------

  function token() {
    return localStorage.getItem(TOKEN_KEY) || "";
  }

  // Every failure becomes one readable line: the envelope's code and message, and its
  // trace id so a user can quote it to the operator.
  class ApiError extends Error {
    constructor(status, code, message, traceId) {
      super(message);
      this.status = status;
      this.code = code;
      this.traceId = traceId;
    }
    toString() {
      const trace = this.traceId ? ` (trace ${this.traceId})` : "";
      return `${this.code}: ${this.message}${trace}`;
    }
  }

  async function api(path, body) {
    let response;
    try {
      response = await fetch(path, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          accept: "application/json",
          authorization: `Bearer ${token()}`,
        },
        body: JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, "network", `cannot reach the server (${err.message})`, null);
    }
    let data = null;
    const text = await response.text();
    try {
      data = text ? JSON.parse(text) : {};
    } catch (_) {
      data = null;
    }
    if (!response.ok || (data && data.success === false && data.error)) {
      const err = (data && data.error) || {};
      const code = err.code || `http_${response.status}`;
      let message = err.message || (text ? text.slice(0, 200) : response.statusText);
      if (response.status === 401) message += ". Check the API token at the top right.";
      if (response.status === 429) {
        const wait = response.headers.get("retry-after");
        if (wait) message += ` Try again in ${wait}s.`;
      }
      throw new ApiError(response.status, code, message, (data && data.trace_id) || response.headers.get("x-trace-id"));
    }
    if (data === null) throw new ApiError(response.status, "invalid_response", "the server did not answer JSON", null);
    return data;
  }

  function showError(err) {
    const box = $("error");
    box.textContent = String(err);
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function setProgress(percent) {
    const value = Math.max(0, Math.min(100, Math.round(percent)));
    $("progress-bar").style.width = `${value}%`;
    $("progress-bar").textContent = value ? `${value}%` : "";
  }

  // ---- token ------------------------------------------------------------------------------

  function initToken() {
    $("token").value = token();
    $("token-state").textContent = token() ? "saved" : "needed";
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      localStorage.setItem(TOKEN_KEY, $("token").value.trim());
      $("token-state").textContent = token() ? "saved" : "needed";
      clearError();
      refreshRecent();
    });
  }

  async function showServerInfo() {
    try {
      const response = await fetch("/healthz");
      const info = await response.json();
      const engine = info.engine && info.engine.name ? ` · engine ${info.engine.name}` : "";
      $("server-info").textContent = `v${info.version || "?"}${engine}`;
    } catch (_) {
      $("server-info").textContent = "";
    }
  }

  // ---- image loading ------------------------------------------------------------------------

  function loadImage(src, imageUrl, label) {
    clearError();
    const img = $("image");
    img.onload = () => {
      state.imageUrl = imageUrl;
      state.width = img.naturalWidth;
      state.height = img.naturalHeight;
      // The mask canvas has the image's own pixel size, so the exported mask matches it
      // exactly; CSS scales both together for display.
      mask.width = state.width;
      mask.height = state.height;
      clearMask();
      $("canvas-wrap").hidden = false;
      $("stage").classList.remove("empty");
      fitImage();
      $("image-info").textContent = `${label} · ${state.width}×${state.height}`;
    };
    img.onerror = () => showError(`could not load the image from ${label}`);
    img.src = src;
  }

  // Show the image as large as the stage allows (small images too, so they are easy to paint
  // on); the mask canvas follows the image's box through CSS.
  function fitImage() {
    if (!state.width) return;
    const stage = $("stage");
    const style = getComputedStyle(stage);
    const room = stage.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const maxHeight = Math.max(240, window.innerHeight - 190);
    const fit = Math.min(room / state.width, maxHeight / state.height, 4);
    const img = $("image");
    img.style.width = `${Math.floor(state.width * fit)}px`;
    img.style.height = `${Math.floor(state.height * fit)}px`;
  }

  function initLoaders() {
    window.addEventListener("resize", fitImage);
    $("file-input").addEventListener("change", () => {
      const file = $("file-input").files[0];
      if (!file) return;
      const reader = new FileReader();
      reader.onload = () => loadImage(reader.result, reader.result, file.name);
      reader.onerror = () => showError(`could not read ${file.name}`);
      reader.readAsDataURL(file);
    });
    $("url-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const url = $("url-input").value.trim();
      if (!/^https?:\/\//i.test(url)) {
        showError("enter an http(s) URL of an image");
        return;
      }
      loadImage(url, url, url);
    });
  }

  // ---- mask painting ------------------------------------------------------------------------

  function clearMask() {
    ctx.clearRect(0, 0, mask.width, mask.height);
    state.painted = false;
  }

  function invertMask() {
    if (!mask.width) return;
    const data = ctx.getImageData(0, 0, mask.width, mask.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const on = px[i + 3] >= 128;
      px[i] = 255; px[i + 1] = 48; px[i + 2] = 96;
      px[i + 3] = on ? 0 : 255;
    }
    ctx.putImageData(data, 0, 0);
    state.painted = true;
  }

  // Image pixels per screen pixel: the brush size is chosen on screen, painted in image pixels.
  function scale() {
    const rect = mask.getBoundingClientRect();
    return rect.width ? mask.width / rect.width : 1;
  }

  function toImage(event) {
    const rect = mask.getBoundingClientRect();
    const s = scale();
    return { x: (event.clientX - rect.left) * s, y: (event.clientY - rect.top) * s };
  }

  function stroke(from, to) {
    ctx.save();
    ctx.globalCompositeOperation = state.tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = MASK_COLOR;
    ctx.fillStyle = MASK_COLOR;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush-size").value) * scale();
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    ctx.restore();
    if (state.tool === "brush") state.painted = true;
  }

  function moveCursor(event) {
    const cursor = $("cursor");
    const rect = mask.getBoundingClientRect();
    const size = Number($("brush-size").value);
    cursor.style.width = cursor.style.height = `${size}px`;
    cursor.style.left = `${event.clientX - rect.left}px`;
    cursor.style.top = `${event.clientY - rect.top}px`;
    cursor.hidden = false;
  }

  function setTool(tool) {
    state.tool = tool;
    for (const name of ["brush", "eraser"]) {
      const button = $(`tool-${name}`);
      button.classList.toggle("active", name === tool);
      button.setAttribute("aria-pressed", String(name === tool));
    }
  }

  function initPainting() {
    mask.addEventListener("pointerdown", (event) => {
      if (!state.imageUrl) return;
      mask.setPointerCapture(event.pointerId);
      state.painting = true;
      state.last = toImage(event);
      stroke(state.last, state.last);
    });
    mask.addEventListener("pointermove", (event) => {
      moveCursor(event);
      if (!state.painting) return;
      const point = toImage(event);
      stroke(state.last, point);
      state.last = point;
    });
    const stop = () => { state.painting = false; state.last = null; };
    mask.addEventListener("pointerup", stop);
    mask.addEventListener("pointercancel", stop);
    mask.addEventListener("pointerleave", () => { $("cursor").hidden = true; });
    $("tool-brush").addEventListener("click", () => setTool("brush"));
    $("tool-eraser").addEventListener("click", () => setTool("eraser"));
    $("mask-clear").addEventListener("click", clearMask);
    $("mask-invert").addEventListener("click", invertMask);
    $("brush-size").addEventListener("input", () => {
      $("brush-size-value").textContent = $("brush-size").value;
    });
    document.addEventListener("keydown", (event) => {
      if (event.target.closest("input, textarea, select")) return;
      if (event.key === "b") setTool("brush");
      if (event.key === "e") setTool("eraser");
    });
  }

  // The contract's mask: a PNG the image's size, white = regenerate, black = keep.
  // Returns null when nothing is painted, so the request then carries no mask at all.
  function exportMask() {
    if (!state.painted || !mask.width) return null;
    const source = ctx.getImageData(0, 0, mask.width, mask.height);
    const out = document.createElement("canvas");
    out.width = mask.width;
    out.height = mask.height;
    const octx = out.getContext("2d");
    const image = octx.createImageData(out.width, out.height);
    let any = false;
    for (let i = 0; i < source.data.length; i += 4) {
      const v = source.data[i + 3] >= 128 ? 255 : 0;
      any = any || v === 255;
      image.data[i] = image.data[i + 1] = image.data[i + 2] = v;
      image.data[i + 3] = 255;
    }
    if (!any) return null;
    octx.putImageData(image, 0, 0);
    return out.toDataURL("image/png");
  }

  // ---- submit and follow ----------------------------------------------------------------

  function busy(on) {
    $("submit").disabled = on;
    $("cancel").hidden = !on;
  }

  async function submit(event) {
    event.preventDefault();
    clearError();
    if (!token()) return showError("enter your API token at the top right and press Save");
    if (!state.imageUrl) return showError("open an image first");
    const prompt = $("prompt").value.trim();
    if (!prompt) return showError("write a prompt: what the painted area should show");
    const body = {
      action: "generate",
      image_url: state.imageUrl,
      prompt,
      mode: $("mode").value,
      split_images: true,
      async: true,
    };
    const maskUri = exportMask();
    if (maskUri) body.mask = maskUri;
    busy(true);
    setProgress(0);
    setStatus("Submitting…");
    try {
      const reply = await api("/midjourney/edits", body);
      state.taskId = reply.task_id;
      setStatus(`Task ${reply.task_id} queued.`);
      await follow(reply.task_id);
    } catch (err) {
      showError(err);
      setStatus("Failed.");
    } finally {
      busy(false);
      state.taskId = null;
      refreshRecent();
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // Poll the task record, judging its state the hosted way: no response = pending,
  // progress < 100 = running, success true/false = done/failed.
  async function follow(taskId) {
    let delay = 400;
    for (;;) {
      const record = await api("/midjourney/tasks", { action: "retrieve", id: taskId });
      const response = record.response;
      if (response && response.success === true) {
        setProgress(100);
        setStatus(`Done in ${record.elapsed ? record.elapsed.toFixed(1) + "s" : "a moment"}.`);
        showResult(response);
        return;
      }
      if (response && response.success === false) {
        const err = response.error || {};
        const cancelled = err.code === "cancelled" || record.state === "cancelled";
        throw new ApiError(0, err.code || "failed", cancelled ? "the task was cancelled" : err.message || "the task failed", record.trace_id);
      }
      const progress = (response && response.progress) || 0;
      setProgress(progress);
      setStatus(response ? `Editing… ${progress}%` : "Waiting in the queue…");
      await sleep(delay);
      delay = Math.min(delay * 1.5, 2000);
    }
  }

  async function cancel() {
    if (!state.taskId) return;
    try {
      await api("/midjourney/tasks", { action: "cancel", id: state.taskId });
      setStatus("Cancelling…");
    } catch (err) {
      showError(err);
    }
  }

  // ---- results ------------------------------------------------------------------------------

  // A small WebP rendition of a result served by openedits (GET /files/…?w=N), so a list of
  // results costs kilobytes, not the full grids; other URLs (an object store) are used as is.
  function rendition(url, width) {
    try {
      const parsed = new URL(url, location.href);
      if (!/\/files\/[0-9a-f-]{36}\/[^/]+$/.test(parsed.pathname) || parsed.search) return url;
      parsed.searchParams.set("w", String(width));
      return parsed.href;
    } catch (_) {
      return url;
    }
  }

  function showResult(result) {
    $("results").hidden = false;
    // Shown at the side column's width; the download links keep the full files.
    $("grid").src = rendition(result.image_url, 1024);
    $("grid-link").href = result.image_url;
    const variants = $("variants");
    variants.replaceChildren();
    (result.sub_image_urls || []).forEach((url, index) => {
      const figure = document.createElement("figure");
      figure.className = "variant";
      const img = document.createElement("img");
      img.src = rendition(url, 512);
      img.alt = `variant ${index + 1}`;
      const link = document.createElement("a");
      link.href = url;
      link.download = `0_${index}.png`;
      link.textContent = `download ${index + 1}`;
      link.className = "download";
      figure.append(img, link);
      variants.append(figure);
    });
  }

  function when(seconds) {
    if (!seconds) return "";
    return new Date(seconds * 1000).toLocaleString();
  }

  function stateOf(record) {
    const r = record.response;
    if (record.state) return record.state;
    if (!r) return "pending";
    if (r.success === true) return "succeeded";
    if (r.success === false) return "failed";
    return "running";
  }

  async function refreshRecent() {
    const list = $("recent");
    if (!token()) {
      list.replaceChildren(Object.assign(document.createElement("li"), { className: "muted", textContent: "Save a token to see your tasks." }));
      return;
    }
    let page;
    try {
      page = await api("/midjourney/tasks", { action: "retrieve_batch", offset: 0, limit: 12 });
    } catch (err) {
      list.replaceChildren(Object.assign(document.createElement("li"), { className: "error", textContent: String(err) }));
      return;
    }
    const items = page.items || [];
    if (!items.length) {
      list.replaceChildren(Object.assign(document.createElement("li"), { className: "muted", textContent: "No tasks yet." }));
      return;
    }
    list.replaceChildren(...items.map((record) => {
      const li = document.createElement("li");
      const status = stateOf(record);
      li.className = `task ${status}`;
      if (status === "succeeded" && record.response.image_url) {
        const thumb = document.createElement("img");
        thumb.src = rendition(record.response.image_url, 128);
        thumb.alt = "";
        thumb.loading = "lazy";
        li.append(thumb);
      }
      const text = document.createElement("div");
      const prompt = (record.request && record.request.prompt) || "(no prompt)";
      text.innerHTML = "<strong></strong><span class=\"muted\"></span>";
      text.firstChild.textContent = prompt;
      text.lastChild.textContent = ` ${status} · ${when(record.created_at)}`;
      li.append(text);
      if (status === "succeeded") {
        li.tabIndex = 0;
        li.title = "show this result";
        li.addEventListener("click", () => showResult(record.response));
      }
      return li;
    }));
  }

  // ---- start ---------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    initToken();
    initLoaders();
    initPainting();
    $("edit-form").addEventListener("submit", submit);
    $("cancel").addEventListener("click", cancel);
    $("recent-refresh").addEventListener("click", refreshRecent);
    showServerInfo();
    refreshRecent();
  });
})();
