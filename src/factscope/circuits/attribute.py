"""Edge scores: EAP, EAP-IG (on inputs or on activations) and exact edge patching.

Every method scores edge ``u -> r`` as the change of the metric when the edge is ablated, with
EAP-IG's sign convention (ablated minus clean): exact patching measures it; the gradient methods
approximate it by ``(ablated_u - clean_u) . dmetric/d(input of r)`` summed over positions and
features and averaged over examples (as ``hannamw/EAP-IG`` ``attribute.py``):

- ``eap``: the gradient at the clean input (one forward and one backward).
- ``eap-ig``: the gradient averaged over ``steps`` forwards whose input embeddings (``resid_pre[0]``)
  are interpolated between the ablated input and the clean input (alpha = k/steps, k = 1..steps;
  EAP-IG's ``get_scores_eap_ig`` uses k = 0..steps-1, which includes the fully ablated input and
  not the clean one; ours agrees better with exact single-edge patching, see docs/circuits.md).
  All steps run as one batch.
- ``eap-ig-act``: per upstream node group (the input, one layer's heads together, one MLP), the
  group's output is interpolated between ablated and clean (alpha = k/steps, k = 1..steps) while the
  rest of the model runs as usual; as EAP-IG's ``get_scores_ig_activations``, the gradients of every
  group's runs score every edge (the mean over groups and steps). EAP-IG sets the group's output to a
  constant, which cuts the gradient through the group; ours shifts the live output, so ``steps=1``
  is EAP. Each run is near the clean one (one group moved), which is why it agrees with exact
  single-edge patching better than ``eap-ig`` (every node moved together; docs/circuits.md).
- ``exact``: the metric change of removing each edge alone. For the receivers of layer ``l``, many
  copies of the batch run from layer ``l`` on (:func:`factscope.hooks.start_at` on the cached clean
  residual), each with one edge's ``ablated_u - clean_u`` added to its receiver's input; edges into
  ``logits`` only need the final norm and the unembedding. The copies run only the columns up to the
  last one the metric reads, and a metric that names its vocabulary rows (``Metric.vocab``, e.g. the
  logit difference: two) has only those rows unembedded (the target NLL needs the whole vocabulary
  for its log-softmax).

``metric`` follows the circuits metric contract (``positions`` long ``[B, P]`` and
``fn(logits [N, P, V], rows [N]) -> [N]``); scores average the per-example values.
"""

from __future__ import annotations

import contextlib

import torch

from factscope import hooks
from factscope.circuits.graph import Graph
from factscope.circuits.patching import ABLATIONS, ablated_outputs, node_outputs
from factscope.errors import FactscopeError

METHODS = ("eap", "eap-ig", "eap-ig-act", "exact")
RECEIVER_POINTS = ("q_in", "k_in", "v_in", "mlp_in")


def _rows(batch, idx: torch.Tensor):
    from factscope.models import Batch

    idx_l = idx.tolist()
    return Batch(batch.input_ids[idx], batch.attention_mask[idx], batch.position_ids[idx],
                 [batch.lengths[i] for i in idx_l])


def _check(model, graph: Graph, clean, corrupted, metric, method: str, ablation: str, steps: int) -> None:
    if method not in METHODS:
        raise FactscopeError(f"unknown attribution method {method!r}: use one of {', '.join(METHODS)}")
    if ablation not in ABLATIONS:
        raise FactscopeError(f"ablation must be one of {', '.join(ABLATIONS)}, not {ablation!r}")
    if steps < 1:
        raise FactscopeError(f"steps must be at least 1, not {steps}")
    ref = Graph.from_model(model)
    if (graph.n_up, graph.n_down) != (ref.n_up, ref.n_down) or not torch.equal(graph.real, ref.real):
        raise FactscopeError(f"the graph ({graph!r}) is not {model.name}'s")
    if tuple(metric.positions.shape[:1]) != (len(clean),):
        raise FactscopeError(f"the metric reads {metric.positions.shape[0]} examples, the batch has {len(clean)}")


def _deltas(model, clean, ablation, corrupted, reference):
    """(clean node outputs [B, T, n_up, d], ablated - clean [B, T, n_up, d])."""
    out = node_outputs(model, clean)
    abl = ablated_outputs(model, clean, ablation, corrupted=corrupted, reference=reference)
    return out, (-out if abl is None else abl.to(out.dtype) - out)


