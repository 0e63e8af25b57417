"""ACDC (Conmy et al. 2023) as KnowledgeCircuits runs it: greedy edge pruning in reverse topological
order with a threshold on the metric change, zero ablation by default.

Receivers are visited from ``logits`` backwards (reverse of the graph's column order: ``logits``,
``m{L-1}``, the value, key and query receivers of layer L-1, ... layer 0). A receiver whose node no
longer feeds anything is dropped with all its incoming edges (ACDC's ``current_node_connected``).
For each remaining incoming edge of the receiver (upstream nodes latest first, ACDC's "reverse"
order), the edge is removed from the current graph and kept out when the metric change
``d = badness(after) - badness(current)`` is below ``threshold`` (ACDC's ``result < threshold``;
badness is the metric, negated for metrics where higher is better). ``d`` is the edge's score.

Batching (exact, not an approximation): the decisions for a receiver are sequential, but ACDC removes
most edges, so we speculate that every candidate is removed: one batched masked forward evaluates
the graphs with the first 1, 2, ..., k candidates removed; walking them in order, each step's ``d``
is exact as long as all earlier candidates were removed; at the first kept edge the remaining
candidates are re-evaluated from the new current graph. Rounds = kept edges + 1 per receiver; a
round speculates over at most twice as many candidates as the previous round decided.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from factscope.errors import FactscopeError

ManyRunner = Callable[[torch.Tensor], torch.Tensor]  # masks float [K, n_up, n_down] -> mean metric [K]

_HEAD = re.compile(r"^a(\d+)\.h(\d+)<[qkv]>$")
_KV = re.compile(r"^a(\d+)\.kv(\d+)<[kv]>$")
_MLP = re.compile(r"^m(\d+)$")


def receiver_nodes(up_names: list[str], down_names: list[str]) -> list[list[int]]:
    """For each receiver column, the upstream rows of the node(s) it feeds (empty for ``logits``)."""
    up = {n: i for i, n in enumerate(up_names)}
    heads: dict[int, list[int]] = {}
    for n, i in up.items():
        m = re.match(r"^a(\d+)\.h(\d+)$", n)
        if m:
            heads.setdefault(int(m.group(1)), []).append(i)
    kv: dict[int, int] = {}
    for n in down_names:
        m = _KV.match(n)
        if m:
            kv[int(m.group(1))] = max(kv.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    out = []
    for n in down_names:
        if n == "logits":
            out.append([])
        elif m := _HEAD.match(n):
            out.append([up[f"a{m.group(1)}.h{m.group(2)}"]])
        elif m := _KV.match(n):
            l, g = int(m.group(1)), int(m.group(2))
            hs = sorted(heads[l])
            per = len(hs) // kv[l]
            out.append(hs[g * per : (g + 1) * per])
        elif m := _MLP.match(n):
            out.append([up[n]])
        else:
            raise FactscopeError(f"unknown receiver name {n!r}")
    return out


def acdc(graph, run_many: ManyRunner, badness_sign: float = 1.0, threshold: float = 0.1,
         max_batch: int = 64, progress: bool = False):
    """Prune ``graph`` with ACDC; sets ``graph.in_graph`` to the kept edges and ``graph.scores`` to each
    evaluated edge's metric change (0 for edges dropped with a disconnected receiver); returns graph.

    ``run_many(masks [K, n_up, n_down]) -> [K]`` gives the mean metric with each mask;
    ``badness_sign`` is +1 for metrics where lower is better, -1 otherwise.
    """
    if threshold < 0:
        raise FactscopeError(f"the ACDC threshold must be >= 0, got {threshold}")
    real = graph.real.bool()
    cur = real.clone()
    scores = torch.zeros(real.shape, dtype=torch.float32)
    feeds = receiver_nodes(list(graph.up_names), list(graph.down_names))

    def bad(masks):
        with torch.no_grad():
            return badness_sign * run_many(masks.float()).float().cpu()

    cur_bad = float(bad(cur[None])[0])
    cols = list(range(real.shape[1]))[::-1]
    it = cols
    if progress:
        from tqdm import tqdm

        it = tqdm(cols, desc="ACDC receivers", leave=False)
    for r in it:
        if feeds[r] and not cur[feeds[r]].any():
            cur[:, r] = False  # the receiver's node feeds nothing: drop its inputs
            continue
        cand = [int(u) for u in cur[:, r].nonzero()[:, 0].flip(0)]
        size = max_batch
        while cand:
            chunk = cand[:size]
            masks = cur[None].repeat(len(chunk), 1, 1)
            for j, u in enumerate(chunk):
                masks[j:, u, r] = False  # graph j: the first j+1 candidates removed
            vals = bad(masks)
            prev = cur_bad
            done = 0
            for j, u in enumerate(chunk):
                d = float(vals[j]) - prev
                scores[u, r] = d
                done = j + 1
                if d < threshold:
                    cur[u, r] = False
                    prev = float(vals[j])
                else:
                    break  # kept: later graphs assumed it removed, re-evaluate the rest
            cur_bad = prev
            cand = cand[done:]
            # speculate as far as the last round got before a kept edge (twice that), so receivers
            # that keep many edges do not re-evaluate long batches of graphs assumed pruned
            size = max(1, min(max_batch, 2 * done))
    graph.in_graph.copy_(cur)
    graph.scores.copy_(scores.to(graph.scores.dtype))
    return graph


def many_runner(model, batch, metric, ablation: str = "zero", corrupted=None, reference=None,
                max_rows: int = 256) -> ManyRunner:
    """``masks [K, n_up, n_down] -> mean metric [K]`` with per-example masks over a repeated batch.

    The forwards start at the lowest layer with a removed edge into one of its receivers in any of
    the masks (:func:`factscope.hooks.start_at` on the clean residual, the nodes below it frozen at
    their clean outputs): ACDC visits receivers from the logits down, so the layers below the
    receiver under test are always clean. Masks that remove only edges into the logits need just
    the final norm and the unembedding of the clean final stream plus the removed edges' deltas.
    As in exact patching, the forwards run only the columns up to the last one the metric reads, and
    a metric that names its vocabulary rows (the logit difference) has only those unembedded.
    """
    import contextlib

    from factscope import hooks
    from factscope.circuits import Graph
    from factscope.circuits.attribute import truncate_batch, unembed_metric
    from factscope.circuits.patching import ablated_outputs, masked, node_outputs

    g = Graph.from_model(model)
    L, B = model.n_layers, len(batch)
    real = g.real.to(model.device)
    per_layer = g.receiver_cols(0)["m"] + 1
    clean_out = node_outputs(model, batch)  # [B, T, n_up, d]
    abl = ablated_outputs(model, batch, ablation, corrupted, reference)
    delta = -clean_out if abl is None else abl.to(clean_out.dtype) - clean_out
    with torch.no_grad(), hooks.cache(model, ["resid_pre"]) as rc, hooks.cache(model, ["logits_in"], [L - 1]) as fc:
        model.forward(batch, positions=metric.positions)
    # the forwards run only the columns up to the last one the metric reads
    t_end = int(metric.positions.max()) + 1
    short = truncate_batch(batch, t_end)
    pos = metric.positions.to(model.device)
    x_fin = fc["logits_in", L - 1]
    xp = x_fin.gather(1, pos.unsqueeze(-1).expand(-1, -1, x_fin.shape[-1]))  # [B, P, d]
    dp = delta.gather(1, pos[:, :, None, None].expand(-1, -1, *delta.shape[2:]))  # [B, P, n_up, d]

    def logits_only(inv: torch.Tensor) -> torch.Tensor:  # inv [k, n_up]: removed edges into logits
        k = inv.shape[0]
        x = xp.unsqueeze(1) + torch.einsum("bpud,ku->bkpd", dp, inv.to(dp.dtype))
        rows = torch.arange(B, device=model.device).repeat_interleave(k)
        return unembed_metric(model, metric, model.final_norm(x.reshape(B * k, *xp.shape[1:])), rows).view(B, k).mean(0)

    def run(masks: torch.Tensor) -> torch.Tensor:
        masks = masks.to(model.device)
        inv = (1 - masks.float()) * real
        cols = inv.abs().sum((0, 1)).nonzero()[:, 0]
        start = L if len(cols) == 0 else int(cols.min()) // per_layer
        if start >= L:
            return logits_only(inv[:, :, -1])
        K = masks.shape[0]
        per = max(1, max_rows // B)
        nf = g.up_start(start)
        outs = []
        for s in range(0, K, per):
            mk = masks[s : s + per]
            k = mk.shape[0]
            rep = short.repeat(k)  # example i, mask j at row i*k + j
            m = mk.repeat(B, 1, 1)
            rows = torch.arange(B, device=model.device).repeat_interleave(k)
            r = lambda t: t[:, :t_end].repeat_interleave(k, 0)  # noqa: E731
            ablated = None if abl is None else (abl if abl.dim() == 2 else r(abl))
            with torch.no_grad(), contextlib.ExitStack() as st:
                # the masked hooks first: they read the layer modules that start_at stands in for
                st.enter_context(masked(model, m.to(model.dtype), ablated, frozen=r(clean_out[:, :, :nf])))
                if start > 0:
                    st.enter_context(hooks.start_at(model, start, r(rc["resid_pre", start])))
                h = model.final_hidden(rep, metric.positions.repeat_interleave(k, 0))
                outs.append(unembed_metric(model, metric, h, rows).view(B, k).mean(0))
        return torch.cat(outs)

    return run
