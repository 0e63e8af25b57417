"""The one resumable loop (factscope.loop.resumable) and the one run tail (publish): resuming
redoes nothing finished, says how much is done and starts the bar there, survives a torn
checkpoint line; flow knockout and the hijack runner really go through it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from factscope import loop
from factscope.facts import load_facts
from factscope.loop import publish, resumable
from factscope.runs import Checkpoint, Run


class _Bar:
    """Stands in for tqdm: records total, initial and every update."""

    made: list["_Bar"] = []

    def __init__(self, total=None, initial=0, **kw):
        self.total, self.initial, self.n, self.updates, self.closed = total, initial, initial, [], False
        _Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)
        self.n += n

    def close(self):
        self.closed = True

    @staticmethod
    def write(msg, file=None):
        print(msg, file=file)


@pytest.fixture
def bars(monkeypatch):
    _Bar.made = []
    monkeypatch.setattr(loop, "tqdm", _Bar)
    return _Bar.made


def _value(i: int) -> float:
    return i / 7 + 0.1  # not exactly representable: the checkpoint must round-trip it


class _Work:
    """A batch function that counts its calls and can be told to fail (Ctrl-C) on a given call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[int]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, idx, report):
        self.calls.append(list(idx))
        if self.fail_on_call == len(self.calls):
            raise KeyboardInterrupt
        return [{"value": _value(i), "item": i} for i in idx]


KEYS = [f"fact{i}" for i in range(12)]


def test_resume_redoes_no_finished_item_and_returns_what_an_uninterrupted_run_returns(tmp_path):
    full = resumable(KEYS, _Work(), Checkpoint(tmp_path / "full.jsonl"), batches=4)
    ck_path = tmp_path / "part.jsonl"
    first = _Work(fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        resumable(KEYS, first, Checkpoint(ck_path), batches=4)
    assert first.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert Checkpoint(ck_path).done() == set(KEYS[:8])  # each finished batch was kept at once
    again = _Work()
    out = resumable(KEYS, again, Checkpoint(ck_path), batches=4)
    assert again.calls == [[8, 9, 10, 11]]  # only the unfinished batch, once
    assert out == full and list(out) == KEYS
    assert [r["value"] for r in out.values()] == [_value(i) for i in range(12)]
    # everything done: no call at all
    none = _Work()
    assert resumable(KEYS, none, Checkpoint(ck_path), batches=4) == full and none.calls == []
    # without a checkpoint nothing is skipped and the records come back in memory
    assert {k: r["value"] for k, r in resumable(KEYS, _Work(), None, batches=5).items()} == {
        k: _value(i) for i, k in enumerate(KEYS)}


def test_resumed_run_says_how_much_is_done_and_its_bar_starts_there(tmp_path, bars, capsys):
    ck_path = tmp_path / "ck.jsonl"
    with pytest.raises(KeyboardInterrupt):
        resumable(KEYS, _Work(fail_on_call=3), Checkpoint(ck_path), batches=4, progress=True, desc="knockout")
    assert "resuming" not in capsys.readouterr().err  # a fresh run says nothing
    assert bars[-1].initial == 0 and bars[-1].updates == [4, 4] and bars[-1].closed  # closed on Ctrl-C too
    resumable(KEYS, _Work(), Checkpoint(ck_path), batches=4, progress=True, desc="knockout")
    assert "resuming: 8 of 12 facts done (knockout)" in capsys.readouterr().err
    bar = bars[-1]
    assert (bar.total, bar.initial, bar.updates, bar.n) == (12, 8, [4], 12)


def test_weighted_items_move_the_bar_within_a_batch(tmp_path, bars, capsys):
    """Hijacking's units are chunks of prompts: the bar counts prompts and moves as the batch
    function reports its progress; a resumed run starts at the prompts of the finished chunks."""
    sizes = [5, 3, 4]

    def work(idx, report):
        (i,) = idx
        for f in (0.25, 0.5, 0.5, 1.0):
            report(f)
        return [{"chunk": i}]

    ck = Checkpoint(tmp_path / "ck.jsonl")
    ck.append("c0", {"chunk": 0})
    resumable(["c0", "c1", "c2"], work, ck, sizes=sizes, progress=True, unit="prompt")
    assert "resuming: 5 of 12 prompts done" in capsys.readouterr().err
    bar = bars[-1]
    assert bar.initial == 5 and bar.n == 12
    assert bar.updates == [1, 2, 1, 1, 2]  # per report, in whole prompts, never past the chunk


def test_torn_checkpoint_line_is_dropped_and_its_item_redone(tmp_path):
    ck_path = tmp_path / "ck.jsonl"
    full = resumable(KEYS, _Work(), None, batches=4)
    resumable(KEYS[:8], _Work(), Checkpoint(ck_path), batches=4)
    with open(ck_path, "ab") as f:  # killed while writing item 8's record
        f.write(b'{"key": "fact8", "value": 1.14')
    again = _Work()
    out = resumable(KEYS, again, Checkpoint(ck_path), batches=4)
    assert again.calls == [[8, 9, 10, 11]]
    assert {k: r["value"] for k, r in out.items()} == {k: r["value"] for k, r in full.items()}
    lines = ck_path.read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(x)["key"] == k for x, k in zip(lines, KEYS))


