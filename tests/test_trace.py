"""Causal tracing (factscope.trace): exact constructions and the batched path against a naive one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from factscope.cli import main
from factscope.facts import Fact
from factscope.trace import core
from factscope.trace.run import average_effects, trace_facts

PROMPT = "The Eiffel Tower is in the city of"
FACTS = [Fact("Eiffel Tower", "r", "r", "The {} is in the city of", PROMPT, " Paris", id="a"),
         Fact("Danube", "r", "r", "The {} flows into the", "The Danube flows into the", " sea", id="b")]


def _input(model, noise: float = 3.0, samples: int = 3, key: str = "k", seed: int = 0) -> core.TraceInput:
    ids = list(model.tokenizer(PROMPT)["input_ids"])
    s, e = 2, 4  # two subject tokens (any tokens will do on a random model) with tokens after them
    std = core.embedding_std(model, [ids[s:e]])
    return core.TraceInput(ids, (s, e), core.fact_noise(key, seed, samples, e - s, model.d_model) * (noise * std))


def test_window_and_classes():
    assert core.layer_window(0, 18, "mlp", 10) == [0, 1, 2, 3, 4]
    assert core.layer_window(9, 18, "attn", 10) == list(range(4, 14))
    assert core.layer_window(17, 18, "mlp", 10) == [12, 13, 14, 15, 16, 17]
    assert core.layer_window(7, 18, "mlp", 3) == [6, 7, 8]  # ROME: [l - w//2, l + ceil(w/2))
    assert core.layer_window(5, 18, "hidden", 10) == [5]
    c = core.position_classes(2, 5, 9)
    assert list(c.values()) == [[2], [3], [4], [5], [6, 7], [8]]
    c = core.position_classes(1, 2, 3)  # one-token subject, one token after it: both classes share a token
    assert list(c.values()) == [[1], [], [1], [2], [], [2]]


def test_zero_noise_gives_zero_effect(tiny):
    res = trace_facts(tiny, FACTS[:1], noise=0.0, samples=2, window=2, max_rows=4)["a"]
    assert res["p_corrupt"] == pytest.approx(res["p_clean"], abs=1e-6)
    for probs in res["probs"].values():
        assert np.abs(np.asarray(probs) - res["p_corrupt"]).max() < 1e-6
    noisy = trace_facts(tiny, FACTS[:1], noise=3.0, samples=2, window=2, max_rows=4)["a"]
    assert abs(noisy["p_corrupt"] - noisy["p_clean"]) > 1e-4  # the same call with noise does corrupt


def test_restoring_all_positions_gives_clean_probability(tiny):
    inp = _input(tiny, noise=5.0, samples=3)
    answer, p_clean, clean = core.clean_run(tiny, inp, ["resid_post"])
    p_low = core.restored_prob(tiny, inp, answer, "resid_post", {}, clean)
    assert abs(p_low - p_clean) > 1e-4  # the corruption does something
    for l in range(tiny.n_layers):
        p = core.restored_prob(tiny, inp, answer, "resid_post", {l: range(inp.n)}, clean)
        assert p == pytest.approx(p_clean, abs=1e-5), l
    # fast path: the last layer's hidden state at the last position alone sets the prediction
    fast = core.trace(tiny, inp, ["hidden"])["hidden"]
    assert fast.probs[-1][-1] == pytest.approx(p_clean, abs=1e-5)
    assert fast.p_corrupt == pytest.approx(p_low, abs=1e-6)


@pytest.mark.parametrize("kind", core.KINDS)
def test_batched_equals_naive(tiny, kind):
    inp = _input(tiny, noise=3.0, samples=3)
    window = 3
    fast = core.trace(tiny, inp, [kind], window=window, max_rows=7)[kind]  # 2 positions per forward: chunks
    ref = core.naive_trace(tiny, inp, kind, window=window)
    assert fast.answer_id == ref.answer_id
    assert fast.p_corrupt == pytest.approx(ref.p_corrupt, abs=1e-6)
    a, b = np.asarray(fast.probs), np.asarray(ref.probs)
    assert np.abs(a - b).max() < 2e-5
    assert np.abs(b - ref.p_corrupt).max() > 1e-3  # not a trivially flat trace


def test_noise_is_seeded_per_fact():
    a = core.fact_noise("fact-1", 0, 4, 3, 8)
    assert torch.equal(a, core.fact_noise("fact-1", 0, 4, 3, 8))
    assert not torch.equal(a, core.fact_noise("fact-1", 1, 4, 3, 8))
    assert not torch.equal(a, core.fact_noise("fact-2", 0, 4, 3, 8))
    assert a.std().item() == pytest.approx(1.0, abs=0.35)


def test_trace_facts_reproducible_and_order_free():
    from conftest import _load

    m = _load("tiny-llama")
    facts = FACTS
    kw = dict(kinds=["hidden"], samples=2, window=2, seed=7, std=0.5)
    r1 = trace_facts(m, facts, **kw)
    r2 = trace_facts(m, facts[::-1], **kw)
    assert r1["a"]["probs"] == r2["a"]["probs"] and r1["b"]["probs"] == r2["b"]["probs"]
    r3 = trace_facts(m, facts, **{**kw, "seed": 8})
    assert r3["a"]["probs"] != r1["a"]["probs"]


def test_average_follows_rome_classes():
    # two facts, 1 layer: effects equal the token index, p_corrupt 0
    rec = lambda s, e, n: {"subject_range": [s, e], "tokens": ["x"] * n, "p_corrupt": 0.0,  # noqa: E731
                           "probs": {"mlp": [[float(t)] for t in range(n)]}}
    avg = average_effects([rec(1, 4, 8), rec(1, 2, 5)], ["mlp"], 1)["mlp"][:, 0]
    # first subj (1,1); middle (2; none); last subj (3,1); first after (4,2); further (5,6; 3); last (7,4)
    assert avg.tolist() == [1.0, 2.0, 2.0, 3.0, pytest.approx(14 / 3), 5.5]


def test_cli_run_and_resume(tmp_path):
    out = tmp_path / "t"
    args = ["trace", "--model", "tiny-gemma3", "--all-facts", "--limit", "2", "--samples", "2", "--window", "2",
            "--out", str(out), "--no-progress", "--figures", "1"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())["trace"]
    assert s["n_facts"] == 2 and set(s["kinds"]) == set(core.KINDS)
    assert "peak_mlp_layer" in s and (out / "trace_average.png").is_file() and (out / "trace_fact_0.png").is_file()
    before = (out / "trace.csv").read_text()
    r = CliRunner().invoke(main, [*args, "--resume"], catch_exceptions=False)
    assert r.exit_code == 0 and (out / "trace.csv").read_text() == before
    r = CliRunner().invoke(main, [*args[:-4], "--out", str(tmp_path / "u"), "--kind", "nope"])
    assert r.exit_code == 2 and "nope" in r.output
