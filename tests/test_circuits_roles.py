"""Node projections, attention groups and role rules (circuits/roles.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from factscope import hooks
from factscope.circuits import roles as R
from factscope.circuits.evaluate import target_ranks
from factscope.circuits.graph import Graph
from factscope.facts import fact_subject_span, load_facts, target_ids


def _facts(n: int = 3):
    fs = load_facts("lre:factual/country_capital_city")
    return [fs[0], fs[3], fs[7], fs[11]][:n]


def _forward(model, batch):
    L = model.n_layers
    with torch.no_grad(), hooks.cache(model, ["resid_pre"], [0]) as c0, \
            hooks.cache(model, ["head_out", "mlp_out", "attn_out", "resid_post", "z"]) as c:
        model.forward(batch, last_only=True)
    return c0, c, c["resid_post", L - 1][:, -1]


def test_node_projections_sum_to_the_logits(tiny):
    """input + every head + every MLP + the attention output biases, each through the frozen final
    norm and the unembedding, plus the norm's and the unembedding's biases, give the model's logits
    (catches: a norm scale taken from the component instead of the stream, a missing (1 + w) or mean
    centring, the unembedding's bias counted per node)."""
    batch = tiny.encode([f.prompt for f in _facts()])
    c0, c, x = _forward(tiny, batch)
    parts = [c0["resid_pre", 0][:, -1]]
    for l in range(tiny.n_layers):
        heads = c["head_out", l][:, -1]
        parts += list(heads.unbind(1)) + [c["mlp_out", l][:, -1], c["attn_out", l][:, -1] - heads.sum(1)]
    comps = torch.stack(parts, 1)
    total = R.project(tiny, x, comps).sum(1)
    norm, head = tiny.final_norm_module, tiny.hf.get_output_embeddings()
    if getattr(norm, "bias", None) is not None:
        total = total + norm.bias.float() @ tiny.unembed_weight.float().T
    if getattr(head, "bias", None) is not None:
        total = total + head.bias.float()
    with torch.no_grad():
        ref = head(tiny.final_norm(x)).float()
    torch.testing.assert_close(total, ref, rtol=1e-4, atol=1e-4)


def _direct_head(model, batch, l, h):
    """A head's vocabulary projection from its z and W_O, through the model's own final norm module
    applied to the head's output rescaled by (scale of the head's output / scale of the stream)."""
    _, c, x = _forward(model, batch)
    out = c["z", l][:, -1, h] @ model.W_O(l)[h]
    if model.spec.post_attn_norm:  # Gemma: the post-attention RMSNorm factor of the whole o_proj output
        full = torch.einsum("bhe,hed->bd", c["z", l][:, -1], model.W_O(l))
        out = out * model.post_attn_scale(l, full)
    norm = model.final_norm_module
    ln = isinstance(norm, torch.nn.LayerNorm)

    def s(v):
        return (v.var(-1, unbiased=False, keepdim=True) if ln else v.pow(2).mean(-1, keepdim=True)).sqrt()

    with torch.no_grad():
        normed = norm(out) - (norm.bias if ln and norm.bias is not None else 0)
        return (normed * s(out) / s(x)).float() @ model.unembed_weight.float().T


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_node_projection_equals_direct_computation(name):
    from tests.conftest import _load

    _per_node_check(_load(name), 2)


@pytest.mark.gemma
def test_node_projection_equals_direct_computation_on_gemma(gemma):
    _per_node_check(gemma, 1)


def _per_node_check(model, n):
    facts = _facts(n)
    l, h = model.n_layers - 1, model.n_heads - 1
    rows, mean_logits = R.measure(model, facts, [f"a{l}.h{h}", f"m{l}"], batch_size=n)
    batch = model.encode([f.prompt for f in facts])
    ref = _direct_head(model, batch, l, h)
    tg = torch.tensor([target_ids(model.tokenizer, f.prompt, f.target_true)[0] for f in facts])
    head_rows = rows[rows["node"] == f"a{l}.h{h}"]
    assert head_rows["target_rank"].tolist() == target_ranks(ref, tg).tolist()
    assert head_rows["top_tokens"].iloc[0][:3] == ref[0].topk(3).indices.tolist()
    torch.testing.assert_close(mean_logits[f"a{l}.h{h}"], ref.mean(0), rtol=1e-3, atol=1e-3)
    # attention groups partition the last token's attention
    shares = head_rows[[f"att_{g}" for g in R.GROUPS]].sum(axis=1)
    assert all(abs(v - 1) < 1e-5 for v in shares)
    # MLP: the lens rank before and after it
    m = rows[rows["node"] == f"m{l}"].iloc[0]
    _, c, x = _forward(model, model.encode([facts[0].prompt]))
    before = x - c["mlp_out", l][:, -1]
    assert m["rank_after"] == int(target_ranks(model.logit_lens(x), tg[:1])[0])
    assert m["rank_before"] == int(target_ranks(model.logit_lens(before), tg[:1])[0])


def test_token_groups():
    from tests.conftest import _load

    model = _load("tiny-llama")
    f = _facts(1)[0]
    n = len(model.tokenizer(f.prompt)["input_ids"])
    g = R.token_groups(model, f, n)
    s, e = fact_subject_span(model.tokenizer, f)
    assert g["subject"] == list(range(s, e)) and g["last"] == [n - 1]
    assert sorted(sum(g.values(), [])) == list(range(n))  # a partition of the prompt
    g2 = R.token_groups(model, f, n, {"demos": [0, 1]})
    assert g2["demos"] == [0, 1] and not set(g2["relation"]) & {0, 1}


def test_role_rules_fire_and_not():
    rules = R.RoleRules()
    base = {"kind": "head", "att_subject": 0.0, "att_relation": 0.0, "target_rank": 1000.0, "relation_hits": 0.0}
    assert R.label({**base, "att_subject": 0.3, "target_rank": 19}, rules) == "mover"
    assert R.label({**base, "att_subject": 0.29, "target_rank": 19}, rules) == ""
    assert R.label({**base, "att_subject": 0.9, "target_rank": 20}, rules) == ""
    assert R.label({**base, "att_subject": 0.35, "att_relation": 0.5, "target_rank": 3}, rules) == ""  # s < r
    assert R.label({**base, "att_relation": 0.5, "relation_hits": 1.0}, rules) == "relation"
    assert R.label({**base, "att_relation": 0.5, "relation_hits": 0.9}, rules) == ""
    assert R.label({**base, "att_subject": 0.6, "att_relation": 0.5, "relation_hits": 3}, rules) == ""  # r < s
    assert R.label({**base, "att_subject": 0.2, "att_relation": 0.2, "target_rank": 3, "relation_hits": 2},
                   rules) == "mixture"
    assert R.label({**base, "att_subject": 0.2, "att_relation": 0.1, "target_rank": 3, "relation_hits": 2},
                   rules) == ""
    assert R.label({"kind": "mlp", "gain_bits": 1.0}, rules) == R.MLP_ROLE
    assert R.label({"kind": "mlp", "gain_bits": 0.99}, rules) == ""


def _constructed(model, facts, l, h, attend: str, sign: float):
    """Force head (l, h)'s last query to attend only to the subject (or only to BOS) and set its z at
    the last position to write +/- the target's direction."""
    batch = model.encode([f.prompt for f in facts])
    spans = [fact_subject_span(model.tokenizer, f) for f in facts]
    n = [len(model.tokenizer(f.prompt)["input_ids"]) for f in facts]
    keep = [list(range(s, e)) if attend == "subject" else [0] for s, e in spans]
    block = hooks.edge_mask(batch, [[k - 1] for k in n], [[p for p in range(k) if p not in kp] for k, kp in zip(n, keep)])
    tg = torch.tensor([target_ids(model.tokenizer, f.prompt, f.target_true)[0] for f in facts])
    w = model.final_norm_module.weight.float() + (1.0 if model.spec.rms_offset else 0.0)
    direction = (model.unembed_weight[tg].float() * w) @ model.W_O(l)[h].float().T  # [B, hd]

    def set_z(z, l_):
        z = z.clone()
        z[:, -1, h] = sign * 50 * direction / direction.norm(dim=-1, keepdim=True)
        return z

    st = contextlib.ExitStack()
    st.enter_context(hooks.knockout(model, l, block, heads=[h]))
    st.enter_context(hooks.edit(model, "z", l, set_z))
    return st


@pytest.mark.parametrize("attend,sign,expected", [("subject", 1.0, "mover"), ("bos", 1.0, ""),
                                                  ("subject", -1.0, "")])
def test_constructed_mover_head(attend, sign, expected):
    """A head made to attend only to the subject and to write the target is labelled a mover; the
    same head attending to BOS, or writing against the target, is not."""
    from tests.conftest import _load

    model = _load("tiny-llama")
    # longest first: the order measure() batches them in, so the knockout mask's rows line up
    facts = sorted(_facts(3), key=lambda f: -len(model.tokenizer(f.prompt)["input_ids"]))
    l, h = model.n_layers - 1, 0
    with _constructed(model, facts, l, h, attend, sign):
        rows, mean_logits = R.measure(model, facts, [f"a{l}.h{h}", f"a{l}.h1"], batch_size=3)
    table = R.node_table(rows, mean_logits, model.tokenizer, R.RoleRules())
    row = table.set_index("node").loc[f"a{l}.h{h}"]
    assert row["role"] == expected
    if attend == "subject":
        assert row["att_subject"] > 0.99
    assert table.set_index("node").loc[f"a{l}.h1", "role"] == ""  # the untouched head
    assert Graph.from_model(model).up_index(f"a{l}.h{h}") > 0
