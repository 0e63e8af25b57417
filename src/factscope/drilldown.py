"""Per-fact drill-down for the report: one searchable, sortable table of the run's facts, and for
a chosen fact its prompt (subject highlighted) and its own curves from every analysis of the run.

What holds per-fact data is one table, :data:`SERIES`: a table name suffix, the column naming the
fact, and how its rows become curves (x column, y column, one line per value of a group column).
Facts are listed from the first of :data:`FACT_TABLES` the run has. The data are embedded once as
compact JSON; the browser builds table rows a page at a time and a fact's panel only when opened.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from factscope.runs import Run

# tables listing facts: (name suffix, id column, columns shown in the facts table)
FACT_TABLES = [
    ("known_facts", "id", ["id", "subject", "prompt", "target", "top1", "rank", "known"]),
    ("facts", "id", ["id", "subject", "prompt", "target"]),
    ("hijack_results", "fact_id", ["fact_id", "subject", "prompt", "target_true", "target_false"]),
    ("lens", "fact", ["fact", "subject"]),
]


@dataclass(frozen=True)
class Series:
    """Rows of a per-fact table drawn as one small chart per fact."""

    suffix: str  # table name, or its ending (flow_knockout_facts, knockout_facts)
    key: str  # column naming the fact
    x: str
    y: str
    group: str | None  # one line per value
    title: str
    y_label: str
    transform: str = ""  # "exp": y = exp(column) (log-probabilities shown as probabilities)


SERIES = [
    Series("knockout_facts", "key", "layer", "change", "set", "Attention knockout",
           "% change of P(top-1)"),
    Series("hijack_results", "fact_id", "n", "lp_true", "scheme", "Hijacking: P(true target)",
           "P(true target)", "exp"),
    Series("hijack_results", "fact_id", "n", "lp_false", "scheme", "Hijacking: P(false target)",
           "P(false target)", "exp"),
    Series("lens", "fact", "layer", "rank_last", None, "Logit lens at the last position",
           "rank of the target (0 = top)"),
    Series("trace", "key", "layer", "effect", "kind", "Causal tracing (all positions)", "indirect effect"),
]


def _ends(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("_" + suffix)


def _tables_ending(run: "Run", suffix: str) -> list[str]:
    return [t for t in run.tables() if _ends(t, suffix)]


def is_fact_table(name: str) -> bool:
    """Whether the Facts section reads the table ``name`` (a listing or per-fact curves)."""
    return any(_ends(name, s) for s in [*(f[0] for f in FACT_TABLES), *(s.suffix for s in SERIES)])


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        v = v.item()
    return v


def facts_data(run: "Run") -> dict | None:
    """``{"columns": [...], "rows": [[...], ...], "series": {fact id: [chart, ...]}}`` or None when
    the run lists no facts. A chart: ``{"title", "x", "y", "lines": {name: [[x, y], ...]}}``."""
    import numpy as np

    listing = None
    for suffix, key, cols in FACT_TABLES:
        for name in _tables_ending(run, suffix):
            df = run.load_table(name)
            if df is not None and key in df.columns and len(df):
                keep = [c for c in cols if c in df.columns]
                df = df[keep].drop_duplicates(subset=[key])
                listing = (key, keep, df)
                break
        if listing:
            break
    if listing is None:
        return None
    key, cols, df = listing
    ids = set(df[key].astype(str))
    series: dict[str, list] = {}
    for s in SERIES:
        for name in _tables_ending(run, s.suffix):
            t = run.load_table(name)
            if t is None or not {s.key, s.x, s.y} <= set(t.columns):
                continue
            t = t[t[s.key].astype(str).isin(ids)]
            if s.group == "kind" and "position" in t.columns:  # trace: the strongest position per layer
                t = t.groupby([s.key, s.group, s.x], as_index=False)[s.y].max()
            for fid, g in t.groupby(t[s.key].astype(str), sort=False):
                lines: dict[str, list] = {}
                groups = g.groupby(s.group, sort=False) if s.group and s.group in g.columns else [("", g)]
                for gname, gg in groups:
                    gg = gg.sort_values(s.x)
                    y = np.exp(gg[s.y].to_numpy(float)) if s.transform == "exp" else gg[s.y].to_numpy(float)
                    lines[str(gname)] = [[_clean(a), _clean(round(float(b), 5))] for a, b in zip(gg[s.x].tolist(), y)]
                series.setdefault(fid, []).append({"title": s.title + (f" ({name})" if name != s.suffix else ""),
                                                   "x": s.x, "y": s.y_label, "lines": lines})
    rows = [[_clean(v) for v in r] for r in df.itertuples(index=False, name=None)]
    return {"columns": cols, "key": key, "rows": rows, "series": series}


# the client side: table pages, search, sort, and a fact's panel drawn on demand
DRILLDOWN_JS = r"""
(function () {
  var box = document.getElementById('facts'); if (!box) return;
  var D = JSON.parse(document.getElementById('facts-data').textContent);
  var cols = D.columns, rows = D.rows.slice(), shown = 50, sortCol = -1, sortDir = 1;
  var body = box.querySelector('tbody'), count = box.querySelector('.facts-count');
  var search = box.querySelector('input.facts-search'), more = box.querySelector('button.facts-more');
  var panel = box.querySelector('.fact-panel');
  function esc(s) { return String(s == null ? '' : s).replace(/[&<>"]/g, function (c) {
    return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; }); }
  function vis(s) { s = String(s == null ? '' : s); return s.replace(/^ +| +$/g, function (m) { return '\u2423'.repeat(m.length); }); }
  function matches() {
    var q = search.value.trim().toLowerCase();
    return q ? rows.filter(function (r) { return r.join(' ').toLowerCase().indexOf(q) >= 0; }) : rows;
  }
  function draw() {
    var m = matches(); body.innerHTML = '';
    m.slice(0, shown).forEach(function (r) {
      var tr = document.createElement('tr'); tr.tabIndex = 0; tr.dataset.id = r[cols.indexOf(D.key)];
      tr.innerHTML = r.map(function (v) { return '<td>' + esc(vis(v)) + '</td>'; }).join('');
      tr.addEventListener('click', function () { open(tr.dataset.id, r); });
      body.appendChild(tr);
    });
    count.textContent = m.length + ' of ' + rows.length + ' facts' + (m.length > shown ? ', first ' + shown + ' shown' : '');
    more.style.display = m.length > shown ? '' : 'none';
  }
  function open(id, r) {
    var info = {}; cols.forEach(function (c, i) { info[c] = r[i]; });
    var prompt = esc(info.prompt || ''), subj = esc(info.subject || '');
    if (subj && prompt.indexOf(subj) >= 0) prompt = prompt.replace(subj, '<mark>' + subj + '</mark>');
    var html = '<h3>' + esc(id) + '</h3><p class="fact-prompt">' + prompt + ' <strong>' +
      esc(vis(info.target || info.target_true || '')) + '</strong></p><dl class="kv">' +
      cols.map(function (c) { return '<dt>' + esc(c) + '</dt><dd>' + esc(vis(info[c])) + '</dd>'; }).join('') + '</dl>';
    var charts = D.series[id] || [];
    if (!charts.length) html += '<p class="muted">No per-fact curves for this fact in this run.</p>';
    panel.innerHTML = html; panel.hidden = false;
    charts.forEach(function (c) {
      var div = document.createElement('div'); div.className = 'fact-chart'; panel.appendChild(div);
      var data = Object.keys(c.lines).map(function (k) {
        var pts = c.lines[k];
        return {type: 'scatter', mode: 'lines+markers', name: k || c.title,
                x: pts.map(function (p) { return p[0]; }), y: pts.map(function (p) { return p[1]; })};
      });
      if (window.Plotly) Plotly.newPlot(div, data, {title: {text: c.title, font: {size: 13}}, height: 280,
        margin: {l: 55, r: 10, t: 40, b: 40}, xaxis: {title: {text: c.x}}, yaxis: {title: {text: c.y}},
        legend: {orientation: 'h'}}, {displaylogo: false, responsive: true});
    });
    panel.scrollIntoView({block: 'nearest'});
  }
  search.addEventListener('input', function () { shown = 50; draw(); });
  more.addEventListener('click', function () { shown += 200; draw(); });
  box.querySelectorAll('thead th').forEach(function (th, i) {
    th.addEventListener('click', function () {
      sortDir = sortCol === i ? -sortDir : 1; sortCol = i;
      rows.sort(function (a, b) {
        var x = a[i], y = b[i];
        if (typeof x === 'number' && typeof y === 'number') return sortDir * (x - y);
        return sortDir * String(x).localeCompare(String(y));
      });
      draw();
    });
  });
  draw();
})();
"""


def facts_block(run: "Run") -> str:
    """The "Facts" section (table, search, panel) with its data, or "" when the run lists no facts."""
    from factscope.report import esc

    data = facts_data(run)
    if data is None:
        return ""
    head = "".join(f'<th scope="col" title="click to sort">{esc(c)}</th>' for c in data["columns"])
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return (
        '<section id="facts"><h2>Facts</h2>'
        f'<p class="muted">Every fact of this run ({len(data["rows"])}). Search, sort by a column, and click a '
        "fact to see its prompt (subject highlighted), its numbers and its own curves from each analysis. "
        "Ranks are 0-based (0 = the top token); spaces at a token's ends show as ␣.</p>"
        '<input class="facts-search" type="search" placeholder="search facts (any column)" aria-label="search facts">'
        ' <span class="facts-count muted"></span>'
        f'<div class="table-wrap"><table class="facts"><thead><tr>{head}</tr></thead><tbody></tbody></table></div>'
        '<button class="facts-more" type="button">show more</button>'
        '<div class="fact-panel" hidden></div>'
        f'<script type="application/json" id="facts-data">{payload}</script></section>'
    )
