"""Edit facts one at a time, score each edit, and show what it does to the lens and the circuit.

Three tiers as elsewhere: ``edit_case`` (one edit on a fresh copy of the weights: scores before and
after, logit-lens curves, optionally circuits; the weights are restored bit for bit afterwards),
``edit_cases`` (the resumable loop, one checkpoint record per case) and ``run_edit`` (tables,
figure, summary, report section).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from factscope.findings import Claim
from factscope import hooks
from factscope.facts import subject_span, target_ids

from factscope.edit.scores import EditCase, score_case
from factscope.notebook import callable_module


def make_editor(model, method: str, layer: int | None = None, cov_texts=None, seed: int = 0, cache: bool = True,
                **hp):
    from factscope.errors import FactscopeError

    if method == "rome":
        from factscope.edit.rome import Rome, RomeHParams

        return Rome(model, RomeHParams(layer=layer, seed=seed, **hp), cov_texts=cov_texts, cache=cache)
    if method == "ft-m":
        from factscope.edit.ftm import FTM, FTMHParams

        return FTM(model, FTMHParams(layer=layer, **hp))
    raise FactscopeError(f"unknown editing method {method!r}: use rome or ft-m")


# --------------------------------------------------------------------------------------------
# Logit lens of the new answer
# --------------------------------------------------------------------------------------------


def lens_curves(model, case: EditCase) -> dict[str, list[float]]:
    """Per layer (``resid_post``), the probability and rank of ``target_new``'s first token under the
    logit lens at the last prompt position and at the subject's last token."""
    prompt = case.rewrite_prompt
    tok = model.tokenizer
    first = target_ids(tok, prompt, case.target_new)[0]
    subj = subject_span(tok, prompt, case.subject, occurrence=case.prompt.index("{}"))[1] - 1
    batch = model.encode([prompt])
    with torch.no_grad(), hooks.cache(model, "resid_post") as c:
        model.forward(batch)
        h = c.stack("resid_post")[:, 0]  # [L, T, d]
        cols = [batch.offset[0] + subj, batch.input_ids.shape[1] - 1]
        lp = torch.log_softmax(model.logit_lens(h[:, cols]).double(), -1)  # [L, 2, V]
    tgt = lp[..., first]
    rank = (lp > tgt[..., None]).sum(-1)
    return {"p_subject": tgt[:, 0].exp().tolist(), "p_last": tgt[:, 1].exp().tolist(),
            "rank_subject": rank[:, 0].tolist(), "rank_last": rank[:, 1].tolist()}


# --------------------------------------------------------------------------------------------
# Circuits before/after
# --------------------------------------------------------------------------------------------


def fact_circuit(model, prompt: str, answer: str, n_edges: int, steps: int = 5) -> set[str]:
    """The top-``n_edges`` edges (|EAP-IG score|, zero ablation, answer NLL) of one prompt and answer."""
    from factscope.circuits import Graph, attribute
    from factscope.circuits.metrics import target_nll

    tok = model.tokenizer
    p = list(tok(prompt)["input_ids"])
    a = target_ids(tok, prompt, answer)
    batch = model.batch_from_ids([p + a[:-1]])
    g = Graph.from_model(model)
    attribute(model, g, batch, None, target_nll(model, batch, [a]), method="eap-ig", steps=steps, ablation="zero")
    g.top_n(min(n_edges, int(g.real.sum())), absolute=True)
    return set(g.edge_names("in_graph"))


def circuit_change(before: set[str], after: set[str]) -> dict:
    union = before | after
    return {"n_before": len(before), "n_after": len(after), "gained": sorted(after - before),
            "lost": sorted(before - after), "jaccard": len(before & after) / len(union) if union else 1.0}


# --------------------------------------------------------------------------------------------
# One edit, many edits
# --------------------------------------------------------------------------------------------


