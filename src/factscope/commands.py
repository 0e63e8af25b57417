"""The substrate's commands: ``models``, ``predict``, ``facts`` and the main job ``demo``."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import click

from factscope import DEFAULT_MODEL
from factscope.errors import FactscopeError
from factscope.runs import recording


def load_model(*args, **kwargs):
    """``factscope.models.load_model``, imported when a command runs: importing this module (as
    every analysis's cli.py does for ``analysis_options``) does not import torch, so ``--help``
    stays fast."""
    from factscope.models import load_model as load

    return load(*args, **kwargs)


def _recorded_model_config(dtype: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """What ``--dtype`` adds to a run's config.json: the dtype and where the weights come from
    (from ``model_spec``, what the user typed: a list of them for ``hijack run``)."""
    from factscope.models import weights_label

    out: dict[str, Any] = {"dtype": dtype}
    spec = config.get("model_spec", config.get("model"))
    if isinstance(spec, list):
        out["weights"] = {str(m): weights_label(str(m)) for m in spec}
    elif isinstance(spec, str):
        out["weights"] = weights_label(spec)
    return out


# The common options of the analysis commands, in the order --help lists them.
COMMON_OPTIONS = ("model", "dataset", "limit", "seed", "out", "resume", "batch_size", "threads", "device", "dtype",
                  "no_progress")


@dataclass
class Common:
    """The common options of one analysis command, as its function receives them (``common``).

    ``model_spec`` and ``dataset`` are what the user typed: a string, or a tuple for a command that
    takes several (``hijack run``). ``analysis`` names the analysis in config.json.
    """

    analysis: str | None
    model_spec: Any = DEFAULT_MODEL
    dataset: Any = "known_1000"
    limit: int | None = None
    seed: int = 0
    out: Path | None = None
    resume: bool = False
    batch_size: int = 32
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    no_progress: bool = False
    all_facts: bool | None = None  # None: the command has no --all-facts
    executor: str = "local"
    workers: int = 2
    ray_address: str | None = None
    gpus_per_worker: float = 0.0
    options: tuple[str, ...] = COMMON_OPTIONS  # the common options the command has

    @property
    def progress(self) -> bool:
        return not self.no_progress

    @property
    def known_only(self) -> bool:
        return not self.all_facts

    def check(self) -> None:
        """What click cannot check, before any model or data loads: the device exists, ``--out``
        can hold a new run (or ``--resume`` one); sets torch's threads."""
        names = self.options
        if "device" in names:
            from factscope.models import check_devices

            check_devices(self.device)
        if "threads" in names and self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if "out" in names and self.out is not None:
            from factscope.runs import check_out_dir

            check_out_dir(self.out, self.resume)

    def load_model(self):
        """The model of ``--model`` on ``--device`` (in ``--dtype``: the decorator sets it)."""
        return load_model(self.model_spec, device=self.device)

    def resolved(self) -> Any:
        """The resolved model name(s) of ``model_spec`` without loading a model (a bad spec fails here)."""
        from factscope.models import resolve

        if isinstance(self.model_spec, str):
            return resolve(self.model_spec)[0]
        return [resolve(s)[0] for s in self.model_spec]

    def config(self, model: Any = None, **extra: Any) -> dict[str, Any]:
        """config.json of the run: ``analysis``, ``model`` (the resolved name, e.g. ``model.name``;
        default: :meth:`resolved`), ``model_spec`` (as typed), ``dataset``, ``limit``, ``seed``,
        ``known_only`` (commands with ``--all-facts``), then ``extra`` and ``runtime`` (batch size,
        threads, device: not compared on resume)."""
        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        model = getattr(model, "name", model)
        has = set(self.options)
        cfg: dict[str, Any] = {"analysis": self.analysis}
        if "model" in has:
            cfg.update(model=plain(self.resolved() if model is None else model), model_spec=plain(self.model_spec))
        cfg.update({k: plain(getattr(self, k)) for k in ("dataset", "limit", "seed") if k in has})
        if "all_facts" in has:
            cfg["known_only"] = self.known_only
        cfg.update(extra)
        runtime = {k: getattr(self, k) for k in ("batch_size", "threads", "device") if k in has}
        if "executor" in has:  # how, not what: a run resumes on another executor
            runtime["executor"] = self.executor
            if self.executor == "ray":
                runtime.update(workers=self.workers, ray_address=self.ray_address, gpus_per_worker=self.gpus_per_worker)
        if runtime:
            cfg["runtime"] = {**cfg.get("runtime", {}), **runtime}
        return cfg

    def create_run(self, model: Any = None, **extra: Any):
        """``Run.create(--out, self.config(model, **extra), resume=--resume)``: call it after the
        model and data loaded, so a failure leaves no directory behind."""
        from factscope.runs import Run

        return Run.create(self.out, self.config(model, **extra), resume=self.resume)


_HELP = {
    "model": "Registered name, Hugging Face hub id, local model directory or .gguf file.",
    "model_multi": "Registered name, hub id, directory or .gguf file; repeat for several models (run one after another).",
    "dataset": "Data set name (factscope data list) or fact file.",
    "limit": "Seeded random sample of at most this many facts.",
    "seed": "Seed of the fact sample and anything else random.",
    "out": "Output run directory (created with its parents if missing).",
    "resume": "Continue an interrupted run in --out with the same options (finished work is kept).",
    "batch_size": "Prompts per forward pass.",
    "threads": "torch CPU threads (default: torch's choice).",
    "device": "torch device: cpu, cuda, cuda:N, mps, or auto (a GPU when there is one); a list such as cuda:0,cuda:1 splits the model's layers over those GPUs.",
    "dtype": "Weights and activations dtype (bfloat16 halves memory; float16 is refused for models that overflow it).",
    "no_progress": "Hide progress bars.",
    "all_facts": "Keep facts the model does not know (top-1 is not the target; e.g. random test models).",
    "executor": "Where the batches run: here (local), or on Ray actors (ray; pip install 'factscope[ray]'), each "
                "loading the model once; the run directory and its numbers are the same, and a run resumes on either.",
    "workers": "Ray actors (--executor ray).",
    "ray_address": "Ray cluster to join, e.g. ray://head:10001 or auto (default: start Ray on this machine).",
    "gpus_per_worker": "GPUs per Ray actor (e.g. 1: one actor per GPU; the model loads on cuda there; 2 or more: split over them).",
}
EXECUTOR_OPTIONS = ("executor", "workers", "ray_address", "gpus_per_worker")


def _click_options(names: Sequence[str], multiple: bool, defaults: Mapping[str, Any], helps: Mapping[str, str]) -> list:
    """The click options for ``names`` (a subset of COMMON_OPTIONS, plus "all_facts")."""
    def h(name, fallback=None):
        return helps.get(name) or _HELP[fallback or name]

    made = {
        "model": lambda: click.option(
            "--model", "model_spec", multiple=multiple, show_default=True,
            default=tuple(defaults.get("model", (DEFAULT_MODEL,))) if multiple else defaults.get("model", DEFAULT_MODEL),
            help=h("model", "model_multi" if multiple else "model")),
        "dataset": lambda: click.option(
            "--dataset", multiple=multiple, show_default=True,
            default=tuple(defaults.get("dataset", ("known_1000",))) if multiple else defaults.get("dataset", "known_1000"),
            help=h("dataset") + (" Repeat to combine." if multiple else "")),
        "limit": lambda: click.option("--limit", type=click.IntRange(1), default=defaults.get("limit"),
                                      show_default=defaults.get("limit") is not None, help=h("limit")),
        "seed": lambda: click.option("--seed", type=int, default=defaults.get("seed", 0), show_default=True, help=h("seed")),
        "out": lambda: click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=defaults.get("out"),
                                    required=defaults.get("out") is None, show_default=defaults.get("out") is not None,
                                    help=h("out")),
        "resume": lambda: click.option("--resume", is_flag=True, help=h("resume")),
        "batch_size": lambda: click.option("--batch-size", type=click.IntRange(1), default=defaults.get("batch_size", 32),
                                           show_default=True, help=h("batch_size")),
        "threads": lambda: click.option("--threads", type=click.IntRange(1), default=None, help=h("threads")),
        "device": lambda: click.option("--device", default="cpu", show_default=True, help=h("device")),
        "dtype": lambda: click.option("--dtype", default="float32", show_default=True,
                                      type=click.Choice(["float32", "bfloat16", "float16"]), help=h("dtype")),
        "no_progress": lambda: click.option("--no-progress", is_flag=True, help=h("no_progress")),
        "all_facts": lambda: click.option("--all-facts", is_flag=True, help=h("all_facts")),
        "executor": lambda: click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
                                         show_default=True, help=h("executor")),
        "workers": lambda: click.option("--workers", type=click.IntRange(1), default=2, show_default=True,
                                        help=h("workers")),
        "ray_address": lambda: click.option("--ray-address", default=None, help=h("ray_address")),
        "gpus_per_worker": lambda: click.option("--gpus-per-worker", type=click.FloatRange(0), default=0.0,
                                                show_default=True, help=h("gpus_per_worker")),
    }
    return [made[n]() for n in names]


