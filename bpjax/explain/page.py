"""The record of :func:`bpjax.explain.explain` as one self-contained HTML page (``bpjax explain
--html FILE``): no network, no CDN, the numbers inlined as JSON.

The page draws the network as a row of layers, walks through the stages of the algorithm with a
step control (forward layer by layer, the loss, the error at the output, backward layer by
layer, the update), showing at each stage its equations and arrays (a table of values for small
arrays, a heat map for larger ones), and draws the loss curve over the steps of gradient descent.
Every number shown carries its full value in a ``data-value`` attribute, which the browser test
(tests/test_explain_page.py) reads back.
"""
from __future__ import annotations

import html
import json
import math
import pathlib

import numpy as np

from .record import Explanation
from .text import describe, in_equation_order, layer_text, param_label

__all__ = ["MAX_CELLS", "page_data", "stages", "write_page"]

#: Arrays with more entries than this are shown as their shape and norm only (the page stays small).
MAX_CELLS = 4096


def _array(name: str, a) -> dict:
    a = np.asarray(a, dtype=np.float64)
    out = {"name": name, "shape": list(a.shape), "norm": float(np.linalg.norm(a.ravel())) if a.size else 0.0}
    if a.size <= MAX_CELLS:
        rows = a.reshape(1, 1) if a.ndim == 0 else a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)
        out["rows"] = [[v if math.isfinite(v) else None for v in r.tolist()] for r in rows]
    return out


def stages(rec: Explanation) -> list[dict]:
    """The page's stages in order: ``phase`` (forward, loss, error, backward, update), ``title``,
    ``formulas``, ``layer`` (the index of the layer it is at, or None) and its ``arrays``."""
    out = [{"phase": "forward", "title": "1. Forward: the input batch x", "layer": None,
            "formulas": [f"x: n = {rec.n} examples"], "arrays": [_array("x", rec.x)]}]
    for i, layer in enumerate(rec.layers):
        arrays = [_array(param_label(k), a) for k, a in in_equation_order(layer, layer.params)] + [_array("y", layer.y)]
        out.append({"phase": "forward", "title": f"1. Forward through {layer.label}", "layer": i,
                    "formulas": [layer.formula.forward], "arrays": arrays})
    out.append({"phase": "loss", "title": "2. The loss E compares the output y with the target y′", "layer": None,
                "formulas": [rec.loss_formula.forward],
                "arrays": [_array("y", rec.output), _array("y′", rec.target), _array("E", rec.loss)]})
    out.append({"phase": "error", "title": "3. The error at the output, ∂E/∂y", "layer": None,
                "formulas": [rec.loss_formula.backward], "arrays": [_array("∂E/∂y", rec.error)]})
    for i in reversed(range(len(rec.layers))):
        layer = rec.layers[i]
        arrays = [_array("dy", layer.dy)]
        arrays += [_array(f"∂E/∂{param_label(k)}", g) for k, g in in_equation_order(layer, layer.grads)]
        if layer.dx is not None:
            arrays.append(_array("dx", layer.dx))
        formulas = [layer.formula.backward] + [layer.formula.grads.get(k, f"∂E/∂{k}") for k, _ in
                                               in_equation_order(layer, layer.grads)]
        out.append({"phase": "backward", "title": f"4. Backward through {layer.label}", "layer": i,
                    "formulas": formulas, "arrays": arrays})
    arrays = [_array(f"Δ{param_label(k)} {layer.label}", u) for layer in rec.layers
              for k, u in in_equation_order(layer, layer.updates)]
    out.append({"phase": "update", "title": "5. The weights are updated", "layer": None,
                "formulas": [f"{rec.update_formula},  η = {rec.lr:g}",
                             f"E before the step {rec.loss:.6g}, after it {rec.loss_after:.6g}"],
                "arrays": arrays + [_array("E after", rec.loss_after)]})
    return out


def page_data(rec: Explanation) -> dict:
    """Everything the page shows, JSON-ready."""
    return {"model": rec.model, "network": describe(rec), "loss": rec.loss_name, "n": rec.n, "lr": rec.lr,
            "layers": [{"label": l.label, "name": l.name, "params": bool(l.params), "text": layer_text(l)}
                       for l in rec.layers],
            "stages": stages(rec), "losses": [v if math.isfinite(v) else None for v in rec.losses]}


