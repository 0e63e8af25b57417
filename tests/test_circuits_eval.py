"""Circuits: data, metrics, evaluation, ACDC, views, interop and the CLI (the EVAL half of issue 11)."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from factscope.facts import load_facts


@functools.cache
def _model(name="tiny-llama"):
    from factscope.models import load_model

    return load_model(name)


@functools.cache
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


# --------------------------------------------------------------------------------------------
# evaluation: pure pieces
# --------------------------------------------------------------------------------------------


def test_rank_metrics_from_hand_ranked_logits():
    from factscope.circuits.evaluate import rank_metrics, target_ranks

    V = 30
    logits = torch.zeros(4, V)
    targets = torch.tensor([5, 7, 9, 11])
    # example 0: target on top; 1: 4 tokens above it; 2: 11 above; 3: tied with 2 others, 1 above
    # (ties count against the target: rank 3)
    logits[0, 5] = 10
    logits[1, :4] = 5
    logits[1, 7] = 3
    logits[2, :12] = 5
    logits[2, 12:] = -1
    logits[2, 9] = 4
    logits[3, [0, 1, 11]] = 2
    logits[3, 2] = 3
    assert target_ranks(logits, targets).tolist() == [0, 4, 11, 3]
    got = rank_metrics(logits, targets)
    assert got["hit1"] == pytest.approx(1 / 4)
    assert got["hit10"] == pytest.approx(3 / 4)
    assert got["mrr"] == pytest.approx((1 + 1 / 5 + 1 / 12 + 1 / 4) / 4)
    # a constant output ranks the target last
    assert rank_metrics(torch.zeros(2, V), targets[:2]) == {"hit1": 0.0, "hit10": 0.0, "mrr": pytest.approx(1 / V)}


def test_curve_areas_of_known_curves():
    from factscope.circuits.evaluate import curve_areas, faithfulness

    x = [0.0, 0.1, 0.5, 1.0]
    assert curve_areas(x, [1, 1, 1, 1]) == pytest.approx((1.0, 0.0))
    assert curve_areas(x, x) == pytest.approx((0.5, 0.5))
    # f overshoots 1: CMD counts |1 - f| on both sides; unsorted input is sorted by x
    cpr, cmd = curve_areas([1.0, 0.0, 0.5], [1.0, 0.0, 1.5])
    assert cpr == pytest.approx(0.5 * 0.75 + 0.5 * 1.25)
    assert cmd == pytest.approx(0.5 * 0.75 + 0.5 * 0.25)
    assert faithfulness(3.0, 5.0, 1.0) == 0.5 and faithfulness(2.0, 5.0, 5.0) != faithfulness(2.0, 5.0, 5.0)


def test_random_mask_is_seeded_and_inside_the_real_edges():
    from factscope.circuits.evaluate import random_mask

    real = torch.rand(20, 15) > 0.4
    a, b, c = random_mask(real, 17, 1), random_mask(real, 17, 1), random_mask(real, 17, 2)
    assert int(a.sum()) == 17 and not (a & ~real).any()
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(Exception, match="cannot draw"):
        random_mask(real, int(real.sum()) + 1, 0)


# --------------------------------------------------------------------------------------------
# ACDC on a synthetic graph (names and real edges as the spec lays them out)
# --------------------------------------------------------------------------------------------


class _SpecGraph:
    """Names and real-edge mask per the circuits spec, built independently of circuits.graph."""

    def __init__(self, L=2, H=4, KV=2):
        self.up_names = ["input"] + [n for l in range(L) for n in [f"a{l}.h{h}" for h in range(H)] + [f"m{l}"]]
        kvn = (lambda l, g, x: f"a{l}.kv{g}<{x}>") if KV < H else (lambda l, g, x: f"a{l}.h{g}<{x}>")
        self.down_names = [n for l in range(L) for n in [f"a{l}.h{h}<q>" for h in range(H)]
                           + [kvn(l, g, "k") for g in range(KV)] + [kvn(l, g, "v") for g in range(KV)] + [f"m{l}"]]
        self.down_names.append("logits")
        self.real = torch.zeros(len(self.up_names), len(self.down_names), dtype=torch.bool)
        for j, d in enumerate(self.down_names):
            lr = L if d == "logits" else int(d[1:].split(".")[0].split("<")[0])
            for i, u in enumerate(self.up_names):
                lu = -1 if u == "input" else int(u[1:].split(".")[0])
                self.real[i, j] = lu < lr or (u.startswith("a") and lu == lr and d == f"m{lr}") or d == "logits"
        self.scores = torch.zeros(self.real.shape)
        self.in_graph = self.real.clone()

    def top_n(self, n, absolute=True):
        s = (self.scores.abs() if absolute else self.scores).masked_fill(~self.real, -float("inf"))
        self.in_graph = torch.zeros_like(self.real)
        self.in_graph.view(-1)[s.flatten().topk(n).indices] = n > 0
        self.in_graph &= self.real

    def prune_dead(self):  # the fake keeps every edge (the real Graph's pruning is tested with it)
        pass


def _naive_acdc(real, feeds, bad, threshold):
    cur = real.clone()
    scores = torch.zeros(real.shape)
    cur_bad = bad(cur)
    for r in range(real.shape[1] - 1, -1, -1):
        if feeds[r] and not cur[feeds[r]].any():
            cur[:, r] = False
            continue
        for u in cur[:, r].nonzero()[:, 0].flip(0).tolist():
            cur[u, r] = False
            d = bad(cur) - cur_bad
            scores[u, r] = d
            if d < threshold:
                cur_bad += d
            else:
                cur[u, r] = True
    return cur, scores


def test_acdc_batched_equals_sequential_acdc_on_a_nonlinear_metric():
    from factscope.circuits.acdc import acdc, receiver_nodes

    g = _SpecGraph()
    feeds = receiver_nodes(g.up_names, g.down_names)
    # a head's kv receiver feeds its group's query heads (H/KV = 2 per group)
    j = g.down_names.index("a1.kv1<v>")
    assert feeds[j] == [g.up_names.index("a1.h2"), g.up_names.index("a1.h3")]
    torch.manual_seed(0)
    w = torch.randn(g.real.shape) * g.real
    w2 = torch.randn(g.real.shape[1])

    def bad_one(mask):  # interactions between edges into the same receiver
        s = (w * mask.float()).sum(0)
        return float((torch.tanh(s) * w2).sum() + 0.1 * (s**2).sum())

    def run_many(masks):
        return torch.tensor([bad_one(m) for m in masks])

    for thr, batch in [(0.0, 64), (0.05, 3), (0.3, 1)]:
        want, want_scores = _naive_acdc(g.real, feeds, bad_one, thr)
        acdc(g, run_many, threshold=thr, max_batch=batch)
        assert torch.equal(g.in_graph, want), thr
        assert torch.allclose(g.scores, want_scores, atol=1e-5)
        assert 0 < int(want.sum()) < int(g.real.sum())
    # threshold 0: every accepted removal lowered the metric, so the result is no worse than the full graph
    acdc(g, run_many, threshold=0.0)
    assert bad_one(g.in_graph) <= bad_one(g.real) + 1e-6
    # a huge threshold prunes everything
    acdc(g, run_many, threshold=1e9)
    assert not g.in_graph.any()


# --------------------------------------------------------------------------------------------
# interop (EAP-IG / MIB graph JSON) and views
# --------------------------------------------------------------------------------------------


def _eap_edge_names(L, H, parallel=False):
    """Edge names of EAP-IG's Graph.from_model, written out from its construction rules."""
    stream, names = ["input"], []
    for l in range(L):
        heads = [f"a{l}.h{h}" for h in range(H)]
        for u in stream:
            names += [f"{u}->{a}<{x}>" for a in heads for x in "qkv"]
        if parallel:
            names += [f"{u}->m{l}" for u in stream]
            stream = stream + heads + [f"m{l}"]
        else:
            stream = stream + heads
            names += [f"{u}->m{l}" for u in stream]
            stream = stream + [f"m{l}"]
    return names + [f"{u}->logits" for u in stream]


