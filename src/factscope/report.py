"""Self-contained HTML reports for run directories.

``render_report(run)`` builds one HTML page from the run's files: config.json, summary.json,
sections.json, the CSV tables and PNG figures it names. Figures are inlined as base64 data
URIs and all styling is inline CSS, so the file works offline and can be mailed around. The
page uses no JavaScript and references no external URL.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from factscope.drilldown import DRILLDOWN_JS, facts_block, is_fact_table
from factscope.layout import CHECKPOINT_DIR, NON_DEFINING_KEYS

if TYPE_CHECKING:  # pragma: no cover
    from factscope.runs import Run

MAX_TABLE_ROWS = 30
MAX_CELL_CHARS = 120
SIG_DIGITS = 4

# Config keys shown first, in this order, under these labels.
_CONFIG_HEAD = [
    ("command", "command"),
    ("analysis", "analysis"),
    ("model", "model"),
    ("model_spec", "model as typed"),
    ("weights", "weights"),
    ("dtype", "dtype"),
    ("data", "data"),
    ("dataset", "dataset"),
    ("seed", "seed"),
]

CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg-soft:#f6f8fa; --accent:#0a5bb5; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 32px 64px; }
header.top { border-bottom: 1px solid var(--line); margin-bottom: 20px; padding-bottom: 12px; }
h1 { font-size: 26px; margin: 0 0 4px; line-height: 1.25; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p { margin: 8px 0; max-width: 78ch; }
ul { margin: 8px 0; padding-left: 22px; max-width: 78ch; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
  font-size: 13px; }
code { background: var(--bg-soft); padding: 1px 4px; border-radius: 4px; }
.muted { color: var(--muted); }
.subtitle { color: var(--muted); font-size: 13px; }
nav.toc { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px;
  padding: 10px 16px; margin: 16px 0 8px; font-size: 14px; }
nav.toc ol { margin: 4px 0; padding-left: 22px; }
nav.toc ol.long { columns: 2; column-gap: 32px; }
nav.toc li { break-inside: avoid; }
.kv { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 8px 0;
  font-size: 14px; }
.kv dt { color: var(--muted); font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 13px; padding-top: 1px; }
.kv dd { margin: 0; overflow-wrap: anywhere; }
.kv dd.num { font-variant-numeric: tabular-nums; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 10px; margin: 10px 0; }
td.holds { white-space: nowrap; font-weight: 600; }
td.holds .muted { font-weight: normal; }
table.facts tbody tr { cursor: pointer; } table.facts tbody tr:hover { background: #eef4fb; }
table.facts th { cursor: pointer; user-select: none; }
input.facts-search { font: inherit; padding: 4px 8px; width: min(420px, 100%); border: 1px solid var(--line);
  border-radius: 6px; }
.fact-panel { border: 1px solid var(--line); border-radius: 6px; padding: 8px 16px; margin: 12px 0; }
.fact-panel mark { background: #fff3b0; }
td.holds.yes { color: #1a7f37; } td.holds.no { color: #cf222e; } td.holds.unsure { color: var(--muted); }
details.numbers > summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
.card .k { color: var(--muted); font-size: 12px; overflow-wrap: anywhere;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.card .v { font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
figure { margin: 18px 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
iframe.figure-view { display: block; width: 100%; height: min(760px, 90vh); border: 1px solid #eee; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.table-wrap { display: inline-block; max-width: 100%; overflow-x: auto; margin: 12px 0 4px;
  border: 1px solid var(--line); border-radius: 6px; vertical-align: top; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #eaeef2; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; position: sticky; top: 0; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
tbody tr:last-child td { border-bottom: none; }
.table-note { color: var(--muted); font-size: 12px; margin: 2px 0 18px; }
.missing { color: #9a2b00; background: #fff4ec; border: 1px solid #f3c7a8; border-radius: 6px;
  padding: 6px 10px; font-size: 14px; }
.versions { font-size: 12px; color: var(--muted); margin-top: 6px; }
footer { margin-top: 48px; padding-top: 10px; border-top: 1px solid var(--line); color: var(--muted);
  font-size: 12px; }
@media print { nav.toc { display: none; } th { position: static; } }
"""


