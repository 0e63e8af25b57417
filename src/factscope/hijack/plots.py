"""Figures: efficacy score against the number of prepended sentences (as in Jiang et al. 2024,
Figure 2), and mean target probabilities."""

from __future__ import annotations

import pandas as pd

from factscope.plotting import PALETTE, new_figure

# one colour per built-in scheme, the same in every figure; custom schemes take the rest
SCHEME_COLORS = {
    "generic": PALETTE[1],
    "relation": PALETTE[0],
    "related-word": PALETTE[3],
    "reverse": PALETTE[2],
    "reverse-relation": PALETTE[5],
}
SCHEME_STYLE = {"reverse": "--", "reverse-relation": "--"}
# distinct markers, so that lines lying on top of each other (e.g. both reverse schemes at 0) stay visible
SCHEME_MARKER = {"generic": ("o", 5, None), "relation": ("s", 5, None), "related-word": ("^", 6, None),
                 "reverse": ("v", 6, None), "reverse-relation": ("D", 9, "white")}


CUSTOM_COLORS = [PALETTE[4], PALETTE[7], "#999999", PALETTE[6]]


def _colors(names) -> dict[str, str]:
    out, k = {}, 0
    for name in names:
        if name in SCHEME_COLORS:
            out[name] = SCHEME_COLORS[name]
        else:
            out[name] = CUSTOM_COLORS[k % len(CUSTOM_COLORS)]
            k += 1
    return out


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


def efficacy_figure(eff: pd.DataFrame, metric: str = "first"):
    """ES(n) per scheme (lines, bootstrap 95% bands), one panel per model."""
    models = list(dict.fromkeys(eff["model"]))
    fig, axes = _panels(len(models))
    for ax, m in zip(axes, models):
        d = eff[eff["model"] == m]
        colors = _colors(dict.fromkeys(d["scheme"]))
        for s, c in colors.items():
            g = d[d["scheme"] == s].sort_values("n")
            nf = int(g["n_facts"].iloc[0]) if len(g) else 0
            mk, ms, mfc = SCHEME_MARKER.get(s, ("P", 6, None))
            ax.plot(g["n"], g["es"], marker=mk, ms=ms, mfc=mfc or c, mec=c, color=c, ls=SCHEME_STYLE.get(s, "-"),
                    label=f"{s} ({nf} facts)", zorder=3 if mfc else 4)
            ax.fill_between(g["n"], g["es_lo"], g["es_hi"], color=c, alpha=0.15, lw=0)
        nmax = int(d["n"].max()) if len(d) else 0
        ax.set_xticks(range(0, nmax + 1, max(1, -(-nmax // 10))))
        ax.set_xlim(-0.2, nmax + 0.2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("prepended sentences n")
        ax.set_title(m)
        ax.legend(loc="best")
    what = "first answer token" if metric == "first" else "full target"
    axes[0].set_ylabel(f"efficacy score ES(n)\nP(false) > P(true), {what}")
    return fig


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
