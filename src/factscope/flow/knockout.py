"""Attention knockout (Geva et al. 2023, sec. 3): where does information flow to the prediction?

For each fact we block the attention edges from the query positions (by default the last one)
to a set of key positions, in a window of ``k`` consecutive layers centred on each layer ``l``,
and measure the relative change (%) of the probability of the model's original top-1 token.

Position sets (token indices of the prompt):

``subject``          every subject token
``non_subject``      every earlier token that is neither subject nor last, **BOS excluded**
``last``             the last token itself
``subject_first``    the first subject token
``subject_last``     the last subject token
``non_subject_bos``  ``non_subject`` plus the BOS token (when the prompt starts with one)

Gemma's BOS token is an attention sink; blocking it perturbs every attention pattern whatever
its content carries, so the paper's "non-subject" curve excludes it by default and
``non_subject_bos`` reports the alternative.

Windows follow ROME/the paper's code: layers ``max(0, l - k//2) .. min(L, l + ceil(k/2)) - 1``,
clipped at the first and last layer (so edge windows are shorter).

Speed (see ``bench/bench_flow.py``): one clean forward per batch of facts caches every layer's
residual stream and the keys/values; for each window, the batch is replicated once per position
set and the model is resumed at the window's first layer (:func:`factscope.hooks.start_at`)
with per-row knockout masks. When only the last position's edges are blocked, no other
position changes at any layer (causal attention), so only the last position is recomputed,
attending to the cached keys/values of the others (:meth:`Model.prefill` and
:meth:`Model.forward_from`, which handle padding and sliding windows); vocabulary logits are
computed at the last position only. :func:`naive_knockout` is the reference: one full forward per fact x window x set,
logits at every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from factscope import hooks
from factscope.errors import FactscopeError
from factscope.facts import Fact, fact_subject_span
from factscope.flow.common import (
    FactTokens,
    default_window,
    encode,
    mean_ci,
    prob_of,
    run_facts,
)
from factscope.findings import Claim
from factscope.loop import publish
from factscope.models import Model, Prefix
from factscope.notebook import callable_module

SETS = ("subject", "non_subject", "last", "subject_first", "subject_last", "non_subject_bos")
MAIN_SETS = ("subject", "non_subject", "last")
LABELS = {
    "subject": "subject",
    "non_subject": "non-subject (BOS excluded)",
    "last": "last",
    "subject_first": "first subject token",
    "subject_last": "last subject token",
    "non_subject_bos": "non-subject incl. BOS",
    "bos": "BOS only",
}


def set_positions(t: FactTokens, name: str) -> list[int]:
    """Token indices of the named position set for one fact."""
    if name == "subject":
        return list(t.subject)
    if name == "non_subject":
        return list(t.non_subject)
    if name == "last":
        return [t.last]
    if name == "subject_first":
        return [t.subject_first]
    if name == "subject_last":
        return [t.subject_last]
    if name == "non_subject_bos":
        return t.bos + t.non_subject
    if name == "bos":
        return list(t.bos)
    raise FactscopeError(f"unknown position set {name!r}; choose from {', '.join(SETS + ('bos',))}")


def windows(n_layers: int, k: int) -> list[list[int]]:
    """The window of ``k`` layers centred on each layer, clipped at the edges (ROME's convention)."""
    if k < 1:
        raise FactscopeError(f"window must be at least 1 layer, not {k}")
    return [list(range(max(0, l - k // 2), min(n_layers, l - (-k // 2)))) for l in range(n_layers)]


def _query_positions(t: FactTokens, from_positions) -> list[int]:
    out = []
    for p in from_positions:
        if isinstance(p, str):
            out += set_positions(t, p)
        else:
            out.append(int(p) % t.n)
    return sorted(set(out))


@dataclass
class _Clean:
    top: torch.Tensor  # [F] top-1 token ids
    p: torch.Tensor  # [F] its probability
    resid: dict  # hooks cache of resid_pre
    kv: Prefix | None  # keys/values of all tokens but the last


def _clean_pass(model: Model, batch, want_kv: bool) -> _Clean:
    with hooks.cache(model, "resid_pre") as c:
        if want_kv:
            prefix = model.prefill(batch, logits=True)
            logits = prefix.logits
        else:
            logits = model.forward(batch, last_only=True)
    top = logits.argmax(-1)
    kv = prefix.take(lengths=[n - 1 for n in batch.lengths]) if want_kv else None
    return _Clean(top, prob_of(logits, top), c, kv)


def _resume_last(model: Model, rep, start: int, resid_last: torch.Tensor, kv_rep: Prefix) -> torch.Tensor:
    """Logits of the last token run from layer ``start`` on, attending to cached keys/values."""
    last = model.batch_from_ids([[i] for i in rep.input_ids[:, -1].tolist()])
    with hooks.start_at(model, start, resid_last):
        return model.forward_from(kv_rep, last)


def knockout_batch(
    model: Model,
    items: Sequence[FactTokens],
    *,
    window: int | None = None,
    sets: Sequence[str] = SETS,
    heads: Sequence[int] | None = None,
    from_positions: Sequence[int | str] = (-1,),
    layers: Sequence[int] | None = None,
) -> list[dict]:
    """Knockout results for a batch of facts (one forward per window; see the module docstring).

    Returns one record per fact: ``top1_id``, ``top1``, ``p`` (clean probability of the top-1 token),
    ``prob[set][i]`` and ``change[set][i]`` (% change) for each centre layer ``layers[i]``.
    """
    k = window or default_window(model.n_layers)
    wins = windows(model.n_layers, k)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    S = len(sets)
    batch = encode(model, items)
    queries = [_query_positions(t, from_positions) for t in items]
    last_only = all(q == [t.last] for q, t in zip(queries, items))
    with torch.inference_mode():
        clean = _clean_pass(model, batch, want_kv=last_only)
        rep = batch.repeat(S)
        to_pos = [set_positions(t, s) for t in items for s in sets]
        from_pos = [q for q in queries for _ in sets]
        block = hooks.edge_mask(rep, from_pos, to_pos)  # [R, T, T]
        if last_only:
            block = block[:, -1:, :]  # [R, 1, T]: the last query row only
            kv_rep = clean.kv.take([f for f in range(len(items)) for _ in range(S)])
        top_rep = clean.top.repeat_interleave(S)
        probs = torch.empty(len(layers), len(rep))
        for i, l in enumerate(layers):
            win = wins[l]
            start = win[0]
            masks = {w: block for w in win}
            with hooks.knockout(model, masks, heads=heads):
                if last_only:
                    resid = clean.resid["resid_pre", start][:, -1:].repeat_interleave(S, 0)
                    logits = _resume_last(model, rep, start, resid, kv_rep)
                else:
                    resid = clean.resid["resid_pre", start].repeat_interleave(S, 0)
                    with hooks.start_at(model, start, resid):
                        logits = model.forward(rep, last_only=True)
            probs[i] = prob_of(logits, top_rep).cpu()
    out = []
    for f, t in enumerate(items):
        p0 = float(clean.p[f])
        prob = {s: [float(probs[i, f * S + j]) for i in range(len(layers))] for j, s in enumerate(sets)}
        out.append(
            {
                "top1_id": int(clean.top[f]),
                "top1": model.tokenizer.decode([int(clean.top[f])]),
                "p": p0,
                "n_tokens": t.n,
                "subject_tokens": list(t.subject),
                "layers": layers,
                "prob": prob,
                "change": {s: [100.0 * (q - p0) / p0 for q in v] for s, v in prob.items()},
            }
        )
    return out


def naive_knockout(
    model: Model,
    item: FactTokens | Fact,
    *,
    window: int | None = None,
    sets: Sequence[str] = SETS,
    heads: Sequence[int] | None = None,
    from_positions: Sequence[int | str] = (-1,),
    layers: Sequence[int] | None = None,
) -> dict:
    """The reference method: one full forward per window x set, logits at every position.

    Independent of the fast path's bookkeeping: the prompt is tokenized again and the position sets
    are built here from the subject span (:func:`factscope.facts.fact_subject_span`), not with
    :class:`FactTokens` / :func:`set_positions`."""
    fact = item.fact if isinstance(item, FactTokens) else item
    ids = list(model.tokenizer(fact.prompt)["input_ids"])
    n = len(ids)
    s0, e0 = fact_subject_span(model.tokenizer, fact)
    bos = [0] if s0 > 0 and model.tokenizer.bos_token_id is not None and ids[0] == model.tokenizer.bos_token_id else []
    subject = list(range(s0, e0))
    others = [i for i in range(n - 1) if not s0 <= i < e0 and i not in bos]
    named = {"subject": subject, "non_subject": others, "last": [n - 1], "subject_first": [s0], "subject_last": [e0 - 1],
             "non_subject_bos": sorted(bos + others), "bos": bos}
    k = window or default_window(model.n_layers)
    wins = windows(model.n_layers, k)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    batch = model.batch_from_ids([ids])
    q = sorted({i for p in from_positions for i in (named[p] if isinstance(p, str) else [int(p) % n])})
    with torch.inference_mode():
        logits = model.forward(batch, last_only=False)[:, -1]
        top = logits.argmax(-1)
        p0 = float(prob_of(logits, top)[0])
        prob = {s: [] for s in sets}
        for l in layers:
            for s in sets:
                block = hooks.edge_mask(batch, [q], [named[s]])
                with hooks.knockout(model, wins[l], block, heads=heads):
                    lg = model.forward(batch, last_only=False)[:, -1]
                prob[s].append(float(prob_of(lg, top)[0]))
    return {
        "top1_id": int(top[0]),
        "p": p0,
        "layers": layers,
        "prob": prob,
        "change": {s: [100.0 * (x - p0) / p0 for x in v] for s, v in prob.items()},
    }


def knockout_facts(model: Model, facts: Sequence[Fact], *, batch_size: int = 8, checkpoint=None, progress: bool = False,
                   desc: str = "knockout", **kw) -> dict[str, dict]:
    """:func:`knockout_batch` records (options ``kw``: ``window``, ``sets``, ``heads``,
    ``from_positions``) for many facts, keyed by :func:`fact_key` (:func:`run_facts`: resumable
    through ``checkpoint``, whose finished facts are not run again)."""
    return run_facts(model, facts, lambda items: knockout_batch(model, items, **kw), batch_size=batch_size,
                     checkpoint=checkpoint, progress=progress, desc=desc)


# --------------------------------------------------------------------------------------------
# Aggregation, figure, run
# --------------------------------------------------------------------------------------------


def curves(records: Sequence[dict]) -> pd.DataFrame:
    """Per set and layer: mean % change over facts, 95% interval half-width and n."""
    if not records:
        return pd.DataFrame(columns=["set", "layer", "mean", "ci95", "n"])
    layers = records[0]["layers"]
    rows = []
    for s in records[0]["change"]:
        for i, l in enumerate(layers):
            m, ci, n = mean_ci([r["change"][s][i] for r in records])
            rows.append({"set": s, "layer": l, "mean": m, "ci95": ci, "n": n})
    return pd.DataFrame(rows)


def per_fact_table(records: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for key, r in records.items():
        for s, ch in r["change"].items():
            for l, c, p in zip(r["layers"], ch, r["prob"][s]):
                rows.append({"key": key, "subject": r["subject"], "top1": r["top1"], "p": r["p"], "set": s, "layer": l, "prob": p, "change": c})
    return pd.DataFrame(rows)


def critical_points(df: pd.DataFrame) -> dict:
    """The strongest drop (most negative mean % change) of each curve and its layer."""
    out = {}
    for s, g in df.groupby("set", sort=False):
        g = g.dropna(subset=["mean"])
        if len(g):
            j = g["mean"].idxmin()
            out[s] = {"min_change": float(g.loc[j, "mean"]), "layer": int(g.loc[j, "layer"])}
    return out


def plot(df: pd.DataFrame, model_name: str, n_facts: int, window: int, n_layers: int):
    from factscope.plotting import COLORS, PALETTE, band, layer_axis, new_figure

    have = set(df["set"])
    two = bool(have & {"subject_first", "subject_last", "non_subject_bos"})
    fig, axes = new_figure(1, 2 if two else 1, width=12.5 if two else 7.0, height=4.2, sharey=True, squeeze=False)
    axes = axes[0]
    panels = [
        (axes[0], [("subject", COLORS["subject"], "-"), ("non_subject", COLORS["relation"], "-"), ("last", COLORS["last"], "-")], "last -> subject / non-subject / last"),
    ]
    if two:
        panels.append(
            (
                axes[1],
                [("subject_first", PALETTE[5], "-"), ("subject_last", COLORS["subject"], "-"), ("non_subject_bos", COLORS["relation"], "--")],
                "split subject; non-subject with BOS",
            )
        )
    for ax, spec, title in panels:
        for s, color, ls in spec:
            g = df[df["set"] == s].sort_values("layer")
            if not len(g):
                continue
            band(ax, g["layer"], g["mean"], g["ci95"], color=color, ls=ls, marker="o", label=LABELS.get(s, s))
        ax.axhline(0, color="#888888", lw=0.8)
        layer_axis(ax, n_layers, label=f"centre layer of the {window}-layer knockout window")
        ax.set_title(title)
        ax.legend(loc="lower left")
    axes[0].set_ylabel("% change in p(original top-1 token)")
    fig.suptitle(f"Attention knockout from the last position - {model_name}, {n_facts} facts (mean, 95% CI)", fontsize=11 if two else 10)
    return fig


def run_knockout(
    run,
    model: Model,
    facts: Sequence[Fact],
    *,
    window: int | None = None,
    sets: Sequence[str] = SETS,
    heads: Sequence[int] | None = None,
    from_positions: Sequence[int | str] = (-1,),
    batch_size: int = 8,
    progress: bool = True,
    name: str = "knockout",
) -> dict:
    """Resumable knockout over ``facts`` writing ``name.csv``, ``name_facts.csv``, ``name.png``, the
    summary ``summary[name]`` (``n_facts``, ``window``, ``curves``, ...) and a report section.
    Returns that summary."""
    k = window or default_window(model.n_layers)
    recs = knockout_facts(model, facts, window=k, sets=sets, heads=heads, from_positions=from_positions, batch_size=batch_size,
                          checkpoint=run.checkpoint(name), progress=progress, desc=name)
    df = curves(list(recs.values()))
    n = len(recs)
    crit = critical_points(df)
    summ = {
        "n_facts": n,
        "n_skipped": len(facts) - n,
        "window": k,
        "heads": list(heads) if heads is not None else None,
        "from_positions": [str(p) for p in from_positions],
        "curves": {s: [float(x) for x in df[df["set"] == s].sort_values("layer")["mean"]] for s in sets},
        "ci95": {s: [float(x) for x in df[df["set"] == s].sort_values("layer")["ci95"]] for s in sets},
        "critical": crit,
    }
    if "subject" in crit and "non_subject" in crit:
        summ["subject_drop_at_least_30"] = crit["subject"]["min_change"] <= -30
        summ["non_subject_peak_not_after_subject_peak"] = crit["non_subject"]["layer"] <= crit["subject"]["layer"]
    return publish(
        run, name, summ,
        tables={name: df, name + "_facts": per_fact_table(recs)},
        figures={name: plot(df, model.name, n, k, model.n_layers)} if n else {},
        section={"title": "Attention knockout (information flow to the last position)", "text": _section_text(summ, model),
                 "figures": [name] if n else [], "tables": [name], **dict(zip(("findings", "claims"),
                                                                             knockout_findings(summ)))},
    )


def knockout_findings(s: dict) -> tuple[list[str], list[Claim]]:
    """Findings and the paper's two critical points from a knockout summary (``summary[name]``).

    Rules: the subject -> last flow is critical when the strongest drop with its 95% interval lies
    below -30% (above: does not hold; straddling -30: undecided); relation first when the
    non-subject drop peaks at an earlier layer than the subject drop (same layer: undecided)."""
    c = s.get("critical") or {}
    if "subject" not in c or "non_subject" not in c or not s.get("n_facts"):
        return [], []
    sub, non = c["subject"], c["non_subject"]
    n_layers = len(s["curves"]["subject"])
    ci = s["ci95"]["subject"][sub["layer"]]
    ci_non = s["ci95"]["non_subject"][non["layer"]]
    drop, drop_ci = f"{sub['min_change']:.0f}", f"± {ci:.0f}"
    findings = [
        f"Blocking the last position's attention to the subject changes P(answer) by {drop}% {drop_ci} at "
        f"layer {sub['layer']} of {n_layers}; to the other (relation) tokens by {non['min_change']:.0f}% "
        f"± {ci_non:.0f} at layer {non['layer']} ({s['n_facts']} facts, windows of {s['window']} layers)."
    ]
    lo, hi = sub["min_change"] - ci, sub["min_change"] + ci
    claims = [
        Claim("The subject's information reaches the last position by attention in upper-middle layers",
              "GPT-2 XL, GPT-J: blocking last -> subject edges in a window of upper-middle layers drops the "
              "prediction sharply (here: by at least 30%)",
              f"{drop}% {drop_ci} at layer {sub['layer']} of {n_layers}",
              True if hi <= -30 else False if lo > -30 else None),
        Claim("Relation information reaches the last position before the subject's",
              "GPT-2 XL, GPT-J: the last -> non-subject drop peaks at earlier layers than the last -> subject drop",
              f"non-subject drop peaks at layer {non['layer']}, subject drop at layer {sub['layer']}",
              True if non["layer"] < sub["layer"] else False if non["layer"] > sub["layer"] else None),
    ]
    return findings, claims


def _section_text(s: dict, model: Model) -> str:
    c = s["critical"]
    lines = [
        (
            f"Blocking attention edges from the last position to a set of positions, in windows of {s['window']} "
            f"layers centred on each layer, over {s['n_facts']} known facts ({s['n_skipped']} skipped). "
            "Values are the mean relative change (%) of the probability of the model's original top-1 token."
        ),
        "",
    ]
    for k_, v in c.items():
        lines.append(f"- {LABELS.get(k_, k_)}: strongest drop {v['min_change']:.1f}% at layer {v['layer']}")
    lines += [
        "",
        "Non-subject excludes the BOS token (an attention sink); the 'non-subject incl. BOS' curve blocks it too.",
    ]
    return "\n".join(lines)


def analyse(model, facts="known_1000", *, limit: int | None = 100, seed: int = 0, known_only: bool = True,
            out=None, progress: bool = True, **options):
    """``factscope flow knockout`` from Python (a notebook): the knockout of :func:`run_knockout`
    (``options``: ``window``, ``sets``, ``heads``, ``from_positions``, ``batch_size``) on a seeded
    sample of ``limit`` facts of ``facts`` (a data set name or a list of facts) that ``model`` (a
    Model or its name) knows. Returns a :class:`factscope.notebook.Result`; ``out``: its run directory
    (default: a temporary one)."""
    from factscope.notebook import on_facts

    return on_facts("knockout", model, facts, run_knockout, limit=limit, seed=seed, known_only=known_only, out=out,
                    progress=progress, options=options)


callable_module(__name__)  # factscope.flow.knockout(model, facts) is analyse(model, facts)
