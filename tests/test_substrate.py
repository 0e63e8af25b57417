"""Tests that would catch a lying substrate: models, hook points and interventions."""

from __future__ import annotations

import contextlib
import copy

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
    with hooks.cache(model, hooks.available_points(model)) as c:
        cached = model.run(batch, last_only=False)
    assert _max_diff(cached, base, mask) <= 1e-5
    empty = torch.zeros(len(batch), batch.input_ids.shape[1], batch.input_ids.shape[1], dtype=torch.bool)
    with hooks.knockout(model, range(model.n_layers), empty), hooks.edit(model, "mlp_out", 0, lambda x, l: None):
        assert _max_diff(model.run(batch, last_only=False), base, mask) <= 1e-5
    # patching a run's own cache into itself changes nothing, at every editable point
    for point in hooks.available_points(model, editable=True):
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


def test_stop_after_runs_nothing_above_the_layer(tiny):
    """Inside ``stop_after(l)`` the forward gives layer l's residual of the full forward, no layer
    above l runs (its MLP never fires), the forward call does not return, and the hooks are gone
    afterwards (the next forward runs whole)."""
    batch = tiny.encode(PROMPTS)
    l = tiny.n_layers // 2
    with hooks.cache(tiny, "resid_post", [l]) as full:
        base = tiny.run(batch)
    after = []
    with hooks.cache(tiny, ["resid_post", "mlp_out"]) as c, hooks.stop_after(tiny, l):
        tiny.run(batch)
        after.append(1)
    assert not after
    assert torch.equal(c["resid_post", l], full["resid_post", l])
    assert ("mlp_out", l) in c and ("mlp_out", l + 1) not in c and ("resid_post", l + 1) not in c
    assert torch.equal(tiny.run(batch), base)
    with pytest.raises(FactscopeError):
        with hooks.stop_after(tiny, tiny.n_layers):
            pass


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


