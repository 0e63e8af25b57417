"""Flow parts 2-5 on tiny models: projections equal the logit lens, W_VO equals running the head,
sublayer zeroing equals ablation, attributes rate bookkeeping, and the CLI end to end."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from click.testing import CliRunner

from factscope import hooks
from factscope.facts import load_facts
from factscope.flow import attributes as A
from factscope.flow.common import usable
from factscope.flow.enrichment import chance_sets, enrichment_batch, hidden_states
from factscope.flow.extraction import extraction_batch, project_rank
from factscope.flow.heads import head_ranks_batch, head_vectors
from factscope.flow.sublayer import ablations, block_windows, sublayer_batch


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


def test_extraction_blocked_equals_hand_built_knockout(tiny, facts):
    """A blocked case against a hand-built knockout: last -> subject edges (from the subject span)
    blocked in layers >= 1 of each prompt alone, sublayer outputs read from a cache and projected with
    the logit lens; ranks of the clean top-1 token, and whether the prediction survives."""
    from factscope.facts import fact_subject_span

    items, _ = usable(tiny, facts)
    recs = extraction_batch(tiny, items, ko_sets=("subject", "non_subject"), ko_from_layer=1, heads=False, local=False)
    L = tiny.n_layers
    changed = 0
    for t, r in zip(items, recs):
        ids = list(tiny.tokenizer(t.fact.prompt)["input_ids"])
        s0, e0 = fact_subject_span(tiny.tokenizer, t.fact)
        batch = tiny.batch_from_ids([ids])
        block = torch.zeros(1, len(ids), len(ids), dtype=torch.bool)
        block[0, len(ids) - 1, s0:e0] = True
        with torch.inference_mode():
            top = tiny.forward(batch).argmax(-1)[0]
            with hooks.knockout(tiny, range(1, L), block), hooks.cache(tiny, ["attn_out", "mlp_out"]) as c:
                ko_top = tiny.forward(batch).argmax(-1)[0]
        assert r["top1_id"] == int(top)
        assert r["ko_top1_kept"]["subject"] == bool(ko_top == top)
        for kind, point in (("attn", "attn_out"), ("mlp", "mlp_out")):
            lg = tiny.logit_lens(torch.stack([c[point, l][0, -1] for l in range(L)]))
            want = [int((lg[l] > lg[l, top]).sum()) for l in range(L)]
            assert r[f"{kind}_rank"]["subject"] == want
            assert r[kind]["subject"] == [int(w == 0) for w in want]
        changed += r["attn_rank"]["subject"] != r["attn_rank"]["none"]
    assert changed  # the knockout took effect
    # blocking above the last layer blocks nothing
    for r in extraction_batch(tiny, items, ko_sets=("subject",), ko_from_layer=L, heads=False, local=False):
        assert r["attn_rank"]["subject"] == r["attn_rank"]["none"] and r["ko_top1_kept"]["subject"]


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


@pytest.mark.parametrize("how", ["paper", "zero"])
def test_sublayer_every_window_equals_ablate_and_a_cached_read(tiny, facts, how):
    """Every configuration (no ablation, each MLP window, each attention window) of a padded batch
    against hooks.ablate on the prompt alone plus the cached resid_post of block U (a full forward).
    For each configuration, an attribute set only it reaches (tokens of its own top 50 that no
    other configuration has) must give a positive rate there and zero everywhere else."""
    items, _ = usable(tiny, facts[:2])
    U, k = 3, 2
    abl = ablations(how)
    assert block_windows(U, k) == [[0, 1], [1, 2], [2]]
    configs = [("none", [])] + [(kind, w) for kind in ("mlp", "attn") for w in block_windows(U, k)]
    for f, t in enumerate(items):
        seq = t.ids[: t.subject_last + 1]
        batch = tiny.batch_from_ids([seq])
        logits = []
        for kind, w in configs:
            with torch.inference_mode(), contextlib.ExitStack() as st:
                if kind != "none":
                    st.enter_context(hooks.ablate(tiny, kind, w, how=abl[kind]))
                c = st.enter_context(hooks.cache(tiny, "resid_post", [U]))
                tiny.forward(batch)
                logits.append(tiny.logit_lens(c["resid_post", U][0, -1]).float())
        toks = A.top_clean(tiny, torch.stack(logits))
        # every window: rate and mass against a set from the clean top tokens
        some = set(toks[0][:25])
        r = sublayer_batch(tiny, items, {x.fact.subject: some for x in items}, upper=U, window=k, how=how)[f]
        assert [r["none"], *r["mlp"], *r["attn"]] == pytest.approx([A.rate(x, some) for x in toks], abs=1e-9)
        ids = A.attribute_ids(tiny, some)
        mass = [r["mass"]["none"], *r["mass"]["mlp"], *r["mass"]["attn"]]
        assert mass == pytest.approx([A.mass(lg, ids) for lg in logits], rel=1e-4, abs=1e-7)
        assert len({round(m, 6) for m in mass}) > len(configs) // 2  # the configurations differ
        # sets only one configuration reaches
        hits = 0
        for j in range(len(configs)):
            only = set(toks[j]) - set().union(*(toks[i] for i in range(len(configs)) if i != j))
            if not only:
                continue
            hits += 1
            attrs = {x.fact.subject: set() for x in items} | {t.fact.subject: only}
            r = sublayer_batch(tiny, items, attrs, upper=U, window=k, how=how)[f]
            got = [r["none"], *r["mlp"], *r["attn"]]
            want = [A.rate(toks[i], only) for i in range(len(configs))]
            assert got == pytest.approx(want, abs=1e-9)
            assert got[j] > 0 and sum(got) == got[j]
            ids = A.attribute_ids(tiny, only)
            mass = [r["mass"]["none"], *r["mass"]["mlp"], *r["mass"]["attn"]]
            assert mass == pytest.approx([A.mass(lg, ids) for lg in logits], rel=1e-4, abs=1e-7)
        assert hits >= 3


def test_sublayer_paper_ablation_is_not_zeroing(tiny, facts):
    """how="paper" (uniform attention) and how="zero" (zeroed attention output) differ."""
    items, _ = usable(tiny, facts[:1])
    attrs = {items[0].fact.subject: {"located"}}
    p = sublayer_batch(tiny, items, attrs, upper=3, window=2, how="paper")[0]["mass"]["attn"]
    z = sublayer_batch(tiny, items, attrs, upper=3, window=2, how="zero")[0]["mass"]["attn"]
    assert max(abs(a - b) for a, b in zip(p, z)) > 1e-6


def test_sublayer_paper_preset_is_the_papers_ablations(tiny, facts):
    """"paper" = uniform attention + zeroed MLP hidden activation (Geva et al.'s code), literally;
    with a down-projection bias, zeroing the hidden activation (the MLP's update becomes its output
    bias) differs from zeroing the MLP's output."""
    from test_substrate import _with_random_biases

    assert ablations("paper") == {"attn": "uniform", "mlp": "hidden"}
    assert ablations("zero") == {"attn": "zero", "mlp": "zero"}
    model = _with_random_biases(tiny)
    if model.module(0, model.spec.mlp_down).bias is None:
        pytest.skip(f"{tiny.name}: the MLP's down projection has no bias (hidden == zero exactly)")
    items, _ = usable(model, facts[:1])
    attrs = {items[0].fact.subject: {"located"}}
    p = sublayer_batch(model, items, attrs, upper=3, window=2, how="paper")[0]["mass"]["mlp"]
    z = sublayer_batch(model, items, attrs, upper=3, window=2, how="zero")[0]["mass"]["mlp"]
    assert max(abs(a - b) for a, b in zip(p, z)) > 1e-6


def test_attribute_mass_and_ids_by_hand(tiny):
    assert A.mass(torch.log(torch.tensor([1.0, 2.0, 3.0])), [1, 2]) == pytest.approx(5 / 6)
    assert A.mass(torch.log(torch.tensor([1.0, 2.0, 3.0])), []) == 0.0
    attrs = {"paris", "located", "city"}
    V = min(tiny.vocab_size, len(tiny.tokenizer))
    naive = [i for i in range(V) if A.clean_token(tiny.tokenizer.decode([i])) in attrs]
    got = A.attribute_ids(tiny, attrs)
    assert got and got == naive


def test_attribute_cleaning_and_rate(tiny):
    assert A.clean_token(" The") is None and A.clean_token(" ab") is None and A.clean_token(" Paris") == "paris"
    s = A.attribute_set(tiny, "Eiffel Tower", ["The Eiffel Tower is located in Paris, France."])
    assert "paris" in s or any("par" in x for x in s)
    assert "the" not in s and "tower" not in s  # stop words and the subject's own tokens are dropped
    assert A.rate(["paris", "london"], {"paris"}) == 0.5
    assert A.rate([], {"paris"}) != A.rate([], {"paris"})  # nan


def _hf_hidden_states(model, batch):
    """Hugging Face's output_hidden_states, from a copy of the model: transformers 5 leaves output
    capturing hooks on the layers it records, which would stay on the shared test model."""
    hf = copy.deepcopy(model.hf)
    return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              output_hidden_states=True).hidden_states


