"""The one attention function every factscope model runs (registered with Hugging Face as ``"factscope"``).

It folds :func:`factscope.hooks.knockout` masks into the model's own causal, padding and
sliding-window masks, gives chosen queries uniform attention (``hooks.ablate(..., how="uniform")``),
records probabilities (the ``attn_probs`` point), and reads/records cached prefix keys/values for
:meth:`factscope.models.Model.forward_from` / ``prefill`` / ``extend``. The per-layer state lives
on each attention module as ``_fs_*`` attributes that :func:`install` creates. A module of its own
so that ``models`` (which installs it) and ``hooks`` (which drives it) do not import each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from factscope.models import Model

ATTN_NAME = "factscope"


class Halt(Exception):
    """Ends a forward pass early: raised by a layer's attention marked ``_fs_halt`` once it has
    recorded its keys/values (:meth:`factscope.models.Model.prefill`), and by
    :func:`factscope.hooks.stop_after`. The code that arms it catches it."""


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Attention with knockout masks and probability recording.

    The output always comes from PyTorch's scaled-dot-product attention (the same kernel as an
    unhooked model, so empty knockouts and recording change nothing), with knockout masks folded
    into the additive mask; probabilities are recorded from a separate eager computation. Models
    with attention-logit softcapping (Gemma 2) use the eager path throughout.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = getattr(module, "_fs_prefix", None)
    if prefix is not None:  # Model.forward_from: cached prefix keys/values and a position-based mask
        key = torch.cat([prefix[0], key], dim=-2)
        value = torch.cat([prefix[1], value], dim=-2)
        attention_mask = prefix[2]
    kv = getattr(module, "_fs_kv", None)
    if kv is not None:  # Model.prefill / extend: record what this layer attends over
        kv.append((key, value))
        if module._fs_halt:  # Model.prefill without logits: nothing after the last keys/values
            raise Halt
    blocks = getattr(module, "_fs_blocks", None)
    record = getattr(module, "_fs_record", None)
    uniform = getattr(module, "_fs_uniform", None)
    if uniform:
        # A zero query scores every key 0: softmax then spreads the query's attention evenly over
        # the keys the masks leave visible (causal, non-pad, in-window, not knocked out).
        sel = torch.zeros((), dtype=torch.bool, device=query.device)
        for u in uniform:
            sel = sel | u(query)
        query = query.masked_fill(sel, 0.0)
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, torch.finfo(query.dtype).min)
    if blocks and mask is not None:
        # Masked-out keys carry finfo.min, not -inf: a query whose every visible key is blocked would
        # otherwise attend uniformly to the masked-out (future, padding, out-of-window) keys.
        mask = mask.masked_fill(mask <= torch.finfo(mask.dtype).min, float("-inf"))
    for block in blocks or ():
        mask = (mask if mask is not None else torch.zeros((), dtype=query.dtype, device=query.device)).masked_fill(block, float("-inf"))
    if softcap is None and blocks:
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        out = torch.nan_to_num(out, nan=0.0)  # a query with every key blocked reads nothing
    elif softcap is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if softcap is None and record is None:
        return out, None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
    v = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    probs = torch.nan_to_num(torch.softmax(scores.float(), dim=-1), nan=0.0).to(query.dtype)
    if record is not None:
        record.append(probs)
    if softcap is not None:
        drop = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
        out = torch.matmul(drop, v).transpose(1, 2).contiguous()
    return out, probs


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)  # always a materialized additive mask


def install(model: "Model") -> None:
    for l in range(model.n_layers):
        attn = model.attn(l)
        attn._fs_blocks = []
        attn._fs_record = None
        attn._fs_prefix = None  # (keys, values, mask) while Model.forward_from runs
        attn._fs_kv = None  # a list recording (keys, values) while Model.prefill runs
        attn._fs_halt = False  # raise Halt once the keys/values are recorded
        attn._fs_uniform = []
