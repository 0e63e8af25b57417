"""Flow parts 2-5 on tiny models: projections equal the logit lens, W_VO equals running the head,
sublayer zeroing equals ablation, attributes rate bookkeeping, and the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from factscope import hooks
from factscope.facts import load_facts
from factscope.flow import attributes as A
from factscope.flow.common import usable
from factscope.flow.enrichment import POSITIONS, enrichment_batch, hidden_states
from factscope.flow.extraction import extraction_batch, project_rank
from factscope.flow.heads import head_ranks_batch, head_vectors
from factscope.flow.sublayer import block_windows, resid_at, sublayer_batch


@pytest.fixture(scope="module")
def facts():
    return load_facts("known_1000")[:3]


def test_last_hidden_state_projection_is_the_models_logits(tiny, facts):
    items, _ = usable(tiny, facts)
    batch = tiny.batch_from_ids([t.ids for t in items])
    with torch.inference_mode():
        hs = hidden_states(tiny, batch)
        logits = tiny.forward(batch, last_only=True)
        lens = tiny.logit_lens(hs[-1][:, -1])
    assert len(hs) == tiny.n_layers + 1
    torch.testing.assert_close(lens, logits, rtol=1e-4, atol=1e-4)


def test_extraction_events_are_logit_lens_top1(tiny, facts):
    items, _ = usable(tiny, facts)
    recs = extraction_batch(tiny, items, ko_sets=("subject",), ko_from_layer=1)
    batch = tiny.batch_from_ids([t.ids for t in items])
    with torch.inference_mode(), hooks.cache(tiny, ["attn_out", "mlp_out", "head_out"]) as c:
        top = tiny.forward(batch, last_only=True).argmax(-1)
    for i, r in enumerate(recs):
        assert r["top1_id"] == int(top[i])
        for l in range(tiny.n_layers):
            for kind, point in (("attn", "attn_out"), ("mlp", "mlp_out")):
                lg = tiny.logit_lens(c[point, l][i, -1])
                assert r[kind]["none"][l] == int(lg.argmax() == top[i])
                assert r[f"{kind}_rank"]["none"][l] == int((lg > lg[top[i]]).sum())
            for h in range(tiny.n_heads):
                assert r["heads"][l][h] == int(tiny.logit_lens(c["head_out", l][i, -1, h]).argmax() == top[i])
    # project_rank agrees with the logit lens directly
    v = torch.randn(5, tiny.d_model)
    t = torch.arange(5)
    lg = tiny.logit_lens(v)
    assert project_rank(tiny, v, t, chunk=2).tolist() == [int((lg[j] > lg[j, j]).sum()) for j in range(5)]


def test_local_extraction_without_blocking_equals_clean(tiny, facts):
    items, _ = usable(tiny, facts)
    recs = extraction_batch(tiny, items, ko_sets=("subject", "last"), heads=False)
    for r in recs:
        assert r["attn_local_rank"]["none"] == r["attn_rank"]["none"]
    # blocking in one layer only changes that layer's output: it equals a full knockout at that layer
    t = items[0]
    batch = tiny.batch_from_ids([t.ids])
    block = hooks.edge_mask(batch, [[-1]], [t.subject])
    with torch.inference_mode(), hooks.knockout(tiny, [1], block), hooks.cache(tiny, "attn_out", [1]) as c:
        tiny.forward(batch, last_only=True)
        lg = tiny.logit_lens(c["attn_out", 1][0, -1])
    top = recs[0]["top1_id"]
    assert recs[0]["attn_local_rank"]["subject"][1] == int((lg > lg[top]).sum())


def test_extraction_knockout_changes_events_only_with_blocking(tiny, facts):
    items, _ = usable(tiny, facts)
    recs = extraction_batch(tiny, items, ko_sets=("subject", "non_subject"), ko_from_layer=tiny.n_layers, heads=False)
    for r in recs:  # no layer >= n_layers: nothing blocked
        assert r["attn_rank"]["subject"] == r["attn_rank"]["none"] == r["attn_rank"]["non_subject"]
        assert all(r["ko_top1_kept"].values())


def test_wvo_projection_equals_running_the_head(tiny, facts):
    """Position 0 attends only to itself, so each head's output there is its W_VO map of that
    position's residual stream: compare head_vectors with the model's own z @ W_O (and head_out)."""
    items, _ = usable(tiny, facts[:1])
    batch = tiny.batch_from_ids([items[0].ids])
    with torch.inference_mode(), hooks.cache(tiny, ["resid_pre", "z", "head_out"]) as c:
        tiny.forward(batch, last_only=True)
        for l in range(tiny.n_layers):
            got = head_vectors(tiny, l, c["resid_pre", l][:, 0])[0]  # [H, d]
            z = c["z", l][0, 0]  # [H, hd]
            o = torch.einsum("he,hed->hd", z, tiny.W_O(l))
            want = o * tiny.post_attn_scale(l, o)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            # same direction as the head's share of attn_out (Gemma's norm factor is a positive scale)
            cos = torch.nn.functional.cosine_similarity(got, c["head_out", l][0, 0], dim=-1)
            assert torch.all(cos > 0.999)


def test_head_ranks_match_direct_projection(tiny, facts):
    items, _ = usable(tiny, facts)
    targets = [5, 17, 42]
    ranks = head_ranks_batch(tiny, items, targets, chunk=3)
    assert ranks.shape == (len(items), tiny.n_layers, tiny.n_heads)
    batch = tiny.batch_from_ids([t.ids for t in items])
    with torch.inference_mode(), hooks.cache(tiny, "resid_pre") as c:
        tiny.forward(batch, last_only=True)
    i, l = 1, tiny.n_layers - 1
    x = c["resid_pre", l][i, batch.offset[i] + items[i].subject_last]
    lg = tiny.logit_lens(head_vectors(tiny, l, x[None])[0])  # [H, V]
    assert ranks[i, l].tolist() == [int((lg[h] > lg[h, targets[i]]).sum()) for h in range(tiny.n_heads)]


def test_sublayer_zeroing_equals_ablation(tiny, facts):
    items, _ = usable(tiny, facts[:2])
    t = items[0]
    batch = tiny.batch_from_ids([t.ids[: t.subject_last + 1]])
    with torch.inference_mode(), hooks.ablate(tiny, "mlp", [0, 1]):
        want = tiny.logit_lens(resid_at(tiny, batch, 2)[:, -1])
    vocab = A.top_clean(tiny, want.float())[0]
    attrs = {t.fact.subject: set(vocab[:10])}
    r = sublayer_batch(tiny, [t], attrs, upper=2, window=2)[0]
    assert block_windows(2, 2) == [[0, 1], [1]]
    assert r["mlp"][0] == pytest.approx(A.rate(vocab, attrs[t.fact.subject]))
    # with nothing zeroed the rate comes from the clean hidden state
    with torch.inference_mode():
        clean = A.top_clean(tiny, tiny.logit_lens(resid_at(tiny, batch, 2)[:, -1]).float())[0]
    assert r["none"] == pytest.approx(A.rate(clean, attrs[t.fact.subject]))


def test_attribute_cleaning_and_rate(tiny):
    assert A.clean_token(" The") is None and A.clean_token(" ab") is None and A.clean_token(" Paris") == "paris"
    s = A.attribute_set(tiny, "Eiffel Tower", ["The Eiffel Tower is located in Paris, France."])
    assert "paris" in s or any("par" in x for x in s)
    assert "the" not in s and "tower" not in s  # stop words and the subject's own tokens are dropped
    assert A.rate(["paris", "london"], {"paris"}) == 0.5
    assert A.rate([], {"paris"}) != A.rate([], {"paris"})  # nan


def test_enrichment_rates_are_in_range(tiny, facts):
    items, _ = usable(tiny, facts)
    attrs = {t.fact.subject: {"located", "country", "city"} for t in items}
    recs = enrichment_batch(tiny, items, attrs, show_layers=[0, tiny.n_layers])
    for r in recs:
        assert set(r["rates"]) == set(POSITIONS)
        assert all(len(v) == tiny.n_layers + 1 for v in r["rates"].values())
        assert all(0.0 <= x <= 1.0 for v in r["rates"].values() for x in v if not math.isnan(x))
        assert 0.0 <= r["baseline"] <= 1.0


def test_cli_all_and_resume(tmp_path):
    from factscope.cli import main

    out = tmp_path / "flow"
    args = ["flow", "all", "--model", "tiny-llama", "--all-facts", "--limit", "3", "--out", str(out), "--no-progress", "--threads", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["n_facts"] == 3 and s["window"] == 1
    assert set(s["curves"]) >= {"subject", "non_subject", "last"}
    assert all(len(v) == 4 for v in s["curves"].values())
    for name in ("knockout", "enrichment", "sublayer", "extraction", "heads"):
        assert (out / f"{name}.png").is_file()
    before = (out / "knockout.csv").read_text()
    # resuming recomputes nothing and reproduces the tables
    res = CliRunner().invoke(main, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert (out / "knockout.csv").read_text() == before
    assert len((out / "checkpoints" / "knockout.jsonl").read_text().splitlines()) == 3
