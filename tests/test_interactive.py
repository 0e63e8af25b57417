"""Interactive figures hold the matplotlib figure's own numbers, or are not made at all."""

from __future__ import annotations

import numpy as np
import pytest

from factscope.interactive import to_plotly
from factscope.plotting import new_figure


def _lines(fig):
    from matplotlib.lines import Line2D

    return [(a, line) for a in fig.get_axes() for line in a.get_children()
            if isinstance(line, Line2D) and line.get_label() and not line.get_label().startswith("_")]


def test_lines_bands_bars_images_and_axes():
    fig, (a1, a2, a3) = new_figure(1, 3)
    x = np.arange(6)
    a1.plot(x, x ** 2 + 1, label="squares", marker="o", ls="--")
    a1.fill_between(x, x ** 2, x ** 2 + 2, alpha=0.2)
    a1.set_yscale("log")
    a1.set_xlabel("layer")
    a1.set_title("left")
    a2.bar(["a", "b", "c"], [3, 1, 2], label="counts")
    a2.invert_yaxis()
    z = np.arange(12.0).reshape(3, 4)
    a3.imshow(z, cmap="viridis", vmin=0, vmax=11)
    spec = to_plotly(fig)
    line = next(t for t in spec["data"] if t.get("name") == "squares")
    assert line["x"] == x.tolist() and line["y"] == (x ** 2 + 1).tolist()
    assert line["mode"] == "lines+markers" and line["line"]["dash"] == "dash"
    band = next(t for t in spec["data"] if t.get("fill") == "toself")
    assert min(band["y"]) == 0 and max(band["y"]) == 27  # the polygon of the band
    bar = next(t for t in spec["data"] if t["type"] == "bar")
    assert bar["y"] == [3, 1, 2] and bar["x"] == [0, 1, 2]
    heat = next(t for t in spec["data"] if t["type"] == "heatmap")
    assert heat["z"] == z.tolist() and (heat["zmin"], heat["zmax"]) == (0, 11)
    # imshow's row 0 sits at y = 0 on an inverted y axis: at the top, as drawn
    assert heat["y"] == [0.0, 1.0, 2.0] and spec["layout"]["yaxis3"]["range"][0] > spec["layout"]["yaxis3"]["range"][1]
    lay = spec["layout"]
    assert lay["yaxis"]["type"] == "log" and lay["xaxis"]["title"]["text"] == "layer"
    assert lay["xaxis2"]["ticktext"] == ["a", "b", "c"]
    assert lay["yaxis2"]["range"][0] > lay["yaxis2"]["range"][1]  # inverted, as drawn
    assert any("left" in a["text"] for a in lay["annotations"])
    # each axes keeps its place in the figure
    assert lay["xaxis"]["domain"][1] <= lay["xaxis2"]["domain"][0] + 1e-9


def test_unknown_artists_give_no_interactive_copy():
    fig, ax = new_figure()
    ax.pie([1, 2, 3])
    assert to_plotly(fig) is None


def test_a_real_figure_keeps_every_labelled_line():
    from factscope.edit.run import lens_figure

    rng = np.random.default_rng(0)
    recs = [{k: {"p_subject": rng.random(6).tolist(), "p_last": rng.random(6).tolist(),
                 "rank_subject": rng.integers(0, 100, 6).tolist(), "rank_last": rng.integers(0, 100, 6).tolist()}
             for k in ("lens_pre", "lens_post")} for _ in range(4)]
    fig = lens_figure(recs, 6, "rome", 2, "tiny")
    # lines in data coordinates (axvline's y runs in axes fractions: drawn over the axis range instead)
    want = [(line.get_label(), line.get_xdata(), line.get_ydata()) for a, line in _lines(fig)
            if line.get_transform() == a.transData]
    spec = to_plotly(fig)
    assert spec is not None
    got = [t for t in spec["data"] if t.get("name") and not t["name"].startswith("edited layer")]
    assert len(got) == len(want)
    for (name, x, y), t in zip(want, got):
        assert t["name"] == name
        assert t["x"] == pytest.approx(np.asarray(x, float).tolist())
        assert t["y"] == pytest.approx(np.asarray(y, float).tolist())


def test_text_in_the_plot_becomes_annotations():
    fig, ax = new_figure()
    ax.plot([0, 1], [0, 1], label="a")
    ax.text(0.25, 0.75, "node", ha="left")
    ax.text(0.5, 0.1, "corner", transform=ax.transAxes)
    ax.text(0.8, 0.55, "m = 5", transform=ax.get_xaxis_transform(), rotation=90)  # beside a vertical line
    ax.text(0.02, 0.3, "level", transform=ax.get_yaxis_transform())
    notes = {a["text"]: a for a in to_plotly(fig)["layout"]["annotations"]}
    assert (notes["node"]["x"], notes["node"]["y"], notes["node"]["xref"]) == (0.25, 0.75, "x")
    assert notes["node"]["xanchor"] == "left" and notes["corner"]["xref"] == "x domain"
    m = notes["m = 5"]
    assert (m["x"], m["xref"], m["y"], m["yref"], m["textangle"]) == (0.8, "x", 0.55, "y domain", -90)
    assert (notes["level"]["xref"], notes["level"]["yref"], notes["level"]["y"]) == ("x domain", "y", 0.3)
    ax.text(0.5, 0.5, "figure", transform=fig.transFigure)
    assert to_plotly(fig) is None
