"""The analyses from Python (a notebook, a script): one call, one result object.

Every analysis writes a run directory (tables, figures, ``summary.json``, report sections with
their findings and claims). Called from Python it writes that directory too (a fresh temporary
one unless ``out=`` names one) and comes back as a :class:`Result` reading it::

    import factscope.flow
    res = factscope.flow.knockout("gemma-3-270m", "known_1000", limit=20)
    res.findings          # the report's sentences
    res.claims            # the paper's claims: holds on this model?
    res.table             # the main table (a DataFrame); res.tables has all of them
    res.summary           # summary.json's entry for the analysis
    res.plot()            # the report's figure, interactive (Plotly) when it converts
    res.save("runs/ko")   # the run directory, as ``factscope flow knockout --out runs/ko`` writes it

The calls are ``factscope.flow.knockout|enrichment|sublayer|extraction|heads``,
``factscope.hijack.run``, ``factscope.lca.run``,
``factscope.circuits.discover|evaluate|lens|roles|hallucination|icl``, ``factscope.trace.run``,
``factscope.edit.run``. Where a module of that name exists (``factscope.flow.knockout``), the module
itself is callable (:func:`callable_module`: calling it calls its ``analyse`` function), so it still
holds the method's functions; the others are plain functions. They run the same
functions as the CLI commands, so a result saved from a notebook and a CLI run with the same options
hold the same numbers.
"""

from __future__ import annotations

import base64
import html
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from factscope.errors import FactscopeError
from factscope.findings import Claim
from factscope.runs import Run, discard_unstarted_runs, forget_unstarted_runs, unstarted_mark


@dataclass
class Result:
    """An analysis's results, read from its run directory ``run.dir``.

    ``key`` names the analysis's entry in ``summary.json``; ``sections`` the report sections it
    wrote (their tables, figures, findings and claims make the result); ``main`` its main table
    (default: the first its sections show)."""

    run: Run
    key: str
    sections: tuple[str, ...]
    main: str | None = None

    # ---- what the run holds ------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return self.run.dir

    def _sections(self) -> list[dict]:
        return [s for s in self.run.sections if s.get("key") in self.sections]

    @property
    def summary(self) -> dict:
        """The analysis's entry of ``summary.json`` (the whole summary when it has none)."""
        s = self.run.summary
        own = s.get(self.key)
        return own if isinstance(own, dict) else s

    @property
    def findings(self) -> list[str]:
        return [f for s in self._sections() for f in s.get("findings", [])]

    @property
    def claims(self) -> list[Claim]:
        return [Claim.from_dict(c) for s in self._sections() for c in s.get("claims", [])]

    def _names(self, kind: str) -> list[str]:
        names = [item["name"] for s in self._sections() for item in s.get(kind, [])]
        return list(dict.fromkeys(names))

    def table_names(self) -> list[str]:
        """The run's table names: those the report sections show first, then the rest."""
        names = [n for n in self._names("tables") if self.run.table_path(n).is_file()]
        return names + [n for n in self.run.tables() if n not in names]

    @property
    def tables(self) -> dict[str, Any]:
        """The run's tables by name (DataFrames, read from the CSV files), in :meth:`table_names` order."""
        return {n: self.run.load_table(n) for n in self.table_names()}

    def _main_name(self) -> str | None:
        names = self.table_names()
        return self.main if self.main in names else (names[0] if names else None)

    @property
    def table(self) -> Any:
        """The analysis's main table (``main``, or the first its report sections show)."""
        name = self._main_name()
        if name is None:
            raise FactscopeError(f"the {self.key} run in {self.dir} wrote no table")
        return self.run.load_table(name)

    @property
    def figures(self) -> list[str]:
        return [n for n in self._names("figures") if self.run.figure_path(n).is_file()]

    def plot(self, name: str | None = None) -> Any:
        """A figure of the analysis (default: the first): a Plotly figure (hover, zoom, legend
        toggles) when it has an interactive copy, else the PNG as an IPython image."""
        names = self.figures
        if not names:
            raise FactscopeError(f"the {self.key} run in {self.dir} drew no figure")
        if name is None:
            name = names[0]
        elif name not in names:
            raise FactscopeError(f"no figure {name!r} in this result; it has {', '.join(names)}")
        spec = self.run.figure_path(name).with_suffix(".plotly.json")
        if spec.is_file():
            import plotly.io

            return plotly.io.from_json(spec.read_text(encoding="utf-8"))
        from IPython.display import Image

        return Image(filename=str(self.run.figure_path(name)))

    # ---- display and saving ------------------------------------------------------------------

    def _repr_html_(self) -> str:
        from factscope.report import findings_block, render_table

        secs = self._sections()
        title = ", ".join(s.get("title", "") for s in secs) or self.key
        parts = [f"<div class='factscope-result'><h3>{html.escape(title)}</h3>"]
        if any(s.get("findings") or s.get("claims") for s in secs):
            parts.append(findings_block(secs))
        for name in self.figures[:1]:  # a static preview; res.plot() gives the interactive figure
            png = base64.b64encode(self.run.figure_path(name).read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(name)}' style='max-width:100%' src='data:image/png;base64,{png}'>")
        main = self._main_name()
        if main is not None:
            parts.append(render_table(self.run.load_table(main), main, max_rows=10))
        more = ", ".join(self.table_names()) or "none"
        parts.append(f"<p><small>Run directory {html.escape(str(self.dir))}; tables: {html.escape(more)}; "
                     "<code>.plot()</code> draws the figure, <code>.save(DIR)</code> keeps the run.</small></p></div>")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"Result({self.key!r}, {str(self.dir)!r}, {len(self.findings)} findings, tables {self.table_names()})"

    def save(self, out: str | Path, report: bool = True) -> Path:
        """Copy the run directory to ``out`` (new, or an empty directory) with its ``report.html``;
        returns ``out``. ``factscope report OUT`` renders it again later."""
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FactscopeError(f"{out} already exists and is not an empty directory")
        shutil.copytree(self.dir, out, dirs_exist_ok=True)
        saved = Run.open(out)
        if report:
            saved.write_report()
        return out


