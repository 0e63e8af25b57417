"""The masked forward: the model with any subset of graph edges ablated, in one pass.

As EAP-IG's ``evaluate_graph``: every receiver ``r``'s input (before its own norm: the hook points
``q_in``/``k_in``/``v_in``/``mlp_in``/``logits_in``) becomes

    actual_r + sum_u (1 - mask[u, r]) * (ablated_u - actual_u)

where ``actual_u`` is upstream node ``u``'s output in this same (patched) forward (``input`` =
``resid_pre[0]``, a head = its ``head_out`` share, an MLP = ``mlp_out``) and ``ablated_u`` is zero,
the mean over a reference batch's tokens, or a counterfactual batch's clean output. Output biases of
the attention projection belong to no node and always stay. ``mask`` is a float ``[n_up, n_down]``
or per-example ``[B, n_up, n_down]`` tensor (bool is accepted) and may require grad.
"""

from __future__ import annotations

import contextlib

import torch

from factscope import hooks
from factscope.circuits.graph import Graph
from factscope.errors import FactscopeError

ABLATIONS = ("zero", "mean", "counterfactual")


def node_outputs(model, batch, detach: bool = True) -> torch.Tensor:
    """Every upstream node's output in a clean forward of ``batch``: ``[B, T, n_up, d]``."""
    L = model.n_layers
    ctx = torch.no_grad() if detach else contextlib.nullcontext()
    with ctx, hooks.cache(model, ["resid_pre"], [0], detach=detach) as c0, \
            hooks.cache(model, ["head_out", "mlp_out"], detach=detach) as c:
        model.forward(batch, last_only=True)
    parts = [c0["resid_pre", 0].unsqueeze(2)]
    for l in range(L):
        parts += [c["head_out", l], c["mlp_out", l].unsqueeze(2)]
    return torch.cat(parts, dim=2)


def ablated_outputs(model, batch, ablation: str, corrupted=None, reference=None) -> torch.Tensor | None:
    """``ablated_u`` for every node: None (zero), ``[n_up, d]`` (mean) or ``[B, T, n_up, d]``."""
    if ablation not in ABLATIONS:
        raise FactscopeError(f"ablation must be one of {', '.join(ABLATIONS)}, not {ablation!r}")
    if ablation == "zero":
        return None
    if ablation == "mean":
        if reference is None:
            raise FactscopeError("mean ablation needs reference prompts (reference=Batch)")
        out = node_outputs(model, reference)
        w = reference.attention_mask.to(out.dtype)[:, :, None, None]
        return (out * w).sum((0, 1)) / w.sum((0, 1))
    if corrupted is None:
        raise FactscopeError("counterfactual ablation needs the corrupted batch (corrupted=Batch)")
    if corrupted.input_ids.shape != batch.input_ids.shape:
        raise FactscopeError(
            f"the counterfactual batch has shape {tuple(corrupted.input_ids.shape)}, the clean batch "
            f"{tuple(batch.input_ids.shape)}: counterfactual prompts must match in token length")
    return node_outputs(model, corrupted)


def _mask_tensor(model, mask, B: int) -> torch.Tensor:
    g = Graph.from_model(model)
    if isinstance(mask, Graph):
        mask = mask.in_graph
    if not torch.is_tensor(mask):
        raise FactscopeError("mask must be a tensor [n_up, n_down] or [B, n_up, n_down] (or a Graph)")
    if mask.shape[-2:] != (g.n_up, g.n_down) or mask.dim() not in (2, 3) or (mask.dim() == 3 and mask.shape[0] != B):
        raise FactscopeError(
            f"mask has shape {tuple(mask.shape)}; expected ({g.n_up}, {g.n_down}) or ({B}, {g.n_up}, {g.n_down})")
    return mask