def _receiver_grads(model, batch, metric_rows, positions, edit=None):
    """Gradient of the summed metric w.r.t. every receiver's input in one forward/backward:
    ({(point, layer): grad}, logits_in grad), under an optional extra context ``edit``."""
    L = model.n_layers
    with contextlib.ExitStack() as st:
        if edit is not None:
            st.enter_context(edit)
        # the weights do not require grad: make the stream entering layer 0 the leaf to trace from
        st.enter_context(hooks.edit(model, "resid_pre", 0, lambda x, l: x.detach().requires_grad_(True)))
        c = st.enter_context(hooks.cache(model, list(RECEIVER_POINTS), detach=False))
        cl = st.enter_context(hooks.cache(model, ["logits_in"], [L - 1], detach=False))
        with torch.enable_grad():
            logits = model.forward(batch, positions=positions)
    keys = [(p, l) for p in RECEIVER_POINTS for l in range(L)] + [("logits_in", L - 1)]
    tensors = [c[k] if k[0] != "logits_in" else cl[k] for k in keys]
    value = metric_rows(logits).sum()
    grads = torch.autograd.grad(value, tensors, allow_unused=True)
    return {k: (torch.zeros_like(t) if g is None else g) for k, t, g in zip(keys, tensors, grads)}


def _scores_from_grads(graph: Graph, model, delta: torch.Tensor, grads: dict, scores: torch.Tensor,
                       rows: slice | None = None) -> None:
    """scores[u, r] += sum_{b,t,d} delta[b, t, u] * grad_r[b, t]  (``rows``: restrict to these u)."""
    L = model.n_layers
    rows = rows or slice(0, graph.n_up)
    d = delta[:, :, rows]
    for l in range(L):
        cols = graph.receiver_cols(l)
        for p in ("q", "k", "v"):
            a, b = cols[p]
            scores[rows, a:b] += torch.einsum("btud,btsd->us", d, grads[f"{p}_in", l])
        scores[rows, cols["m"]] += torch.einsum("btud,btd->u", d, grads["mlp_in", l])
    scores[rows, -1] += torch.einsum("btud,btd->u", d, grads["logits_in", L - 1])


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield torch.arange(s, min(n, s + size))


def _eap(model, graph, clean, metric, delta, scores, max_rows: int) -> None:
    B = len(clean)
    for idx in _chunks(B, max_rows):
        sub = _rows(clean, idx)
        grads = _receiver_grads(model, sub, lambda lg, idx=idx: metric.fn(lg, idx.to(lg.device)),
                                metric.positions[idx])
        _scores_from_grads(graph, model, delta[idx], grads, scores)
    scores /= B


