"""Case studies on circuits: hallucination and in-context learning (the paper's sec. 5).

**Hallucination** (:func:`hallucination`). The model's answer to a fact is the relation answer it
ranks highest at the last prompt position (the first tokens of the relation's targets: the
"answer type", so a generic continuation such as " the" is not counted as an answer); the fact is
*right* when that is the target's first token, *wrong* (a hallucination of an answer of the right
type) otherwise. For both groups:

- the logit lens of the model's answer (and, for wrong facts, of the true target): the layer where
  the answer enters the lens' top ``top`` and stays (:func:`~factscope.circuits.lens.emergence_layer`);
- the **first node that promotes the answer**: walking the nodes bottom-up (heads of layer l, then
  MLP l), the first whose own vocabulary projection (:mod:`~factscope.circuits.roles`) ranks the
  model's answer within its top ``top_k`` *and above the true target* (for right facts: above the
  relation's other answers' best rank), with its attention to the subject and the relation;
- circuits discovered on each group with the model's own answer as the target (EAP-IG etc.), their
  edge Jaccard and the nodes only one of them has, and the roles of the wrong group's nodes.

**In-context learning** (:func:`icl`). For facts the model does not know (target's first token not
in its top ``known_top_k``), ``k`` demonstrations of the same relation (other facts, drawn once with
a seed, written as ``prompt + " " + target`` lines before the query): whether the answer becomes
known (rank, Hit@1, Hit@10 with and without), the logit lens with and without, circuits discovered
with and without the demonstrations (same size), the nodes and edges that appear (Jaccard), and the
attention of the heads that appear from the last position to the demonstration tokens.

KnowledgeCircuits (``computed_circuits/gpt2-medium/Hallucination``, ``In-Context Learning``) shows
one prompt per case with hand-picked special nodes; here both are measured over a relation's facts
with the rules of ``roles.py``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
import torch

from factscope import hooks
from factscope.circuits import lens as LENS
from factscope.circuits import roles as R
from factscope.circuits.evaluate import target_ranks, top_mask
from factscope.circuits.graph import Graph
from factscope.errors import FactscopeError
from factscope.facts import Fact, target_ids
from factscope.findings import Claim


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def answer_tokens(model, facts: Sequence[Fact]) -> list[int]:
    """The relation's answer type: the distinct first tokens of the facts' targets (sorted)."""
    tok = model.tokenizer
    return sorted({target_ids(tok, f.prompt, f.target_true)[0] for f in facts})


def last_logits(model, facts: Sequence[Fact], batch_size: int = 16) -> torch.Tensor:
    from factscope.predict import last_logits as ll

    return ll(model, [f.prompt for f in facts], batch_size=batch_size)


def circuit(model, facts: Sequence[Fact], opts, progress: bool = False) -> tuple[Graph, object]:
    """A circuit for ``facts`` (their ``target_true`` is the target): ``opts.method`` scores on the
    facts (with counterfactual partners drawn among them), the top edges by ``opts`` size, pruned."""
    from factscope.circuits.data import build
    from factscope.circuits.run import discover

    data = build(model, facts, seed=opts.seed)
    if len(data) < 2:
        raise FactscopeError(f"only {len(data)} of {len(facts)} facts have a counterfactual partner; need 2")
    g = discover(model, data, opts, progress=progress)
    if opts.method != "acdc":
        top_mask(g, opts.size(int(g.real.sum())), selection=opts.selection)
    return g, data


def compare_graphs(a: Graph, b: Graph) -> dict:
    """Edges and nodes of circuit ``b`` against circuit ``a``: Jaccard, and what appears / disappears."""
    ea, eb = set(a.edge_names("in_graph")), set(b.edge_names("in_graph"))
    na, nb = set(R.circuit_nodes(a)), set(R.circuit_nodes(b))
    order = {n: i for i, n in enumerate(a.up_names)}

    def srt(s):
        return sorted(s, key=lambda n: order.get(n, 10**9))

    return {"edges_a": len(ea), "edges_b": len(eb), "edges_shared": len(ea & eb),
            "edge_jaccard": len(ea & eb) / max(1, len(ea | eb)),
            "nodes_a": len(na), "nodes_b": len(nb), "node_jaccard": len(na & nb) / max(1, len(na | nb)),
            "nodes_new": srt(nb - na), "nodes_lost": srt(na - nb),
            "edges_new": sorted(eb - ea), "edges_lost": sorted(ea - eb)}


def all_nodes(model) -> list[str]:
    """Every head and MLP, bottom-up (heads of layer l, then MLP l)."""
    return [n for n in Graph.from_model(model).up_names if n != "input"]


def _node_order(model) -> dict[str, int]:
    return {n: i for i, n in enumerate(all_nodes(model))}


# --------------------------------------------------------------------------------------------
# Hallucination
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Hallucination:
    facts: list[Fact]
    answer: list[int]  # the model's answer (first token), per fact
    right: list[bool]
    table: object  # per-fact DataFrame
    lens: LENS.LensResult  # followed tokens: target, answer
    first: object  # per-fact first promoting node (DataFrame)
    circuits: dict  # "right"/"wrong" -> Graph (may be missing)
    comparison: dict
    roles: object  # node table of the wrong group's circuit (w.r.t. the wrong answer) or None


def model_answers(model, facts: Sequence[Fact], answers: Sequence[int]) -> tuple[list[int], torch.Tensor]:
    """Per fact the relation answer the model ranks highest, and the last-position logits."""
    lg = last_logits(model, facts)
    ans = torch.tensor(list(answers), dtype=torch.long)
    return ans[lg[:, ans].argmax(-1)].tolist(), lg


def first_promoters(rows_ans, rows_tgt, right: Sequence[bool], order: dict, top_k: int, facts,
                    rows_best_other=None):
    """Per fact the first node (bottom-up) that ranks the model's answer in its top ``top_k`` and
    above the competitor (wrong facts: the true target; right facts: the best other relation answer,
    given as ``rows_best_other``: per (fact, node) rank)."""
    import pandas as pd

    out = []
    a = rows_ans.set_index(["fact", "node"])
    t = rows_tgt.set_index(["fact", "node"]) if rows_tgt is not None else None
    for i, f in enumerate(facts):
        key = f.id or f.subject
        nodes = sorted(a.loc[key].index, key=lambda n: order[n])
        hit = None
        for n in nodes:
            ra = int(a.loc[(key, n), "target_rank"])
            if right[i]:
                rc = int(rows_best_other[(key, n)]) if rows_best_other is not None else 10**9
            else:
                rc = int(t.loc[(key, n), "target_rank"])
            if ra < top_k and ra < rc:
                hit = (n, ra, rc)
                break
        row = {"fact": key, "right": bool(right[i])}
        if hit:
            r = a.loc[(key, hit[0])]
            row.update({"node": hit[0], "layer": int(r["layer"]), "kind": r["kind"], "answer_rank": hit[1],
                        "competitor_rank": hit[2], "att_subject": r.get("att_subject", np.nan),
                        "att_relation": r.get("att_relation", np.nan)})
        else:
            row.update({"node": None, "layer": None, "kind": None})
        out.append(row)
    return pd.DataFrame(out)


def _best_other(model, facts, answer: Sequence[int], answers: Sequence[int], nodes: Sequence[str]) -> dict:
    """(fact, node) -> best rank, in the node's projection, of a relation answer other than ``answer``."""
    parsed = R.parse_nodes(Graph.from_model(model), nodes)
    out = {}
    ans = torch.tensor(list(answers))
    L = model.n_layers
    layers = sorted({l for _, l, _ in parsed})
    for i, f in enumerate(facts):
        batch = model.encode([f.prompt])
        with torch.no_grad(), hooks.cache(model, ["head_out", "mlp_out"], layers) as c, \
                hooks.cache(model, ["resid_post"], [L - 1]) as cr:
            model.forward(batch, last_only=True)
            comps = torch.stack([c["mlp_out", l][0, -1] if h is None else c["head_out", l][0, -1, h]
                                 for _, l, h in parsed])
            lg = R.project(model, cr["resid_post", L - 1][0, -1], comps)  # [n, V]
        others = ans[ans != answer[i]].to(lg.device)
        best = lg[:, others].max(-1).values
        rk = (lg >= best[:, None]).sum(-1) - 1
        for j, (name, _, _) in enumerate(parsed):
            out[(f.id or f.subject, name)] = int(rk[j])
    return out