@contextlib.contextmanager
def masked(model, mask: torch.Tensor, ablated: torch.Tensor | None, frozen: torch.Tensor | None = None):
    """Hooks making the forwards inside the block masked forwards (``mask`` float, validated).

    ``frozen``: for forwards that start at a layer ``s`` (:func:`factscope.hooks.start_at` on the
    clean ``resid_pre[s]``), the clean outputs ``[N, T, up_start(s), d]`` of the nodes below ``s``;
    the receivers below ``s`` must keep every edge (their layers are not run)."""
    g = Graph.from_model(model)
    L, H = model.n_layers, model.n_heads
    nf = 0 if frozen is None else frozen.shape[2]
    start = 0 if frozen is None else (nf - 1) // (H + 1)
    if frozen is not None and (nf != g.up_start(start) or start >= L):
        raise FactscopeError(f"frozen outputs must cover whole layers below the start layer, got {nf} nodes")
    real = g.real.to(model.device)
    inv = (1 - mask.to(model.dtype)) * real  # only real edges ever carry a delta
    per_example = inv.dim() == 3
    grad = inv.requires_grad
    if ablated is not None:
        ablated = ablated.to(model.dtype)

    def needed(prev: int, c0: int, c1: int) -> bool:
        return grad or bool(inv[..., :prev, c0:c1].any())

    store: dict = {}  # "in": resid_pre[0]; ("qkv", l): layer l's q/k/v contributions
    acts: dict = {}  # the live cache of head_out / mlp_out (fills as the forward runs)

    def outputs(prev: int) -> torch.Tensor:
        parts = [store["in"] if frozen is None else frozen[:, :, : min(prev, nf)]]
        for l in range(start, L):
            if 1 + l * (H + 1) >= prev:
                break
            parts.append(acts["head_out", l])
            if 1 + l * (H + 1) + H < prev:
                parts.append(acts["mlp_out", l].unsqueeze(2))
        return torch.cat(parts, dim=2)[:, :, :prev]

    def contribution(prev: int, c0: int, c1: int) -> torch.Tensor:
        actual = outputs(prev)
        delta = (ablated[..., :prev, :] - actual) if ablated is not None else -actual
        w = inv[..., :prev, c0:c1]
        return torch.einsum("btud,bur->btrd" if per_example else "btud,ur->btrd", delta, w)

    def attn_fn(point: str, cols: dict):
        q0, v1 = cols["q"][0], cols["v"][1]
        a, b = cols[point[0]]

        def fn(x, l):
            key = ("qkv", l)
            if key not in store:
                store[key] = contribution(g.up_start(l), q0, v1)
            return x + store[key][:, :, a - q0 : b - q0]

        return fn

    def keep_in(x, l):
        store.clear()  # a new forward
        if frozen is None:
            store["in"] = x.unsqueeze(2)

    if frozen is not None and g.receiver_cols(start)["q"][0] > 0 and \
            bool(inv[..., : g.receiver_cols(start)["q"][0]].any()):
        raise FactscopeError(f"edges into receivers below layer {start} are removed: cannot start at layer {start}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(hooks.edit(model, "resid_pre", start, keep_in))
        acts = stack.enter_context(hooks.cache(model, ["head_out", "mlp_out"], list(range(start, L)), detach=False))
        for l in range(start, L):
            cols = g.receiver_cols(l)
            prev = g.up_start(l)
            if needed(prev, cols["q"][0], cols["v"][1]):
                for p in ("q_in", "k_in", "v_in"):
                    stack.enter_context(hooks.edit(model, p, l, attn_fn(p, cols)))
            m = cols["m"]
            prev_m = prev + (0 if g.parallel_attn else H)
            if needed(prev_m, m, m + 1):
                stack.enter_context(hooks.edit(
                    model, "mlp_in", l, lambda x, l_, p=prev_m, m=m: x + contribution(p, m, m + 1)[:, :, 0]))
        if needed(g.n_up, g.n_down - 1, g.n_down):
            stack.enter_context(hooks.edit(
                model, "logits_in", L - 1, lambda x, l_: x + contribution(g.n_up, g.n_down - 1, g.n_down)[:, :, 0]))
        try:
            yield
        finally:
            store.clear()


def logits(model, batch, last_only: bool = True, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits: ``[B, P, V]`` at ``positions``, else ``[B, V]`` or ``[B, T, V]``."""
    if positions is not None:
        return model.forward(batch, positions=positions)
    return model.forward(batch, last_only=last_only)


def run_masked(model, batch, mask, ablation: str = "zero", corrupted=None, reference=None, last_only: bool = True,
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``batch`` with the edges whose ``mask`` is below 1 (partly) ablated; see the module doc.

    ``positions`` (long ``[B, P]``, e.g. ``metric.positions``) returns ``[B, P, V]`` at those columns;
    otherwise ``[B, V]`` (last position) or ``[B, T, V]``. Gradients flow to ``mask`` when it requires
    them; otherwise the forward runs without autograd.
    """
    mask = _mask_tensor(model, mask, len(batch))
    ablated = ablated_outputs(model, batch, ablation, corrupted, reference)
    if mask.dtype == torch.bool:
        mask = mask.to(model.dtype)
    mask = mask.to(model.device)
    ctx = contextlib.nullcontext() if mask.requires_grad else torch.no_grad()
    with ctx, masked(model, mask, ablated):
        return logits(model, batch, last_only, positions)
