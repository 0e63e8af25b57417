"""The computation graph of a transformer as dense edge tensors (as EAP-IG's ``Graph``).

Upstream nodes (rows): ``input`` (the embeddings fed to layer 0), then per layer ``l`` the heads
``a{l}.h{h}`` and the MLP ``m{l}``; ``n_up = 1 + L * (H + 1)``.
Receivers (columns), per layer: each query head's query input ``a{l}.h{h}<q>``, then the key and
value inputs of each key/value head (``a{l}.h{g}<k>``/``<v>``, or ``a{l}.kv{g}<k>``/``<v>`` when
grouped-query attention shares one key/value head among ``H / KV`` query heads: one receiver, not
ungrouped copies, as Edge Pruning models it), then ``m{l}``; finally ``logits``;
``n_down = L * (H + 2 * KV + 1) + 1``.

Real edges: ``input`` and every node of a layer below ``l`` feed every receiver of layer ``l``; the
heads of layer ``l`` also feed ``m{l}`` (not with parallel attention and MLP); everything feeds
``logits``. ``scores``, ``in_graph`` and ``real`` are ``[n_up, n_down]`` tensors; scores follow
EAP-IG's sign convention (metric with the edge ablated minus clean) and selection uses ``|score|``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from factscope.errors import FactscopeError

FORMAT = "factscope-circuit-graph"


class Graph:
    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, parallel_attn: bool = False):
        kv = n_heads if n_kv_heads is None else n_kv_heads
        if n_layers < 1 or n_heads < 1 or kv < 1 or n_heads % kv:
            raise FactscopeError(f"bad graph dims: {n_layers} layers, {n_heads} heads, {kv} key/value heads")
        self.n_layers, self.n_heads, self.n_kv_heads, self.parallel_attn = n_layers, n_heads, kv, bool(parallel_attn)
        L, H = n_layers, n_heads
        self.up_names = ["input"] + [n for l in range(L) for n in [f"a{l}.h{h}" for h in range(H)] + [f"m{l}"]]
        kvn = (lambda l, g, x: f"a{l}.kv{g}<{x}>") if kv < H else (lambda l, g, x: f"a{l}.h{g}<{x}>")
        self.down_names = [
            n
            for l in range(L)
            for n in [f"a{l}.h{h}<q>" for h in range(H)]
            + [kvn(l, g, "k") for g in range(kv)]
            + [kvn(l, g, "v") for g in range(kv)]
            + [f"m{l}"]
        ] + ["logits"]
        self.n_up, self.n_down = len(self.up_names), len(self.down_names)
        real = torch.zeros(self.n_up, self.n_down, dtype=torch.bool)
        for l in range(L):
            c = self.receiver_cols(l)
            real[: self.up_start(l), c["q"][0] : c["m"]] = True
            real[: self.up_start(l) + (0 if self.parallel_attn else H), c["m"]] = True
        real[:, -1] = True
        self.real = real
        self.scores = torch.zeros(self.n_up, self.n_down)
        self.in_graph = real.clone()
        self._up_index = {n: i for i, n in enumerate(self.up_names)}
        self._down_index = {n: i for i, n in enumerate(self.down_names)}

    @classmethod
    def from_model(cls, model) -> "Graph":
        from factscope import hooks

        why = hooks.receiver_support(model)
        if why:
            raise FactscopeError(f"knowledge circuits are not available for {model.name}: {why}")
        return cls(model.n_layers, model.n_heads, model.n_kv_heads, model.parallel)

    # -- layout -------------------------------------------------------------------------------
    def up_start(self, l: int) -> int:
        """Row of ``a{l}.h0`` (= the number of upstream nodes feeding layer ``l``'s attention)."""
        return 1 + l * (self.n_heads + 1)

    def head_row(self, l: int, h: int) -> int:
        return self.up_start(l) + h

    def mlp_row(self, l: int) -> int:
        return self.up_start(l) + self.n_heads

    def receiver_cols(self, l: int) -> dict:
        """Columns of layer ``l``'s receivers: ``q``, ``k``, ``v`` as (start, stop) and ``m`` as an index."""
        H, KV = self.n_heads, self.n_kv_heads
        b = l * (H + 2 * KV + 1)
        return {"q": (b, b + H), "k": (b + H, b + H + KV), "v": (b + H + KV, b + H + 2 * KV), "m": b + H + 2 * KV}

    def up_index(self, name: str) -> int:
        try:
            return self._up_index[name]
        except KeyError:
            raise FactscopeError(f"unknown upstream node {name!r}") from None

    def down_index(self, name: str) -> int:
        try:
            return self._down_index[name]
        except KeyError:
            raise FactscopeError(f"unknown receiver {name!r}") from None

    @property
    def n_edges(self) -> int:
        """The number of real edges."""
        return int(self.real.sum())

    def edge_names(self, which: str = "real") -> list[str]:
        """``U->R`` names of the real edges (``which="in_graph"``: of the edges in the graph), row-major."""
        m = self.real if which == "real" else (self.in_graph & self.real)
        return [f"{self.up_names[u]}->{self.down_names[r]}" for u, r in m.nonzero().tolist()]

    def edge_index(self, name: str) -> tuple[int, int]:
        try:
            u, r = name.split("->")
        except ValueError:
            raise FactscopeError(f"bad edge name {name!r} (expected 'U->R')") from None
        i, j = self.up_index(u), self.down_index(r)
        if not self.real[i, j]:
            raise FactscopeError(f"{name!r} is not an edge of this graph")
        return i, j

    def owners(self) -> torch.Tensor:
        """bool ``[n_up, n_down]``: upstream node ``u`` owns receiver ``r`` (a head its q input and its
        key/value head's k and v inputs, an MLP its input). ``logits`` has no owner row."""
        H, KV = self.n_heads, self.n_kv_heads
        own = torch.zeros(self.n_up, self.n_down, dtype=torch.bool)
        for l in range(self.n_layers):
            c = self.receiver_cols(l)
            for h in range(H):
                g = h // (H // KV)
                row = self.head_row(l, h)
                own[row, c["q"][0] + h] = own[row, c["k"][0] + g] = own[row, c["v"][0] + g] = True
            own[self.mlp_row(l), c["m"]] = True
        return own

    # -- selection ----------------------------------------------------------------------------
    def _ranked(self, absolute: bool) -> torch.Tensor:
        s = torch.nan_to_num(self.scores.float(), nan=0.0)
        s = s.abs() if absolute else s
        return s.masked_fill(~self.real, float("-inf"))

    def top_n(self, n: int, absolute: bool = True) -> "Graph":
        """Keep the ``n`` real edges with the highest (absolute) scores."""
        if not 0 <= n <= self.n_edges:
            raise FactscopeError(f"cannot keep {n} edges of a graph with {self.n_edges}")
        keep = torch.zeros(self.n_up * self.n_down, dtype=torch.bool)
        keep[self._ranked(absolute).flatten().topk(n).indices] = True
        self.in_graph = keep.view(self.n_up, self.n_down) & self.real
        return self

    def threshold(self, t: float, absolute: bool = True) -> "Graph":
        """Keep the real edges whose (absolute) score is at least ``t``."""
        self.in_graph = self.real & (self._ranked(absolute) >= t)
        return self

    def greedy(self, n: int, absolute: bool = True) -> "Graph":
        """EAP-IG's greedy selection: start from ``logits`` and repeatedly add the highest-scoring edge
        into a receiver of a node already in the graph (its upstream node joins the graph)."""
        if not 0 <= n <= self.n_edges:
            raise FactscopeError(f"cannot keep {n} edges of a graph with {self.n_edges}")
        s = self._ranked(absolute)
        own = self.owners()
        active = torch.zeros(self.n_down, dtype=torch.bool)
        active[-1] = True  # logits
        in_nodes = torch.zeros(self.n_up, dtype=torch.bool)
        keep = torch.zeros_like(self.real)
        for _ in range(n):
            cand = s.masked_fill(~active.unsqueeze(0) | keep, float("-inf"))
            i = int(cand.flatten().argmax())
            if cand.flatten()[i] == float("-inf"):
                break
            u, r = divmod(i, self.n_down)
            keep[u, r] = True
            if not in_nodes[u]:
                in_nodes[u] = True
                active |= own[u]
        self.in_graph = keep
        return self

    # -- structure ----------------------------------------------------------------------------
    def prune_dead(self) -> "Graph":
        """Remove edges not on a path from ``input`` to ``logits``: the upstream node must be reachable
        from ``input`` and the receiver's node must reach ``logits`` (one pass suffices: every edge left
        lies on such a path)."""
        g = self.in_graph & self.real
        own = self.owners()
        fwd = torch.zeros(self.n_up, dtype=torch.bool)
        fwd[0] = True
        for u in range(1, self.n_up):  # rows are in topological order
            fwd[u] = bool((g[fwd][:, own[u]]).any())
        alive_r = torch.zeros(self.n_down, dtype=torch.bool)
        alive_r[-1] = True
        bwd = torch.zeros(self.n_up, dtype=torch.bool)
        for u in range(self.n_up - 1, -1, -1):  # a node's receivers feed later nodes only
            bwd[u] = bool((g[u] & alive_r).any())
            if bwd[u]:
                alive_r |= own[u]
        self.in_graph = g & fwd.unsqueeze(1) & alive_r.unsqueeze(0)
        return self

    def nodes_in_graph(self) -> list[str]:
        """Nodes touched by an edge in the graph (upstream ends, receivers' nodes and ``logits``)."""
        g = self.in_graph & self.real
        used = g.any(1) | (self.owners() & g.any(0).unsqueeze(0)).any(1)
        names = [n for i, n in enumerate(self.up_names) if used[i]]
        if g[:, -1].any():
            names.append("logits")
        return names

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        sc = self.scores.float()
        edges = {}
        for u, r in self.real.nonzero().tolist():
            s = float(sc[u, r])
            edges[f"{self.up_names[u]}->{self.down_names[r]}"] = {
                "score": None if s != s else s, "in_graph": bool(self.in_graph[u, r])}
        return {"format": FORMAT, "version": 1, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "parallel_attn": self.parallel_attn, "edges": edges}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise FactscopeError("not a factscope circuit graph (use circuits.interop for EAP-IG/MIB JSON)")
        try:
            g = cls(int(d["n_layers"]), int(d["n_heads"]), int(d["n_kv_heads"]), bool(d.get("parallel_attn", False)))
            edges = d["edges"]
        except (KeyError, TypeError, ValueError) as e:
            raise FactscopeError(f"malformed circuit graph: {e}") from None
        g.in_graph = torch.zeros_like(g.real)
        for name, e in edges.items():
            u, r = g.edge_index(name)
            s = e.get("score")
            g.scores[u, r] = float("nan") if s is None else float(s)
            g.in_graph[u, r] = bool(e.get("in_graph", False))
        return g

    @classmethod
    def from_json(cls, path: str | Path) -> "Graph":
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FactscopeError(f"cannot read circuit graph {p}: {e}") from None
        return cls.from_dict(d)

    def __repr__(self) -> str:
        return (f"Graph({self.n_layers} layers, {self.n_heads} heads, {self.n_kv_heads} kv heads: "
                f"{self.n_edges} edges, {int((self.in_graph & self.real).sum())} in graph)")