def _with_random_biases(model):
    """A copy of the model whose every bias is random (the tiny models' biases start at zero, which
    would hide a bias taken from the wrong head)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.hf.modules():
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.nn.Parameter):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return m


def test_weights_views_match_hooks(tiny):
    """W_V/W_O/b_V reproduce z and head_out from the attended vectors (also with nonzero biases)."""
    for model in (tiny, _with_random_biases(tiny)):
        batch = model.encode(PROMPTS[:1])
        l = 1
        with hooks.cache(model, ["resid_pre", "attn_probs", "z", "head_out"], [l]) as c:
            model.run(batch)
        x = model.attn_input_norm(l, c["resid_pre", l])[0]  # [T, d]
        v = torch.einsum("td,hde->hte", x, model.W_V(l)) + model.b_V(l)[:, None]  # [H, T, hd]
        z = torch.einsum("hqk,hke->qhe", c["attn_probs", l][0], v)
        assert torch.allclose(z, c["z", l][0], atol=1e-5)
        out = torch.einsum("qhe,hed->qhd", z, model.W_O(l))
        scale = model.post_attn_scale(l, out.sum(1))  # Gemma's post-attention norm factor, else 1.0
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


# ------------------------------------------------------------------------------------------------
# Patching, mean ablation and attention probabilities against independent constructions
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _raw_perturbation(model, point, l):
    """A corrupted run built with a plain PyTorch hook (not factscope's patch code) that changes
    layer ``l`` from ``point`` on and nothing upstream of it: the value projection's output for
    ``z``/``head_out``/``attn_out``, the MLP's input for ``mlp_out``."""
    if point in ("z", "head_out", "attn_out"):
        h = model.module(l, model.spec.v_proj).register_forward_hook(lambda m, a, out: out * 1.7 + 0.3)
    else:
        h = model.mlp(l).register_forward_pre_hook(lambda m, args: (args[0] * 1.7 + 0.3, *args[1:]))
    try:
        yield
    finally:
        h.remove()


def _clean_and_corrupted(model, point, l):
    """Batches and logits (all positions) of a clean and a corrupted run that differ from ``point``
    at layer ``l`` on, with both runs' activations at that point."""
    ids = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    a = model.batch_from_ids(ids)
    if point in ("resid_pre", "resid_post"):  # corrupt a token: everything from layer 0 differs
        other = [list(s) for s in ids]
        for s in other:
            s[-2] = (s[-2] + 7) % len(model.tokenizer)
        b = model.batch_from_ids(other)
        corrupt = contextlib.nullcontext()
    else:
        b, corrupt = a, _raw_perturbation(model, point, l)
    with hooks.cache(model, point, [l]) as ca:
        logits_a = model.run(a, last_only=False)
    with corrupt, hooks.cache(model, point, [l]) as cb:
        logits_b = model.run(b, last_only=False)
    return a, b, logits_a, logits_b, ca[point, l], cb[point, l]


def test_patch_every_point_from_corrupted_run_gives_its_logits(tiny):
    """For every editable point and layer: patching all positions with a corrupted run's values
    gives the corrupted run's logits; ``mode="add"`` with (b - a) gives the same."""
    mask = None
    # (the receiving-side points feed one receiver, not the stream: a corrupted run's values there do
    # not give its logits; tests/test_circuits_core.py patches them from another prompt instead)
    for point in [p for p in hooks.EDITABLE if p not in hooks.RECEIVING]:
        for l in range(tiny.n_layers):
            a, b, logits_a, logits_b, va, vb = _clean_and_corrupted(tiny, point, l)
            mask = _real(a)
            # the corruption is visible, so a patch that does nothing cannot pass
            assert _max_diff(logits_a, logits_b, mask) > 1e-3, (point, l)
            assert not torch.allclose(va, vb, atol=1e-4)
            with hooks.patch(tiny, point, l, vb), hooks.cache(tiny, point, [l]) as c:
                patched = tiny.run(a, last_only=False)
            assert _max_diff(patched, logits_b, mask) <= 1e-4, (point, l)
            assert torch.equal(c[point, l], vb)  # hooks entered later see the patched value
            with hooks.patch(tiny, point, l, vb - va, mode="add"):
                added = tiny.run(a, last_only=False)
            assert _max_diff(added, logits_b, mask) <= 1e-4, (point, l, "add")
            # the clean run is untouched after the blocks
            assert _max_diff(tiny.run(a, last_only=False), logits_a, mask) == 0


def test_patch_add_is_a_sum_and_positions_select_columns(tiny):
    """``add`` with a vector adds it at the chosen columns only; ``replace`` with a vector puts it there."""
    batch = tiny.encode(PROMPTS)
    l = tiny.n_layers - 1
    with hooks.cache(tiny, "resid_post", [l]) as c:
        base = tiny.run(batch, last_only=False)
    x = c["resid_post", l]
    vec = torch.linspace(-1, 1, tiny.d_model)
    cols = hooks.columns(batch, [[0, -1], [1], [-2]])
    sel = torch.zeros(x.shape[:2], dtype=torch.bool)
    for i, cc in enumerate(cols):
        sel[i, cc] = True
    for mode, expect in (("add", x + vec), ("replace", vec.expand_as(x))):
        want = torch.where(sel[..., None], expect, x)
        with hooks.patch(tiny, "resid_post", l, vec, positions=cols, mode=mode), hooks.cache(tiny, "resid_post", [l]) as cp:
            out = tiny.run(batch, last_only=False)
        assert torch.allclose(cp["resid_post", l], want, atol=1e-6), mode
        # an edit of the last layer's output takes effect: the logits are the lens of the new stream
        assert _max_diff(out, tiny.logit_lens(want), _real(batch)) <= 1e-4, mode
        assert _max_diff(out, base, sel) > 1e-3 and _max_diff(out, base, _real(batch) & ~sel) <= 1e-5, mode
    with pytest.raises(FactscopeError, match="mode"):
        with hooks.patch(tiny, "resid_post", l, vec, mode="mul"):
            pass


def _masked_mean(x, attention_mask):
    """Mean over the real (non-pad) tokens of a cached [B, T, ...] activation, written out longhand."""
    rows = [x[i, t] for i in range(x.shape[0]) for t in range(x.shape[1]) if attention_mask[i, t]]
    return torch.stack(rows).mean(0)


REFERENCE = ["Paris is the capital of France", "Tokyo is in", "The Colosseum is located in the city of Rome"]


def test_mean_ablation_uses_the_masked_mean_of_real_tokens(tiny):
    batch = tiny.encode(PROMPTS)
    ref = tiny.encode(REFERENCE)  # of different lengths: padding must not enter the mean
    assert not ref.attention_mask.bool().all()
    with hooks.cache(tiny, ["attn_out", "mlp_out", "z"]) as cref:
        tiny.run(ref, last_only=False)
    with hooks.cache(tiny, ["attn_out", "mlp_out", "z"]) as clean:
        base = tiny.run(batch, last_only=False)
    real = _real(batch)
    for kind, point, l in (("attn", "attn_out", 2), ("mlp", "mlp_out", 1)):
        mean = _masked_mean(cref[point, l], ref.attention_mask)
        with hooks.ablate(tiny, kind, l, how="mean", reference=ref), hooks.cache(tiny, point, [l]) as c:
            tiny.run(batch, last_only=False)
        assert torch.allclose(c[point, l], mean.expand_as(c[point, l]), atol=1e-5), kind
        # only some positions: the others keep the clean run's values, earlier positions' logits too
        pos = [[-1], [-1, -2], [-3]]
        cols = hooks.columns(batch, pos)
        sel = torch.zeros(real.shape, dtype=torch.bool)
        for i, cc in enumerate(cols):
            sel[i, cc] = True
        with hooks.ablate(tiny, kind, l, how="mean", reference=ref, positions=cols), hooks.cache(tiny, point, [l]) as c:
            out = tiny.run(batch, last_only=False)
        assert torch.allclose(c[point, l][sel], mean.expand_as(c[point, l][sel]), atol=1e-5), kind
        assert torch.equal(c[point, l][~sel], clean[point, l][~sel]), kind
        before = torch.zeros_like(real)
        for i, cc in enumerate(cols):
            before[i, batch.offset[i] : min(cc)] = True
        assert _max_diff(out, base, before) <= 1e-5 and _max_diff(out, base, sel) > 1e-4, kind


def test_head_mean_ablation_replaces_only_chosen_heads_and_positions(tiny):
    batch = tiny.encode(PROMPTS)
    ref = tiny.encode(REFERENCE)
    l, heads = 1, [0, 3]
    with hooks.cache(tiny, "z", [l]) as cref:
        tiny.run(ref, last_only=False)
    mean = _masked_mean(cref["z", l], ref.attention_mask)  # [H, hd]
    with hooks.cache(tiny, "z", [l]) as clean:
        base = tiny.run(batch, last_only=False)
    z0 = clean["z", l]
    with hooks.ablate(tiny, "head", l, heads=heads, how="mean", reference=ref), hooks.cache(tiny, "z", [l]) as c:
        out = tiny.run(batch, last_only=False)
    z = c["z", l]
    others = [h for h in range(tiny.n_heads) if h not in heads]
    assert torch.allclose(z[:, :, heads], mean[heads].expand_as(z[:, :, heads]), atol=1e-5)
    assert torch.equal(z[:, :, others], z0[:, :, others])
    assert _max_diff(out, base, _real(batch)) > 1e-4
    cols = hooks.columns(batch, [[-1]] * len(batch))
    with hooks.ablate(tiny, "head", l, heads=[2], how="mean", reference=ref, positions=cols), hooks.cache(tiny, "z", [l]) as c:
        out = tiny.run(batch, last_only=False)
    z = c["z", l]
    assert torch.allclose(z[:, -1, 2], mean[2].expand_as(z[:, -1, 2]), atol=1e-5)
    assert torch.equal(z[:, :-1], z0[:, :-1]) and torch.equal(z[:, -1, [0, 1, 3]], z0[:, -1, [0, 1, 3]])
    # the last column is every prompt's last token: all earlier positions keep their logits
    assert _max_diff(out[:, :-1], base[:, :-1], _real(batch)[:, :-1]) <= 1e-5
    assert (out[:, -1] - base[:, -1]).abs().max() > 1e-4
    # zero ablation of one head at some positions
    with hooks.ablate(tiny, "head", l, heads=[1], positions=cols), hooks.cache(tiny, "z", [l]) as c:
        tiny.run(batch, last_only=False)
    assert c["z", l][:, -1, 1].abs().max() == 0 and torch.equal(c["z", l][:, :-1], z0[:, :-1])
    with pytest.raises(FactscopeError, match="head 4 out of range"):
        with hooks.ablate(tiny, "head", l, heads=[4]):
            pass


def test_attention_probabilities_match_eager_attention_at_every_layer(tiny):
    """Recorded probabilities equal Hugging Face's own eager attention (output_attentions) on a copy
    of the model, at every layer: causal, padding and (tiny-gemma3) sliding-window masks included."""
    batch = tiny.encode(PROMPTS + ["The Eiffel Tower is located in the city of Paris, France, in Europe"])
    with hooks.cache(tiny, "attn_probs") as c:
        tiny.run(batch, last_only=False)
    ref = copy.deepcopy(tiny.hf)
    ref.set_attn_implementation("eager")
    with torch.inference_mode():
        out = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False, output_attentions=True)
    real = _real(batch)
    q = real[:, None, :, None]  # rows of real query tokens
    for l in range(tiny.n_layers):
        mine, theirs = c["attn_probs", l], out.attentions[l]
        assert mine.shape == theirs.shape == (len(batch), tiny.n_heads, *batch.input_ids.shape[1:] * 2)
        d = (mine - theirs).abs().masked_fill(~q, 0).max().item()
        assert d <= 1e-5, (l, d)
        rows = mine.sum(-1)[real[:, None, :].expand(-1, tiny.n_heads, -1)]
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
        for i in range(len(batch)):  # no real token attends to padding
            if not real[i].all():
                assert mine[i][:, real[i]][..., ~real[i]].abs().max().item() == 0