def as_model(model: Any, device: str = "cpu") -> Any:
    """A loaded :class:`factscope.models.Model`: ``model`` itself, or the one its spec names."""
    if isinstance(model, str):
        from factscope.models import load_model

        return load_model(model, device=device)
    return model


def config_of(analysis: str, model: Any, dataset: Any, limit: int | None, seed: int, **extra: Any) -> dict:
    """config.json of a run started from Python: the CLI's keys (``analysis``, ``model``,
    ``model_spec``, ``dataset``, ``limit``, ``seed``) and the analysis's own options."""
    name = [getattr(m, "name", m) for m in model] if isinstance(model, list) else getattr(model, "name", model)
    if isinstance(dataset, str) or (dataset and all(isinstance(d, str) for d in dataset)):
        data = dataset if isinstance(dataset, str) else list(dataset)
    else:
        data = f"{len(dataset)} facts given in Python"
    return {"analysis": analysis, "model": name, "model_spec": name, "dataset": data, "limit": limit, "seed": seed,
            **extra}


def analysis(key: str, config: dict, body: Callable[[Run], Any], out: str | Path | None = None,
             main: str | None = None) -> Result:
    """Run ``body(run)`` in a new run directory (``out``, default a temporary one) and return its
    :class:`Result` (the report sections ``body`` added). When ``body`` fails, the directory it
    started is removed (as the CLI does), so a corrected call can use the same ``out``."""
    mark = unstarted_mark()
    temp = Path(tempfile.mkdtemp(prefix="factscope-")) if out is None else None
    run = Run.create(temp / key if temp else out, config)
    try:
        body(run)
    except BaseException:
        discard_unstarted_runs(mark)
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    forget_unstarted_runs(mark)
    return Result(run, key, tuple(s["key"] for s in run.sections), main)


def facts_of(run: Run, model: Any, facts: str | Sequence, limit: int | None, seed: int, known_only: bool,
             progress: bool) -> list:
    """The facts of a flow analysis, chosen as the CLI chooses them (a seeded sample of the ones the
    model knows, saved as ``facts.csv``): from a data set name or a list of :class:`Fact`."""
    from factscope.flow.select import facts_for_run

    named = isinstance(facts, str)
    return facts_for_run(run, model, facts if named else "the facts given", limit, seed=seed, progress=progress,
                         known_only=known_only, all_facts=None if named else list(facts))


def check_options(options: dict, fn: Callable[..., Any], extra: Sequence[str] = ()) -> None:
    """Refuse, before anything runs, an option that ``fn`` does not take as a keyword (nor ``extra``)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD
                                                                           and p.default is not p.empty)]
    known += [n for n in extra if n not in known]
    bad = [k for k in options if k not in known or k == "progress"]
    if bad:
        raise FactscopeError(f"unknown option(s) {', '.join(map(repr, bad))}; this analysis takes "
                             + ", ".join(k for k in known if k != "progress"))


def on_facts(key: str, model: Any, facts: str | Sequence, step: Callable[..., Any], *, limit: int | None, seed: int,
             known_only: bool, out: str | Path | None, progress: bool, options: dict,
             analysis_name: str | None = None, main: str | None = None) -> Result:
    """A per-fact analysis from Python (flow's parts, tracing): load ``model``, choose the facts in the
    new run (:func:`facts_of`) and call ``step(run, model, facts, progress=progress, **options)`` (e.g.
    ``run_knockout``); config.json's ``analysis`` is ``analysis_name`` (default ``flow <key>``), the
    result's main table ``main`` (default ``key``)."""
    check_options(options, step)
    if limit is not None and limit < 1:
        raise FactscopeError(f"limit must be at least 1, got {limit}")
    model = as_model(model)
    cfg = config_of(analysis_name or f"flow {key}", model, facts, limit, seed, known_only=known_only, **options)

    def body(run: Run) -> None:
        step(run, model, facts_of(run, model, facts, limit, seed, known_only, progress), progress=progress, **options)

    return analysis(key, cfg, body, out, main=main or key)


def lazy_submodules(package: str, names: Sequence[str]) -> Callable[[str], types.ModuleType]:
    """A package's ``__getattr__`` that imports its submodules ``names`` on first use, so that
    ``factscope.flow.knockout(...)`` works after ``import factscope.flow`` while importing the package
    itself loads no model code (the CLI's ``--help`` stays fast)."""

    def __getattr__(name: str) -> types.ModuleType:
        if name in names:
            import importlib

            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.analyse(*args, **kwargs)


def callable_module(name: str) -> None:
    """Make module ``name`` callable: ``module(...)`` is ``module.analyse(...)`` (so that
    ``factscope.flow.knockout(model, facts)`` runs the knockout and ``factscope.flow.knockout``
    stays the module)."""
    sys.modules[name].__class__ = _CallableModule
