"""Subject enrichment: the attributes rate per layer and position (Geva et al. 2023, sec. 4.1).

The hidden state at each layer (index ``i`` as in Hugging Face's ``hidden_states``: 0 = the
embedding layer's output, ``i`` = the output of block ``i``, 1-based) at the first subject
token, the last subject token, the token after the subject and the last token is projected to
the vocabulary with the logit lens (``model.logit_lens``: final norm + unembedding; the paper's
GPT-2 code multiplied by the embedding matrix without the final layer norm, which is not
meaningful for Gemma's RMSNorm weights), and its attributes rate is measured against the
subject's attribute set (:mod:`factscope.flow.attributes`). Baseline: the mean of the subject
tokens' input embeddings, projected the same way (as in the paper's code).

What the number means: with small attribute sets few of any 50 tokens can match, so next to the
rate we report the mean set size and two controls on the same projections: the *chance* rate
(against another subject's set: a seeded derangement of the subjects, averaged over
``n_shuffles`` shuffles) and the rate with the subject's own tokens kept in its set (the paper's
behaviour) next to removed (our default).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pandas as pd
import torch

from factscope import hooks
from factscope.facts import Fact
from factscope.findings import Claim
from factscope.flow import attributes as A
from factscope.flow.common import (
    FactTokens,
    encode,
    mean_ci,
    run_facts,
    upper_layer,
)
from factscope.loop import publish, resumable
from factscope.models import Model
from factscope.notebook import callable_module

POSITIONS = ("subject_first", "subject_last", "after_subject", "last")
POSITION_LABELS = {
    "subject_first": "first subject token",
    "subject_last": "last subject token",
    "after_subject": "token after the subject",
    "last": "last token",
}


def position_index(t: FactTokens, name: str) -> int:
    return {"subject_first": t.subject_first, "subject_last": t.subject_last, "after_subject": t.after_subject, "last": t.last}[name]


def hidden_states(model: Model, batch) -> list[torch.Tensor]:
    """``[h_0 .. h_L]`` (each ``[B, T, d]``): h_0 enters block 1, h_i leaves block i."""
    with hooks.cache(model, "resid_pre") as c, hooks.cache(model, "resid_post", [model.n_layers - 1]) as c2:
        model.forward(batch, last_only=True)
    return [c["resid_pre", l] for l in range(model.n_layers)] + [c2["resid_post", model.n_layers - 1]]


def attribute_sets(model: Model, facts: Sequence[Fact], paragraphs: dict[str, list[str]] | None = None,
                   keep_subject_tokens: bool = False, progress: bool = False) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """Attribute sets per subject and the texts they came from (user paragraphs, else built-in)."""
    subjects = sorted({f.subject for f in facts})
    if paragraphs is not None:
        texts = {s: list(paragraphs.get(s, [])) for s in subjects}
    else:
        gen = A.continuations(model, subjects, progress=progress) if subjects else {}
        texts = {s: A.shipped_objects(s) + gen.get(s, []) for s in subjects}
    sets = {s: A.attribute_set(model, s, t, keep_subject_tokens) for s, t in texts.items()}
    return sets, texts


def chance_sets(attrs: dict[str, set[str]], n_shuffles: int = 3, seed: int = 0) -> list[dict[str, set[str]]]:
    """For each shuffle, subject -> another subject's attribute set (a seeded derangement of the
    subjects with a non-empty set: shuffle them, then give each the set of the next one). Empty when
    fewer than two subjects have a set."""
    subjects = sorted(s for s, a in attrs.items() if a)
    if len(subjects) < 2:
        return []
    out = []
    for k in range(n_shuffles):
        order = list(subjects)
        random.Random(seed + k).shuffle(order)
        out.append({s: attrs[order[(i + 1) % len(order)]] for i, s in enumerate(order)})
    return out


def enrichment_batch(model: Model, items: Sequence[FactTokens], attrs: dict[str, set[str]], top_n: int = 500, keep: int = 50,
                     show_layers: Sequence[int] = (), controls: dict[str, list[dict[str, set[str]]]] | None = None) -> list[dict]:
    """Per fact: ``rates[position][hidden state]`` against ``attrs``, the embedding ``baseline``,
    and for each named control (a list of subject -> set maps, e.g. :func:`chance_sets`) the rates
    averaged over its maps, ``controls[name][position][hidden state]``."""
    L = model.n_layers
    controls = controls or {}
    batch = encode(model, items)
    out = []
    with torch.inference_mode():
        hs = hidden_states(model, batch)
        stack = torch.stack(hs, 1)  # [B, L+1, T, d]
        for i, t in enumerate(items):
            a = attrs.get(t.fact.subject, set())
            cols = [batch.offset[i] + position_index(t, p) for p in POSITIONS]
            vec = stack[i][:, cols].transpose(0, 1).reshape(len(POSITIONS) * (L + 1), -1)  # position-major
            toks = A.top_clean(model, model.logit_lens(vec).float(), top_n, keep)
            rates = {p: [A.rate(toks[j * (L + 1) + l], a) for l in range(L + 1)] for j, p in enumerate(POSITIONS)}
            ctrl = {}
            for name, maps in controls.items():
                sets = [m.get(t.fact.subject) for m in maps if m.get(t.fact.subject)]
                ctrl[name] = {
                    p: [sum(A.rate(toks[j * (L + 1) + l], x) for x in sets) / len(sets) if sets else float("nan") for l in range(L + 1)]
                    for j, p in enumerate(POSITIONS)
                }
            emb = model.embed(torch.tensor([t.ids[j] for j in t.subject], device=model.device)).mean(0, keepdim=True)
            base_toks = A.top_clean(model, model.logit_lens(emb).float(), top_n, keep)[0]
            j = POSITIONS.index("subject_last")
            out.append(
                {
                    "n_attributes": len(a),
                    "rates": rates,
                    "baseline": A.rate(base_toks, a),
                    "top_subject_last": {str(l): toks[j * (L + 1) + l][:10] for l in show_layers},
                    "controls": ctrl,
                }
            )
    return out


def enrichment_facts(model: Model, facts: Sequence[Fact], attrs: dict[str, set[str]], *, batch_size: int = 8, checkpoint=None,
                     progress: bool = False, **kw) -> dict:
    """:func:`enrichment_batch` records for many facts, keyed by :func:`fact_key` (resumable
    through ``checkpoint``, :func:`run_facts`)."""
    return run_facts(model, facts, lambda items: enrichment_batch(model, items, attrs, **kw), batch_size=batch_size,
                     checkpoint=checkpoint, progress=progress, desc="enrichment")


CONTROLS = ("chance", "subject_kept", "subject_removed")
CONTROL_LABELS = {
    "chance": "another subject's set (chance)",
    "subject_kept": "own set, subject's tokens kept (paper)",
    "subject_removed": "own set, subject's tokens removed",
}


def curves(records: Sequence[dict]) -> pd.DataFrame:
    """Mean (95% interval) rate (%) per position and hidden state, and the controls' means (%)."""
    recs = [r for r in records if r["n_attributes"] > 0]
    cols = ["position", "layer", "mean", "ci95", "n", *CONTROLS]
    if not recs:
        return pd.DataFrame(columns=cols)
    n_h = len(recs[0]["rates"][POSITIONS[0]])
    rows = []
    for p in POSITIONS:
        for l in range(n_h):
            m, ci, n = mean_ci([100 * r["rates"][p][l] for r in recs])
            row = {"position": p, "layer": l, "mean": m, "ci95": ci, "n": n}
            for c in CONTROLS:
                row[c] = mean_ci([100 * r["controls"][c][p][l] for r in recs if c in r.get("controls", {})])[0]
            rows.append(row)
    m, ci, n = mean_ci([100 * r["baseline"] for r in recs])
    rows.append({"position": "embedding_baseline", "layer": -1, "mean": m, "ci95": ci, "n": n})
    return pd.DataFrame(rows, columns=cols)


