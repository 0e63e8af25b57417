"""Figures: efficacy score against the number of prepended sentences (as in Jiang et al. 2024,
Figure 2), and mean target probabilities."""

from __future__ import annotations

import pandas as pd

from factscope.plotting import PALETTE, band, new_figure

# one colour per built-in scheme, the same in every figure; custom schemes take the rest
SCHEME_COLORS = {
    "generic": PALETTE[1],
    "relation": PALETTE[0],
    "related-word": PALETTE[3],
    "reverse": PALETTE[2],
    "reverse-relation": PALETTE[5],
    "reverse-related-word": PALETTE[4],
}
# reverse schemes dashed
SCHEME_STYLE = {"reverse": "--", "reverse-relation": "--", "reverse-related-word": "--"}
# distinct markers, so that lines lying on top of each other (e.g. both reverse schemes at 0) stay visible
SCHEME_MARKER = {"generic": ("o", 5, None), "relation": ("s", 5, None), "related-word": ("^", 6, None),
                 "reverse": ("v", 6, None), "reverse-relation": ("D", 9, "white"),
                 "reverse-related-word": ("P", 7, None)}


CUSTOM_COLORS = [PALETTE[7], "#999999", "#8C564B", PALETTE[6]]


def _colors(names) -> dict[str, str]:
    out, k = {}, 0
    for name in names:
        if name in SCHEME_COLORS:
            out[name] = SCHEME_COLORS[name]
        else:
            out[name] = CUSTOM_COLORS[k % len(CUSTOM_COLORS)]
            k += 1
    return out


METRIC_WHAT = {"first": "first answer token", "full": "mean log-prob per target token",
               "full-sum": "whole target (sum of token log-probs)"}
# one colour and marker per model in the figure-2 layout (models in the order given)
MODEL_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")
ROWS = ("es", "p_true", "top1_acc")


def _panels(n: int):
    if n == 0:
        fig, ax = new_figure()
        ax.text(0.5, 0.5, "no facts left to score", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig, [ax]
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = new_figure(rows, cols, squeeze=False, sharey=True,
                           size=(4.6 * cols if n > 1 else 6.4, 3.8 * rows if n > 1 else 4.2))
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat


def _metric_grid(n: int):
    """Axes for ``n`` panels, each a column of three stacked rows (ES, mean P(true), top-1
    accuracy); at most three panels side by side, further panels in further blocks of rows.
    Returns (fig, [[ax_es, ax_p, ax_top1] per panel])."""
    cols = min(n, 3)
    blocks = -(-n // cols)
    fig, axes = new_figure(3 * blocks, cols, squeeze=False,
                           size=(4.4 * cols if cols > 1 else 5.6, 7.8 * blocks))
    out = []
    for i in range(blocks * cols):
        b, c = divmod(i, cols)
        col = [axes[3 * b + r][c] for r in range(3)]
        if i >= n:
            for a in col:
                a.set_visible(False)
        else:
            out.append(col)
    return fig, out


def _style_for_schemes(names) -> dict[str, dict]:
    out = {}
    for s, c in _colors(names).items():
        mk, ms, mfc = SCHEME_MARKER.get(s, ("X", 6, None))
        out[s] = {"color": c, "marker": mk, "ms": ms, "mfc": mfc or c, "mec": c, "ls": SCHEME_STYLE.get(s, "-"),
                  "zorder": 3 if mfc else 4}
    return out


def _style_for_models(names) -> dict[str, dict]:
    return {m: {"color": PALETTE[i % len(PALETTE)], "marker": MODEL_MARKERS[i % len(MODEL_MARKERS)], "ms": 5,
                "ls": "-", "zorder": 3} for i, m in enumerate(names)}


def _grid_figure(eff: pd.DataFrame, panel_key: str, line_key: str, metric: str):
    panels = list(dict.fromkeys(eff[panel_key]))
    if not panels:
        return _panels(0)[0]
    lines = list(dict.fromkeys(eff[line_key]))
    styles = _style_for_schemes(lines) if line_key == "scheme" else _style_for_models(lines)
    fig, grid = _metric_grid(len(panels))
    pmax = float(eff["p_true"].max()) if len(eff) else 1.0
    nmax = int(eff["n"].max()) if len(eff) else 0
    what = METRIC_WHAT.get(metric, metric)
    for k, (panel, col) in enumerate(zip(panels, grid)):
        d = eff[eff[panel_key] == panel]
        for line in lines:
            g = d[d[line_key] == line].sort_values("n")
            if g.empty:
                continue
            st = styles[line]
            nf = int(g["n_facts"].iloc[0])
            label = f"{line} ({nf} facts)"
            band(col[0], g["n"], g[ROWS[0]], lo=g["es_lo"], hi=g["es_hi"], label=label, **st)  # ES with its bootstrap band
            for ax, y in zip(col[1:], ROWS[1:]):
                ax.plot(g["n"], g[y], label=label, **st)
        for ax, y in zip(col, ROWS):
            ax.set_xticks(range(0, nmax + 1, max(1, -(-nmax // 10))))
            ax.set_xlim(-0.2, nmax + 0.2)
            ax.set_ylim(*((-0.02, 1.02) if y != "p_true" else (0, max(pmax, 1e-6) * 1.08)))
        col[-1].set_xlabel("prepended sentences n")
        col[0].set_title(str(panel))
        col[0].legend(loc="best", fontsize=8)
        if k % 3 == 0:
            col[0].set_ylabel(f"efficacy score ES(n)\nP(false) > P(true), {what}")
            col[1].set_ylabel("mean P(true)" + ("\n(geometric, per token)" if metric == "full" else "")
                              + ("\n(whole target)" if metric == "full-sum" else ""))
            col[2].set_ylabel("top-1 accuracy\n(top-1 = true first token)")
    return fig


def efficacy_figure(eff: pd.DataFrame, metric: str = "first"):
    """One panel per model, one line per scheme: ES(n) with bootstrap 95% bands (top), mean
    P(target_true) (middle) and top-1 accuracy (bottom) against n."""
    return _grid_figure(eff, "model", "scheme", metric)


def efficacy_by_scheme_figure(eff: pd.DataFrame, metric: str = "first"):
    """The layout of the paper's Figure 2: one panel per scheme, one line per model (all models
    overlaid), with the same three rows as :func:`efficacy_figure`."""
    return _grid_figure(eff, "scheme", "model", metric)


def probability_figure(eff: pd.DataFrame):
    """Mean P(target_true) (solid) and P(target_false) (dotted) against n, per scheme and model."""
    models = list(dict.fromkeys(eff["model"]))
    fig, axes = _panels(len(models))
    for ax, m in zip(axes, models):
        d = eff[eff["model"] == m]
        colors = _colors(dict.fromkeys(d["scheme"]))
        for s, c in colors.items():
            g = d[d["scheme"] == s].sort_values("n")
            ax.plot(g["n"], g["p_true"], color=c, marker="o", label=f"{s}: P(true)")
            ax.plot(g["n"], g["p_false"], color=c, marker="x", ls=":", label=f"{s}: P(false)")
        nmax = int(d["n"].max()) if len(d) else 0
        ax.set_xticks(range(0, nmax + 1, max(1, -(-nmax // 10))))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("prepended sentences n")
        ax.set_title(m)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[0].set_ylabel("mean probability over facts")
    return fig
