"""``factscope flow ...``: the Geva et al. 2023 analyses from the command line."""

from __future__ import annotations

import click

from factscope.commands import CommandGroup, Common, analysis_options
from factscope.errors import FactscopeError


def _common(command: str):
    return analysis_options(
        f"flow {command}", all_facts=True, executor=True, limit=100, batch_size=8,
        helps={"limit": "Number of known facts to analyse (seeded random sample of the facts the model knows).",
               "batch_size": "Facts per batch."})


def _int_list(text: str | None) -> list[int] | None:
    if text is None or text == "":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FactscopeError(f"expected comma-separated integers, got {text!r}") from None


def _positions(text: str) -> list:
    out: list = []
    for x in text.split(","):
        x = x.strip()
        if not x:
            continue
        if x == "last":
            out.append(-1)
        else:
            try:
                out.append(int(x))
            except ValueError:
                out.append(x)  # a named set: subject, non_subject, ...
    return out


def _setup(common: Common, extra: dict):
    from factscope.facts import load_facts
    from factscope.flow.select import facts_for_run

    all_facts = load_facts(common.dataset)  # bad data: fail before the model loads and the run exists
    model = common.load_model()
    run = common.create_run(model, **extra)
    facts = facts_for_run(run, model, common.dataset, common.limit, seed=common.seed, progress=common.progress,
                          known_only=common.known_only, all_facts=all_facts)
    return run, model, facts


def _finish(run) -> None:
    path = run.write_report()
    click.echo(f"report: {path}")


@click.group("flow", cls=CommandGroup)
def flow() -> None:
    """Information flow and attribute extraction (Geva et al. 2023)."""


@flow.command("knockout")
@_common("knockout")
@click.option("--window", type=click.IntRange(1), default=None, help="Layers per knockout window (default max(1, round(n_layers/5))).")
@click.option("--heads", default=None, help="Only knock out these heads (comma-separated), in every layer of the window.")
@click.option("--from", "from_", default="last", show_default=True, help="Query positions to block from: 'last', token indices (negatives from the end) or set names, comma-separated.")
def knockout_cmd(window, heads, from_, common: Common):
    """Attention knockout: block last -> subject / non-subject / last edges per layer window."""
    from factscope.flow.knockout import run_knockout

    extra = {"window": window, "heads": _int_list(heads), "from": from_}
    run, model, facts = _setup(common, extra)
    s = run_knockout(
        run, model, facts, window=window, heads=_int_list(heads), from_positions=_positions(from_),
        batch_size=common.batch_size, progress=common.progress,
    )
    for k, v in s["critical"].items():
        click.echo(f"{k:16s} strongest drop {v['min_change']:7.1f}% at layer {v['layer']}")
    _finish(run)


@flow.command("extraction")
@_common("extraction")
@click.option("--ko-from-layer", type=int, default=None, help="Block the last position's edges in layers >= this (default n_layers // 2).")
@click.option("--no-heads", is_flag=True, help="Skip per-head projections.")
def extraction_cmd(ko_from_layer, no_heads, common: Common):
    """Attribute extraction: logit-lens events of attention, MLP and heads at the last position."""
    from factscope.flow.extraction import run_extraction

    run, model, facts = _setup(common, {"ko_from_layer": ko_from_layer, "heads": not no_heads})
    o = run_extraction(run, model, facts, batch_size=common.batch_size, progress=common.progress, heads=not no_heads, ko_from_layer=ko_from_layer)
    click.echo(f"facts with an extraction event: attention {o['attn_any_event']:.0%}, MLP {o['mlp_any_event']:.0%}")
    _finish(run)


def _attr_options(f):
    f = click.option("--attributes", "attributes_file", type=click.Path(), default=None,
                     help="File of subject -> paragraphs (JSON, JSONL or CSV) for the attribute sets (default: built-in source).")(f)
    f = click.option("--keep-subject-tokens", is_flag=True, help="Keep the subject's own tokens in its attribute set (the paper's behaviour).")(f)
    f = click.option("--top-n", type=int, default=500, show_default=True, help="Projection tokens considered.")(f)
    f = click.option("--keep", type=int, default=50, show_default=True, help="Clean tokens kept for the rate.")(f)
    return f