# --------------------------------------------------------------------------------------------
# formatting helpers


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_number(x: Any, digits: int = SIG_DIGITS) -> str:
    """Numbers for humans: ~4 significant digits, integers as integers, no needless exponent."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == 0:
        return "0"
    a = abs(v)
    if v.is_integer() and a < 1e15:
        return str(int(v))
    if 1e-3 <= a < 1e6:
        decimals = max(0, digits - 1 - int(math.floor(math.log10(a))))
        text = f"{v:.{decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text
    return f"{v:.{digits - 1}e}"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def format_value(value: Any, limit: int = 200) -> str:
    """A JSON value as short text (numbers formatted, lists/dicts compact)."""
    if _is_number(value):
        return format_number(value)
    if value is None:
        return "—"
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(_is_number(v) or isinstance(v, str) for v in value):
        text = "[" + ", ".join(format_number(v) if _is_number(v) else str(v) for v in value) + "]"
    else:
        text = json.dumps(value, ensure_ascii=False)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            items.extend(_flatten(v, key + "."))
        else:
            items.append((key, v))
    return items


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s or "section"


_BULLET_RE = re.compile(r"^\s*[-*] ")
_INLINE_RE = re.compile(r"(\*\*(?P<b>[^*]+?)\*\*|`(?P<c>[^`]+?)`)")


def _inline(text: str) -> str:
    """Escape text, then render **bold** and `code`."""
    out, pos = [], 0
    for m in _INLINE_RE.finditer(text):
        out.append(esc(text[pos : m.start()]))
        if m.group("b") is not None:
            out.append(f"<strong>{esc(m.group('b'))}</strong>")
        else:
            out.append(f"<code>{esc(m.group('c'))}</code>")
        pos = m.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def render_text(text: str) -> str:
    """Plain text to HTML: blank lines split paragraphs, runs of '- ' lines become lists,
    **bold** and `code` are rendered, everything else is escaped."""
    parts = []
    for block in re.split(r"\n\s*\n", (text or "").strip()):
        lines = [ln.rstrip() for ln in block.splitlines() if ln.strip()]
        i = 0
        while i < len(lines):
            j = i
            if _BULLET_RE.match(lines[i]):
                while j < len(lines) and _BULLET_RE.match(lines[j]):
                    j += 1
                items = "".join("<li>" + _inline(_BULLET_RE.sub("", ln)) + "</li>" for ln in lines[i:j])
                parts.append(f"<ul>{items}</ul>")
            else:
                while j < len(lines) and not _BULLET_RE.match(lines[j]):
                    j += 1
                parts.append("<p>" + "<br>\n".join(_inline(ln.strip()) for ln in lines[i:j]) + "</p>")
            i = j
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# blocks


def visible_whitespace(s: str) -> str:
    """Tokens as a reader can see them: leading/trailing spaces as ``␣``, newlines and tabs as ``↵``
    and ``⇥`` (a token " Paris" shows as "␣Paris", a lone space as "␣" instead of a blank cell)."""
    if not s or (s.strip() == s and "\n" not in s and "\t" not in s):
        return s
    s = s.replace("\n", "↵").replace("\t", "⇥")
    core = s.strip(" ")
    if not core:
        return "␣" * len(s)
    left = len(s) - len(s.lstrip(" "))
    right = len(s) - len(s.rstrip(" "))
    return "␣" * left + core + "␣" * right


def render_table(df: Any, name: str, max_rows: int = MAX_TABLE_ROWS, caption: str = "") -> str:
    """An HTML table of the first ``max_rows`` rows of ``df`` with numbers formatted."""
    import pandas as pd

    n = len(df)
    shown = df.head(max_rows)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    head = "".join(
        f'<th{" class=num" if isnum else ""} scope="col">{esc(c)}</th>' for c, isnum in zip(df.columns, numeric)
    )
    rows = []
    for values in shown.itertuples(index=False, name=None):
        cells = []
        for v, isnum in zip(values, numeric):
            if isnum or _is_number(v):
                text = format_number(v)
                cells.append(f"<td class=num>{esc(text)}</td>")
            else:
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    cells.append('<td class="muted">—</td>')
                    continue
                s = visible_whitespace(str(v))
                if len(s) > MAX_CELL_CHARS:
                    cells.append(f'<td title="{esc(s)}">{esc(s[: MAX_CELL_CHARS - 1])}…</td>')
                else:
                    cells.append(f"<td>{esc(s)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = (
        f'<div class="table-wrap"><table id="table-{esc(slug(name))}">'
        + (f"<caption class=muted>{esc(caption)}</caption>" if caption else "")
        + f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )
    fname = f"{name}.csv"
    if n > max_rows:
        note = f"first {max_rows} of {n} rows; full table in <code>{esc(fname)}</code>"
    else:
        m = len(df.columns)
        note = f"{n} row{'s' if n != 1 else ''}, {m} column{'s' if m != 1 else ''}; <code>{esc(fname)}</code>"
    return table + f'<p class="table-note">{note}</p>'


def render_interactive(spec_path: Path, alt: str, caption: str = "") -> str:
    """A Plotly figure from ``name.plotly.json`` (drawn by :data:`PLOTLY_INIT`); the data sit in a
    JSON script block with ``</`` escaped, so no data can close the block."""
    spec = spec_path.read_text(encoding="utf-8").replace("</", "<\\/")
    return _live_figure("interactive",
                        f'<div class="plotly-fig" role="img" aria-label="{esc(alt)}"></div>'
                        f'<script type="application/json" class="plotly-spec">{spec}</script>',
                        caption, spec_path.name[: -len(".plotly.json")] + ".png",
                        "hover for values, click a legend entry to hide it, drag to zoom, double-click to reset")


def _live_figure(cls: str, body: str, caption: str, png: str, how: str, also: str = "") -> str:
    """An interactive figure: ``body`` and a caption saying how to use it and where its PNG is."""
    return (f'<figure class="{cls}">{body}<figcaption>{esc(caption or png)} <span class=muted>(interactive: '
            f"{how}; static copy <code>{esc(png)}</code>{also})</span></figcaption></figure>")


# draws every interactive figure once Plotly's inlined JavaScript has loaded
PLOTLY_INIT = """
document.querySelectorAll('figure.interactive').forEach(function (f) {
  var spec = JSON.parse(f.querySelector('script.plotly-spec').textContent);
  Plotly.newPlot(f.querySelector('.plotly-fig'), spec.data, spec.layout,
                 {displaylogo: false, responsive: true, modeBarButtonsToRemove: ['sendDataToCloud']});
});
"""


def plotly_js() -> str:
    """Plotly's JavaScript bundle, from the installed ``plotly`` package (inlined: no network)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().replace("</script", "<\\/script")


