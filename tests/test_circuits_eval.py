"""Circuits: data, metrics, evaluation, ACDC, views, interop and the CLI (the EVAL half of issue 11)."""

from __future__ import annotations

import functools

import pytest
import torch

from factscope.facts import load_facts


@functools.lru_cache(maxsize=None)
def _model(name="tiny-llama"):
    from factscope.models import load_model

    return load_model(name)


@functools.lru_cache(maxsize=None)
def _data(name="tiny-llama", n=24, seed=0):
    from factscope.circuits import data

    facts = load_facts("lre:factual/country_capital_city")[:n]
    return data.build(_model(name), facts, seed=seed)


def _unpadded_logprobs(model, ids):
    with torch.no_grad():
        out = model.hf(input_ids=torch.tensor([ids]))
    return torch.log_softmax(out.logits[0].float(), -1)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete():
    from factscope.circuits.data import split

    facts = load_facts("lre:factual/country_capital_city")[:20]
    v1, t1 = split(facts, 0.5, seed=3)
    v2, t2 = split(facts, 0.5, seed=3)
    v3, _ = split(facts, 0.5, seed=4)
    assert [f.id for f in v1] == [f.id for f in v2] and [f.id for f in t1] == [f.id for f in t2]
    assert {f.id for f in v1} != {f.id for f in v3}
    assert not {f.id for f in v1} & {f.id for f in t1}
    assert len(v1) == 10 and len(v1) + len(t1) == len(facts)


def test_counterfactual_partners_match_length_and_differ_in_answer():
    m = _model()
    d = _data()
    tok = m.tokenizer
    assert len(d) + len(d.dropped) == 24 and len(d) >= 10
    for i, (f, g) in enumerate(zip(d.facts, d.partners)):
        assert f.relation_id == g.relation_id and f.id != g.id
        p, q = tok(f.prompt)["input_ids"], tok(g.prompt)["input_ids"]
        assert len(p) == len(q)
        assert d.answers[i][0] != d.cf_first[i]
        # clean = prompt + answer[:-1]; corrupted = partner prompt + the same answer tokens
        n = d.clean.lengths[i]
        assert d.clean.lengths[i] == d.corrupted.lengths[i] == len(p) + len(d.answers[i]) - 1
        assert d.clean.input_ids[i, -n:].tolist() == p + d.answers[i][:-1]
        assert d.corrupted.input_ids[i, -n:].tolist() == q + d.answers[i][:-1]
    # seeded
    from factscope.circuits import data

    again = data.build(m, load_facts("lre:factual/country_capital_city")[:24], seed=0)
    assert [g.id for g in again.partners] == [g.id for g in d.partners]


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _padded_logits(model, batch, positions):
    with torch.no_grad():
        full = model.forward(batch, last_only=False).float()
    return full[torch.arange(len(batch))[:, None], positions]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_target_nll_is_mean_over_answer_tokens_only(name):
    from factscope.circuits.metrics import target_nll

    m = _model(name)
    d = _data(name)
    assert len({len(a) for a in d.answers}) > 1, "need answers of different lengths (padding)"
    met = target_nll(m, d.clean, d.answers)
    vals = met.values(_padded_logits(m, d.clean, met.positions))
    for i, f in enumerate(d.facts):
        ids = m.tokenizer(f.prompt)["input_ids"]
        lp = _unpadded_logprobs(m, ids + d.answers[i])
        n = len(ids)
        want = -torch.stack([lp[n - 1 + j, a] for j, a in enumerate(d.answers[i])]).mean()
        assert vals[i].item() == pytest.approx(want.item(), abs=1e-4)
    # rows: copies of examples give their example's value
    rows = torch.tensor([2, 2, 0])
    lg = _padded_logits(m, d.clean, met.positions)[rows]
    assert torch.allclose(met.values(lg, rows), vals[rows], atol=1e-6)
    assert met.higher_is_better is False


def test_logit_diff_and_kl_against_direct_computation():
    from factscope.circuits.metrics import kl_to_clean, logit_diff

    m = _model()
    d = _data()
    ld = logit_diff(m, d.clean, d.answers, d.cf_first)
    assert ld.positions.shape == (len(d), 1)
    vals = ld.values(_padded_logits(m, d.clean, ld.positions))
    for i, f in enumerate(d.facts):
        ids = m.tokenizer(f.prompt)["input_ids"]
        with torch.no_grad():
            lg = m.hf(input_ids=torch.tensor([ids])).logits[0, -1].float()
        assert vals[i].item() == pytest.approx((lg[d.answers[i][0]] - lg[d.cf_first[i]]).item(), abs=1e-4)

    kl = kl_to_clean(m, d.clean, d.answers)
    clean = _padded_logits(m, d.clean, kl.positions)
    assert kl.values(clean).abs().max().item() < 1e-5
    other = clean + torch.randn_like(clean)
    got = kl.values(other)
    for i in range(len(d)):
        n = len(d.answers[i])
        p = torch.log_softmax(clean[i, :n], -1)
        q = torch.log_softmax(other[i, :n], -1)
        want = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()
        assert got[i].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
