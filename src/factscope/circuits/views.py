"""Circuit views: a layered offline HTML/SVG view, a static PNG of the same layout, DOT/SVG export.

Layout (all views): one row per layer, the embeddings (``input``) at the bottom and ``logits`` at the
top; inside a layer row, left to right: the attention heads ``a{l}.h0 .. h{H-1}``, the shared
key/value receivers ``a{l}.kv{g}`` of grouped-query models (drawn as small nodes tied to their query
heads), then the MLP ``m{l}``. An edge ``U->R`` runs from node U to the node of receiver R (the
query/key/value input of a head is in the edge's name, shown on hover). Edge colour is the signed
score (blue positive, red negative), width grows with |score|.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import torch

from factscope.errors import FactscopeError

_RECV = re.compile(r"^(.*?)(<[qkv]>)?$")


def receiver_node(name: str) -> str:
    """The node a receiver column belongs to: ``a3.h1<q>`` -> ``a3.h1``, ``a3.kv0<k>`` -> ``a3.kv0``."""
    return _RECV.match(name).group(1)


def _layer(node: str, n_layers: int) -> int:
    if node == "input":
        return -1
    if node == "logits":
        return n_layers
    return int(re.match(r"^[am](\d+)", node).group(1))


def circuit_edges(graph, only_in_graph: bool = True) -> list[dict]:
    """Edges (in the circuit, or all real ones) sorted by |score| descending:
    ``{"up", "down", "src", "dst", "name", "score"}`` with src/dst the node names."""
    mask = graph.in_graph & graph.real if only_in_graph else graph.real.clone()
    sc = torch.nan_to_num(graph.scores.float(), nan=0.0)
    idx = mask.nonzero().tolist()
    out = []
    for u, r in idx:
        down = graph.down_names[r]
        out.append({"up": graph.up_names[u], "down": down, "src": graph.up_names[u], "dst": receiver_node(down),
                    "name": f"{graph.up_names[u]}->{down}", "score": float(sc[u, r])})
    out.sort(key=lambda e: (-abs(e["score"]), e["name"]))
    return out


def layout(graph) -> dict[str, tuple[float, float]]:
    """Node name -> (x, y) with y = layer (input -1, logits L) and x = position inside the layer row."""
    n_layers = max(_layer(n, 0) for n in graph.up_names if n != "input") + 1
    rows: dict[int, list[str]] = {-1: ["input"], n_layers: ["logits"]}
    for n in graph.up_names[1:]:
        rows.setdefault(_layer(n, n_layers), []).append(n)
    for d in graph.down_names:
        node = receiver_node(d)
        if ".kv" in node:
            row = rows[_layer(node, n_layers)]
            if node not in row:
                m = next(i for i, x in enumerate(row) if x.startswith("m"))
                row.insert(m, node)
    width = max(len(r) for r in rows.values())
    pos = {}
    for y, names in rows.items():
        step = width / len(names)
        for i, n in enumerate(names):
            pos[n] = ((i + 0.5) * step, float(y))
    return pos


def _kv_ties(graph) -> list[tuple[str, str]]:
    """(kv node, query head) pairs of grouped-query models (structural, not edges of the graph)."""
    heads: dict[int, list[str]] = {}
    for n in graph.up_names:
        m = re.match(r"^a(\d+)\.h(\d+)$", n)
        if m:
            heads.setdefault(int(m.group(1)), []).append(n)
    kvs: dict[int, list[str]] = {}
    for d in graph.down_names:
        node = receiver_node(d)
        m = re.match(r"^a(\d+)\.kv(\d+)$", node)
        if m and node not in kvs.get(int(m.group(1)), []):
            kvs.setdefault(int(m.group(1)), []).append(node)
    ties = []
    for l, ks in kvs.items():
        per = len(heads[l]) // len(ks)
        for g, k in enumerate(ks):
            ties += [(k, h) for h in heads[l][g * per : (g + 1) * per]]
    return ties


# --------------------------------------------------------------------------------------------
# DOT / SVG
# --------------------------------------------------------------------------------------------


def _color(score: float, vmax: float) -> str:
    t = 0.0 if vmax == 0 else max(-1.0, min(1.0, score / vmax))
    # white -> blue (positive) / red (negative), never lighter than a visible grey-blue
    a = 0.25 + 0.75 * abs(t)
    base = (33, 102, 172) if t >= 0 else (178, 24, 43)
    r, g, b = (round(255 - a * (255 - c)) for c in base)
    return f"#{r:02x}{g:02x}{b:02x}"


def to_dot(graph, max_edges: int | None = None) -> str:
    """Graphviz DOT text of the circuit (ranks = layers, bottom to top)."""
    edges = circuit_edges(graph)[:max_edges] if max_edges else circuit_edges(graph)
    vmax = max((abs(e["score"]) for e in edges), default=0.0)
    pos = layout(graph)
    used = {"logits"} | {e["src"] for e in edges} | {e["dst"] for e in edges}
    lines = ["digraph circuit {", ("  rankdir=BT; splines=true; node [shape=box, style=\"rounded,filled\", "
                                   "fontname=Helvetica, fillcolor=\"#f2f2f2\"];")]
    by_layer: dict[float, list[str]] = {}
    for n in used:
        by_layer.setdefault(pos[n][1], []).append(n)
    for y in sorted(by_layer):
        names = sorted(by_layer[y], key=lambda n: pos[n][0])
        lines.append("  { rank=same; " + " ".join(f'"{n}";' for n in names) + " }")
    for e in edges:
        w = 0.6 + 4.4 * (abs(e["score"]) / vmax if vmax else 0)
        qkv = e["down"][-3:] if e["down"].endswith(">") else ""
        lines.append(f'  "{e["src"]}" -> "{e["dst"]}" [penwidth={w:.2f}, color="{_color(e["score"], vmax)}", '
                     f'tooltip="{e["name"]}: {e["score"]:.4g}"{", label=" + json.dumps(qkv[1]) if qkv else ""}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(graph, path: str | Path, svg: bool = True, max_edges: int | None = None) -> list[Path]:
    """Write ``path`` (.dot) and, when Graphviz's ``dot`` is installed and ``svg``, the .svg beside it."""
    from factscope.runs import atomic_write_bytes, atomic_write_text

    path = Path(path)
    out = [atomic_write_text(path, to_dot(graph, max_edges))]
    dot = shutil.which("dot")
    if svg and dot:
        res = subprocess.run([dot, "-Tsvg", str(path)], capture_output=True, timeout=120, check=False)
        if res.returncode != 0:
            raise FactscopeError(f"graphviz failed on {path}: {res.stderr.decode(errors='replace')[:300]}")
        out.append(atomic_write_bytes(path.with_suffix(".svg"), res.stdout))
    return out