def test_hidden_states_equal_hugging_face(tiny, facts):
    """Every hidden state equals HF's output_hidden_states (whose last entry has the final norm
    applied) on a padded batch."""
    items, _ = usable(tiny, facts)
    batch = tiny.batch_from_ids([t.ids for t in items])
    assert len(set(batch.lengths)) > 1
    with torch.inference_mode():
        hs = hidden_states(tiny, batch)
        ref = _hf_hidden_states(tiny, batch)
    real = batch.attention_mask.bool()
    assert len(hs) == len(ref) == tiny.n_layers + 1
    for i in range(tiny.n_layers):
        torch.testing.assert_close(hs[i][real], ref[i][real])
    torch.testing.assert_close(tiny.final_norm(hs[-1])[real], ref[-1][real])


def test_enrichment_record_alone_equals_in_a_padded_batch(tiny, facts):
    """A fact's record (rates at every position and hidden state, baseline, controls) is the same
    alone and inside a padded batch, and its rates are those of the logit lens of HF's hidden states
    at the fact's own token indices."""
    items, _ = usable(tiny, facts)
    short = min(items, key=lambda t: t.n)
    assert any(t.n > short.n for t in items)  # the short fact gets padded in the batch
    batch = tiny.batch_from_ids([short.ids])
    with torch.inference_mode():
        ref = _hf_hidden_states(tiny, batch)
        lg = tiny.logit_lens(torch.stack([ref[l][0, short.subject_last] for l in range(tiny.n_layers)]))
    vocab = A.top_clean(tiny, lg.float())
    attrs = {t.fact.subject: set(vocab[1][:5]) | {"located"} for t in items}
    controls = {"chance": chance_sets(attrs, 2, seed=0)}
    alone = enrichment_batch(tiny, [short], attrs, show_layers=[0, 1], controls=controls)[0]
    batched = enrichment_batch(tiny, items, attrs, show_layers=[0, 1], controls=controls)[items.index(short)]
    assert alone == batched
    a = attrs[short.fact.subject]
    assert alone["rates"]["subject_last"][: tiny.n_layers] == pytest.approx([A.rate(v, a) for v in vocab])
    assert alone["rates"]["subject_last"][1] >= 0.1  # hidden state 1 holds 5 of its own top tokens
    # the chance control: the rate against each shuffle's (other subject's) set, averaged over shuffles
    want = [sum(A.rate(v, m[short.fact.subject]) for m in controls["chance"]) / len(controls["chance"]) for v in vocab]
    assert alone["controls"]["chance"]["subject_last"][: tiny.n_layers] == pytest.approx(want)