def render_view(view: Path, alt: str, caption: str = "") -> str:
    """A figure's own interactive page (``name_view.html`` beside ``name.png``, e.g. the circuit's
    layered view) inside the report: a sandboxed iframe whose document is the page itself
    (``srcdoc``), so it works offline and its script sees only its own page."""
    doc = esc(view.read_text(encoding="utf-8"))
    return _live_figure("view", f'<iframe class="figure-view" title="{esc(alt)}" sandbox="allow-scripts" '
                                f'srcdoc="{doc}"></iframe>',
                        caption, view.name[: -len("_view.html")] + ".png",
                        "hover a node or an edge for its name and score, the slider sets how many edges are shown",
                        f", full page <code>{esc(view.name)}</code>")


def render_figure(path: Path, alt: str, caption: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = caption or path.name
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
        f"<figcaption>{esc(cap)}{'' if not caption else f' <span class=muted>({esc(path.name)})</span>'}"
        "</figcaption></figure>"
    )


def _missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}</p>'


# words for the abbreviations of summary keys ("All numbers" labels)
_LABEL_WORDS = {"ci95": "95% CI", "lo": "low", "hi": "high", "es": "ES", "mrr": "MRR", "hit1": "Hit@1",
                "hit10": "Hit@10", "attn": "attention", "mlp": "MLP", "n": "n", "lca": "LCA", "cpr": "CPR",
                "cmd": "CMD", "kl": "KL", "nll": "NLL", "p": "P", "std": "std"}


