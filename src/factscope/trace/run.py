"""Causal tracing over a fact set: resumable per fact, tables, heat maps, summary, report section."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from factscope.findings import Claim
from factscope.errors import FactscopeError
from factscope.facts import Fact
from factscope.flow.common import fact_key, usable
from factscope.models import Model
from factscope.notebook import callable_module
from factscope.trace.core import CLASSES, KINDS, TraceInput, embedding_std, fact_noise, position_classes, trace

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
NAMES = {"hidden": "hidden state (resid_post)", "mlp": "MLP output", "attn": "attention output"}
SITES = {"last_subject": CLASSES[2], "last": CLASSES[5]}


def trace_facts(model: Model, facts: Sequence[Fact], kinds: Sequence[str] = KINDS, *, noise: float = 3.0,
                window: int = 10, samples: int = 10, seed: int = 0, std: float | None = None, skip=(),
                on_result=None, max_rows: int = 256, progress: bool = False) -> dict[str, dict]:
    """Trace each fact (keys as :func:`flow.common.fact_key`, those in ``skip`` left out). ``std``:
    the embedding standard deviation (default: :func:`embedding_std` over these facts' subjects)."""
    items, _ = usable(model, facts)
    if std is None:
        std = embedding_std(model, [[t.ids[i] for i in t.subject] for t in items])
    keys = {id(f): fact_key(i, f) for i, f in enumerate(facts)}
    out = {}
    for t in tqdm(items, desc="trace", unit="fact", disable=not progress):
        key = keys[id(t.fact)]
        if key in skip:
            continue
        s, e = t.subject[0], t.subject[-1] + 1
        inp = TraceInput(t.ids, (s, e), fact_noise(key, seed, samples, e - s, model.d_model) * (noise * std))
        res = trace(model, inp, kinds, window=window, max_rows=max_rows)
        first = res[kinds[0]]
        rec = {
            "fact_id": t.fact.id, "subject": t.fact.subject, "prompt": t.fact.prompt,
            "tokens": [model.tokenizer.decode([i]) for i in t.ids], "subject_range": [s, e],
            "answer": model.tokenizer.decode([first.answer_id]), "answer_id": first.answer_id,
            "p_clean": first.p_clean, "p_corrupt": first.p_corrupt,
            "probs": {k: r.probs for k, r in res.items()},
        }
        out[key] = rec
        if on_result:
            on_result(key, rec)
    return out


def effects_table(records: Sequence[dict]) -> pd.DataFrame:
    """Long table: one row per fact, kind, position and layer."""
    rows = []
    for r in records:
        s, e = r["subject_range"]
        n = len(r["tokens"])
        classes = position_classes(s, e, n)
        for kind, probs in r["probs"].items():
            for t, row in enumerate(probs):
                cls = "; ".join(c for c in CLASSES if t in classes[c]) or "before subject"
                for l, p in enumerate(row):
                    rows.append({"key": r["key"], "kind": kind, "position": t, "token": r["tokens"][t], "classes": cls,
                                 "layer": l, "prob": p, "effect": p - r["p_corrupt"]})
    return pd.DataFrame(rows)


def class_effects(records: Sequence[dict], kind: str, n_layers: int) -> list[np.ndarray]:
    """Per position class, the indirect effects ``[n_tokens, n_layers]`` of every token of that class in
    every fact (ROME's average_causal_effects notebook: ``add`` for the single-token classes, ``add_all``
    for the middle subject and further tokens, so each such token counts once)."""
    out: list[list[np.ndarray]] = [[] for _ in CLASSES]
    for r in records:
        s, e = r["subject_range"]
        eff = np.asarray(r["probs"][kind]) - r["p_corrupt"]
        for ci, toks in enumerate(position_classes(s, e, len(r["tokens"])).values()):
            out[ci] += [eff[t] for t in toks]
    return [np.stack(v) if v else np.full((0, n_layers), np.nan) for v in out]


def average_effects(records: Sequence[dict], kinds: Sequence[str], n_layers: int) -> dict[str, np.ndarray]:
    """Average indirect effect ``[6 classes, n_layers]`` per kind (see :func:`class_effects`)."""
    with np.errstate(invalid="ignore"):
        return {k: np.stack([c.mean(0) if len(c) else np.full(n_layers, np.nan) for c in class_effects(records, k, n_layers)])
                for k in kinds}


def _lines_figure(records: Sequence[dict], kinds: Sequence[str], n_layers: int, window: int, weights: str):
    """ROME's line plot: average indirect effect per layer and position class, 95% intervals
    (1.96 standard errors over the class's tokens)."""
    from factscope.plotting import PALETTE, layer_axis, new_figure

    fig, axes = new_figure(ncols=len(kinds), squeeze=False, sharey=True, width=4.6 * len(kinds), height=3.4)
    x = np.arange(n_layers)
    for j, (ax, kind) in enumerate(zip(axes[0], kinds)):
        for ci, (cls, v) in enumerate(zip(CLASSES, class_effects(records, kind, n_layers))):
            if not len(v):
                continue
            m = v.mean(0)
            err = 1.96 * v.std(0, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.zeros_like(m)
            ax.fill_between(x, m - err, m + err, alpha=0.2, color=PALETTE[ci], linewidth=0)
            ax.plot(x, m, color=PALETTE[ci], label=f"{cls} ({len(v)})")
        layer_axis(ax, n_layers, "restored layer" if kind == "hidden" else f"centre of {window} restored layers")
        ax.set_title(NAMES[kind], fontsize=10)
        ax.axhline(0, color="#7f7f7f", linewidth=0.6)
        if j == 0:
            ax.set_ylabel("average indirect effect on P(answer)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Average indirect effect per position class ({len(records)} facts; 95% intervals; {weights})", fontsize=10)
    return fig


def _fact_figure(rec: dict, kinds: Sequence[str], window: int, weights: str):
    from factscope.plotting import heatmap, new_figure

    fig, axes = new_figure(ncols=len(kinds), squeeze=False, width=4.6 * len(kinds), height=0.32 * len(rec["tokens"]) + 1.6)
    s, e = rec["subject_range"]
    labels = [repr(tok)[1:-1] + ("*" if s <= i < e else "") for i, tok in enumerate(rec["tokens"])]
    for ax, kind in zip(axes[0], kinds):
        probs = np.asarray(rec["probs"][kind])
        heatmap(ax, probs, xlabels=list(range(probs.shape[1])), ylabels=labels, cmap=CMAPS[kind],
                vmin=rec["p_corrupt"], colorbar=f"p({rec['answer'].strip()})")
        ax.set_xlabel("restored layer" if kind == "hidden" else f"centre of {window} restored layers")
        ax.set_title(f"restoring the {NAMES[kind]}", fontsize=10)
    fig.suptitle(f"{rec['prompt']} → {rec['answer'].strip()!r} (p clean {rec['p_clean']:.2f}, corrupted "
                 f"{rec['p_corrupt']:.2f}; * = subject; {weights})", fontsize=9)
    return fig


def _average_figure(avg: dict[str, np.ndarray], n_facts: int, window: int, weights: str):
    from factscope.plotting import heatmap, new_figure

    kinds = list(avg)
    fig, axes = new_figure(ncols=len(kinds), squeeze=False, width=4.8 * len(kinds), height=3.2)
    for i, (ax, kind) in enumerate(zip(axes[0], kinds)):
        a = avg[kind]
        heatmap(ax, a, xlabels=list(range(a.shape[1])), ylabels=list(CLASSES) if i == 0 else [""] * len(CLASSES),
                cmap=CMAPS[kind], vmin=0, colorbar="average indirect effect")
        ax.set_xlabel("restored layer" if kind == "hidden" else f"centre of {window} restored layers")
        ax.set_title(f"{NAMES[kind]}", fontsize=10)
    fig.suptitle(f"Average indirect effect of restoring after corrupting the subject ({n_facts} facts; {weights})",
                 fontsize=10)
    return fig


def _peaks(avg: dict[str, np.ndarray]) -> dict:
    out = {}
    for kind, a in avg.items():
        for site, cls in SITES.items():
            row = a[CLASSES.index(cls)]
            if np.all(np.isnan(row)):
                continue
            l = int(np.nanargmax(row))
            out[f"{kind}.{site}"] = {"layer": l, "effect": float(row[l])}
    return out


def run_trace(run, model: Model, facts: Sequence[Fact], kinds: Sequence[str] = KINDS, *, noise: float = 3.0,
              window: int = 10, samples: int = 10, seed: int = 0, max_rows: int = 256, n_figures: int = 4,
              progress: bool = False) -> dict:
    """Trace every fact (resumable), then write ``trace`` (long), ``trace_average`` tables, the
    ``trace_average`` and ``trace_fact_<i>`` figures, ``summary.json["trace"]`` and a report section."""
    kinds = list(kinds)
    items, _ = usable(model, facts)
    if not items:
        raise FactscopeError("no fact to trace: every subject touches the last prompt token")
    std = embedding_std(model, [[t.ids[i] for i in t.subject] for t in items])
    ck = run.checkpoint("trace")
    trace_facts(model, facts, kinds, noise=noise, window=window, samples=samples, seed=seed, std=std, skip=ck.done(),
                on_result=lambda k, r: ck.append(k, r), max_rows=max_rows, progress=progress)
    records = ck.records()
    weights = getattr(model, "weights", "")
    run.save_table("trace", effects_table(records))
    avg = average_effects(records, kinds, model.n_layers)
    run.save_table("trace_average", pd.DataFrame(
        [{"kind": k, "position": c, "layer": l, "effect": float(a[ci, l])}
         for k, a in avg.items() for ci, c in enumerate(CLASSES) for l in range(a.shape[1])]))
    run.save_figure("trace_average", _average_figure(avg, len(records), window, weights))
    run.save_figure("trace_lines", _lines_figure(records, kinds, model.n_layers, window, weights))
    figures = ["trace_average", "trace_lines"]
    for i, rec in enumerate(records[:n_figures]):
        run.save_figure(f"trace_fact_{i}", _fact_figure(rec, kinds, window, weights))
        figures.append(f"trace_fact_{i}")
    peaks = _peaks(avg)
    summ = {
        "n_facts": len(records), "kinds": kinds, "noise": noise, "samples": samples, "window": window,
        "embedding_std": std, "noise_std": noise * std,
        "mean_p_clean": float(np.mean([r["p_clean"] for r in records])),
        "mean_p_corrupt": float(np.mean([r["p_corrupt"] for r in records])),
        "peak": peaks,
    }
    if "mlp.last_subject" in peaks:
        summ["peak_mlp_layer"] = peaks["mlp.last_subject"]["layer"]
    if "attn.last" in peaks:
        summ["peak_attn_layer"] = peaks["attn.last"]["layer"]
    run.update_summary({"trace": summ})
    lines = [f"- {NAMES[k.split('.')[0]]}, {SITES[k.split('.')[1]]}: strongest average indirect effect "
             f"{v['effect']:.3f} at layer {v['layer']}" for k, v in peaks.items()]
    text = (f"Causal tracing (Meng et al. 2022): the subject's token embeddings get Gaussian noise of "
            f"standard deviation {noise:g} x {std:.3g} (the standard deviation of the subject token embeddings), "
            f"{samples} noise samples per fact; each cell restores the clean value at one position and layer "
            f"(hidden) or a window of {window} layers (MLP, attention). Indirect effect = P(answer | corrupted + "
            f"restored) - P(answer | corrupted); mean P(answer) clean {summ['mean_p_clean']:.3f}, corrupted "
            f"{summ['mean_p_corrupt']:.3f} over {len(records)} facts. Weights: {weights}.\n\n" + "\n".join(lines))
    findings, claims = trace_findings(summ, model.n_layers)
    run.add_section("trace", "Causal tracing (where the fact is recalled)", text, figures=figures, tables=["trace_average"],
                    findings=findings, claims=claims)
    return summ


def trace_findings(s: dict, n_layers: int) -> tuple[list[str], list[Claim]]:
    """Findings and the ROME paper's two sites from a trace summary. Rules, with gap = mean P(answer)
    clean - corrupted: the early site (MLP outputs at the last subject token) holds when their peak
    average effect is at least a quarter of the gap at a layer in the lower two thirds, does not hold
    under a tenth of the gap (or in the top third), else undecided; the late site (attention at the
    last token) holds when its peak is at least a quarter of the gap in the upper half, does not hold
    under a tenth (or in the lower half), else undecided."""
    p = s.get("peak") or {}
    gap = s["mean_p_clean"] - s["mean_p_corrupt"]
    if gap <= 0 or not p:
        return [], []
    def site(key, where_ok):
        v = p.get(key)
        if v is None:
            return None, None
        share = v["effect"] / gap
        holds = True if share >= 0.25 and where_ok(v["layer"]) else \
            False if share < 0.1 or not where_ok(v["layer"]) else None
        return v, holds
    findings = [f"Corrupting the subject lowers P(answer) from {s['mean_p_clean']:.3f} to {s['mean_p_corrupt']:.3f} "
                f"({s['n_facts']} facts); restoring one state recovers at most:"
                + "".join(f" {k.replace('.', ' at ').replace('_', ' ')} {v['effect']:.3f} (layer {v['layer']});"
                          for k, v in p.items()).rstrip(";") + "."]
    claims = []
    v, holds = site("mlp.last_subject", lambda l: l < 2 * n_layers / 3)
    if v is not None:
        claims.append(Claim("Early site: MLPs at the last subject token in middle layers recall the fact",
                            "GPT-2 XL: restoring MLP outputs at the last subject token around layers 10-20 of 48 "
                            "recovers much of the answer",
                            f"peak {v['effect']:.3f} of a {gap:.3f} gap at layer {v['layer']} of {n_layers}", holds))
    v, holds = site("attn.last", lambda l: l >= n_layers / 2)
    if v is not None:
        claims.append(Claim("Late site: attention at the last token in upper layers",
                            "GPT-2 XL: restoring attention at the last token in upper layers recovers the answer",
                            f"peak {v['effect']:.3f} of a {gap:.3f} gap at layer {v['layer']} of {n_layers}", holds))
    return findings, claims


def analyse(model, facts="known_1000", *, limit: int | None = 20, seed: int = 0, known_only: bool = True,
            out=None, progress: bool = True, **options):
    """``factscope trace`` from Python (``factscope.trace.run(model, facts)``): :func:`run_trace`
    (``options``: ``kinds``, ``noise``, ``window``, ``samples``, ``max_rows``, ``n_figures``) on a
    seeded sample of ``limit`` facts that ``model`` knows; ``seed`` draws the facts and the noise, as
    in the CLI. Returns a :class:`factscope.notebook.Result` (``table``: the average indirect effects)."""
    from factscope.notebook import check_options, on_facts

    check_options(options, run_trace)
    return on_facts("trace", model, facts, lambda run, model, facts, progress, **kw: run_trace(
        run, model, facts, progress=progress, seed=seed, **kw), limit=limit, seed=seed, known_only=known_only,
        out=out, progress=progress, options=options, analysis_name="trace", main="trace_average")


callable_module(__name__)  # factscope.trace.run(model, facts) is analyse(model, facts)
