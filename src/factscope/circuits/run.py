"""Circuit discovery and evaluation runs: the tiers under ``factscope circuit discover|evaluate``.

``discover(model, data, ...) -> Graph`` (pure computation), ``evaluate(model, d_val, d_test, ...)``
(discovery on D_val, standalone evaluation on D_test), and ``run_discover`` / ``run_evaluate`` which
write a run directory: ``graph.json`` (our graph: scores and the circuit), ``circuit_eap.json``
(EAP-IG/MIB format), ``circuit_scores.csv`` (every edge's score), ``circuit.dot`` (+ ``.svg`` with
Graphviz), ``circuit_view.html`` (the interactive layered view), ``circuit.png``, and for evaluate
``circuit_eval.csv``, ``faithfulness_curve.csv``/``.png`` and ``summary["circuit"]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from factscope.findings import Claim
from factscope.circuits import metrics as M
from factscope.circuits.evaluate import (
    FRACTIONS,
    SELECTIONS,
    evaluate_circuit,
    masked_runner,
    top_mask,
)
from factscope.errors import FactscopeError

METHODS = ("eap-ig", "eap-ig-act", "eap", "acdc", "exact")
ABLATIONS = ("zero", "mean", "counterfactual")


@dataclass
class Options:
    method: str = "eap-ig"
    metric: str = "nll"
    ablation: str = "zero"
    steps: int = 5
    threshold: float = 0.1
    edge_fraction: float = 0.05
    selection: str = "topn"
    n_edges: int | None = None
    n_random: int = 5
    curve: bool = True
    compare_exact: int = 0
    seed: int = 0

    def check(self) -> Options:
        if self.method not in METHODS:
            raise FactscopeError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.metric not in M.METRICS:
            raise FactscopeError(f"unknown metric {self.metric!r}: use one of {', '.join(M.METRICS)}")
        if self.ablation not in ABLATIONS:
            raise FactscopeError(f"unknown ablation {self.ablation!r}: use one of {', '.join(ABLATIONS)}")
        if self.selection not in SELECTIONS:
            raise FactscopeError(f"unknown selection {self.selection!r}: use one of {', '.join(SELECTIONS)}")
        if not 0 < self.edge_fraction <= 1:
            raise FactscopeError(f"--edge-fraction must be in (0, 1], got {self.edge_fraction}")
        if self.n_edges is not None and self.n_edges < 1:
            raise FactscopeError(f"--edges must be at least 1, got {self.n_edges}")
        if self.steps < 1:
            raise FactscopeError(f"--steps must be at least 1, got {self.steps}")
        if self.threshold < 0:
            raise FactscopeError(f"--threshold must be >= 0, got {self.threshold}")
        if self.n_random < 1:
            raise FactscopeError(f"--random-seeds must be at least 1, got {self.n_random}")
        return self

    def size(self, total: int) -> int:
        n = self.n_edges if self.n_edges is not None else max(1, int(self.edge_fraction * total))
        if n > total:
            raise FactscopeError(f"--edges {n} is more than the {total} edges of the model's graph")
        return n


def _ablation_kwargs(ablation: str, data, reference) -> dict:
    return {"ablation": ablation, "corrupted": data.corrupted if ablation == "counterfactual" else None,
            "reference": reference.clean if ablation == "mean" else None}


def discover(model, data, opts: Options, reference=None, progress: bool = False):
    """Scores for every edge of ``model``'s graph on ``data`` with ``opts.method``; returns the Graph.

    ``reference``: the CircuitData whose clean batch mean-ablation averages over (default: ``data``).
    ACDC also sets the graph's circuit (its kept edges); the gradient methods and exact patching only
    score (choose the circuit with :func:`~factscope.circuits.evaluate.top_mask`), on the current
    executor (:func:`_shard_scores`; ACDC's greedy pruning runs here).
    """
    from factscope.circuits import Graph

    g = Graph.from_model(model)
    if opts.method == "acdc":
        from factscope.circuits.acdc import acdc, many_runner

        metric = M.make(opts.metric, model, data)
        run_many = many_runner(model, data.clean, metric, **_ablation_kwargs(opts.ablation, data, reference or data))
        acdc(g, run_many, badness_sign=-1.0 if metric.higher_is_better else 1.0, threshold=opts.threshold,
             progress=progress)
    else:
        g.scores = _shard_scores(model, data, opts, reference or data)
    return g


def _scores(model, data, opts: Options, reference) -> torch.Tensor:
    """:func:`~factscope.circuits.attribute` of ``data``'s facts (CPU ``[n_up, n_down]``)."""
    from factscope.circuits import Graph, attribute

    kw = _ablation_kwargs(opts.ablation, data, reference)
    return attribute(model, Graph.from_model(model), data.clean, data.corrupted, M.make(opts.metric, model, data),
                     method=opts.method, steps=opts.steps, ablation=opts.ablation, reference=kw["reference"])


def _shard_scores(model, data, opts: Options, reference) -> torch.Tensor:
    """Edge scores of the gradient methods and exact patching on the current executor: the facts
    are cut into one shard per worker (``--executor ray --workers N``; locally one shard, the whole
    batch), each shard is scored where it runs, and since a score averages over examples the whole
    set's scores are the shards' weighted by their sizes. A fact's counterfactual partner goes
    with it; mean ablation averages over the whole reference in every shard."""
    from factscope import executors
    from factscope.circuits.data import encode
    from factscope.loop import resumable

    n = max(1, min(len(data), getattr(executors.current(), "workers", 1)))
    if n == 1:
        return _scores(model, data, opts, reference)
    bounds = [round(i * len(data) / n) for i in range(n + 1)]
    shards = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    facts, partners = data.facts, data.partners
    ref = (reference.facts, reference.partners) if opts.ablation == "mean" else None

    def work(idx: list[int], report) -> list[dict]:  # runs on a worker: only facts travel, not tensors
        out = []
        for s in idx:
            sub = encode(model, [facts[i] for i in shards[s]], [partners[i] for i in shards[s]])
            scores = _scores(model, sub, opts, encode(model, *ref) if ref else sub)
            out.append({"sum": scores * len(sub), "n": len(sub)})
        return out

    recs = resumable(list(range(n)), work, None, batches=1).values()
    return sum(r["sum"] for r in recs) / sum(r["n"] for r in recs)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long 1-d tensors (average ranks for ties)."""
    import pandas as pd

    x = pd.Series(a.double().cpu().numpy()).rank()
    y = pd.Series(b.double().cpu().numpy()).rank()
    return float(x.corr(y))


def compare_with_exact(model, g, data, opts: Options, n_facts: int, reference=None) -> dict:
    """Spearman correlation of ``g``'s scores with exact edge patching on the first ``n_facts`` facts
    of ``data`` (over all real edges), and the overlap of the top-50 edges by |score|."""
    from factscope.circuits import Graph, attribute

    sub = data.subset(range(min(n_facts, len(data))))
    ex = Graph.from_model(model)
    metric = M.make(opts.metric, model, sub)
    attribute(model, ex, sub.clean, sub.corrupted, metric, method="exact", ablation=opts.ablation,
              reference=(reference or data).clean if opts.ablation == "mean" else None)
    real = g.real.bool()
    a, b = torch.nan_to_num(g.scores[real].float()), torch.nan_to_num(ex.scores[real].float())
    k = min(50, len(a))
    top_a = set(a.abs().topk(k).indices.tolist())
    top_b = set(b.abs().topk(k).indices.tolist())
    return {"spearman": spearman(a, b), "spearman_abs": spearman(a.abs(), b.abs()),
            "top50_overlap": len(top_a & top_b) / k, "n_facts": len(sub)}


# --------------------------------------------------------------------------------------------
# Writing runs
# --------------------------------------------------------------------------------------------


def _edge_table(g):
    import pandas as pd

    rows = []
    sc = g.scores.float()
    for u, r in g.real.nonzero().tolist():
        rows.append({"edge": f"{g.up_names[u]}->{g.down_names[r]}", "upstream": g.up_names[u],
                     "receiver": g.down_names[r], "score": float(sc[u, r]), "in_circuit": bool(g.in_graph[u, r])})
    df = pd.DataFrame(rows)
    return df.reindex(df["score"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def write_circuit(run, model, g, title: str, prefix: str = "circuit") -> dict:
    """Graph JSON (ours and EAP-IG's), the edge table, DOT/SVG, the HTML view and the PNG."""
    from factscope.circuits import views
    from factscope.circuits.interop import to_eap_json

    g.to_json(run.path("graph.json" if prefix == "circuit" else f"{prefix}_graph.json"))
    to_eap_json(g, run.path(f"{prefix}_eap.json"), d_model=model.d_model,
                parallel_attn_mlp=bool(model.parallel))
    run.save_table(f"{prefix}_scores", _edge_table(g))
    files = views.write_dot(g, run.path(f"{prefix}.dot"))
    views.write_html(g, run.path(f"{prefix}_view.html"), title=title, initial=min(int(g.in_graph.sum()), 150))
    # static: the circuit's interactive view is circuit_view.html (nodes, hover, edge slider), which
    # the report shows in place of this PNG
    run.save_figure(prefix, views.plot_circuit(g, title=title, max_edges=150), interactive=False)
    return {"svg": any(p.suffix == ".svg" for p in files)}


def _curve_figure(ev, title: str):
    from factscope.plotting import new_figure

    if not ev.curve:  # no curve: the rank bars alone
        fig, bx = new_figure(size=(5.5, 3.8))
        _rank_bars(bx, ev)
        fig.suptitle(title, fontsize=10)
        return fig
    fig, (ax, bx) = new_figure(1, 2, size=(10, 3.8))
    xs = [p["x"] * 100 for p in ev.curve if p["x"] > 0]
    fs = [p["faithfulness"] for p in ev.curve if p["x"] > 0]
    ax.plot(xs, fs, marker="o", color="#0072B2", label="top edges by |score|")
    ax.axhline(1, color="#888888", lw=0.8, ls="--")
    ax.axhline(0, color="#bbbbbb", lw=0.6)
    mv = ev.metric_values
    from factscope.circuits.evaluate import faithfulness

    fr = faithfulness(mv["random"], mv["full"], mv["empty"])
    x0 = 100 * ev.n_edges / ev.n_edges_total
    ax.scatter([x0], [ev.faithfulness], color="#D55E00", zorder=3, label=f"circuit ({ev.n_edges} edges)")
    ax.scatter([x0], [fr], color="#999999", marker="x", zorder=3, label="random, same size")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of the graph)")
    ax.set_ylabel(f"faithfulness ({ev.metric})")
    ax.set_title(f"CPR {ev.cpr:.2f}, CMD {ev.cmd:.2f}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    _rank_bars(bx, ev)
    fig.suptitle(title, fontsize=11)
    return fig


def _rank_bars(bx, ev) -> None:
    names = {"hit1": "Hit@1", "hit10": "Hit@10", "mrr": "MRR"}
    w = 0.26
    for i, (v, c) in enumerate((("full", "#444444"), ("circuit", "#0072B2"), ("random", "#bbbbbb"))):
        vals = [ev.ranks[k][v] for k in names]
        err = [ev.ranks[k]["random_std"] for k in names] if v == "random" else None
        xs = [j + (i - 1) * w for j in range(3)]
        bx.bar(xs, vals, w, yerr=err, color=c, label=v, capsize=3)
        for x, y in zip(xs, vals):  # values on the bars (zero bars are otherwise invisible)
            bx.text(x, y + 0.02, f"{y:.2f}", ha="center", va="bottom", fontsize=6.5)
    bx.set_xticks(range(3), list(names.values()))
    bx.set_ylim(0, 1.28)
    bx.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    bx.set_title(f"D_test: target's first token ({ev.n_edges} edges vs all)", fontsize=10)
    bx.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def run_discover(run, model, data, opts: Options, dataset: str, progress: bool = False, reference=None):
    """Discover on ``data``; write the graph, scores and views; returns the Graph (circuit selected)."""
    from factscope.circuits import Graph

    path = run.path("graph.json")
    if path.is_file():  # resumed run with the same config: the scores are already there
        g = Graph.from_json(path)
    else:
        g = discover(model, data, opts, reference=reference, progress=progress)
    total = int(g.real.sum())
    if opts.method != "acdc":
        top_mask(g, opts.size(total), selection=opts.selection)
    n = int(g.in_graph.sum())
    title = f"{model.name} · {dataset.split('/')[-1]} · {opts.method} · {n} of {total} edges"
    info = write_circuit(run, model, g, title)
    nodes = g.nodes_in_graph() if hasattr(g, "nodes_in_graph") else None
    run.update_summary({"circuit": {"method": opts.method, "n_edges_total": total, "n_edges": n,
                                    "n_nodes": len(nodes) if nodes is not None else None,
                                    "n_facts_discovery": len(data)}})
    how = ("ACDC keeps an edge when removing it raises the metric by at least the threshold "
           f"({opts.threshold})" if opts.method == "acdc" else
           f"{n} edges chosen by |score| ({'greedily from the logits, as EAP-IG' if opts.selection == 'greedy' else 'the top edges'}"
           f"; dead edges pruned)")
    run.add_section(
        "circuit_discover", "Circuit",
        f"Method **{opts.method}** ({opts.metric} metric, {opts.ablation} ablation"
        f"{f', {opts.steps} steps' if opts.method.startswith('eap-ig') else ''}) on {len(data)} known facts of "
        f"`{dataset}`. The circuit: {how}. Layers run bottom (embeddings) to top (logits); inside a "
        f"layer: attention heads, the shared key/value input (grouped-query models), the MLP. Edge colour "
        f"is the signed score, width |score|. The interactive view with a slider for the number of edges "
        f"is below (also `circuit_view.html` in this run; offline); `circuit_eap.json` loads in EAP-IG/MIB; "
        f"`circuit.dot`{' and `circuit.svg`' if info['svg'] else ''} for Graphviz. Model weights: 4-bit "
        f"GGUF dequantized to float for the embedded models.",
        figures=[{"name": "circuit", "caption": "the circuit's edges, strongest first (the static PNG draws at most 150)"}],
        tables=["circuit_scores"],
    )
    return g


def run_evaluate(run, model, d_val, d_test, opts: Options, dataset: str, progress: bool = False):
    """Discover on D_val, evaluate on D_test; writes tables, figures, summary and a report section."""
    g = run_discover(run, model, d_val, opts, dataset, progress=progress, reference=d_val)
    if not g.in_graph.any():
        raise FactscopeError("the discovered circuit has no edges (lower the ACDC threshold or keep more edges)")
    # the requested size (top edges by |score|, then dead ones pruned); ACDC: its own edge set
    n = int(g.in_graph.sum()) if opts.method == "acdc" else opts.size(int(g.real.sum()))
    metric = M.make(opts.metric, model, d_test)
    kw = _ablation_kwargs(opts.ablation, d_test, d_val)
    runner = masked_runner(model, d_test.clean, metric.positions, **kw)
    saved, saved_scores = g.in_graph.clone(), g.scores.clone()
    if opts.method == "acdc":
        # the circuit is ACDC's edge set: rank its edges first (by |metric change|), then the others
        a = torch.nan_to_num(g.scores.float()).abs()
        g.scores.copy_(torch.where(saved, a + a.max() + 1, a).to(g.scores.dtype))
    ev = evaluate_circuit(runner, metric, d_test.first, g, n, n_random=opts.n_random, seed=opts.seed,
                          fractions=FRACTIONS if opts.curve else None,
                          selection="topn" if opts.method == "acdc" else opts.selection)
    summ = ev.summary()
    summ["spearman_vs_exact"] = None
    if opts.compare_exact and opts.method != "exact":
        cmp = compare_with_exact(model, g, d_val, opts, opts.compare_exact, reference=d_val)
        summ["spearman_vs_exact"] = cmp["spearman"]
        summ["exact_comparison"] = cmp
    summ.update({"method": opts.method, "n_edges_requested": n, "n_val": len(d_val), "n_test": len(d_test)})
    run.update_summary({"circuit": summ})
    run.save_table("circuit_eval", ev.table())
    if ev.curve:
        import pandas as pd

        run.save_table("faithfulness_curve", pd.DataFrame(ev.curve))
    title = f"{model.name} · {dataset.split('/')[-1]} · {opts.method}, {ev.n_edges} edges"
    run.save_figure("faithfulness_curve", _curve_figure(ev, title))
    h10, mrr = ev.ranks["hit10"], ev.ranks["mrr"]
    text = (
        f"Discovered on D_val ({len(d_val)} facts), evaluated standalone on D_test ({len(d_test)} other facts) "
        f"with {opts.ablation} ablation of every edge outside the circuit. The circuit keeps {ev.n_edges} of "
        f"{ev.n_edges_total} edges ({100 * ev.n_edges / ev.n_edges_total:.1f}%).\n\n"
        f"- Hit@10: full model {_fmt(h10['full'])}, circuit {_fmt(h10['circuit'])}, random circuits of the same "
        f"size {_fmt(h10['random'])} ± {_fmt(h10['random_std'])} ({opts.n_random} seeds)\n"
        f"- MRR: full {_fmt(mrr['full'])}, circuit {_fmt(mrr['circuit'])}, random {_fmt(mrr['random'])} ± "
        f"{_fmt(mrr['random_std'])}\n"
        f"- faithfulness ({opts.metric}): {_fmt(ev.faithfulness)}; "
        + (f"MIB curve over 0.1–100% of edges: CPR {_fmt(ev.cpr)}, CMD {_fmt(ev.cmd)}" if ev.curve
           else "MIB curve not computed (--no-curve)")
        + (f"\n- Spearman correlation with exact edge patching: {_fmt(summ['spearman_vs_exact'])}"
           if summ["spearman_vs_exact"] is not None else "")
        + "\n\nHit@k/MRR: rank of the target's first token among the whole vocabulary at the last prompt "
        "position (0 = top; Hit@k = rank < k), against D_test's own targets."
    )
    findings, claims = evaluate_findings(summ)
    run.add_section("circuit_evaluate", "Circuit evaluation (D_test)", text, findings=findings, claims=claims,
                    figures=[{"name": "faithfulness_curve",
                              "caption": "faithfulness by circuit size (left) and ranks on D_test (right)"
                              if ev.curve else "ranks on D_test"}],
                    tables=["circuit_eval"] + (["faithfulness_curve"] if ev.curve else []))
    g.in_graph.copy_(saved)
    g.scores.copy_(saved_scores)
    return ev, g


def evaluate_findings(s: dict) -> tuple[list[str], list[Claim]]:
    """The circuit's standalone Hit@10 against the full model and random circuits. Rule (the paper's
    claim that a small circuit keeps the fact): holds when the circuit keeps at least 80% of the full
    model's Hit@10 and beats the random circuits' mean by more than 2 of their standard deviations;
    does not hold when it keeps under half of it or does not beat random; else undecided."""
    h = s.get("hit10") or {}
    if h.get("full") is None or h.get("circuit") is None:
        return [], []
    total, n = s.get("n_edges_total"), s.get("n_edges")
    pct = 100 * n / total if total else float("nan")
    r, rs = h.get("random"), h.get("random_std") or 0.0
    findings = [f"The {s.get('method')} circuit with {n} of {total} edges ({pct:.1f}%) reaches Hit@10 "
                f"{h['circuit']:.2f} on {s.get('n_test')} held-out facts (full model {h['full']:.2f}, random circuits "
                f"of the same size {r:.2f} ± {rs:.2f}); faithfulness {s.get('faithfulness', float('nan')):.2f}."]
    kept = h["circuit"] / h["full"] if h["full"] else float("nan")
    beats = r is None or h["circuit"] - r > 2 * rs
    holds = True if kept >= 0.8 and beats else False if kept < 0.5 or not beats else None
    claims = [Claim("A small circuit keeps the fact on its own, far above random circuits",
                    "GPT-2 medium: circuits of under 10% of the edges keep much of the full model's Hit@10, some even raise it",
                    f"{pct:.1f}% of edges: Hit@10 {h['circuit']:.2f} vs full {h['full']:.2f}, random {r:.2f}", holds)]
    return findings, claims


def options_dict(opts: Options) -> dict:
    return asdict(opts)


def demo_section(run, model, relation: str = "lre:factual/country_capital_city", n_facts: int = 16,
                 seed: int = 0, progress: bool = False) -> dict:
    """The ``factscope demo`` circuit part: EAP-IG on half of ``n_facts`` facts of one relation whose
    target is in the model's top 10, the circuit at 5% of the edges evaluated on the other half
    (3 random seeds, no curve), with counterfactual ablation: on Gemma 3 270M zero ablation (the
    paper's) leaves no faithful circuit below half of the edges (docs/circuits.md)."""
    from factscope.circuits.data import build, known_relation_facts, split

    facts, _ = known_relation_facts(model, relation, limit=n_facts, seed=seed, top_k=10)
    if len(facts) < 4:
        run.add_section("circuit_evaluate", "Circuit evaluation (D_test)",
                        f"Skipped: {model.name} knows only {len(facts)} facts of `{relation}`.")
        return {}
    val, test = split(facts, 0.5, seed)
    d_val, d_test = build(model, val, seed=seed), build(model, test, seed=seed + 1)
    opts = Options(method="eap-ig", ablation="counterfactual", n_random=3, curve=False, seed=seed)
    ev, _ = run_evaluate(run, model, d_val, d_test, opts, relation, progress=progress)
    return ev.summary()


def discover_known(run, model, facts, table, opts: Options, dataset: str, progress: bool = False):
    """``circuit discover`` on the known ``facts`` (their known table ``table``), paired with
    counterfactuals (seeded by ``opts.seed``): :func:`run_discover`; returns the Graph."""
    from factscope.circuits.data import build

    if len(facts) < 2:
        raise FactscopeError(f"{model.name} knows {len(facts)} facts of {dataset}; need at least 2")
    data = build(model, facts, seed=opts.seed)
    run.save_table("known_facts", table)
    return run_discover(run, model, data, opts, dataset, progress=progress)


def evaluate_known(run, model, facts, table, opts: Options, dataset: str, val_fraction: float = 0.5,
                   progress: bool = False):
    """``circuit evaluate`` on the known ``facts`` (their known table ``table``): split them into D_val
    and D_test (seeded by ``opts.seed``), pair them with counterfactuals, then :func:`run_evaluate`."""
    from factscope.circuits.data import build, split

    if len(facts) < 4:
        raise FactscopeError(f"{model.name} knows only {len(facts)} facts of {dataset}; evaluation needs at least 4 "
                             "(another relation, or a larger --known-top-k)")
    val, test = split(facts, val_fraction, opts.seed)
    d_val, d_test = build(model, val, seed=opts.seed), build(model, test, seed=opts.seed + 1)
    run.save_table("known_facts", table)
    run.update_summary({"data": {"n_facts": len(table), "n_known": int(table["known"].sum()), "n_used": len(facts),
                                 "n_val": len(d_val), "n_test": len(d_test),
                                 "dropped_no_partner": len(d_val.dropped) + len(d_test.dropped)}})
    return run_evaluate(run, model, d_val, d_test, opts, dataset, progress=progress)


def from_python(command: str, model, dataset: str, step, *, limit: int | None, seed: int, known_only: bool,
                 known_top_k: int, out, progress: bool, options: dict, extra: dict | None = None,
                 main: str | None = None, key: str = "circuit"):
    """A ``circuit`` command from Python: load ``model``, check the options, choose the known facts
    and call ``step(run, model, facts, table, opts)`` in a new run (:func:`factscope.notebook.analysis`;
    ``key``: the command's entry in summary.json, ``main``: its main table)."""
    from factscope.circuits.data import known_relation_facts
    from factscope.notebook import analysis, as_model, config_of

    opts = Options(seed=seed, **options).check()
    model = as_model(model)
    facts, table = known_relation_facts(model, dataset, limit=limit, seed=seed, top_k=known_top_k, progress=progress,
                                        known_only=known_only)
    cfg = config_of("circuit", model, dataset, limit, seed, known_only=known_only, command=f"circuit {command}",
                    known_top_k=known_top_k, **{k: v for k, v in options_dict(opts).items() if k != "seed"},
                    **(extra or {}))
    return analysis(key, cfg, lambda run: step(run, model, facts, table, opts), out, main=main)


def analyse_discover(model, dataset: str = "lre:factual/country_capital_city", *, limit: int | None = 40, seed: int = 0,
                     known_only: bool = True, known_top_k: int = 10, out=None, progress: bool = True, **options):
    """``factscope circuit discover`` from Python (``factscope.circuits.discover``): score every edge on
    the known facts of ``dataset`` with :class:`Options` (``method``, ``metric``, ``ablation``,
    ``steps``, ``edge_fraction``, ``n_edges``, ...) and keep the circuit. Returns a
    :class:`factscope.notebook.Result` (``tables["circuit_scores"]``: every edge's score;
    ``Graph.from_json(res.dir / "graph.json")``: the graph)."""
    return from_python("discover", model, dataset,
                        lambda run, model, facts, table, opts: discover_known(run, model, facts, table, opts, dataset,
                                                                              progress),
                        limit=limit, seed=seed, known_only=known_only,
                        known_top_k=known_top_k, out=out, progress=progress, options=options)


def analyse_evaluate(model, dataset: str = "lre:factual/country_capital_city", *, limit: int | None = 40, seed: int = 0,
                     known_only: bool = True, known_top_k: int = 10, val_fraction: float = 0.5, out=None,
                     progress: bool = True, **options):
    """``factscope circuit evaluate`` from Python (``factscope.circuits.evaluate``): discover on D_val,
    evaluate on D_test (:func:`evaluate_known`; ``options`` as for :func:`analyse_discover`, plus
    ``n_random``, ``curve``, ``compare_exact``). Returns a :class:`factscope.notebook.Result` whose
    ``table`` is Hit@1/Hit@10/MRR for the full model, the circuit and random circuits."""
    if not 0 < val_fraction < 1:
        raise FactscopeError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    return from_python("evaluate", model, dataset,
                        lambda run, model, facts, table, opts: evaluate_known(run, model, facts, table, opts, dataset,
                                                                              val_fraction, progress),
                        limit=limit, seed=seed, known_only=known_only, known_top_k=known_top_k, out=out,
                        progress=progress, options=options, extra={"val_fraction": val_fraction}, main="circuit_eval")


def analyse_hallucination(model, dataset: str = "lre:factual/country_capital_city", *, limit: int | None = 40,
                          seed: int = 0, known_top_k: int = 10, circuits: bool = True, rules=None, out=None,
                          progress: bool = True, **options):
    """``factscope circuit hallucination`` from Python (``factscope.circuits.hallucination``): every fact
    of ``dataset`` (a seeded sample of ``limit``), right vs wrong answers, the first node promoting the
    answer and (``circuits``) both groups' circuits with :class:`Options` (``options``); ``rules``: a
    :class:`factscope.circuits.roles.RoleRules`. Returns a :class:`factscope.notebook.Result`."""
    from factscope.circuits.cases import hallucination_on
    from factscope.circuits.roles import RoleRules

    rules = rules or RoleRules()
    return from_python("hallucination", model, dataset,
                        lambda run, model, facts, table, opts: hallucination_on(
                            run, model, facts, table, opts if circuits else None, dataset, rules, progress),
                        limit=limit, seed=seed, known_only=False, known_top_k=known_top_k, out=out, progress=progress,
                        options=options, extra={"circuits": circuits}, main="hallucination",
                        key="hallucination")


def analyse_icl(model, dataset: str = "lre:factual/country_capital_city", *, shots: int = 3, limit: int | None = 40,
                seed: int = 0, known_top_k: int = 10, circuits: bool = True, out=None, progress: bool = True,
                **options):
    """``factscope circuit icl`` from Python (``factscope.circuits.icl``): the facts of ``dataset`` the
    model does not know (target outside its top ``known_top_k``) with ``shots`` demonstrations, with and
    without, and (``circuits``) both circuits with :class:`Options` (``options``). Returns a
    :class:`factscope.notebook.Result`."""
    from factscope.circuits.cases import icl_on

    return from_python("icl", model, dataset,
                        lambda run, model, facts, table, opts: icl_on(
                            run, model, facts, table, opts if circuits else None, dataset, shots, known_top_k, seed,
                            progress),
                        limit=limit, seed=seed, known_only=False, known_top_k=known_top_k, out=out, progress=progress,
                        options=options, extra={"shots": shots, "circuits": circuits}, main="icl", key="icl")
