"""Attribute extraction at the last position (Geva et al. 2023, sec. 5).

At each layer the attention output, the MLP output and each head's output at the last position
are projected to the vocabulary with the logit lens (final norm + unembedding, exactly
``model.logit_lens``). An *extraction event* at a sublayer: the model's final top-1 token (from
the clean run) is ranked first in that projection.

We report per layer and overall the share of facts with an event for attention and for the MLP,
which comes first, and the extraction rate when the last position's edges to the subject (or the
non-subject tokens, or itself) are blocked in every layer from ``ko_from_layer`` up (default
the upper half, ``n_layers // 2``, where Gemma's subject -> last flow and the events sit); events
are then counted in those same layers and compared with the clean run's events there. The paper
blocks the edges in the upper layers in the same way and measures how many events survive.

Heads' outputs are the ``head_out`` hook (each head's share of ``attn_out``, Gemma's
post-attention norm factor included).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from factscope import hooks
from factscope.facts import Fact
from factscope.flow.common import FactTokens, encode, project_rank, run_facts
from factscope.flow.knockout import LABELS, set_positions
from factscope.findings import Claim
from factscope.loop import publish
from factscope.models import Model
from factscope.notebook import callable_module

KO_SETS = ("subject", "non_subject", "last")


def _local_attn_out(model: Model, rep, layer: int, resid: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Last-position attention output of ``layer`` run on the residual ``resid`` with ``block``
    applied in that layer only (nothing above it runs)."""
    with hooks.start_at(model, layer, resid), hooks.knockout(model, {layer: block}), hooks.cache(model, "attn_out", [layer]) as c:
        with hooks.stop_after(model, layer):
            model.forward(rep, last_only=True)
        return c["attn_out", layer][:, -1]


def extraction_batch(
    model: Model,
    items: Sequence[FactTokens],
    *,
    ko_sets: Sequence[str] = KO_SETS,
    ko_from_layer: int | None = None,
    heads: bool = True,
    local: bool = True,
) -> list[dict]:
    """Extraction events for a batch of facts: clean and with each knockout of ``ko_sets``.

    With ``local``, also the paper's per-layer variant: the attention output of each layer ``l``
    recomputed on the clean residual stream with the edges blocked in layer ``l`` only
    (``attn_local_rank``)."""
    L = model.n_layers
    ko_from = L // 2 if ko_from_layer is None else ko_from_layer
    configs = ["none", *ko_sets]
    C = len(configs)
    batch = encode(model, items)
    rep = batch.repeat(C)
    to_pos = [([] if c == "none" else set_positions(t, c)) for t in items for c in configs]
    block = hooks.edge_mask(rep, [[-1]] * len(rep), to_pos)
    points = ["attn_out", "mlp_out", "resid_pre"] + (["head_out"] if heads else [])
    with torch.inference_mode():
        with hooks.knockout(model, {l: block for l in range(ko_from, L)}), hooks.cache(model, points) as c:
            logits = model.forward(rep, last_only=True)
        top = logits.argmax(-1)
        clean_rows = torch.arange(0, len(rep), C)
        top1 = top[clean_rows]  # the clean top-1 of each fact
        target = top1.repeat_interleave(C)
        ev = {}
        for kind, point in (("attn", "attn_out"), ("mlp", "mlp_out")):
            vec = torch.stack([c[point, l][:, -1] for l in range(L)], 1)  # [R, L, d]
            rk = project_rank(model, vec.reshape(-1, vec.shape[-1]), target.repeat_interleave(L)).view(len(rep), L)
            ev[kind] = rk.cpu()
        if local:
            vec = torch.stack([_local_attn_out(model, rep, l, c["resid_pre", l][clean_rows].repeat_interleave(C, 0), block) for l in range(L)], 1)
            rk = project_rank(model, vec.reshape(-1, vec.shape[-1]), target.repeat_interleave(L)).view(len(rep), L)
            ev["attn_local"] = rk.cpu()
        if heads:
            hv = torch.stack([c["head_out", l][clean_rows, -1] for l in range(L)], 1)  # [F, L, H, d]
            F, _, H, d = hv.shape
            rk = project_rank(model, hv.reshape(-1, d), top1.repeat_interleave(L * H)).view(F, L, H)
            ev["heads"] = rk.cpu()
    out = []
    for f, t in enumerate(items):
        rec = {
            "top1_id": int(top1[f]),
            "top1": model.tokenizer.decode([int(top1[f])]),
            "ko_from_layer": ko_from,
            "attn": {cfg: (ev["attn"][f * C + j] == 0).int().tolist() for j, cfg in enumerate(configs)},
            "mlp": {cfg: (ev["mlp"][f * C + j] == 0).int().tolist() for j, cfg in enumerate(configs)},
            "attn_rank": {cfg: ev["attn"][f * C + j].tolist() for j, cfg in enumerate(configs)},
            "mlp_rank": {cfg: ev["mlp"][f * C + j].tolist() for j, cfg in enumerate(configs)},
            "ko_top1_kept": {cfg: bool(top[f * C + j] == top1[f]) for j, cfg in enumerate(configs)},
        }
        if local:
            rec["attn_local_rank"] = {cfg: ev["attn_local"][f * C + j].tolist() for j, cfg in enumerate(configs)}
        if heads:
            rec["heads"] = (ev["heads"][f] == 0).int().tolist()
            rec["heads_rank"] = ev["heads"][f].tolist()
        out.append(rec)
    return out