def readable_label(key: str) -> str:
    """A flattened summary key in words: ``flow_extraction.knockout_local_attn.none`` ->
    "Flow extraction › knockout local attention › none"."""
    parts = []
    for i, part in enumerate(key.split(".")):
        words = [_LABEL_WORDS.get(w, w) for w in part.split("_") if w]
        text = " ".join(words) or part
        parts.append(text[:1].upper() + text[1:] if i == 0 else text)
    return " › ".join(parts)


def _holds_cell(holds: Any) -> str:
    if holds is True:
        return '<td class="holds yes">✓ holds</td>'
    if holds is False:
        return '<td class="holds no">✗ does not hold</td>'
    return '<td class="holds unsure">? undecided</td>'


def findings_block(sections: list[Mapping[str, Any]]) -> str:
    """The report's first screen: one table of the papers' claims checked on this model (claim,
    paper, this model, holds), then each section's findings (plain sentences) under its title."""
    parts = []
    claims = [c for sec in sections for c in sec.get("claims") or []]
    if claims:
        rows = "".join(
            f"<tr><td>{esc(c.get('claim'))}</td><td>{esc(c.get('paper'))}</td><td>{esc(c.get('this_model'))}</td>"
            f"{_holds_cell(c.get('holds'))}</tr>" for c in claims)
        held = sum(c.get("holds") is True for c in claims)
        parts.append(f'<h3 id="claims">The papers\' claims on this model ({held} of {len(claims)} hold)</h3>'
                     '<div class="table-wrap"><table class="claims"><thead><tr><th>claim</th><th>paper</th>'
                     f"<th>this model</th><th>holds?</th></tr></thead><tbody>{rows}</tbody></table></div>")
    for sec in sections:
        items = [str(f) for f in sec.get("findings") or []]
        if items:
            anchor = "sec-" + slug(str(sec.get("key") or sec.get("title") or "section"))
            parts.append(f'<h3><a href="#{esc(anchor)}">{esc(sec.get("title") or sec.get("key"))}</a></h3>'
                         + "<ul>" + "".join(f"<li>{_inline(f)}</li>" for f in items) + "</ul>")
    return "\n".join(parts)


def _summary_block(summary: Mapping[str, Any]) -> str:
    """Every summary number, labelled in words (the raw key on hover), in one collapsed block."""
    if not summary:
        return '<p class="muted">No summary numbers recorded (yet).</p>'
    flat = _flatten(summary)
    scalars = [(k, v) for k, v in flat if _is_number(v) or isinstance(v, (bool, str)) or v is None]
    others = [(k, v) for k, v in flat if (k, v) not in scalars]
    parts = []
    short = [(k, v) for k, v in scalars if len(format_value(v)) <= 24]
    long = [(k, v) for k, v in scalars if len(format_value(v)) > 24] + others
    if short:
        parts.append(
            '<div class="cards">'
            + "".join(
                f'<div class="card" title="{esc(k)}"><div class="k">{esc(readable_label(k))}</div>'
                f'<div class="v">{esc(format_value(v))}</div></div>'
                for k, v in short
            )
            + "</div>"
        )
    if long:
        parts.append(
            '<dl class="kv">'
            + "".join(f'<dt title="{esc(k)}">{esc(readable_label(k))}</dt><dd>{esc(format_value(v, 400))}</dd>'
                      for k, v in long)
            + "</dl>"
        )
    n = len(short) + len(long)
    return (f'<details class="numbers"><summary>All numbers ({n}; summary.json, keys on hover)</summary>'
            + "\n".join(parts) + "</details>")


