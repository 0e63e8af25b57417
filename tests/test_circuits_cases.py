"""Hallucination and in-context-learning pieces (circuits/cases.py) and the four commands."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from factscope.circuits import cases as C
from factscope.circuits.graph import Graph
from factscope.facts import load_facts, target_ids
from tests.conftest import _load


def _facts():
    return load_facts("lre:factual/country_capital_city")


def test_with_demos_positions_cover_exactly_the_demonstrations():
    model = _load("tiny-llama")
    fs = _facts()
    queries, pool = fs[:3], fs[3:]
    demos = C.demonstrations(pool + queries, queries, 2, seed=1)
    assert not {d.prompt for d in demos} & {q.prompt for q in queries}
    assert demos == C.demonstrations(pool + queries, queries, 2, seed=1)  # seeded
    shots, pos = C.with_demos(model, queries, demos)
    text = C.demo_text(demos)
    assert text.count("\n") == 2 and demos[0].target_true in text
    for q, s, p in zip(queries, shots, pos):
        ids = model.tokenizer(s.prompt)["input_ids"]
        assert model.tokenizer.decode(ids[p[0] : p[-1] + 1]) == text
        assert model.tokenizer.decode(ids[p[-1] + 1 :]) == q.prompt
        # the subject is found in the query, not in a demonstration
        assert s.prompt[s.subject_start :].startswith(q.subject) and s.subject_start > len(text) - 1


def test_compare_graphs():
    a, b = Graph(2, 2), Graph(2, 2)
    a.in_graph.zero_()
    b.in_graph.zero_()
    for g, names in ((a, ["input->a0.h0<q>", "a0.h0->logits", "input->logits"]),
                     (b, ["input->a0.h0<q>", "a0.h0->logits", "input->a1.h1<v>", "a1.h1->logits"])):
        for n in names:
            g.in_graph[g.edge_index(n)] = True
    c = C.compare_graphs(a, b)
    assert c["edges_shared"] == 2 and c["edge_jaccard"] == pytest.approx(2 / 5)
    assert c["nodes_new"] == ["a1.h1"] and c["nodes_lost"] == []
    assert c["edges_new"] == ["a1.h1->logits", "input->a1.h1<v>"] and c["edges_lost"] == ["input->logits"]


def test_model_answers_are_the_best_relation_answer():
    model = _load("tiny-gpt2")
    fs = _facts()[:6]
    answers = C.answer_tokens(model, _facts())
    got, lg = C.model_answers(model, fs, answers)
    for i in range(len(fs)):
        best = max(answers, key=lambda a: float(lg[i, a]))
        assert got[i] == best and got[i] in answers
    sw = C.swap_targets(model, fs, got)
    assert [target_ids(model.tokenizer, f.prompt, f.target_true)[0] for f in sw] == got
    assert [f.prompt for f in sw] == [f.prompt for f in fs]


def test_first_promoters():
    """Bottom-up, the first node ranking the answer in the top k and above the competitor."""
    order = {"a0.h0": 0, "m0": 1, "a1.h0": 2, "m1": 3}

    class F:
        def __init__(self, s):
            self.id, self.subject = s, s

    facts = [F("w"), F("r")]
    ans = pd.DataFrame([
        # wrong fact: m0 ranks the answer 2 and the target 2 (a tie is not above); a1.h0 ranks it 3 vs 50
        ("w", "a0.h0", 30, "head", 0, 0.1), ("w", "m0", 2, "mlp", 0, None), ("w", "a1.h0", 3, "head", 1, 0.7),
        ("w", "m1", 0, "mlp", 1, None),
        # right fact: a0.h0 ranks it 1, the best other answer 0 (no); m0 ranks it 4, other 9 -> m0
        ("r", "a0.h0", 1, "head", 0, 0.2), ("r", "m0", 4, "mlp", 0, None), ("r", "a1.h0", 0, "head", 1, 0.9),
        ("r", "m1", 0, "mlp", 1, None)],
        columns=["fact", "node", "target_rank", "kind", "layer", "att_subject"])
    tgt = ans.copy()
    tgt["target_rank"] = [100, 2, 50, 9, 1, 4, 0, 0]
    best_other = {("r", "a0.h0"): 0, ("r", "m0"): 9, ("r", "a1.h0"): 1, ("r", "m1"): 1}
    out = C.first_promoters(ans, tgt, [False, True], order, 20, facts, best_other).set_index("fact")
    assert out.loc["w", "node"] == "a1.h0" and out.loc["w", "competitor_rank"] == 50
    assert out.loc["r", "node"] == "m0"
    out = C.first_promoters(ans, tgt, [False, True], order, 3, facts, best_other).set_index("fact")
    assert out.loc["w", "node"] == "m1"  # top 3 only: a1.h0 (rank 3) no longer counts


def _cli(args):
    from factscope.cli import main

    return CliRunner().invoke(main, ["circuit", *args, "--no-progress"])


def test_commands_on_a_tiny_model(tmp_path):
    """The four commands run end to end on a tiny model and write their files and summaries."""
    r = _cli(["lens", "--model", "tiny-llama", "--all-facts", "--limit", "6", "--bootstrap", "50",
              "--out", str(tmp_path / "lens")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "lens" / "summary.json").read_text())["lens"]
    assert s["n_facts"] == 6
    df = pd.read_csv(tmp_path / "lens" / "lens_by_layer.csv")
    assert df["layer"].tolist() == list(range(-1, 4))
    assert (df["median_rank_last_lo"] <= df["median_rank_last"]).all()
    assert (df["median_rank_last"] <= df["median_rank_last_hi"]).all()
    common = ["--model", "tiny-llama", "--ablation", "counterfactual", "--edges", "40", "--limit", "8"]
    r = _cli(["roles", *common, "--all-facts", "--out", str(tmp_path / "roles")])
    assert r.exit_code == 0, r.output
    t = pd.read_csv(tmp_path / "roles" / "roles.csv")
    assert set(t["kind"]) <= {"head", "mlp"} and len(t) > 0
    r = _cli(["roles", *common, "--all-facts", "--graph", str(tmp_path / "roles" / "graph.json"),
              "--out", str(tmp_path / "roles2")])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(tmp_path / "roles2" / "roles.csv")["node"].tolist() == t["node"].tolist()
    r = _cli(["hallucination", *common, "--out", str(tmp_path / "hall")])
    assert r.exit_code == 0, r.output
    h = json.loads((tmp_path / "hall" / "summary.json").read_text())["hallucination"]
    assert h["n_right"] + h["n_wrong"] == 8
    r = _cli(["icl", *common, "--shots", "2", "--out", str(tmp_path / "icl")])
    assert r.exit_code == 0, r.output
    i = json.loads((tmp_path / "icl" / "summary.json").read_text())["icl"]
    assert i["shots"] == 2 and len(i["demonstrations"]) == 2
    assert (tmp_path / "icl" / "icl.png").is_file() and (tmp_path / "icl" / "report.html").is_file()


def test_bad_input_is_one_clear_error(tmp_path):
    g = tmp_path / "g.json"
    Graph(2, 2).to_json(g)
    r = _cli(["roles", "--model", "tiny-llama", "--all-facts", "--graph", str(g), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "is not a graph of tiny-llama" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
    r = _cli(["icl", "--model", "tiny-llama", "--shots", "0", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--shots" in r.output
