"""The paper's ablations in the substrate (hooks.ablate how="uniform" / "hidden"), each against a
computation by hand from cached activations, on every tiny family (grouped-query attention in
tiny-llama / tiny-qwen2 / tiny-gemma3, a 4-token sliding window in tiny-gemma3)."""

from __future__ import annotations

import pytest
import torch

from factscope import hooks

PROMPTS = ["The Eiffel Tower is located in the city of", "Paris is", "Rome"]


def _values(model, l, x):
    """Every query head's value vectors of residual ``x`` [B, T, d] -> [B, T, H, hd]."""
    h = model.attn_input_norm(l, x)
    return torch.einsum("btd,hde->bthe", h, model.W_V(l)) + model.b_V(l)


def _visible(model, l, batch) -> torch.Tensor:
    """[B, T(query), T(key)] bool, built from the batch directly: causal, non-pad, in the window."""
    B, T = batch.input_ids.shape
    cfg = model.hf.config
    types = getattr(cfg, "layer_types", None)
    window = cfg.sliding_window if types is not None and types[l] == "sliding_attention" else None
    q = torch.arange(T).view(T, 1)
    k = torch.arange(T).view(1, T)
    vis = (k <= q).expand(B, T, T).clone()
    for i in range(B):
        vis[i, :, : batch.offset[i]] = False
    if window is not None:
        vis &= (q - k) < window
    return vis


def test_uniform_attention_equals_hand_computed(tiny):
    batch = tiny.encode(PROMPTS)
    L = tiny.n_layers
    with torch.inference_mode(), hooks.ablate(tiny, "attn", range(L), how="uniform"), hooks.cache(tiny, ["resid_pre", "attn_out"]) as c:
        tiny.forward(batch)
    real = batch.attention_mask.bool()
    for l in range(L):
        v = _values(tiny, l, c["resid_pre", l])  # [B, T, H, hd]
        w = _visible(tiny, l, batch).float()
        w = w / w.sum(-1, keepdim=True).clamp(min=1)
        z = torch.einsum("bqk,bkhe->bqhe", w, v).flatten(2)
        o = tiny.module(l, tiny.spec.o_proj)(z)
        want = o * tiny.post_attn_scale(l, o)
        torch.testing.assert_close(c["attn_out", l][real], want[real], rtol=1e-4, atol=1e-5)
    if tiny.spec.family == "gemma3":  # the window matters: position 6 of the first prompt sees 4 keys, not 7
        assert _visible(tiny, 0, batch)[0, batch.offset[0] + 6].sum() == 4


def test_uniform_heads_only_touch_those_heads(tiny):
    batch = tiny.encode(PROMPTS[:2])
    l = tiny.n_layers - 1
    with torch.inference_mode():
        with hooks.cache(tiny, "z", [l]) as clean:
            tiny.forward(batch)
        with hooks.ablate(tiny, "head", l, heads=[1], how="uniform"), hooks.cache(tiny, ["z", "resid_pre"], [l]) as c:
            tiny.forward(batch)
    real = batch.attention_mask.bool()
    v = _values(tiny, l, c["resid_pre", l])
    w = _visible(tiny, l, batch).float()
    w = w / w.sum(-1, keepdim=True).clamp(min=1)
    z = torch.einsum("bqk,bkhe->bqhe", w, v)
    torch.testing.assert_close(c["z", l][..., 1, :][real], z[..., 1, :][real], rtol=1e-4, atol=1e-5)
    others = [h for h in range(tiny.n_heads) if h != 1]
    torch.testing.assert_close(c["z", l][..., others, :][real], clean["z", l][..., others, :][real])


