"""Findings and claims: each analysis states its numbers and decides the paper's claims by its
documented rule (tests flip the numbers across each rule), and the report shows them first."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from factscope.circuits.run import evaluate_findings
from factscope.cli import main
from factscope.findings import Claim, with_interval
from factscope.flow.extraction import extraction_findings
from factscope.flow.knockout import knockout_findings
from factscope.hijack.runner import hijack_findings
from factscope.report import findings_block, readable_label
from factscope.runs import Run


def _knockout(sub=(-50.0, 14, 5.0), non=(-40.0, 3, 6.0), n_layers=18):
    curves = {s: [0.0] * n_layers for s in ("subject", "non_subject", "last")}
    ci = {s: [1.0] * n_layers for s in curves}
    ci["subject"][sub[1]] = sub[2]
    ci["non_subject"][non[1]] = non[2]
    return {"n_facts": 30, "window": 4, "curves": curves, "ci95": ci,
            "critical": {"subject": {"min_change": sub[0], "layer": sub[1]},
                         "non_subject": {"min_change": non[0], "layer": non[1]}}}


def test_knockout_findings_state_the_numbers_and_follow_the_rules():
    f, c = knockout_findings(_knockout())
    assert "-50% ± 5 at layer 14 of 18" in f[0] and "-40% ± 6 at layer 3" in f[0] and "30 facts" in f[0]
    assert [x.holds for x in c] == [True, True]
    assert knockout_findings(_knockout(sub=(-20.0, 14, 5.0)))[1][0].holds is False  # whole interval above -30
    assert knockout_findings(_knockout(sub=(-32.0, 14, 5.0)))[1][0].holds is None  # interval straddles -30
    assert knockout_findings(_knockout(non=(-40.0, 15, 6.0)))[1][1].holds is False  # relation after subject
    assert knockout_findings(_knockout(non=(-40.0, 14, 6.0)))[1][1].holds is None
    assert knockout_findings({"n_facts": 0, "critical": {}}) == ([], [])


def _extraction(attn=0.8, mlp=0.1, ko=0.2, n=50):
    return {"n_facts": n, "attn_any_event": attn, "mlp_any_event": mlp, "attn_any_top10": 0.9, "mlp_any_top10": 0.5,
            "ko_from_layer": 9, "knockout": {"none": {"attn": attn, "mlp": mlp, "top1_kept": 1.0},
                                             "subject": {"attn": ko, "mlp": mlp, "top1_kept": 0.4}}}


def test_extraction_findings_rules():
    f, c = extraction_findings(_extraction())
    assert "attention in 80% of 50 facts" in f[0] and "MLP in 10%" in f[0]
    assert "in 20% of facts (from 80%)" in f[1] and "unchanged in 40%" in f[1]
    assert [x.holds for x in c] == [True, True]
    assert [x.holds for x in extraction_findings(_extraction(attn=0.1, mlp=0.8, ko=0.5))[1]] == [False, False]
    # differences within 1.96 standard errors on 30 facts: undecided
    assert [x.holds for x in extraction_findings(_extraction(attn=0.4, mlp=0.23, ko=0.27, n=30))[1]] == [None, None]


def _hijack(es, ci):
    return {"max_prepends": len(es) - 1, "n_facts": {"m": 40}, "efficacy": {"m": {"generic": es}},
            "efficacy_ci95": {"m": {"generic": ci}}}


def test_hijack_findings_rules():
    f, c = hijack_findings(_hijack([0.0, 0.3, 0.56], [[0.0, 0.0], [0.2, 0.4], [0.45, 0.66]]))
    assert f == ["m, generic: ES rises from 0.00 [0.00, 0.00] to 0.56 [0.45, 0.66] with 2 prepended sentences (40 facts)."]
    assert c[0].holds is True and "0.00 -> 0.56 at n = 2" in c[0].this_model
    assert hijack_findings(_hijack([0.1, 0.1, 0.1], [[0.0, 0.2]] * 3))[1][0].holds is False
    assert "stays at 0.10" in hijack_findings(_hijack([0.1, 0.1, 0.1], [[0.0, 0.2]] * 3))[0][0]
    assert hijack_findings(_hijack([0.1, 0.15, 0.2], [[0.0, 0.25], [0.05, 0.3], [0.1, 0.3]]))[1][0].holds is None


def _circuit(full=1.0, circuit=0.9, random=0.0, std=0.0):
    return {"method": "eap-ig", "n_edges_total": 5644, "n_edges": 282, "n_test": 8, "faithfulness": 0.7,
            "hit10": {"full": full, "circuit": circuit, "random": random, "random_std": std}}


def test_evaluate_findings_rules():
    f, c = evaluate_findings(_circuit())
    assert "282 of 5644 edges (5.0%)" in f[0] and "Hit@10 0.90 on 8 held-out facts (full model 1.00" in f[0]
    assert c[0].holds is True
    assert evaluate_findings(_circuit(circuit=0.4))[1][0].holds is False  # under half of the full model
    assert evaluate_findings(_circuit(circuit=0.9, random=0.8, std=0.1))[1][0].holds is False  # not above random
    assert evaluate_findings(_circuit(circuit=0.6))[1][0].holds is None


def test_claims_round_trip_and_reject_bad_values():
    c = Claim("a", "b", "c", None)
    assert Claim.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="holds"):
        Claim.from_dict({"claim": "a", "paper": "b", "this_model": "c", "holds": "yes"})
    assert with_interval(0.5, 0.4, 0.6) == "0.50 [0.40, 0.60]" and with_interval(0.5, pct=True) == "50%"


def test_report_shows_findings_and_claims_first(tmp_path):
    run = Run.create(tmp_path / "r", {"analysis": "x"})
    run.update_summary({"flow_extraction": {"knockout_local_attn": {"none": 0.4}}})
    run.add_section("a", "Part <A>", "text", findings=["First <b>finding</b>."],
                    claims=[Claim("c1", "p1", "m1", True), Claim("c<2>", "p2", "m2", False), Claim("c3", "p3", "m3", None)])
    run.add_section("b", "Part B", "no findings here")
    html = run.write_report().read_text()
    assert html.index('id="findings"') < html.index('id="summary"') < html.index('id="config"')
    block = findings_block(run.sections)
    assert "First &lt;b&gt;finding&lt;/b&gt;." in block and "Part &lt;A&gt;" in block and "Part B" not in block
    assert "(1 of 3 hold)" in block and "c&lt;2&gt;" in block
    assert [m for m in re.findall(r'class="holds (\w+)"', block)] == ["yes", "no", "unsure"]
    assert '<details class="numbers">' in html and "Flow extraction › knockout local attention › none" in html
    assert readable_label("demo_hijack.efficacy_ci95.m") == "Demo hijack › efficacy 95% CI › m"


def test_a_run_carries_findings_in_its_sections(tmp_path):
    out = tmp_path / "k"
    r = CliRunner().invoke(main, ["flow", "knockout", "--model", "tiny-llama", "--all-facts", "--limit", "3",
                                  "--no-progress", "--threads", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    sec = {s["key"]: s for s in json.loads((out / "sections.json").read_text())}["knockout"]
    s = json.loads((out / "summary.json").read_text())["knockout"]
    assert sec["findings"] == knockout_findings(s)[0]
    assert [Claim.from_dict(c) for c in sec["claims"]] == knockout_findings(s)[1]
    assert f"layer {s['critical']['subject']['layer']}" in sec["findings"][0]
    assert "Findings" in (out / "report.html").read_text()


def test_lca_findings_rules():
    from factscope.lca.experiments import lca_findings

    vm = {"trained": 0.95, "identity": 0.74, "trained_std": 0.01, "identity_std": 0.02, "L": 64, "d": 16, "seeds": 3}
    out = lca_findings({"value_matrix": vm})
    assert "accuracy 0.95, the identity 0.74" in out["findings"][0] and out["claims"][0].holds is True
    assert lca_findings({"value_matrix": {**vm, "identity": 0.94}})["claims"][0].holds is None  # within 2 std
    assert lca_findings({"value_matrix": {**vm, "trained": 0.5}})["claims"][0].holds is False
    emb = {"fit_slope": -0.37, "fit_r2": 0.9, "negative_slope_under_parameterized": "3/4"}
    assert lca_findings({"embeddings": emb})["claims"][0].holds is None
    assert lca_findings({"embeddings": {**emb, "negative_slope_under_parameterized": "4/4"}})["claims"][0].holds is True
    assert lca_findings({"embeddings": {**emb, "negative_slope_under_parameterized": "0/0"}})["claims"][0].holds is None
    att = {"same_cluster": 0.02, "other_cluster": 0.0006, "same_cluster_std": 0.0, "other_cluster_std": 0.0, "ratio": 36.4}
    out = lca_findings({"attention": att})
    assert "0.020" in out["findings"][0] and "ratio 36.4" in out["findings"][0] and out["claims"][0].holds is True


def test_trace_findings_rules():
    from factscope.trace.run import trace_findings

    def summ(mlp=(0.08, 7), attn=(0.2, 12)):
        return {"n_facts": 20, "mean_p_clean": 0.27, "mean_p_corrupt": 0.02,
                "peak": {"mlp.last_subject": {"effect": mlp[0], "layer": mlp[1]},
                         "attn.last": {"effect": attn[0], "layer": attn[1]}}}
    f, c = trace_findings(summ(), 18)
    assert "from 0.270 to 0.020 (20 facts)" in f[0] and "mlp at last subject 0.080 (layer 7)" in f[0]
    assert [x.holds for x in c] == [True, True]  # 0.08 and 0.2 of a 0.25 gap, layers 7 and 12
    assert [x.holds for x in trace_findings(summ(mlp=(0.04, 7), attn=(0.2, 5)), 18)[1]] == [None, False]
    assert [x.holds for x in trace_findings(summ(mlp=(0.02, 7), attn=(0.02, 12)), 18)[1]] == [False, False]
    assert [x.holds for x in trace_findings(summ(mlp=(0.1, 15)), 18)[1]] == [False, True]  # top third


def test_edit_findings_rules():
    from factscope.edit.run import edit_findings

    s = {"n": 50, "method": "rome", "layer": 4, "efficacy": 1.0, "paraphrase": 0.94, "neighborhood": 0.53,
         "pre_efficacy": 0.26, "pre_paraphrase": 0.26, "pre_neighborhood": 0.74, "same_subject": None}
    f, c = edit_findings(s)
    assert f == ["50 ROME edits at layer 4: efficacy 100%, paraphrase 94%, neighbourhood 53% (unedited: 26%, 26%, 74%)."]
    assert [x.holds for x in c] == [True, False]  # neighbourhood 21 points down
    assert [x.holds for x in edit_findings({**s, "neighborhood": 0.68, "efficacy": 0.7})[1]] == [None, True]
    assert [x.holds for x in edit_findings({**s, "neighborhood": 0.59, "efficacy": 0.4})[1]] == [False, None]
    f, c = edit_findings({**s, "method": "ft-m", "same_subject": 0.0, "pre_same_subject": 1.0})
    assert c == [] and "keep their answer in 0% of prompts after the edit (100% before)" in f[1]


def test_lens_findings_rules():
    from factscope.circuits.lens import lens_findings

    s = {"emergence_top": 10, "median_enters_top": 12, "median_subject_enters_top": None, "n_facts": 20,
         "top1_output": 0.4, "top10_output": 0.95}
    f, c = lens_findings(s, 18)
    assert "enters the top 10 at layer 12 of 18 layers; at the subject positions never (20 facts" in f[0]
    assert [x.holds for x in c] == [True, False]
    assert [x.holds for x in lens_findings({**s, "median_subject_enters_top": 8}, 18)[1]] == [True, True]
    assert [x.holds for x in lens_findings({**s, "median_subject_enters_top": 12}, 18)[1]] == [True, None]
    assert [x.holds for x in lens_findings({**s, "median_enters_top": 3}, 18)[1]] == [False, False]


def test_tokens_show_their_whitespace():
    import pandas as pd

    from factscope.report import render_table, visible_whitespace

    assert visible_whitespace(" Paris") == "␣Paris" and visible_whitespace(" ") == "␣"
    assert visible_whitespace("a\nb") == "a↵b" and visible_whitespace("The Eiffel Tower is") == "The Eiffel Tower is"
    html = render_table(pd.DataFrame({"top1": [" Paris", " ", "\n"], "p": [0.5, 0.25, 0.25]}), "t")
    assert "<td>␣Paris</td>" in html and "<td>␣</td>" in html and "<td>↵</td>" in html


def test_report_compares_two_runs(tmp_path):
    runs = []
    for name, drop, held in (("model-a", 0.8, True), ("model-b", 0.3, False)):
        run = Run.create(tmp_path / name, {"analysis": "x", "model": name})
        run.update_summary({"knockout": {"drop": drop}})
        run.add_section("k", "Knockout", "", findings=[f"{name} drops {drop}."],
                        claims=[Claim("Subject flow matters", "paper", f"drop {drop}", held)])
        runs.append(run)
    out = tmp_path / "cmp.html"
    r = CliRunner().invoke(main, ["report", str(runs[0].dir), str(runs[1].dir), "--compare", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    row = re.search(r"<tr><td>Subject flow matters</td>(.*?)</tr>", html, re.S).group(1)
    assert row.index("✓ holds") < row.index("✗ does not hold") and "drop 0.8" in row and "drop 0.3" in row
    assert "model-a drops 0.8." in html and "model-b drops 0.3." in html
    num = re.search(r"Knockout › drop</td>(.*?)</tr>", html, re.S).group(1)
    assert re.findall(r"<td class=num>([^<]*)</td>", num) == ["0.8", "0.3", "", "-0.5"]
    bad = CliRunner().invoke(main, ["report", str(runs[0].dir), "--compare", str(out)])
    assert bad.exit_code == 2 and "two run directories" in bad.output


def _facts_run(tmp_path, n=3):
    import numpy as np
    import pandas as pd

    run = Run.create(tmp_path / "facts", {"analysis": "x"})
    ids = [f"f{i}" for i in range(n)]
    run.save_table("known_facts", pd.DataFrame({"id": ids, "subject": [f"S{i}" for i in range(n)],
                                                "prompt": [f"S{i} lives in" for i in range(n)],
                                                "target": ["Paris"] * n, "top1": [" Paris"] * n,
                                                "rank": list(range(n)), "known": [True] * n}))
    run.save_table("flow_knockout_facts", pd.DataFrame(
        [{"key": f, "set": s, "layer": l, "change": 10.0 * i + l + (s == "last")}
         for i, f in enumerate(ids) for s in ("subject", "last") for l in (1, 0)]))
    run.save_table("hijack_results", pd.DataFrame(
        [{"fact_id": f, "scheme": "generic", "n": k, "lp_true": -0.5 * k, "lp_false": -3.0 + k}
         for f in ids for k in range(3)]))
    return run, ids


def test_facts_data_joins_every_per_fact_table(tmp_path):
    import math

    from factscope.drilldown import facts_data

    run, ids = _facts_run(tmp_path)
    d = facts_data(run)
    assert d["key"] == "id" and [r[0] for r in d["rows"]] == ids and d["columns"][:3] == ["id", "subject", "prompt"]
    charts = {c["title"]: c for c in d["series"]["f1"]}
    ko = charts["Attention knockout (flow_knockout_facts)"]["lines"]
    assert ko == {"subject": [[0, 10.0], [1, 11.0]], "last": [[0, 11.0], [1, 12.0]]}  # sorted by layer
    p_true = charts["Hijacking: P(true target)"]["lines"]["generic"]
    assert p_true == [[k, round(math.exp(-0.5 * k), 5)] for k in range(3)]
    assert set(d["series"]) == set(ids)
    empty = Run.create(tmp_path / "none", {"analysis": "y"})
    assert facts_data(empty) is None


def _enrichment(last=(30.0, 5.0), first=(10.0, 2.0), after=(12.0, 2.0), chance=3.0):
    peak = {"subject_first": {"max_rate": first[0], "ci95": first[1], "hidden_state": 4, "chance": 1.0},
            "subject_last": {"max_rate": last[0], "ci95": last[1], "hidden_state": 6, "chance": chance},
            "after_subject": {"max_rate": after[0], "ci95": after[1], "hidden_state": 7, "chance": 1.0},
            "last": {"max_rate": 40.0, "ci95": 3.0, "hidden_state": 17, "chance": 1.0}}
    return {"n_facts": 20, "peak": peak, "baseline": 2.0, "source": "built-in: objects"}


def test_enrichment_findings_rules():
    from factscope.flow.enrichment import enrichment_findings

    f, c = enrichment_findings(_enrichment())
    assert "30.0% ± 5.0 attributes" in f[0] and "hidden state 6" in f[0] and "chance 3.0%" in f[0]
    assert c[0].holds is True
    assert enrichment_findings(_enrichment(last=(15.0, 5.0)))[1][0].holds is None  # overlaps after-subject's
    assert enrichment_findings(_enrichment(last=(5.0, 1.0)))[1][0].holds is False  # below the other positions
    assert enrichment_findings(_enrichment(last=(30.0, 5.0), chance=28.0))[1][0].holds is None  # near chance
    assert enrichment_findings({"n_facts": 0}) == ([], [])


def _sublayer(mlp=(5.0, 2.0), attn=(20.0, 3.0), none=25.0):
    return {"n_facts": 20, "upper_layer": 15, "window": 4, "none_rate": none, "mlp_min_rate": mlp[0],
            "mlp_min_rate_ci95": mlp[1], "mlp_min_rate_start": 2, "attn_min_rate": attn[0],
            "attn_min_rate_ci95": attn[1], "attn_min_rate_start": 9}


def test_sublayer_findings_rules():
    from factscope.flow.sublayer import sublayer_findings

    f, c = sublayer_findings(_sublayer())
    assert "25.0% attributes" in f[0] and "5.0% ± 2.0" in f[0] and "20.0% ± 3.0" in f[0] and "layer 2" in f[0]
    assert c[0].holds is True
    assert sublayer_findings(_sublayer(mlp=(18.0, 2.0)))[1][0].holds is None  # intervals overlap
    assert sublayer_findings(_sublayer(mlp=(22.0, 1.0), attn=(10.0, 2.0)))[1][0].holds is False
    assert sublayer_findings({"n_facts": 3}) == ([], [])


def test_heads_findings_name_the_best_heads():
    from factscope.flow.heads import heads_findings

    s = {"n_facts": 12, "top_k": 10, "mean_rate_all_heads": 0.02,
         "top_heads": [{"layer": 9, "head": 2, "rate": 0.5}, {"layer": 10, "head": 0, "rate": 0.25},
                       {"layer": 3, "head": 1, "rate": 0.125}]}
    (f,) = heads_findings(s)
    assert "L9H2" in f and "50% of 12 facts" in f and "L10H0 25%" in f and "mean head 2.0%" in f
    assert heads_findings({"n_facts": 0}) == []


def _halluc(heads=0.75, mover=0.6, n_wrong=8):
    return {"n_facts": 20, "n_right": 20 - n_wrong, "n_wrong": n_wrong, "emergence_top": 10,
            "answer_emerges_median_right": 12.0, "answer_emerges_median_wrong": 14.0,
            "first_node_head_share_wrong": heads, "first_node_head_attends_subject_wrong": mover}


def test_hallucination_findings_rules():
    from factscope.circuits.cases import hallucination_findings

    f, c = hallucination_findings(_halluc())
    assert "right for 12 of 20" in f[0] and "layer 12 when right and 14 when wrong" in f[0] and "75%" in f[0]
    assert c[0].holds is True
    assert hallucination_findings(_halluc(heads=0.4))[1][0].holds is False
    assert hallucination_findings(_halluc(mover=0.3))[1][0].holds is False
    assert hallucination_findings(_halluc(n_wrong=2))[1][0].holds is None
    assert hallucination_findings(_halluc(heads=None, mover=None))[1][0].holds is None


def _icl(h0=0.1, h1=0.6, new=0.4, all_=0.2):
    return {"n_facts": 10, "shots": 4, "hit10_without": h0, "hit10_with": h1, "hit1_without": 0.0, "hit1_with": 0.3,
            "median_rank_without": 120.0, "median_rank_with": 3.0, "new_heads_demo_share": new,
            "all_heads_demo_share": all_}


def test_icl_findings_rules():
    from factscope.circuits.cases import icl_findings

    f, c = icl_findings(_icl())
    assert "0.10 to 0.60" in f[0] and "4 demonstrations" in f[0] and "40%" in f[0] and "all heads 20%" in f[0]
    assert [x.holds for x in c] == [True, True]
    assert icl_findings(_icl(h1=0.15))[1][0].holds is None
    assert icl_findings(_icl(h1=0.1))[1][0].holds is False
    assert icl_findings(_icl(new=0.1))[1][1].holds is False
    assert icl_findings(_icl(new=None))[1][1].holds is None


def test_roles_findings_rules():
    from factscope.circuits.roles import roles_findings

    s = {"n_heads": 6, "n_mlps": 2, "mover": ["a9.h1"], "relation": ["a3.h0", "a4.h2"], "mixture": [],
         "target_MLP": ["m5"]}
    f, c = roles_findings(s)
    assert "6 heads and 2 MLPs" in f[0] and "mover 1 (a9.h1)" in f[0] and "relation 2 (a3.h0, a4.h2)" in f[0]
    assert c[0].holds is True
    assert roles_findings({**s, "relation": []})[1][0].holds is None
    assert roles_findings({**s, "relation": [], "mover": []})[1][0].holds is False