def test_chance_sets_are_other_subjects_sets():
    attrs = {"a": {"x"}, "b": {"y"}, "c": {"z"}, "d": set()}
    maps = chance_sets(attrs, 3, seed=0)
    assert len(maps) == 3
    for m in maps:
        assert set(m) == {"a", "b", "c"}  # subjects without a set get none
        assert all(m[s] != attrs[s] for s in m)  # never the subject's own (by value, not identity)
        assert sorted(map(sorted, m.values())) == [["x"], ["y"], ["z"]]  # a permutation of the sets
    assert chance_sets({"a": {"x"}}, 3) == []


def test_cli_all_and_resume(tmp_path):
    from factscope.cli import main

    out = tmp_path / "flow"
    args = ["flow", "all", "--model", "tiny-llama", "--all-facts", "--limit", "3", "--out", str(out), "--no-progress", "--threads", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    ko = s["knockout"]
    assert ko["n_facts"] == 3 and ko["window"] == 1
    assert set(ko["curves"]) >= {"subject", "non_subject", "last"}
    assert all(len(v) == 4 for v in ko["curves"].values())
    for name in ("knockout", "enrichment", "sublayer", "extraction", "heads"):
        assert (out / f"{name}.png").is_file()
    sub, enr = s["sublayer"], s["enrichment"]
    assert sub["ablation"] == {"attn": "uniform", "mlp": "hidden"}  # the paper's ablations by default
    curves_min = {kind: min(sub["curves"][kind]) for kind in ("attn", "mlp")}
    assert sub["attn_min_rate"] == curves_min["attn"] and sub["mlp_min_rate"] == curves_min["mlp"]
    assert 0 <= sub["none_rate"] <= 100 and 0 <= sub["none_mass"] <= 100
    assert enr["peak_rate"] == max(enr["curves"]["subject_last"])
    assert enr["chance_rate"] == enr["chance_curve"][enr["peak_hidden_state"]]
    assert enr["mean_set_size"] > 0 and enr["n_shuffles"] == 3
    before = (out / "knockout.csv").read_text()
    # resuming recomputes nothing and reproduces the tables
    res = CliRunner().invoke(main, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert (out / "knockout.csv").read_text() == before
    assert len((out / "checkpoints" / "knockout.jsonl").read_text().splitlines()) == 3