def _config_block(config: Mapping[str, Any]) -> str:
    cfg = dict(config)
    versions = cfg.pop("versions", None)
    created = cfg.pop("created_utc", None)
    resumed = cfg.pop("resumed_utc", None)
    rows: list[tuple[str, Any]] = []
    for key, label in _CONFIG_HEAD:
        if key in cfg:
            rows.append((label, cfg.pop(key)))
    for key in list(cfg):
        if key not in NON_DEFINING_KEYS:
            rows.append((key, cfg.pop(key)))
    rows.extend(cfg.items())  # runtime etc. last
    if created:
        rows.append(("created", created))
    if resumed:
        rows.append(("resumed", ", ".join(map(str, resumed)) if isinstance(resumed, list) else resumed))
    html_rows = "".join(
        f"<dt>{esc(k)}</dt><dd{' class=num' if _is_number(v) else ''}>{esc(format_value(v, 400))}</dd>"
        for k, v in rows
    )
    out = f'<dl class="kv">{html_rows}</dl>'
    if isinstance(versions, Mapping) and versions:
        out += '<p class="versions">versions: ' + " · ".join(
            f"{esc(k)} {esc(v if v is not None else 'n/a')}" for k, v in versions.items()
        ) + "</p>"
    return out


def _default_sections(run: "Run") -> list[dict[str, Any]]:
    """When a run has no sections.json, show every figure and table it holds."""
    sections = []
    figs = run.figures()
    tabs = run.tables()
    if figs:
        sections.append({"key": "figures", "title": "Figures", "text": "",
                         "figures": [{"name": f, "caption": ""} for f in figs], "tables": []})
    if tabs:
        sections.append({"key": "tables", "title": "Tables", "text": "", "figures": [],
                         "tables": [{"name": t, "caption": ""} for t in tabs]})
    return sections


def _as_item(entry: Any) -> dict[str, str]:
    if isinstance(entry, Mapping):
        return {"name": str(entry.get("name", "")), "caption": str(entry.get("caption", "") or "")}
    return {"name": str(entry), "caption": ""}


_FILE_KINDS = {"config.json": "the options that define the run", "summary.json": "every headline number",
               "sections.json": "the report's layout, findings and claims",
               "graph.json": "the circuit graph: every edge's score and membership (factscope's format)",
               "circuit_eap.json": "the circuit in EAP-IG/MIB's graph format",
               "circuit_view.html": "the circuit's interactive layered view"}


def _file_note(name: str, used: Mapping[str, str]) -> str:
    """What a run file holds, in words: its kind and the report section that shows it."""
    stem = name.split(".")[0]
    if name in _FILE_KINDS:
        return _FILE_KINDS[name]
    if name.endswith(".plotly.json"):
        what = "interactive copy of the figure (same numbers)"
    elif name.endswith(".png"):
        what = "figure"
    elif name.endswith(".csv"):
        what = "table"
    else:
        what = "data"
    where = used.get(stem)
    if where is None and what == "table" and is_fact_table(stem):
        where = "Facts"
    return f"{what}, in “{where}”" if where else f"{what} (not shown in the report)"


