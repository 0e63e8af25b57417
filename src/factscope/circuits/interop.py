"""Import/export of EAP-IG / MIB graph JSON (``hannamw/EAP-IG`` ``Graph.to_json``/``from_json``).

Their format: ``{"cfg": {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"}, "nodes": {name:
{"in_graph": bool}}, "edges": {"U->R": {"score": float, "in_graph": bool}}}`` with the same node and
edge names as ours (``input``, ``a{l}.h{h}``, ``m{l}``, ``logits``; ``U->a{l}.h{h}<q|k|v>``).

Grouped-query models: EAP-IG has one key and one value receiver per *query* head (TransformerLens
splits the shared key/value input into per-head copies); we have one per key/value head
(``a{l}.kv{g}<k|v>``, shared by the query heads of group g). Export writes each shared receiver's
edge once per query head of its group with ``in_graph`` copied and the score divided evenly among
them (gradient scores of per-head copies of a shared input sum to the shared input's score, so the
totals agree); import sums the group's per-head scores and keeps the edge when any of the group's
copies is in the graph (a removal that only some query heads see cannot be expressed with a shared
receiver). Export followed by import is the identity; ``cfg`` carries ``n_key_value_heads`` too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from factscope.errors import FactscopeError

_KV = re.compile(r"^(.*)->a(\d+)\.kv(\d+)<([kv])>$")


def _dims(graph) -> tuple[int, int, int]:
    heads = [n for n in graph.up_names if re.match(r"^a0\.h\d+$", n)]
    H = len(heads)
    L = sum(1 for n in graph.up_names if re.match(r"^m\d+$", n))
    kv = {receiver for receiver in graph.down_names if receiver.startswith("a0.") and receiver.endswith("<k>")}
    return L, H, len(kv)


def to_eap_json(graph, path: str | Path | None = None, d_model: int | None = None,
                parallel_attn_mlp: bool | None = None) -> dict:
    """The EAP-IG JSON dict of ``graph`` (written to ``path`` when given)."""
    L, H, KV = _dims(graph)
    per = H // KV
    sc = torch.nan_to_num(graph.scores.float(), nan=0.0)
    edges: dict[str, dict] = {}
    for u, r in graph.real.nonzero().tolist():
        name = f"{graph.up_names[u]}->{graph.down_names[r]}"
        s, on = float(sc[u, r]), bool(graph.in_graph[u, r])
        m = _KV.match(name)
        if m:
            src, l, g, x = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            for h in range(g * per, (g + 1) * per):
                edges[f"{src}->a{l}.h{h}<{x}>"] = {"score": s / per, "in_graph": on}
        else:
            edges[name] = {"score": s, "in_graph": on}
    used = {"logits"}
    for name, e in edges.items():
        if e["in_graph"]:
            src, dst = name.split("->")
            used.add(src)
            used.add(re.sub(r"<[qkv]>$", "", dst))
    nodes = {n: {"in_graph": n in used} for n in list(graph.up_names) + ["logits"]}
    par = parallel_attn_mlp
    if par is None:
        par = not any(graph.real[graph.up_names.index(f"a0.h{h}"), graph.down_names.index("m0")] for h in range(H))
    d = {"cfg": {"n_layers": L, "n_heads": H, "n_key_value_heads": KV, "parallel_attn_mlp": bool(par),
                 "d_model": d_model}, "nodes": nodes, "edges": edges}
    if path is not None:
        from factscope.runs import atomic_write_text

        atomic_write_text(Path(path), json.dumps(d))
    return d


def from_eap_json(graph, source: str | Path | dict):
    """Fill ``graph.scores`` and ``graph.in_graph`` from an EAP-IG JSON file (or dict); returns graph.

    The file's layers and heads must match the graph's; every real edge of the graph must be present.
    """
    d = source if isinstance(source, dict) else json.loads(Path(source).read_text(encoding="utf-8"))
    if not isinstance(d, dict) or not {"cfg", "edges"} <= set(d):
        raise FactscopeError(f"{source}: not an EAP-IG graph JSON (needs 'cfg' and 'edges')")
    L, H, KV = _dims(graph)
    cfg = d["cfg"]
    if cfg.get("n_layers") != L or cfg.get("n_heads") != H:
        raise FactscopeError(f"{source}: graph of {cfg.get('n_layers')} layers x {cfg.get('n_heads')} heads, "
                             f"the model has {L} x {H}")
    per = H // KV
    up = {n: i for i, n in enumerate(graph.up_names)}
    down = {n: i for i, n in enumerate(graph.down_names)}
    scores = torch.zeros(graph.real.shape, dtype=torch.float64)
    on = torch.zeros(graph.real.shape, dtype=torch.bool)
    seen = torch.zeros(graph.real.shape, dtype=torch.bool)
    for name, e in d["edges"].items():
        try:
            src, dst = name.split("->")
        except ValueError:
            raise FactscopeError(f"{source}: bad edge name {name!r}") from None
        m = re.match(r"^a(\d+)\.h(\d+)<([kv])>$", dst)
        if m and KV < H:
            dst = f"a{m.group(1)}.kv{int(m.group(2)) // per}<{m.group(3)}>"
        if src not in up or dst not in down:
            raise FactscopeError(f"{source}: edge {name!r} is not in this model's graph")
        i, j = up[src], down[dst]
        s = e.get("score")
        scores[i, j] += 0.0 if s is None or (isinstance(s, float) and math.isnan(s)) else float(s)
        on[i, j] |= bool(e.get("in_graph", False))
        seen[i, j] = True
    missing = graph.real & ~seen
    if missing.any():
        u, r = missing.nonzero()[0].tolist()
        raise FactscopeError(f"{source}: {int(missing.sum())} edges of the model's graph are missing, "
                             f"e.g. {graph.up_names[u]}->{graph.down_names[r]}")
    graph.scores.copy_(scores.to(graph.scores.dtype))
    graph.in_graph.copy_(on & graph.real)
    return graph