def test_eap_json_import_of_an_eap_ig_file_and_export_round_trip(tmp_path):
    import json

    from factscope.circuits.interop import from_eap_json, to_eap_json

    g = _SpecGraph(L=2, H=3, KV=3)  # no grouping: names map one to one
    names = _eap_edge_names(2, 3)
    assert len(names) == int(g.real.sum())
    rng = torch.Generator().manual_seed(0)
    vals = torch.randn(len(names), generator=rng).tolist()
    d = {"cfg": {"n_layers": 2, "n_heads": 3, "parallel_attn_mlp": False, "d_model": 8},
         "nodes": {}, "edges": {n: {"score": v, "in_graph": v > 0.5} for n, v in zip(names, vals)}}
    (tmp_path / "eap.json").write_text(json.dumps(d))
    from_eap_json(g, tmp_path / "eap.json")
    for n, v in zip(names, vals):
        u, r = n.split("->")
        i, j = g.up_names.index(u), g.down_names.index(r)
        assert g.scores[i, j].item() == pytest.approx(v) and bool(g.in_graph[i, j]) == (v > 0.5)
    out = to_eap_json(g)
    assert set(out["edges"]) == set(names)
    assert all(out["edges"][n]["score"] == pytest.approx(v) for n, v in zip(names, vals))
    # a file for another model is refused
    d["cfg"]["n_layers"] = 3
    with pytest.raises(Exception, match="2 x 3"):
        from_eap_json(g, d)


