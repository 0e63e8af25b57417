"""``factscope trace``: causal tracing (Meng et al. 2022) from the command line."""

from __future__ import annotations

import click

from factscope.commands import dtype_option
from factscope.trace.core import KINDS


@click.command("trace")
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True, help="Model name, hub id, directory or .gguf file.")
@click.option("--dataset", default="known_1000", show_default=True, help="Fact set name or file.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, help="Number of known facts to trace (seeded random sample of the facts the model knows).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the fact sample and the noise.")
@click.option("--kind", type=click.Choice([*KINDS, "all"]), default="all", show_default=True, help="What is restored: hidden states, MLP outputs, attention outputs, or all three.")
@click.option("--noise", type=click.FloatRange(0), default=3.0, show_default=True, help="Noise standard deviation in units of the subject token embeddings' standard deviation.")
@click.option("--window", type=click.IntRange(1), default=10, show_default=True, help="Layers restored together for mlp/attn (ROME's window).")
@click.option("--samples", type=click.IntRange(1), default=10, show_default=True, help="Noise samples per fact.")
@click.option("--all-facts", is_flag=True, help="Do not filter to facts the model knows (e.g. for random test models).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory (created with its parents if missing).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (finished facts are kept).")
@click.option("--max-rows", type=click.IntRange(1), default=256, show_default=True, help="Prompt copies per forward pass.")
@click.option("--figures", "n_figures", type=click.IntRange(0), default=4, show_default=True, help="Per-fact heat maps drawn.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--device", default="cpu", show_default=True)
@dtype_option
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def trace(model_name, dataset, limit, seed, kind, noise, window, samples, all_facts, out, resume, max_rows, n_figures,
          threads, device, no_progress) -> None:
    """Causal tracing: corrupt the subject, restore states, average indirect effects (Meng et al. 2022)."""
    import torch

    from factscope.facts import load_facts
    from factscope.flow.select import facts_for_run
    from factscope.models import load_model
    from factscope.runs import Run
    from factscope.trace.run import run_trace

    if threads:
        torch.set_num_threads(threads)
    kinds = list(KINDS) if kind == "all" else [kind]
    config = {"analysis": "trace", "model": model_name, "dataset": dataset, "limit": limit, "seed": seed,
              "known_only": not all_facts, "kinds": kinds, "noise": noise, "window": window, "samples": samples,
              "runtime": {"max_rows": max_rows, "threads": threads, "device": device}}
    model = load_model(model_name, device=device)  # bad model or data: fail before the run exists
    all_loaded = load_facts(dataset)
    run = Run.create(out, config, resume=resume)
    facts = facts_for_run(run, model, dataset, limit, seed=seed, progress=not no_progress, known_only=not all_facts,
                          all_facts=all_loaded)
    run.update_summary({"model": model.name, "dataset": dataset})
    s = run_trace(run, model, facts, kinds, noise=noise, window=window, samples=samples, seed=seed, max_rows=max_rows,
                  n_figures=n_figures, progress=not no_progress)
    click.echo(f"{s['n_facts']} facts; P(answer) clean {s['mean_p_clean']:.3f}, corrupted {s['mean_p_corrupt']:.3f}")
    for k, v in s["peak"].items():
        click.echo(f"{k:20s} peak average indirect effect {v['effect']:.3f} at layer {v['layer']}")
    click.echo(f"report: {run.write_report()}")
