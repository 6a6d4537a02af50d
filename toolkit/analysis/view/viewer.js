// toolkit view: hand-written canvas drawing (a heatmap and line plots need no library).
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("data").textContent);
  const $ = (id) => document.getElementById(id);
  const COLORS = { dataset: "#6b7280", base: "#1565c0", other: "#e65100" };
  const state = { ep: 0, i: 0, playing: false, timer: null, condition: D.runs.length > 1 ? D.runs[1] : null,
                  fps: 4 };
  window.viewer = state;  // for tests and the console

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---------------------------------------------------------------- header and picker
  $("title").textContent = D.meta.title;
  const meta = $("meta");
  meta.textContent = `model ${D.meta.model} (${D.meta.weights}) · dataset ${D.meta.dataset} · ` +
    `${D.meta.n_samples} samples · ${D.episodes.length} episode${D.episodes.length === 1 ? "" : "s"} shown` +
    (D.meta.probe ? ` · heatmap: confidence in the true ${D.meta.probe.target}` : " · no probe results given");
  if (D.meta.random) {
    const warn = "RANDOM weights: these rollouts show the pipeline, not a trained policy";
    meta.appendChild(el("div", { class: "warn" }, warn));
  }
  for (const n of D.meta.notes) $("notes").appendChild(el("div", {}, "note: " + n));

  const tasks = [...new Set(D.episodes.map((e) => e.task))];
  $("task-filter").appendChild(el("option", { value: "" }, "all tasks"));
  for (const t of tasks) $("task-filter").appendChild(el("option", { value: t }, t));
  if (D.runs.length > 1) {
    $("condition-label").hidden = false;
    for (const c of D.runs.slice(1)) $("condition").appendChild(el("option", { value: c }, c));
  }

  function outcome(s) {
    return s === 1 ? ["ok", "success"] : s === 0 ? ["fail", "failure"] : ["unknown", "outcome unknown"];
  }

  function fillEpisodes() {
    const task = $("task-filter").value, succ = $("success-filter").value;
    const sel = $("episode");
    sel.textContent = "";
    D.episodes.forEach((e, k) => {
      if ((task && e.task !== task) || (succ !== "all" && String(e.success) !== succ)) return;
      sel.appendChild(el("option", { value: k }, `episode ${e.episode} · ${e.task} · ${outcome(e.success)[1]}`));
    });
    if (sel.options.length) { sel.value = sel.options[0].value; setEpisode(+sel.value); }
  }

  // ---------------------------------------------------------------- columns: frames and heatmap
  const shown = () => D.runs.length > 1 ? [D.runs[0], state.condition] : [D.runs[0]];

  function buildColumns() {
    const cols = $("columns");
    cols.textContent = "";
    shown().forEach((run, c) => {
      const col = el("div", { class: "column", id: "column-" + c });
      if (D.runs.length > 1) col.appendChild(el("h3", {}, run));
      const frames = el("div", { class: "frames" });
      for (const cam of D.cameras) {
        const fig = el("figure");
        const img = el("img", { id: `frame-${c}-${cam}`, alt: cam });
        const none = el("div", { class: "noframe", id: `noframe-${c}-${cam}` }, "no frame");
        fig.append(img, none, el("figcaption", { id: `caption-${c}-${cam}` }, cam));
        frames.appendChild(fig);
      }
      if (D.cameras.length) col.appendChild(frames);
      if (D.meta.probe) {
        const what = `probe confidence in the true ${D.meta.probe.target} (layer × step)`;
        col.appendChild(el("h3", { class: "heat" }, what));
        const cv = el("canvas", { id: "heatmap-" + c, class: "heatmap" });
        cv.addEventListener("click", (ev) => {
          const r = cv.getBoundingClientRect(), g = cv._geom;
          if (!g) return;
          const k = Math.floor((ev.clientX - r.left - g.left) / g.cw);
          if (k >= 0 && k < g.n) seek(k);
        });
        col.appendChild(cv);
      }
      cols.appendChild(col);
    });
  }

  function color(v) {  // viridis-like ramp, null grey
    if (v === null || v === undefined) return "#d5d8dc";
    const t = Math.max(0, Math.min(1, v));
    const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    const x = t * (stops.length - 1), k = Math.min(stops.length - 2, Math.floor(x)), f = x - k;
    const c = stops[k].map((a, j) => Math.round(a + f * (stops[k + 1][j] - a)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function drawHeatmap(c, run) {
    const cv = $("heatmap-" + c);
    if (!cv) return;
    const ep = D.episodes[state.ep], conf = ep.runs[run].conf, labels = D.meta.probe.cells;
    const n = ep.steps.length, rows = labels.length;
    const left = 92, top = 4, cw = Math.max(4, Math.min(28, Math.floor(520 / Math.max(1, n)))), ch = 16;
    cv.width = left + n * cw + 60; cv.height = top + rows * ch + 22;
    const g = cv.getContext("2d");
    g.clearRect(0, 0, cv.width, cv.height);
    g.font = "11px sans-serif"; g.textBaseline = "middle";
    for (let l = 0; l < rows; l++) {
      g.fillStyle = "#333"; g.textAlign = "right";
      g.fillText(labels[l], left - 6, top + l * ch + ch / 2);
      for (let k = 0; k < n; k++) {
        g.fillStyle = color(conf ? conf[l][k] : null);
        g.fillRect(left + k * cw, top + l * ch, cw - (cw > 6 ? 1 : 0), ch - 1);
      }
    }
    g.textAlign = "center"; g.fillStyle = "#333";
    const every = Math.max(1, Math.ceil(n / 12));
    for (let k = 0; k < n; k += every) g.fillText(ep.steps[k], left + k * cw + cw / 2, top + rows * ch + 10);
    g.strokeStyle = "#e53935"; g.lineWidth = 2;
    g.strokeRect(left + state.i * cw + 1, top + 1, cw - 2, rows * ch - 2);
    for (let j = 0; j < 5; j++) {  // colour key 0..1
      g.fillStyle = color(j / 4); g.fillRect(left + n * cw + 14, top + (4 - j) * 10, 10, 10);
    }
    g.fillStyle = "#333"; g.textAlign = "left";
    g.fillText("1", left + n * cw + 28, top + 5); g.fillText("0", left + n * cw + 28, top + 45);
    cv._geom = { left, cw, n };
    cv.title = conf ? labels.map((lab, l) => `${lab}: ${fmt(conf[l][state.i])}`).join("\n") : "no confidence";
  }

  function fmt(v) { return v === null || v === undefined ? "n/a" : v.toFixed(3); }

  // ---------------------------------------------------------------- action plots
  function buildActions() {
    const ep = D.episodes[state.ep];
    const box = $("actions");
    box.textContent = "";
    const base = ep.runs[D.runs[0]].action, data = ep.dataset_action;
    const dims = Math.max(base && base[0] ? base[0].length : 0, data && data[0] ? data[0].length : 0);
    $("actions-section").hidden = dims === 0;
    const legend = $("legend");
    legend.textContent = "";
    const items = [["dataset", "dataset action", data],
                   ["base", "predicted" + (D.runs.length > 1 ? ` (${D.runs[0]})` : ""), base]];
    if (D.runs.length > 1) items.push(["other", `predicted (${state.condition})`, ep.runs[state.condition].action]);
    for (const [k, label, v] of items) {
      if (!v) continue;
      const s = el("span"), i = el("i");
      i.style.background = COLORS[k];
      s.append(i, label);
      legend.appendChild(s);
    }
    for (let d = 0; d < Math.min(dims, 14); d++) {
      const fig = el("figure", { class: "plot" });
      const cv = el("canvas", { id: "action-" + d, width: 230, height: 110 });
      cv.addEventListener("click", (ev) => {
        const r = cv.getBoundingClientRect(), n = ep.steps.length;
        const k = Math.round((ev.clientX - r.left - 8) / (cv.width - 16) * Math.max(1, n - 1));
        seek(Math.max(0, Math.min(n - 1, k)));
      });
      fig.append(cv, el("figcaption", {}, "action dim " + d));
      box.appendChild(fig);
    }
  }

  function drawActions() {
    const ep = D.episodes[state.ep], n = ep.steps.length;
    const series = [["dataset", ep.dataset_action], ["base", ep.runs[D.runs[0]].action]];
    if (D.runs.length > 1) series.push(["other", ep.runs[state.condition].action]);
    document.querySelectorAll("#actions canvas").forEach((cv) => {
      const d = +cv.id.split("-")[1], g = cv.getContext("2d");
      const vals = [];
      for (const [, s] of series) {
        for (const row of s || []) if (row && row[d] !== null && row[d] !== undefined) vals.push(row[d]);
      }
      let lo = Math.min(...vals), hi = Math.max(...vals);
      if (!vals.length) { lo = 0; hi = 1; }
      if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
      const x = (k) => 8 + (cv.width - 16) * (n > 1 ? k / (n - 1) : 0.5);
      const y = (v) => cv.height - 14 - (cv.height - 24) * (v - lo) / (hi - lo);
      g.clearRect(0, 0, cv.width, cv.height);
      g.fillStyle = "#fff"; g.fillRect(0, 0, cv.width, cv.height);
      g.strokeStyle = "#ddd"; g.strokeRect(0.5, 0.5, cv.width - 1, cv.height - 1);
      for (const [k, s] of series) {
        if (!s) continue;
        g.strokeStyle = COLORS[k]; g.fillStyle = COLORS[k]; g.lineWidth = 1.5; g.beginPath();
        let pen = false;
        s.forEach((row, j) => {
          const v = row ? row[d] : null;
          if (v === null || v === undefined) { pen = false; return; }
          if (pen) g.lineTo(x(j), y(v)); else g.moveTo(x(j), y(v));
          pen = true;
        });
        g.stroke();
        if (n === 1 && s[0] && s[0][d] !== null) { g.beginPath(); g.arc(x(0), y(s[0][d]), 3, 0, 7); g.fill(); }
      }
      g.strokeStyle = "#e53935"; g.lineWidth = 1; g.beginPath();
      g.moveTo(x(state.i), 2); g.lineTo(x(state.i), cv.height - 12); g.stroke();
      g.fillStyle = "#666"; g.font = "10px sans-serif"; g.textAlign = "left";
      g.fillText(hi.toFixed(2), 10, 10); g.fillText(lo.toFixed(2), 10, cv.height - 3);
    });
  }

  // ---------------------------------------------------------------- the current step
  function frameAt(frames, i) {  // the frame of step i, else the nearest earlier kept one (--max-frames thins them)
    for (let k = i; k >= 0; k--) if (frames[k]) return [frames[k], k];
    return [null, -1];
  }

  function render() {
    const ep = D.episodes[state.ep], n = ep.steps.length;
    $("slider").max = n - 1; $("slider").value = state.i;
    $("step").textContent = `step ${ep.steps[state.i]} (${state.i + 1}/${n})`;
    shown().forEach((run, c) => {
      const r = ep.runs[run];
      for (const cam of D.cameras) {
        const img = $(`frame-${c}-${cam}`), none = $(`noframe-${c}-${cam}`);
        const [src, k] = frameAt((r.frames || {})[cam] || [], state.i);
        if (src) {
          if (img.getAttribute("src") !== src) img.src = src;
          img.style.display = ""; none.style.display = "none";
        } else {
          img.removeAttribute("src"); img.style.display = "none"; none.style.display = "";
        }
        $(`caption-${c}-${cam}`).textContent = cam + (src && k !== state.i ? ` (frame of step ${ep.steps[k]})` : "");
      }
      if (D.meta.probe) drawHeatmap(c, run);
    });
    drawActions();
  }

  function seek(i) {
    const n = D.episodes[state.ep].steps.length;
    state.i = Math.max(0, Math.min(n - 1, i));
    render();
  }

  function setEpisode(k) {
    state.ep = k; state.i = 0;
    const ep = D.episodes[k];
    $("instruction").textContent = ep.instruction;
    const [cls, text] = outcome(ep.success);
    $("outcome").className = "badge " + cls; $("outcome").textContent = text;
    $("episode-key").textContent = `${ep.key} · task ${ep.task_id}`;
    buildColumns(); buildActions(); render();
  }

  function play(on) {
    state.playing = on;
    $("play").textContent = on ? "pause" : "play";
    clearInterval(state.timer);
    if (!on) return;
    const n = D.episodes[state.ep].steps.length;
    if (state.i >= n - 1) seek(0);
    state.timer = setInterval(() => {
      if (state.i >= D.episodes[state.ep].steps.length - 1) { play(false); return; }
      seek(state.i + 1);
    }, 1000 / state.fps);
  }

  $("play").addEventListener("click", () => play(!state.playing));
  $("prev").addEventListener("click", () => { play(false); seek(state.i - 1); });
  $("next").addEventListener("click", () => { play(false); seek(state.i + 1); });
  $("first").addEventListener("click", () => { play(false); seek(0); });
  $("slider").addEventListener("input", () => { play(false); seek(+$("slider").value); });
  $("episode").addEventListener("change", () => { play(false); setEpisode(+$("episode").value); });
  $("task-filter").addEventListener("change", () => { play(false); fillEpisodes(); });
  $("success-filter").addEventListener("change", () => { play(false); fillEpisodes(); });
  $("condition").addEventListener("change", () => { state.condition = $("condition").value; setEpisode(state.ep); });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "SELECT" || ev.target.tagName === "INPUT") return;
    if (ev.key === " ") { ev.preventDefault(); play(!state.playing); }
    else if (ev.key === "ArrowRight") seek(state.i + 1);
    else if (ev.key === "ArrowLeft") seek(state.i - 1);
    else if (ev.key === "Home") seek(0);
  });
  state.seek = seek;
  fillEpisodes();
})();