def test_eap_json_export_of_grouped_kv_expands_per_query_head_and_round_trips():
    from factscope.circuits.interop import from_eap_json, to_eap_json

    g = _SpecGraph(L=2, H=4, KV=2)
    torch.manual_seed(1)
    g.scores = torch.randn(g.real.shape) * g.real
    g.in_graph = g.real & (torch.rand(g.real.shape) > 0.5)
    d = to_eap_json(g)
    assert set(d["edges"]) == set(_eap_edge_names(2, 4))
    # the shared value receiver of group 1 in layer 1 appears once per query head 2, 3 with half the score
    i, j = g.up_names.index("a0.h1"), g.down_names.index("a1.kv1<v>")
    for h in (2, 3):
        e = d["edges"][f"a0.h1->a1.h{h}<v>"]
        assert e["score"] == pytest.approx(g.scores[i, j].item() / 2) and e["in_graph"] == bool(g.in_graph[i, j])
    g2 = _SpecGraph(L=2, H=4, KV=2)
    from_eap_json(g2, d)
    assert torch.allclose(g2.scores, g.scores, atol=1e-6) and torch.equal(g2.in_graph, g.in_graph)


def test_layout_and_views(tmp_path):
    from factscope.circuits import views

    g = _SpecGraph(L=2, H=4, KV=1)
    torch.manual_seed(2)
    g.scores = torch.randn(g.real.shape) * g.real
    g.in_graph = g.real & (g.scores.abs() > 1.0)
    pos = views.layout(g)
    # rows: input at the bottom, logits on top; in a layer: heads, the shared kv receiver, the MLP
    assert pos["input"][1] == -1 and pos["logits"][1] == 2 and pos["a1.h3"][1] == 1
    row = sorted((x, n) for n, (x, y) in pos.items() if y == 0)
    assert [n for _, n in row] == ["a0.h0", "a0.h1", "a0.h2", "a0.h3", "a0.kv0", "m0"]
    edges = views.circuit_edges(g)
    assert len(edges) == int(g.in_graph.sum())
    assert [abs(e["score"]) for e in edges] == sorted((abs(e["score"]) for e in edges), reverse=True)
    assert {e["dst"] for e in edges if e["down"].endswith("<k>")} <= {"a0.kv0", "a1.kv0"}
    dot = views.to_dot(g)
    assert dot.count("\" -> \"") == len(edges) and '"a0.kv0"' in dot
    page = views.write_html(g, tmp_path / "v.html", title="test")
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    assert '"edges":' in text and f'max="{len(edges)}"' in text
    fig = views.plot_circuit(g, title="t")
    fig.savefig(tmp_path / "v.png")