def extraction_facts(model: Model, facts: Sequence[Fact], *, batch_size: int = 8, checkpoint=None, progress: bool = False,
                     desc: str = "extraction", **kw) -> dict[str, dict]:
    """:func:`extraction_batch` records for many facts, keyed by :func:`fact_key` (resumable
    through ``checkpoint``, :func:`run_facts`)."""
    return run_facts(model, facts, lambda items: extraction_batch(model, items, **kw), batch_size=batch_size,
                     checkpoint=checkpoint, progress=progress, desc=desc)


def _first(events: Sequence[int], lo: int = 0) -> int | None:
    for l in range(lo, len(events)):
        if events[l]:
            return l
    return None


def summarize(records: Sequence[dict], n_layers: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Per-layer table, per-knockout table and overall numbers."""
    n = len(records)
    rows = []
    for l in range(n_layers):
        row = {"layer": l}
        row["attn_rate"] = sum(r["attn"]["none"][l] for r in records) / n
        row["mlp_rate"] = sum(r["mlp"]["none"][l] for r in records) / n
        row["attn_top10_rate"] = sum(r["attn_rank"]["none"][l] < 10 for r in records) / n
        row["mlp_top10_rate"] = sum(r["mlp_rank"]["none"][l] < 10 for r in records) / n
        if records and "heads" in records[0]:
            row["any_head_rate"] = sum(any(r["heads"][l]) for r in records) / n
            H = len(records[0]["heads"][l])
            for h in range(H):
                row[f"head{h}_rate"] = sum(r["heads"][l][h] for r in records) / n
        rows.append(row)
    per_layer = pd.DataFrame(rows)
    first_attn = [_first(r["attn"]["none"]) for r in records]
    first_mlp = [_first(r["mlp"]["none"]) for r in records]
    order = {"attn_first": 0, "mlp_first": 0, "same_layer": 0, "attn_only": 0, "mlp_only": 0, "neither": 0}
    for a, m in zip(first_attn, first_mlp):
        if a is None and m is None:
            order["neither"] += 1
        elif m is None:
            order["attn_only"] += 1
        elif a is None:
            order["mlp_only"] += 1
        elif a < m:
            order["attn_first"] += 1
        elif m < a:
            order["mlp_first"] += 1
        else:
            order["same_layer"] += 1
    ko_from = records[0]["ko_from_layer"] if records else 0
    ko_rows = []
    for cfg in records[0]["attn"] if records else []:
        ko_rows.append(
            {
                "knockout": cfg,
                "label": "no knockout" if cfg == "none" else "last -> " + LABELS.get(cfg, cfg),
                "attn_rate": sum(_first(r["attn"][cfg], ko_from) is not None for r in records) / n,
                "mlp_rate": sum(_first(r["mlp"][cfg], ko_from) is not None for r in records) / n,
                "top1_kept": sum(r["ko_top1_kept"][cfg] for r in records) / n,
            }
        )
    local = {}
    if records and "attn_local_rank" in records[0]:
        for cfg in records[0]["attn_local_rank"]:
            local[cfg] = sum(any(x == 0 for x in r["attn_local_rank"][cfg]) for r in records) / n
        for row in ko_rows:
            row["attn_local_rate"] = local.get(row["knockout"], float("nan"))
    overall = {
        "n_facts": n,
        "knockout_local_attn": local,
        "attn_any_event": sum(a is not None for a in first_attn) / n if n else float("nan"),
        "mlp_any_event": sum(m is not None for m in first_mlp) / n if n else float("nan"),
        "order": order,
        "ko_from_layer": ko_from,
        "knockout": {r["knockout"]: {"attn": r["attn_rate"], "mlp": r["mlp_rate"], "top1_kept": r["top1_kept"]} for r in ko_rows},
    }
    overall["attn_any_top10"] = sum(any(x < 10 for x in r["attn_rank"]["none"]) for r in records) / n
    overall["mlp_any_top10"] = sum(any(x < 10 for x in r["mlp_rank"]["none"]) for r in records) / n
    if records and "heads" in records[0]:
        overall["any_head_event"] = sum(any(any(h) for h in r["heads"]) for r in records) / n
    return per_layer, pd.DataFrame(ko_rows), overall


def plot(per_layer: pd.DataFrame, ko: pd.DataFrame, overall: dict, model_name: str, n_layers: int):
    from factscope.plotting import COLORS, PALETTE, layer_axis, new_figure

    fig, axes = new_figure(1, 2, width=12.5, height=4.2)
    ax = axes[0]
    ax.plot(per_layer["layer"], 100 * per_layer["attn_rate"], marker="o", color=COLORS["attn"], label="attention output (top-1)")
    ax.plot(per_layer["layer"], 100 * per_layer["mlp_rate"], marker="o", color=COLORS["mlp"], label="MLP output (top-1)")
    ax.plot(per_layer["layer"], 100 * per_layer["attn_top10_rate"], ls=":", color=COLORS["attn"], label="attention: top-1 token in its top 10")
    ax.plot(per_layer["layer"], 100 * per_layer["mlp_top10_rate"], ls=":", color=COLORS["mlp"], label="MLP: top-1 token in its top 10")
    if "any_head_rate" in per_layer:
        ax.plot(per_layer["layer"], 100 * per_layer["any_head_rate"], ls="--", color=PALETTE[0], label="any single head (top-1)")
    layer_axis(ax, n_layers)
    ax.set_ylabel("% of facts with an extraction event")
    ax.set_title("Extraction events at the last position (clean run)")
    ax.legend(loc="upper left")
    ax = axes[1]
    x = list(range(len(ko)))
    bars = [("attn_rate", COLORS["attn"], None, f"attention, blocked in layers >= {overall['ko_from_layer']}")]
    if "attn_local_rate" in ko:
        bars.append(("attn_local_rate", "white", "///", "attention, blocked in its own layer only"))
    bars.append(("mlp_rate", COLORS["mlp"], None, f"MLP, blocked in layers >= {overall['ko_from_layer']}"))
    w = 0.8 / len(bars)
    for b, (col, color, hatch, label) in enumerate(bars):
        off = (b - (len(bars) - 1) / 2) * w
        ax.bar([i + off for i in x], 100 * ko[col], w, color=color, hatch=hatch, edgecolor=COLORS["attn"] if hatch else None, label=label)
    ax.set_xticks(list(x))
    ax.set_xticklabels([s.replace(" (BOS excluded)", "") for s in ko["label"]], rotation=15)
    ax.set_ylabel("% of facts with an extraction event")
    ax.set_title("Extraction with the last position's edges blocked")
    top = float(max(ko[[c for c, *_ in bars]].max().max(), 0.01)) * 100
    ax.set_ylim(0, top * 1.5)
    ax.legend(loc="upper right", ncol=1, fontsize=8)
    ax.grid(axis="x", visible=False)
    fig.suptitle(f"Attribute extraction - {model_name}, {overall['n_facts']} facts")
    return fig


def run_extraction(run, model: Model, facts: Sequence[Fact], *, batch_size: int = 8, progress: bool = True, heads: bool = True,
                   name: str = "extraction", **kw) -> dict:
    """Resumable extraction analysis writing ``name.csv``, ``name_knockout.csv``, ``name.png``, the
    summary key ``name`` and a report section."""
    recs = list(extraction_facts(model, facts, batch_size=batch_size, checkpoint=run.checkpoint(name), progress=progress,
                                 desc=name, heads=heads, **kw).values())
    if not recs:
        return {}
    per_layer, ko, overall = summarize(recs, model.n_layers)
    o = overall
    lines = [
        f"Share of {o['n_facts']} facts with at least one extraction event (the final top-1 token is the top token of the "
        f"sublayer's logit-lens projection at the last position): attention {100 * o['attn_any_event']:.0f}%, "
        f"MLP {100 * o['mlp_any_event']:.0f}%"
        + (f", any single head {100 * o['any_head_event']:.0f}%." if "any_head_event" in o else ".")
        + f" Lenient (top-1 token within the projection's top 10 at some layer): attention {100 * o['attn_any_top10']:.0f}%, "
        f"MLP {100 * o['mlp_any_top10']:.0f}%.",
        "",
        "Which comes first (earliest event layer): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in o["order"].items()) + ".",
        "",
        f"With the last position's edges blocked in layers >= {o['ko_from_layer']} (events counted in those layers):",
    ]
    for k_, v in o["knockout"].items():
        label = "no knockout" if k_ == "none" else f"last -> {LABELS.get(k_, k_)}"
        lines.append(f"- {label}: attention {100 * v['attn']:.0f}%, MLP {100 * v['mlp']:.0f}%, top-1 unchanged {100 * v['top1_kept']:.0f}%")
    if o.get("knockout_local_attn"):
        lines += [
            "",
            "The paper's per-layer variant (each layer's attention output recomputed with the edges blocked in that layer only; "
            "share of facts with an attention event at some layer): "
            + ", ".join(f"{'no knockout' if k_ == 'none' else 'last -> ' + LABELS.get(k_, k_)} {100 * v:.0f}%" for k_, v in o["knockout_local_attn"].items())
            + ".",
        ]
    return publish(run, name, overall, tables={name: per_layer, name + "_knockout": ko},
                   figures={name: plot(per_layer, ko, overall, model.name, model.n_layers)},
                   section={"title": "Attribute extraction at the last position", "text": "\n".join(lines),
                            "figures": [name], "tables": [name + "_knockout"],
                            **dict(zip(("findings", "claims"), extraction_findings(overall)))})


def _share_diff(a: float, b: float, n: int) -> tuple[float, float]:
    """a - b and 1.96 x its standard error, for two shares measured on the same n facts (treated as
    independent: conservative for the positively correlated events here)."""
    se = ((a * (1 - a) + b * (1 - b)) / max(n, 1)) ** 0.5
    return a - b, 1.96 * se


def extraction_findings(o: dict) -> tuple[list[str], list[Claim]]:
    """Findings and claims from the extraction summary. Rules: "attention is the main extractor"
    holds when the attention event rate exceeds the MLP's by more than 1.96 standard errors (below
    by as much: does not hold; else undecided); "extraction needs the subject edges" likewise for
    the attention event rate without vs with the last -> subject edges blocked."""
    n = o.get("n_facts") or 0
    if not n:
        return [], []
    a, m = o["attn_any_event"], o["mlp_any_event"]
    findings = [f"The answer is extracted at the last position by attention in {100 * a:.0f}% of {n} facts and by "
                f"an MLP in {100 * m:.0f}% (lenient, answer in the projection's top 10: "
                f"{100 * o['attn_any_top10']:.0f}% and {100 * o['mlp_any_top10']:.0f}%)."]
    decide = lambda d, e: True if d - e > 0 else False if d + e < 0 else None  # noqa: E731
    d, e = _share_diff(a, m, n)
    claims = [Claim("Attention, not the MLPs, extracts the attribute at the last position",
                    "GPT-2 XL, GPT-J: extraction events mostly in attention (MHSA) sublayers, few in MLPs",
                    f"attention {100 * a:.0f}%, MLP {100 * m:.0f}% of facts", decide(d, e))]
    ko = (o.get("knockout") or {}).get("subject")
    if ko is not None:
        none = o["knockout"].get("none", {}).get("attn", a)
        d, e = _share_diff(none, ko["attn"], n)
        findings.append(f"Blocking the last position's edges to the subject from layer {o['ko_from_layer']} up leaves "
                        f"attention events in {100 * ko['attn']:.0f}% of facts (from {100 * none:.0f}%) and the "
                        f"prediction unchanged in {100 * ko['top1_kept']:.0f}%.")
        claims.append(Claim("Attribute extraction by attention needs the subject -> last edges",
                            "GPT-2 XL, GPT-J: blocking them lowers the attention extraction rate",
                            f"{100 * none:.0f}% -> {100 * ko['attn']:.0f}% with the edges blocked", decide(d, e)))
    return findings, claims


def analyse(model, facts="known_1000", *, limit: int | None = 100, seed: int = 0, known_only: bool = True,
            out=None, progress: bool = True, **options):
    """``factscope flow extraction`` from Python: :func:`run_extraction` (``options``: ``heads``,
    ``ko_from_layer``, ``batch_size``, ...) on known facts, as :func:`factscope.flow.knockout.analyse`."""
    from factscope.notebook import on_facts

    return on_facts("extraction", model, facts, run_extraction, limit=limit, seed=seed, known_only=known_only, out=out,
                    progress=progress, options=options)


callable_module(__name__)
