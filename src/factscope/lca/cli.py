"""``factscope lca ...`` (registered lazily by factscope.cli): the latent concept association task."""

from __future__ import annotations

import functools
import json
import time

import click

from factscope.commands import CommandGroup, Common, analysis_options

COMMANDS = {
    "value-matrix": ("value_matrix", "Accuracy with W_V trained vs frozen at the identity (Figure 3a)."),
    "constructed": ("constructed", "Trained W_V vs the Hamming-1 and random-pairing constructions."),
    "embeddings": ("embeddings", "Trained vs frozen embeddings; inner product vs Hamming distance (Figure 3b)."),
    "attention": ("attention", "Attention to the last token's own cluster vs the others (Figure 3c)."),
    "hijack": ("hijack", "Hijacking the synthetic task: mixing fraction and context length."),
}


@click.group("lca", cls=CommandGroup)
def lca() -> None:
    """Latent concept association: synthetic task and one-layer transformer (Jiang et al. 2024, sec. 4-6)."""


def _options(f):
    opts = [
        click.option("--quick", is_flag=True, help="The short demo configuration (smaller m, fewer steps and grids)."),
        click.option("--m", "m", type=int, default=None, help="Number of latent variables (V = 2**m). [default: 6, quick 5]"),
        click.option("--L", "L", type=int, default=None, help="Context length for training. [default: 64]"),
        click.option("--w", "w", type=float, default=None, help="Mixing weight of pi vs uniform. [default: 0.2, quick 0.25]"),
        click.option("--d", "d", type=int, default=None, help="Embedding (and attention) dimension of the main model. [default: 32, quick 16]"),
        click.option("--steps", type=int, default=None, help="AdamW steps per model. [default: 800, quick 250]"),
        click.option("--seeds", type=int, default=None,
                     help="Number of training seeds (seed, seed+1, ...); tables show mean ± std. [default: 3, quick 1]"),
    ]
    for o in reversed(opts):
        f = o(f)
    # the synthetic task has no model to load, no facts and trains on the CPU in float32
    return analysis_options("lca", without=("model", "dataset", "limit", "batch_size", "device", "dtype"),
                            helps={"seed": "First seed for initialization and training data.",
                                   "threads": "torch CPU threads for training (default: 1)."})(f)


def _config(quick, m, L, w, d, steps, seed, seeds, threads):
    from factscope.lca.experiments import LCAConfig

    kw = {k: v for k, v in dict(m=m, L=L, w=w, steps=steps, seed=seed, seeds=seeds, threads=threads).items()
          if v is not None}
    if d is not None:
        kw.update(d=d, d_a=d)
    return LCAConfig.quick(**kw) if quick else LCAConfig(**kw)


def _run(names, common: Common, quick, m, L, w, d, steps, seeds):
    from factscope.lca.experiments import run_experiments

    cfg = _config(quick, m, L, w, d, steps, common.seed, seeds, common.threads)
    run = common.create_run(experiments=list(names), quick=bool(quick), **cfg.defining())
    t0 = time.time()
    summary = run_experiments(run, names, cfg, progress=common.progress)
    run.write_report(title="Latent concept association")
    click.echo(f"wrote {run.dir} in {time.time() - t0:.0f} s")
    for k in ("value_matrix", "constructed", "embeddings", "attention", "lca_hijack"):
        if k in summary:
            click.echo(f"  {k}: {json.dumps(summary[k], default=str)}")


def _make(cmd_name, exp, help_text):
    @_options
    def cmd(common: Common, **kw):
        _run([exp], common, **kw)

    cmd.__doc__ = help_text
    return lca.command(cmd_name, help=help_text)(cmd)


for _name, (_exp, _help) in COMMANDS.items():
    _make(_name, _exp, _help)


@lca.command("all")
@_options
def all_cmd(common: Common, **kw):
    """All five experiments into one run directory (summary.json, tables, figures, report.html)."""
    from factscope.lca.experiments import EXPERIMENTS

    _run(list(EXPERIMENTS), common, **kw)