def test_bad_keys_and_batch_functions_are_refused():
    with pytest.raises(ValueError, match="unique"):
        resumable(["a", "a"], _Work(), None)
    with pytest.raises(RuntimeError, match="returned 0 records for 2 items"):
        resumable(["a", "b"], lambda idx, report: [], None, batches=2)


def test_publish_nests_the_summary_under_the_analysis_key_whatever_its_name(tmp_path):
    run = Run.create(tmp_path / "r", {})
    for name in ("knockout", "hijack", "flow_knockout"):
        out = publish(run, name, {"n_facts": 3}, tables={name: pd.DataFrame({"a": [1]})},
                      section={"title": name.title(), "text": "x", "tables": [name]})
        assert out == {"n_facts": 3}
    assert run.summary == {"knockout": {"n_facts": 3}, "hijack": {"n_facts": 3}, "flow_knockout": {"n_facts": 3}}
    assert [s["key"] for s in run.sections] == ["knockout", "hijack", "flow_knockout"]
    assert run.load_table("hijack")["a"].tolist() == [1]


# --------------------------------------------------------------------------------------------
# the analyses go through the loop


def test_knockout_interrupted_after_one_batch_and_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    from factscope.flow import knockout as K
    from factscope.models import load_model

    model = load_model("tiny-llama")
    facts = load_facts("known_1000")[:6]
    kw = dict(sets=K.MAIN_SETS, batch_size=2, progress=False)
    K.run_knockout(Run.create(tmp_path / "a", {"x": 1}), model, facts, **kw)

    real = K.knockout_batch
    calls = []

    def counted(model, items, **k):
        calls.append([t.fact.subject for t in items])
        if fail[0] and len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, items, **k)

    monkeypatch.setattr(K, "knockout_batch", counted)
    fail = [True]
    with pytest.raises(KeyboardInterrupt):
        K.run_knockout(Run.create(tmp_path / "b", {"x": 1}), model, facts, **kw)
    assert len(Run.open(tmp_path / "b").checkpoint("knockout")) == 2  # the first batch was kept
    capsys.readouterr()
    fail[0], first = False, calls[:1]
    calls.clear()
    summ = K.run_knockout(Run.create(tmp_path / "b", {"x": 1}, resume=True), model, facts, **kw)
    assert "resuming: 2 of 6 facts done (knockout)" in capsys.readouterr().err
    assert len(calls) == 2 and not {s for c in calls for s in c} & set(first[0])  # 4 facts left, none redone
    for name in ("knockout.csv", "knockout_facts.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    s = Run.open(tmp_path / "b").summary
    assert s["knockout"] == summ and summ["n_facts"] == 6 and "n_facts" not in s  # nested, never top level


def test_hijack_bar_moves_per_batch_and_a_resumed_run_says_how_much_is_done(tmp_path, bars, capsys):
    from factscope.hijack import parse_schemes, run_benchmark
    from factscope.models import load_model

    model = load_model("tiny-gpt2")
    facts = load_facts("known_1000", limit=6, seed=0)
    schemes = parse_schemes(["generic", "reverse"])
    kw = dict(metric="first", known_only=False, batch_size=4, progress=True, figures=False, n_boot=10)
    run_benchmark(Run.create(tmp_path / "a", {}), [model], facts, schemes, 3, **kw)
    base, hij = bars[-2], bars[-1]
    assert base.total == 6 and hij.total == 2 * 6 * 3  # one chunk each (chunk size 256)
    assert len(hij.updates) > 1 and sum(hij.updates) == hij.total and hij.n == hij.total  # per batch, not per chunk
    capsys.readouterr()
    # a resumed run with every chunk done: says so and does nothing
    run_benchmark(Run.create(tmp_path / "a", {}, resume=True), [model], facts, schemes, 3, **kw)
    err = capsys.readouterr().err
    assert "resuming: 6 of 6 prompts done (hijack tiny-gpt2: base)" in err
    assert "resuming: 36 of 36 prompts done (hijack tiny-gpt2)" in err
    assert bars[-1].initial == 36 and bars[-1].updates == []


def test_band_is_the_line_and_its_interval():
    """plotting.band, the one confidence-band plot of every analysis: the line, then a band
    between y - ci and y + ci (NaN half-width: no width) or between lo and hi, in the line's colour."""
    import numpy as np

    from factscope.plotting import band, new_figure

    fig, ax = new_figure()
    ln = band(ax, [0, 1, 2], [1.0, 2.0, 3.0], [0.5, float("nan"), 1.0], color="#D55E00", marker="o")
    band(ax, [0, 1], [0.2, 0.4], lo=[0.1, 0.3], hi=[0.3, 0.6], color="#0072B2")
    assert list(ln.get_ydata()) == [1.0, 2.0, 3.0] and ln.get_marker() == "o"
    polys = ax.collections
    assert len(polys) == 2
    for poly, x, lo, hi, color in ((polys[0], [0, 1, 2], [0.5, 2.0, 2.0], [1.5, 2.0, 4.0], "#D55E00"),
                                   (polys[1], [0, 1], [0.1, 0.3], [0.3, 0.6], "#0072B2")):
        v = poly.get_paths()[0].vertices
        for xi, l, h in zip(x, lo, hi):
            ys = v[np.isclose(v[:, 0], xi), 1]
            assert np.isclose(ys.min(), l) and np.isclose(ys.max(), h)
        assert np.allclose(poly.get_facecolor()[0][:3], [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])


def test_hijack_checkpoint_of_another_run_is_one_clear_error_before_any_work(tmp_path):
    from factscope.errors import FactscopeError
    from factscope.hijack import parse_schemes, run_benchmark
    from factscope.models import load_model

    model = load_model("tiny-gpt2")
    facts = load_facts("known_1000", limit=6, seed=0)
    kw = dict(known_only=False, progress=False, figures=False, n_boot=10)
    schemes = parse_schemes(["generic"])
    run_benchmark(Run.create(tmp_path / "a", {}), [model], facts, schemes, 1, **kw)
    chunks = []
    with pytest.raises(FactscopeError, match="chunk base:0 holds other prompts"):
        run_benchmark(Run.create(tmp_path / "a", {}, resume=True), [model], facts[:5], schemes, 1,
                      on_chunk=chunks.append, **kw)
    assert chunks == []
