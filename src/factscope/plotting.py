"""A small shared matplotlib style so that every factscope figure looks the same.

Figures are made with ``matplotlib.figure.Figure`` and the Agg canvas directly, not through
pyplot: no GUI backend is ever touched, nothing is kept in pyplot's global figure list, and
``Run.save_figure(name, fig)`` just writes the PNG.

    from factscope.plotting import new_figure, COLORS
    fig, ax = new_figure()
    ax.plot(layers, values, color=COLORS["subject"], label="subject")
    run.save_figure("knockout", fig)
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Colour-blind-safe palette (Okabe & Ito), in the order used for consecutive lines.
PALETTE = [
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # green
    "#CC79A7",  # purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
]

# Fixed colours for quantities that appear across analyses, so a colour means one thing.
COLORS = {
    "subject": "#0072B2",  # subject tokens / subject positions
    "relation": "#D55E00",  # relation (non-subject) tokens
    "last": "#009E73",  # last position
    "attn": "#CC79A7",  # attention sublayers
    "mlp": "#E69F00",  # MLP sublayers
    "resid": "#56B4E9",  # residual stream
    "baseline": "#7f7f7f",  # clean / reference runs
    "accent": "#000000",
}

SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"

# Sizes in inches; figures are saved at ~130 dpi so the default is about 830 x 520 px.
DEFAULT_SIZE = (6.4, 4.0)

STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "figure.titlesize": 12,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "lines.linewidth": 1.8,
    "lines.markersize": 4,
    "image.cmap": SEQUENTIAL_CMAP,
    "savefig.dpi": 130,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}


def apply_style() -> None:
    """Set the factscope style in matplotlib's rcParams (idempotent).

    ``new_figure`` calls this, so that tick labels and text created later (at draw time) use
    the same style as the axes.
    """
    matplotlib.rcParams.update(STYLE)


def new_figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    size: tuple[float, float] | None = None,
    width: float | None = None,
    height: float | None = None,
    sharex: bool | str = False,
    sharey: bool | str = False,
    squeeze: bool = True,
    title: str | None = None,
    **subplot_kw: Any,
):
    """A new styled figure with a grid of axes: ``fig, ax = new_figure()``.

    ``size`` (or ``width``/``height``) is in inches; by default each panel is about 6.4 x 4 in
    for one panel, scaled down a bit per extra panel. Returns ``(fig, axes)`` like
    ``plt.subplots`` (``axes`` is a single Axes when ``nrows == ncols == 1`` and ``squeeze``).
    Layout is "constrained", so labels are not cut off.
    """
    apply_style()
    if size is None:
        w = width if width is not None else (DEFAULT_SIZE[0] if ncols == 1 else min(4.2 * ncols, 16))
        h = height if height is not None else (DEFAULT_SIZE[1] if nrows == 1 else min(3.2 * nrows, 20))
        size = (w, h)
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=squeeze, subplot_kw=subplot_kw or None)
    if title:
        fig.suptitle(title)
    return fig, axes


def heatmap(
    ax: Any,
    values: Any,
    *,
    xlabels: Sequence[Any] | None = None,
    ylabels: Sequence[Any] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    cmap: str | None = None,
    center: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool | str = True,
    max_ticks: int = 30,
):
    """Draw a 2-D array as a heatmap on ``ax`` (no grid, labelled ticks, optional colorbar).

    With ``center`` (e.g. 0 for a signed effect) the colour map is diverging and symmetric
    around it. Returns the image. ``colorbar`` may be a string: the colorbar's label.
    """
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array, got shape {data.shape}")
    if center is not None:
        finite = data[np.isfinite(data)]
        span = float(np.max(np.abs(finite - center))) if finite.size else 1.0
        span = span or 1.0
        vmin = center - span if vmin is None else vmin
        vmax = center + span if vmax is None else vmax
        cmap = cmap or DIVERGING_CMAP
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap or SEQUENTIAL_CMAP, vmin=vmin, vmax=vmax)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for labels, n, set_ticks, set_labels in (
        (xlabels, data.shape[1], ax.set_xticks, ax.set_xticklabels),
        (ylabels, data.shape[0], ax.set_yticks, ax.set_yticklabels),
    ):
        if labels is not None:
            if len(labels) != n:
                raise ValueError(f"heatmap: {len(labels)} tick labels for {n} cells")
            step = max(1, -(-n // max_ticks))
            idx = list(range(0, n, step))
            set_ticks(idx)
            set_labels([str(labels[i]) for i in idx])
    if xlabels is not None and any(len(str(x)) > 3 for x in xlabels):
        ax.tick_params(axis="x", labelrotation=45)
        for lbl in ax.get_xticklabels():
            lbl.set_horizontalalignment("right")
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.9)
        cb.outline.set_visible(False)
        if isinstance(colorbar, str):
            cb.set_label(colorbar)
    return im


def band(ax: Any, x: Any, y: Any, ci: Any = None, *, lo: Any = None, hi: Any = None, alpha: float = 0.15, **line: Any):
    """A line with its shaded confidence band: ``ax.plot(x, y, **line)``, then the band in the
    line's colour between ``y - ci`` and ``y + ci`` (a missing half-width, NaN, gives a band of
    width 0 there) or, with ``lo``/``hi``, between those. Returns the line."""
    import numpy as np

    (ln,) = ax.plot(x, y, **line)
    if lo is None or hi is None:
        y_ = np.asarray(y, dtype=float)
        half = np.asarray(ci, dtype=float)
        half = np.where(np.isnan(half), 0.0, half)
        lo, hi = y_ - half, y_ + half
    ax.fill_between(x, lo, hi, color=line.get("color", ln.get_color()), alpha=alpha, lw=0)
    return ln


def layer_axis(ax: Any, n_layers: int, label: str = "layer") -> None:
    """Integer ticks for a layer axis (x), at most ~12 of them."""
    step = max(1, -(-n_layers // 12))
    ax.set_xticks(list(range(0, n_layers, step)))
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_xlabel(label)


def color_for(name: str, index: int = 0) -> str:
    """The colour for a named quantity (see ``COLORS``), else the palette colour ``index``."""
    return COLORS.get(name, PALETTE[index % len(PALETTE)])
