"""A short hijacking section for ``factscope demo``."""

from __future__ import annotations

from collections.abc import Sequence

from factscope.facts import Fact
from factscope.models import Model
from factscope.runs import Run


def demo_section(run: Run, model: Model, facts: Sequence[Fact], n_facts: int = 50, max_prepends: int = 5,
                 candidates: int = 200, progress: bool = False) -> dict:
    """Generic and reverse hijacking (n = 0..``max_prepends``) on the first ``n_facts`` facts the
    model knows among the first ``candidates`` of ``facts`` (pass known facts and none is wasted);
    writes ``demo_hijack_*`` tables and figures, ``summary["demo_hijack"]`` and a report section
    into ``run``; returns {"efficacy": ..., "n_facts": ...}."""
    from factscope.hijack.runner import finish, prepare, run_model
    from factscope.hijack.schemes import builtin_scheme
    from factscope.hijack.scoring import score_ids, tokenize

    schemes = [builtin_scheme("generic"), builtin_scheme("reverse")]
    pool, _ = prepare(model, list(facts)[:candidates])
    chosen: list[Fact] = []
    step = max(n_facts, 1)
    for start in range(0, len(pool), step):  # test for known facts until there are enough
        part = pool[start : start + step]
        base = score_ids(model, tokenize(model, [p.fact.prompt for p in part]), [p.true_ids for p in part],
                         [p.false_ids for p in part])
        chosen += [p.fact for p, s in zip(part, base) if p.top1_is_true(s)]
        if len(chosen) >= n_facts:
            break
    chosen = chosen[:n_facts]
    res = run_model(run, model, chosen, schemes, max_prepends, known_only=True, progress=progress)
    out = finish(run, [res], schemes, max_prepends, metric="first", prefix="demo_hijack")
    return {"efficacy": out.summary["efficacy"], "n_facts": out.summary["n_facts"]}