# --------------------------------------------------------------------------------------------
# Static figure (PNG, for the report and the docs)
# --------------------------------------------------------------------------------------------


def plot_circuit(graph, title: str = "", max_edges: int | None = None):
    """Matplotlib figure of the layered view (strongest edges drawn last, on top)."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    from factscope.plotting import new_figure

    pos = layout(graph)
    edges = circuit_edges(graph)[:max_edges] if max_edges else circuit_edges(graph)
    vmax = max((abs(e["score"]) for e in edges), default=0.0)
    n_rows = int(max(y for _, y in pos.values())) + 2
    width = max(x for x, _ in pos.values()) + 0.5
    fig, ax = new_figure(size=(min(11, 2.5 + 1.1 * width), min(12, 1.6 + 0.48 * n_rows)))
    used = {"logits"} | {e["src"] for e in edges} | {e["dst"] for e in edges}
    segs, cols, lws = [], [], []
    for e in reversed(edges):
        (x1, y1), (x2, y2) = pos[e["src"]], pos[e["dst"]]
        t = [i / 16 for i in range(17)]
        # a gentle S-curve from the top of the source to the bottom of the receiver
        # edges within one column bow sideways so they do not run through the nodes in between
        bow = min(0.9, 0.12 + 0.07 * abs(y2 - y1)) * 0.8 if abs(x2 - x1) < 0.3 else 0.0
        if y1 == y2:  # head -> MLP of the same layer: an arc under the row, not through its nodes
            pts = [(x1 + (x2 - x1) * s, y1 - 0.18 - 0.3 * 4 * s * (1 - s)) for s in t]
        else:
            pts = [(x1 + (x2 - x1) * (3 * s * s - 2 * s**3) + bow * 4 * s * (1 - s), y1 + 0.18 + (y2 - y1 - 0.36) * s)
                   for s in t]
        segs.append(pts)
        cols.append(_color(e["score"], vmax))
        lws.append(0.4 + 3.6 * (abs(e["score"]) / vmax if vmax else 0))
    ax.add_collection(LineCollection(segs, colors=cols, linewidths=lws, alpha=0.85, zorder=1))
    for k, h in _kv_ties(graph):
        if k in used:
            (x1, y1), (x2, y2) = pos[k], pos[h]
            ax.plot([x1, x2], [y1, y2], color="#bbbbbb", lw=0.6, ls=":", zorder=1)
    for n, (x, y) in pos.items():
        on = n in used
        kind = "#d9e6f2" if n.startswith("a") else "#f2e6d9" if n.startswith("m") else "#e6e6e6"
        ax.text(x, y, n.split(".", 1)[1] if n.startswith("a") else n, ha="center", va="center",
                fontsize=7 if on else 6, color="black" if on else "#aaaaaa", zorder=3,
                bbox={"boxstyle": "round,pad=0.25", "fc": kind if on else "white",
                      "ec": "#555555" if on else "#dddddd", "lw": 0.6})
    ys = sorted({y for _, y in pos.values()})
    ax.set_yticks(ys, ["emb" if y < 0 else "logits" if y == ys[-1] else f"L{int(y)}" for y in ys])
    ax.set_xticks([])
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(ys[0] - 0.6, ys[-1] + 0.6)
    for s in ("top", "right", "bottom"):
        ax.spines[s].set_visible(False)
    ax.legend(handles=[Line2D([], [], color=_color(1, 1), lw=2.5, label="positive score"),
                       Line2D([], [], color=_color(-1, 1), lw=2.5, label="negative score"),
                       Line2D([], [], color="#bbbbbb", lw=0.8, ls=":", label="heads sharing kv")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_title(title or f"circuit: {len(edges)} edges", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
# Interactive HTML (offline, inline SVG + JS)
# --------------------------------------------------------------------------------------------

_JS = r"""
(function(){
  const D = JSON.parse(document.getElementById('circuit-data').textContent);
  const svg = document.getElementById('cv-svg');
  const NS = 'http://www.w3.org/2000/svg';
  const H = D.height, px = x => 60 + x * D.sx, py = y => H - 30 - (y + 1) * D.sy;
  const vmax = Math.max(1e-12, ...D.edges.map(e => Math.abs(e.score)));
  function color(s){ const t = Math.max(-1, Math.min(1, s / vmax)), a = 0.25 + 0.75 * Math.abs(t);
    const b = t >= 0 ? [33,102,172] : [178,24,43];
    return 'rgb(' + b.map(c => Math.round(255 - a * (255 - c))).join(',') + ')'; }
  const info = document.getElementById('cv-info');
  const gE = document.createElementNS(NS, 'g'), gN = document.createElementNS(NS, 'g');
  svg.appendChild(gE); svg.appendChild(gN);
  const paths = [];
  // layer labels
  D.rows.forEach(r => { const t = document.createElementNS(NS, 'text');
    t.setAttribute('x', 8); t.setAttribute('y', py(r.y) + 4); t.setAttribute('class', 'cv-row');
    t.textContent = r.label; gN.appendChild(t); });
  D.ties.forEach(([a, b]) => { const l = document.createElementNS(NS, 'line');
    l.setAttribute('x1', px(D.pos[a][0])); l.setAttribute('y1', py(D.pos[a][1]));
    l.setAttribute('x2', px(D.pos[b][0])); l.setAttribute('y2', py(D.pos[b][1]));
    l.setAttribute('class', 'cv-tie'); gE.appendChild(l); });
  for (let i = D.edges.length - 1; i >= 0; i--) {
    const e = D.edges[i], [x1, y1] = D.pos[e.src], [x2, y2] = D.pos[e.dst];
    const X1 = px(x1), Y1 = py(y1) - 9, X2 = px(x2), Y2 = py(y2) + 9;
    // edges within one column bow sideways so they do not run through the nodes in between
    const bow = Math.abs(X2 - X1) < 30 ? Math.min(90, 12 + 7 * Math.abs(y2 - y1)) : 0;
    const p = document.createElementNS(NS, 'path');
    if (y1 === y2) {  // head -> MLP of the same layer: an arc under the row, not through its nodes
      const Yb = py(y1) + 9, dip = 14 + 0.04 * Math.abs(X2 - X1);
      p.setAttribute('d', `M${X1},${Yb} C${X1},${Yb + dip} ${X2},${Yb + dip} ${X2},${Yb}`);
    } else {
      p.setAttribute('d', `M${X1},${Y1} C${X1 + bow},${Y1 - (Y1 - Y2) / 3} ${X2 + bow},${Y2 + (Y1 - Y2) / 3} ${X2},${Y2}`);
    }
    p.setAttribute('stroke', color(e.score));
    p.setAttribute('stroke-width', (0.6 + 5 * Math.abs(e.score) / vmax).toFixed(2));
    p.setAttribute('class', 'cv-edge'); p.dataset.rank = i;
    const tt = document.createElementNS(NS, 'title'); tt.textContent = `${e.name}  score ${e.score.toPrecision(4)}`;
    p.appendChild(tt);
    p.addEventListener('mouseenter', () => { info.textContent = `edge ${e.name} · score ${e.score.toPrecision(4)} · rank ${i + 1} of ${D.edges.length}`; p.classList.add('hot'); });
    p.addEventListener('mouseleave', () => p.classList.remove('hot'));
    gE.appendChild(p); paths[i] = p;
  }
  const nodes = {};
  Object.entries(D.pos).forEach(([n, [x, y]]) => {
    const g = document.createElementNS(NS, 'g'); g.setAttribute('class', 'cv-node ' + D.kind[n]);
    const label = D.short[n], w = Math.max(30, 7 * label.length + 10);
    const r = document.createElementNS(NS, 'rect');
    r.setAttribute('x', px(x) - w / 2); r.setAttribute('y', py(y) - 9); r.setAttribute('width', w);
    r.setAttribute('height', 18); r.setAttribute('rx', 5);
    const t = document.createElementNS(NS, 'text'); t.setAttribute('x', px(x)); t.setAttribute('y', py(y) + 4);
    t.textContent = label;
    const tt = document.createElementNS(NS, 'title'); tt.textContent = n;
    g.appendChild(r); g.appendChild(t); g.appendChild(tt); gN.appendChild(g); nodes[n] = g;
    g.addEventListener('mouseenter', () => {
      const k = +slider.value; let ins = 0, outs = 0, s = 0;
      D.edges.slice(0, k).forEach(e => { if (e.dst === n) { ins++; s += Math.abs(e.score); } if (e.src === n) outs++; });
      info.textContent = `node ${n} · ${ins} incoming, ${outs} outgoing edges shown · Σ|score| in ${s.toPrecision(3)}`; });
  });
  const slider = document.getElementById('cv-k'), out = document.getElementById('cv-kval');
  function update(){ const k = +slider.value; out.textContent = `${k} of ${D.edges.length} edges`;
    const used = new Set(['logits']);
    paths.forEach((p, i) => { const on = i < k; p.style.display = on ? '' : 'none';
      if (on) { used.add(D.edges[i].src); used.add(D.edges[i].dst); } });
    Object.entries(nodes).forEach(([n, g]) => g.classList.toggle('off', !used.has(n))); }
  slider.addEventListener('input', update); update();
})();
"""

_CSS = """
.cv { font: 13px system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; color: #222; }
.cv-controls { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin: 6px 0; }
.cv-controls input[type=range] { width: min(420px, 60vw); }
#cv-info { min-height: 1.4em; color: #333; background: #f6f6f6; padding: 3px 8px; border-radius: 4px; }
.cv-wrap { overflow-x: auto; border: 1px solid #e3e3e3; border-radius: 6px; }
#cv-svg { display: block; max-width: 100%; height: auto; min-width: 640px; }
.cv-edge { fill: none; opacity: 0.8; } .cv-edge.hot { opacity: 1; stroke: #000 !important; }
.cv-tie { stroke: #c8c8c8; stroke-dasharray: 2 3; }
.cv-node rect { fill: #eef3f8; stroke: #566; stroke-width: 0.8; }
.cv-node.mlp rect { fill: #f8f0e6; } .cv-node.io rect { fill: #e9e9e9; } .cv-node.kv rect { fill: #f4f4fb; }
.cv-node text { font-size: 11px; text-anchor: middle; fill: #111; pointer-events: none; }
.cv-node.off rect { fill: #fff; stroke: #ddd; } .cv-node.off text { fill: #bbb; }
.cv-row { font-size: 11px; fill: #777; }
.cv-legend span { display: inline-block; width: 22px; height: 4px; vertical-align: middle; margin: 0 4px 0 10px; }
"""


def view_data(graph, max_edges: int | None = None) -> dict:
    pos = layout(graph)
    edges = circuit_edges(graph)
    if max_edges:
        edges = edges[:max_edges]
    width = max(x for x, _ in pos.values()) + 0.5
    ys = sorted({y for _, y in pos.values()})
    sx = 1100 / width if width < 12 else 92
    sy = 46 if len(ys) <= 12 else 36
    kind = {n: "io" if n in ("input", "logits") else "kv" if ".kv" in n else "mlp" if n.startswith("m") else "head"
            for n in pos}
    short = {n: n if kind[n] == "io" or kind[n] == "mlp" else n.split(".", 1)[1] for n in pos}
    rows = [{"y": y, "label": "embeddings" if y < 0 else "logits" if y == ys[-1] else f"layer {int(y)}"} for y in ys]
    return {"pos": pos, "edges": [{k: e[k] for k in ("src", "dst", "name", "score")} for e in edges],
            "ties": _kv_ties(graph), "kind": kind, "short": short, "rows": rows, "sx": sx, "sy": sy,
            "width": 60 + width * sx + 20, "height": 40 + len(ys) * sy + 10}


def html_fragment(graph, title: str = "", max_edges: int | None = None, initial: int | None = None) -> str:
    """A self-contained ``<div>`` (inline SVG, CSS and JS, no network) with the layered view and a
    slider for the number of edges kept (strongest |score| first)."""
    d = view_data(graph, max_edges)
    n = len(d["edges"])
    k0 = n if initial is None else max(0, min(n, initial))
    data = json.dumps(d, separators=(",", ":")).replace("</", "<\\/")
    return f"""<div class="cv">
<style>{_CSS}</style>
{f"<h3>{html.escape(title)}</h3>" if title else ""}
<div class="cv-controls"><label for="cv-k">edges kept (strongest first)</label>
<input id="cv-k" type="range" min="0" max="{n}" value="{k0}" step="1"><output id="cv-kval"></output>
<span class="cv-legend"><span style="background:{_color(1, 1)}"></span>positive score<span style="background:{_color(-1, 1)}"></span>negative score; width = |score|; dotted: query heads that share the key/value input kv</span></div>
<div id="cv-info">Hover over an edge or a node for its name and score.</div>
<div class="cv-wrap"><svg id="cv-svg" xmlns="http://www.w3.org/2000/svg" width="{d['width']:.0f}" height="{d['height']:.0f}" viewBox="0 0 {d['width']:.0f} {d['height']:.0f}" role="img" aria-label="layered circuit view"></svg></div>
<script type="application/json" id="circuit-data">{data}</script>
<script>{_JS}</script>
</div>"""


def write_html(graph, path: str | Path, title: str = "", max_edges: int | None = None,
               initial: int | None = None) -> Path:
    """A standalone offline HTML page with :func:`html_fragment`."""
    from factscope.runs import atomic_write_text

    body = html_fragment(graph, title, max_edges, initial)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title or "circuit")}</title><link rel="icon" href="data:,"></head>
<body style="margin:16px">{body}</body></html>
"""
    return atomic_write_text(Path(path), page)
