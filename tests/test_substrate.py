"""Tests that would catch a lying substrate: models, hook points and interventions."""

from __future__ import annotations

import pytest
import torch

from factscope import hooks
from factscope.archs import arch_for
from factscope.errors import FactscopeError
from factscope.models import load_model, resolve

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Danielle Darrieux speaks",  # shorter: exercises left padding
    "Toyota is headquartered in the country of",
]


def _real(batch):
    return batch.attention_mask.bool()


def _max_diff(a, b, mask):
    return (a - b)[mask].abs().max().item()


@pytest.fixture
def model(any_model):
    return any_model


def test_noop_interventions_reproduce_logits(model):
    batch = model.encode(PROMPTS)
    base = model.run(batch, last_only=False)
    mask = _real(batch)
    with hooks.cache(model, hooks.POINTS) as c:
        cached = model.run(batch, last_only=False)
    assert _max_diff(cached, base, mask) <= 1e-5
    empty = torch.zeros(len(batch), batch.input_ids.shape[1], batch.input_ids.shape[1], dtype=torch.bool)
    with hooks.knockout(model, range(model.n_layers), empty), hooks.edit(model, "mlp_out", 0, lambda x, l: None):
        assert _max_diff(model.run(batch, last_only=False), base, mask) <= 1e-5
    # patching a run's own cache into itself changes nothing, at every editable point
    for point in hooks.EDITABLE:
        l = model.n_layers // 2
        with hooks.patch(model, point, l, c[point, l]):
            assert _max_diff(model.run(batch, last_only=False), base, mask) <= 1e-5, point
    # starting from a cached residual stream gives the same logits as the full forward
    l = model.n_layers // 2
    with hooks.start_at(model, l, c["resid_pre", l]):
        assert _max_diff(model.run(batch, last_only=False), base, mask) <= 1e-5
    # the last-position-only path equals the full logits at the last position (a [B, 1, d] instead
    # of a [B, T, d] matmul: float32 rounding of the unembedding only)
    assert (model.run(batch, last_only=True) - base[:, -1]).abs().max().item() <= 1e-4


def test_hooks_are_removed_even_on_exceptions(tiny):
    batch = tiny.encode(PROMPTS[:1])
    base = tiny.run(batch)
    with pytest.raises(RuntimeError):
        with hooks.ablate(tiny, "mlp", range(tiny.n_layers)), hooks.knockout(
            tiny, range(tiny.n_layers), torch.ones(batch.input_ids.shape[1], batch.input_ids.shape[1], dtype=torch.bool)
        ):
            assert (tiny.run(batch) - base).abs().max() > 1e-3
            raise RuntimeError("boom")
    assert torch.equal(tiny.run(batch), base)
    for l in range(tiny.n_layers):
        assert tiny.attn(l)._fs_blocks == [] and tiny.attn(l)._fs_record is None
        assert not tiny.layer(l)._forward_hooks and not tiny.layer(l)._forward_pre_hooks


def test_head_shares_sum_to_attn_out_and_stream_decomposes(model):
    batch = model.encode(PROMPTS)
    with hooks.cache(model, ["head_out", "attn_out", "mlp_out", "resid_pre", "resid_post"]) as c:
        model.run(batch, last_only=False)
    mask = _real(batch)
    for l in range(model.n_layers):
        heads = c["head_out", l].sum(2)
        bias = getattr(model.module(l, model.spec.o_proj), "bias", None)
        if bias is not None:
            heads = heads + bias
        scale = c["attn_out", l][mask].abs().max().item()
        assert _max_diff(heads, c["attn_out", l], mask) <= 1e-5 * max(1.0, scale)
        # resid_post = resid_pre + attn_out + mlp_out (the point names mean what they say)
        recon = c["resid_pre", l] + c["attn_out", l] + c["mlp_out", l]
        big = c["resid_post", l][mask].abs().max().item()
        assert _max_diff(recon, c["resid_post", l], mask) <= 1e-5 * max(1.0, big)
        if l + 1 < model.n_layers:
            assert torch.equal(c["resid_post", l], c["resid_pre", l + 1])


