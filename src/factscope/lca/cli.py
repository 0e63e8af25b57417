"""``factscope lca ...`` (registered lazily by factscope.cli): the latent concept association task."""

from __future__ import annotations

import functools
import json
import time

import click

COMMANDS = {
    "value-matrix": ("value_matrix", "Accuracy with W_V trained vs frozen at the identity (Figure 3a)."),
    "constructed": ("constructed", "Trained W_V vs the Hamming-1 and random-pairing constructions."),
    "embeddings": ("embeddings", "Trained vs frozen embeddings; inner product vs Hamming distance (Figure 3b)."),
    "attention": ("attention", "Attention to the last token's own cluster vs the others (Figure 3c)."),
    "hijack": ("hijack", "Hijacking the synthetic task: mixing fraction and context length."),
}


@click.group("lca")
def lca() -> None:
    """Latent concept association: synthetic task and one-layer transformer (Jiang et al. 2024, sec. 4-6)."""


def _options(f):
    opts = [
        click.option("--out", type=click.Path(file_okay=False), required=True, help="Output run directory."),
        click.option("--quick", is_flag=True, help="The short demo configuration (smaller m, fewer steps and grids)."),
        click.option("--m", "m", type=int, default=None, help="Number of latent variables (V = 2**m). [default: 6, quick 5]"),
        click.option("--L", "L", type=int, default=None, help="Context length for training. [default: 64]"),
        click.option("--w", "w", type=float, default=None, help="Mixing weight of pi vs uniform. [default: 0.2, quick 0.25]"),
        click.option("--d", "d", type=int, default=None, help="Embedding (and attention) dimension of the main model. [default: 32, quick 16]"),
        click.option("--steps", type=int, default=None, help="AdamW steps per model. [default: 800, quick 250]"),
        click.option("--seed", type=int, default=None, help="First seed for initialization and training data. [default: 0]"),
        click.option("--seeds", type=int, default=None,
                     help="Number of training seeds (seed, seed+1, ...); tables show mean ± std. [default: 3, quick 1]"),
        click.option("--resume", is_flag=True, help="Write into an existing run directory with the same config."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bars."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _config(quick, m, L, w, d, steps, seed, seeds):
    from factscope.lca.experiments import LCAConfig

    kw = {k: v for k, v in dict(m=m, L=L, w=w, steps=steps, seed=seed, seeds=seeds).items() if v is not None}
    if d is not None:
        kw.update(d=d, d_a=d)
    return LCAConfig.quick(**kw) if quick else LCAConfig(**kw)


def _run(names, out, quick, m, L, w, d, steps, seed, seeds, resume, no_progress):
    from factscope.lca.experiments import run_experiments
    from factscope.runs import Run

    cfg = _config(quick, m, L, w, d, steps, seed, seeds)
    run = Run.create(out, {"analysis": "lca", "experiments": list(names), "quick": bool(quick), **cfg.to_dict()},
                     resume=resume)
    t0 = time.time()
    summary = run_experiments(run, names, cfg, progress=not no_progress)
    run.write_report(title="Latent concept association")
    click.echo(f"wrote {run.dir} in {time.time() - t0:.0f} s")
    for k in ("value_matrix", "constructed", "embeddings", "attention", "lca_hijack"):
        if k in summary:
            click.echo(f"  {k}: {json.dumps(summary[k], default=str)}")


def _make(cmd_name, exp, help_text):
    @_options
    def cmd(**kw):
        _run([exp], **kw)

    cmd.__doc__ = help_text
    return lca.command(cmd_name, help=help_text)(cmd)


for _name, (_exp, _help) in COMMANDS.items():
    _make(_name, _exp, _help)


@lca.command("all")
@_options
def all_cmd(**kw):
    """All five experiments into one run directory (summary.json, tables, figures, report.html)."""
    from factscope.lca.experiments import EXPERIMENTS

    _run(list(EXPERIMENTS), **kw)
