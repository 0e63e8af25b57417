"""Named activation points and interventions with plain PyTorch hooks.

Points, per layer ``l`` (shapes for a batch of ``B`` left-padded prompts of ``T`` tokens):

============== =================================================================================
``resid_pre``  residual stream entering layer l                                  ``[B, T, d]``
``attn_out``   what attention adds to the residual (after Gemma's post-norm)      ``[B, T, d]``
``mlp_out``    what the MLP adds to the residual (after Gemma's post-norm)        ``[B, T, d]``
``resid_post`` residual stream leaving layer l                                   ``[B, T, d]``
``z``          each head's value-weighted sum, the input of the output proj.   ``[B, T, H, hd]``
``mlp_hidden`` the MLP's hidden activation, the input of its down projection  ``[B, T, d_mlp]``
``head_out``   each head's share of ``attn_out`` (editable in attn_out's space)   ``[B, T, H, d]``
``attn_probs`` attention probabilities (read only)                             ``[B, H, T, T]``
``q_in``       each query head's own copy of the residual before the attention
               input norm (normed, then projected by the head's slice of W_Q)    ``[B, T, H, d]``
``k_in``       each key/value head's copy of the residual feeding its keys     ``[B, T, KV, d]``
``v_in``       each key/value head's copy of the residual feeding its values   ``[B, T, KV, d]``
``mlp_in``     the input of the pre-MLP norm (only the MLP sees an edit; the
               residual add keeps the unedited stream)                           ``[B, T, d]``
``logits_in``  the input of the final norm (one point: every layer index names it;
               circuits use the last)                                            ``[B, T, d]``
============== =================================================================================

The receiving-side points (``q_in``..``logits_in``, for circuits) are per-receiver inputs before
the receiver's own norm. While a ``q_in``/``k_in``/``v_in`` hook is active in a layer, that
projection is recomputed per head from its (possibly edited) copies: ``norm(x_h) @ W_h + b_h``;
Gemma's q/k norms and rotary embeddings then run as usual. Without such hooks nothing changes.

``head_out[h] = z[h] @ W_O[h]`` times Gemma's post-attention RMSNorm factor (computed from the
full attention output, so the shares are exact): the heads' shares plus the output bias sum to
``attn_out``. Attention runs through one registered Hugging Face attention function
(``"factscope"``), which folds attention-edge knockout masks into the model's own causal, padding
and sliding-window masks, gives chosen queries uniform attention over their visible keys
(``ablate(..., how="uniform")``) and records probabilities on request. Its output always comes from
PyTorch's scaled-dot-product attention, so an idle factscope model runs at normal speed and an
empty intervention reproduces the model's logits exactly.

Every context manager removes its hooks on exit, also on exceptions, and they compose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from factscope.archs import POINT_SITES, site_path
from factscope.attention import ATTN_NAME, Halt, install, register_attention  # noqa: F401 (re-exported)
from factscope.errors import FactscopeError
from factscope.models import at_home

if TYPE_CHECKING:  # pragma: no cover
    from factscope.models import Batch, Model

POINTS = tuple(POINT_SITES)  # where each lives, per family: factscope.archs.POINT_SITES
EDITABLE = tuple(p for p, s in POINT_SITES.items() if s.editable)
QKV_IN = tuple(p for p, s in POINT_SITES.items() if s.heads == "copy")
RECEIVING = (*QKV_IN, "mlp_in", "logits_in")  # each receiver's input before its own norm (circuits)


# --------------------------------------------------------------------------------------------
# Hook plumbing
# --------------------------------------------------------------------------------------------


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _check(model: "Model", point: str, layer: int, allowed: Sequence[str] = POINTS) -> None:
    if point not in allowed:
        raise FactscopeError(f"unknown or read-only hook point {point!r}; choose from {', '.join(allowed)}")
    if not 0 <= layer < model.n_layers:
        raise FactscopeError(f"layer {layer} out of range for {model.name} ({model.n_layers} layers)")


def _qkv_weights(model: "Model", l: int, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-head projection ``W [n, head_dim, d]`` and bias ``[n, head_dim]`` (or None) for q, k or v."""
    spec = model.spec
    n = model.n_heads if which == "q" else model.n_kv_heads
    hd, d = model.head_dim, model.d_model
    if spec.fused_qkv:  # GPT-2 Conv1D c_attn: weight [d, 3d] = [q | k | v]
        proj = model.module(l, spec.v_proj)
        i = "qkv".index(which)
        w = proj.weight[:, i * d : (i + 1) * d].T
        b = proj.bias[i * d : (i + 1) * d] if proj.bias is not None else None
    else:
        proj = model.module(l, {"q": spec.q_proj, "k": spec.k_proj, "v": spec.v_proj}[which])
        w, b = proj.weight, proj.bias
    return w.reshape(n, hd, d), (b.reshape(n, hd) if b is not None else None)