def test_evaluate_circuit_with_a_fake_masked_runner():
    from factscope.circuits.evaluate import (
        curve_areas,
        evaluate_circuit,
        random_mask,
        rank_metrics,
    )
    from factscope.circuits.metrics import Metric

    g = _SpecGraph(L=2, H=4, KV=2)
    B, V = 6, 40
    torch.manual_seed(3)
    contrib = torch.randn(*g.real.shape, B, V) * g.real[..., None, None]
    base = torch.randn(B, V)
    targets = torch.randint(0, V, (B,))
    contrib[..., torch.arange(B), targets] += 0.3  # edges push the target up on average

    def runner(mask):  # logits [B, 1, V]: linear in the kept edges
        return (base + torch.einsum("ud,udbv->bv", mask.float(), contrib))[:, None]

    def nll(logits, rows):
        return -torch.log_softmax(logits[:, 0], -1).gather(-1, targets[rows, None])[:, 0]

    metric = Metric("nll", torch.zeros(B, 1, dtype=torch.long), nll, higher_is_better=False)
    g.scores = torch.randn(g.real.shape) * g.real
    total = int(g.real.sum())
    ev = evaluate_circuit(runner, metric, targets, g, 20, n_random=5, seed=7)
    assert ev.n_edges == 20 and int(g.in_graph.sum()) == 20
    assert ev.ranks["hit10"]["full"] == rank_metrics(runner(g.real)[:, 0], targets)["hit10"]
    assert ev.ranks["mrr"]["circuit"] == pytest.approx(rank_metrics(runner(g.in_graph)[:, 0], targets)["mrr"])
    rand = [rank_metrics(runner(random_mask(g.real, 20, 7 + 1000 + s))[:, 0], targets)["mrr"] for s in range(5)]
    assert ev.ranks["mrr"]["random"] == pytest.approx(sum(rand) / 5)
    assert ev.ranks["mrr"]["random_std"] == pytest.approx(torch.tensor(rand).std().item(), rel=1e-5)
    full, empty = float(metric.mean(runner(g.real))), float(metric.mean(runner(torch.zeros_like(g.real))))
    assert ev.metric_values["full"] == full and ev.metric_values["empty"] == empty
    assert ev.curve[-1]["n_edges"] == total and ev.curve[-1]["faithfulness"] == 1.0
    assert ev.curve[0]["n_edges"] == int(0.001 * total)
    assert (ev.cpr, ev.cmd) == pytest.approx(curve_areas([p["x"] for p in ev.curve], [p["faithfulness"] for p in ev.curve]))
    # every curve point is the top-k edges by |score| (written out here), not any k edges
    flat = (g.scores.abs() * g.real).flatten()
    for p in ev.curve:
        k = p["n_edges"]
        top = torch.zeros_like(flat, dtype=torch.bool)
        top[flat.topk(k).indices] = True
        want = float(metric.mean(runner(top.view_as(g.real).float())))
        assert p["metric"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert p["faithfulness"] == pytest.approx((want - empty) / (full - empty), rel=1e-5, abs=1e-6)
    assert len({round(p["faithfulness"], 4) for p in ev.curve}) > 3  # the curve is not flat
    # the circuit's own numbers come from the circuit's mask (not the random or full one)
    circ = float(metric.mean(runner(g.in_graph.float())))
    assert ev.metric_values["circuit"] == pytest.approx(circ, rel=1e-6)
    assert ev.faithfulness == pytest.approx((circ - empty) / (full - empty), rel=1e-6)
    # the whole graph as the circuit is exactly faithful
    assert evaluate_circuit(runner, metric, targets, g, total, n_random=1, fractions=None).faithfulness == 1.0


# --------------------------------------------------------------------------------------------
# CLI on a tiny model (needs the CORE half: Graph, run_masked, attribute)
# --------------------------------------------------------------------------------------------


def _cli(*args, catch=False):
    from click.testing import CliRunner

    from factscope.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=catch)


_TINY = ["--model", "tiny-llama", "--dataset", "lre:factual/country_capital_city", "--all-facts", "--limit", "12",
         "--no-progress", "--threads", "1"]


