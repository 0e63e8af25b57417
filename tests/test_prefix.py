"""Shared prefixes: ``Model.prefill`` / ``forward_from`` / ``extend`` / ``Prefix.take`` against
full forwards of the joined prompts, and context hijacking with shared prefixes against the
full-prompt path."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from factscope.errors import FactscopeError
from factscope.facts import load_facts
from factscope.hijack import parse_schemes, run_model, score_ids, tokenize
from factscope.hijack.runner import shared_prompts
from factscope.hijack.schemes import build_prompt, custom_scheme
from factscope.hijack import scoring
from factscope.hijack.scoring import score_shared
from factscope.models import Prefix
from factscope.runs import Run

TEXTS = [
    "Do not think of Guam. Do not think of Guam. Do not think of Guam. The Eiffel Tower is located in the city of",
    "Do not think of Japan. Toyota is headquartered in the country of",
    "Danielle Darrieux speaks the language",
]
SUFFIX_LEN = [7, 5, 2]  # different prefix and suffix lengths: padding on the left and in the middle


@functools.lru_cache(maxsize=None)
def _load(name):
    from factscope.models import load_model

    return load_model(name)


@pytest.fixture
def model(any_model):
    """Each tiny family, Gemma 3 270M and SmolLM2-135M."""
    return any_model


def _ids(model, texts):
    return [model.tokenizer(t)["input_ids"] for t in texts]


def _logp(x):
    return torch.log_softmax(x.float(), -1)


def _full(model, seqs):
    with torch.inference_mode():
        return model.forward(model.batch_from_ids(seqs), last_only=False)


def test_prefix_then_suffix_equals_the_full_prompt(model):
    """Every suffix position's log-probs equal the full prompt's, in a padded batch whose rows have
    different prefix and suffix lengths (so the suffix columns of short rows sit after padding
    that follows their prefix). tiny-gemma3's sliding window is 4 tokens and the prefixes are
    much longer, so a mask that counted columns instead of positions, or ignored the window,
    fails here."""
    ids = _ids(model, TEXTS)
    cut = [len(x) - k for x, k in zip(ids, SUFFIX_LEN)]
    windows = {model.attn_window(l) for l in range(model.n_layers)}
    if model.name == "tiny-gemma3":
        assert windows == {4, None} and min(cut) > 4
    ref = _full(model, ids)
    with torch.inference_mode():
        prefix = model.prefill(model.batch_from_ids([x[:c] for x, c in zip(ids, cut)]), logits=True)
        suffix = model.batch_from_ids([x[c:] for x, c in zip(ids, cut)])
        last = model.forward_from(prefix, suffix, last_only=True)
        every = model.forward_from(prefix, suffix, last_only=False)
    assert isinstance(prefix, Prefix) and prefix.lengths == cut and len(prefix) == 3
    assert prefix.keys.shape == (model.n_layers, 3, model.n_kv_heads, max(cut), model.head_dim)
    assert (_logp(last) - _logp(ref[:, -1])).abs().max().item() <= 1e-4
    for i, k in enumerate(SUFFIX_LEN):
        assert (_logp(every[i, -k:]) - _logp(ref[i, -k:])).abs().max().item() <= 1e-4
    # the prefill's own last-position logits are the prefix prompts' logits
    pre_ref = _full(model, [x[:c] for x, c in zip(ids, cut)])[:, -1]
    assert (_logp(prefix.logits) - _logp(pre_ref)).abs().max().item() <= 1e-4


def test_take_scores_against_the_first_tokens_of_a_longer_prefix(model):
    """Rows picked, repeated and cut to their first m tokens (m = 1, a middle cut, all) give the
    logits of the short prompt + suffix run whole."""
    ids = _ids(model, TEXTS[:2])
    ctx = [x[:-5] for x in ids]
    tails = [ids[0][-5:], ids[1][-3:], ids[0][-2:], ids[1][-5:]]
    rows, lengths = [1, 0, 0, 1], [len(ctx[1]), 1, len(ctx[0]) // 2, 6]
    with torch.inference_mode():
        prefix = model.prefill(model.batch_from_ids(ctx))
        sub = prefix.take(rows, lengths)
        got = model.forward_from(sub, model.batch_from_ids(tails))
        # a taken prefix keeps its tokens in their columns (not left-padded): extending it works too
        ext = model.extend(sub, model.batch_from_ids([t[:-1] for t in tails]))
        got_ext = model.forward_from(ext, model.batch_from_ids([t[-1:] for t in tails]))
    assert sub.lengths == lengths and len(sub) == 4
    want = _full(model, [ctx[r][:m] + t for r, m, t in zip(rows, lengths, tails)])[:, -1]
    assert (_logp(got) - _logp(want)).abs().max().item() <= 1e-4
    assert (_logp(got_ext) - _logp(want)).abs().max().item() <= 1e-4


def test_prefill_without_logits_stops_after_the_last_keys_and_values(tiny):
    """Without logits nothing after the last layer's keys/values runs (its MLP never fires), and
    the keys/values are those of the full forward."""
    from factscope import hooks

    batch = tiny.batch_from_ids(_ids(tiny, TEXTS))
    last = tiny.n_layers - 1
    with torch.inference_mode():
        with hooks.cache(tiny, "mlp_out", [last]) as full_c:
            full = tiny.prefill(batch, logits=True)
        with hooks.cache(tiny, "mlp_out", [last]) as c:
            cut = tiny.prefill(batch)
    assert ("mlp_out", last) in full_c and ("mlp_out", last) not in c
    assert torch.equal(cut.keys, full.keys) and torch.equal(cut.values, full.values) and cut.logits is None
    assert not any(tiny.attn(l)._fs_halt for l in range(tiny.n_layers))


def test_extend_equals_prefilling_the_joined_prompt(tiny):
    ids = _ids(tiny, TEXTS)
    a = [x[: len(x) - k - 3] for x, k in zip(ids, SUFFIX_LEN)]
    b = [x[len(x) - k - 3 : len(x) - k] for x, k in zip(ids, SUFFIX_LEN)]
    ab = [x + y for x, y in zip(a, b)]
    with torch.inference_mode():
        ext = tiny.extend(tiny.prefill(tiny.batch_from_ids(a)), tiny.batch_from_ids(b))
        whole = tiny.prefill(tiny.batch_from_ids(ab), logits=True)
        got = tiny.forward_from(ext, tiny.batch_from_ids([x[len(y):] for x, y in zip(ids, ab)]))
    assert ext.lengths == whole.lengths == [len(x) for x in ab]
    for i, n in enumerate(ext.lengths):  # real columns only (pad columns hold junk)
        assert (ext.keys[:, i, :, -n:] - whole.keys[:, i, :, -n:]).abs().max().item() <= 1e-4
        assert (ext.values[:, i, :, -n:] - whole.values[:, i, :, -n:]).abs().max().item() <= 1e-4
    assert (_logp(ext.logits) - _logp(whole.logits)).abs().max().item() <= 1e-4
    assert (_logp(got) - _logp(_full(tiny, ids)[:, -1])).abs().max().item() <= 1e-4


def test_hooks_inside_forward_from_see_the_suffix_columns(tiny):
    """Cached points are the full prompt's activations at the suffix tokens, and an edit at a
    suffix position acts as in the full prompt (the knockout fast path relies on both)."""
    from factscope import hooks

    ids = _ids(tiny, TEXTS)
    cut = [len(x) - k for x, k in zip(ids, SUFFIX_LEN)]
    full = tiny.batch_from_ids(ids)
    suffix = tiny.batch_from_ids([x[c:] for x, c in zip(ids, cut)])
    l = tiny.n_layers // 2
    with torch.inference_mode():
        prefix = tiny.prefill(tiny.batch_from_ids([x[:c] for x, c in zip(ids, cut)]))
        with hooks.cache(tiny, ["resid_pre", "mlp_out"], [l]) as a:
            tiny.forward(full, last_only=True)
        with hooks.cache(tiny, ["resid_pre", "mlp_out"], [l]) as b:
            tiny.forward_from(prefix, suffix)
        S = suffix.input_ids.shape[1]
        for i, k in enumerate(SUFFIX_LEN):
            for point in ("resid_pre", "mlp_out"):
                assert (a[point, l][i, -k:] - b[point, l][i, S - k :]).abs().max().item() <= 1e-4
        with hooks.ablate(tiny, "mlp", l, positions=[[full.input_ids.shape[1] - 1]] * 3):
            want = tiny.forward(full)
        with hooks.ablate(tiny, "mlp", l, positions=[[S - 1]] * 3):
            got = tiny.forward_from(prefix, suffix)
    assert (_logp(got) - _logp(want)).abs().max().item() <= 1e-4
    assert (_logp(got) - _logp(tiny.forward_from(prefix, suffix))).abs().max().item() > 1e-3


def test_prefix_errors_name_the_problem():
    m = _load("tiny-llama")
    ids = _ids(m, TEXTS[:2])
    with torch.inference_mode():
        prefix = m.prefill(m.batch_from_ids(ids))
        one = m.batch_from_ids([[5]])
        with pytest.raises(FactscopeError, match="2 rows but the suffix batch has 1"):
            m.forward_from(prefix, one)
        with pytest.raises(FactscopeError, match="out of range"):
            prefix.take([2])
        with pytest.raises(FactscopeError, match="tokens asked of prefix row 0"):
            prefix.take([0], [len(ids[0]) + 1])
        with pytest.raises(FactscopeError, match="Prefix"):
            m.forward_from(m.batch_from_ids(ids), one)
    # nothing is left installed after an error
    assert all(m.attn(l)._fs_prefix is None and m.attn(l)._fs_kv is None for l in range(m.n_layers))


# --------------------------------------------------------------------------------------------
# hijacking with shared prefixes


@pytest.mark.parametrize("unembed_rows", [128, 3])
def test_score_shared_equals_score_ids_on_the_joined_prompts(tiny, unembed_rows, monkeypatch):
    """Contexts cut at several lengths (m = 0 runs the suffix whole), multi-token targets with
    teacher forcing, one batch smaller than the prompts of one context; with 3 rows per
    vocabulary pass the query batches of 2 are unembedded in groups of 4 and a last smaller group."""
    monkeypatch.setattr(scoring, "UNEMBED_ROWS", unembed_rows)
    ctx = _ids(tiny, ["Do not think of Guam. Do not think of Guam. Do not think of Guam.", "Toyota is"])
    q = _ids(tiny, ["The Eiffel Tower is located in"])[0][-4:]
    prompts = [(0, len(ctx[0]), q), (0, 5, q), (1, 2, q[:2]), (1, 0, ctx[1] + q), (0, len(ctx[0]), q[:1]),
               (0, 7, q[:2]), (1, 1, q[:3])]
    t, f = [[11, 12, 13]] * len(prompts), [[21, 22]] * len(prompts)
    for metric in ("first", "full", "full-sum"):
        seen = []
        got = score_shared(tiny, ctx, prompts, t, f, metric=metric, batch_size=2, on_progress=seen.append)
        assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) >= 4  # per batch of 2
        want = score_ids(tiny, [ctx[c][:m] + list(s) for c, m, s in prompts], t, f, metric=metric)
        for a, b in zip(got, want):
            assert a.lp_true == pytest.approx(b.lp_true, abs=1e-4) and a.lp_false == pytest.approx(b.lp_false, abs=1e-4)
            assert a.top1 == b.top1


def test_score_shared_prefills_identical_contexts_once(tiny, monkeypatch):
    """Contexts given twice (as facts sharing a false target give them) are prefilled once, and the
    prompts still read their own context: a wrong context index changes the scores (the two
    contexts differ), so equality with score_ids on the joined prompts checks the mapping."""
    a, b = _ids(tiny, ["Do not think of Guam. Do not think of Guam.", "Do not think of Rome. Do not think of Rome."])
    q = _ids(tiny, ["The Eiffel Tower is located in"])[0][-4:]
    ctx = [a, b, list(a), b, list(a)]
    prompts = [(0, len(a), q), (1, len(b), q), (2, 5, q), (3, 4, q[:2]), (4, len(a), q[:3]), (2, len(a), q)]
    t, f = [[11]] * len(prompts), [[21]] * len(prompts)
    rows = []
    real = tiny.prefill
    monkeypatch.setattr(tiny, "prefill", lambda batch, **kw: rows.append(len(batch)) or real(batch, **kw))
    got = score_shared(tiny, ctx, prompts, t, f, batch_size=8)
    assert sum(rows) == 2  # two distinct contexts, not five
    want = score_ids(tiny, [ctx[c][:m] + list(s) for c, m, s in prompts], t, f)
    for x, y in zip(got, want):
        assert x.lp_true == pytest.approx(y.lp_true, abs=1e-4) and x.lp_false == pytest.approx(y.lp_false, abs=1e-4)
        assert x.top1 == y.top1
    assert got[0].lp_true != pytest.approx(got[1].lp_true, abs=1e-3)  # the contexts do differ


def _compare_runs(tmp_path, model, facts, schemes, n, **kw):
    kw = dict(known_only=False, progress=False, **kw)
    a = run_model(Run.create(tmp_path / "full", {}), model, facts, schemes, n, shared_prefix=False, **kw)
    b = run_model(Run.create(tmp_path / "shared", {}), model, facts, schemes, n, **kw)
    ra, rb = a.results, b.results
    assert len(ra) == len(rb) > 0
    assert (ra[["scheme", "n", "fact_id"]].values == rb[["scheme", "n", "fact_id"]].values).all()
    assert (ra["lp_true"] - rb["lp_true"]).abs().max() <= 1e-4
    assert (ra["lp_false"] - rb["lp_false"]).abs().max() <= 1e-4
    assert ((ra["lp_false"] > ra["lp_true"]) == (rb["lp_false"] > rb["lp_true"])).all()
    assert (ra["top1"] == rb["top1"]).all() and (ra["top1_is_true"] == rb["top1_is_true"]).all()
    return a, b


@pytest.mark.parametrize("metric", ["first", "full"])
def test_shared_prefix_runner_equals_the_full_prompt_runner(tiny, tmp_path, metric, monkeypatch):
    """Chunks of 5 prompts split the (scheme, fact) groups of 3, batches of 4; the shared path
    really runs suffixes against prefixes (no prompt falls back on the tiny tokenizers)."""
    calls = []
    orig = type(tiny).forward_from
    monkeypatch.setattr(type(tiny), "forward_from", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    facts = load_facts("known_1000", limit=5, seed=1)
    _, b = _compare_runs(tmp_path, tiny, facts, parse_schemes(["generic", "reverse", "relation"]), 3,
                         metric=metric, chunk_size=5, batch_size=4)
    assert calls and b.counts["unshared_prompts"] == {"generic": 0, "reverse": 0, "relation": 0}


@pytest.mark.gemma
def test_gemma_shared_prefix_equals_full_prompts_and_counts_unsplittable_prompts(gemma, tmp_path):
    """Gemma's tokenizer merges the double space after a sentence ending in a space ("▁▁"), so
    that custom scheme's prompts do not split at the context and are scored whole (counted)."""
    m = SimpleNamespace(tokenizer=gemma.tokenizer)
    prompt = "The Eiffel Tower is located in the city of"
    ctx, parts = shared_prompts(m, "Do not think of Guam.", prompt, 3)
    full = tokenize(gemma, [build_prompt("Do not think of Guam.", prompt, n) for n in (1, 2, 3)])
    assert [mm for mm, _ in parts] == [7, 13, 19] and ctx == full[2][:19]
    assert all(ctx[:mm] + s == f for (mm, s), f in zip(parts, full))
    _, parts = shared_prompts(m, "Do not think of Guam. ", prompt, 3)
    assert all(mm == 0 for mm, _ in parts)
    facts = load_facts("known_1000", limit=2, seed=0)
    schemes = parse_schemes(["generic", "reverse"]) + [custom_scheme("spaced=Do not think of {target}. ")]
    _, b = _compare_runs(tmp_path, gemma, facts, schemes, 2, batch_size=8)
    assert b.counts["unshared_prompts"] == {"generic": 0, "reverse": 0, "spaced": 4}
