"""A short hijacking section for ``factscope demo``."""

from __future__ import annotations

from collections.abc import Sequence

from factscope.facts import Fact
from factscope.models import Model
from factscope.runs import Run


def demo_section(run: Run, model: Model, facts: Sequence[Fact], n_facts: int = 50, max_prepends: int = 5,
                 candidates: int = 150, progress: bool = False) -> dict:
    """Generic and reverse hijacking (n = 0..``max_prepends``) on up to ``n_facts`` facts the model
    knows, taken from the first ``candidates`` facts; writes ``demo_hijack_*`` tables and figures
    and a report section into ``run``; returns the summary (efficacy, n_facts)."""
    from factscope.hijack.runner import finish, prepare, run_model
    from factscope.hijack.schemes import builtin_scheme
    from factscope.hijack.scoring import score_ids, tokenize

    schemes = [builtin_scheme("generic"), builtin_scheme("reverse")]
    pool, _ = prepare(model, list(facts)[:candidates])
    # known facts first (one cheap pass), then the benchmark on the first n_facts of them
    base = score_ids(model, tokenize(model, [p.fact.prompt for p in pool]),
                     [p.true_ids for p in pool], [p.false_ids for p in pool])
    chosen = [p.fact for p, s in zip(pool, base) if s.top1 == p.true_ids[0]][:n_facts]
    res = run_model(run, model, chosen, schemes, max_prepends, known_only=True, progress=progress)
    out = finish(run, [res], schemes, max_prepends, metric="first", prefix="demo_hijack")
    return {"efficacy": out.summary["efficacy"], "n_facts": out.summary["n_facts"]}
