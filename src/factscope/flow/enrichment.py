"""Subject enrichment: the attributes rate per layer and position (Geva et al. 2023, sec. 4.1).

The hidden state at each layer (index ``i`` as in Hugging Face's ``hidden_states``: 0 = the
embedding layer's output, ``i`` = the output of block ``i``, 1-based) at the first subject
token, the last subject token, the token after the subject and the last token is projected to
the vocabulary with the logit lens (``model.logit_lens``: final norm + unembedding; the paper's
GPT-2 code multiplied by the embedding matrix without the final layer norm, which is not
meaningful for Gemma's RMSNorm weights), and its attributes rate is measured against the
subject's attribute set (:mod:`factscope.flow.attributes`). Baseline: the mean of the subject
tokens' input embeddings, projected the same way (as in the paper's code).
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
    encode,
    fact_key,
    mean_ci,
    run_facts,
    upper_layer,
)
from factscope.models import Model

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


def enrichment_batch(model: Model, items: Sequence[FactTokens], attrs: dict[str, set[str]], top_n: int = 500, keep: int = 50,
                     show_layers: Sequence[int] = ()) -> list[dict]:
    L = model.n_layers
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
            emb = model.embed(torch.tensor([t.ids[j] for j in t.subject], device=model.device)).mean(0, keepdim=True)
            base_toks = A.top_clean(model, model.logit_lens(emb).float(), top_n, keep)[0]
            j = POSITIONS.index("subject_last")
            out.append(
                {
                    "n_attributes": len(a),
                    "rates": rates,
                    "baseline": A.rate(base_toks, a),
                    "top_subject_last": {str(l): toks[j * (L + 1) + l][:10] for l in show_layers},
                }
            )
    return out


def enrichment_facts(model: Model, facts: Sequence[Fact], attrs: dict[str, set[str]], *, batch_size: int = 8, skip=None,
                     on_result=None, progress: bool = False, **kw) -> dict:
    return run_facts(model, facts, lambda items: enrichment_batch(model, items, attrs, **kw), batch_size=batch_size,
                     skip=skip, on_result=on_result, progress=progress, desc="enrichment")


def curves(records: Sequence[dict]) -> pd.DataFrame:
    recs = [r for r in records if r["n_attributes"] > 0]
    if not recs:
        return pd.DataFrame(columns=["position", "layer", "mean", "ci95", "n"])
    n_h = len(recs[0]["rates"][POSITIONS[0]])
    rows = []
    for p in POSITIONS:
        for l in range(n_h):
            m, ci, n = mean_ci([100 * r["rates"][p][l] for r in recs])
            rows.append({"position": p, "layer": l, "mean": m, "ci95": ci, "n": n})
    m, ci, n = mean_ci([100 * r["baseline"] for r in recs])
    rows.append({"position": "embedding_baseline", "layer": -1, "mean": m, "ci95": ci, "n": n})
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, model_name: str, n_facts: int, n_layers: int, source: str):
    from factscope.plotting import COLORS, PALETTE, new_figure

    colors = {"subject_first": PALETTE[5], "subject_last": COLORS["subject"], "after_subject": COLORS["relation"], "last": COLORS["last"]}
    fig, ax = new_figure(width=7.5, height=4.4)
    for p in POSITIONS:
        g = df[df["position"] == p].sort_values("layer")
        ax.plot(g["layer"], g["mean"], marker="o", color=colors[p], label=POSITION_LABELS[p])
        ax.fill_between(g["layer"], g["mean"] - g["ci95"].fillna(0), g["mean"] + g["ci95"].fillna(0), color=colors[p], alpha=0.12, lw=0)
    b = df[df["position"] == "embedding_baseline"]
    if len(b):
        ax.axhline(float(b["mean"].iloc[0]), color=COLORS["baseline"], ls="--", lw=1.2, label="baseline: subject token embeddings")
    step = max(1, -(-(n_layers + 1) // 12))
    ax.set_xticks(list(range(0, n_layers + 1, step)))
    ax.set_xlim(-0.5, n_layers + 0.5)
    ax.set_xlabel("hidden state (0 = embeddings, i = output of block i)")
    ax.set_ylabel("attributes rate (% of top-50 clean tokens)")
    ax.set_title(f"Subject enrichment - {model_name}, {n_facts} facts\nattributes: {source}", fontsize=10)
    ax.legend(loc="upper left")
    return fig


def run_enrichment(run, model: Model, facts: Sequence[Fact], *, paragraphs_file: str | None = None, keep_subject_tokens: bool = False,
                   top_n: int = 500, keep: int = 50, batch_size: int = 8, progress: bool = True) -> tuple[dict, dict[str, set[str]]]:
    attrs, source = load_or_make_attributes(run, model, facts, paragraphs_file, keep_subject_tokens, progress)
    ck = run.checkpoint("enrichment")
    up = upper_layer(model.n_layers)
    show = [0, model.n_layers // 4, model.n_layers // 2, up + 1, model.n_layers]
    enrichment_facts(model, facts, attrs, batch_size=batch_size, skip=ck.done(), on_result=lambda k, r: ck.append(k, r),
                     progress=progress, top_n=top_n, keep=keep, show_layers=show)
    wanted = {fact_key(i, f) for i, f in enumerate(facts)}
    recs = [r for r in ck.records() if r["key"] in wanted]
    if not recs:
        return {}, attrs
    df = curves(recs)
    run.save_table("enrichment", df)
    n_used = int(sum(r["n_attributes"] > 0 for r in recs))
    run.save_figure("enrichment", plot(df, model.name, n_used, model.n_layers, source))
    peak = {}
    for p in POSITIONS:
        g = df[df["position"] == p]
        j = g["mean"].idxmax()
        peak[p] = {"max_rate": float(g.loc[j, "mean"]), "hidden_state": int(g.loc[j, "layer"])}
    base = float(df[df["position"] == "embedding_baseline"]["mean"].iloc[0])
    ex = [r for r in recs if r["n_attributes"] > 0][:3]
    summ = {
        "n_facts": n_used,
        "source": source,
        "top_n": top_n,
        "keep": keep,
        "mean_attribute_set_size": sum(r["n_attributes"] for r in recs) / len(recs),
        "peak": peak,
        "baseline": base,
        "curves": {p: [float(x) for x in df[df["position"] == p].sort_values("layer")["mean"]] for p in POSITIONS},
    }
    run.update_summary({"enrichment": summ})
    lines = [
        (
            f"Attributes rate (% of the top-{keep} clean tokens among the top {top_n} of the logit-lens projection that belong "
            f"to the subject's attribute set) over {n_used} facts. Attribute source: {source}; mean set size "
            f"{summ['mean_attribute_set_size']:.0f} tokens. Baseline (subject token embeddings): {base:.1f}%."
        ),
        "",
    ]
    for p, v in peak.items():
        lines.append(f"- {POSITION_LABELS[p]}: peak {v['max_rate']:.1f}% at hidden state {v['hidden_state']}")
    lines.append("")
    for r in ex:
        top = r["top_subject_last"]
        key = str(up + 1)
        if key in top:
            lines.append(f"- {r['subject']}, last subject token, hidden state {key}: {', '.join(top[key])}")
    run.add_section("enrichment", "Subject enrichment (attributes rate)", "\n".join(lines), figures=["enrichment"], tables=["enrichment"])
    return summ, attrs


def load_or_make_attributes(run, model: Model, facts: Sequence[Fact], paragraphs_file: str | None, keep_subject_tokens: bool,
                            progress: bool) -> tuple[dict[str, set[str]], str]:
    """Attribute sets, cached in the run's ``attributes`` checkpoint (texts per subject) so that a
    resumed run does not generate again."""
    ck = run.checkpoint("attributes")
    have = {r["key"]: r["texts"] for r in ck.records()}
    subjects = sorted({f.subject for f in facts})
    if paragraphs_file:
        paragraphs = A.load_paragraphs(paragraphs_file)
        source = f"user paragraphs ({paragraphs_file})"
    else:
        paragraphs = None
        source = "built-in: objects of shipped facts + the model's greedy continuations of neutral prompts"
    todo = [s for s in subjects if s not in have]
    if todo:
        todo_facts = [f for f in facts if f.subject in set(todo)]
        _, texts = attribute_sets(model, todo_facts, paragraphs, keep_subject_tokens, progress)
        for s in todo:
            ck.append(s, {"texts": texts.get(s, [])})
            have[s] = texts.get(s, [])
    attrs = {s: A.attribute_set(model, s, have[s], keep_subject_tokens) for s in subjects}
    return attrs, source