def test_cli_evaluate_writes_the_table_and_summary(tmp_path):
    import json

    out = tmp_path / "ev"
    r = _cli("circuit", "evaluate", *_TINY, "--method", "eap-ig-act", "--steps", "2", "--edges", "40",
             "--random-seeds", "2", "--out", str(out))
    assert r.exit_code == 0, r.output
    c = json.loads((out / "summary.json").read_text())["circuit"]
    assert c["method"] == "eap-ig-act"
    assert c["n_edges"] <= 40 and c["n_edges_total"] > 40
    for k in ("hit1", "hit10", "mrr"):
        assert set(c[k]) >= {"full", "circuit", "random", "random_std"}
        assert all(0 <= c[k][v] <= 1 for v in ("full", "circuit", "random"))
    assert c["faithfulness"] == c["faithfulness"] and c["cpr"] == c["cpr"] and "spearman_vs_exact" in c
    for name in ("graph.json", "circuit_eap.json", "circuit_scores.csv", "circuit.dot", "circuit_view.html",
                 "circuit.png", "circuit_eval.csv", "faithfulness_curve.csv", "faithfulness_curve.png", "report.html"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "Circuit evaluation" in html
    page = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)  # Plotly's inlined bundle names URLs
    page = page.replace("http://www.w3.org/2000/svg", "")  # the embedded view's SVG namespace (never fetched)
    assert "http://" not in page and "https://" not in page and "<script src" not in html
    assert 'class="figure-view"' in html  # the layered view is in the report
    # the EAP-IG JSON loads back into the model's graph with the same circuit
    from factscope.circuits import Graph
    from factscope.circuits.interop import from_eap_json

    g0 = Graph.from_json(out / "graph.json")
    g1 = from_eap_json(Graph.from_model(_model()), out / "circuit_eap.json")
    assert torch.equal(g0.in_graph, g1.in_graph)
    assert torch.allclose(torch.nan_to_num(g0.scores.float()) * g0.real, g1.scores.float(), atol=1e-6)


def test_cli_discover_acdc_and_bad_options(tmp_path):
    out = tmp_path / "acdc"
    r = _cli("circuit", "discover", *_TINY, "--method", "acdc", "--threshold", "0.05", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert (out / "circuit_view.html").is_file() and (out / "graph.json").is_file()
    for bad, msg in [(["--edge-fraction", "2"], "edge-fraction"), (["--dataset", "lre:factual/nope"], "nope"),
                     (["--edges", "100000"], "more than")]:
        dest = tmp_path / "bad"
        r = _cli("circuit", "evaluate", *_TINY, *bad, "--out", str(dest), catch=True)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
        assert not dest.exists()


@pytest.mark.parametrize("dims", [(3, 4, 1), (2, 4, 2), (2, 3, 3)])
def test_spec_graph_and_receiver_nodes_agree_with_the_core_graph(dims):
    from factscope.circuits import Graph
    from factscope.circuits.acdc import receiver_nodes

    g, s = Graph(*dims), _SpecGraph(*dims)
    assert g.up_names == s.up_names and g.down_names == s.down_names and torch.equal(g.real, s.real)
    own = g.owners()
    feeds = receiver_nodes(g.up_names, g.down_names)
    for r in range(g.n_down):
        assert feeds[r] == own[:, r].nonzero()[:, 0].tolist()


# --------------------------------------------------------------------------------------------
# with the real masked forward on a tiny model
# --------------------------------------------------------------------------------------------


def test_many_runner_equals_one_masked_forward_per_mask():
    from factscope.circuits import Graph, run_masked
    from factscope.circuits.acdc import many_runner
    from factscope.circuits.metrics import target_nll

    m = _model()
    d = _data().subset(range(5))
    met = target_nll(m, d.clean, d.answers)
    g = Graph.from_model(m)
    torch.manual_seed(0)
    masks = torch.stack([g.real, g.real & (torch.rand(g.real.shape) > 0.3), torch.zeros_like(g.real)]).float()
    got = many_runner(m, d.clean, met, max_rows=8)(masks)  # chunks of one mask (5 rows each)
    for k in range(3):
        with torch.no_grad():
            want = met.mean(run_masked(m, d.clean, masks[k], ablation="zero", positions=met.positions))
        assert got[k].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name,ablation,metric", [("tiny-llama", "counterfactual", "nll"),
                                                  ("tiny-gemma3", "zero", "logit_diff"), ("tiny-gpt2", "mean", "nll")])