def analysis_options(analysis: str | None, *, without: Sequence[str] = (), multiple: bool = False,
                     all_facts: bool = False, executor: bool = False, helps: Mapping[str, str] | None = None,
                     **defaults: Any):
    """The common options of an analysis command, defined once: ``--model``, ``--dataset``,
    ``--limit``, ``--seed``, ``--out``, ``--resume``, ``--batch-size``, ``--threads``, ``--device``,
    ``--dtype``, ``--no-progress`` (those in ``without`` left out where they do not apply),
    ``--all-facts`` with ``all_facts=True``, and with ``executor=True`` ``--executor``,
    ``--workers``, ``--ray-address``, ``--gpus-per-worker`` (:mod:`factscope.executors`: the
    command's loops run on that executor).

    The command function receives them as one :class:`Common` argument ``common`` (its other
    options as usual). Before it runs: ``--limit``, ``--batch-size``, ``--threads`` >= 1 and the
    ``--dtype`` choice (click), the device exists and ``--out`` can hold the run
    (:meth:`Common.check`), torch's threads are set; while it runs, ``load_model`` loads in
    ``--dtype`` and every run records ``dtype`` and ``weights`` (``runs.recording``).
    ``Common.config`` / ``Common.create_run`` give every command the same config.json keys
    (``analysis``, ``model`` = the resolved model, ``model_spec`` = what the user typed, ...).

    ``multiple=True``: ``--model`` and ``--dataset`` repeat and are tuples (``hijack run``).
    ``defaults``: the command's own defaults of model, dataset, limit, seed, out (None:
    required), batch_size. ``helps``: the command's own help texts by option name.
    """
    unknown = set(without) - set(COMMON_OPTIONS)
    if unknown:
        raise ValueError(f"not common options: {sorted(unknown)}")
    unknown = set(defaults) - {"model", "dataset", "limit", "seed", "out", "batch_size"}
    if unknown:
        raise ValueError(f"no default can be set for {sorted(unknown)}")
    names = [n for n in COMMON_OPTIONS if n not in without] + (["all_facts"] if all_facts else []) \
        + (list(EXECUTOR_OPTIONS) if executor else [])
    options = _click_options(names, multiple, defaults, helps or {})

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in names if n in kwargs}
            if "model" in names:
                values["model_spec"] = kwargs.pop("model_spec")
            common = Common(analysis, **values, options=tuple(names))
            common.check()
            with contextlib.ExitStack() as stack:
                if executor:
                    from factscope import executors

                    stack.enter_context(executors.using(executors.make(
                        common.executor, common.workers, common.ray_address, common.gpus_per_worker)))
                if "dtype" in names:
                    from factscope.models import using_dtype

                    stack.enter_context(using_dtype(common.dtype))
                    stack.enter_context(recording(functools.partial(_recorded_model_config, common.dtype)))
                return f(*args, common=common, **kwargs)

        for o in reversed(options):
            wrapper = o(wrapper)
        return wrapper

    return decorate


