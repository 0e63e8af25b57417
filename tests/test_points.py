"""Hook points as data (archs.POINT_SITES), writable head_out, gradients (hooks.grads) against finite
differences, and the substrate boundary (no ``model.hf`` internals outside the substrate)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY
from factscope import archs, hooks
from factscope.errors import FactscopeError
from factscope.models import load_model

PROMPTS = ["The Eiffel Tower is located in the city of", "Paris is the capital of"]
SRC = Path(__file__).resolve().parents[1] / "src" / "factscope"


def test_every_point_has_a_site_and_hooks_reads_the_table():
    assert hooks.POINTS == tuple(archs.POINT_SITES)
    assert set(hooks.EDITABLE) == {p for p, s in archs.POINT_SITES.items() if s.editable}
    for spec in archs.ARCHS:
        for point, site in archs.POINT_SITES.items():
            assert site.io in ("input", "output")
            assert site.module in ("layer", "final_norm") or hasattr(spec, site.module), (spec.family, point)
            if site.proj:
                assert hasattr(spec, site.proj)


def _logits_with_hook(model, batch, module, pre, fn):
    """Logits with a plain PyTorch hook (not factscope's) on ``module``."""
    h = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        return model.run(batch, last_only=False)
    finally:
        h.remove()


def test_table_sites_are_where_the_points_are(tiny):
    """Adding a constant to a point through hooks.patch equals adding it with a plain hook on the
    module the table names (its input or output): the table's rows, not per-point code, place it."""
    batch = tiny.encode(PROMPTS)
    l = tiny.n_layers - 1
    for point in ("resid_pre", "attn_out", "mlp_out", "resid_post", "z", "mlp_hidden", "logits_in"):
        try:
            mod = hooks._site_module(tiny, point, l)
        except FactscopeError:
            continue
        site = archs.POINT_SITES[point]
        with hooks.cache(tiny, point, [l]) as c:
            tiny.run(batch)
        shape = c[point, l].shape  # z: [B, T, H, hd], the module sees [B, T, H * hd]
        width = shape[-2] * shape[-1] if site.heads == "split" else shape[-1]
        delta = torch.randn(width, generator=torch.Generator().manual_seed(0))
        if site.io == "input":
            ref = _logits_with_hook(tiny, batch, mod, True, lambda m, a: (a[0] + delta.to(a[0].dtype), *a[1:]))
        else:
            ref = _logits_with_hook(
                tiny, batch, mod, False,
                lambda m, a, o: (o[0] + delta.to(o[0].dtype), *o[1:]) if isinstance(o, tuple) else o + delta.to(o.dtype))
        with hooks.patch(tiny, point, l, delta.view(shape[-2:]) if site.heads == "split" else delta, mode="add"):
            got = tiny.run(batch, last_only=False)
        assert (got - ref).abs().max().item() <= 1e-5, point


# ------------------------------------------------------------------------------------------------
# Writable head_out
# ------------------------------------------------------------------------------------------------


def _head_out_checks(model):
    batch = model.encode(PROMPTS)
    base = model.run(batch, last_only=False)
    l = model.n_layers // 2
    # an identity edit (a new tensor with the same values) reproduces the logits bit for bit
    with hooks.edit(model, "head_out", range(model.n_layers), lambda x, l: x.clone()):
        assert torch.equal(model.run(batch, last_only=False), base)
    with hooks.cache(model, ["head_out", "attn_out"], [l]) as c:
        model.run(batch)
    h = 1
    zeroed = torch.zeros(model.n_heads, dtype=torch.bool)
    zeroed[h] = True

    def zero_head(x, l):
        return x.masked_fill(zeroed.view(1, 1, -1, 1).to(x.device), 0.0)

    with hooks.edit(model, "head_out", l, zero_head), hooks.cache(model, ["attn_out", "head_out"], [l]) as ce:
        out = model.run(batch, last_only=False)
    assert (out - base).abs().max().item() > 1e-4  # the head matters: the edit is visible
    # a later hook sees the edit; attn_out lost exactly that head's share
    assert torch.equal(ce["head_out", l][:, :, h], torch.zeros_like(ce["head_out", l][:, :, h]))
    scale = c["attn_out", l].abs().max().item()
    assert (ce["attn_out", l] - (c["attn_out", l] - c["head_out", l][:, :, h])).abs().max().item() <= 1e-5 * max(1, scale)
    # patching attn_out with (attn_out - that share) gives the same logits
    with hooks.patch(model, "attn_out", l, c["attn_out", l] - c["head_out", l][:, :, h]):
        assert (model.run(batch, last_only=False) - out).abs().max().item() <= 1e-4
    with hooks.ablate(model, "head", l, heads=[h]):
        z_zero = model.run(batch, last_only=False)
    if model.spec.post_attn_norm:
        # Gemma's post-attention norm rescales after zeroing z; the share edit keeps the clean factor
        assert (z_zero - out).abs().max().item() > 1e-4
    else:
        assert (z_zero - out).abs().max().item() <= 1e-4


def test_head_out_is_writable(tiny):
    _head_out_checks(tiny)


def test_head_out_is_writable_gemma(gemma):
    _head_out_checks(gemma)


# ------------------------------------------------------------------------------------------------
# Gradients against finite differences (float64)
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _f64(name):
    """A float64 tiny model. HF's RMSNorms compute in float32 whatever the dtype (Llama, Qwen2, Gemma),
    which limits finite differences to ~1e-4; each is given the same function in float64."""
    model = load_model(name, dtype="float64")
    for mod in model.layers.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = functools.partial(_rms64, mod, 1.0 if model.spec.rms_offset else 0.0)
    if type(model.final_norm_module).__name__.endswith("RMSNorm"):
        m = model.final_norm_module
        m.forward = functools.partial(_rms64, m, 1.0 if model.spec.rms_offset else 0.0)
    return model


def _rms64(mod, offset, x):
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (mod.weight + offset)


def _metric(model, logits, tok):
    return torch.log_softmax(logits, -1)[:, tok].sum()


@pytest.mark.parametrize("name", TINY)
def test_grads_match_finite_differences(name):
    model = _f64(name)
    batch = model.encode(PROMPTS)
    tok = 5
    points = hooks.available_points(model, editable=True)
    layers = [0, model.n_layers - 1]
    with hooks.grads(model, points, layers) as g:
        _metric(model, model.forward(batch), tok).backward()
    gen = torch.Generator().manual_seed(1)
    eps, rtol = 1e-5, 1e-6
    for p in points:
        for l in layers:
            grad = g[p, l]
            v = torch.randn(grad.shape, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                with hooks.patch(model, p, l, eps * v, mode="add"):
                    up = _metric(model, model.forward(batch), tok)
                with hooks.patch(model, p, l, -eps * v, mode="add"):
                    down = _metric(model, model.forward(batch), tok)
            fd = ((up - down) / (2 * eps)).item()
            an = (grad * v).sum().item()
            assert abs(fd - an) <= rtol * max(1.0, abs(fd)), (name, p, l, fd, an)
            assert abs(an) > 1e-6, (name, p, l)  # the point matters to the metric


def test_grads_need_gradients_and_editable_points():
    model = _f64("tiny-llama")
    batch = model.encode(PROMPTS[:1])
    with pytest.raises(FactscopeError, match="gradients enabled"):
        with hooks.grads(model, "resid_pre", [0]):
            model.run(batch)
    with pytest.raises(FactscopeError, match="read-only"):
        with hooks.grads(model, "attn_probs", [0]):
            pass


# ------------------------------------------------------------------------------------------------
# The substrate is the only way into a model
# ------------------------------------------------------------------------------------------------

SUBSTRATE = {"models.py", "hooks.py", "archs.py", "attention.py"}
HF_INTERNALS = re.compile(r"\.hf\b|\bhf\.config\b|DynamicCache|HybridCache|StaticCache|\bCache\b|logits_to_keep|"
                          r"sliding_window|past_key_values")


def test_no_hf_internals_outside_the_substrate():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).as_posix() in SUBSTRATE:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if HF_INTERNALS.search(code):
                found.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not found, "model internals outside models.py/hooks.py/archs.py:\n" + "\n".join(found)


def test_no_analysis_stops_a_forward_by_its_own_exception():
    """Ending a forward early is the substrate's (``hooks.stop_after``, ``attention.Halt``): an
    analysis that raises its own exception from a hook to stop a forward is reaching around it."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).as_posix() in SUBSTRATE:
            continue
        text = path.read_text()
        for m in re.finditer(r"^class (\w+)\((?:Base)?Exception\)", text, re.M):
            if (path.name, m.group(1)) == ("interactive.py", "Unsupported"):  # a cell it cannot convert
                continue
            if re.search(rf"raise {m.group(1)}\b", text) and re.search(rf"except {m.group(1)}\b", text):
                found.append(f"{path.relative_to(SRC)}: {m.group(1)} raised and caught in one module")
    assert not found, "\n".join(found)


def test_no_private_imports_across_modules():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r"\s*from\s+(\S+)\s+import\s+(.+)", line)
            if m and m.group(1) != "__future__" and any(n.strip().startswith("_") and not n.strip().startswith("__") for n in m.group(2).split(",")):
                found.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def _imports(path: Path) -> set[str]:
    """The factscope modules a file imports (at any indentation, TYPE_CHECKING blocks excluded)."""
    out, skip = set(), None
    for line in path.read_text().splitlines():
        indent = len(line) - len(line.lstrip())
        if skip is not None and line.strip() and indent <= skip:
            skip = None
        if line.strip().startswith("if TYPE_CHECKING"):
            skip = indent
            continue
        if skip is not None:
            continue
        m = re.match(r"\s*from\s+(factscope[\w.]*)\s+import\s+(.+)", line)
        if m:
            mod = m.group(1)
            if mod == "factscope":
                out |= {f"factscope.{n.strip().split(' ')[0]}" for n in m.group(2).strip("()").split(",") if n.strip()}
            else:
                out.add(mod)
        m = re.match(r"\s*import\s+(factscope[\w.]*)", line)
        if m:
            out.add(m.group(1))
    return out


@pytest.mark.parametrize("low,high", [("models", "hooks"), ("report", "runs")])
def test_no_import_cycle(low, high):
    """The lower module never imports the higher one at run time (not even inside a function):
    ``hooks`` drives a ``Model``, ``runs`` renders its report; type-only imports are allowed."""
    assert f"factscope.{high}" not in _imports(SRC / f"{low}.py")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_generate_is_greedy(name):
    """Model.generate equals a naive greedy loop over full forwards, on a left-padded batch."""
    from conftest import _load

    model = _load(name)
    prompts = ["The Eiffel Tower is located in the city of", "Paris is"]
    got = model.generate(model.encode(prompts), 4)
    assert got.shape == (2, 4)
    for i, p in enumerate(prompts):
        ids = model.tokenizer(p)["input_ids"]
        for k in range(4):
            nxt = int(model.run(model.batch_from_ids([ids]))[0].argmax())
            assert int(got[i, k]) == nxt, (name, i, k)
            ids = ids + [nxt]


def test_architecture_doc_lists_every_point():
    doc = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    missing = [p for p in archs.POINT_SITES if f"| `{p}` |" not in doc]
    assert not missing, f"docs/ARCHITECTURE.md's point table lacks {missing}"
