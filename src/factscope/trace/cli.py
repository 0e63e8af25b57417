"""``factscope trace``: causal tracing (Meng et al. 2022) from the command line."""

from __future__ import annotations

import click

from factscope.commands import Common, analysis_options
from factscope.trace.core import KINDS


@click.command("trace")
@analysis_options("trace", without=("batch_size",), all_facts=True, limit=20,
                  helps={"limit": "Number of known facts to trace (seeded random sample of the facts the model knows).",
                         "seed": "Seeds the fact sample and the noise."})
@click.option("--kind", type=click.Choice([*KINDS, "all"]), default="all", show_default=True, help="What is restored: hidden states, MLP outputs, attention outputs, or all three.")
@click.option("--noise", type=click.FloatRange(0), default=3.0, show_default=True, help="Noise standard deviation in units of the subject token embeddings' standard deviation.")
@click.option("--window", type=click.IntRange(1), default=10, show_default=True, help="Layers restored together for mlp/attn (ROME's window).")
@click.option("--samples", type=click.IntRange(1), default=10, show_default=True, help="Noise samples per fact.")
@click.option("--max-rows", type=click.IntRange(1), default=256, show_default=True, help="Prompt copies per forward pass.")
@click.option("--figures", "n_figures", type=click.IntRange(0), default=4, show_default=True, help="Per-fact heat maps drawn.")
def trace(common: Common, kind, noise, window, samples, max_rows, n_figures) -> None:
    """Causal tracing: corrupt the subject, restore states, average indirect effects (Meng et al. 2022)."""
    from factscope.facts import load_facts
    from factscope.flow.select import facts_for_run
    from factscope.trace.run import run_trace

    kinds = list(KINDS) if kind == "all" else [kind]
    all_loaded = load_facts(common.dataset)
    model = common.load_model()  # bad model or data: fail before the run exists
    run = common.create_run(model, kinds=kinds, noise=noise, window=window, samples=samples,
                            runtime={"max_rows": max_rows})
    facts = facts_for_run(run, model, common.dataset, common.limit, seed=common.seed, progress=common.progress,
                          known_only=common.known_only, all_facts=all_loaded)
    s = run_trace(run, model, facts, kinds, noise=noise, window=window, samples=samples, seed=common.seed,
                  max_rows=max_rows, n_figures=n_figures, progress=common.progress)
    click.echo(f"{s['n_facts']} facts; P(answer) clean {s['mean_p_clean']:.3f}, corrupted {s['mean_p_corrupt']:.3f}")
    for k, v in s["peak"].items():
        click.echo(f"{k:20s} peak average indirect effect {v['effect']:.3f} at layer {v['layer']}")
    click.echo(f"report: {run.write_report()}")