def test_many_runner_starting_at_the_first_changed_layer_equals_masked_forwards(name, ablation, metric):
    """ACDC's runner starts its forwards at the lowest layer with a removed edge (the layers below
    frozen at their clean outputs) and only unembeds when just logits edges are removed: each value
    equals a full masked forward, for masks that change only layers >= 1, only the last layer, only
    the logits, and nothing. With the logit difference the forwards also stop at the first answer
    position and unembed two vocabulary rows."""
    from factscope.circuits import Graph, run_masked
    from factscope.circuits import metrics as M
    from factscope.circuits.acdc import many_runner

    m = _model(name)
    d = _data(name).subset(range(3))
    met = M.make(metric, m, d)
    if metric == "logit_diff":  # a multi-token answer: the columns after the first answer position are cut
        assert int(met.positions.max()) + 1 < d.clean.input_ids.shape[1]
    g = Graph.from_model(m)
    torch.manual_seed(0)
    L = m.n_layers

    def keep_below(layer):  # random removals into receivers of layers >= layer (and the logits)
        mk = g.real & (torch.rand(g.real.shape) > 0.3)
        mk[:, : g.receiver_cols(layer)["q"][0]] = g.real[:, : g.receiver_cols(layer)["q"][0]]
        return mk

    logits_only = g.real.clone()
    logits_only[torch.rand(g.n_up) > 0.5, -1] = False
    sets = [torch.stack([keep_below(1), keep_below(1), keep_below(L - 1)]),  # start at layer 1
            torch.stack([keep_below(L - 1), keep_below(L - 1)]),  # the last layer
            torch.stack([logits_only, g.real & False | g.real])]  # logits edges only / nothing removed
    ref = d.clean if ablation == "mean" else None
    run = many_runner(m, d.clean, met, ablation=ablation, corrupted=d.corrupted, reference=ref, max_rows=4)
    for masks in sets:
        got = run(masks.float())
        for k in range(len(masks)):
            with torch.no_grad():
                want = met.mean(run_masked(m, d.clean, masks[k].float(), ablation=ablation, corrupted=d.corrupted,
                                           reference=ref, positions=met.positions))
            assert got[k].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5), (k, masks.shape)


def test_acdc_on_a_tiny_model_threshold_zero_and_huge():
    from factscope.circuits import Graph
    from factscope.circuits.acdc import acdc, many_runner
    from factscope.circuits.metrics import target_nll

    m = _model()
    d = _data().subset(range(2))
    met = target_nll(m, d.clean, d.answers)
    run_many = many_runner(m, d.clean, met)
    g = acdc(Graph.from_model(m), run_many, threshold=0.0)
    full, final = run_many(torch.stack([g.real, g.in_graph]).float()).tolist()
    assert 0 < int(g.in_graph.sum()) < g.n_edges
    assert final <= full + 1e-4  # every accepted removal lowered the NLL
    kept = g.in_graph & g.real
    assert (g.scores[kept] >= 0).all()  # a kept edge's removal did not lower the metric
    g = acdc(Graph.from_model(m), run_many, threshold=1e9)
    assert not g.in_graph.any()


def test_spearman_and_compare_with_exact_on_a_tiny_model():
    from factscope.circuits.run import Options, compare_with_exact, discover, spearman

    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a * 10) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    # ties get average ranks: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(0.9486833, abs=1e-6)
    m = _model()
    d = _data().subset(range(3))
    opts = Options(method="exact", ablation="counterfactual")
    ex = discover(m, d, opts)
    # exact scores compared with themselves
    cmp = compare_with_exact(m, ex, d, opts, n_facts=3)
    assert cmp["spearman"] == pytest.approx(1.0) and cmp["top50_overlap"] == 1.0
    g = discover(m, d, Options(method="eap-ig", ablation="counterfactual"))
    cmp = compare_with_exact(m, g, d, Options(method="eap-ig", ablation="counterfactual"), n_facts=3)
    assert 0.3 < cmp["spearman"] <= 1.0  # reported, not the acceptance bound (bench_circuits.py)


def test_circuit_view_in_headless_chromium(tmp_path):
    """The layered view renders offline: no console errors, the slider sets the edges shown, hover
    names the edge and its score (skipped without chromium/chromedriver, as test_report_browser)."""
    import tempfile

    from test_report_browser import _find_browser

    browser, driver_path = _find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from factscope.circuits import Graph, views

    g = Graph(3, 4, 1)
    torch.manual_seed(4)
    g.scores = torch.randn(g.real.shape) * g.real
    g.top_n(40)
    path = views.write_html(g, tmp_path / "view.html", title="view test", initial=25)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--window-size=1300,900", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(path.resolve().as_uri())
        shown = lambda: [p for p in driver.find_elements(By.CSS_SELECTOR, "path.cv-edge")
                         if p.value_of_css_property("display") != "none"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "path.cv-edge")) == 40 and len(shown()) == 25
        assert driver.find_element(By.ID, "cv-kval").text == "25 of 40 edges"
        driver.execute_script("const s = document.getElementById('cv-k'); s.value = 7;"
                              "s.dispatchEvent(new Event('input'))")
        assert len(shown()) == 7
        strongest = views.circuit_edges(g)[0]
        top = next(p for p in shown() if p.get_attribute("data-rank") == "0")
        ActionChains(driver).move_to_element(top).perform()
        info = driver.find_element(By.ID, "cv-info").text
        assert strongest["name"] in info and "rank 1 of 40" in info
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], severe
    finally:
        driver.quit()


