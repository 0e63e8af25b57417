"""``factscope hijack ...`` (registered lazily by factscope.cli)."""

from __future__ import annotations

import click

from factscope.commands import CommandGroup, Common, analysis_options
from factscope.hijack.schemes import BUILTIN


@click.group("hijack", cls=CommandGroup)
def hijack() -> None:
    """Context hijacking benchmark (Jiang et al. 2024, sec. 3)."""


@hijack.command("run")
@analysis_options(
    "hijack", multiple=True, all_facts=True, executor=True,
    helps={"dataset": "known_1000, lre, lre:<category>[/<relation>], counterfact (full file if downloaded, else the "
                      "shipped sample), counterfact-sample, or a path.",
           "limit": "Seeded random subset of this many facts per dataset.",
           "seed": "Seed for subsets, false targets, bootstrap."})
@click.option("--relation", "relations", multiple=True,
              help="Keep only facts of this relation id (e.g. P190, as the paper's Figure 2b); repeat for several. "
                   "The --limit subset is drawn after this filter.")
@click.option("--scheme", "schemes", multiple=True, default=("generic", "reverse"), show_default=True,
              help=f"One of {', '.join(BUILTIN)}, or 'all'; repeat for several.")
@click.option("--template", "templates", multiple=True,
              help="Custom scheme: 'NAME=TEMPLATE' or 'TEMPLATE' with {subject}, {target_true}, "
                   "{target_false} (= {target}), {prompt}, {related} (a word related to target_false), "
                   "{related_true}; repeat for several.")
@click.option("--related-words", "related", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON object word -> related word for the related-word schemes and {related} "
                   "(default: built from the shipped LRE relations).")
@click.option("--max-prepends", type=click.IntRange(0, 100), default=10, show_default=True,
              help="Largest number of prepended sentences N (n = 0..N).")
@click.option("--metric", type=click.Choice(["first", "full", "full-sum"]), default="first", show_default=True,
              help="Compare the targets' first answer tokens; 'full': their mean log-probability per token "
                   "(ROME's CounterFact comparison); 'full-sum': their whole-target log-probabilities.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--chunk-size", type=click.IntRange(1), default=256, show_default=True,
              help="Prompts per checkpointed chunk.")
def run_cmd(common: Common, relations, schemes, templates, related, max_prepends, metric, n_boot, chunk_size):
    """Efficacy score ES(n) of hijacking schemes for n = 0..N prepended sentences."""
    from factscope.hijack.runner import load_datasets, run_benchmark
    from factscope.hijack.schemes import parse_schemes, related_words

    sch = parse_schemes(schemes, templates)
    relations = list(dict.fromkeys(r.strip() for rr in relations for r in rr.split(",") if r.strip()))
    facts, notes = load_datasets(common.dataset, limit=common.limit, seed=common.seed, relations=relations or None)
    rel = related_words(related) if related else None
    # the models load one after another in run_benchmark; their specs are resolved (a bad one
    # refused) before the run exists
    run = common.create_run(
        common.resolved(),
        **({"relations": relations} if relations else {}),
        schemes=[s.__dict__ for s in sch],
        related_words=related,
        max_prepends=max_prepends,
        metric=metric,
        # "full" was the sum of token log-probs before it became ROME's per-token mean: a run made
        # then must not be resumed now (its checkpoint holds sums)
        **({"full_metric": "mean per token"} if metric == "full" else {}),
        bootstrap=n_boot,
        chunk_size=chunk_size,
    )
    click.echo(f"{len(facts)} facts from {'; '.join(notes)}", err=True)
    res = run_benchmark(run, list(common.model_spec), facts, sch, max_prepends, metric=metric,
                        known_only=common.known_only, related=rel, batch_size=common.batch_size, chunk_size=chunk_size,
                        n_boot=n_boot, seed=common.seed, progress=common.progress, device=common.device)
    run.update_summary({"data": notes})
    run.write_report(title="Context hijacking")
    for m, by in res.summary["efficacy"].items():
        c = res.summary["fact_counts"][m]
        click.echo(f"{m}: {c['kept']} facts kept of {c['candidates']} ({c['known']} known)")
        for r in relations:
            if not c["kept_by_relation"].get(r):
                click.echo(f"  relation {r}: no fact kept for {m} (see fact_counts in summary.json)", err=True)
        for name, es in by.items():
            if es:
                click.echo(f"  {name:22s} ES(n=0..{len(es) - 1}): " + " ".join(f"{x:.2f}" for x in es))
    click.echo(str(run.dir))


@hijack.command("templates")
@click.option("--dataset", default=None, help="Show filled examples for the relations of this dataset.")
@click.option("--per-relation", type=int, default=2, show_default=True)
def templates_cmd(dataset, per_relation):
    """List the shipped negation templates (or filled examples for a dataset's relations)."""
    from factscope.hijack.runner import load_dataset
    from factscope.hijack.schemes import negation_templates, relation_sentence

    tpl, fallback = negation_templates()
    if dataset is None:
        for rid, t in tpl.items():
            click.echo(f"{rid}\t{t}")
        click.echo(f"(fallback)\t{fallback}")
        return
    facts, _ = load_dataset(dataset)
    seen: dict[str, int] = {}
    for f in facts:
        if seen.get(f.relation_id, 0) >= per_relation or f.target_false is None:
            continue
        seen[f.relation_id] = seen.get(f.relation_id, 0) + 1
        s, fb = relation_sentence(f, f.target_false)
        click.echo(f"{f.relation_id}\t{s} {f.prompt}{'  [fallback]' if fb else ''}")