def swap_targets(model, facts: Sequence[Fact], answer: Sequence[int]) -> list[Fact]:
    """The facts with ``target_true`` replaced by the text of token ``answer[i]`` (prompts unchanged),
    so that the target's first token is that token."""
    tok = model.tokenizer
    out = []
    for f, a in zip(facts, answer):
        text = tok.decode([int(a)])
        g = None
        for cand in (text.strip(), text):
            if cand and target_ids(tok, f.prompt, cand)[0] == int(a):
                g = dataclasses.replace(f, target_true=cand)
                break
        if g is None:
            raise FactscopeError(f"cannot express answer token {text!r} as a target after {f.prompt!r}")
        out.append(g)
    return out


def hallucination(model, facts: Sequence[Fact], answers: Sequence[int], opts=None, rules=R.RoleRules(),
                  top: int = 10, progress: bool = False) -> Hallucination:
    """The hallucination case study on ``facts`` (see the module doc). ``answers``: the relation's
    answer tokens; ``opts``: circuit options (None: no circuits)."""
    import pandas as pd

    facts = list(facts)
    if len(facts) < 2:
        raise FactscopeError("the hallucination study needs at least 2 facts")
    answer, lg = model_answers(model, facts, answers)
    tgt = [target_ids(model.tokenizer, f.prompt, f.target_true)[0] for f in facts]
    right = [a == t for a, t in zip(answer, tgt)]
    lens = LENS.lens_facts(model, facts, extra=[[a] for a in answer], extra_names=["answer"], progress=progress)
    layers = lens.layers
    top1 = lg.argmax(-1).tolist()
    ranks_t = target_ranks(lg, torch.tensor(tgt))
    ranks_a = target_ranks(lg, torch.tensor(answer))
    rows = []
    for i, f in enumerate(facts):
        rows.append({"fact": f.id or f.subject, "subject": f.subject, "target": f.target_true,
                     "answer": model.tokenizer.decode([answer[i]]), "right": right[i],
                     "top1": model.tokenizer.decode([top1[i]]), "target_rank": int(ranks_t[i]),
                     "answer_rank": int(ranks_a[i]),
                     "answer_emerges": LENS.emergence_layer(lens.rank_last[i, 1].tolist(), layers, top),
                     "target_emerges": LENS.emergence_layer(lens.rank_last[i, 0].tolist(), layers, top),
                     "answer_best_subject_rank": int(lens.rank_subject[i, 1].min())})
    table = pd.DataFrame(rows)
    # the first node promoting the model's answer, over every head and MLP
    nodes = all_nodes(model)
    swapped = swap_targets(model, facts, answer)
    rows_a, _ = R.measure(model, swapped, nodes, answers, rules.top_k, progress=progress)
    rows_t, _ = R.measure(model, facts, nodes, answers, rules.top_k, progress=progress)
    best_other = _best_other(model, facts, answer, answers, nodes)
    first = first_promoters(rows_a, rows_t, right, _node_order(model), rules.top_k, facts, best_other)
    circuits, comparison, roles = {}, {}, None
    if opts is not None:
        for name, want in (("right", True), ("wrong", False)):
            idx = [i for i in range(len(facts)) if right[i] == want]
            if len(idx) >= 2:
                try:
                    circuits[name], _ = circuit(model, [swapped[i] for i in idx], opts, progress)
                except FactscopeError:
                    pass  # too few facts with a counterfactual partner: reported as missing
        if "right" in circuits and "wrong" in circuits:
            comparison = compare_graphs(circuits["right"], circuits["wrong"])
        if "wrong" in circuits:
            w = [swapped[i] for i in range(len(facts)) if not right[i]]
            rr, ml = R.measure(model, w, R.circuit_nodes(circuits["wrong"]), answers, rules.top_k)
            roles = R.node_table(rr, ml, model.tokenizer, rules)
    return Hallucination(facts, answer, right, table, lens, first, circuits, comparison, roles)


