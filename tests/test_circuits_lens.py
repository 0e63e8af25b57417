"""The logit lens (circuits/lens.py) against Hugging Face's own hidden states."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from factscope.circuits import lens as LENS
from factscope.facts import fact_subject_span, load_facts, target_ids
from factscope.models import _get

TOL = 1e-4  # logits this close to the target's may swap order between a padded batch and one prompt


def _facts(n: int):
    fs = load_facts("lre:factual/country_capital_city")
    # prompts of different token lengths, so the batch is padded
    return [fs[0], fs[3], fs[7], fs[11], fs[19]][:n]


def _direct(model, facts):
    """rank/prob at the last position and min rank over the subject, per point, computed one prompt
    at a time (no padding) from HF's output_hidden_states of a copy of the model: hidden_states[i]
    for i < L through the copy's final norm and unembedding; the last point is HF's own logits."""
    hf = copy.deepcopy(model.hf)
    norm, head = _get(hf, model.spec.final_norm), hf.get_output_embeddings()
    cap = getattr(hf.config, "final_logit_softcapping", None)
    out = []
    for f in facts:
        ids = torch.tensor([model.tokenizer(f.prompt)["input_ids"]])
        t = target_ids(model.tokenizer, f.prompt, f.target_true)[0]
        s, e = fact_subject_span(model.tokenizer, f)
        keep = list(range(s, e)) + [ids.shape[1] - 1]  # unembed only the subject and the last position
        with torch.no_grad():
            o = hf(input_ids=ids, output_hidden_states=True, use_cache=False)
            pts = [head(norm(h[0, keep])) for h in o.hidden_states[:-1]] + [o.logits[0, keep]]
        rows = []
        for lg in pts:
            lg = lg.float()
            if cap and lg is not pts[-1]:
                lg = torch.tanh(lg / cap) * cap
            lg = torch.cat([lg.new_zeros(s, lg.shape[-1]), lg])  # row j = prompt position j (j >= s)
            # the rank, and the ranks it could take if logits within TOL of the target's moved (a
            # padded batch's float noise): (exact, low, high)
            def rank(v):
                return (int((v >= v[t]).sum()) - 1, int((v > v[t] + TOL).sum()), int((v >= v[t] - TOL).sum()) - 1)

            sub = [rank(lg[j]) for j in range(s, e)]
            rows.append((rank(lg[-1]), float(lg[-1].softmax(-1)[t]), tuple(min(x[k] for x in sub) for k in range(3))))
        out.append(rows)
    return out


def _check(model, facts, batch_size):
    res = LENS.lens_facts(model, facts, batch_size=batch_size)
    ref = _direct(model, facts)
    assert res.layers == list(range(-1, model.n_layers))
    for i, rows in enumerate(ref):
        p = torch.tensor([x[1] for x in rows])
        torch.testing.assert_close(res.prob_last[i, 0], p, rtol=1e-4, atol=1e-7)
        for got, col in ((res.rank_last[i, 0], 0), (res.rank_subject[i, 0], 2)):
            r, lo, hi = (torch.tensor([x[col][k] for x in rows]) for k in range(3))
            assert ((got >= lo) & (got <= hi)).all(), (i, col, got, r)
            assert (got == r).float().mean() >= 0.9  # exact but for near-ties
    return res


def test_lens_ranks_equal_direct_computation(tiny):
    """Ranks, probabilities and subject minimum ranks of a padded batch equal the direct computation
    (catches: a missing final norm, the residual of the wrong layer, padding offsets in the subject
    columns, ties counted for the target)."""
    res = _check(tiny, _facts(5), batch_size=5)
    assert len({len(tiny.tokenizer(f.prompt)["input_ids"]) for f in res.facts}) > 1  # really padded


@pytest.mark.gemma
def test_lens_ranks_equal_direct_computation_on_gemma(gemma):
    res = _check(gemma, _facts(1), batch_size=1)  # padding is covered by the tiny families
    # the answer forms: far down at the embeddings, much higher at the output
    assert (res.rank_last[:, 0, 0] > 1000).all()
    assert (res.rank_last[:, 0, -1] < res.rank_last[:, 0, 0] / 10).all()


def test_emergence_layer_and_bootstrap():
    layers = [-1, 0, 1, 2, 3]
    assert LENS.emergence_layer([50, 5, 40, 3, 0], layers, top=10) == 2  # enters and stays from layer 2
    assert LENS.emergence_layer([5, 5, 5, 5, 5], layers, top=10) == -1
    assert LENS.emergence_layer([5, 5, 5, 5, 12], layers, top=10) is None
    x = np.arange(101, dtype=float)
    lo, hi = LENS.bootstrap(x, np.median, n_boot=2000, seed=0)
    assert lo < 50 < hi and hi - lo < 30
    assert LENS.bootstrap(np.full(9, 3.0), np.mean) == (3.0, 3.0)
