"""Sublayer knockout: what drives subject enrichment (Geva et al. 2023, sec. 4.2).

For each start layer ``l`` below the upper layer ``U`` (default ``round(0.83 * n_layers)``, the
paper's 40 of 48), ablate the MLPs (or the attention) of the ``k`` layers ``l .. min(l + k, U) - 1``
at every position (default ``k = max(1, round(n_layers / 5))``; the paper's code blocks
``range(l, min(l + 11, 40))``, 11 of 48), and measure the last subject token's hidden state leaving
block ``U`` (0-based; ``hidden_states[U + 1]``) against no intervention: its attributes rate and
its attribute mass (:func:`factscope.flow.attributes.mass`).

Ablations (:func:`factscope.hooks.ablate`), ``how="paper"`` by default, as the paper's released code:

- attention ``"uniform"``: every query attends uniformly to the keys it may see (the paper sets
  every attention score of the layer to ``finfo.min``, which leaves uniform attention over the
  prefix) -- the layer still adds the mean of the visible values; ``"zero"`` zeroes its output;
- MLP ``"hidden"``: the MLP's hidden activation (the input of its down projection) is zeroed, so
  the MLP adds only its output bias (the paper zeroes GPT-2's first MLP matrix's output);
  ``"zero"`` zeroes the MLP's output. For models without MLP output biases (Llama, Gemma) the two
  are the same.

Speed: positions after the last subject token cannot influence it, so the prompt is cut after
the subject; every configuration of a batch of facts runs as one batch (per-row ablation through
the ``positions`` of :func:`factscope.hooks.ablate`), and the forward stops once block ``U`` has run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import pandas as pd
import torch

from factscope import hooks
from factscope.errors import FactscopeError
from factscope.facts import Fact
from factscope.findings import Claim
from factscope.flow import attributes as A
from factscope.flow.common import (
    FactTokens,
    default_window,
    mean_ci,
    run_facts,
    upper_layer,
)
from factscope.loop import publish
from factscope.models import Model
from factscope.notebook import callable_module

KINDS = ("mlp", "attn")
CHOICES = {"attn": ("uniform", "zero"), "mlp": ("hidden", "zero")}
PRESETS = {"paper": {"attn": "uniform", "mlp": "hidden"}, "zero": {"attn": "zero", "mlp": "zero"}}
LABELS = {
    ("attn", "uniform"): "attention uniform (paper)",
    ("attn", "zero"): "attention outputs zeroed",
    ("mlp", "hidden"): "MLP hidden activations zeroed (paper)",
    ("mlp", "zero"): "MLP outputs zeroed",
}


def ablations(how: str | dict = "paper") -> dict[str, str]:
    """``{"attn": ..., "mlp": ...}`` from a preset name (``"paper"``, ``"zero"``) or a dict."""
    if isinstance(how, str):
        if how not in PRESETS:
            raise FactscopeError(f"sublayer ablation must be one of {', '.join(PRESETS)} or a dict, not {how!r}")
        return dict(PRESETS[how])
    out = {**PRESETS["paper"], **how}
    for kind, choice in out.items():
        if kind not in CHOICES or choice not in CHOICES[kind]:
            raise FactscopeError(f"unknown sublayer ablation {kind}={choice!r}; attn: uniform|zero, mlp: hidden|zero")
    return out


def block_windows(upper: int, k: int) -> list[list[int]]:
    return [list(range(l, min(l + k, upper))) for l in range(upper)]


def resid_at(model: Model, batch, layer: int) -> torch.Tensor:
    """``resid_post[layer]`` at every position, running no block above ``layer``."""
    with hooks.cache(model, "resid_post", [layer]) as c, hooks.stop_after(model, layer):
        model.forward(batch, last_only=True)
    return c["resid_post", layer]


def sublayer_batch(model: Model, items: Sequence[FactTokens], attrs: dict[str, set[str]], *, upper: int | None = None,
                   window: int | None = None, how: str | dict = "paper", top_n: int = 500, keep: int = 50) -> list[dict]:
    U = upper_layer(model.n_layers) if upper is None else upper
    k = window or default_window(model.n_layers)
    abl = ablations(how)
    wins = block_windows(U, k)
    configs = [("none", [])] + [(kind, w) for kind in KINDS for w in wins]
    C = len(configs)
    seqs = [t.ids[: t.subject_last + 1] for t in items]
    batch = model.batch_from_ids(seqs).repeat(C)
    R, T = batch.input_ids.shape
    rows = {kind: torch.zeros(R, model.n_layers, dtype=torch.bool, device=model.device) for kind in KINDS}
    for f in range(len(items)):
        for j, (kind, w) in enumerate(configs):
            if kind != "none":
                rows[kind][f * C + j, w] = True
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for kind in KINDS:
            for l in range(U):
                if rows[kind][:, l].any():
                    pos = rows[kind][:, l : l + 1].expand(R, T)  # every position of the rows ablating layer l
                    stack.enter_context(hooks.ablate(model, kind, l, how=abl[kind], positions=pos))
        h = resid_at(model, batch, U)[:, -1]  # last column = last subject token
        stack.close()
        logits = model.logit_lens(h).float()
        toks = A.top_clean(model, logits, top_n, keep)
    out = []
    n = len(wins)
    for f, t in enumerate(items):
        a = attrs.get(t.fact.subject, set())
        ids = A.attribute_ids(model, a)
        rates = [A.rate(toks[f * C + j], a) for j in range(C)]
        masses = [A.mass(logits[f * C + j], ids) for j in range(C)]
        out.append({
            "n_attributes": len(a), "upper": U, "window": k, "ablation": abl,
            "none": rates[0], "mlp": rates[1 : 1 + n], "attn": rates[1 + n :],
            "mass": {"none": masses[0], "mlp": masses[1 : 1 + n], "attn": masses[1 + n :]},
        })
    return out


def sublayer_facts(model: Model, facts: Sequence[Fact], attrs, *, batch_size: int = 4, checkpoint=None, progress=False, **kw) -> dict:
    """:func:`sublayer_batch` records for many facts, keyed by :func:`fact_key` (resumable through
    ``checkpoint``, :func:`run_facts`)."""
    return run_facts(model, facts, lambda items: sublayer_batch(model, items, attrs, **kw), batch_size=batch_size,
                     checkpoint=checkpoint, progress=progress, desc="sublayer knockout")


def curves(records: Sequence[dict]) -> pd.DataFrame:
    """Mean (95% interval) attributes rate (%) and attribute mass (%) per ablation and start layer."""
    recs = [r for r in records if r["n_attributes"] > 0]
    cols = ["knockout", "start_layer", "mean", "ci95", "n", "mass_mean", "mass_ci95"]
    if not recs:
        return pd.DataFrame(columns=cols)
    n = len(recs[0]["mlp"])
    m0, ci0, n0 = mean_ci([100 * r["none"] for r in recs])
    mm0, mci0, _ = mean_ci([100 * r["mass"]["none"] for r in recs])
    rows = []
    for l in range(n):
        rows.append({"knockout": "none", "start_layer": l, "mean": m0, "ci95": ci0, "n": n0, "mass_mean": mm0, "mass_ci95": mci0})
        for kind in KINDS:
            m, ci, nn = mean_ci([100 * r[kind][l] for r in recs])
            mm, mci, _ = mean_ci([100 * r["mass"][kind][l] for r in recs])
            rows.append({"knockout": kind, "start_layer": l, "mean": m, "ci95": ci, "n": nn, "mass_mean": mm, "mass_ci95": mci})
    return pd.DataFrame(rows, columns=cols)


def plot(df: pd.DataFrame, model_name: str, n_facts: int, upper: int, k: int, abl: dict | None = None):
    from factscope.plotting import COLORS, band, new_figure

    abl = abl or PRESETS["paper"]
    fig, axes = new_figure(ncols=2, width=11, height=4.2)
    styles = (("none", COLORS["baseline"], "no intervention", "--"), ("mlp", COLORS["mlp"], LABELS["mlp", abl["mlp"]], "-"),
              ("attn", COLORS["attn"], LABELS["attn", abl["attn"]], "-"))
    n = int(df["start_layer"].max()) + 1 if len(df) else upper
    for ax, col, ylabel in ((axes[0], "mean", f"attributes rate at layer {upper} (%)"),
                            (axes[1], "mass_mean", f"attribute mass at layer {upper} (% probability)")):
        ci = "ci95" if col == "mean" else "mass_ci95"
        for kind, color, label, ls in styles:
            g = df[df["knockout"] == kind].sort_values("start_layer")
            band(ax, g["start_layer"], g[col], g[ci], alpha=0.12, ls=ls, marker="o" if kind != "none" else None, ms=4, color=color,
                 label=label)
        ax.set_xticks(list(range(0, n, max(1, -(-n // 12)))))
        ax.set_xlabel(f"first ablated layer (window of {k} layers, stopping below layer {upper})")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"Sublayer knockout, last subject token - {model_name}, {n_facts} facts", fontsize=10)
    return fig


def _lowest(df: pd.DataFrame, kind: str, col: str) -> tuple[float, int]:
    g = df[df["knockout"] == kind]
    j = g[col].idxmin()
    return float(g.loc[j, col]), int(g.loc[j, "start_layer"])


def run_sublayer(run, model: Model, facts: Sequence[Fact], attrs: dict[str, set[str]], *, upper: int | None = None, window: int | None = None,
                 how: str | dict = "paper", top_n: int = 500, keep: int = 50, batch_size: int = 4, progress: bool = True) -> dict:
    U = upper_layer(model.n_layers) if upper is None else upper
    k = window or default_window(model.n_layers)
    abl = ablations(how)
    recs = list(sublayer_facts(model, facts, attrs, batch_size=batch_size, checkpoint=run.checkpoint("sublayer"), progress=progress,
                               upper=U, window=k, how=abl, top_n=top_n, keep=keep).values())
    if not recs:
        return {}
    df = curves(recs)
    n_used = int(sum(r["n_attributes"] > 0 for r in recs))
    none = df[df["knockout"] == "none"]
    summ = {"n_facts": n_used, "upper_layer": U, "window": k, "ablation": abl,
            "none_rate": float(none["mean"].iloc[0]), "none_rate_ci95": float(none["ci95"].iloc[0]),
            "none_mass": float(none["mass_mean"].iloc[0])}
    for kind in KINDS:
        summ[f"{kind}_min_rate"], summ[f"{kind}_min_rate_start"] = _lowest(df, kind, "mean")
        g = df[(df["knockout"] == kind) & (df["start_layer"] == summ[f"{kind}_min_rate_start"])]
        summ[f"{kind}_min_rate_ci95"] = float(g["ci95"].iloc[0])
        summ[f"{kind}_min_mass"], summ[f"{kind}_min_mass_start"] = _lowest(df, kind, "mass_mean")
    summ["curves"] = {kind: [float(x) for x in df[df["knockout"] == kind].sort_values("start_layer")["mean"]] for kind in KINDS}
    summ["mass_curves"] = {kind: [float(x) for x in df[df["knockout"] == kind].sort_values("start_layer")["mass_mean"]] for kind in KINDS}
    text = (
        f"Attributes rate and attribute mass (softmax probability of the attribute set's tokens) of the last subject token's "
        f"logit-lens projection leaving block {U} (0-based), with {k} consecutive layers ablated at every position "
        f"({LABELS['mlp', abl['mlp']]}; {LABELS['attn', abl['attn']]}), over {n_used} facts. No intervention: rate "
        f"{summ['none_rate']:.1f}%, mass {summ['none_mass']:.2f}%. Lowest with MLPs ablated: rate {summ['mlp_min_rate']:.1f}% "
        f"(from layer {summ['mlp_min_rate_start']}), mass {summ['mlp_min_mass']:.2f}% (from layer {summ['mlp_min_mass_start']}); "
        f"with attention ablated: rate {summ['attn_min_rate']:.1f}% (from layer {summ['attn_min_rate_start']}), mass "
        f"{summ['attn_min_mass']:.2f}% (from layer {summ['attn_min_mass_start']})."
    )
    return publish(run, "sublayer", summ, tables={"sublayer": df}, figures={"sublayer": plot(df, model.name, n_used, U, k, abl)},
                   section={"title": "Sublayer knockout (what drives enrichment)", "text": text, "figures": ["sublayer"],
                            "tables": ["sublayer"], **dict(zip(("findings", "claims"), sublayer_findings(summ)))})


def sublayer_findings(s: dict) -> tuple[list[str], list[Claim]]:
    """Findings and the paper's sublayer claim from a sublayer summary (``summary["sublayer"]``).

    Rule: MLPs drive enrichment when the lowest rate with MLPs ablated, plus its 95% interval, lies
    below the lowest rate with attention ablated minus its interval (and below the unablated rate);
    the reverse separation: does not hold; overlapping intervals: undecided."""
    if not s.get("n_facts") or "mlp_min_rate" not in s:
        return [], []
    m, a = s["mlp_min_rate"], s["attn_min_rate"]
    mci, aci = s.get("mlp_min_rate_ci95", 0.0), s.get("attn_min_rate_ci95", 0.0)
    findings = [
        f"At layer {s['upper_layer']} the last subject token holds {s['none_rate']:.1f}% attributes; ablating "
        f"{s['window']} MLP layers from layer {s['mlp_min_rate_start']} lowers it to {m:.1f}% ± {mci:.1f}, ablating "
        f"attention from layer {s['attn_min_rate_start']} to {a:.1f}% ± {aci:.1f} ({s['n_facts']} facts)."
    ]
    holds = True if m + mci < min(a - aci, s["none_rate"]) else False if a + aci < m - mci else None
    claims = [Claim("Early-middle MLP sublayers drive the subject's enrichment",
                    "GPT-2 XL, GPT-J: ablating early MLP layers lowers the attributes rate at the last subject token "
                    "far more than ablating attention",
                    f"MLPs ablated {m:.1f}% ± {mci:.1f} (from layer {s['mlp_min_rate_start']}), attention ablated "
                    f"{a:.1f}% ± {aci:.1f}, none {s['none_rate']:.1f}%", holds)]
    return findings, claims


def analyse(model, facts="known_1000", *, limit: int | None = 100, seed: int = 0, known_only: bool = True,
            out=None, progress: bool = True, **options):
    """``factscope flow sublayer`` from Python: the attribute sets (``options``: ``paragraphs_file``,
    default the built-in source; ``keep_subject_tokens``) then :func:`run_sublayer` (``options``:
    ``upper``, ``window``, ``how``, ``top_n``, ``keep``, ``batch_size``) on known facts, as
    :func:`factscope.flow.knockout.analyse`."""
    from factscope.flow.enrichment import load_or_make_attributes
    from factscope.notebook import check_options, on_facts

    check_options(options, run_sublayer, extra=("paragraphs_file", "keep_subject_tokens"))

    def step(run, model, facts, progress, paragraphs_file=None, keep_subject_tokens=False, **kw):
        attrs, _ = load_or_make_attributes(run, model, facts, paragraphs_file, keep_subject_tokens, progress)
        return run_sublayer(run, model, facts, attrs, progress=progress, **kw)

    return on_facts("sublayer", model, facts, step, limit=limit, seed=seed, known_only=known_only, out=out,
                    progress=progress, options=options)


callable_module(__name__)
