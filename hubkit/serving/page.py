"""The page ``hub serving start`` serves at ``/``: try a served module in a browser.

One self-contained HTML document (no external scripts, styles or fonts, so it works without
internet) that uses only the JSON API: ``GET /v1/modules`` to list what is served, then
``POST /v1/modules/<name>/predict`` with the chosen or dropped image. It shows the image, the
top-k labels as bars and the request's latency. Kept as a string so that it ships inside the
package with no data-file configuration.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hubkit serving</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 2rem auto; max-width: 46rem; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; margin-bottom: .2rem; }
  .muted { color: #666; font-size: .9rem; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2rem; text-align: center; margin: 1rem 0;
          cursor: pointer; }
  #drop.over { border-color: #2a6edb; background: #eef4ff; }
  #main { display: flex; gap: 1.5rem; align-items: flex-start; }
  #preview { max-width: 14rem; max-height: 14rem; border-radius: 6px; display: none; }
  #results { flex: 1; }
  .row { margin: .35rem 0; }
  .row .text { display: flex; justify-content: space-between; gap: 1rem; }
  .bar { height: .6rem; background: #2a6edb; border-radius: 3px; }
  #error { color: #b00020; white-space: pre-wrap; }
</style>
</head>
<body>
<h1>hubkit serving</h1>
<div class="muted">Classify an image with a module served here; this page only calls the JSON API.</div>
<p><label>module <select id="module"></select></label> <label>top-k
  <input id="topk" type="number" min="1" max="20" value="5" style="width:3.5rem"></label></p>
<div id="drop">Drop an image here, or <label style="text-decoration:underline">choose a file
  <input id="file" type="file" accept="image/*" hidden></label></div>
<div id="main">
  <img id="preview" alt="the image sent">
  <div id="results"><div id="status" class="muted"></div><div id="rows"></div><div id="error"></div></div>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);

async function loadModules() {
  try {
    const answer = await (await fetch("/v1/modules")).json();
    for (const m of answer.modules) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = `${m.name} ${m.version} (${m.num_labels} classes, ${m.device})`;
      $("module").appendChild(option);
    }
    document.body.dataset.ready = "true";
  } catch (err) {
    $("error").textContent = "cannot list the served modules: " + err;
  }
}

function showRows(topK) {
  $("rows").replaceChildren(...topK.map((c) => {
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.index = c.index;
    const text = document.createElement("div");
    text.className = "text";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = c.label;
    const percent = document.createElement("span");
    percent.className = "probability";
    percent.textContent = (100 * c.probability).toFixed(1) + "%";
    text.append(label, percent);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = Math.max(0.5, 100 * c.probability) + "%";
    row.append(text, bar);
    return row;
  }));
}

async function classify(file) {
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  $("preview").style.display = "block";
  $("error").textContent = "";
  $("rows").replaceChildren();
  $("status").textContent = "predicting...";
  const form = new FormData();
  form.append("file", file);
  form.append("top_k", $("topk").value);
  const started = performance.now();
  try {
    const response = await fetch(`/v1/modules/${encodeURIComponent($("module").value)}/predict`,
                                 {method: "POST", body: form});
    const answer = await response.json();
    const ms = performance.now() - started;
    if (!response.ok) throw new Error(answer.error || response.statusText);
    $("status").innerHTML = "";
    const latency = document.createElement("span");
    latency.id = "latency";
    latency.textContent = `${answer.module}: ${ms.toFixed(0)} ms (batch of ${answer.batch_size})`;
    $("status").append(latency);
    showRows(answer.top_k);
  } catch (err) {
    $("status").textContent = "";
    $("error").textContent = String(err.message || err);
  }
}

$("file").addEventListener("change", (e) => classify(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); classify(e.dataTransfer.files[0]); });
loadModules();
</script>
</body>
</html>
"""