def test_logit_lens_at_last_layer_equals_logits(model):
    batch = model.encode(PROMPTS)
    base = model.run(batch, last_only=False)
    with hooks.cache(model, "resid_post", [model.n_layers - 1]) as c:
        model.run(batch, last_only=False)
    assert _max_diff(model.logit_lens(c["resid_post", model.n_layers - 1]), base, _real(batch)) <= 1e-4


def test_knockout_last_to_earlier_changes_only_last(model):
    batch = model.encode(PROMPTS)
    base = model.run(batch, last_only=False)
    block = hooks.edge_mask(batch, [[-1]] * len(batch), [range(n - 1) for n in batch.lengths])
    with hooks.knockout(model, range(model.n_layers), block), hooks.cache(model, "attn_probs") as c:
        ko = model.run(batch, last_only=False)
    mask = _real(batch)
    mask[:, -1] = False
    assert _max_diff(ko, base, mask) <= 1e-5  # earlier positions untouched
    assert (ko[:, -1] - base[:, -1]).abs().max().item() > 1e-2  # the last position changed
    # the last position attends to itself only; every other row still sums to 1
    probs = c["attn_probs", 0]
    assert torch.allclose(probs[:, :, -1, -1], torch.ones_like(probs[:, :, -1, -1]), atol=1e-5)
    if model.name == "gemma-3-270m":
        assert (ko[:, -1].argmax(-1) != base[:, -1].argmax(-1)).any()


def test_knockout_single_head_and_gqa(tiny):
    batch = tiny.encode(PROMPTS[:1])
    block = hooks.edge_mask(batch, [[-1]], [range(batch.lengths[0] - 1)])
    with hooks.knockout(tiny, [1], block, heads=[2]), hooks.cache(tiny, "attn_probs", [1]) as c:
        tiny.run(batch)
    p = c["attn_probs", 1][0, :, -1]
    assert torch.allclose(p[2, -1], torch.tensor(1.0), atol=1e-6)
    assert all(p[h, -1] < 0.999 for h in (0, 1, 3))


def test_sliding_window_mask_kept_under_knockout():
    m = load_model("tiny-gemma3")  # sliding window of 4 tokens in layers 0-2
    batch = m.encode(["The Eiffel Tower is located in the city of Paris"])
    block = hooks.edge_mask(batch, [[-1]], [[-2]])
    with hooks.knockout(m, range(m.n_layers), block), hooks.cache(m, "attn_probs") as c:
        m.run(batch)
    T = batch.input_ids.shape[1]
    row = c["attn_probs", 0][0, :, -1]
    assert torch.all(row[:, : T - 4] == 0)  # outside the window: still masked
    assert torch.all(row[:, -2] == 0)  # knocked out
    assert torch.all(c["attn_probs", 3][0, :, -1, : T - 4].sum(-1) > 0)  # full-attention layer sees all


def test_ablations(tiny):
    batch = tiny.encode(PROMPTS)
    base = tiny.run(batch)
    # hooks run in the order they were entered: the cache sees the ablated values
    with hooks.ablate(tiny, "mlp", 1), hooks.cache(tiny, ["mlp_out", "attn_out", "z"], [1]) as c:
        tiny.run(batch)
    assert c["mlp_out", 1].abs().max() == 0
    with hooks.ablate(tiny, "head", 1, heads=[0, 3]), hooks.cache(tiny, "z", [1]) as c:
        out = tiny.run(batch)
    z = c["z", 1]
    assert z[:, :, [0, 3]].abs().max() == 0 and z[:, :, [1, 2]].abs().max() > 0
    assert (out - base).abs().max() > 1e-4
    ref = tiny.encode(["Paris is the capital of France", "Tokyo is in Japan"])
    means = hooks.mean_activations(tiny, "attn_out", [2], ref)
    with hooks.ablate(tiny, "attn", 2, how="mean", reference=ref), hooks.cache(tiny, "attn_out", [2]) as c:
        tiny.run(batch)
    assert torch.allclose(c["attn_out", 2], means[2].expand_as(c["attn_out", 2]))
    with pytest.raises(FactscopeError, match="reference"):
        with hooks.ablate(tiny, "attn", 2, how="mean"):
            pass