def _eap_ig(model, graph, clean, metric, delta, clean_out, steps: int, scores, max_rows: int) -> None:
    B = len(clean)
    alphas = torch.arange(1, steps + 1, dtype=clean_out.dtype, device=clean_out.device) / steps
    per = max(1, max_rows // steps)
    for idx in _chunks(B, per):
        n = len(idx)
        sub = _rows(clean, idx).repeat(steps)  # example i, step k at row i*steps + k
        x_clean = clean_out[idx, :, 0]  # the input node = resid_pre[0]
        x_abl = x_clean + delta[idx, :, 0]
        interp = x_abl.unsqueeze(1) + alphas.view(1, -1, 1, 1) * (x_clean - x_abl).unsqueeze(1)  # [n, m, T, d]
        interp = interp.reshape(n * steps, *interp.shape[2:])
        rows = idx.repeat_interleave(steps)
        edit = hooks.edit(model, "resid_pre", 0, lambda x, l: interp.to(x.dtype))
        grads = _receiver_grads(model, sub, lambda lg: metric.fn(lg, rows.to(lg.device)),
                                metric.positions[rows], edit)
        grads = {k: g.view(n, steps, *g.shape[1:]).sum(1) for k, g in grads.items()}
        _scores_from_grads(graph, model, delta[idx], grads, scores)
    scores /= B * steps


def _act_groups(model, graph) -> list:
    """EAP-IG's node groups for IG on activations: the input, each layer's heads together, each MLP
    (hook point, layer, their upstream rows)."""
    H = model.n_heads
    groups = [("resid_pre", 0, slice(0, 1))]
    for l in range(model.n_layers):
        s = graph.up_start(l)
        groups += [("attn_out", l, slice(s, s + H)), ("mlp_out", l, slice(s + H, s + H + 1))]
    return groups


def _act_group_grads(model, clean, metric, delta, group, steps: int, max_rows: int):
    """Yield (example indices, receiver gradients summed over the steps) of the runs in which
    ``group``'s output goes from ablated to clean (alpha = k/steps, k = 1..steps) and the rest of the
    model runs as usual."""
    point, l, rows_u = group
    alphas = torch.arange(1, steps + 1, dtype=delta.dtype, device=delta.device) / steps
    for idx in _chunks(len(clean), max(1, max_rows // steps)):
        n = len(idx)
        sub = _rows(clean, idx).repeat(steps)
        d = delta[idx, :, rows_u].sum(2)  # the group's ablated - clean output (heads summed)

        def fn(x, l_, d=d):
            # the live output (clean here) moved to ablated + alpha (clean - ablated)
            return x + ((1 - alphas).view(1, -1, 1, 1) * d.unsqueeze(1)).reshape(x.shape)

        rows = idx.repeat_interleave(steps)
        grads = _receiver_grads(model, sub, lambda lg: metric.fn(lg, rows.to(lg.device)),
                                metric.positions[rows], hooks.edit(model, point, l, fn))
        yield idx, {k: g.view(n, steps, *g.shape[1:]).sum(1) for k, g in grads.items()}


def _eap_ig_act(model, graph, clean, metric, delta, steps: int, scores, max_rows: int) -> None:
    """As EAP-IG's ``get_scores_ig_activations``: the gradients of every group's runs score every edge
    (the mean over all groups and steps)."""
    groups = _act_groups(model, graph)
    for group in groups:
        for idx, grads in _act_group_grads(model, clean, metric, delta, group, steps, max_rows):
            _scores_from_grads(graph, model, delta[idx], grads, scores)
    scores /= len(clean) * steps * len(groups)


def unembed_metric(model, metric, h: torch.Tensor, rows: torch.Tensor, max_logit_rows: int = 64) -> torch.Tensor:
    """metric values of final-normed hidden states ``h [N, P, d]``: with ``metric.vocab`` only the
    vocabulary rows the metric reads are unembedded; with ``metric.fn_hidden`` (the target NLL) the
    log-probabilities come from :meth:`Model.log_probs`; otherwise the whole vocabulary (262k wide
    on Gemma), at most ``max_logit_rows`` rows of ``h`` at a time."""
    if metric.vocab is not None:
        ids = metric.vocab.to(h.device)[rows.to(h.device)]
        return metric.fn_vocab(model.unembed_rows(h, ids), rows).float()
    if metric.fn_hidden is not None:
        return metric.fn_hidden(h, rows).float()
    out = [metric.fn(model.unembed(h[s : s + max_logit_rows]), rows[s : s + max_logit_rows]).float()
           for s in range(0, h.shape[0], max_logit_rows)]
    return torch.cat(out)


def truncate_batch(batch, t: int):
    """The first ``t`` columns of a left-padded batch (causal attention: the outputs at those
    columns do not depend on the columns cut)."""
    from factscope.models import Batch

    cut = batch.input_ids.shape[1] - t
    if cut <= 0:
        return batch
    return Batch(batch.input_ids[:, :t], batch.attention_mask[:, :t], batch.position_ids[:, :t],
                 [n - cut for n in batch.lengths])


def _exact(model, graph, clean, metric, delta, scores, max_rows: int) -> None:
    B, L = len(clean), model.n_layers
    real = graph.real
    rows_all = torch.arange(B)
    with torch.no_grad(), hooks.cache(model, ["resid_pre"]) as c, \
            hooks.cache(model, ["logits_in"], [L - 1]) as cl:
        model.forward(clean, positions=metric.positions)
    # the copies only run the columns up to the last one the metric reads (a logit difference reads
    # the first answer position: the rest of the teacher-forced answer is cut)
    t_end = int(metric.positions.max()) + 1
    clean = truncate_batch(clean, t_end)
    delta = delta[:, :t_end]
    # edges into logits: final norm + unembedding of the clean final stream plus each delta
    pos = metric.positions.to(model.device)
    x_fin = cl["logits_in", L - 1]
    xp = x_fin.gather(1, pos.unsqueeze(-1).expand(-1, -1, x_fin.shape[-1]))  # [B, P, d]
    with torch.no_grad():  # the clean value, computed as the copies' are
        base_mean = unembed_metric(model, metric, model.final_norm(xp), rows_all.to(model.device)).mean()
    dp = delta.gather(1, pos[:, :, None, None].expand(-1, -1, delta.shape[2], delta.shape[3]))  # [B, P, n_up, d]
    per = max(1, max_rows // B)
    for us in _chunks(graph.n_up, per):
        k = len(us)
        x = (xp.unsqueeze(1) + dp[:, :, us].permute(0, 2, 1, 3)).reshape(B * k, *xp.shape[1:])
        with torch.no_grad():
            vals = unembed_metric(model, metric, model.final_norm(x), rows_all.repeat_interleave(k).to(model.device))
        scores[us, -1] = (vals.view(B, k).mean(0) - base_mean).to(scores.dtype)
    # edges into each layer's receivers: copies from that layer on
    for l in range(L):
        cols = graph.receiver_cols(l)
        c0, c1 = cols["q"][0], cols["m"] + 1
        edges = real[:, c0:c1].nonzero()  # (u, receiver slot within the layer)
        resid = c["resid_pre", l][:, :t_end]
        for sel in _chunks(len(edges), per):
            e = edges[sel]
            k = len(e)
            u_idx, slot = e[:, 0].to(model.device), e[:, 1].to(model.device)
            rep = clean.repeat(k)  # example b, copy j at row b*k + j
            start = resid.repeat_interleave(k, 0)
            vals_u = delta[:, :, u_idx]  # [B, T, k, d]

            def add(x, which, a, b, l_):
                """Add each copy's delta at its receiver slot in [a, b) of this point."""
                on = (slot >= a) & (slot < b)
                if not bool(on.any()):
                    return None
                j = on.nonzero()[:, 0]
                if which == "m":
                    x = x.clone().view(B, k, *x.shape[1:])
                    x[:, j] = x[:, j] + vals_u[:, :, j].permute(0, 2, 1, 3).to(x.dtype)
                    return x.view(B * k, *x.shape[2:])
                x = x.clone().view(B, k, *x.shape[1:])  # [B, k, T, S, d]
                s_idx = slot[j] - a
                x[:, j, :, s_idx] = x[:, j, :, s_idx] + vals_u[:, :, j].permute(2, 0, 1, 3).to(x.dtype)
                return x.view(B * k, *x.shape[2:])

            off = cols["q"][0]
            with contextlib.ExitStack() as st, torch.no_grad():
                st.enter_context(hooks.start_at(model, l, start))
                for p in ("q", "k", "v"):
                    a, b = cols[p]
                    if bool(((slot >= a - off) & (slot < b - off)).any()):
                        st.enter_context(hooks.edit(
                            model, f"{p}_in", l, lambda x, l_, p=p, a=a - off, b=b - off: add(x, p, a, b, l_)))
                m = cols["m"] - off
                if bool((slot == m).any()):
                    st.enter_context(hooks.edit(model, "mlp_in", l, lambda x, l_, m=m: add(x, "m", m, m + 1, l_)))
                h = model.final_hidden(rep, metric.positions.repeat_interleave(k, 0))
                vals = unembed_metric(model, metric, h, rows_all.repeat_interleave(k).to(model.device))
            scores[e[:, 0], c0 + e[:, 1]] = (vals.view(B, k).mean(0) - base_mean).to(scores.dtype)


def attribute(model, graph: Graph, clean, corrupted, metric, method: str = "eap-ig", steps: int = 5,
              ablation: str = "zero", reference=None, max_rows: int = 128) -> torch.Tensor:
    """Score every edge of ``graph`` on the ``clean`` batch; fills ``graph.scores`` and returns it.

    ``corrupted``: the counterfactual batch (needed for ``ablation="counterfactual"``; ignored
    otherwise); ``reference``: the batch whose token mean mean-ablation uses (default ``clean``).
    ``max_rows`` bounds the rows of one forward (copies x examples, or steps x examples).
    """
    _check(model, graph, clean, corrupted, metric, method, ablation, steps)
    if ablation == "mean" and reference is None:
        reference = clean
    clean_out, delta = _deltas(model, clean, ablation, corrupted, reference)
    scores = torch.zeros(graph.n_up, graph.n_down, dtype=torch.float32, device=model.device)
    if method == "eap":
        _eap(model, graph, clean, metric, delta, scores, max_rows)
    elif method == "eap-ig":
        _eap_ig(model, graph, clean, metric, delta, clean_out, steps, scores, max_rows)
    elif method == "eap-ig-act":
        _eap_ig_act(model, graph, clean, metric, delta, steps, scores, max_rows)
    else:
        _exact(model, graph, clean, metric, delta, scores, max_rows)
    scores = scores.cpu() * graph.real
    graph.scores = scores
    return scores
