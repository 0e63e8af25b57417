"""The substrate's commands: ``models``, ``predict``, ``facts`` and the main job ``demo``."""

from __future__ import annotations

import functools
import inspect
import json
import time
from pathlib import Path
from typing import Any, Mapping

import click

from factscope import DEFAULT_MODEL
from factscope.errors import FactscopeError
from factscope.runs import recording


def load_model(*args, **kwargs):
    """``factscope.models.load_model``, imported when a command runs: importing this module (as
    flow/ and hijack/ do for ``dtype_option``) does not import torch, so ``--help`` stays fast."""
    from factscope.models import load_model as load

    return load(*args, **kwargs)


model_option = click.option(
    "--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
    help="Registered name, Hugging Face hub id, local model directory or .gguf file.",
)
device_option = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")


def _recorded_model_config(dtype: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """What ``--dtype`` adds to a run's config.json: the dtype and where the weights come from."""
    from factscope.models import weights_label

    out: dict[str, Any] = {"dtype": dtype}
    if isinstance(config.get("models"), list):
        out["weights"] = {str(m): weights_label(str(m)) for m in config["models"]}
    elif isinstance(config.get("model"), str):
        out["weights"] = weights_label(config["model"])
    return out


def dtype_option(f):
    """``--dtype float32|bfloat16|float16`` for a command that loads models; the one place it is defined.

    The command function need not take the value (it gets ``dtype=`` only if it declares it): while it
    runs, ``load_model`` without an explicit dtype loads in the chosen one (``models.using_dtype``),
    and every run it creates records ``dtype`` and ``weights`` (e.g. "GGUF Q4_K_M (4-bit quantized),
    dequantized") in config.json (``runs.recording``), so adding the option to a command is one
    decorator line. float16 runs on the CPU with this torch; a model whose activations overflow
    float16 (Gemma 3) is refused when loaded.
    """
    wants = "dtype" in inspect.signature(f).parameters

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from factscope.models import using_dtype

        dtype = kwargs["dtype"] if wants else kwargs.pop("dtype")
        with using_dtype(dtype), recording(functools.partial(_recorded_model_config, dtype)):
            return f(*args, **kwargs)

    return click.option(
        "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
        help="Weights and activations dtype (bfloat16 halves memory; float16 is refused for models that overflow it).",
    )(wrapper)


# --------------------------------------------------------------------------------------------
# factscope models
# --------------------------------------------------------------------------------------------


@click.group("models")
def models() -> None:
    """List and pull models."""


@models.command("list")
def models_list() -> None:
    """List the registered models and whether their weights are cached."""
    from factscope.models import REGISTRY, cache_dir

    for name, reg in REGISTRY.items():
        if reg.tiny:
            state = "built on demand"
        else:
            state = "cached" if (cache_dir() / "models" / name / "factscope_cache.json").exists() else "not pulled"
        click.echo(f"{name:<14} {state:<16} {reg.description}")


@models.command("pull")
@click.argument("name")
def models_pull(name: str) -> None:
    """Download or assemble a model and cache its float weights (GGUF: dequantized once)."""
    from factscope.models import REGISTRY, load_tokenizer, resolve

    t = time.time()
    display, folder = resolve(name)
    if folder is None and name not in REGISTRY:  # a hub id: let transformers download it
        load_model(name)
    else:
        load_tokenizer(name)
    where = folder or ("built on demand" if name in REGISTRY else "the Hugging Face cache")
    click.echo(f"{display}: ready in {where} ({time.time() - t:.1f} s)")


# --------------------------------------------------------------------------------------------
# factscope predict
# --------------------------------------------------------------------------------------------


@click.command("predict")
@model_option
@device_option
@dtype_option
@click.option("--top-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.argument("prompt")
def predict(model_spec: str, device: str, dtype: str, k: int, as_json: bool, prompt: str) -> None:
    """Print the next-token distribution after PROMPT."""
    from factscope.predict import top_k

    if not prompt.strip():
        raise FactscopeError("the prompt is empty: give the text whose next token to predict")
    model = load_model(model_spec, device=device, dtype=dtype)
    pred = top_k(model, [prompt], k=k)[0]
    if as_json:
        rows = [{"token": t, "id": i, "prob": p} for t, i, p in zip(pred.tokens, pred.token_ids, pred.probs)]
        click.echo(json.dumps({"model": model.name, "prompt": prompt, "top": rows}, ensure_ascii=False))
        return
    click.echo(f"{model.name}: {prompt!r} ->")
    for rank, (t, p) in enumerate(zip(pred.tokens, pred.probs), 1):
        click.echo(f"{rank:>4}  {p:8.4f}  {t!r}")


# --------------------------------------------------------------------------------------------
# factscope facts known
# --------------------------------------------------------------------------------------------


@click.group("facts")
def facts() -> None:
    """Facts a model knows."""


def known_section(run, model, facts, top_k: int = 1, batch_size: int = 32) -> list:
    """Find the known facts, write their tables, figure and report section; return them."""
    from factscope.loop import publish
    from factscope.plotting import COLORS, new_figure
    from factscope.predict import known_facts, known_rate_by_relation

    known, table = known_facts(model, facts, top_k=top_k, batch_size=batch_size)
    by_rel = known_rate_by_relation(table)
    shown = by_rel.nlargest(25, "n").sort_values("rate")
    fig, ax = new_figure(size=(6.4, 0.25 * len(shown) + 1.2), title=f"{model.name}: facts known (top-{top_k})")
    labels = [f"{r} ({n})" for r, n in zip(shown["relation"].astype(str).str.slice(0, 38), shown["n"])]
    ax.barh(labels, shown["rate"], color=COLORS.get("subject", "C0"))
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of facts whose target's first token is in the top-%d" % top_k)
    rate = len(known) / max(1, len(facts))
    publish(
        run, "known", {"n_facts": len(facts), "n_known": len(known), "known_rate": rate},
        tables={"known_facts": table, "known_by_relation": by_rel}, figures={"known_by_relation": fig},
        section={
            "title": "Facts the model knows",
            "text": f"{len(known)} of {len(facts)} facts ({rate:.1%}) are known: the first token of the target is the "
            f"model's top-{top_k} next token after the prompt. Later sections use only the known facts. "
            f"Known rate per relation (relations with the most facts shown; the table lists all).",
            "figures": ["known_by_relation"],
            "tables": ["known_by_relation", "known_facts"],
        },
    )
    return known


@facts.command("known")
@model_option
@device_option
@dtype_option
@click.option("--dataset", default="known_1000", show_default=True, help="Data set name or file.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Random sample of at most N facts (seeded).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--top-k", type=click.IntRange(1, 1000), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="Write into an existing run directory with the same config.")
def facts_known(model_spec, device, dtype, dataset, limit, seed, top_k, batch_size, out, resume) -> None:
    """Keep the facts whose target is the model's top-1 (or top-k) prediction."""
    from factscope.facts import load_facts
    from factscope.runs import Run

    fs = load_facts(dataset, limit=limit, seed=seed)
    model = load_model(model_spec, device=device, dtype=dtype)
    config = {"command": "facts known", "model": model.name, "weights": model.weights, "dataset": dataset,
              "limit": limit, "seed": seed, "top_k": top_k, "runtime": {"device": device, "batch_size": batch_size}}
    run = Run.create(out, config, resume=resume)
    known = known_section(run, model, fs, top_k=top_k, batch_size=batch_size)
    from factscope.runs import atomic_write_text

    atomic_write_text(run.path("known.jsonl"), "".join(json.dumps(f.to_dict(), ensure_ascii=False) + "\n" for f in known))
    run.write_report()
    click.echo(f"{len(known)} of {len(fs)} facts known; wrote {run.dir}")


# --------------------------------------------------------------------------------------------
# factscope demo: the main job
# --------------------------------------------------------------------------------------------

DEMO_PARTS = ("flow", "hijack", "lca", "circuit")


@click.command("demo")
@model_option
@device_option
@dtype_option
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--n-facts", type=click.IntRange(10, 100000), default=300, show_default=True,
              help="Sample of known_1000 to test for known facts.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--skip", multiple=True, type=click.Choice(DEMO_PARTS), help="Leave out a part (repeatable).")
@click.option("--resume", is_flag=True, help="Continue an interrupted demo in --out (finished work is kept).")
def demo(model_spec, device, dtype, out, n_facts, seed, skip, resume) -> None:
    """The main job: known facts, information flow, context hijacking, the synthetic task and a knowledge circuit, in one report."""
    from factscope.facts import load_facts
    from factscope.runs import Run

    t0 = time.time()
    fs = load_facts("known_1000", limit=n_facts, seed=seed)
    model = load_model(model_spec, device=device, dtype=dtype)
    config = {"command": "demo", "model": model.name, "weights": model.weights, "dataset": "known_1000",
              "n_facts": n_facts, "seed": seed, "skip": sorted(skip), "runtime": {"device": device}}
    run = Run.create(out, config, resume=resume)
    click.echo(f"demo: {model!r}; writing {run.dir}")
    known = known_section(run, model, fs)
    click.echo(f"demo: {len(known)} of {len(fs)} facts known")
    run.write_report()
    for part in DEMO_PARTS:
        if part in skip:
            continue
        t = time.time()
        _demo_part(part, run, model, known, seed)
        run.write_report()
        click.echo(f"demo: {part} done in {time.time() - t:.0f} s")
    run.update_summary({"demo_seconds": round(time.time() - t0, 1)})
    path = run.write_report(title=f"factscope demo: {model.name}")
    click.echo(f"demo: report in {path} ({time.time() - t0:.0f} s)")


def _demo_part(part: str, run, model, known, seed: int) -> None:
    if part == "flow":
        from factscope.flow import demo_section

        demo_section(run, model, known)
    elif part == "hijack":
        from factscope.hijack import demo_section

        demo_section(run, model, known)
    elif part == "lca":
        from factscope.lca import run_all

        run_all(run, quick=True)
    elif part == "circuit":
        from factscope.circuits.run import demo_section

        demo_section(run, model, seed=seed)
    else:  # pragma: no cover
        raise FactscopeError(f"unknown demo part {part!r}")
