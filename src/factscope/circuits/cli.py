"""``factscope circuit ...``: knowledge circuits (Yao et al. 2024) from the command line."""

from __future__ import annotations

import click

from factscope.circuits.run import ABLATIONS, METHODS
from factscope.commands import CommandGroup, Common, analysis_options
from factscope.errors import FactscopeError


def _common(f):
    options = [
        click.option("--method", type=click.Choice(METHODS), default="eap-ig", show_default=True,
                     help="eap-ig (integrated gradients), eap (one gradient), acdc (greedy pruning), exact "
                          "(each edge patched alone)."),
        click.option("--metric", type=click.Choice(["nll", "logit_diff", "kl"]), default="nll", show_default=True,
                     help="Target NLL over the answer tokens, logit difference to the counterfactual answer, "
                          "or KL to the clean distribution."),
        click.option("--ablation", type=click.Choice(ABLATIONS), default="zero", show_default=True,
                     help="Value of a removed edge: zero (the paper), the mean over D_val, or the "
                          "counterfactual prompt's activation."),
        click.option("--steps", type=click.IntRange(1, 100), default=5, show_default=True, help="EAP-IG steps."),
        click.option("--threshold", type=float, default=0.01, show_default=True,
                     help="ACDC: keep an edge when removing it worsens the metric by at least this."),
        click.option("--edge-fraction", type=float, default=0.05, show_default=True,
                     help="Circuit size as a fraction of the graph's edges (EAP, EAP-IG, exact)."),
        click.option("--selection", type=click.Choice(["topn", "greedy"]), default="topn", show_default=True,
                     help="Circuit from scores: the top edges by |score|, or EAP-IG's greedy growth from the logits."),
        click.option("--edges", "n_edges", type=int, default=None, help="Circuit size in edges (overrides --edge-fraction)."),
        click.option("--known-top-k", type=click.IntRange(1, 1000), default=10, show_default=True,
                     help="A fact is known when its target's first token is in the model's top-k (10: Gemma 3 "
                          "270M ranks ' the'/' a' first on most LRE prompts, e.g. 1 of 24 capitals at top-1)."),
    ]
    for o in reversed(options):
        f = o(f)
    return analysis_options(
        "circuit", without=("batch_size",), all_facts=True, dataset="lre:factual/country_capital_city", limit=40,
        helps={"dataset": "Facts of one relation (lre:<category>/<relation>) or a fact file.",
               "limit": "At most this many known facts (seeded sample); discover needs 2, evaluate 4."})(f)


@click.group("circuit", cls=CommandGroup)
def circuit() -> None:
    """Knowledge circuits (Yao et al. 2024): discover and evaluate edge-level circuits."""


def _prepare(common: Common, kw: dict, extra: dict, need: int):
    """Validate options and load model and data BEFORE creating the run directory."""
    from factscope.circuits.data import known_relation_facts
    from factscope.circuits.run import Options
    from factscope.facts import load_facts

    if common.limit < need:
        raise FactscopeError(f"--limit {common.limit}: this command needs at least {need} facts")
    opts = Options(method=kw["method"], metric=kw["metric"], ablation=kw["ablation"], steps=kw["steps"],
                   threshold=kw["threshold"], edge_fraction=kw["edge_fraction"], n_edges=kw["n_edges"],
                   selection=kw["selection"], seed=common.seed, **extra).check()
    load_facts(common.dataset)  # a bad --dataset is refused before the model loads
    model = common.load_model()
    from factscope.circuits import Graph

    opts.size(int(Graph.from_model(model).real.sum()))  # --edges within the graph
    facts, table = known_relation_facts(model, common.dataset, limit=common.limit, seed=common.seed,
                                        top_k=kw["known_top_k"], progress=common.progress,
                                        known_only=common.known_only)
    return opts, model, facts, table


