"""Sublayer knockout: what drives subject enrichment (Geva et al. 2023, sec. 4.2).

For each start layer ``l`` below the upper layer ``U`` (default ``round(0.83 * n_layers)``, the
paper's 40 of 48), zero the MLP outputs (or the attention outputs) of the ``k`` layers
``l .. min(l + k, U) - 1`` at every position (as the paper's code does; default ``k`` =
``max(1, round(n_layers / 5))``, the paper's ~10 of 48), and measure the attributes rate of the
last subject token's hidden state leaving block ``U`` (0-based; ``hidden_states[U + 1]``),
against no intervention.

Speed: positions after the last subject token cannot influence it, so the prompt is cut after
the subject; every configuration of a batch of facts runs as one batch (per-row zeroing through
:func:`factscope.hooks.edit`), and the forward stops once block ``U`` has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from factscope import hooks
from factscope.facts import Fact
from factscope.flow import attributes as A
from factscope.flow.common import (
    FactTokens,
    default_window,
    fact_key,
    mean_ci,
    run_facts,
    upper_layer,
)
from factscope.models import Model


class _Stop(Exception):
    pass


def block_windows(upper: int, k: int) -> list[list[int]]:
    return [list(range(l, min(l + k, upper))) for l in range(upper)]


def resid_at(model: Model, batch, layer: int) -> torch.Tensor:
    """``resid_post[layer]`` at every position, running no block above ``layer``."""
    store = {}

    def grab(x, l):
        store["x"] = x
        raise _Stop

    try:
        with hooks.edit(model, "resid_post", layer, grab):
            model.forward(batch, last_only=True)
    except _Stop:
        pass
    return store["x"]


def sublayer_batch(model: Model, items: Sequence[FactTokens], attrs: dict[str, set[str]], *, upper: int | None = None,
                   window: int | None = None, top_n: int = 500, keep: int = 50) -> list[dict]:
    U = upper_layer(model.n_layers) if upper is None else upper
    k = window or default_window(model.n_layers)
    wins = block_windows(U, k)
    configs = [("none", [])] + [("mlp", w) for w in wins] + [("attn", w) for w in wins]
    C = len(configs)
    seqs = [t.ids[: t.subject_last + 1] for t in items]
    batch = model.batch_from_ids(seqs).repeat(C)
    R = len(batch)
    zero = {kind: torch.ones(R, model.n_layers, dtype=model.dtype, device=model.device) for kind in ("mlp", "attn")}
    for f in range(len(items)):
        for j, (kind, w) in enumerate(configs):
            if kind != "none":
                zero[kind][f * C + j, w] = 0.0

    def scale(kind):
        return lambda x, l: x * zero[kind][:, l].view(-1, *([1] * (x.dim() - 1)))

    with torch.inference_mode():
        with hooks.edit(model, "mlp_out", range(U + 1), scale("mlp")), hooks.edit(model, "attn_out", range(U + 1), scale("attn")):
            h = resid_at(model, batch, U)[:, -1]  # last column = last subject token
        toks = A.top_clean(model, model.logit_lens(h).float(), top_n, keep)
    out = []
    for f, t in enumerate(items):
        a = attrs.get(t.fact.subject, set())
        rates = [A.rate(toks[f * C + j], a) for j in range(C)]
        n = len(wins)
        out.append({"n_attributes": len(a), "upper": U, "window": k, "none": rates[0], "mlp": rates[1 : 1 + n], "attn": rates[1 + n :]})
    return out


def sublayer_facts(model: Model, facts: Sequence[Fact], attrs, *, batch_size: int = 4, skip=None, on_result=None, progress=False, **kw) -> dict:
    return run_facts(model, facts, lambda items: sublayer_batch(model, items, attrs, **kw), batch_size=batch_size,
                     skip=skip, on_result=on_result, progress=progress, desc="sublayer knockout")


def curves(records: Sequence[dict]) -> pd.DataFrame:
    recs = [r for r in records if r["n_attributes"] > 0]
    rows = []
    if not recs:
        return pd.DataFrame(columns=["knockout", "start_layer", "mean", "ci95", "n"])
    n = len(recs[0]["mlp"])
    m0, ci0, n0 = mean_ci([100 * r["none"] for r in recs])
    for l in range(n):
        rows.append({"knockout": "none", "start_layer": l, "mean": m0, "ci95": ci0, "n": n0})
        for kind in ("mlp", "attn"):
            m, ci, nn = mean_ci([100 * r[kind][l] for r in recs])
            rows.append({"knockout": kind, "start_layer": l, "mean": m, "ci95": ci, "n": nn})
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, model_name: str, n_facts: int, upper: int, k: int):
    from factscope.plotting import COLORS, new_figure

    fig, ax = new_figure(width=7.5, height=4.2)
    for kind, color, label, ls in (("none", COLORS["baseline"], "no intervention", "--"), ("mlp", COLORS["mlp"], "MLP outputs zeroed", "-"),
                                   ("attn", COLORS["attn"], "attention outputs zeroed", "-")):
        g = df[df["knockout"] == kind].sort_values("start_layer")
        ax.plot(g["start_layer"], g["mean"], ls=ls, marker="o" if kind != "none" else None, color=color, label=label)
        ax.fill_between(g["start_layer"], g["mean"] - g["ci95"].fillna(0), g["mean"] + g["ci95"].fillna(0), color=color, alpha=0.12, lw=0)
    n = int(df["start_layer"].max()) + 1 if len(df) else upper
    ax.set_xticks(list(range(0, n, max(1, -(-n // 12)))))
    ax.set_xlabel(f"first zeroed layer (window of {k} layers, stopping below layer {upper})")
    ax.set_ylabel(f"attributes rate at layer {upper} (%)")
    ax.set_title(f"Sublayer knockout, last subject token - {model_name}, {n_facts} facts", fontsize=10)
    ax.legend(loc="lower right")
    return fig


def run_sublayer(run, model: Model, facts: Sequence[Fact], attrs: dict[str, set[str]], *, upper: int | None = None, window: int | None = None,
                 top_n: int = 500, keep: int = 50, batch_size: int = 4, progress: bool = True) -> dict:
    U = upper_layer(model.n_layers) if upper is None else upper
    k = window or default_window(model.n_layers)
    ck = run.checkpoint("sublayer")
    sublayer_facts(model, facts, attrs, batch_size=batch_size, skip=ck.done(), on_result=lambda key, r: ck.append(key, r), progress=progress,
                   upper=U, window=k, top_n=top_n, keep=keep)
    wanted = {fact_key(i, f) for i, f in enumerate(facts)}
    recs = [r for r in ck.records() if r["key"] in wanted]
    if not recs:
        return {}
    df = curves(recs)
    run.save_table("sublayer", df)
    n_used = int(sum(r["n_attributes"] > 0 for r in recs))
    run.save_figure("sublayer", plot(df, model.name, n_used, U, k))
    none = float(df[df["knockout"] == "none"]["mean"].iloc[0])
    mins = {}
    for kind in ("mlp", "attn"):
        g = df[df["knockout"] == kind]
        j = g["mean"].idxmin()
        mins[kind] = {"min_rate": float(g.loc[j, "mean"]), "start_layer": int(g.loc[j, "start_layer"])}
    summ = {"n_facts": n_used, "upper_layer": U, "window": k, "rate_no_intervention": none, "strongest_drop": mins,
            "curves": {kind: [float(x) for x in df[df["knockout"] == kind].sort_values("start_layer")["mean"]] for kind in ("mlp", "attn")}}
    run.update_summary({"sublayer": summ})
    text = (
        f"Attributes rate of the last subject token leaving block {U} (0-based) with the MLP or attention outputs of {k} "
        f"consecutive layers zeroed at every position, over {n_used} facts. No intervention: {none:.1f}%. Lowest with MLPs zeroed: "
        f"{mins['mlp']['min_rate']:.1f}% (from layer {mins['mlp']['start_layer']}); with attention zeroed: "
        f"{mins['attn']['min_rate']:.1f}% (from layer {mins['attn']['start_layer']})."
    )
    run.add_section("sublayer", "Sublayer knockout (what drives enrichment)", text, figures=["sublayer"], tables=["sublayer"])
    return summ
