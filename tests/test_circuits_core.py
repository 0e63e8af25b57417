"""Circuits core: the graph, receiving-side hook points, the masked forward, attribution."""

from __future__ import annotations

import heapq
import math
import re

import pytest
import torch

from factscope.circuits import Graph
from factscope.errors import FactscopeError

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------------------------


def _layer(name: str, L: int) -> int:
    return L if name == "logits" else int(re.match(r"^[am](\d+)", name).group(1))


def _naive_real(g: Graph, parallel: bool) -> torch.Tensor:
    """Real edges from the names alone (independent of the index arithmetic)."""
    L = g.n_layers
    real = torch.zeros(g.n_up, g.n_down, dtype=torch.bool)
    for j, r in enumerate(g.down_names):
        lr = _layer(r, L)
        for i, u in enumerate(g.up_names):
            lu = -1 if u == "input" else _layer(u, L)
            same_layer_head_to_mlp = u.startswith("a") and lu == lr and r == f"m{lr}" and not parallel
            real[i, j] = lu < lr or same_layer_head_to_mlp or r == "logits"
    return real


@pytest.mark.parametrize("L,H,KV,parallel", [(18, 4, 1, False), (4, 4, 2, False), (3, 4, 4, False), (3, 4, 2, True)])
def test_graph_layout(L, H, KV, parallel):
    g = Graph(L, H, KV, parallel_attn=parallel)
    assert g.n_up == 1 + L * (H + 1) and g.n_down == L * (H + 2 * KV + 1) + 1
    assert torch.equal(g.real, _naive_real(g, parallel))
    kvname = "kv" if KV < H else "h"
    assert g.down_names[H : H + 2 * KV] == [f"a0.{kvname}{i}<k>" for i in range(KV)] + [f"a0.{kvname}{i}<v>" for i in range(KV)]
    assert g.down_names[H + 2 * KV] == "m0" and g.down_names[-1] == "logits" and g.up_names[-1] == f"m{L - 1}"
    names = g.edge_names()
    assert len(names) == g.n_edges == len(set(names))
    if (L, H, KV) == (18, 4, 1):
        assert g.n_edges == 5644
    assert "input->a0.h1<q>" in names and f"m{L - 2}->logits" in names and ("a1.h0->m1" in names) != parallel
    assert "m1->a1.h0<q>" not in names and "a1.h0->a1.h1<q>" not in names
    if parallel:
        assert Graph(L, H, KV).n_edges - g.n_edges == L * H
    for n in names[:: max(1, len(names) // 50)]:
        u, r = g.edge_index(n)
        assert f"{g.up_names[u]}->{g.down_names[r]}" == n
    with pytest.raises(FactscopeError, match="not an edge"):
        g.edge_index("m0->a0.h0<q>")


def _scored(L=3, H=4, KV=2, seed=0) -> Graph:
    g = Graph(L, H, KV)
    gen = torch.Generator().manual_seed(seed)
    g.scores = torch.randn(g.n_up, g.n_down, generator=gen) * g.real
    return g


def test_top_n_and_threshold():
    g = _scored()
    real_scores = g.scores[g.real]
    for n in (0, 1, 7, g.n_edges):
        g.top_n(n)
        assert int(g.in_graph.sum()) == n and not (g.in_graph & ~g.real).any()
        if 0 < n < g.n_edges:  # every kept |score| >= every dropped |score|
            assert g.scores[g.in_graph].abs().min() >= g.scores[g.real & ~g.in_graph].abs().max()
    g.top_n(5, absolute=False)
    assert torch.equal(g.scores[g.in_graph].sort().values, real_scores.sort().values[-5:])
    t = float(real_scores.abs().median())
    g.threshold(t)
    assert int(g.in_graph.sum()) == int((real_scores.abs() >= t).sum())
    with pytest.raises(FactscopeError):
        g.top_n(g.n_edges + 1)


def _node_of_receiver(r: str, H: int, KV: int) -> list[str]:
    if r == "logits":
        return ["logits"]
    m = re.match(r"^a(\d+)\.(h|kv)(\d+)<([qkv])>$", r)
    if not m:
        return [r]
    l, kind, i, x = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
    if x == "q" or kind == "h" and KV == H:
        return [f"a{l}.h{i}"]
    per = H // KV
    return [f"a{l}.h{h}" for h in range(i * per, (i + 1) * per)]


def test_greedy_matches_a_heap_implementation():
    """EAP-IG's greedy (a heap of candidate parent edges of nodes in the graph) written independently."""
    g = _scored(seed=1)
    H, KV = g.n_heads, g.n_kv_heads
    edges = [(n, float(g.scores[g.edge_index(n)].abs())) for n in g.edge_names()]
    into: dict[str, list] = {}
    for n, s in edges:
        u, r = n.split("->")
        for node in _node_of_receiver(r, H, KV):
            into.setdefault(node, []).append((-s, n, u))
    n_keep = 25
    heap = list(into["logits"])
    heapq.heapify(heap)
    kept, nodes = set(), {"logits"}
    while len(kept) < n_keep:
        _, n, u = heapq.heappop(heap)
        if n in kept:
            continue
        kept.add(n)
        if u not in nodes:
            nodes.add(u)
            for item in into.get(u, []):
                heapq.heappush(heap, item)
    g.greedy(n_keep)
    assert set(g.edge_names("in_graph")) == kept


def test_prune_dead_matches_path_search():
    g = _scored(seed=2)
    H, KV = g.n_heads, g.n_kv_heads
    g.top_n(40)
    kept = g.edge_names("in_graph")
    g.prune_dead()
    pruned = set(g.edge_names("in_graph"))
    # naive: an edge survives iff input reaches its upstream node and its receiver's node reaches logits
    succ: dict[str, set] = {}
    for n in kept:
        u, r = n.split("->")
        for node in _node_of_receiver(r, H, KV):
            succ.setdefault(u, set()).add(node)

    def reach(src, dst):
        seen, todo = {src}, [src]
        while todo:
            x = todo.pop()
            if x == dst:
                return True
            for y in succ.get(x, ()):
                if y not in seen:
                    seen.add(y)
                    todo.append(y)
        return False

    expect = {n for n in kept if reach("input", n.split("->")[0])
              and any(reach(node, "logits") for node in _node_of_receiver(n.split("->")[1], H, KV))}
    assert pruned == expect and 0 < len(expect) < len(kept)
    nodes = set(g.nodes_in_graph())
    assert "input" in nodes and "logits" in nodes
    assert nodes == {n.split("->")[0] for n in expect} | {x for n in expect for x in _node_of_receiver(n.split("->")[1], H, KV)}


def test_json_round_trip(tmp_path):
    g = _scored(seed=3)
    g.top_n(30)
    g.scores[0, 0] = float("nan")  # off the real edges: not written
    r = g.real.nonzero()[5]
    g.scores[r[0], r[1]] = float("nan")
    g.to_json(tmp_path / "g.json")
    h = Graph.from_json(tmp_path / "g.json")
    assert (h.n_layers, h.n_heads, h.n_kv_heads) == (3, 4, 2)
    assert torch.equal(h.in_graph, g.in_graph)
    assert torch.equal(torch.nan_to_num(h.scores[g.real], nan=7.0), torch.nan_to_num(g.scores[g.real], nan=7.0))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FactscopeError, match="not a factscope circuit graph"):
        Graph.from_json(tmp_path / "bad.json")
