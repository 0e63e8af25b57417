"""Knowledge editing (ROME, FT-M): exactness of the update, locality, restoring, the scores."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch

from factscope import hooks
from factscope.edit.ftm import FTM, FTMHParams
from factscope.edit.rome import Rome, RomeHParams, compute_key, rank_one_update
from factscope.edit.run import circuit_change, edit_case, lens_curves
from factscope.edit.scores import EditCase, answer_nll, load_cases, score_case
from factscope.facts import load_facts, subject_span, target_ids

# the CounterFact sample the package ships (a copy of ../shared/data/counterfact_sample.json)
SAMPLE = Path(str(resources.files("factscope.hijack") / "counterfact_sample.json"))

SMALL = dict(mom2_texts=24, mom2_text_length=12, context_template_length_params=((4, 3),), v_num_grad_steps=6)


@functools.lru_cache(maxsize=None)
def _model64(name: str):
    """A float64 copy of a tiny model whose biases are random (the tiny models' start at zero)."""
    from factscope.models import load_model

    m = load_model(name, dtype="float64")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.hf.modules():
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.nn.Parameter):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.5)
    return m


def _case() -> EditCase:
    return load_cases(str(SAMPLE))[0]


def _down_out(model, layer: int, batch, col: int, key: torch.Tensor | None = None) -> torch.Tensor:
    """The down projection's output at one column of batch row 0, through the model's own modules
    (``key`` replaces the down projection's input there)."""
    got = {}

    def put(h, l):
        if key is None:
            return None
        h = h.clone()
        h[0, col] = key.to(h.dtype)
        return h

    def grab(out):
        got["y"] = out[0, col].detach().clone()

    with torch.no_grad(), hooks.edit(model, "mlp_hidden", layer, put), model.mlp_down_output(layer, grab):
        model.forward(batch)
    return got["y"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma3", "tiny-neox"])
def test_rank_one_update_maps_key_to_value_and_spares_c_orthogonal_keys(name):
    model = copy.deepcopy(_model64(name))
    l = 1
    g = torch.Generator().manual_seed(0)
    d_mlp = model.mlp_down(l).shape[1]
    A = torch.randn(d_mlp, d_mlp, generator=g, dtype=torch.float64)
    C = A @ A.T / d_mlp + 0.1 * torch.eye(d_mlp, dtype=torch.float64)  # SPD, far from the identity
    k = torch.randn(d_mlp, generator=g, dtype=torch.float64)
    v = torch.randn(model.d_model, generator=g, dtype=torch.float64)
    r = torch.randn(d_mlp, generator=g, dtype=torch.float64)
    Cinv_k = torch.linalg.solve(C, k)
    k_orth = r - (r @ Cinv_k) / (k @ Cinv_k) * k  # k_orth^T C^-1 k = 0
    assert abs(k_orth @ Cinv_k) < 1e-9
    batch = model.encode(["The capital of France is"])
    col = batch.input_ids.shape[1] - 2
    before_orth = _down_out(model, l, batch, col, k_orth)
    before_k = _down_out(model, l, batch, col, k)
    rank_one_update(model, l, k, v, C)
    assert torch.allclose(_down_out(model, l, batch, col, k), v, atol=1e-6)
    assert torch.allclose(_down_out(model, l, batch, col, k_orth), before_orth, atol=1e-6)
    assert (before_k - v).abs().max() > 1e-2  # the update did something


def test_rome_edit_maps_the_mean_key_to_the_optimized_value():
    model = copy.deepcopy(_model64("tiny-llama"))
    case = _case()
    ed = Rome(model, RomeHParams(layer=1, **SMALL), cache=False)
    # k* is the mean over the prefixed prompts of mlp_hidden at the subject's last token (naive loop)
    texts = [t.replace("{}", case.prompt, 1).replace("{}", case.subject, 1) for t in ed.templates()]
    keys = []
    for t in texts:
        j = subject_span(model.tokenizer, t, case.subject, occurrence="last")[1] - 1
        with torch.no_grad(), hooks.cache(model, "mlp_hidden", [1]) as c:
            model.run([t])
        keys.append(c["mlp_hidden", 1][0, j])
    nll_before = answer_nll(model, [(case.rewrite_prompt, case.target_new)])[0]
    res = ed.edit(case)
    assert torch.allclose(res.k, torch.stack(keys).mean(0), atol=1e-10)
    batch = model.encode([case.rewrite_prompt])
    assert torch.allclose(_down_out(model, 1, batch, 1, res.k), res.v, atol=1e-6)
    assert res.nll[-1] < res.nll[0]  # v* lowers the new answer's NLL over the prompts
    assert answer_nll(model, [(case.rewrite_prompt, case.target_new)])[0] < nll_before


def test_compute_key_uses_each_prompts_own_position():
    model = _model64("tiny-llama")
    texts = ["Paris is nice", "In the morning Paris is nice"]
    ids = [model.tokenizer(t)["input_ids"] for t in texts]
    look = [subject_span(model.tokenizer, t, "Paris")[1] - 1 for t in texts]
    assert len(ids[0]) != len(ids[1])  # padding offsets matter
    k = compute_key(model, 1, texts, look)
    each = []
    for t, j in zip(texts, look):
        with torch.no_grad(), hooks.cache(model, "mlp_hidden", [1]) as c:
            model.run([t])
        each.append(c["mlp_hidden", 1][0, j])
    assert torch.allclose(k, (each[0] + each[1]) / 2, atol=1e-10)


def test_ftm_changes_only_its_layer_and_restoring_is_bit_identical():
    from factscope.models import load_model

    model = load_model("tiny-llama")
    case = _case()
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    logits = model.run([case.rewrite_prompt, "Hello world"])
    ed = FTM(model, FTMHParams(layer=1, num_steps=5, lr=1e-2))
    target = ed.parameter
    nll0 = answer_nll(model, [(case.rewrite_prompt, case.target_new)])[0]
    with model.restoring(ed.parameter):
        res = ed.edit(case)
        changed = [n for n, p in model.hf.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == 1 and model.hf.get_parameter(changed[0]) is target
        assert res.loss[-1] < res.loss[0]
        assert answer_nll(model, [(case.rewrite_prompt, case.target_new)])[0] < nll0
    assert all(torch.equal(p, before[n]) for n, p in model.hf.named_parameters())
    assert not any(p.requires_grad for p in model.hf.parameters())
    assert torch.equal(model.run([case.rewrite_prompt, "Hello world"]), logits)


def test_rome_restoring_gives_bit_identical_logits():
    model = copy.deepcopy(_model64("tiny-gpt2"))
    case = _case()
    logits = model.run([case.rewrite_prompt, "Hello world"])
    ed = Rome(model, RomeHParams(layer=1, **SMALL), cache=False)
    with model.restoring(ed.parameter):
        ed.edit(case)
        assert not torch.equal(model.run([case.rewrite_prompt, "Hello world"]), logits)
    assert torch.equal(model.run([case.rewrite_prompt, "Hello world"]), logits)


def _direct_nll(model, prompt: str, answer: str) -> float:
    p = model.tokenizer(prompt)["input_ids"]
    a = target_ids(model.tokenizer, prompt, answer)
    ids = torch.tensor([p + a])
    with torch.no_grad():
        lp = torch.log_softmax(model.hf(input_ids=ids).logits[0].double(), -1)
    return -sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(a)) / len(a)


def test_scores_equal_a_direct_computation():
    model = _model64("tiny-gpt2")
    case = _case()
    s = score_case(model, case)
    pairs = [(case.rewrite_prompt, case.target_new), (case.rewrite_prompt, case.target_true)]
    direct = [_direct_nll(model, p, a) for p, a in pairs]
    assert s.rewrite == pytest.approx(tuple(direct), abs=1e-8)
    assert s.efficacy == float(direct[0] < direct[1])
    para = [(_direct_nll(model, p, case.target_new), _direct_nll(model, p, case.target_true)) for p in case.paraphrase_prompts]
    assert s.paraphrase_score == pytest.approx(sum(n < t for n, t in para) / len(para))
    neigh = [(_direct_nll(model, p, case.target_new), _direct_nll(model, p, a)) for p, a in case.neighborhood]
    assert [x for pair in s.neighborhood for x in pair] == pytest.approx([x for pair in neigh for x in pair], abs=1e-8)
    assert s.neighborhood_score == pytest.approx(sum(t < n for n, t in neigh) / len(neigh))
    # same-subject facts: scored after the neighbours, against their own answers
    case = dataclasses.replace(case, subject_facts=(("{} was born in".format(case.subject), "Paris"),
                                                    ("The profession of {} is".format(case.subject), "painter")))
    s = score_case(model, case)
    own = [(_direct_nll(model, p, case.target_new), _direct_nll(model, p, a)) for p, a in case.subject_facts]
    assert [x for pair in s.same_subject for x in pair] == pytest.approx([x for pair in own for x in pair], abs=1e-8)
    assert [x for pair in s.neighborhood for x in pair] == pytest.approx([x for pair in neigh for x in pair], abs=1e-8)
    assert s.same_subject_score == pytest.approx(sum(t < n for n, t in own) / len(own))
    row = s.row("post_")
    assert row["post_p_new"] == pytest.approx(math.exp(-direct[0]))


def test_cases_from_a_fact_set():
    cases = load_cases("lre:factual/person_native_language", limit=5, seed=3)
    assert len(cases) == 5
    for c in cases:
        assert c.target_new.lower() != c.target_true.lower()
        assert c.paraphrase_prompts and all(c.subject in p for p in c.paraphrase_prompts)
        assert c.rewrite_prompt not in c.paraphrase_prompts
        assert len(c.neighborhood) == 10
        assert all(c.subject not in p and a.lower() != c.target_new.lower() for p, a in c.neighborhood)
        # CounterFact-style: neighbours sharing the true object come first
        assert c.neighborhood[0][1] == c.target_true
    # same subject, other relations: countries have capitals, currencies, languages, ...
    cases = load_cases("lre:factual/country_capital_city", limit=5, seed=0)
    for c in cases:
        expected = {(f.prompt, f.target_true) for f in load_facts("lre") if f.subject == c.subject
                    and f.relation_id != c.relation_id and f.target_true.lower() != c.target_new.lower()}
        assert expected and set(c.subject_facts) <= expected
        assert len(c.subject_facts) == min(10, len(expected))
        assert all(c.subject in p for p, _ in c.subject_facts)
    cf = load_cases(str(SAMPLE))
    raw = json.loads(SAMPLE.read_text())
    assert [c.target_new for c in cf] == [r["requested_rewrite"]["target_new"]["str"] for r in raw]
    assert all(a == c.target_true for c in cf for _, a in c.neighborhood)


def test_lens_curves_and_circuit_change():
    from factscope.models import load_model

    model = load_model("tiny-llama")
    case = _case()
    lens = lens_curves(model, case)
    first = target_ids(model.tokenizer, case.rewrite_prompt, case.target_new)[0]
    probs = torch.softmax(model.run([case.rewrite_prompt])[0].double(), -1)
    assert lens["p_last"][-1] == pytest.approx(float(probs[first]), rel=1e-4)  # last layer = the model
    assert lens["rank_last"][-1] == int((probs > probs[first]).sum())
    ch = circuit_change({"a", "b", "c"}, {"b", "c", "d", "e"})
    assert ch["gained"] == ["d", "e"] and ch["lost"] == ["a"] and ch["jaccard"] == pytest.approx(2 / 5)


def test_edit_case_record_restores_weights():
    from factscope.models import load_model

    model = load_model("tiny-llama")
    case = _case()
    logits = model.run([case.rewrite_prompt])
    rec = edit_case(model, FTM(model, FTMHParams(layer=1, num_steps=3, lr=1e-2)), case, circuit_edges=10)
    assert rec["post_p_new"] > rec["pre_p_new"]
    assert rec["circuit"]["n_before"] == rec["circuit"]["n_after"] == 10
    assert torch.equal(model.run([case.rewrite_prompt]), logits)


def test_cli_edit(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from factscope.cli import main

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["edit", "--model", "tiny-llama", "--method", "ft-m", "--dataset", str(SAMPLE),
                                  "--limit", "2", "--circuits", "1", "--edges", "10", "--layer", "1",
                                  "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())["edit"]
    assert s["n"] == 2 and 0 <= s["efficacy"] <= 1 and s["neighborhood"] is not None
    assert (out / "edit_lens.png").exists() and (out / "edits.csv").exists() and (out / "report.html").exists()
    bad = CliRunner().invoke(main, ["edit", "--model", "tiny-llama", "--layer", "99", "--dataset", str(SAMPLE),
                                    "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--layer 99" in bad.output


def test_second_moment_and_its_cache(tmp_path, monkeypatch):
    from factscope.edit.rome import covariance, second_moment

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    model = _model64("tiny-llama")
    texts = ["The capital of France is Paris", "Hello", "Danielle Darrieux spoke French at home"]
    seqs = [model.tokenizer(t)["input_ids"] for t in texts]
    special = set(model.tokenizer.all_special_ids)
    rows = []
    for s in seqs:  # naive: one prompt at a time, every token but a leading special one
        with torch.no_grad(), hooks.cache(model, "mlp_hidden", [2]) as c:
            model.run([model.tokenizer.decode(s, skip_special_tokens=True)])
        h = c["mlp_hidden", 2][0]
        rows += [h[j] for j in range(1 if s[0] in special else 0, len(s))]
    K = torch.stack(rows)
    assert torch.allclose(second_moment(model, 2, seqs, batch_size=2), K.T @ K / len(K), atol=1e-10)
    hp = RomeHParams(layer=2, **SMALL)
    C = covariance(model, 2, hp)
    assert list((tmp_path / "edit" / "tiny-llama").glob("*-tokens.pt"))  # generations cached for other layers
    assert torch.equal(covariance(model, 2, hp), C)  # from the cache
    assert not torch.equal(covariance(model, 2, hp, texts=texts), C)


def test_single_case_from_the_data_set():
    from factscope.edit.cli import _single_case
    from factscope.errors import FactscopeError

    c = _single_case(None, str(SAMPLE), "Danielle Darrieux", "German", None, None, 0)
    assert (c.prompt, c.target_true, c.target_new) == ("The mother tongue of {} is", "French", "German")
    assert len(c.neighborhood) == 10 and len(c.paraphrase_prompts) == 2
    with pytest.raises(FactscopeError, match="no fact about 'Nobody'"):
        _single_case(None, str(SAMPLE), "Nobody", "German", None, None, 0)
    with pytest.raises(FactscopeError, match="equals target_true"):
        _single_case(None, str(SAMPLE), "Danielle Darrieux", "French", None, None, 0)
