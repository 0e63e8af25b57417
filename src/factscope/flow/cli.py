"""``factscope flow ...``: the Geva et al. 2023 analyses from the command line."""

from __future__ import annotations

import functools

import click

from factscope.errors import FactscopeError


def _common(f):
    options = [
        click.option("--model", "model_name", default="gemma-3-270m", show_default=True, help="Model name, hub id, directory or .gguf file."),
        click.option("--dataset", default="known_1000", show_default=True, help="Fact set name or file."),
        click.option("--limit", type=int, default=100, show_default=True, help="Number of known facts to analyse (seeded random sample of the facts the model knows)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--all-facts", is_flag=True, help="Do not filter to facts the model knows (e.g. for random test models)."),
        click.option("--out", type=click.Path(), required=True, help="Output directory."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (finished facts are kept)."),
        click.option("--batch-size", type=int, default=8, show_default=True, help="Facts per batch."),
        click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."),
        click.option("--device", default="cpu", show_default=True),
        click.option("--no-progress", is_flag=True, help="Hide progress bars."),
    ]
    for o in reversed(options):
        f = o(f)
    return f


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


def _setup(kw: dict, command: str, extra: dict):
    import torch

    from factscope.flow.select import facts_for_run
    from factscope.models import load_model
    from factscope.runs import Run

    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    config = {
        "analysis": f"flow {command}",
        "model": kw["model_name"],
        "dataset": kw["dataset"],
        "limit": kw["limit"],
        "seed": kw["seed"],
        "known_only": not kw["all_facts"],
        **extra,
        "runtime": {"batch_size": kw["batch_size"], "threads": kw["threads"], "device": kw["device"]},
    }
    run = Run.create(kw["out"], config, resume=kw["resume"])
    model = load_model(kw["model_name"], device=kw["device"])
    facts = facts_for_run(run, model, kw["dataset"], kw["limit"], seed=kw["seed"], progress=not kw["no_progress"], known_only=not kw["all_facts"])
    run.update_summary({"model": model.name, "dataset": kw["dataset"]})
    return run, model, facts


def _finish(run) -> None:
    path = run.write_report()
    click.echo(f"report: {path}")


@click.group("flow")
def flow() -> None:
    """Information flow and attribute extraction (Geva et al. 2023)."""


@flow.command("knockout")
@_common
@click.option("--window", type=int, default=None, help="Layers per knockout window (default max(1, round(n_layers/5))).")
@click.option("--heads", default=None, help="Only knock out these heads (comma-separated), in every layer of the window.")
@click.option("--from", "from_", default="last", show_default=True, help="Query positions to block from: 'last', token indices (negatives from the end) or set names, comma-separated.")
def knockout_cmd(window, heads, from_, **kw):
    """Attention knockout: block last -> subject / non-subject / last edges per layer window."""
    from factscope.flow.knockout import run_knockout

    extra = {"window": window, "heads": _int_list(heads), "from": from_}
    run, model, facts = _setup(kw, "knockout", extra)
    s = run_knockout(
        run, model, facts, window=window, heads=_int_list(heads), from_positions=_positions(from_),
        batch_size=kw["batch_size"], progress=not kw["no_progress"],
    )
    for k, v in s["critical"].items():
        click.echo(f"{k:16s} strongest drop {v['min_change']:7.1f}% at layer {v['layer']}")
    _finish(run)