def _fmt_layer(x) -> str:
    return "never" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.0f}"


def plot_hallucination(h: Hallucination, title: str):
    """Left: median lens rank of the model's answer (right facts; wrong facts) and of the true target
    in wrong facts. Right: the first node promoting the model's answer, counted per node."""
    from factscope.plotting import PALETTE, new_figure

    fig, (ax, bx) = new_figure(1, 2, size=(11, 4.0))
    xs = h.lens.layers
    r = [i for i, x in enumerate(h.right) if x]
    w = [i for i, x in enumerate(h.right) if not x]
    for idx, k, lab, c, ls in ((r, 1, "right facts: answer (= target)", PALETTE[2], "-"),
                               (w, 1, "wrong facts: wrong answer", PALETTE[1], "-"),
                               (w, 0, "wrong facts: true target", PALETTE[0], "--")):
        if idx:
            med = h.lens.rank_last[idx, k].double().median(0).values.numpy() + 1
            ax.plot(xs, med, color=c, ls=ls, lw=2, label=f"{lab} ({len(idx)})")
    ax.set_yscale("log")
    ax.invert_yaxis()
    ax.axhline(10, color="#bbbbbb", lw=0.6, ls=":")
    LENS.layer_x(ax, xs)
    ax.set_ylabel("median rank + 1 at the last token (log)")
    ax.set_title("logit lens", fontsize=10)
    ax.legend(fontsize=7, loc="center left")
    f = h.first.dropna(subset=["node"])
    counts = f.groupby(["node", "right"]).size().unstack(fill_value=0)
    if len(counts):
        order = sorted(counts.index, key=lambda n: (int(n[1:].split(".")[0]), n))
        counts = counts.reindex(order)
        ys = np.arange(len(counts))
        left = np.zeros(len(counts))
        for col, lab, c in ((True, "right facts", PALETTE[2]), (False, "wrong facts", PALETTE[1])):
            if col in counts:
                bx.barh(ys, counts[col].to_numpy(), left=left, color=c, label=lab)
                left += counts[col].to_numpy()
        bx.set_yticks(ys, list(counts.index), fontsize=7)
        bx.invert_yaxis()
        bx.legend(fontsize=7)
    bx.set_xlabel("facts")
    bx.set_title("first node whose output ranks the answer top and above its competitor", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def run_hallucination(run, model, facts: Sequence[Fact], answers: Sequence[int], dataset: str, opts=None,
                      rules=R.RoleRules(), top: int = 10, progress: bool = False) -> Hallucination:
    """:func:`hallucination` written to ``run``: ``hallucination.csv`` (per fact),
    ``hallucination_first_node.csv``, ``hallucination.png``, the circuits (``hallucination_right_graph.json``,
    ``hallucination_wrong_graph.json``), ``hallucination_roles.csv``, ``summary["hallucination"]``."""
    h = hallucination(model, facts, answers, opts, rules, top, progress)
    run.save_table("hallucination", h.table)
    run.save_table("hallucination_first_node", h.first)
    for name, g in h.circuits.items():
        g.to_json(run.path(f"hallucination_{name}_graph.json"))
    if h.roles is not None:
        run.save_table("hallucination_roles", h.roles)
    rel = dataset.split("/")[-1]
    run.save_figure("hallucination", plot_hallucination(h, f"{model.name} · {rel} · right vs wrong answers"))
    t = h.table
    R_, W_ = t[t["right"]], t[~t["right"]]

    def med(s):
        v = s.dropna()
        return float(v.median()) if len(v) else None

    fw = h.first[~h.first["right"]].dropna(subset=["node"])
    fr = h.first[h.first["right"]].dropna(subset=["node"])
    mover_share = None
    if len(fw) and "att_subject" in fw:
        heads = fw[fw["kind"] == "head"]
        mover_share = float((heads["att_subject"] >= rules.attn).mean()) if len(heads) else None
    s = {"n_facts": len(t), "n_right": len(R_), "n_wrong": len(W_),
         "n_top1_right": int((t["target_rank"] == 0).sum()),
         "answer_emerges_median_right": med(R_["answer_emerges"]),
         "answer_emerges_median_wrong": med(W_["answer_emerges"]),
         "target_emerges_median_wrong": med(W_["target_emerges"]),
         "first_node_layer_median_right": med(fr["layer"].astype(float)) if len(fr) else None,
         "first_node_layer_median_wrong": med(fw["layer"].astype(float)) if len(fw) else None,
         "first_node_head_share_wrong": float((fw["kind"] == "head").mean()) if len(fw) else None,
         "first_node_head_attends_subject_wrong": mover_share,
         "first_node_most_common_wrong": fw["node"].value_counts().head(3).to_dict() if len(fw) else {},
         "first_node_most_common_right": fr["node"].value_counts().head(3).to_dict() if len(fr) else {},
         "circuits": sorted(h.circuits),
         "comparison": {k: v for k, v in h.comparison.items() if not k.startswith("edges_") or
                        k in ("edges_a", "edges_b", "edges_shared")},
         "wrong_circuit_roles": R.roles_summary(h.roles) if h.roles is not None else None,
         "emergence_top": top}
    run.update_summary({"hallucination": s})
    cmp = h.comparison
    text = (
        f"{len(t)} facts of `{dataset}` ({model.weights}). The model's answer is the relation answer "
        f"(first token of any of the relation's targets) it ranks highest at the last token: right for "
        f"{len(R_)} facts, wrong for {len(W_)} (an answer of the right type, but not this fact's).\n\n"
        f"- logit lens: the model's answer enters the top {top} and stays from layer "
        f"{_fmt_layer(s['answer_emerges_median_right'])} (median, right facts) vs "
        f"{_fmt_layer(s['answer_emerges_median_wrong'])} (wrong facts); in wrong facts the true target "
        f"does so at {_fmt_layer(s['target_emerges_median_wrong'])}\n"
        f"- the first node (bottom-up) whose own output ranks the answer in its top {rules.top_k} and above "
        f"the competitor (wrong: the true target; right: the best other answer) lies at layer "
        f"{_fmt_layer(s['first_node_layer_median_right'])} (median, right) vs "
        f"{_fmt_layer(s['first_node_layer_median_wrong'])} (wrong); in wrong facts it is a head for "
        f"{_pct(s['first_node_head_share_wrong'])} of the facts, and such a head attends to the subject "
        f"(share >= {rules.attn}) in {_pct(mover_share)}; most common: {s['first_node_most_common_wrong']}\n"
        + (f"- circuits (each group's own answers as targets): {cmp['edges_a']} / {cmp['edges_b']} edges, "
           f"edge Jaccard {cmp['edge_jaccard']:.2f}, node Jaccard {cmp['node_jaccard']:.2f}; nodes only in the "
           f"wrong circuit: {', '.join(cmp['nodes_new']) or 'none'}\n" if cmp else "")
        + (f"- roles in the wrong circuit (w.r.t. the wrong answer): movers {', '.join(s['wrong_circuit_roles']['mover']) or 'none'}, "
           f"mixture {', '.join(s['wrong_circuit_roles']['mixture']) or 'none'}, relation "
           f"{', '.join(s['wrong_circuit_roles']['relation']) or 'none'}" if h.roles is not None else "")
    )
    f, c = hallucination_findings(s)
    run.add_section("circuit_hallucination", "Hallucination: right vs wrong answers", text,
                    figures=[{"name": "hallucination", "caption": "lens of the model's answer; first promoting node"}],
                    tables=["hallucination"] + (["hallucination_roles"] if h.roles is not None else []),
                    findings=f, claims=c)
    return h


def hallucination_findings(s: dict) -> tuple[list[str], list[Claim]]:
    """Findings and Yao et al.'s hallucination claim from ``summary["hallucination"]``. Rule: "a head
    reading the subject moves the wrong answer" holds when, in the wrong facts, the first node that
    promotes the model's answer is a head in at least half of them and such heads attend to the
    subject in at least half; does not hold when either share is below half; undecided with fewer
    than 3 wrong facts or no first node found."""
    if not s.get("n_facts"):
        return [], []
    heads, mover = s.get("first_node_head_share_wrong"), s.get("first_node_head_attends_subject_wrong")
    f = [f"The model's answer is right for {s['n_right']} of {s['n_facts']} facts; it enters the top "
         f"{s['emergence_top']} from layer {_fmt_layer(s['answer_emerges_median_right'])} when right and "
         f"{_fmt_layer(s['answer_emerges_median_wrong'])} when wrong (medians); in wrong facts the first node to "
         f"promote it is a head in {_pct(heads)} of them, attending to the subject in {_pct(mover)}."]
    if s["n_wrong"] < 3 or heads is None:
        holds = None
    else:
        holds = heads >= 0.5 and mover is not None and mover >= 0.5
    claims = [Claim("Hallucinations come from a head that moves the wrong information from the subject",
                    "GPT-2 medium: in wrong answers a mover head reading the subject brings the wrong answer to "
                    "the last position first",
                    f"first promoting node a head in {_pct(heads)} of {s['n_wrong']} wrong facts, attending to the "
                    f"subject in {_pct(mover)}", holds)]
    return f, claims


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


# --------------------------------------------------------------------------------------------
# In-context learning
# --------------------------------------------------------------------------------------------


def demonstrations(facts: Sequence[Fact], exclude: Sequence[Fact], k: int, seed: int = 0) -> list[Fact]:
    """``k`` facts of ``facts`` not in ``exclude`` (by prompt), drawn with ``seed``."""
    pool = [f for f in facts if f.prompt not in {g.prompt for g in exclude}]
    if len(pool) < k:
        raise FactscopeError(f"only {len(pool)} facts are left for {k} demonstrations")
    return random.Random(seed).sample(pool, k)


def demo_text(demos: Sequence[Fact]) -> str:
    """One line per demonstration: the prompt and its target (a space between unless the prompt
    ends in whitespace), each line ending in a newline."""
    return "".join(f"{d.prompt}{'' if d.prompt[-1:].isspace() else ' '}{d.target_true}\n" for d in demos)


def with_demos(model, facts: Sequence[Fact], demos: Sequence[Fact]) -> tuple[list[Fact], list[list[int]]]:
    """The facts with the demonstrations before their prompt, and per fact the prompt positions of
    the demonstration tokens (the query's tokens must come out as without demonstrations)."""
    text = demo_text(demos)
    tok = model.tokenizer
    out, pos = [], []
    special = set(tok.all_special_ids or [])
    for f in facts:
        g = dataclasses.replace(f, template=text + f.template, prompt=text + f.prompt)
        full = list(tok(g.prompt)["input_ids"])
        q = list(tok(f.prompt)["input_ids"])
        lead = 0
        while lead < len(q) and q[lead] in special:
            lead += 1
        body = q[lead:]
        if full[len(full) - len(body):] != body:
            raise FactscopeError(f"the demonstrations change the tokens of {f.prompt!r}")
        out.append(g)
        pos.append(list(range(lead, len(full) - len(body))))
    return out, pos


@dataclasses.dataclass
class ICL:
    facts: list[Fact]  # the queries (without demonstrations)
    demos: list[Fact]
    table: object  # per fact: rank/prob of the target without and with
    lens0: LENS.LensResult
    lens1: LENS.LensResult
    circuits: dict  # "zero"/"icl" -> Graph
    comparison: dict
    new_heads: object  # DataFrame: new heads' attention groups (with demonstrations)
    all_heads_demo_share: float | None


def icl(model, facts: Sequence[Fact], pool: Sequence[Fact], k: int, opts=None, seed: int = 0,
        top: int = 10, progress: bool = False) -> ICL:
    """The in-context-learning study: ``facts`` (not known) with ``k`` demonstrations from ``pool``."""
    import pandas as pd

    facts = list(facts)
    if not facts:
        raise FactscopeError("no facts for the in-context-learning study")
    if k < 1:
        raise FactscopeError(f"--shots must be at least 1, not {k}")
    demos = demonstrations(pool, facts, k, seed)
    shots, demo_pos = with_demos(model, facts, demos)
    lens0 = LENS.lens_facts(model, facts, progress=progress)
    lens1 = LENS.lens_facts(model, shots, progress=progress)
    rows = []
    for i, f in enumerate(facts):
        r0, r1 = int(lens0.rank_last[i, 0, -1]), int(lens1.rank_last[i, 0, -1])
        rows.append({"fact": f.id or f.subject, "subject": f.subject, "target": f.target_true,
                     "rank_without": r0, "rank_with": r1, "prob_without": float(lens0.prob_last[i, 0, -1]),
                     "prob_with": float(lens1.prob_last[i, 0, -1]),
                     "top1_without": model.tokenizer.decode([int(lens0.top1[i, -1])]),
                     "top1_with": model.tokenizer.decode([int(lens1.top1[i, -1])]),
                     "emerges_without": LENS.emergence_layer(lens0.rank_last[i, 0].tolist(), lens0.layers, top),
                     "emerges_with": LENS.emergence_layer(lens1.rank_last[i, 0].tolist(), lens1.layers, top)})
    table = pd.DataFrame(rows)
    circuits, comparison, new_heads, base = {}, {}, None, None
    if opts is not None:
        circuits["zero"], _ = circuit(model, facts, opts, progress)
        circuits["icl"], _ = circuit(model, shots, opts, progress)
        comparison = compare_graphs(circuits["zero"], circuits["icl"])
        heads = [n for n in comparison["nodes_new"] if not n.startswith("m")]
        every = [n for n in all_nodes(model) if not n.startswith("m")]
        rows_all, _ = R.measure(model, shots, every, top_k=20, extra_groups=[{"demos": p} for p in demo_pos])
        per_head = rows_all.groupby("node", sort=False)[[c for c in rows_all.columns if c.startswith("att_")]].mean()
        base = float(per_head["att_demos"].mean())
        new_heads = per_head.loc[heads].reset_index() if heads else per_head.iloc[:0].reset_index()
    return ICL(facts, demos, table, lens0, lens1, circuits, comparison, new_heads, base)


def plot_icl(res: ICL, title: str):
    """Left: median lens rank of the target without and with the demonstrations. Right: attention
    from the last token to the demonstrations of the heads that appear in the circuit with them."""
    from factscope.plotting import PALETTE, new_figure

    fig, (ax, bx) = new_figure(1, 2, size=(11, 4.6))
    xs = res.lens0.layers
    for lr, lab, c in ((res.lens0, "without demonstrations", PALETTE[7]),
                       (res.lens1, f"with {len(res.demos)} demonstrations", PALETTE[0])):
        med = lr.rank_last[:, 0].double().median(0).values.numpy() + 1
        ax.plot(xs, med, color=c, lw=2, label=f"{lab}: last token")
        ax.plot(xs, lr.rank_subject[:, 0].double().median(0).values.numpy() + 1, color=c, lw=1.2, ls="--",
                label=f"{lab}: subject (min)")
    ax.set_yscale("log")
    ax.invert_yaxis()
    ax.axhline(10, color="#bbbbbb", lw=0.6, ls=":")
    LENS.layer_x(ax, xs)
    ax.set_ylabel("median target rank + 1 (log)")
    ax.set_title(f"logit lens, {len(res.facts)} facts the model does not know", fontsize=10)
    ax.legend(fontsize=7, loc="center left")
    nh = res.new_heads
    if nh is not None and len(nh):
        groups = [c for c in ("att_demos", "att_subject", "att_relation", "att_last", "att_other") if c in nh]
        left = np.zeros(len(nh))
        for j, g in enumerate(groups):
            bx.barh(np.arange(len(nh)), nh[g], left=left, color=PALETTE[j], label=g[4:])
            left += nh[g].to_numpy()
        bx.set_yticks(np.arange(len(nh)), nh["node"].tolist(), fontsize=7)
        bx.invert_yaxis()
        if res.all_heads_demo_share is not None:
            bx.axvline(res.all_heads_demo_share, color="#000000", lw=0.8, ls="--",
                       label="all heads: mean share on demos")
        bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    else:
        bx.text(0.5, 0.5, "no new heads" if res.circuits else "circuits not computed", ha="center",
                transform=bx.transAxes)
    bx.set_xlim(0, 1)
    bx.set_xlabel("attention from the last token (share)")
    bx.set_title("heads new in the circuit with demonstrations", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return fig


def run_icl(run, model, facts: Sequence[Fact], pool: Sequence[Fact], k: int, dataset: str, opts=None,
            seed: int = 0, top: int = 10, progress: bool = False) -> ICL:
    """:func:`icl` written to ``run``: ``icl.csv``, ``icl_lens_by_layer.csv``, ``icl_new_heads.csv``, ``icl.png``, the circuits
    (``icl_zero_graph.json``, ``icl_icl_graph.json``), ``summary["icl"]``, a section."""
    res = icl(model, facts, pool, k, opts, seed, top, progress)
    run.save_table("icl", res.table)
    import pandas as pd

    run.save_table("icl_lens_by_layer", pd.concat([res.lens0.by_layer().assign(demonstrations=0),
                                                   res.lens1.by_layer().assign(demonstrations=k)], ignore_index=True))
    if res.new_heads is not None:
        run.save_table("icl_new_heads", res.new_heads)
    for name, g in res.circuits.items():
        g.to_json(run.path(f"icl_{name}_graph.json"))
    rel = dataset.split("/")[-1]
    run.save_figure("icl", plot_icl(res, f"{model.name} · {rel} · {k}-shot in-context learning"))
    t = res.table
    cmp = res.comparison
    s = {"n_facts": len(t), "shots": k, "demonstrations": [d.subject for d in res.demos],
         "hit1_without": float((t["rank_without"] == 0).mean()), "hit1_with": float((t["rank_with"] == 0).mean()),
         "hit10_without": float((t["rank_without"] < 10).mean()), "hit10_with": float((t["rank_with"] < 10).mean()),
         "median_rank_without": float(t["rank_without"].median()), "median_rank_with": float(t["rank_with"].median()),
         "mean_prob_without": float(t["prob_without"].mean()), "mean_prob_with": float(t["prob_with"].mean()),
         "emerges_median_with": float(t["emerges_with"].dropna().median()) if t["emerges_with"].notna().any() else None,
         "comparison": {k_: v for k_, v in cmp.items() if not k_.startswith("edges_") or
                        k_ in ("edges_a", "edges_b", "edges_shared")},
         "new_heads_demo_share": float(res.new_heads["att_demos"].mean()) if res.new_heads is not None and
         len(res.new_heads) else None,
         "all_heads_demo_share": res.all_heads_demo_share}
    run.update_summary({"icl": s})
    text = (
        f"{len(t)} facts of `{dataset}` that {model.name} ({model.weights}) does not know, each with the same "
        f"{k} demonstrations of the relation before it ({', '.join(s['demonstrations'])}; seed {seed}).\n\n"
        f"- the answer becomes known: Hit@1 {s['hit1_without']:.2f} → {s['hit1_with']:.2f}, Hit@10 "
        f"{s['hit10_without']:.2f} → {s['hit10_with']:.2f}, median rank {s['median_rank_without']:,.0f} → "
        f"{s['median_rank_with']:,.0f}, mean probability {s['mean_prob_without']:.3f} → {s['mean_prob_with']:.3f}\n"
        + (f"- circuits without / with ({cmp['edges_a']} / {cmp['edges_b']} edges): edge Jaccard "
           f"{cmp['edge_jaccard']:.2f}, node Jaccard {cmp['node_jaccard']:.2f}; nodes that appear: "
           f"{', '.join(cmp['nodes_new']) or 'none'}; nodes that disappear: {', '.join(cmp['nodes_lost']) or 'none'}\n"
           f"- the new heads put {_pct(s['new_heads_demo_share'])} of the last token's attention on the "
           f"demonstrations (all heads: {_pct(s['all_heads_demo_share'])})" if cmp else "")
    )
    f, c = icl_findings(s)
    run.add_section("circuit_icl", "In-context learning", text,
                    figures=[{"name": "icl", "caption": "lens with and without demonstrations; new heads' attention"}],
                    tables=["icl"] + (["icl_new_heads"] if res.new_heads is not None else []),
                    findings=f, claims=c)
    return res


def icl_findings(s: dict) -> tuple[list[str], list[Claim]]:
    """Findings and Yao et al.'s in-context-learning claims from ``summary["icl"]``. Rules:
    "demonstrations make the facts known" holds when Hit@10 rises by at least 0.1, does not hold when
    it does not rise, else undecided; "new heads attend to the demonstrations" holds when the heads
    new in the circuit with demonstrations put a larger share of the last token's attention on them
    than all heads on average, does not hold when not larger, undecided without new heads."""
    if not s.get("n_facts"):
        return [], []
    h0, h1 = s["hit10_without"], s["hit10_with"]
    new, all_ = s.get("new_heads_demo_share"), s.get("all_heads_demo_share")
    f = [f"With {s['shots']} demonstrations, Hit@10 on {s['n_facts']} facts the model did not know goes from "
         f"{h0:.2f} to {h1:.2f} (Hit@1 {s['hit1_without']:.2f} → {s['hit1_with']:.2f}, median rank "
         f"{s['median_rank_without']:,.0f} → {s['median_rank_with']:,.0f}); the heads new in the circuit put "
         f"{_pct(new)} of the last token's attention on the demonstrations (all heads {_pct(all_)})."]
    claims = [
        Claim("Demonstrations let the model answer facts it did not know",
              "GPT-2 medium, TinyLlama: with demonstrations the circuit changes and the answer is found",
              f"Hit@10 {h0:.2f} → {h1:.2f}", True if h1 - h0 >= 0.1 else False if h1 <= h0 else None),
        Claim("New heads in the in-context circuit attend to the demonstrations",
              "GPT-2 medium, TinyLlama: heads that appear with demonstrations attend to the demonstrations' "
              "answers (induction-like)",
              f"new heads {_pct(new)} of the attention on the demonstrations vs all heads {_pct(all_)}",
              None if new is None or all_ is None else new > all_),
    ]
    return f, claims


# --------------------------------------------------------------------------------------------
# the commands' bodies, shared by the CLI and the Python calls (factscope.circuits.hallucination, .icl)


def relation_answers(model, dataset: str) -> list[int]:
    """The first target tokens of every fact of ``dataset`` (the relation's answer type)."""
    from factscope.facts import load_facts

    return answer_tokens(model, load_facts(dataset))


def hallucination_on(run, model, facts: Sequence[Fact], table, opts, dataset: str, rules=R.RoleRules(),
                     progress: bool = False) -> Hallucination:
    """``circuit hallucination`` on ``facts`` (every fact of the relation; ``table`` their known
    table): the relation's answers from ``dataset``, then :func:`run_hallucination` (``opts`` None:
    no circuits)."""
    answers = relation_answers(model, dataset)
    if len(answers) < 2:
        raise FactscopeError(f"{dataset} has {len(answers)} distinct answer token(s); a wrong answer needs 2")
    run.save_table("known_facts", table)
    return run_hallucination(run, model, facts, answers, dataset, opts, rules, progress=progress)


def icl_on(run, model, facts: Sequence[Fact], table, opts, dataset: str, shots: int, known_top_k: int,
           seed: int = 0, progress: bool = False) -> ICL:
    """``circuit icl`` on the ``facts`` the model does not know (not in ``table``'s known rows), with
    ``shots`` demonstrations drawn from ``dataset``: :func:`run_icl` (``opts`` None: no circuits)."""
    from factscope.facts import load_facts

    known = set(table.loc[table["known"].astype(bool), "prompt"]) if "prompt" in table else set()
    unknown = [f for f in facts if f.prompt not in known]
    if len(unknown) < 2:
        raise FactscopeError(f"{model.name} knows all but {len(unknown)} of the facts of {dataset} "
                             f"(top-{known_top_k}); use a smaller --known-top-k (e.g. 1)")
    run.save_table("known_facts", table)
    return run_icl(run, model, unknown, load_facts(dataset), shots, dataset, opts, seed=seed, progress=progress)


def circuit_graph(graph, model) -> Graph:
    """A circuit to study: a :class:`Graph`, or the path of a graph JSON (``graph.json`` of ``circuit
    discover``), checked to be a graph of ``model`` with edges in its circuit."""
    where = graph if not isinstance(graph, Graph) else "the graph given"
    g = graph if isinstance(graph, Graph) else Graph.from_json(graph)
    ref = Graph.from_model(model)
    if (g.n_up, g.n_down) != (ref.n_up, ref.n_down):
        raise FactscopeError(f"{where} is not a graph of {model.name} ({g!r})")
    if not g.in_graph.any():
        raise FactscopeError(f"{where} has no edges in its circuit")
    return g


def roles_on(run, model, facts: Sequence[Fact], table, opts, dataset: str, rules=R.RoleRules(),
             graph: Graph | None = None, progress: bool = False):
    """``circuit roles`` on the known ``facts`` (``table``: their known table): the circuit ``graph``,
    or one discovered on the facts with ``opts``, then :func:`factscope.circuits.roles.run_roles` with
    the relation's answers from ``dataset``. Returns the node table."""
    from factscope.circuits.data import build
    from factscope.circuits.run import run_discover

    if not facts:
        raise FactscopeError(f"{model.name} knows none of the facts of {dataset}")
    if graph is None and len(facts) < 2:
        raise FactscopeError(f"{model.name} knows {len(facts)} facts of {dataset}; need at least 2")
    answers = relation_answers(model, dataset)
    run.save_table("known_facts", table)
    if graph is None:
        graph = run_discover(run, model, build(model, facts, seed=opts.seed), opts, dataset, progress=progress)
    return R.run_roles(run, model, facts, graph, dataset, answers, rules, progress=progress)