# ------------------------------------------------------------------------------------------------
# Smaller contracts the mutation audit (docs/testing.md) found unguarded
# ------------------------------------------------------------------------------------------------


def test_bad_layers_and_positions_are_clear_errors(tiny):
    batch = tiny.encode(PROMPTS[:2])
    L = tiny.n_layers
    for point in ("resid_pre", "attn_probs", "head_out"):
        with pytest.raises(FactscopeError, match=f"layer {L} out of range"):
            with hooks.cache(tiny, point, [L]):
                pass
    with pytest.raises(FactscopeError, match=f"layer {L} out of range"):
        with hooks.patch(tiny, "resid_post", L, torch.zeros(tiny.d_model)):
            pass
    with pytest.raises(FactscopeError, match="read-only"):
        with hooks.patch(tiny, "attn_probs", 0, torch.zeros(1)):
            pass
    n = batch.lengths[1]
    assert hooks.columns(batch, [[0], [-1, -n, n - 1]]) == [[batch.offset[0]], [batch.offset[1] + n - 1, batch.offset[1], batch.offset[1] + n - 1]]
    for bad in (n, -n - 1):
        with pytest.raises(FactscopeError, match=f"position {bad} outside prompt 1 of {n} tokens"):
            hooks.columns(batch, [[0], [bad]])


