"""Attention knockout (factscope.flow.knockout): fast path == naive reference; empty knockouts
change nothing; the paper's critical points on Gemma 3 270M."""

from __future__ import annotations

import pytest

from factscope.facts import load_facts
from factscope.flow.common import fact_tokens, usable
from factscope.flow.knockout import (
    SETS,
    critical_points,
    curves,
    knockout_batch,
    naive_knockout,
    windows,
)


@pytest.fixture(scope="module")
def facts():
    return load_facts("known_1000")[:4]


@pytest.mark.gemma
@pytest.mark.parametrize(
    "name, want",
    [
        # <bos> In | Marshall Islands | , the language spoken is a mixture | of
        ("gemma-3-270m", {"subject": [2, 3], "non_subject": [1, 4, 5, 6, 7, 8, 9, 10], "last": [11], "subject_first": [2],
                          "subject_last": [3], "non_subject_bos": [0, 1, 4, 5, 6, 7, 8, 9, 10], "bos": [0]}),
        # In | Marshall Islands | , the language spoken is a mixture | of   (no BOS)
        ("smollm2-135m", {"subject": [1, 2], "non_subject": [0, 3, 4, 5, 6, 7, 8, 9], "last": [10], "subject_first": [1],
                          "subject_last": [2], "non_subject_bos": [0, 3, 4, 5, 6, 7, 8, 9], "bos": []}),
    ],
)
def test_position_sets_exact(name, want):
    """Exact token indices of every position set for one fact whose subject sits mid-prompt, on a
    tokenizer that prepends BOS (Gemma) and one that does not (SmolLM2)."""
    from types import SimpleNamespace

    from factscope.flow.knockout import set_positions
    from factscope.models import load_tokenizer

    fact = load_facts("known_1000")[7]
    assert fact.prompt == "In Marshall Islands, the language spoken is a mixture of"
    t = fact_tokens(SimpleNamespace(tokenizer=load_tokenizer(name)), fact)
    assert {s: set_positions(t, s) for s in want} == want


def test_windows_clip_at_edges():
    w = windows(18, 4)
    assert w[0] == [0, 1] and w[1] == [0, 1, 2] and w[9] == [7, 8, 9, 10] and w[17] == [15, 16, 17]
    assert windows(48, 9)[20] == list(range(16, 25))
    assert windows(5, 1) == [[0], [1], [2], [3], [4]]


@pytest.mark.parametrize("from_positions", [(-1,), (-1, -2)])
def test_fast_equals_naive(tiny, facts, from_positions):
    items, _ = usable(tiny, facts)
    assert len({t.n for t in items}) > 1  # the batch is padded
    fast = knockout_batch(tiny, items, window=2, from_positions=from_positions)
    worst = 0.0
    for t, r in zip(items, fast):
        ref = naive_knockout(tiny, t, window=2, from_positions=from_positions)
        assert r["top1_id"] == ref["top1_id"]
        assert r["p"] == pytest.approx(ref["p"], abs=1e-6)
        for s in SETS:
            worst = max(worst, max(abs(a - b) for a, b in zip(r["prob"][s], ref["prob"][s])))
    assert worst < 1e-5
    # something was actually knocked out
    assert any(abs(c) > 1.0 for r in fast for c in r["change"]["subject"])


def test_heads_restriction_matches_naive(tiny, facts):
    items, _ = usable(tiny, facts[:3])
    fast = knockout_batch(tiny, items, window=2, heads=[1], sets=("subject", "non_subject"))
    for t, r in zip(items, fast):
        ref = naive_knockout(tiny, t, window=2, heads=[1], sets=("subject", "non_subject"))
        for s in ("subject", "non_subject"):
            assert max(abs(a - b) for a, b in zip(r["prob"][s], ref["prob"][s])) < 1e-5


def test_blocking_nothing_changes_nothing(tiny, facts):
    items, _ = usable(tiny, facts[:3])
    r = knockout_batch(tiny, items, window=3, heads=[], sets=("subject", "last"))  # no head blocked
    for rec in r:
        for s in ("subject", "last"):
            assert all(abs(c) < 1e-3 for c in rec["change"][s])  # % change; float noise only
    if not any(t.bos for t in items):  # no BOS: the 'bos' set is empty
        r = knockout_batch(tiny, items, window=3, sets=("bos",))
        assert all(abs(c) < 1e-3 for rec in r for c in rec["change"]["bos"])


def test_curves_and_critical_points():
    recs = [
        {"layers": [0, 1, 2], "change": {"subject": [0.0, -50.0, -10.0], "non_subject": [-40.0, 0.0, 0.0]}},
        {"layers": [0, 1, 2], "change": {"subject": [0.0, -30.0, -10.0], "non_subject": [-20.0, 0.0, 0.0]}},
    ]
    df = curves(recs)
    c = critical_points(df)
    assert c["subject"] == {"min_change": -40.0, "layer": 1}
    assert c["non_subject"] == {"min_change": -30.0, "layer": 0}
    row = df[(df["set"] == "subject") & (df["layer"] == 1)].iloc[0]
    assert row["n"] == 2 and row["ci95"] == pytest.approx(1.96 * (200**0.5) / 2**0.5)


def test_gemma_critical_points(gemma):
    """The paper's two critical points on 40 known facts: last->subject blocking drops the
    prediction by >= 30% in some window, and non-subject edges matter no later than subject ones."""
    from factscope.flow.select import select_known

    chosen, _ = select_known(gemma, load_facts("known_1000"), 40, seed=1, progress=False)
    assert len(chosen) == 40
    items, _ = usable(gemma, chosen)
    recs = []
    for i in range(0, len(items), 20):
        recs += knockout_batch(gemma, items[i : i + 20], sets=("subject", "non_subject"))
    c = critical_points(curves(recs))
    assert c["subject"]["min_change"] <= -30, c
    assert c["non_subject"]["layer"] <= c["subject"]["layer"], c