def test_the_report_shows_the_circuit_view_offline(tmp_path):
    """A run's report embeds the circuit's layered view (name_view.html beside name.png) in place of
    the PNG: in headless Chromium with every network URL blocked its edges draw, the slider works,
    nothing is fetched; --static shows the PNG."""
    from test_report_browser import _chromium
    from selenium.webdriver.common.by import By

    from factscope.circuits import Graph, views
    from factscope.runs import Run

    g = Graph(3, 4, 1)
    torch.manual_seed(5)
    g.scores = torch.randn(g.real.shape) * g.real
    g.top_n(30)
    run = Run.create(tmp_path / "run", {"analysis": "circuit view test"})
    views.write_html(g, run.path("circuit_view.html"), title="view test", initial=20)
    run.save_figure("circuit", views.plot_circuit(g, title="view test"), interactive=False)
    run.add_section("circuit", "Circuit", "text", figures=["circuit"])
    page = run.write_report().read_text()
    assert "<iframe" in page and 'sandbox="allow-scripts"' in page and "data:image/png" not in page
    assert "<iframe" not in run.write_report(static=True).read_text()
    path = run.write_report()
    driver = _chromium(tmp_path)
    try:
        driver.get(path.resolve().as_uri())
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe.figure-view"))
        edges = driver.find_elements(By.CSS_SELECTOR, "path.cv-edge")
        assert len(edges) == 30
        assert len([p for p in edges if p.value_of_css_property("display") != "none"]) == 20
        driver.execute_script("const s = document.getElementById('cv-k'); s.value = 5; s.dispatchEvent(new Event('input'))")
        assert driver.find_element(By.ID, "cv-kval").text == "5 of 30 edges"
        driver.switch_to.default_content()
        fetched = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")
        assert fetched == []
        assert [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"] == []
    finally:
        driver.quit()


def test_scores_from_shards_equal_the_whole_batch():
    """What --executor ray does with the gradient methods and exact patching: one shard of facts
    per worker, each scored alone, combined by size. Equal to scoring the whole batch (mean
    ablation still averages over every fact; each fact keeps its counterfactual partner), and the
    shards really are scored separately."""
    from factscope import executors
    from factscope.circuits import run as R

    class Shards(executors.Local):
        workers = 3

    model, data = _model(), _data(n=8)  # 5 facts: shards of 2, 1 and 2 (unequal sizes)
    n = len(data)
    sizes = sorted(round((i + 1) * n / 3) - round(i * n / 3) for i in range(3))
    for method, ablation, metric in [("eap-ig", "zero", "nll"), ("eap-ig", "mean", "kl"),
                                     ("eap", "counterfactual", "logit_diff"), ("exact", "zero", "nll")]:
        opts = R.Options(method=method, ablation=ablation, metric=metric)
        whole = R.discover(model, data, opts).scores
        calls = []
        real = R._scores
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(R, "_scores", lambda m, d, o, r: calls.append((len(d), len(r))) or real(m, d, o, r))
            with executors.using(Shards()):
                sharded = R.discover(model, data, opts).scores
        assert sorted(calls) == [(k, n if ablation == "mean" else k) for k in sizes], (method, calls)
        assert whole.abs().max() > 1e-3
        assert torch.allclose(sharded, whole, atol=1e-5, rtol=1e-4), (method, (sharded - whole).abs().max())

    class Many(executors.Local):
        workers = 7

    # more workers than facts: one fact a shard; one fact: the whole batch, as locally
    opts = R.Options(method="eap-ig")
    for d, want in [(data, [(1, 1)] * n), (data.subset([0]), [(1, 1)])]:
        whole, calls = R.discover(model, d, opts).scores, []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(R, "_scores", lambda m, d_, o, r: calls.append((len(d_), len(r))) or real(m, d_, o, r))
            with executors.using(Many()):
                sharded = R.discover(model, d, opts).scores
        assert calls == want and torch.allclose(sharded, whole, atol=1e-5, rtol=1e-4)