def test_cache_stack_detach_and_repeated_forwards(tiny):
    batch = tiny.encode(PROMPTS)
    with hooks.cache(tiny, "resid_pre", [3, 1, 2]) as c:
        tiny.run(batch)
    stacked = c.stack("resid_pre")
    assert [torch.equal(stacked[i], c["resid_pre", l]) for i, l in enumerate((1, 2, 3))] == [True] * 3
    # detach=False keeps the autograd graph (attribution), detach=True cuts it
    delta = torch.zeros(tiny.d_model, requires_grad=True)
    for detach in (True, False):
        with hooks.patch(tiny, "resid_pre", 0, delta, mode="add"), hooks.cache(tiny, "resid_post", [1], detach=detach) as c:
            tiny.forward(batch)
        assert c["resid_post", 1].requires_grad is (not detach)
    # two forwards inside one cache block: the last one is kept, attention probabilities included
    short = tiny.encode(PROMPTS[1:2])
    with hooks.cache(tiny, ["attn_probs", "resid_pre"], [1]) as c:
        tiny.run(batch)
        tiny.run(short)
    T = short.input_ids.shape[1]
    assert c["attn_probs", 1].shape == (1, tiny.n_heads, T, T) and c["resid_pre", 1].shape[:2] == (1, T)


def test_query_with_every_key_blocked_reads_nothing(tiny):
    """Blocking all keys (itself included) of the last query: it attends to nothing (z = 0 there, no
    NaN), rather than to the masked-out padding or future keys."""
    batch = tiny.encode(PROMPTS)
    block = hooks.edge_mask(batch, [[-1]] * len(batch), [range(n) for n in batch.lengths])
    with hooks.knockout(tiny, [1], block), hooks.cache(tiny, ["z", "attn_probs"], [1]) as c:
        out = tiny.run(batch)
    assert torch.isfinite(out).all()
    assert c["z", 1][:, -1].abs().max() == 0 and c["z", 1][:, :-1].abs().max() > 0
    assert c["attn_probs", 1][:, :, -1].abs().max() == 0


def test_forward_equals_plain_hf_forward_on_an_unpadded_prompt(tiny):
    """Our batch layout (positions from the attention mask) gives the model's own unhooked logits."""
    ids = tiny.tokenizer(PROMPTS[0])["input_ids"]
    batch = tiny.batch_from_ids([ids])
    assert batch.position_ids[0].tolist() == list(range(len(ids)))
    with torch.inference_mode():
        plain = tiny.hf(input_ids=torch.tensor([ids])).logits
    assert _max_diff(tiny.run(batch, last_only=False), plain, _real(batch)) <= 1e-5
    with pytest.raises(FactscopeError, match="no prompts given"):
        tiny.encode([])