def first_sentence(text: str) -> str:
    """The first sentence of ``text``'s first paragraph, whitespace normalized ("et al. 2024" and
    "e.g. x" do not end it: a sentence ends at . ! or ? before a capital letter)."""
    para = " ".join(inspect.cleandoc(text or "").split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", para)[0]


class CommandGroup(click.Group):
    """A click group whose command listing shows each command's whole first sentence (click cuts
    short help at the terminal width with "..."); long lines wrap instead. Every factscope group
    uses it (``@click.group(..., cls=CommandGroup)``)."""

    def command_help(self, ctx: click.Context, name: str) -> str | None:
        cmd = self.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            return None
        return first_sentence(cmd.short_help or cmd.help or "")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, h) for n in self.list_commands(ctx) if (h := self.command_help(ctx, n)) is not None]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


# --------------------------------------------------------------------------------------------
# factscope models
# --------------------------------------------------------------------------------------------


@click.group("models", cls=CommandGroup)
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
@analysis_options(None, without=[n for n in COMMON_OPTIONS if n not in ("model", "device", "dtype")])
@click.option("--top-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.argument("prompt")
def predict(common: Common, k: int, as_json: bool, prompt: str) -> None:
    """Print the next-token distribution after PROMPT."""
    from factscope.predict import top_k

    if not prompt.strip():
        raise FactscopeError("the prompt is empty: give the text whose next token to predict")
    model = common.load_model()
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


@click.group("facts", cls=CommandGroup)
def facts() -> None:
    """Facts a model knows."""


def known_section(run, model, facts, top_k: int = 1, batch_size: int = 32, progress: bool = True) -> list:
    """Find the known facts, write their tables, figure and report section; return them."""
    from factscope.loop import publish
    from factscope.plotting import COLORS, new_figure
    from factscope.predict import known_facts, known_rate_by_relation

    known, table = known_facts(model, facts, top_k=top_k, batch_size=batch_size, progress=progress)
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
            "findings": [f"{model.name} knows {len(known)} of {len(facts)} facts ({rate:.0%}): the target's first token "
                         f"is its top-{top_k} prediction."],
        },
    )
    return known