def test_patch_from_another_run_and_positions(tiny):
    ids = tiny.tokenizer("The Eiffel Tower is located in")["input_ids"]
    other = list(ids)
    other[-2] = (other[-2] + 7) % len(tiny.tokenizer)  # a same-length corrupted prompt
    a, b = tiny.batch_from_ids([ids]), tiny.batch_from_ids([other])
    with hooks.cache(tiny, "resid_pre", [2]) as cb:
        logits_b = tiny.run(b)
    # patching every position of layer 2's input from run b reproduces run b exactly
    with hooks.patch(tiny, "resid_pre", 2, cb["resid_pre", 2]):
        assert torch.allclose(tiny.run(a), logits_b, atol=1e-5)
    # patching only the first position leaves the last position's input intact
    with hooks.cache(tiny, "resid_pre", [2]) as ca:
        logits_a = tiny.run(a)
    with hooks.patch(tiny, "resid_pre", 2, cb["resid_pre", 2], positions=[[0]]), hooks.cache(tiny, "resid_pre", [2]) as c:
        tiny.run(a)
    assert torch.equal(c["resid_pre", 2][0, 0], cb["resid_pre", 2][0, 0])
    assert torch.equal(c["resid_pre", 2][0, 1:], ca["resid_pre", 2][0, 1:])
    assert not torch.allclose(logits_a, logits_b, atol=1e-3)


def test_batched_equals_single(tiny):
    batch = tiny.encode(PROMPTS)
    together = tiny.run(batch)
    for i, p in enumerate(PROMPTS):
        assert (tiny.run([p])[0] - together[i]).abs().max().item() <= 1e-5


def test_weights_views_match_hooks(tiny):
    """W_V/W_O/b_V reproduce z and head_out from the attended vectors."""
    batch = tiny.encode(PROMPTS[:1])
    l = 1
    with hooks.cache(tiny, ["resid_pre", "attn_probs", "z", "head_out"], [l]) as c:
        tiny.run(batch)
    x = tiny.attn_input_norm(l, c["resid_pre", l])[0]  # [T, d]
    v = torch.einsum("td,hde->hte", x, tiny.W_V(l)) + tiny.b_V(l)[:, None]  # [H, T, hd]
    z = torch.einsum("hqk,hke->qhe", c["attn_probs", l][0], v)
    assert torch.allclose(z, c["z", l][0], atol=1e-5)
    out = torch.einsum("qhe,hed->qhd", z, tiny.W_O(l))
    scale = tiny.post_attn_scale(l, out.sum(1))  # Gemma's post-attention norm factor, else 1.0
    out = out * (scale.unsqueeze(1) if isinstance(scale, torch.Tensor) else scale)
    assert torch.allclose(out, c["head_out", l][0], atol=1e-5)


def test_gemma_knows_paris(gemma):
    probs = gemma.run(["The Eiffel Tower is located in the city of"]).softmax(-1)[0]
    assert gemma.tokenizer.decode([int(probs.argmax())]) == " Paris"
    assert gemma.embed(torch.tensor([[2]])).abs().max() > 1.0  # the sqrt(d_model) scale is applied


def test_errors_are_clear(tmp_path):
    with pytest.raises(FactscopeError, match="unsupported architecture 'bert'.*gpt2"):
        arch_for("bert")
    with pytest.raises(FactscopeError, match="unknown model 'no-such-model'"):
        resolve("no-such-model")
    with pytest.raises(FactscopeError, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FactscopeError, match="unsupported architecture"):
        load_model(str(tmp_path / "bert"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(FactscopeError, match="broken.gguf"):
        load_model(str(bad))


def test_local_dir_roundtrip(tmp_path):
    """A saved model directory loads offline through the plain from_pretrained path."""
    m = load_model("tiny-llama")
    m.hf.save_pretrained(tmp_path / "m")
    m.tokenizer.save_pretrained(tmp_path / "m")
    m2 = load_model(str(tmp_path / "m"))
    assert m2.spec.family == "llama"
    assert torch.allclose(m.run(PROMPTS), m2.run(PROMPTS), atol=1e-5)