def _files_block(run: "Run") -> str:
    used: dict[str, str] = {}
    for sec in run.sections:
        for item in [*(sec.get("figures") or []), *(sec.get("tables") or [])]:
            used.setdefault(_as_item(item)["name"], str(sec.get("title") or sec.get("key")))
    rows = []
    for p in sorted(run.dir.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix not in (".csv", ".png", ".json", ".html") \
                or p.name == "report.html":
            continue
        rows.append((p.name, f"{_file_note(p.name, used)} · {_size(p.stat().st_size)}"))
    ck_dir = run.dir / CHECKPOINT_DIR
    if ck_dir.is_dir():
        for p in sorted(ck_dir.glob("*.jsonl")):
            try:
                n = _count_lines(p)
                rows.append((f"{CHECKPOINT_DIR}/{p.name}", f"{n} finished unit{'s' if n != 1 else ''}"))
            except OSError:
                continue
    if not rows:
        return ""
    return '<dl class="kv">' + "".join(f"<dt>{esc(a)}</dt><dd>{esc(b)}</dd>" for a, b in rows) + "</dl>"


def _count_lines(path: Path) -> int:
    # count complete lines only (a truncated last line is not a finished unit)
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n") and line.strip())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def default_title(run: "Run") -> str:
    cfg = run.config
    if cfg.get("title"):
        return str(cfg["title"])
    what = cfg.get("command") or cfg.get("analysis")
    model = cfg.get("model")
    parts = ["factscope"]
    if what:
        parts.append(str(what))
    title = " ".join(parts)
    if model:
        title += f" — {model}"
    return title


# --------------------------------------------------------------------------------------------
# page


def _weights_text(config: Mapping[str, Any]) -> str:
    """Header line naming the weights (e.g. a dequantized 4-bit GGUF file) and the dtype, escaped."""
    weights, dtype = config.get("weights"), config.get("dtype")
    if isinstance(weights, Mapping):
        text = "; ".join(f"{m}: {w}" for m, w in weights.items())
    else:
        text = str(weights) if weights else ""
    if not text and not dtype:
        return ""
    parts = [f"weights {esc(text)}"] if text else []
    if dtype:
        parts.append(f"run in {esc(dtype)}")
    return ", ".join(parts)


def render_report(run: "Run", title: str | None = None, static: bool = False) -> str:
    """The whole report page for ``run`` as an HTML string (``static``: PNG figures only)."""
    title = title or default_title(run)
    sections = run.sections or _default_sections(run)
    summary = run.summary

    toc = []
    body = []
    used_ids = {"summary", "config", "files", "findings", "claims"}
    findings = findings_block(sections)
    if findings:
        toc.append(("findings", "Findings"))
        body.append(f'<h2 id="findings">Findings</h2>\n{findings}')
    toc += [("summary", "All numbers"), ("config", "Configuration")]
    body.append(f'<h2 id="summary">All numbers</h2>\n{_summary_block(summary)}')
    body.append(f'<h2 id="config">Configuration</h2>\n{_config_block(run.config)}')

    interactive = False
    for sec in sections:
        sec_title = str(sec.get("title") or sec.get("key") or "Section")
        anchor = "sec-" + slug(str(sec.get("key") or sec_title))
        base, i = anchor, 2
        while anchor in used_ids:
            anchor, i = f"{base}-{i}", i + 1
        used_ids.add(anchor)
        toc.append((anchor, sec_title))
        parts = [f'<section id="{esc(anchor)}"><h2>{esc(sec_title)}</h2>']
        if sec.get("text"):
            parts.append(render_text(str(sec["text"])))
        for fig in map(_as_item, sec.get("figures") or []):
            name = fig["name"]
            path = run.dir / f"{name}.png"
            spec = run.dir / f"{name}.plotly.json"
            view = run.dir / f"{name}_view.html"
            alt = f"{sec_title}: {fig['caption'] or name}"
            if view.is_file() and not static:
                parts.append(render_view(view, alt=alt, caption=fig["caption"]))
            elif spec.is_file() and not static:
                parts.append(render_interactive(spec, alt=alt, caption=fig["caption"]))
                interactive = True
            elif path.is_file():
                parts.append(render_figure(path, alt=alt, caption=fig["caption"]))
            else:
                parts.append(_missing(f"figure {name}.png is missing from this run (not written yet?)"))
        for tab in map(_as_item, sec.get("tables") or []):
            name = tab["name"]
            try:
                df = run.load_table(name)
            except Exception as e:  # a broken table should not break the whole report
                parts.append(_missing(f"table {name}.csv could not be read: {e}"))
                continue
            if df is None:
                parts.append(_missing(f"table {name}.csv is missing from this run (not written yet?)"))
                continue
            if tab["caption"]:
                parts.append(f"<h3>{esc(tab['caption'])}</h3>")
            parts.append(render_table(df, name))
        parts.append("</section>")
        body.append("\n".join(parts))

    facts = "" if static else facts_block(run)
    if facts:
        toc.append(("facts", "Facts"))
        body.append(facts)
    files = _files_block(run)
    if files:
        toc.append(("files", "Files in this run"))
        body.append(f'<h2 id="files">Files in this run</h2>\n<p class="muted">Directory <code>{esc(run.dir.resolve())}</code></p>\n{files}')

    import factscope

    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    created = run.config.get("created_utc")
    subtitle_bits = [f"run directory <code>{esc(run.dir.name or str(run.dir))}</code>"]
    weights = _weights_text(run.config)
    if weights:
        subtitle_bits.append(weights)
    if created:
        subtitle_bits.append(f"started {esc(created)}")
    toc_html = (
        '<nav class="toc" aria-label="Contents"><strong>Contents</strong>'
        + ('<ol class="long">' if len(toc) > 8 else "<ol>")
        + "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t in toc)
        + "</ol></nav>"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="factscope {esc(factscope.__version__)}">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<style>{CSS}</style>
</head>
<body>
<main>
<header class="top">
<h1>{esc(title)}</h1>
<div class="subtitle">{" · ".join(subtitle_bits)}</div>
{toc_html}
</header>
{chr(10).join(body)}
{f"<script>{plotly_js()}</script><script>{PLOTLY_INIT}</script>" if interactive or facts else ""}
{f"<script>{DRILLDOWN_JS}</script>" if facts else ""}
<footer>Generated by factscope {esc(factscope.__version__)} on {esc(generated)}.
Re-render with <code>factscope report {esc(run.dir)}</code>.</footer>
</main>
</body>
</html>
"""


# --------------------------------------------------------------------------------------------
# comparison of runs


def render_comparison(runs: list["Run"]) -> str:
    """One page comparing runs side by side (e.g. two models on the same analysis): each run's
    model and weights, the papers' claims with one verdict column per run (claims matched by their
    text), each run's findings, and every summary number per run with the difference to the first."""
    names = [f"{r.config.get('model') or r.dir.name} ({r.dir.name})" for r in runs]
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    parts = ["<h2 id=\"runs\">Runs</h2><div class=\"table-wrap\"><table><thead><tr><th></th>" + head
             + "</tr></thead><tbody>"]
    for key in ("analysis", "command", "model", "weights", "dataset", "limit", "seed"):
        vals = [r.config.get(key) for r in runs]
        if any(v is not None for v in vals):
            parts.append(f"<tr><td>{esc(key)}</td>" + "".join(f"<td>{esc(format_value(v))}</td>" for v in vals)
                         + "</tr>")
    parts.append("</tbody></table></div>")
    claims: dict[str, list] = {}
    for i, r in enumerate(runs):
        for sec in r.sections:
            for c in sec.get("claims") or []:
                claims.setdefault(str(c.get("claim")), [None] * len(runs))[i] = c
    if claims:
        rows = []
        for text, per in claims.items():
            cells = "".join(_holds_cell(c.get("holds")).replace("</td>", f"<br><span class=muted>"
                                                                  f"{esc(c.get('this_model'))}</span></td>")
                            if c else '<td class="muted">—</td>' for c in per)
            rows.append(f"<tr><td>{esc(text)}</td>{cells}</tr>")
        parts.append("<h2 id=\"claims\">The papers' claims</h2><div class=\"table-wrap\"><table class=\"claims\">"
                     f"<thead><tr><th>claim</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
    parts.append("<h2 id=\"findings\">Findings</h2><div class=\"compare\">"
                 + "".join(f"<div><h3>{esc(n)}</h3>{findings_block([dict(s, claims=[]) for s in r.sections])}</div>"
                           for n, r in zip(names, runs)) + "</div>")
    flat = [dict(_flatten(r.summary)) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    rows = []
    for k in keys:
        vals = [f.get(k) for f in flat]
        if not all(v is None or _is_number(v) or isinstance(v, (str, bool)) for v in vals):
            continue
        cells = "".join(f"<td class=num>{esc(format_value(v))}</td>" for v in vals)
        base = vals[0]
        diffs = "".join(
            f"<td class=num>{esc(format_number(v - base)) if _is_number(v) and _is_number(base) and i else ''}</td>"
            for i, v in enumerate(vals))
        rows.append(f'<tr><td title="{esc(k)}">{esc(readable_label(k))}</td>{cells}{diffs}</tr>')
    dh = "".join(f"<th>− first ({esc(n)})</th>" if i else "<th></th>" for i, n in enumerate(names))
    parts.append("<h2 id=\"numbers\">All numbers</h2><div class=\"table-wrap\"><table><thead><tr><th>number</th>"
                 f"{head}{dh}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
    title = "factscope comparison: " + " vs ".join(names)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<style>{CSS}
.compare {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 16px; }}</style>
</head>
<body>
<main>
<header class="top"><h1>{esc(title)}</h1>
<div class="subtitle">{" · ".join(esc(str(r.dir)) for r in runs)}</div></header>
{chr(10).join(parts)}
</main>
</body>
</html>
"""
