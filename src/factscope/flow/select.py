"""Choosing the facts a flow run analyses: a seeded random sample of the facts the model knows."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pandas as pd

from factscope.errors import FactscopeError
from factscope.facts import Fact, load_facts, seeded_subset
from factscope.flow.common import usable
from factscope.models import Model
from factscope.predict import known_facts


def select_known(
    model: Model, facts: Sequence[Fact], limit: int | None, seed: int = 0, progress: bool = True
) -> tuple[list[Fact], pd.DataFrame]:
    """Up to ``limit`` facts the model knows (top-1 = first target token) whose subject does not
    touch the last prompt token, drawn in a seeded random order; the known-filter table of the
    facts that were checked comes back too. Facts are checked in chunks, so a small limit does
    not run the whole data set."""
    order = list(range(len(facts)))
    random.Random(seed).shuffle(order)
    chosen: list[Fact] = []
    tables = []
    step = max(32, 2 * (limit or len(facts)))
    pos = 0
    while pos < len(order) and (limit is None or len(chosen) < limit):
        chunk = [facts[i] for i in order[pos : pos + step]]
        pos += step
        known, table = known_facts(model, chunk, progress=progress)
        tables.append(table)
        items, _ = usable(model, known)
        chosen += [t.fact for t in items]
    if limit is not None:
        chosen = chosen[:limit]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return chosen, table


def facts_for_run(
    run, model: Model, dataset: str, limit: int | None, seed: int = 0, progress: bool = True, known_only: bool = True,
    all_facts: list[Fact] | None = None,
) -> list[Fact]:
    """The run's facts: read back from ``facts.csv`` when resuming, else selected and saved.
    ``known_only=False`` takes a seeded sample of all facts (the analyses then follow the model's
    own top-1 token, whatever it is; useful for random test models)."""
    all_facts = load_facts(dataset) if all_facts is None else all_facts  # (the caller may have loaded them)
    prev = run.load_table("facts")
    if prev is not None and len(prev):
        by_id = {f.id or f"{f.subject}|{f.prompt}": f for f in all_facts}
        out = []
        for fid in prev["id"]:
            f = by_id.get(fid)
            if f is None:
                raise FactscopeError(f"cannot resume: fact {fid!r} of {run.dir}/facts.csv is not in {dataset}")
            out.append(f)
        return out
    if known_only:
        chosen, table = select_known(model, all_facts, limit, seed=seed, progress=progress)
    else:
        items, _ = usable(model, seeded_subset(all_facts, None if limit is None else 4 * limit, seed))
        chosen = [t.fact for t in items][:limit]
        table = pd.DataFrame({"id": [f.id for f in chosen], "known": [None] * len(chosen)})
    if not chosen:
        raise FactscopeError(f"{model.name} knows none of the checked facts of {dataset}")
    run.save_table(
        "facts",
        pd.DataFrame(
            [{"id": f.id or f"{f.subject}|{f.prompt}", "subject": f.subject, "prompt": f.prompt, "target": f.target_true} for f in chosen]
        ),
    )
    run.save_table("known_filter", table)
    n_known = int(table["known"].fillna(False).sum()) if len(table) else 0
    run.update_summary({"data": {"n_checked": len(table), "n_known": n_known}})
    return chosen