def write_page(rec: Explanation, path) -> pathlib.Path:
    """Write the page for ``rec`` to ``path`` (module doc); returns the path."""
    data = json.dumps(page_data(rec), ensure_ascii=False).replace("</", "<\\/")
    title = html.escape(f"bpjax explain: {rec.model} ({describe(rec)}), {rec.loss_name}")
    path = pathlib.Path(path)
    path.write_text(_TEMPLATE.replace("@TITLE@", title).replace("@DATA@", data), encoding="utf-8")
    return path


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.2em 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.25em; margin-bottom: .2em; }
#network { display: flex; align-items: center; flex-wrap: wrap; gap: .3em; margin: 1em 0; }
.node { border: 2px solid #999; border-radius: 6px; padding: .45em .7em; background: #f6f6f6; font-size: .9em; }
.node.params { background: #eef4ff; }
.node.active.forward { border-color: #1a7f37; background: #dff5e3; }
.node.active.backward { border-color: #b3261e; background: #fbe3e1; }
.node.active.loss, .node.active.error, .node.active.update { border-color: #8250df; background: #efe6ff; }
.arrow { color: #999; }
#controls { display: flex; gap: .6em; align-items: center; margin: .8em 0; }
button { font-size: 1em; padding: .3em .9em; }
#stage-title { font-size: 1.1em; margin: .5em 0; }
.formula { font-family: "DejaVu Sans Mono", monospace; background: #fafafa; border-left: 3px solid #8250df;
           padding: .25em .6em; margin: .25em 0; }
.arrays { display: flex; flex-wrap: wrap; gap: 1.2em; margin-top: .8em; }
.array h3 { font-size: .95em; margin: .2em 0; font-family: monospace; }
table.values { border-collapse: collapse; font-family: monospace; font-size: .85em; }
table.values td { border: 1px solid #ddd; padding: .15em .45em; text-align: right; }
.heat { display: grid; gap: 0; }
.heat div { width: 7px; height: 7px; }
.summary { font-family: monospace; font-size: .85em; color: #555; }
#curve { margin-top: 1.5em; }
</style></head>
<body>
<h1>@TITLE@</h1>
<p>One pass of backpropagation with the numbers of one batch: forward through each layer, the loss,
the error at the output, the error sent back through each layer with every weight's gradient, and the
update. The gradients are bpjax's hand-written backward; its tests check them against JAX's autodiff.
Use the buttons or the arrow keys.</p>
<div id="network"></div>
<div id="controls"><button id="prev">◀ back</button><button id="next">next ▶</button>
<span id="counter"></span></div>
<div id="stage" data-stage="0"><div id="stage-title"></div><div id="formulas"></div><div class="arrays" id="arrays"></div></div>
<div id="curve"></div>
<script id="data" type="application/json">@DATA@</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
let at = 0;
function fmt(v) {
  if (v === null) return "NaN";
  if (v === 0) return "0";
  const a = Math.abs(v);
  return (a >= 1e-3 && a < 1e4) ? String(Number(v.toPrecision(4))) : v.toExponential(3);
}
function color(v, m) {
  if (v === null || m === 0) return "rgb(240,240,240)";
  const t = Math.max(-1, Math.min(1, v / m)), c = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? `rgb(255,${c},${c})` : `rgb(${c},${c},255)`;
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function drawArray(a) {
  const box = el("div", "array"); box.dataset.name = a.name;
  box.appendChild(el("h3", "", `${a.name}  (${a.shape.join(", ")}${a.shape.length === 1 ? "," : ""})`));
  if (!a.rows) { box.appendChild(el("div", "summary", `‖·‖ = ${fmt(a.norm)} (too large to show)`)); return box; }
  const size = a.rows.length * a.rows[0].length;
  if (size <= 64) {
    const t = el("table", "values");
    for (const r of a.rows) {
      const tr = el("tr");
      for (const v of r) { const td = el("td", "", fmt(v)); td.dataset.value = v === null ? "NaN" : String(v); tr.appendChild(td); }
      t.appendChild(tr);
    }
    box.appendChild(t);
  } else {
    let m = 0; for (const r of a.rows) for (const v of r) if (v !== null) m = Math.max(m, Math.abs(v));
    const g = el("div", "heat"); g.style.gridTemplateColumns = `repeat(${a.rows[0].length}, 7px)`;
    for (const r of a.rows) for (const v of r) {
      const c = el("div"); c.dataset.value = v === null ? "NaN" : String(v); c.title = fmt(v);
      c.style.background = color(v, m); g.appendChild(c);
    }
    box.appendChild(g);
    box.appendChild(el("div", "summary", `heat map: blue < 0 < red, |max| = ${fmt(m)}, ‖·‖ = ${fmt(a.norm)}`));
  }
  return box;
}
function drawNetwork() {
  const net = document.getElementById("network");
  const add = (text, cls, idx) => {
    if (net.children.length) net.appendChild(el("span", "arrow", "→"));
    const n = el("div", "node " + cls, text); if (idx !== undefined) n.dataset.index = idx; net.appendChild(n); return n;
  };
  add("input x", "input", "input");
  D.layers.forEach((l, i) => { const n = add(l.text, l.params ? "params" : "", i); n.title = l.label; });
  add(`loss ${D.loss}`, "lossnode", "loss");
}
function show(i) {
  at = Math.max(0, Math.min(D.stages.length - 1, i));
  const s = D.stages[at];
  document.getElementById("stage").dataset.stage = at;
  document.getElementById("stage").dataset.phase = s.phase;
  document.getElementById("stage-title").textContent = s.title;
  document.getElementById("counter").textContent = `stage ${at + 1} of ${D.stages.length}`;
  const f = document.getElementById("formulas"); f.replaceChildren();
  for (const t of s.formulas) f.appendChild(el("div", "formula", t));
  const arrays = document.getElementById("arrays"); arrays.replaceChildren();
  for (const a of s.arrays) arrays.appendChild(drawArray(a));
  for (const n of document.querySelectorAll(".node")) {
    n.classList.remove("active", "forward", "backward", "loss", "error", "update");
    const idx = n.dataset.index;
    const here = (s.layer !== null && idx === String(s.layer)) || (s.layer === null && s.phase === "forward" && idx === "input")
      || (s.layer === null && s.phase !== "forward" && idx === "loss");
    if (here) n.classList.add("active", s.phase);
  }
  const back = s.phase !== "forward";
  for (const a of document.querySelectorAll(".arrow")) a.textContent = back ? "←" : "→";
  document.getElementById("prev").disabled = at === 0;
  document.getElementById("next").disabled = at === D.stages.length - 1;
}
function drawCurve() {
  const v = D.losses.filter(x => x !== null); if (v.length < 2) return;
  const W = 560, H = 200, P = 40, L = 70, lo = Math.min(...v), hi = Math.max(...v), span = (hi - lo) || 1;
  const pts = D.losses.map((y, i) => y === null ? null :
    [L + (W - L - P) * i / (D.losses.length - 1), H - P + (lo - y) / span * (H - 2 * P)]).filter(p => p);
  const svg = `<svg id="loss-curve" width="${W}" height="${H}" xmlns="http://www.w3.org/2000/svg">
    <rect x="${L}" y="${P}" width="${W - L - P}" height="${H - 2 * P}" fill="none" stroke="#ccc"/>
    <polyline fill="none" stroke="#8250df" stroke-width="2" points="${pts.map(p => p.join(",")).join(" ")}"/>
    <circle cx="${pts[0][0]}" cy="${pts[0][1]}" r="4" fill="#b3261e"/>
    <text x="${L}" y="${H - 12}" font-size="11">step 0</text>
    <text x="${W - P}" y="${H - 12}" font-size="11" text-anchor="end">step ${D.losses.length - 1}</text>
    <text x="${L - 4}" y="${P + 4}" font-size="11" text-anchor="end">${fmt(hi)}</text>
    <text x="${L - 4}" y="${H - P}" font-size="11" text-anchor="end">${fmt(lo)}</text>
    <text x="${(W + L - P) / 2}" y="${P - 12}" font-size="12" text-anchor="middle">E over ${D.losses.length - 1} steps of gradient descent (η = ${D.lr}); the red dot is this pass</text>
  </svg>`;
  document.getElementById("curve").innerHTML = svg;
}
document.getElementById("prev").onclick = () => show(at - 1);
document.getElementById("next").onclick = () => show(at + 1);
document.addEventListener("keydown", e => { if (e.key === "ArrowRight") show(at + 1); if (e.key === "ArrowLeft") show(at - 1); });
drawNetwork(); drawCurve(); show(0);
</script>
</body></html>
"""
