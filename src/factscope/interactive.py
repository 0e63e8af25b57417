"""Interactive copies of factscope's matplotlib figures, for the offline HTML report.

``to_plotly(fig)`` turns a matplotlib figure into a Plotly figure specification (a JSON-able dict
of ``data`` and ``layout``) holding the same numbers: every line (label, colour, dashes, markers),
the bands drawn with ``fill_between``, scatter points, bars, and ``imshow`` heat maps (with their
colour map sampled), each axes at its place in the figure with its title, axis labels, tick labels,
log scales and inverted axes. The report draws it with Plotly's JavaScript, inlined once per page
(hover shows the values, a click on a legend entry hides a series, drag zooms, double-click
resets). Text drawn in the plot (node labels, annotated cells) becomes Plotly annotations. A
figure holding an artist the converter does not know (anything beyond the above and error bars)
gives ``None``:
the report then shows the PNG, never a partial interactive copy.
PNG files stay on disk for papers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DASHES = {"-": "solid", "--": "dash", ":": "dot", "-.": "dashdot"}
MARKERS = {"o": "circle", "s": "square", "^": "triangle-up", "v": "triangle-down", "D": "diamond",
           "x": "x", "+": "cross", "*": "star", ".": "circle", "d": "diamond"}


def _color(c: Any, alpha: float | None = None) -> str:
    from matplotlib.colors import to_rgba

    r, g, b, a = to_rgba(c)
    if alpha is not None:
        a = alpha
    return f"rgba({round(255 * r)},{round(255 * g)},{round(255 * b)},{a:.3g})"


def _num(a: Any) -> list:
    """A list of JSON numbers (NaN and infinities as None: gaps in a line)."""
    out = []
    for v in np.asarray(a, dtype=float).ravel().tolist():
        out.append(v if math.isfinite(v) else None)
    return out


def _label(artist: Any) -> str | None:
    lab = artist.get_label()
    return None if not lab or lab.startswith("_") else str(lab)


class Unsupported(Exception):
    """The figure holds an artist that cannot be converted faithfully."""


def _axis_spec(ax: Any, which: str) -> dict:
    axis = ax.xaxis if which == "x" else ax.yaxis
    lim = ax.get_xlim() if which == "x" else ax.get_ylim()
    log = (ax.get_xscale() if which == "x" else ax.get_yscale()) == "log"
    spec: dict[str, Any] = {"title": {"text": axis.get_label().get_text()}, "showgrid": True, "zeroline": False,
                            "automargin": True}
    lo, hi = lim
    if log:
        spec["type"] = "log"
        lo, hi = (math.log10(v) if v > 0 else None for v in (lo, hi))
    if lo is not None and hi is not None:
        spec["range"] = [lo, hi]  # inverted axes keep matplotlib's reversed limits
    ticks = [t for t in axis.get_ticklabels() if t.get_text()]
    locs = axis.get_ticklocs()
    texts = [t.get_text() for t in axis.get_ticklabels()]
    if ticks and not log and any(not _is_plain_number(t) for t in texts if t):
        spec["tickvals"] = _num(locs[: len(texts)])
        spec["ticktext"] = texts[: len(locs)]
    return spec


def _is_plain_number(text: str) -> bool:
    try:
        float(text.replace("\\mathdefault", "").replace("−", "-").replace("$", "").replace("{", "").replace("}", "").replace("^", "e"))
        return True
    except ValueError:
        return False


def _image_trace(im: Any, ax: Any, xa: str, ya: str) -> dict:
    z = np.asarray(im.get_array(), dtype=float)
    if z.ndim != 2:
        raise Unsupported("an RGB image")
    x0, x1, y0, y1 = im.get_extent()
    ny, nx = z.shape
    dx, dy = (x1 - x0) / nx, (y1 - y0) / ny
    xs = [x0 + dx * (i + 0.5) for i in range(nx)]
    ys = [y0 + dy * (j + 0.5) for j in range(ny)]
    if im.origin == "upper":  # row 0 at the top: extent's y runs from bottom (y0) to top (y1) of rows n-1..0
        ys = ys[::-1]
    cmap, norm = im.get_cmap(), im.norm
    stops = np.linspace(0, 1, 11)
    scale = [[float(s), _color(cmap(float(s)))] for s in stops]
    tr = {"type": "heatmap", "z": [_num(row) for row in z], "x": _num(xs), "y": _num(ys), "colorscale": scale,
          "xaxis": xa, "yaxis": ya, "showscale": False, "hovertemplate": "x %{x}<br>y %{y}<br>value %{z:.4g}<extra></extra>"}
    if norm.vmin is not None and norm.vmax is not None:
        tr.update(zmin=float(norm.vmin), zmax=float(norm.vmax))
    return tr


def _text_note(t: Any, ax: Any, xa: str, ya: str) -> dict:
    """A Plotly annotation for text drawn in data or axes coordinates, or blended (x in data, y in axes
    or the reverse: a label beside a reference line); anything else: Unsupported."""
    x, y = t.get_position()
    tr = t.get_transform()
    # (transform, x in data coordinates, y in data coordinates); otherwise axes coordinates
    kinds = ((ax.transData, True, True), (ax.transAxes, False, False),
             (ax.get_xaxis_transform(), True, False), (ax.get_yaxis_transform(), False, True))
    for ref, x_data, y_data in kinds:
        if tr == ref:
            break
    else:
        raise Unsupported("text placed in other coordinates")
    xref, yref = (xa if x_data else f"{xa} domain"), (ya if y_data else f"{ya} domain")
    if x_data and ax.get_xscale() == "log" and x > 0:
        x = math.log10(x)
    if y_data and ax.get_yscale() == "log" and y > 0:
        y = math.log10(y)
    ha = {"left": "left", "right": "right"}.get(t.get_horizontalalignment(), "center")
    va = {"top": "top", "bottom": "bottom", "baseline": "bottom"}.get(t.get_verticalalignment(), "middle")
    return {"x": x, "y": y, "xref": xref, "yref": yref, "text": t.get_text().replace("\n", "<br>"),
            "showarrow": False, "xanchor": ha, "yanchor": va, "textangle": -t.get_rotation(),
            "font": {"size": max(8, t.get_fontsize() - 1), "color": _color(t.get_color())}}


def _axes_traces(ax: Any, xa: str, ya: str, legend_seen: set, layout_notes: list) -> list[dict]:
    from matplotlib.collections import LineCollection, PathCollection, PolyCollection
    from matplotlib.image import AxesImage
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
    from matplotlib.text import Text

    traces: list[dict] = []
    bars: dict[tuple, dict] = {}
    notes = layout_notes
    for art in ax.get_children():
        if not art.get_visible():
            continue
        if isinstance(art, Line2D):
            x, y = art.get_xdata(orig=False), art.get_ydata(orig=False)
            if len(np.atleast_1d(x)) == 0:
                continue
            if art.get_transform() != ax.transData:
                # axvline/axhline: data coordinates on one axis only
                xd, yd = np.asarray(art.get_xdata(), float), np.asarray(art.get_ydata(), float)
                if len(xd) == 2 and xd[0] == xd[1]:
                    lo, hi = ax.get_ylim()
                    x, y = [xd[0], xd[0]], [lo, hi]
                elif len(yd) == 2 and yd[0] == yd[1]:
                    lo, hi = ax.get_xlim()
                    x, y = [lo, hi], [yd[0], yd[0]]
                else:
                    raise Unsupported("a line not in data coordinates")
            ls = art.get_linestyle()
            marker = art.get_marker()
            mode = "lines" if ls not in ("None", "", " ") else ""
            if marker not in (None, "None", "", " "):
                mode = (mode + "+markers") if mode else "markers"
            if not mode:
                continue
            name = _label(art)
            tr = {"type": "scatter", "x": _num(x), "y": _num(y), "mode": mode, "xaxis": xa, "yaxis": ya,
                  "line": {"color": _color(art.get_color(), art.get_alpha()), "width": art.get_linewidth(),
                           "dash": DASHES.get(ls, "solid")},
                  "name": name or "", "showlegend": bool(name) and name not in legend_seen,
                  "legendgroup": name or None}
            if "markers" in mode:
                tr["marker"] = {"symbol": MARKERS.get(str(marker), "circle"), "size": max(4, art.get_markersize()),
                                "color": _color(art.get_markerfacecolor(), art.get_alpha())}
            if name:
                legend_seen.add(name)
            traces.append(tr)
        elif isinstance(art, PolyCollection) and not isinstance(art, LineCollection):
            for path, fc in zip(art.get_paths(), _facecolors(art, len(art.get_paths()))):
                v = path.vertices
                traces.append({"type": "scatter", "x": _num(v[:, 0]), "y": _num(v[:, 1]), "fill": "toself",
                               "mode": "lines", "line": {"width": 0}, "fillcolor": fc, "hoverinfo": "skip",
                               "showlegend": False, "xaxis": xa, "yaxis": ya, "legendgroup": _label(art)})
        elif isinstance(art, PathCollection):
            off = art.get_offsets()
            if len(off) == 0:
                continue
            name = _label(art)
            fcs = _facecolors(art, len(off))
            traces.append({"type": "scatter", "x": _num(off[:, 0]), "y": _num(off[:, 1]), "mode": "markers",
                           "marker": {"color": fcs, "size": 7}, "name": name or "", "xaxis": xa, "yaxis": ya,
                           "showlegend": bool(name) and name not in legend_seen})
            if name:
                legend_seen.add(name)
        elif isinstance(art, Rectangle):
            if art is ax.patch or not art.get_visible() or art.get_width() == 0 and art.get_height() == 0:
                continue
            cont = _container_of(ax, art)
            if cont is None:
                raise Unsupported("a rectangle outside a bar chart")
            key = id(cont)
            x0, y0, w, h = art.get_x(), art.get_y(), art.get_width(), art.get_height()
            horizontal = getattr(cont, "orientation", "vertical") == "horizontal"
            b = bars.setdefault(key, {"type": "bar", "x": [], "y": [], "base": [], "width": [],
                                      "orientation": "h" if horizontal else "v", "xaxis": xa, "yaxis": ya,
                                      "marker": {"color": []}, "name": _label(cont) or "",
                                      "showlegend": bool(_label(cont))})
            if horizontal:
                b["x"].append(w), b["y"].append(y0 + h / 2), b["base"].append(x0), b["width"].append(h)
            else:
                b["x"].append(x0 + w / 2), b["y"].append(h), b["base"].append(y0), b["width"].append(w)
            b["marker"]["color"].append(_color(art.get_facecolor()))
        elif isinstance(art, AxesImage):
            traces.append(_image_trace(art, ax, xa, ya))
        elif isinstance(art, Text):
            if art in ax.texts and art.get_text().strip():
                notes.append(_text_note(art, ax, xa, ya))
            continue  # titles and axis labels go to the layout
        elif art in (ax.xaxis, ax.yaxis) or art.__class__.__name__ in ("Spine", "Legend", "Line2D"):
            continue
        elif isinstance(art, LineCollection):  # error bars, vlines/hlines: drawn as they are, no hover
            segs = art.get_segments()
            if not len(segs):
                continue
            xs, ys = [], []
            for seg in segs:
                xs += _num(np.asarray(seg)[:, 0]) + [None]
                ys += _num(np.asarray(seg)[:, 1]) + [None]
            colors = art.get_color()
            traces.append({"type": "scatter", "x": xs, "y": ys, "mode": "lines", "hoverinfo": "skip",
                           "showlegend": False, "xaxis": xa, "yaxis": ya,
                           "line": {"color": _color(colors[0] if len(colors) else "black"),
                                    "width": float(np.atleast_1d(art.get_linewidth())[0])}})
        else:
            raise Unsupported(type(art).__name__)
    for b in bars.values():
        b["x"], b["y"], b["base"], b["width"] = (_num(b[k]) for k in ("x", "y", "base", "width"))
        traces.append(b)
    return traces


def _facecolors(coll: Any, n: int) -> list[str]:
    fc = coll.get_facecolor()
    if len(fc) == 0:
        return ["rgba(0,0,0,0)"] * n
    return [_color(fc[i % len(fc)]) for i in range(n)]


def _container_of(ax: Any, rect: Any):
    for cont in ax.containers:
        if rect in getattr(cont, "patches", ()):
            return cont
    return None


def to_plotly(fig: Any) -> dict | None:
    """A Plotly figure spec (``{"data": [...], "layout": {...}}``) of the matplotlib ``fig``, or None
    when it holds something the converter cannot reproduce (the PNG is shown instead)."""
    fig.canvas.draw()  # final limits, ticks and tick labels
    data: list[dict] = []
    layout: dict[str, Any] = {"margin": {"l": 60, "r": 20, "t": 60, "b": 50}, "hovermode": "closest",
                              "legend": {"orientation": "h", "y": -0.12}, "plot_bgcolor": "white",
                              "annotations": []}
    w, h = fig.get_size_inches()
    layout["height"] = int(min(900, max(320, 90 * h)))
    st = fig._suptitle
    if st is not None and st.get_text():
        layout["title"] = {"text": st.get_text(), "font": {"size": 14}}
    legend_seen: set = set()
    axes = [ax for ax in fig.get_axes() if ax.get_label() != "<colorbar>" and ax.get_visible()]
    try:
        for i, ax in enumerate(axes, 1):
            xa, ya = ("x", "y") if i == 1 else (f"x{i}", f"y{i}")
            pos = ax.get_position()
            xs, ys = _axis_spec(ax, "x"), _axis_spec(ax, "y")
            xs.update(domain=[max(0.0, pos.x0), min(1.0, pos.x1)], anchor=ya, gridcolor="#e5e5e5", linecolor="#444")
            ys.update(domain=[max(0.0, pos.y0), min(1.0, pos.y1)], anchor=xa, gridcolor="#e5e5e5", linecolor="#444")
            layout["xaxis" if i == 1 else f"xaxis{i}"] = xs
            layout["yaxis" if i == 1 else f"yaxis{i}"] = ys
            title = ax.get_title()
            if title:
                layout["annotations"].append({"text": f"<b>{title}</b>", "x": (pos.x0 + pos.x1) / 2, "y": pos.y1,
                                              "xref": "paper", "yref": "paper", "yanchor": "bottom",
                                              "showarrow": False, "font": {"size": 12}})
            data += _axes_traces(ax, xa, ya, legend_seen, layout["annotations"])
    except Unsupported:
        return None
    if any(ax.get_label() == "<colorbar>" for ax in fig.get_axes()):
        for tr in data:
            if tr["type"] == "heatmap":
                tr["showscale"] = True
                tr["colorbar"] = {"thickness": 12, "len": 0.8}
    return {"data": data, "layout": layout}