def plot(df: pd.DataFrame, model_name: str, n_facts: int, n_layers: int, source: str, mean_set_size: float | None = None):
    from factscope.plotting import COLORS, PALETTE, band, new_figure

    colors = {"subject_first": PALETTE[5], "subject_last": COLORS["subject"], "after_subject": COLORS["relation"], "last": COLORS["last"]}
    fig, (ax, ax2) = new_figure(ncols=2, width=12, height=4.6)
    for p in POSITIONS:
        g = df[df["position"] == p].sort_values("layer")
        band(ax, g["layer"], g["mean"], g["ci95"], alpha=0.12, marker="o", ms=4, color=colors[p], label=POSITION_LABELS[p])
    b = df[df["position"] == "embedding_baseline"]
    step = max(1, -(-(n_layers + 1) // 12))
    g = df[df["position"] == "subject_last"].sort_values("layer")
    styles = {"subject_kept": (COLORS["subject"], "-"), "subject_removed": (COLORS["subject"], "--"), "chance": (COLORS["baseline"], ":")}
    for c in CONTROLS:
        if g[c].notna().any():
            ax2.plot(g["layer"], g[c], color=styles[c][0], ls=styles[c][1], marker="o", ms=3, label=CONTROL_LABELS[c])
    for a in (ax, ax2):
        if len(b):
            a.axhline(float(b["mean"].iloc[0]), color=COLORS["baseline"], ls="--", lw=1.0, label="baseline: subject token embeddings")
        a.set_xticks(list(range(0, n_layers + 1, step)))
        a.set_xlim(-0.5, n_layers + 0.5)
        a.set_xlabel("hidden state (0 = embeddings, i = output of block i)")
        a.set_ylim(bottom=0)
    ax.set_ylabel("attributes rate (% of top-50 clean tokens)")
    ax.set_title("by position", fontsize=10)
    ax2.set_title("last subject token: what the rate means", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper left", fontsize=8, handlelength=3.5)
    size = f"; mean set size {mean_set_size:.0f} tokens" if mean_set_size is not None else ""
    fig.suptitle(f"Subject enrichment - {model_name}, {n_facts} facts\nattributes: {source}{size}", fontsize=10)
    return fig


def run_enrichment(run, model: Model, facts: Sequence[Fact], *, paragraphs_file: str | None = None, keep_subject_tokens: bool = False,
                   top_n: int = 500, keep: int = 50, batch_size: int = 8, n_shuffles: int = 3, seed: int = 0,
                   progress: bool = True) -> tuple[dict, dict[str, set[str]]]:
    texts, source = load_or_make_texts(run, model, facts, paragraphs_file, progress)
    sets = {kept: {s: A.attribute_set(model, s, t, kept) for s, t in texts.items()} for kept in (False, True)}
    attrs = sets[keep_subject_tokens]
    controls = {"chance": chance_sets(attrs, n_shuffles, seed), "subject_kept": [sets[True]], "subject_removed": [sets[False]]}
    up = upper_layer(model.n_layers)
    show = [0, model.n_layers // 4, model.n_layers // 2, up + 1, model.n_layers]
    recs = list(enrichment_facts(model, facts, attrs, batch_size=batch_size, checkpoint=run.checkpoint("enrichment"),
                                 progress=progress, top_n=top_n, keep=keep, show_layers=show, controls=controls).values())
    if not recs:
        return {}, attrs
    used = [r for r in recs if r["n_attributes"] > 0]
    df = curves(recs)
    n_used = len(used)
    subjects = {r["subject"] for r in used}
    mean_size = sum(len(attrs[s]) for s in subjects) / len(subjects) if subjects else 0.0
    mean_size_kept = sum(len(sets[True][s]) for s in subjects) / len(subjects) if subjects else 0.0
    peak = {}
    for p in POSITIONS:
        g = df[df["position"] == p]
        j = g["mean"].idxmax()
        peak[p] = {"max_rate": float(g.loc[j, "mean"]), "ci95": float(g.loc[j, "ci95"]),
                   "hidden_state": int(g.loc[j, "layer"]), "chance": float(g.loc[j, "chance"]),
                   "subject_kept": float(g.loc[j, "subject_kept"]), "subject_removed": float(g.loc[j, "subject_removed"])}
    base = float(df[df["position"] == "embedding_baseline"]["mean"].iloc[0])
    sl = peak["subject_last"]
    ex = used[:3]
    summ = {
        "n_facts": n_used,
        "source": source,
        "top_n": top_n,
        "keep": keep,
        "subject_tokens": "kept" if keep_subject_tokens else "removed",
        "peak_rate": sl["max_rate"],
        "peak_hidden_state": sl["hidden_state"],
        "chance_rate": sl["chance"],
        "n_shuffles": len(controls["chance"]),
        "mean_set_size": mean_size,
        "mean_set_size_subject_kept": mean_size_kept,
        "peak_rate_subject_kept": sl["subject_kept"],
        "peak_rate_subject_removed": sl["subject_removed"],
        "peak": peak,
        "baseline": base,
        "curves": {p: [float(x) for x in df[df["position"] == p].sort_values("layer")["mean"]] for p in POSITIONS},
        "chance_curve": [float(x) for x in df[df["position"] == "subject_last"].sort_values("layer")["chance"]],
    }
    ratio = f" ({sl['max_rate'] / sl['chance']:.1f}x chance)" if sl["chance"] > 0 else ""
    lines = [
        (
            f"Attributes rate (% of the top-{keep} clean tokens among the top {top_n} of the logit-lens projection that belong "
            f"to the subject's attribute set) over {n_used} facts. Attribute source: {source}; mean set size "
            f"{mean_size:.0f} tokens ({mean_size_kept:.0f} with the subject's own tokens kept). Baseline (subject token "
            f"embeddings): {base:.1f}%."
        ),
        "",
        (
            f"What the number means, at the last subject token's peak (hidden state {sl['hidden_state']}): {sl['max_rate']:.1f}%"
            f"{ratio}; against another subject's set (chance, {len(controls['chance'])} seeded shuffles) {sl['chance']:.1f}%; with the "
            f"subject's own tokens kept in its set (the paper's behaviour) {sl['subject_kept']:.1f}%, removed {sl['subject_removed']:.1f}%. "
            "The rate is capped by the set size: the paper's 30-50% used Wikipedia paragraphs (hundreds of tokens per subject); "
            "pass real paragraphs with --attributes to compare with it."
        ),
        "",
    ]
    for p, v in peak.items():
        lines.append(f"- {POSITION_LABELS[p]}: peak {v['max_rate']:.1f}% at hidden state {v['hidden_state']} (chance {v['chance']:.1f}%)")
    lines.append("")
    for r in ex:
        top = r["top_subject_last"]
        key = str(up + 1)
        if key in top:
            lines.append(f"- {r['subject']}, last subject token, hidden state {key}: {', '.join(top[key])}")
    publish(run, "enrichment", summ, tables={"enrichment": df},
            figures={"enrichment": plot(df, model.name, n_used, model.n_layers, source, mean_size)},
            section={"title": "Subject enrichment (attributes rate)", "text": "\n".join(lines), "figures": ["enrichment"],
                     "tables": ["enrichment"], **dict(zip(("findings", "claims"), enrichment_findings(summ)))})
    return summ, attrs


def enrichment_findings(s: dict) -> tuple[list[str], list[Claim]]:
    """Findings and the paper's enrichment claim from an enrichment summary (``summary["enrichment"]``).

    Rule: the last subject token is enriched when its peak attributes rate, minus its 95% interval,
    lies above the chance rate (another subject's set) and above the peaks of the first subject token
    and of the token after the subject (plus their intervals); its peak plus its interval below any of
    them (minus theirs): does not hold; otherwise undecided."""
    peak = s.get("peak") or {}
    if not s.get("n_facts") or "subject_last" not in peak:
        return [], []
    sl = peak["subject_last"]
    ci = sl.get("ci95", 0.0)
    others = {p: v for p, v in peak.items() if p in ("subject_first", "after_subject")}
    findings = [
        f"The last subject token's logit-lens projection holds {sl['max_rate']:.1f}% ± {ci:.1f} attributes of the "
        f"subject at hidden state {sl['hidden_state']} (chance {sl['chance']:.1f}%, embeddings {s['baseline']:.1f}%); "
        + ", ".join(f"{POSITION_LABELS[p].lower()} {v['max_rate']:.1f}% at {v['hidden_state']}" for p, v in peak.items()
                    if p != "subject_last")
        + f" ({s['n_facts']} facts, attribute sets: {s['source'].split(':')[0]})."
    ]
    rivals = [sl["chance"]] + [v["max_rate"] + v.get("ci95", 0.0) for v in others.values()]
    rivals_lo = [sl["chance"]] + [v["max_rate"] - v.get("ci95", 0.0) for v in others.values()]
    holds = True if sl["max_rate"] - ci > max(rivals) else False if sl["max_rate"] + ci < max(rivals_lo) else None
    claims = [Claim("The subject's last token is enriched with its attributes",
                    "GPT-2 XL, GPT-J: the attributes rate at the last subject token rises through the early-middle "
                    "layers, well above other positions and chance",
                    f"{sl['max_rate']:.1f}% ± {ci:.1f} at hidden state {sl['hidden_state']} vs chance "
                    f"{sl['chance']:.1f}%, other subject positions ≤ "
                    f"{max([v['max_rate'] for v in others.values()] or [0.0]):.1f}%", holds)]
    return findings, claims


def load_or_make_texts(run, model: Model, facts: Sequence[Fact], paragraphs_file: str | None, progress: bool) -> tuple[dict[str, list[str]], str]:
    """Attribute texts per subject, cached in the run's ``attributes`` checkpoint so that a resumed
    run does not generate again, and a description of their source."""
    subjects = sorted({f.subject for f in facts})
    if paragraphs_file:
        paragraphs = A.load_paragraphs(paragraphs_file)
        source = f"user paragraphs ({paragraphs_file})"
    else:
        paragraphs = None
        source = "built-in: objects of shipped facts + the model's greedy continuations of neutral prompts"

    def work(idx: list[int], report) -> list[dict]:  # every subject not done yet, in one go
        todo = {subjects[i] for i in idx}
        _, texts = attribute_sets(model, [f for f in facts if f.subject in todo], paragraphs, False, progress)
        return [{"texts": texts.get(subjects[i], [])} for i in idx]

    recs = resumable(subjects, work, run.checkpoint("attributes"), batches=lambda pending: [pending] if pending else [],
                     desc="attributes", unit="subject")
    return {s: recs[s]["texts"] for s in subjects}, source


def load_or_make_attributes(run, model: Model, facts: Sequence[Fact], paragraphs_file: str | None, keep_subject_tokens: bool,
                            progress: bool) -> tuple[dict[str, set[str]], str]:
    """Attribute sets per subject (from :func:`load_or_make_texts`) and their source."""
    texts, source = load_or_make_texts(run, model, facts, paragraphs_file, progress)
    return {s: A.attribute_set(model, s, t, keep_subject_tokens) for s, t in texts.items()}, source


def analyse(model, facts="known_1000", *, limit: int | None = 100, seed: int = 0, known_only: bool = True,
            out=None, progress: bool = True, **options):
    """``factscope flow enrichment`` from Python: :func:`run_enrichment` (``options``:
    ``paragraphs_file``, ``keep_subject_tokens``, ``top_n``, ``keep``, ``batch_size``) on known facts,
    as :func:`factscope.flow.knockout.analyse`."""
    from factscope.notebook import on_facts

    return on_facts("enrichment", model, facts, run_enrichment, limit=limit, seed=seed, known_only=known_only, out=out,
                    progress=progress, options=options)


callable_module(__name__)
