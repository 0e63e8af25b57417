"""Heads that store subject -> attribute mappings in their value-output map (Geva et al. 2023, sec. 6.2).

For each head ``h`` of layer ``l`` we take the last subject token's hidden state entering the
layer (``resid_pre[l]``), apply the layer's attention input norm (what the head actually reads;
GPT-2's ln_1, Gemma/Llama's RMSNorm - the paper's GPT-2 analysis projected the raw hidden state,
but for pre-norm models the norm is part of the head's input and changes directions through its
per-dimension weights), then the head's value and output maps ``W_V[h] (+ b_V[h]) W_O[h]``
(Gemma: times its post-attention norm, evaluated on that head's vector alone), and project the
result to the vocabulary with the logit lens. This is exactly what the head would add to the
residual stream if it attended only to that position, up to a positive scale that the logit lens
ignores (final RMSNorm). A head *maps subject to attribute* for a fact when the fact's target
(its first token) is among the top-k tokens of that projection.

Heads are ranked by that rate over facts; :func:`head_top_tokens` shows a chosen head's top tokens
per fact.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from factscope import hooks
from factscope.facts import Fact, target_ids
from factscope.flow.common import FactTokens, encode, fact_key, project_rank, run_facts, usable
from factscope.loop import publish
from factscope.models import Model
from factscope.notebook import callable_module


def head_vectors(model: Model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """What each head of ``layer`` writes to the residual stream when it attends only to a position
    whose residual (``resid_pre[layer]``) is ``x`` ``[N, d]``: ``[N, H, d]`` (Gemma's post-attention
    norm applied per head)."""
    xn = model.attn_input_norm(layer, x)
    v = torch.einsum("nd,hde->nhe", xn, model.W_V(layer)) + model.b_V(layer)  # [N, H, hd]
    o = torch.einsum("nhe,hed->nhd", v, model.W_O(layer))  # [N, H, d]
    scale = model.post_attn_scale(layer, o)
    return o * scale


def head_ranks_batch(model: Model, items: Sequence[FactTokens], targets: Sequence[int], chunk: int = 128) -> torch.Tensor:
    """Rank (0 = top) of each fact's target token in every head's W_VO projection of its last subject
    token: ``[F, L, H]``."""
    batch = encode(model, items)
    cols = [batch.offset[i] + t.subject_last for i, t in enumerate(items)]
    F, L, H = len(items), model.n_layers, model.n_heads
    with torch.inference_mode():
        with hooks.cache(model, "resid_pre") as c:
            model.forward(batch, last_only=True)
        tgt = torch.tensor(list(targets), device=model.device)
        out = torch.empty(F, L, H, dtype=torch.long)
        for l in range(L):
            x = c["resid_pre", l][torch.arange(F), cols]  # [F, d]
            vec = head_vectors(model, l, x).reshape(F * H, -1)
            out[:, l] = project_rank(model, vec, tgt.repeat_interleave(H), chunk).view(F, H).cpu()
    return out


def head_top_tokens(model: Model, fact: Fact | FactTokens, layer: int, head: int, k: int = 10) -> list[str]:
    """The top-k tokens of one head's W_VO projection of the fact's last subject token."""
    t = fact if isinstance(fact, FactTokens) else usable(model, [fact])[0][0]
    batch = model.batch_from_ids([t.ids])
    with torch.inference_mode(), hooks.cache(model, "resid_pre", [layer]) as c:
        model.forward(batch, last_only=True)
        x = c["resid_pre", layer][:, t.subject_last]
        lg = model.logit_lens(head_vectors(model, layer, x)[:, head])[0]
    return model.to_str_tokens(lg.topk(k).indices.tolist())


def heads_batch(model: Model, items: Sequence[FactTokens]) -> list[dict]:
    """Per fact: its target's first token id and the rank of that token in every head's W_VO
    projection of the last subject token (``ranks[layer][head]``)."""
    tg = [target_ids(model.tokenizer, t.fact.prompt, t.fact.target_true)[0] for t in items]
    ranks = head_ranks_batch(model, items, tg)
    return [{"target_id": tg[j], "ranks": ranks[j].tolist()} for j in range(len(items))]


def heads_facts(model: Model, facts: Sequence[Fact], *, batch_size: int = 16, checkpoint=None, progress: bool = False) -> dict:
    """:func:`heads_batch` records for many facts, keyed by :func:`fact_key` (resumable through
    ``checkpoint``, :func:`run_facts`)."""
    return run_facts(model, facts, lambda items: heads_batch(model, items), batch_size=batch_size, checkpoint=checkpoint,
                     progress=progress, desc="heads")


def rank_heads(records: Sequence[dict], top_k: int = 10) -> pd.DataFrame:
    """Heads by the share of facts whose target is in the top-k of their W_VO projection."""
    L = len(records[0]["ranks"])
    H = len(records[0]["ranks"][0])
    rows = []
    for l in range(L):
        for h in range(H):
            r = [rec["ranks"][l][h] for rec in records]
            rows.append({"layer": l, "head": h, "rate": sum(x < top_k for x in r) / len(r), "median_rank": float(pd.Series(r).median())})
    return pd.DataFrame(rows).sort_values(["rate", "median_rank"], ascending=[False, True]).reset_index(drop=True)


def plot(df: pd.DataFrame, model_name: str, n_facts: int, top_k: int, n_layers: int, n_heads: int):
    import numpy as np

    from factscope.plotting import heatmap, new_figure

    grid = np.zeros((n_heads, n_layers))
    for r in df.itertuples():
        grid[r.head, r.layer] = 100 * r.rate
    fig, ax = new_figure(width=8.5, height=2.2 + 0.35 * n_heads)
    heatmap(ax, grid, xlabels=list(range(n_layers)), ylabels=list(range(n_heads)), xlabel="layer", ylabel="head",
            colorbar=f"% of facts: target in top-{top_k}", vmin=0, vmax=max(1.0, float(grid.max())))
    ax.set_title(f"Subject -> attribute mappings in heads' W_VO - {model_name}, {n_facts} facts")
    return fig


def run_heads(run, model: Model, facts: Sequence[Fact], *, top_k: int = 10, show_head: tuple[int, int] | None = None,
              n_show: int = 8, batch_size: int = 16, progress: bool = True) -> dict:
    recs = list(heads_facts(model, facts, batch_size=batch_size, checkpoint=run.checkpoint("heads"), progress=progress).values())
    if not recs:
        return {}
    df = rank_heads(recs, top_k)
    best = df.iloc[0]
    layer, head = show_head if show_head else (int(best["layer"]), int(best["head"]))
    by_key = {fact_key(i, f): f for i, f in enumerate(facts)}
    shown = []
    for r in recs[:n_show]:
        f = by_key[r["key"]]
        toks = head_top_tokens(model, f, layer, head, k=10)
        shown.append({"subject": f.subject, "target": f.target_true, "rank": r["ranks"][layer][head], "top_tokens": " | ".join(t.strip() or repr(t) for t in toks)})
    top = df.head(5)
    summ = {
        "n_facts": len(recs),
        "top_k": top_k,
        "top_heads": [{"layer": int(r.layer), "head": int(r.head), "rate": float(r.rate)} for r in top.itertuples()],
        "shown_head": [layer, head],
        "mean_rate_all_heads": float(df["rate"].mean()),
    }
    lines = [
        (
            f"For each head, the last subject token's hidden state entering the layer, through the layer's attention input norm and "
            f"the head's W_V W_O (and Gemma's post-attention norm), projected with the logit lens: the share of {len(recs)} facts whose "
            f"target (first token) is in the top {top_k}. Mean over all heads: {100 * summ['mean_rate_all_heads']:.1f}%."
        ),
        "",
        "Best heads: " + ", ".join(f"L{h['layer']}H{h['head']} {100 * h['rate']:.0f}%" for h in summ["top_heads"]) + ".",
        "",
        f"Table heads_example: top tokens of head L{layer}H{head} for some facts.",
    ]
    return publish(run, "heads", summ, tables={"heads": df, "heads_example": pd.DataFrame(shown)},
                   figures={"heads": plot(df, model.name, len(recs), top_k, model.n_layers, model.n_heads)},
                   section={"title": "Heads that map the subject to its attributes (W_VO)", "text": "\n".join(lines),
                            "figures": ["heads"], "tables": ["heads_example"], "findings": heads_findings(summ)})


def heads_findings(s: dict) -> list[str]:
    """A finding from a heads summary (``summary["heads"]``): the best heads and how often their W_VO
    maps the last subject token to the attribute, against the mean head. (The paper shows such heads
    by example; it states no rate to check, so no claim.)"""
    top = s.get("top_heads") or []
    if not top or not s.get("n_facts"):
        return []
    return [f"Through its W_VO alone, head L{top[0]['layer']}H{top[0]['head']} puts the attribute in its top "
            f"{s['top_k']} for {100 * top[0]['rate']:.0f}% of {s['n_facts']} facts (next: "
            + ", ".join(f"L{h['layer']}H{h['head']} {100 * h['rate']:.0f}%" for h in top[1:3])
            + f"; mean head {100 * s['mean_rate_all_heads']:.1f}%)."]


def analyse(model, facts="known_1000", *, limit: int | None = 100, seed: int = 0, known_only: bool = True,
            out=None, progress: bool = True, **options):
    """``factscope flow heads`` from Python: :func:`run_heads` (``options``: ``top_k``, ``show_head``,
    ``batch_size``) on known facts, as :func:`factscope.flow.knockout.analyse`."""
    from factscope.notebook import on_facts

    return on_facts("heads", model, facts, run_heads, limit=limit, seed=seed, known_only=known_only, out=out,
                    progress=progress, options=options)


callable_module(__name__)