def test_uniform_is_the_identity_where_one_key_is_visible(tiny):
    """A query that sees one key attends to it whatever the scores: uniform attention in every layer
    leaves a one-token prompt's logits (and each prompt's first position) exactly as they were; a
    zeroed attention output (the other ablation) does not."""
    batch = tiny.batch_from_ids([[5], [7, 8, 9, 10]])  # padded: row 0 sees only its own token
    L = tiny.n_layers
    with torch.inference_mode():
        clean = tiny.forward(batch, last_only=False)
        with hooks.ablate(tiny, "attn", range(L), how="uniform"):
            uni = tiny.forward(batch, last_only=False)
        with hooks.ablate(tiny, "attn", range(L), how="zero"):
            zero = tiny.forward(batch, last_only=False)
    torch.testing.assert_close(uni[0, -1], clean[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uni[1, 0], clean[1, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(uni[1, -1], clean[1, -1], atol=1e-3)  # later positions do change
    assert not torch.allclose(zero[0, -1], clean[0, -1], atol=1e-3)


def test_uniform_positions_restrict_the_queries(tiny):
    """positions= picks the queries (rows) that attend uniformly; other rows are the clean run."""
    batch = tiny.encode(PROMPTS[:2]).repeat(2)  # rows 0,1: prompt 0; rows 2,3: prompt 1
    rows = torch.tensor([False, True, False, True]).view(4, 1).expand(4, batch.input_ids.shape[1])
    with torch.inference_mode():
        clean = tiny.forward(batch)
        with hooks.ablate(tiny, "attn", [0], how="uniform"):
            full = tiny.forward(batch)
        with hooks.ablate(tiny, "attn", [0], how="uniform", positions=rows):
            part = tiny.forward(batch)
    torch.testing.assert_close(part[[0, 2]], clean[[0, 2]])
    torch.testing.assert_close(part[[1, 3]], full[[1, 3]])


def test_mlp_hidden_ablation_leaves_the_output_bias(tiny):
    """how="hidden" zeroes the input of the down projection: the MLP adds down(0) (its bias; Gemma:
    the post-norm of that), whereas how="zero" adds nothing. The tiny models are initialized with
    zero biases, so give the down projection a bias for the test (restored after)."""
    down = tiny.module(0, tiny.spec.mlp_down)
    batch = tiny.encode(PROMPTS[:2])
    real = batch.attention_mask.bool()
    added = down.bias is None
    old = None if added else down.bias.detach().clone()
    try:
        if added:
            down.bias = torch.nn.Parameter(torch.zeros(down.weight.shape[0 if not tiny.spec.conv1d else 1]), requires_grad=False)
        with torch.no_grad():
            down.bias.copy_(torch.linspace(-1, 1, down.bias.numel()))
        with torch.inference_mode():
            with hooks.cache(tiny, ["mlp_hidden", "mlp_out"], [0]) as clean:
                tiny.forward(batch)
            with hooks.ablate(tiny, "mlp", 0, how="hidden"), hooks.cache(tiny, "mlp_out", [0]) as c:
                tiny.forward(batch)
            with hooks.ablate(tiny, "mlp", 0, how="zero"), hooks.cache(tiny, "mlp_out", [0]) as cz:
                tiny.forward(batch)
            post = tiny.module(0, tiny.spec.mlp_out) if tiny.spec.mlp_out != tiny.spec.mlp else (lambda x: x)
            # the hidden point is the down projection's input: down(hidden) (+ post-norm) is mlp_out
            torch.testing.assert_close(post(down(clean["mlp_hidden", 0]))[real], clean["mlp_out", 0][real], rtol=1e-4, atol=1e-5)
            want = post(down(torch.zeros(clean["mlp_hidden", 0].shape[-1])))
        assert want.abs().max() > 0.1
        torch.testing.assert_close(c["mlp_out", 0][real], want.expand_as(c["mlp_out", 0])[real], rtol=1e-4, atol=1e-5)
        assert cz["mlp_out", 0][real].abs().max() == 0
    finally:
        if added:
            down.bias = None
        else:
            with torch.no_grad():
                down.bias.copy_(old)


def test_ablation_choices_are_checked(tiny):
    from factscope.errors import FactscopeError

    with pytest.raises(FactscopeError, match="mlp ablation"), hooks.ablate(tiny, "mlp", 0, how="uniform"):
        pass
    with pytest.raises(FactscopeError, match="attn ablation"), hooks.ablate(tiny, "attn", 0, how="hidden"):
        pass


def test_uniform_is_removed_even_on_exceptions(tiny):
    batch = tiny.encode(PROMPTS[:1])
    base = tiny.run(batch)
    with pytest.raises(RuntimeError), hooks.ablate(tiny, "attn", range(tiny.n_layers), how="uniform"), hooks.ablate(tiny, "mlp", 0, how="hidden"):
        assert (tiny.run(batch) - base).abs().max() > 1e-3
        raise RuntimeError("boom")
    assert torch.equal(tiny.run(batch), base)
    assert all(tiny.attn(l)._fs_uniform == [] for l in range(tiny.n_layers))