def edit_case(model, editor, case: EditCase, circuit_edges: int = 0) -> dict:
    """Score ``case`` before and after one edit (on a fresh copy of the weights, restored after)."""
    pre = score_case(model, case)
    lens_pre = lens_curves(model, case)
    circ_pre = fact_circuit(model, case.rewrite_prompt, case.target_true, circuit_edges) if circuit_edges else None
    with model.restoring(editor.parameter):
        res = editor.edit(case)
        post = score_case(model, case)
        lens_post = lens_curves(model, case)
        circ_post = fact_circuit(model, case.rewrite_prompt, case.target_new, circuit_edges) if circuit_edges else None
    rec = {"case": case.to_dict(), "layer": editor.layer, "update_norm": res.update_norm,
           **pre.row("pre_"), **post.row("post_"), "lens_pre": lens_pre, "lens_post": lens_post}
    if circuit_edges:
        rec["circuit"] = circuit_change(circ_pre, circ_post)
    return rec


def edit_cases(model, editor, cases: list[EditCase], checkpoint=None, circuit_cases: int = 0, circuit_edges: int = 200,
               progress: bool = False) -> list[dict]:
    """``edit_case`` for every case (the first ``circuit_cases`` also get circuits), resumable."""
    from tqdm.auto import tqdm

    out = []
    for i, case in enumerate(tqdm(cases, desc=f"{editor.method} edits", disable=not progress)):
        if checkpoint is not None and case.case_id in checkpoint:
            out.append(checkpoint.get(case.case_id))
            continue
        rec = edit_case(model, editor, case, circuit_edges if i < circuit_cases else 0)
        if checkpoint is not None:
            checkpoint.append(case.case_id, rec)
        out.append(rec)
    return out


@dataclass
class EditSummary:
    n: int
    efficacy: float
    paraphrase: float | None
    neighborhood: float | None
    same_subject: float | None
    pre_efficacy: float
    pre_paraphrase: float | None
    pre_neighborhood: float | None
    pre_same_subject: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _mean(xs) -> float | None:
    """Mean of the known values (records from before a score existed lack it: left out)."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict]) -> EditSummary:
    m = lambda k: _mean(r.get(k) for r in records)  # noqa: E731
    return EditSummary(len(records), m("post_efficacy"), m("post_paraphrase"), m("post_neighborhood"),
                       m("post_same_subject"), m("pre_efficacy"), m("pre_paraphrase"), m("pre_neighborhood"),
                       m("pre_same_subject"))


def lens_figure(records: list[dict], n_layers: int, method: str, layer: int, model_name: str):
    """Mean probability (with a 95% interval) and median rank of the new answer's first token per layer,
    before and after the edit, at the subject's last token and at the last position."""
    import numpy as np

    from factscope.plotting import layer_axis, new_figure

    fig, axes = new_figure(2, 2, width=11, height=6.5, sharex=True,
                           title=f"{model_name} (4-bit GGUF dequantized): logit lens of the new answer, "
                                 f"{len(records)} {method.upper()} edits at layer {layer}")
    x = np.arange(n_layers)
    for col, (where, label) in enumerate((("subject", "subject's last token"), ("last", "last position"))):
        for key, color, name in (("lens_pre", "#888888", "before the edit"), ("lens_post", "#c0392b", "after the edit")):
            P = np.array([r[key][f"p_{where}"] for r in records])
            mean = P.mean(0)
            ci = 1.96 * P.std(0, ddof=1) / np.sqrt(len(P)) if len(P) > 1 else np.zeros_like(mean)
            axes[0, col].plot(x, mean, color=color, marker="o", ms=3, label=name)
            axes[0, col].fill_between(x, np.clip(mean - ci, 0, 1), np.clip(mean + ci, 0, 1), color=color, alpha=0.15)
            R = np.array([r[key][f"rank_{where}"] for r in records]) + 1
            axes[1, col].plot(x, np.median(R, 0), color=color, marker="o", ms=3, label=name)
            axes[1, col].fill_between(x, np.percentile(R, 25, 0), np.percentile(R, 75, 0), color=color, alpha=0.15)
        axes[0, col].set_title(f"at the {label}")
        axes[0, col].set_ylabel("P(new answer), mean ± 95% CI")
        axes[1, col].set_yscale("log")
        axes[1, col].invert_yaxis()
        axes[1, col].set_ylabel("rank of the new answer\n(median, quartiles; 1 = top)")
        for row in (0, 1):
            axes[row, col].axvline(layer, color="#2c3e50", ls="--", lw=1, label=f"edited layer ({layer})")
            layer_axis(axes[row, col], n_layers)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    return fig