def test_batch_repeat_is_each_prompt_n_times_in_a_row(tiny):
    batch = tiny.encode(PROMPTS)
    rep = batch.repeat(2)
    want = tiny.encode([p for p in PROMPTS for _ in range(2)])
    for name in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(getattr(rep, name), getattr(want, name)), name
    assert rep.lengths == want.lengths and rep.offset == want.offset


def test_load_model_dtype_names():
    m = load_model("tiny-gpt2", dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.run(["Paris is"]).dtype == torch.bfloat16
    assert load_model("tiny-gpt2", dtype="float16").dtype == torch.float16


def test_length_batches_exact():
    from factscope.predict import length_batches

    lengths = [3, 5, 5, 2, 7]
    assert length_batches(lengths, 2) == [[4, 1], [2, 0], [3]]  # longest first, ties by index
    # max_tokens bounds padded tokens: the batch's width (its longest prompt) times its size
    assert length_batches(lengths, 10, max_tokens=10) == [[4], [1, 2], [0, 3]]
    assert length_batches(lengths, 10, max_tokens=15) == [[4, 1], [2, 0, 3]]
    with pytest.raises(FactscopeError, match="batch size"):
        length_batches(lengths, 0)


def test_top_k_and_known_facts_match_single_prompt_runs(tiny):
    """Batched (two per batch, sorted by length) prediction equals one unbatched run per prompt:
    top-k probabilities, the target's first token, its rank, and known = rank < top-k."""
    from factscope.facts import Fact, target_ids
    from factscope.predict import known_facts, known_rate_by_relation, top_k

    prompts = ["The Eiffel Tower is located in the city of", "Toyota is headquartered in", "Danielle Darrieux speaks",
               "The mother tongue of Danielle Darrieux is", "Paris is the capital of"]
    single = torch.stack([tiny.run([p])[0] for p in prompts]).float()
    preds = top_k(tiny, prompts, k=3, batch_size=2)
    for p, lg in zip(preds, single):
        probs, ix = lg.softmax(-1).topk(3)
        assert p.token_ids == ix.tolist() and p.tokens == tiny.to_str_tokens(ix.tolist())
        assert torch.allclose(torch.tensor(p.probs), probs, atol=1e-5)
    # facts whose (multi-token) targets start with one of the model's top tokens (even prompts) or
    # with a token far down its list (odd prompts): only the target's first token counts
    facts, ranks = [], []
    for i, (p, lg) in enumerate(zip(prompts, single)):
        order = lg.argsort(descending=True).tolist()
        for r, t in enumerate(order[:60] if i % 2 == 0 else order[100:], start=0 if i % 2 == 0 else 100):
            word = tiny.tokenizer.decode([t]).strip()
            if word.isalpha() and target_ids(tiny.tokenizer, p, word + " Bridge")[0] == t:
                break
        else:
            pytest.fail(f"no usable target token for {p!r}")
        subject = p.split()[0]
        facts.append(Fact(subject, f"r{i % 2}", f"rel {i % 2}", p.replace(subject, "{}", 1), p, word + " Bridge", id=str(i)))
        ranks.append(r)
    k_all = max(ranks[0::2]) + 1  # every even fact known, no odd one
    assert k_all <= 60
    for k in (1, 3, k_all):
        known, table = known_facts(tiny, facts, top_k=k, batch_size=2, progress=False)
        for f, row, lg, r in zip(facts, table.to_dict("records"), single, ranks):
            first = target_ids(tiny.tokenizer, f.prompt, f.target_true)[0]
            assert len(target_ids(tiny.tokenizer, f.prompt, f.target_true)) > 1
            rank = int((lg > lg[first]).sum())
            assert (row["rank"], row["known"]) == (rank, rank < k) == (r, r < k), (f.prompt, k)
            assert row["prob"] == pytest.approx(float(lg.softmax(-1)[first]), abs=1e-6)
            assert row["top1"] == tiny.tokenizer.decode([int(lg.argmax())])
        assert [f.id for f in known] == [r["id"] for r in table.to_dict("records") if r["known"]]
    assert [f.id for f in known] == ["0", "2", "4"]
    rates = known_rate_by_relation(table)
    assert rates["relation_id"].tolist() == ["r0", "r1"] and rates["rate"].tolist() == [1.0, 0.0]  # best first
    by_rel = rates.set_index("relation_id")
    for rid, g in table.groupby("relation_id"):
        assert (by_rel.loc[rid, "n"], by_rel.loc[rid, "known"]) == (len(g), g["known"].sum())
        assert by_rel.loc[rid, "rate"] == pytest.approx(g["known"].mean())
