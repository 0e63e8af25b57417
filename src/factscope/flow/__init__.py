"""Geva et al. 2023, "Dissecting Recall of Factual Associations in Auto-Regressive Language Models".

One module per part of the paper, plain functions and dataclasses on the factscope substrate:

- :mod:`factscope.flow.knockout`    attention knockout: where information flows to the prediction
- :mod:`factscope.flow.attributes`  attribute sets and the attributes rate
- :mod:`factscope.flow.enrichment`  subject enrichment: attributes rate per layer and position
- :mod:`factscope.flow.sublayer`    sublayer knockout: what drives enrichment
- :mod:`factscope.flow.extraction`  attribute extraction events at the last position
- :mod:`factscope.flow.heads`       heads whose W_VO maps subject -> attribute
- :mod:`factscope.flow.cli`         ``factscope flow ...``

``run_all(run, model, facts)`` runs every part into one run directory; ``demo_section(run, model,
facts)`` is the short configuration used by ``factscope demo``. See docs/flow.md.

From Python, each part is one call returning a :class:`factscope.notebook.Result`:
``factscope.flow.knockout(model, facts, limit=20)`` (likewise ``enrichment``, ``sublayer``,
``extraction``, ``heads``: each module is callable, its ``analyse`` function).
"""

from __future__ import annotations

from collections.abc import Sequence

from factscope.notebook import lazy_submodules

PARTS = ("knockout", "enrichment", "sublayer", "extraction", "heads")

__getattr__ = lazy_submodules(__name__, PARTS)  # factscope.flow.knockout etc. on first use


def run_all(run, model, facts: Sequence, *, parts: Sequence[str] = PARTS, paragraphs_file: str | None = None,
            keep_subject_tokens: bool = False, top_n: int = 500, keep: int = 50, batch_size: int = 8, progress: bool = True) -> dict:
    """Run the chosen parts on ``facts`` (known facts) into ``run``; resumable per fact and part.
    Returns the run's summary."""
    from factscope.errors import FactscopeError

    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise FactscopeError(f"unknown flow part(s) {bad}; choose from {', '.join(PARTS)}")
    if "knockout" in parts:
        from factscope.flow.knockout import run_knockout

        run_knockout(run, model, facts, batch_size=batch_size, progress=progress)
    attrs = None
    if "enrichment" in parts:
        from factscope.flow.enrichment import run_enrichment

        _, attrs = run_enrichment(run, model, facts, paragraphs_file=paragraphs_file, keep_subject_tokens=keep_subject_tokens,
                                  top_n=top_n, keep=keep, batch_size=batch_size, progress=progress)
    if "sublayer" in parts:
        from factscope.flow.enrichment import load_or_make_attributes
        from factscope.flow.sublayer import run_sublayer

        if attrs is None:
            attrs, _ = load_or_make_attributes(run, model, facts, paragraphs_file, keep_subject_tokens, progress)
        run_sublayer(run, model, facts, attrs, top_n=top_n, keep=keep, progress=progress)
    if "extraction" in parts:
        from factscope.flow.extraction import run_extraction

        run_extraction(run, model, facts, batch_size=batch_size, progress=progress)
    if "heads" in parts:
        from factscope.flow.heads import run_heads

        run_heads(run, model, facts, progress=progress)
    return run.summary


def demo_section(run, model, facts: Sequence, n: int = 30, progress: bool = True) -> dict:
    """A short flow analysis for ``factscope demo``: attention knockout (subject / non-subject /
    last) and attribute extraction (attention vs MLP, last -> subject knockout) on the first ``n``
    usable ``facts`` (known facts), written as ``flow_knockout.*`` and ``flow_extraction.*`` (summary
    keys of the same names) so that they do not collide with other parts of a shared run."""
    from factscope.flow.common import usable
    from factscope.flow.extraction import run_extraction
    from factscope.flow.knockout import MAIN_SETS, run_knockout

    items, _ = usable(model, list(facts))  # the subject must not end at the last token
    facts = [t.fact for t in items][:n]
    if not facts:
        return {}
    ko = run_knockout(run, model, facts, sets=MAIN_SETS, progress=progress, batch_size=10, name="flow_knockout")
    ex = run_extraction(run, model, facts, heads=False, ko_sets=("subject",), progress=progress, batch_size=10, name="flow_extraction")
    return {"knockout": ko, "extraction": ex}
