"""``factscope circuit ...``: knowledge circuits (Yao et al. 2024) from the command line."""

from __future__ import annotations

import click

from factscope.circuits.run import ABLATIONS, METHODS
from factscope.commands import CommandGroup, Common, analysis_options
from factscope.errors import FactscopeError


def _common(f):
    options = [
        click.option("--method", type=click.Choice(METHODS), default="eap-ig", show_default=True,
                     help="eap-ig (integrated gradients, interpolating the input embeddings), eap-ig-act "
                          "(integrated gradients, interpolating one node group's output at a time), eap "
                          "(one gradient), acdc (greedy pruning), exact (each edge patched alone)."),
        click.option("--metric", type=click.Choice(["nll", "logit_diff", "kl"]), default="nll", show_default=True,
                     help="Target NLL over the answer tokens, logit difference to the counterfactual answer, "
                          "or KL to the clean distribution."),
        click.option("--ablation", type=click.Choice(ABLATIONS), default="zero", show_default=True,
                     help="Value of a removed edge: zero (the paper), the mean over D_val, or the "
                          "counterfactual prompt's activation."),
        click.option("--steps", type=click.IntRange(1, 100), default=5, show_default=True, help="EAP-IG steps."),
        click.option("--threshold", type=float, default=0.1, show_default=True,
                     help="ACDC: keep an edge when removing it worsens the metric by at least this "
                          "(0.1: the paper's run script)."),
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
        "circuit", without=("batch_size",), all_facts=True, executor=True, dataset="lre:factual/country_capital_city",
        limit=40,
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
    from factscope.circuits.run import discover_known

    opts, model, facts, table = _prepare(common, kw, {}, need=2)
    if len(facts) < 2:
        raise FactscopeError(f"{model.name} knows {len(facts)} facts of {common.dataset}; need at least 2")
    run = _create_run(common, model, kw, opts, "discover")
    g = discover_known(run, model, facts, table, opts, common.dataset, progress=common.progress)
    run.write_report(title=f"Circuit discovery: {model.name}")
    click.echo(f"{run.summary['circuit']['n_facts_discovery']} facts; circuit of {int(g.in_graph.sum())} of {int(g.real.sum())} edges; wrote {run.dir}")


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
    from factscope.circuits.run import evaluate_known

    if not 0 < val_fraction < 1:
        raise FactscopeError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    opts, model, facts, table = _prepare(common, kw, {"n_random": n_random, "curve": not no_curve,
                                                      "compare_exact": compare_exact}, need=4)
    if len(facts) < 4:
        raise FactscopeError(f"{model.name} knows only {len(facts)} facts of {common.dataset} (top-{kw['known_top_k']}); "
                             f"evaluation needs at least 4 (another relation, or a larger --known-top-k)")
    run = _create_run(common, model, kw, opts, "evaluate", val_fraction=val_fraction)
    ev, _ = evaluate_known(run, model, facts, table, opts, common.dataset, val_fraction, progress=common.progress)
    d = run.summary["data"]
    run.write_report(title=f"Circuit evaluation: {model.name}")
    h, m = ev.ranks["hit10"], ev.ranks["mrr"]
    click.echo(f"D_val {d['n_val']}, D_test {d['n_test']} facts; circuit {ev.n_edges}/{ev.n_edges_total} edges")
    click.echo(f"Hit@10 full {h['full']:.2f} circuit {h['circuit']:.2f} random {h['random']:.2f}±{h['random_std']:.2f}; "
               f"MRR full {m['full']:.2f} circuit {m['circuit']:.2f} random {m['random']:.2f}; "
               f"faithfulness {ev.faithfulness:.2f}, CPR {ev.cpr:.2f}, CMD {ev.cmd:.2f}")
    click.echo(str(run.dir))


# ============================================================================================
# Knowledge circuits in action: logit lens, node roles, hallucination, in-context learning
# (circuits/lens.py, roles.py, cases.py)
# --------------------------------------------------------------------------------------------


def _lens_options(f):
    options = [
        click.option("--known-top-k", type=click.IntRange(1, 1000), default=10, show_default=True,
                     help="A fact is known when its target's first token is in the model's top-k."),
        click.option("--bootstrap", "n_boot", type=click.IntRange(1), default=1000, show_default=True,
                     help="Bootstrap resamples for the intervals."),
        click.option("--emerge-top", type=click.IntRange(1), default=10, show_default=True,
                     help="The answer has emerged at the first layer from which it stays in the lens' top this many."),
    ]
    for o in reversed(options):
        f = o(f)
    return analysis_options(
        "circuit", without=("batch_size",), all_facts=True, dataset="lre:factual/country_capital_city", limit=40,
        helps={"dataset": "Facts of one relation (lre:<category>/<relation>) or a fact file.",
               "limit": "At most this many known facts (seeded sample)."})(f)


def _role_options(f):
    options = [
        click.option("--attn-threshold", type=click.FloatRange(0, 1, min_open=True), default=0.3, show_default=True,
                     help="Role rules: a head attends to a token group when the last token's mean attention "
                          "share on it is at least this."),
        click.option("--top-tokens", type=click.IntRange(1), default=20, show_default=True,
                     help="Role rules: a node writes a token when it is in the node's top this many."),
        click.option("--relation-hits", type=click.FloatRange(0), default=1.0, show_default=True,
                     help="Role rules: relation-type output = at least this many of the relation's other "
                          "answers in the node's top tokens (mean over facts)."),
        click.option("--mlp-gain", type=click.FloatRange(0), default=1.0, show_default=True,
                     help="Role rules: an MLP raises the target when it improves its lens rank by at least "
                          "this many bits (1 = halves it; median over facts)."),
    ]
    for o in reversed(options):
        f = o(f)
    return f


def _rules(kw: dict):
    from factscope.circuits.roles import RoleRules

    return RoleRules(attn=kw.pop("attn_threshold"), top_k=kw.pop("top_tokens"),
                     relation_hits=kw.pop("relation_hits"), mlp_gain_bits=kw.pop("mlp_gain")).check()


@circuit.command("lens")
@_lens_options
def lens_cmd(common: Common, n_boot, emerge_top, known_top_k):
    """Logit lens of the target per layer: rank and probability at the last token, minimum rank over the
    subject (the paper's Figure 5), per fact and aggregated."""
    from factscope.circuits.data import known_relation_facts
    from factscope.circuits.lens import run_lens
    from factscope.facts import load_facts

    load_facts(common.dataset)  # a bad --dataset is refused before the model loads
    model = common.load_model()
    facts, table = known_relation_facts(model, common.dataset, limit=common.limit, seed=common.seed,
                                        top_k=known_top_k, progress=common.progress, known_only=common.known_only)
    if not facts:
        raise FactscopeError(f"{model.name} knows none of the facts of {common.dataset} (top-{known_top_k}); "
                             f"use --all-facts or a larger --known-top-k")
    run = common.create_run(model, command="circuit lens", known_top_k=known_top_k, bootstrap=n_boot,
                            emerge_top=emerge_top)
    run.save_table("known_facts", table)
    res = run_lens(run, model, facts, common.dataset, n_boot=n_boot, seed=common.seed, top=emerge_top,
                   progress=common.progress)
    run.write_report(title=f"Logit lens: {model.name}")
    s = run.summary["lens"]
    click.echo(f"{len(res)} facts; output median rank {s['median_rank_output']:.0f}, median rank in the top "
               f"{emerge_top} from layer {s['median_enters_top']}; wrote {run.dir}")


@circuit.command("roles")
@_common
@_role_options
@click.option("--graph", "graph_path", type=click.Path(dir_okay=False), default=None,
              help="A circuit graph JSON (graph.json of `circuit discover`); default: discover one on the facts.")
def roles_cmd(common: Common, graph_path, **kw):
    """Roles of a circuit's nodes: vocabulary projections, attention to subject/relation, mover /
    relation / mixture heads and MLPs that raise the target."""
    from dataclasses import asdict

    from factscope.circuits.cases import circuit_graph, roles_on

    rules = _rules(kw)
    opts, model, facts, table = _prepare(common, kw, {}, need=1)
    g = circuit_graph(graph_path, model) if graph_path else None
    run = _create_run(common, model, kw, opts, "roles", graph=graph_path, rules=asdict(rules))
    t = roles_on(run, model, facts, table, opts, common.dataset, rules, g, progress=common.progress)
    run.write_report(title=f"Circuit node roles: {model.name}")
    counts = t["role"].value_counts().to_dict()
    click.echo(f"{len(t)} nodes on {len(facts)} facts; roles: "
               f"{', '.join(f'{k} {v}' for k, v in counts.items() if k) or 'none'}; wrote {run.dir}")


def _all_facts(common: Common, kw: dict):
    """Options, model and every fact of the relation (a seeded sample of --limit) with the known table."""
    common.all_facts = True
    return _prepare(common, kw, {}, need=1)


@circuit.command("hallucination")
@_common
@_role_options
@click.option("--no-circuits", is_flag=True, help="Skip circuit discovery (lens and node projections only).")
def hallucination_cmd(common: Common, no_circuits, **kw):
    """Facts the model gets wrong vs right: where the (wrong) answer emerges in the logit lens, the first
    node that promotes it, and the circuits of both groups."""
    from factscope.circuits.cases import hallucination_on

    rules = _rules(kw)
    opts, model, facts, table = _all_facts(common, kw)
    run = _create_run(common, model, kw, opts, "hallucination", circuits=not no_circuits)
    hallucination_on(run, model, facts, table, None if no_circuits else opts, common.dataset, rules,
                     progress=common.progress)
    run.write_report(title=f"Hallucination: {model.name}")
    s = run.summary["hallucination"]
    click.echo(f"{s['n_right']} right, {s['n_wrong']} wrong; the answer emerges at layer "
               f"{s['answer_emerges_median_right']} (right) vs {s['answer_emerges_median_wrong']} (wrong); wrote {run.dir}")


@circuit.command("icl")
@_common
@click.option("--shots", type=click.IntRange(1, 32), default=3, show_default=True,
              help="Demonstrations of the same relation before each query.")
@click.option("--no-circuits", is_flag=True, help="Skip circuit discovery.")
def icl_cmd(common: Common, shots, no_circuits, **kw):
    """Facts the model does not know, with k demonstrations of the relation: does the answer become
    known, which nodes and edges appear, where the new heads look.

    Not known: the target is not in the model's top --known-top-k."""
    from factscope.circuits.cases import icl_on

    opts, model, facts, table = _all_facts(common, kw)
    run = _create_run(common, model, kw, opts, "icl", shots=shots, circuits=not no_circuits)
    res = icl_on(run, model, facts, table, None if no_circuits else opts, common.dataset, shots, kw["known_top_k"],
                 seed=common.seed, progress=common.progress)
    run.write_report(title=f"In-context learning: {model.name}")
    s = run.summary["icl"]
    click.echo(f"{len(res.facts)} unknown facts, {shots} shots: Hit@1 {s['hit1_without']:.2f} -> {s['hit1_with']:.2f}, "
               f"Hit@10 {s['hit10_without']:.2f} -> {s['hit10_with']:.2f}; wrote {run.dir}")