class _QKVState:
    """Per-layer machinery behind ``q_in``/``k_in``/``v_in``: the attention input norm's input is
    kept, and each projection with active hooks is recomputed per head from edited copies."""

    def __init__(self, model: "Model", l: int):
        self.model, self.l = model, l
        self.fns: dict[str, list] = {p: [] for p in QKV_IN}
        self.x: torch.Tensor | None = None
        self.busy = False
        spec = model.spec
        try:
            for path in (spec.attn_in_norm, spec.q_proj, spec.k_proj, spec.v_proj):
                model.module(l, path)
        except AttributeError:
            raise FactscopeError(
                f"q_in/k_in/v_in are not available for the {spec.family} family (its archs row lacks the "
                "attention input norm or q/k/v projection paths)") from None
        self.handles = [model.module(l, spec.attn_in_norm).register_forward_pre_hook(self._keep)]
        if spec.fused_qkv:
            self.handles.append(model.module(l, spec.v_proj).register_forward_hook(self._fused))
        else:
            for p, path in zip(QKV_IN, (spec.q_proj, spec.k_proj, spec.v_proj)):
                self.handles.append(model.module(l, path).register_forward_hook(lambda m, a, o, p=p: self._one(p, o)))

    def _keep(self, mod, args):
        if not self.busy:  # (the per-head recomputation calls the norm again)
            self.x = args[0]

    def _project(self, point: str) -> torch.Tensor:
        model, x = self.model, self.x
        n = model.n_heads if point == "q_in" else model.n_kv_heads
        inp = x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])
        for fn in list(self.fns[point]):
            new = at_home(model, fn, inp)
            if new is not None:
                inp = new
        w, b = _qkv_weights(model, self.l, point[0])
        self.busy = True
        try:
            normed = model.module(self.l, model.spec.attn_in_norm)(inp)
        finally:
            self.busy = False
        out = torch.einsum("btnd,ned->btne", normed, w.to(normed.dtype))
        if b is not None:
            out = out + b.to(out.dtype)
        return out.reshape(*out.shape[:-2], -1)

    def _one(self, point: str, out: torch.Tensor):
        return self._project(point) if self.fns[point] else None

    def _fused(self, mod, args, out):
        if not any(self.fns.values()):
            return None
        parts = list(out.split(self.model.d_model, dim=-1))
        for i, p in enumerate(QKV_IN):
            if self.fns[p]:
                parts[i] = self._project(p)
        return torch.cat(parts, dim=-1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _SharedHandle:
    """One hook's registration with a per-layer state that all hooks of its kind share (kept on the
    attention module as ``attr``, created with the first hook and removed with the last): ``q_in`` /
    ``k_in`` / ``v_in`` (:class:`_QKVState`) and ``head_out`` (:class:`_HeadOutState`)."""

    def __init__(self, model: "Model", l: int, attr: str, make, point: str, fn):
        attn = model.attn(l)
        state = getattr(attn, attr, None)
        if state is None:
            state = make(model, l)
            setattr(attn, attr, state)
        self.attn, self.attr, self.state, self.point, self.fn = attn, attr, state, point, fn
        state.fns[point].append(fn)

    def remove(self) -> None:
        fns = self.state.fns[self.point]
        for i, f in enumerate(fns):
            if f is self.fn:
                del fns[i]
                break
        if not any(self.state.fns.values()) and getattr(self.attn, self.attr, None) is self.state:
            self.state.remove()
            setattr(self.attn, self.attr, None)


def available_points(model: "Model", editable: bool = False) -> list[str]:
    """The hook points (or only the editable ones) this model has: all of them, less the
    receiving-side points where :func:`receiver_support` says its family lacks them."""
    pts = EDITABLE if editable else POINTS
    return [p for p in pts if p not in RECEIVING or receiver_support(model) is None]


def receiver_support(model: "Model") -> str | None:
    """None when the receiving-side points (``q_in``/``k_in``/``v_in``/``mlp_in``/``logits_in``) work
    on this model, else the reason they do not (from its architecture row)."""
    spec = model.spec
    if spec.mlp_in_norm is None:
        return (f"{spec.family}: the MLP reads the attention's input norm, so it has no input of its own "
                "(no mlp_in point)")
    for path in (spec.attn_in_norm, spec.q_proj, spec.k_proj, spec.v_proj, spec.mlp_in_norm):
        try:
            model.module(0, path)
        except AttributeError:
            return (f"{spec.family}: its architecture row has no separate q/k/v projections ({path!r} is "
                    "missing; a per-head fused query_key_value is not supported for q_in/k_in/v_in yet)")
    return None


def _site_module(model: "Model", point: str, layer: int) -> torch.nn.Module:
    """The module a point hooks, from the architecture table (:data:`factscope.archs.POINT_SITES`)."""
    spec, site = model.spec, POINT_SITES[point]
    if site.module == "final_norm":
        return model.final_norm_module
    path = site_path(spec, point)
    if path is None:
        reason = {
            "mlp_in": "its MLP reads the attention's input norm, so the MLP has no input of its own to edit",
            "mlp_hidden": "the architecture table has no MLP down-projection path",
        }.get(point, f"its architecture row has no {site.module!r} module")
        raise FactscopeError(f"{point} is not available for the {spec.family} family: {reason}")
    return model.layer(layer) if path == "" else model.module(layer, path)


def _register_edit(model: "Model", point: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register a hook calling ``fn(activation)``; a returned tensor replaces the activation.

    Generic over the table: a point is its site module's input (a forward pre-hook) or output (a
    forward hook), optionally split into heads; only ``q_in``/``k_in``/``v_in`` (per-head copies) and
    ``head_out`` (per-head shares of the output projection) have machinery of their own.
    """
    site = POINT_SITES[point]
    if site.heads == "copy":
        return _SharedHandle(model, layer, "_fs_qkv", _QKVState, point, fn)
    if site.heads == "W_O":
        return _SharedHandle(model, layer, "_fs_head_out", _HeadOutState, point, fn)
    mod = _site_module(model, point, layer)
    H, hd = model.n_heads, model.head_dim
    split = site.heads == "split"

    def call(x: torch.Tensor) -> torch.Tensor | None:
        if site.alias:  # a view only this module consumes (see Site.alias)
            x = x.view_as(x)
        new = at_home(model, fn, x.view(*x.shape[:-1], H, hd) if split else x)
        if new is None:
            return x if site.alias else None
        return new.reshape(x.shape) if split else new

    if site.io == "input":

        def pre(m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            new = call(x)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return mod.register_forward_pre_hook(pre, with_kwargs=True)

    def post(m, args, out):
        new = call(_first(out))
        return None if new is None else _replace_first(out, new)

    return mod.register_forward_hook(post)


class _HeadOutState:
    """Per-layer machinery behind a writable ``head_out``: each head's share ``z_h @ W_O[h]`` of
    ``attn_out`` (times the post-attention norm factor of the unedited output projection, Gemma 2/3)
    is computed once and passed through the layer's head_out hooks in the order they were entered
    (a later one sees an earlier one's edit). Edits act in ``attn_out``'s space: ``attn_out`` gains
    the sum over heads of (edited - original) shares, so an identity edit changes nothing bit for
    bit and the shares (plus the output bias) keep summing to ``attn_out``. Gemma's post-attention
    norm is not recomputed after an edit (its factor stays the clean one): there zeroing a head's
    share is not zeroing its ``z`` (which the norm would rescale)."""

    def __init__(self, model: "Model", l: int):
        self.model, self.l = model, l
        self.fns: dict[str, list] = {"head_out": []}
        self.delta: torch.Tensor | None = None
        self.handles = [model.module(l, model.spec.o_proj).register_forward_hook(self._shares),
                        model.module(l, model.spec.attn_out).register_forward_hook(self._apply)]

    def _shares(self, mod, args, out):
        model, l = self.model, self.l
        z = args[0].view(*args[0].shape[:-1], model.n_heads, model.head_dim)
        heads = torch.einsum("bthe,hed->bthd", z, model.W_O(l, z.device).to(z.dtype))
        scale = model.post_attn_scale(l, out)  # Gemma: RMSNorm factor of the whole o_proj output
        if not isinstance(scale, float):
            scale = scale.unsqueeze(-2)
        orig = cur = heads * scale
        for fn in list(self.fns["head_out"]):
            new = at_home(model, fn, cur)
            if new is not None:
                cur = new
        self.delta = None if cur is orig else (cur - orig).sum(-2)

    def _apply(self, mod, args, out):
        delta, self.delta = self.delta, None
        if delta is None:
            return None
        return _replace_first(out, _first(out) + delta.to(_first(out).dtype))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _handles() -> Iterator[list]:
    hs: list = []
    try:
        yield hs
    finally:
        for h in hs:
            h.remove()


# --------------------------------------------------------------------------------------------
# Caching
# --------------------------------------------------------------------------------------------


class ActivationCache(dict):
    """``cache[point, layer] -> tensor``; ``cache.stack(point) -> [n_layers_cached, ...]``."""

    def stack(self, point: str) -> torch.Tensor:
        keys = sorted(k for k in self if k[0] == point)
        if not keys:
            raise KeyError(point)
        return torch.stack([self[k] for k in keys])


@contextlib.contextmanager
def cache(
    model: "Model", points: str | Iterable[str], layers: Iterable[int] | None = None, detach: bool = True
) -> Iterator[ActivationCache]:
    """Record the named points (only those) during the forward passes inside the block.

    With ``detach=False`` the cached tensors stay in the autograd graph (for attribution).
    A point recorded twice (two forward passes) keeps the last.
    """
    points = [points] if isinstance(points, str) else list(points)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    store = ActivationCache()
    keep = (lambda t: t.detach()) if detach else (lambda t: t)
    with _handles() as hs, contextlib.ExitStack() as stack:
        for p in points:
            for l in layers:
                _check(model, p, l)
                if p in EDITABLE:

                    def save(x, key=(p, l)):
                        store[key] = keep(x)
                        # in the graph: the forward goes on from the recorded tensor (a model split
                        # over devices records a copy; gradients must reach it)
                        return None if detach else store[key]

                    hs.append(_register_edit(model, p, l, save))
                else:  # attn_probs
                    stack.enter_context(_record_probs(model, l, store, keep))
        yield store


@contextlib.contextmanager
def grads(model: "Model", points: str | Iterable[str], layers: Iterable[int] | None = None) -> Iterator[ActivationCache]:
    """Gradients with respect to hook points: ``g[point, layer]`` after a backward pass in the block.

    ::

        with hooks.grads(model, ["resid_pre", "head_out"], [3]) as g:
            metric(model.forward(batch)).backward()
        g["head_out", 3]  # d metric / d head_out[3], the activation's shape

    Each point gets a zero tensor added during the forward (``x + 0`` is ``x`` exactly, so the
    forward is unchanged) whose gradient is the gradient with respect to the point; gradients flow
    on through the other points (several layers at once work). The model's weights need not require
    gradients. The forward must run with gradients enabled (``model.forward``, not ``model.run``,
    outside ``torch.no_grad``/``inference_mode``). Any editable point works (``attn_probs`` does
    not); the gradient of a ``mlp_in``/``logits_in``/``q_in``/``k_in``/``v_in`` is the receiver's
    own (see :data:`factscope.archs.POINT_SITES`). For a point's activation in the graph use
    :func:`cache` with ``detach=False``.
    """
    points = [points] if isinstance(points, str) else list(points)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    store = ActivationCache()
    with _handles() as hs:
        for p in points:
            for l in layers:
                _check(model, p, l, EDITABLE)

                def tap(x, key=(p, l)):
                    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                        raise FactscopeError(
                            "hooks.grads needs a forward with gradients enabled (model.forward outside "
                            "torch.no_grad / torch.inference_mode; model.run disables them)")
                    zero = torch.zeros_like(x, requires_grad=True)
                    zero.register_hook(lambda g: store.__setitem__(key, g.detach()))
                    return x + zero

                hs.append(_register_edit(model, p, l, tap))
        yield store


@contextlib.contextmanager
def _record_probs(model: "Model", l: int, store: dict, keep):
    attn = model.attn(l)
    prev = attn._fs_record
    rec: list = []
    attn._fs_record = rec
    try:
        yield
    finally:
        attn._fs_record = prev
        if rec:
            store[("attn_probs", l)] = keep(rec[-1]).to(model.device)


# --------------------------------------------------------------------------------------------
# Editing: patch, ablate
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def edit(model: "Model", point: str, layers: int | Iterable[int], fn: Callable[[torch.Tensor, int], torch.Tensor | None]):
    """Apply ``fn(activation, layer) -> new activation`` at a point in each of the layers."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    with _handles() as hs:
        for l in layers:
            _check(model, point, l, EDITABLE)
            hs.append(_register_edit(model, point, l, lambda x, l=l: fn(x, l)))
        yield


def _position_mask(positions, x: torch.Tensor) -> torch.Tensor:
    """Bool [B, T] from None (all), a bool tensor, or per-prompt lists of padded column indices."""
    B, T = x.shape[:2]
    if positions is None:
        return torch.ones(B, T, dtype=torch.bool, device=x.device)
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        return positions.to(x.device)
    m = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    for i, cols in enumerate(positions):
        m[i, list(cols)] = True
    return m


def _mix(x: torch.Tensor, values: torch.Tensor, positions, mode: str) -> torch.Tensor:
    m = _position_mask(positions, x).view(*x.shape[:2], *([1] * (x.dim() - 2)))
    values = values.to(x.dtype).expand_as(x) if values.dim() < x.dim() else values.to(x.dtype)
    new = values if mode == "replace" else x + values
    return torch.where(m, new, x)


@contextlib.contextmanager
def patch(model: "Model", point: str, layer: int, values: torch.Tensor, positions=None, mode: str = "replace"):
    """Replace (or add to) a point's activation at chosen positions.

    ``values`` has the activation's shape (e.g. from another run's :func:`cache`) or broadcasts to it
    (a single vector). ``positions``: None for all, a bool ``[B, T]`` mask, or per-prompt lists of
    padded columns (see :func:`columns`).
    """
    if mode not in ("replace", "add"):
        raise FactscopeError(f"patch mode must be 'replace' or 'add', not {mode!r}")
    with edit(model, point, layer, lambda x, l: _mix(x, values, positions, mode)):
        yield


def mean_activations(model: "Model", point: str, layers: Iterable[int], reference: "Batch") -> dict[int, torch.Tensor]:
    """Mean of a point over every real (non-pad) token of the reference prompts, per layer."""
    layers = list(layers)
    with torch.inference_mode(), cache(model, point, layers) as c:
        model.forward(reference, last_only=True)
    w = reference.attention_mask.to(model.dtype)
    out = {}
    for l in layers:
        x = c[point, l]
        ww = w.view(*w.shape, *([1] * (x.dim() - 2)))
        out[l] = (x * ww).sum((0, 1)) / ww.sum((0, 1))
    return out


ABLATIONS = {"mlp": ("zero", "mean", "hidden"), "attn": ("zero", "mean", "uniform"), "head": ("zero", "mean", "uniform")}


@contextlib.contextmanager
def ablate(
    model: "Model",
    kind: str,
    layers: int | Iterable[int],
    heads: Iterable[int] | None = None,
    how: str = "zero",
    reference: "Batch | None" = None,
    positions=None,
):
    """Ablate MLP layers (``kind="mlp"``), attention layers (``"attn"``) or single heads (``"head"``).

    ``how``:

    - ``"zero"``: the component adds nothing (``mlp_out`` / ``attn_out`` zeroed; heads at ``z``,
      their value-weighted sum, so an output bias stays, as in TransformerLens);
    - ``"mean"``: the contribution is replaced by its mean over every token of the ``reference`` prompts;
    - ``"uniform"`` (attention, heads): every chosen query attends uniformly to the keys it may
      see (causal, non-pad, in the sliding window), i.e. every attention score is equal. This is
      what Geva et al. (2023)'s released code does when it blocks all attention edges in a layer
      (every score gets ``finfo.min``, which under transformers 4.30 leaves uniform attention over
      the prefix): the layer still adds the mean of the visible values, not nothing;
    - ``"hidden"`` (MLP): zero the MLP's hidden activation, the input of its down projection
      (GPT-2: GELU(c_fc x); gated MLPs: act(gate x) * up x), as the paper's code zeroes the first
      MLP matrix's output: the MLP then adds only its output bias (and, in Gemma, its post-norm
      of zero, i.e. zero).

    ``positions`` (None for all, a bool ``[B, T]`` mask, or per-prompt lists of padded columns)
    restricts the ablation to those positions (for ``"uniform"``: those queries).
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    if kind not in ABLATIONS:
        raise FactscopeError(f"ablate kind must be 'mlp', 'attn' or 'head', not {kind!r}")
    if how not in ABLATIONS[kind]:
        raise FactscopeError(f"{kind} ablation must be one of {', '.join(ABLATIONS[kind])}, not {how!r}")
    for l in layers:
        _check(model, "resid_pre", l)
    if kind == "head":
        if heads is None:
            raise FactscopeError("ablating heads needs heads=[...]")
        heads = list(heads)
        bad = [h for h in heads if not 0 <= h < model.n_heads]
        if bad:
            raise FactscopeError(f"head {bad[0]} out of range for {model.name} ({model.n_heads} heads)")
    if how == "uniform":
        with _uniform(model, layers, heads, positions):
            yield
        return
    if how == "hidden":
        with edit(model, "mlp_hidden", layers, lambda x, l: _mix(x, torch.zeros((), dtype=x.dtype, device=x.device), positions, "replace")):
            yield
        return
    point = {"mlp": "mlp_out", "attn": "attn_out", "head": "z"}[kind]
    if how == "mean":
        if reference is None:
            raise FactscopeError("mean ablation needs reference prompts (reference=model.encode([...]))")
        means = mean_activations(model, point, layers, reference)

    def fn(x, l):
        target = means[l] if how == "mean" else torch.zeros((), dtype=x.dtype, device=x.device)
        if kind != "head":
            return _mix(x, target.expand_as(x[0, 0]) if target.dim() else target.expand_as(x), positions, "replace")
        new = x.clone()
        sel = torch.zeros(model.n_heads, dtype=torch.bool, device=x.device)
        sel[heads] = True
        repl = target.expand_as(x) if target.dim() else torch.zeros_like(x)
        pm = _position_mask(positions, x).view(*x.shape[:2], 1, 1) & sel.view(1, 1, -1, 1)
        return torch.where(pm, repl, new)

    with edit(model, point, layers, fn):
        yield


@contextlib.contextmanager
def _uniform(model: "Model", layers: list[int], heads: list[int] | None, positions):
    """Uniform attention for the chosen queries (and heads) in the given layers (see :func:`ablate`)."""

    def select(query: torch.Tensor) -> torch.Tensor:  # query [B, H, T, hd] -> bool, broadcastable
        B, H, T = query.shape[:3]
        pm = _position_mask(positions, query[:, 0, :, 0])  # [B, T] of the full prompt
        pm = pm[:, -T:]  # a cached-key forward runs only the last T queries
        sel = pm.view(B, 1, T, 1)
        if heads is not None:
            hs = torch.zeros(H, dtype=torch.bool, device=query.device)
            hs[heads] = True
            sel = sel & hs.view(1, H, 1, 1)
        return sel

    added = []
    try:
        for l in layers:
            attn = model.attn(l)
            attn._fs_uniform.append(select)
            added.append(attn)
        yield
    finally:
        for attn in added:
            for i, f in enumerate(attn._fs_uniform):
                if f is select:
                    del attn._fs_uniform[i]
                    break


# --------------------------------------------------------------------------------------------
# Attention-edge knockout
# --------------------------------------------------------------------------------------------


def columns(batch: "Batch", positions: Sequence[Iterable[int]]) -> list[list[int]]:
    """Map per-prompt token indices (0 = the prompt's first token, negatives from the end) to
    padded batch columns."""
    out = []
    for i, pos in enumerate(positions):
        n, off = batch.lengths[i], batch.offset[i]
        cols = []
        for p in pos:
            p = int(p)
            if not -n <= p < n:
                raise FactscopeError(f"position {p} outside prompt {i} of {n} tokens")
            cols.append(off + (p % n))
        out.append(cols)
    return out


def edge_mask(batch: "Batch", from_pos: Sequence[Iterable[int]], to_pos: Sequence[Iterable[int]]) -> torch.Tensor:
    """Bool ``[B, T, T]``: True where query position ``from_pos[i]`` may not attend to key ``to_pos[i]``.

    Positions are per-prompt token indices (as in :func:`columns`).
    """
    B, T = batch.input_ids.shape
    m = torch.zeros(B, T, T, dtype=torch.bool, device=batch.input_ids.device)
    q_cols, k_cols = columns(batch, from_pos), columns(batch, to_pos)
    for i in range(B):
        if q_cols[i] and k_cols[i]:
            m[i][torch.tensor(q_cols[i]).unsqueeze(1), torch.tensor(k_cols[i]).unsqueeze(0)] = True
    return m


@contextlib.contextmanager
def knockout(
    model: "Model",
    layers: int | Iterable[int] | dict[int, torch.Tensor],
    block: torch.Tensor | None = None,
    heads: Iterable[int] | None = None,
):
    """Block attention edges: queries may not read the blocked keys at the given layers.

    ``block`` is a bool mask ``[B, T, T]`` or ``[T, T]`` (see :func:`edge_mask`), or pass
    ``layers`` as ``{layer: mask}`` for per-layer masks (``[B, T, T]`` or ``[B, H, T, T]``). The
    model's causal, padding and sliding-window masks stay as they are; ``heads`` restricts the
    knockout to some heads (query heads; grouped-query attention is handled).
    """
    if isinstance(layers, dict):
        per_layer = dict(layers)
    else:
        if block is None:
            raise FactscopeError("knockout needs a block mask")
        per_layer = {l: block for l in ([layers] if isinstance(layers, int) else layers)}
    sel = None
    if heads is not None:
        sel = torch.zeros(model.n_heads, dtype=torch.bool)
        sel[list(heads)] = True
    added = []
    try:
        for l, m in per_layer.items():
            if not 0 <= l < model.n_layers:
                raise FactscopeError(f"layer {l} out of range for {model.name} ({model.n_layers} layers)")
            m = m.to(model.layer_device(l))
            if m.dim() == 2:
                m = m.unsqueeze(0)
            if m.dim() == 3:
                m = m.unsqueeze(1)  # [B, 1, T, T]
            if sel is not None:
                m = m & sel.to(m.device).view(1, -1, 1, 1)
            attn = model.attn(l)
            attn._fs_blocks.append(m)
            added.append((attn, m))
        yield
    finally:
        for attn, m in added:
            for i, x in enumerate(attn._fs_blocks):
                if x is m:
                    del attn._fs_blocks[i]
                    break


# --------------------------------------------------------------------------------------------
# Stopping early, resuming from a cached residual stream
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stop_after(model: "Model", layer: int):
    """End a forward pass run in the block once decoder layer ``layer`` has written its output:
    no layer above it (nor the unembedding) runs. The forward call does not return (what follows
    it in the block is skipped); read the activations it computed from a :func:`cache` entered
    before this context (its hooks fire first)."""
    _check(model, "resid_post", layer)

    def halt(x, l):
        raise Halt

    try:
        with edit(model, "resid_post", layer, halt):
            yield
    except Halt:
        pass


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer below the start layer: returns its input unchanged."""

    def __init__(self, orig: torch.nn.Module):
        super().__init__()
        self.attention_type = getattr(orig, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def start_at(model: "Model", layer: int, resid_pre: torch.Tensor):
    """Run only layers ``layer..`` on a cached ``resid_pre[layer]`` (same batch layout as the input).

    The embedding, masks and positions are still computed from the batch given to the forward, so
    the result equals a full forward whose residual at ``layer`` is ``resid_pre``.
    """
    _check(model, "resid_pre", layer)
    layers = model.layers
    originals = [layers[i] for i in range(layer)]
    try:
        for i in range(layer):
            layers[i] = _Skip(originals[i])
        with edit(model, "resid_pre", layer, lambda x, l: resid_pre.to(x.dtype)):
            yield
    finally:
        for i, orig in enumerate(originals):
            layers[i] = orig