@flow.command("enrichment")
@_common("enrichment")
@_attr_options
def enrichment_cmd(attributes_file, keep_subject_tokens, top_n, keep, common: Common):
    """Subject enrichment: attributes rate per layer at four positions."""
    from factscope.flow.enrichment import run_enrichment

    extra = {"attributes": attributes_file, "keep_subject_tokens": keep_subject_tokens, "top_n": top_n, "keep": keep}
    run, model, facts = _setup(common, extra)
    s, _ = run_enrichment(run, model, facts, paragraphs_file=attributes_file, keep_subject_tokens=keep_subject_tokens, top_n=top_n,
                          keep=keep, batch_size=common.batch_size, progress=common.progress)
    if s:
        click.echo(f"baseline {s['baseline']:.1f}%; chance {s['chance_rate']:.1f}%; mean set size {s['mean_set_size']:.0f}; " + "; ".join(f"{p} peak {v['max_rate']:.1f}% at {v['hidden_state']}" for p, v in s["peak"].items()))
    _finish(run)


@flow.command("sublayer")
@_common("sublayer")
@_attr_options
@click.option("--upper", type=int, default=None, help="Layer whose output is measured (default round(0.83 * n_layers)).")
@click.option("--window", type=click.IntRange(1), default=None, help="Consecutive layers ablated (default max(1, round(n_layers/5))).")
@click.option("--attn-ablation", type=click.Choice(["uniform", "zero"]), default="uniform", show_default=True,
              help="uniform: every query attends uniformly to its visible keys (the paper's code); zero: zero the attention output.")
@click.option("--mlp-ablation", type=click.Choice(["hidden", "zero"]), default="hidden", show_default=True,
              help="hidden: zero the MLP's hidden activation, the input of its down projection (the paper's code); zero: zero the MLP output.")
def sublayer_cmd(attributes_file, keep_subject_tokens, top_n, keep, upper, window, attn_ablation, mlp_ablation, common: Common):
    """Sublayer knockout: ablate MLP or attention sublayers and measure enrichment at an upper layer."""
    from factscope.flow.enrichment import load_or_make_attributes
    from factscope.flow.sublayer import run_sublayer

    how = {"attn": attn_ablation, "mlp": mlp_ablation}
    extra = {"attributes": attributes_file, "keep_subject_tokens": keep_subject_tokens, "top_n": top_n, "keep": keep, "upper": upper,
             "window": window, "ablation": how}
    run, model, facts = _setup(common, extra)
    attrs, _ = load_or_make_attributes(run, model, facts, attributes_file, keep_subject_tokens, common.progress)
    s = run_sublayer(run, model, facts, attrs, upper=upper, window=window, how=how, top_n=top_n, keep=keep, progress=common.progress)
    if s:
        click.echo(f"no intervention {s['none_rate']:.1f}% (mass {s['none_mass']:.2f}%); lowest: MLP {s['mlp_min_rate']:.1f}% "
                   f"(mass {s['mlp_min_mass']:.2f}%), attention {s['attn_min_rate']:.1f}% (mass {s['attn_min_mass']:.2f}%)")
    _finish(run)


@flow.command("heads")
@_common("heads")
@click.option("--top-k", type=int, default=10, show_default=True, help="A head maps a fact when the target is in this many top tokens.")
@click.option("--head", "show", default=None, help="LAYER,HEAD whose top tokens to show per fact (default: the best head).")
def heads_cmd(top_k, show, common: Common):
    """Heads whose W_VO maps the last subject token to the fact's attribute."""
    from factscope.flow.heads import run_heads

    sh = _int_list(show)
    if sh is not None and len(sh) != 2:
        raise FactscopeError("--head takes LAYER,HEAD")
    run, model, facts = _setup(common, {"top_k": top_k, "head": sh})
    s = run_heads(run, model, facts, top_k=top_k, show_head=tuple(sh) if sh else None, progress=common.progress)
    if s:
        click.echo("best heads: " + ", ".join(f"L{h['layer']}H{h['head']} {h['rate']:.0%}" for h in s["top_heads"]))
    _finish(run)


@flow.command("all")
@_common("all")
@_attr_options
def all_cmd(attributes_file, keep_subject_tokens, top_n, keep, common: Common):
    """Every part: knockout, enrichment, sublayer knockout, extraction and heads, one report."""
    from factscope.flow import run_all

    extra = {"attributes": attributes_file, "keep_subject_tokens": keep_subject_tokens, "top_n": top_n, "keep": keep}
    run, model, facts = _setup(common, extra)
    run_all(run, model, facts, paragraphs_file=attributes_file, keep_subject_tokens=keep_subject_tokens, top_n=top_n, keep=keep,
            batch_size=common.batch_size, progress=common.progress)
    for k, v in run.summary.get("knockout", {}).get("critical", {}).items():
        click.echo(f"knockout {k:16s} strongest drop {v['min_change']:7.1f}% at layer {v['layer']}")
    _finish(run)