def edit_findings(s: dict) -> tuple[list[str], list[Claim]]:
    """Findings of an edit run and, for ROME, the ROME paper's CounterFact claims (GPT-2 XL: efficacy
    100%, paraphrase 96.4%, neighbourhood 75.4%). Rules: "edits take and generalize" holds with
    efficacy >= 90% and paraphrase >= 50% (does not hold below 50% efficacy, else undecided);
    "neighbours are spared" holds when the neighbourhood score drops by at most 10 points from the
    unedited model's, does not hold when it drops by more than 20, else undecided."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    f = [f"{s['n']} {s['method'].upper()} edits at layer {s['layer']}: efficacy {pct(s['efficacy'])}, paraphrase "
         f"{pct(s['paraphrase'])}, neighbourhood {pct(s['neighborhood'])} (unedited: {pct(s['pre_efficacy'])}, "
         f"{pct(s['pre_paraphrase'])}, {pct(s['pre_neighborhood'])})."]
    if s.get("same_subject") is not None:
        f.append(f"The subject's facts in other relations keep their answer in {pct(s['same_subject'])} of prompts "
                 f"after the edit ({pct(s['pre_same_subject'])} before).")
    if s["method"] != "rome" or s.get("efficacy") is None:
        return f, []
    e, p = s["efficacy"], s.get("paraphrase")
    take = True if e >= 0.9 and (p or 0) >= 0.5 else False if e < 0.5 else None
    claims = [Claim("ROME edits take and generalize to paraphrases",
                    "GPT-2 XL on CounterFact: efficacy 100%, paraphrase 96.4%",
                    f"efficacy {pct(e)}, paraphrase {pct(p)}", take)]
    n, n0 = s.get("neighborhood"), s.get("pre_neighborhood")
    if n is not None and n0 is not None:
        drop = n0 - n
        claims.append(Claim("ROME spares other subjects of the relation",
                            "GPT-2 XL on CounterFact: neighbourhood score 75.4% (unedited about 78%)",
                            f"neighbourhood {pct(n)} (unedited {pct(n0)})",
                            True if drop <= 0.1 else False if drop > 0.2 else None))
    return f, claims


def run_edit(run, model, editor, cases: list[EditCase], circuit_cases: int = 3, circuit_edges: int = 200,
             progress: bool = False) -> EditSummary:
    """Edit every case, write ``edits.csv``, the lens figure, circuits, summary and report section."""
    import pandas as pd

    records = edit_cases(model, editor, cases, run.checkpoint("edits"), circuit_cases, circuit_edges, progress)
    rows = []
    for r in records:
        c = r["case"]
        rows.append({"case_id": c["case_id"], "subject": c["subject"], "prompt": c["prompt"].replace("{}", c["subject"]),
                     "target_true": c["target_true"], "target_new": c["target_new"], "layer": r["layer"],
                     **{k: r[k] for k in r if k.startswith(("pre_", "post_"))}, "update_norm": r["update_norm"]})
    run.save_table("edits", pd.DataFrame(rows))
    s = summarize(records)
    L = editor.layer
    lens_rows = []
    for r in records:
        for l in range(model.n_layers):
            for key, when in (("lens_pre", "before"), ("lens_post", "after")):
                lens_rows.append({"case_id": r["case"]["case_id"], "layer": l, "when": when,
                                  **{k: r[key][k][l] for k in r[key]}})
    run.save_table("edit_lens", pd.DataFrame(lens_rows))
    run.save_figure("edit_lens", lens_figure(records, model.n_layers, editor.method, L, model.name))
    circ = [r for r in records if "circuit" in r]
    circ_rows = [{"case_id": r["case"]["case_id"], "subject": r["case"]["subject"], "jaccard": r["circuit"]["jaccard"],
                  "n_gained": len(r["circuit"]["gained"]), "n_lost": len(r["circuit"]["lost"]),
                  "gained (first 8)": " ".join(r["circuit"]["gained"][:8]), "lost (first 8)": " ".join(r["circuit"]["lost"][:8])}
                 for r in circ]
    if circ_rows:
        run.save_table("edit_circuits", pd.DataFrame(circ_rows))
    # where the new answer rises: first layer whose mean lens probability at the subject/last exceeds 0.5 x its final value
    import numpy as np

    def rise(where):
        P = np.array([r["lens_post"][f"p_{where}"] for r in records]) - np.array([r["lens_pre"][f"p_{where}"] for r in records])
        d = P.mean(0)
        return int(np.argmax(d >= 0.5 * d.max())) if d.max() > 0 else None

    summary = {"edit": {**s.as_dict(), "method": editor.method, "layer": L,
                        "lens_rise_layer": {"subject": rise("subject"), "last": rise("last")},
                        "circuit_jaccard": _mean(r["circuit"]["jaccard"] for r in circ) if circ else None}}
    run.update_summary(summary)
    f = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    text = (f"{len(records)} single edits with **{editor.method.upper()}** at layer {L} of {model.name} "
            f"(weights: {model.weights}), each on a fresh copy of the weights. Scores as ROME's CounterFact "
            f"evaluation (mean per-token probability of the new vs the true answer):\n\n"
            f"- efficacy (new answer beats the true one on the rewrite prompt): {f(s.efficacy)} after the edit "
            f"({f(s.pre_efficacy)} before)\n"
            f"- paraphrase (the same on other phrasings): {f(s.paraphrase)} ({f(s.pre_paraphrase)} before)\n"
            f"- neighbourhood (other subjects keep their answer): {f(s.neighborhood)} ({f(s.pre_neighborhood)} before)\n"
            f"- same subject (the subject's facts in other relations keep their answer): {f(s.same_subject)} "
            f"({f(s.pre_same_subject)} before; CounterFact records have none)\n\n"
            f"Logit lens: the edit's gain in the new answer's probability reaches half its final size at layer "
            f"{summary['edit']['lens_rise_layer']['subject']} at the subject's last token and at layer "
            f"{summary['edit']['lens_rise_layer']['last']} at the last position.")
    if circ:
        text += (f"\n\nCircuits (EAP-IG, zero ablation, top {circuit_edges} edges) of the fact before the edit (true "
                 f"answer) and after it (new answer), {len(circ)} facts: mean Jaccard "
                 f"{summary['edit']['circuit_jaccard']:.2f}.")
    findings, claims = edit_findings(summary["edit"])
    run.add_section("edit", f"Knowledge editing ({editor.method.upper()})", text, findings=findings, claims=claims,
                    figures=[{"name": "edit_lens", "caption": "Logit lens of the new answer before and after the edit."}],
                    tables=["edits"] + (["edit_circuits"] if circ_rows else []))
    return s


def analyse(model, dataset: str = "lre:factual", *, method: str = "rome", limit: int | None = 50, seed: int = 0,
            layer: int | None = None, cov_texts: list[str] | None = None, circuit_cases: int = 3,
            circuit_edges: int = 200, out=None, progress: bool = True):
    """``factscope edit`` from Python (``factscope.edit.run(model, dataset)``): edit a seeded sample of
    ``limit`` cases of ``dataset`` with ``method`` (``rome`` or ``ft-m``) at ``layer`` (default: per
    model) and score them (:func:`run_edit`; ``cov_texts``: ROME's covariance texts). The model's
    weights are restored after each edit. Returns a :class:`factscope.notebook.Result` whose
    ``table`` is one row per edit."""
    from factscope.edit.scores import load_cases
    from factscope.notebook import analysis, as_model, config_of

    model = as_model(model)
    cases = load_cases(dataset, limit=limit, seed=seed)
    editor = make_editor(model, method, layer=layer, cov_texts=cov_texts, seed=seed)
    cfg = config_of("edit", model, dataset, limit, seed, method=method, layer=editor.layer, single=None,
                    cov_text=None, circuits=circuit_cases, edges=circuit_edges, hparams=dict(editor.hp.__dict__))
    return analysis("edit", cfg, lambda run: run_edit(run, model, editor, cases, circuit_cases, circuit_edges,
                                                      progress=progress), out, main="edits")


callable_module(__name__)  # factscope.edit.run(model, dataset) is analyse(model, dataset)
