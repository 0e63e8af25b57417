"""The one resumable work loop and the one run tail that every analysis uses.

:func:`resumable` is the per-item loop: given the keys of the units of work (facts, or chunks of
prompts), a :class:`~factscope.runs.Checkpoint` and a batch function, it skips the keys already
in the checkpoint, groups the rest into batches, and appends each batch's records to the
checkpoint as soon as the batch finishes (so Ctrl-C or SIGTERM, which the CLI turns into
KeyboardInterrupt, loses at most the batch in flight). The batches run on the current executor
(:mod:`factscope.executors`: here, or on Ray actors); their records come back in batch order. A
resumed run says how much is done ("resuming: 8 of 12 facts done") and its progress bar starts
there.

:func:`publish` is the run tail: it writes an analysis's tables and figures, puts its summary
under the analysis key of ``summary.json`` (always nested: ``summary[name]``) and adds its report
section.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from factscope import executors

# work(indices, report) -> one record (a dict of JSON-able values) per index; ``report(f)`` may be
# called with the fraction 0..1 of the batch done so far, to move the progress bar within a batch.
Work = Callable[[list[int], Callable[[float], None]], Sequence[Mapping[str, Any]]]


def in_batches(size: int) -> Callable[[list[int]], Iterable[list[int]]]:
    """Batching of the pending items: consecutive groups of ``size`` (in item order)."""

    def group(pending: list[int]) -> Iterable[list[int]]:
        for i in range(0, len(pending), size):
            yield pending[i : i + size]

    return group


def resumable(
    keys: Sequence[Hashable],
    work: Work,
    checkpoint=None,
    *,
    batches: Callable[[list[int]], Iterable[list[int]]] | int = 1,
    sizes: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "",
    unit: str = "fact",
    on_batch: Callable[[list[Hashable]], None] | None = None,
) -> dict[Hashable, dict]:
    """Run ``work`` on every item whose key is not finished yet and return every item's record.

    ``keys[i]`` names item ``i`` (unique). ``batches`` groups the pending item indices (in item
    order) into batches: a number (consecutive groups of that size) or a function. ``work(indices,
    report)`` returns one record per index; the records are appended to ``checkpoint`` (a
    :class:`factscope.runs.Checkpoint`, or None to keep them in memory only) as each batch
    finishes, then ``on_batch(batch keys)`` is called. ``sizes[i]`` is item ``i``'s weight on the
    progress bar (default 1: the bar counts items; hijacking counts prompts per chunk), and the
    bar starts at the weight already done.

    Returns ``{key: record}`` for the items of ``keys`` that are finished. With a checkpoint these
    are its records (each with its ``"key"``) in the checkpoint's order, so a resumed run sees
    exactly what an uninterrupted one sees; without, the new records in the order computed.
    """
    keys = list(keys)
    if len(set(keys)) != len(keys):
        raise ValueError("resumable: the keys of the items must be unique")
    weight = [1] * len(keys) if sizes is None else [int(s) for s in sizes]
    if len(weight) != len(keys):
        raise ValueError(f"resumable: {len(weight)} sizes for {len(keys)} items")
    group = in_batches(batches) if isinstance(batches, int) else batches
    pending = [i for i, k in enumerate(keys) if checkpoint is None or k not in checkpoint]
    total = sum(weight)
    done = total - sum(weight[i] for i in pending)
    if done:
        units = unit if unit.endswith("s") else unit + "s"
        tqdm.write(f"resuming: {done} of {total} {units} done" + (f" ({desc})" if desc else ""), file=sys.stderr)
    new: dict[Hashable, dict] = {}
    bar = tqdm(total=total, initial=done, desc=desc or None, unit=unit, disable=not progress)
    reports: dict[tuple, Callable[[float], None]] = {}

    def report_for(idx: list[int]) -> Callable[[float], None]:
        """Moves the bar by the fraction 0..1 done of batch ``idx`` (never twice for the same part)."""
        if tuple(idx) in reports:
            return reports[tuple(idx)]
        size, moved = sum(weight[i] for i in idx), [0]

        def report(fraction: float) -> None:
            step = min(size, int(size * max(0.0, fraction))) - moved[0]
            if step > 0:
                bar.update(step)
                moved[0] += step

        return reports.setdefault(tuple(idx), report)

    try:
        for idx, records in executors.current().map(work, (list(b) for b in group(pending)), report_for):
            if len(records) != len(idx):
                raise RuntimeError(f"resumable: the batch function returned {len(records)} records for {len(idx)} items")
            for i, rec in zip(idx, records):
                if checkpoint is not None:
                    checkpoint.append(keys[i], rec)
                new[keys[i]] = dict(rec)
            report_for(idx)(1.0)
            del reports[tuple(idx)]
            if on_batch is not None:
                on_batch([keys[i] for i in idx])
    finally:
        bar.close()
    if checkpoint is None:
        return new
    wanted = set(keys)
    return {r["key"]: r for r in checkpoint.records() if r["key"] in wanted}


def publish(
    run,
    name: str,
    summary: Mapping[str, Any],
    *,
    tables: Mapping[str, Any] | None = None,
    figures: Mapping[str, Any] | None = None,
    section: Mapping[str, Any] | None = None,
) -> dict:
    """The run tail of an analysis: write ``tables`` (``{file name: DataFrame}``) and ``figures``
    (``{file name: matplotlib figure}``), merge ``summary`` into ``summary.json`` under the
    analysis key ``name`` (``summary[name]``, whatever the name), and add the report section
    ``name`` from ``section`` (the keyword arguments of :meth:`Run.add_section` but the key:
    ``title``, ``text``, ``figures``, ``tables``; None adds none). Returns ``summary``."""
    for t, df in (tables or {}).items():
        run.save_table(t, df)
    for f, fig in (figures or {}).items():
        run.save_figure(f, fig)
    run.update_summary({name: summary})
    if section is not None:
        run.add_section(name, **section)
    return dict(summary)