@facts.command("known")
@analysis_options("facts known", executor=True)
@click.option("--top-k", type=click.IntRange(1, 1000), default=1, show_default=True)
def facts_known(common: Common, top_k: int) -> None:
    """Keep the facts whose target is the model's top-1 (or top-k) prediction."""
    from factscope.facts import load_facts
    from factscope.runs import atomic_write_text

    fs = load_facts(common.dataset, limit=common.limit, seed=common.seed)
    model = common.load_model()
    run = common.create_run(model, top_k=top_k)
    known = known_section(run, model, fs, top_k=top_k, batch_size=common.batch_size, progress=common.progress)
    atomic_write_text(run.path("known.jsonl"), "".join(json.dumps(f.to_dict(), ensure_ascii=False) + "\n" for f in known))
    run.write_report()
    click.echo(f"{len(known)} of {len(fs)} facts known; wrote {run.dir}")


# --------------------------------------------------------------------------------------------
# factscope demo: the main job
# --------------------------------------------------------------------------------------------

DEMO_PARTS = ("flow", "hijack", "lca", "circuit")


@click.command("demo")
@analysis_options("demo", out="runs/demo", limit=300,
                  helps={"limit": "Seeded sample of the data set to test for known facts.",
                         "batch_size": "Prompts per forward pass of the known-facts check."})
@click.option("--skip", multiple=True, type=click.Choice(DEMO_PARTS), help="Leave out a part (repeatable).")
def demo(common: Common, skip) -> None:
    """The main job: known facts, information flow, context hijacking, the synthetic task and a knowledge circuit, in one report."""
    from factscope.facts import load_facts

    t0 = time.time()
    fs = load_facts(common.dataset, limit=common.limit, seed=common.seed)
    model = common.load_model()
    run = common.create_run(model, skip=sorted(skip))
    click.echo(f"demo: {model!r}; writing {run.dir}")
    known = known_section(run, model, fs, batch_size=common.batch_size, progress=common.progress)
    click.echo(f"demo: {len(known)} of {len(fs)} facts known")
    run.write_report()
    for part in DEMO_PARTS:
        if part in skip:
            continue
        t = time.time()
        _demo_part(part, run, model, known, common.seed, common.progress)
        run.write_report()
        click.echo(f"demo: {part} done in {time.time() - t:.0f} s")
    run.update_summary({"seconds": {**run.summary.get("seconds", {}), "demo": round(time.time() - t0, 1)}})
    path = run.write_report(title=f"factscope demo: {model.name}")
    click.echo(f"demo: report in {path} ({time.time() - t0:.0f} s)")


def _demo_part(part: str, run, model, known, seed: int, progress: bool) -> None:
    if part == "flow":
        from factscope.flow import demo_section

        demo_section(run, model, known, progress=progress)
    elif part == "hijack":
        from factscope.hijack import demo_section

        demo_section(run, model, known, progress=progress)
    elif part == "lca":
        from factscope.lca import run_all

        run_all(run, quick=True, progress=progress)
    elif part == "circuit":
        from factscope.circuits.run import demo_section

        demo_section(run, model, seed=seed, progress=progress)
    else:  # pragma: no cover
        raise FactscopeError(f"unknown demo part {part!r}")