def _create_run(common: Common, model, kw: dict, opts, command: str, **extra):
    from factscope.circuits.run import options_dict

    return common.create_run(model, command=f"circuit {command}", known_top_k=kw["known_top_k"],
                             **options_dict(opts), **extra)


@circuit.command("discover")
@_common
def discover_cmd(common: Common, **kw):
    """Score every edge on the known facts of a relation; write the graph, scores and views."""
    from factscope.circuits.data import build
    from factscope.circuits.run import run_discover

    opts, model, facts, table = _prepare(common, kw, {}, need=2)
    if len(facts) < 2:
        raise FactscopeError(f"{model.name} knows {len(facts)} facts of {common.dataset}; need at least 2")
    data = build(model, facts, seed=common.seed)
    run = _create_run(common, model, kw, opts, "discover")
    run.save_table("known_facts", table)
    g = run_discover(run, model, data, opts, common.dataset, progress=common.progress)
    run.write_report(title=f"Circuit discovery: {model.name}")
    click.echo(f"{len(data)} facts; circuit of {int(g.in_graph.sum())} of {int(g.real.sum())} edges; wrote {run.dir}")


@circuit.command("evaluate")
@_common
@click.option("--val-fraction", type=float, default=0.5, show_default=True, help="Share of the known facts in D_val.")
@click.option("--random-seeds", "n_random", type=click.IntRange(1), default=5, show_default=True,
              help="Random circuits of the same size.")
@click.option("--no-curve", is_flag=True, help="Skip the faithfulness curve (CPR/CMD).")
@click.option("--compare-exact", type=click.IntRange(0), default=0, show_default=True,
              help="Also run exact edge patching on this many D_val facts and report the Spearman correlation.")
def evaluate_cmd(common: Common, val_fraction, n_random, no_curve, compare_exact, **kw):
    """Discover on D_val, evaluate the circuit standalone on D_test (Hit@1/10, MRR, faithfulness, CPR/CMD)."""
    from factscope.circuits.data import build, split
    from factscope.circuits.run import run_evaluate

    if not 0 < val_fraction < 1:
        raise FactscopeError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    opts, model, facts, table = _prepare(common, kw, {"n_random": n_random, "curve": not no_curve,
                                                      "compare_exact": compare_exact}, need=4)
    if len(facts) < 4:
        raise FactscopeError(f"{model.name} knows only {len(facts)} facts of {common.dataset} (top-{kw['known_top_k']}); "
                             f"evaluation needs at least 4 (another relation, or a larger --known-top-k)")
    val, test = split(facts, val_fraction, common.seed)
    d_val, d_test = build(model, val, seed=common.seed), build(model, test, seed=common.seed + 1)
    run = _create_run(common, model, kw, opts, "evaluate", val_fraction=val_fraction)
    run.save_table("known_facts", table)
    run.update_summary({"data": {"n_facts": len(table), "n_known": int(table["known"].sum()), "n_used": len(facts),
                                 "n_val": len(d_val), "n_test": len(d_test),
                                 "dropped_no_partner": len(d_val.dropped) + len(d_test.dropped)}})
    ev, _ = run_evaluate(run, model, d_val, d_test, opts, common.dataset, progress=common.progress)
    run.write_report(title=f"Circuit evaluation: {model.name}")
    h, m = ev.ranks["hit10"], ev.ranks["mrr"]
    click.echo(f"D_val {len(d_val)}, D_test {len(d_test)} facts; circuit {ev.n_edges}/{ev.n_edges_total} edges")
    click.echo(f"Hit@10 full {h['full']:.2f} circuit {h['circuit']:.2f} random {h['random']:.2f}±{h['random_std']:.2f}; "
               f"MRR full {m['full']:.2f} circuit {m['circuit']:.2f} random {m['random']:.2f}; "
               f"faithfulness {ev.faithfulness:.2f}, CPR {ev.cpr:.2f}, CMD {ev.cmd:.2f}")
    click.echo(str(run.dir))
