"""ROME (Meng et al. 2022): a rank-one update of one MLP's down projection.

Follows kmeng01/rome (``rome/rome_main.py``, ``compute_u.py``, ``compute_v.py``, ``layer_stats.py``,
``hparams/ROME/*.json``), through the substrate only:

- key ``k*``: the down projection's input (hook point ``mlp_hidden``) at the subject's last token,
  averaged over the prompt preceded by ROME's context templates (``"{}"`` plus 10 texts of 5 and 10 of
  10 tokens the model itself samples from its BOS token, top-k 5, seeded);
- value ``v*``: the down projection's output at that token plus a vector ``delta`` optimized with
  Adam (ROME's hparams: 20 steps, lr 0.5) on the NLL of ``target_new`` after every prefixed prompt,
  ``kl_factor`` x KL(edited || original) of the next-token distribution after "{subject} is a" (at the
  subject's last token, as ROME), and ``v_weight_decay`` x |delta| / |v_0|^2; |delta| is clamped to
  ``clamp_norm_factor`` x |v_0| (``v_0``: the output on the unprefixed prompt);
- ``C = E[k k^T]`` over the tokens of a text sample (ROME: 100,000 Wikipedia samples; offline we use
  the model's own seeded generations, or ``texts`` from the user), cached per model, layer and sample
  in ``~/.cache/factscope/edit``; a small ridge ``mom2_ridge * mean(diag C)`` keeps it invertible;
- update ``W += (v* - W k* - b) (C^-1 k*)^T / (k*^T C^-1 k*)`` (the paper's Eq. 2), so that the
  down projection maps ``k*`` to ``v*`` exactly and keys with ``k^T C^-1 k* = 0`` are unchanged.
  (The released code divides by ``k_0 . u`` and subtracts ``W k_0`` with ``k_0`` the unprefixed
  prompt's key, mapping ``k_0`` rather than the mean ``k*`` to ``v*``; see docs/editing.md.)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch

from factscope import hooks
from factscope.errors import FactscopeError
from factscope.facts import subject_span, target_ids

# Default edited layer per registered model (see docs/editing.md: a sweep on Gemma 3 270M); other
# models: about 30% of the depth (ROME: GPT-2 XL 17 of 48, GPT-J 5 of 28).
DEFAULT_LAYERS = {"gemma-3-270m": 4}


def default_layer(model) -> int:
    return DEFAULT_LAYERS.get(model.name, max(0, min(model.n_layers - 1, round(0.3 * model.n_layers))))


def resolve_layer(model, layer: int | None, steps: int, what: str) -> int:
    """``layer`` (default: :func:`default_layer`) after checking it and the step count."""
    layer = default_layer(model) if layer is None else layer
    if not 0 <= layer < model.n_layers:
        raise FactscopeError(f"--layer {layer} is out of range: {model.name} has layers 0..{model.n_layers - 1}")
    if steps < 1:
        raise FactscopeError(f"{what} must be >= 1, got {steps}")
    return layer


@dataclass
class RomeHParams:
    layer: int | None = None
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    context_template_length_params: tuple = ((5, 10), (10, 10))
    mom2_texts: int = 256  # generated texts for C (when no texts are given)
    mom2_text_length: int = 64  # tokens per generated text
    mom2_ridge: float = 1e-3
    seed: int = 0

    def check(self, model) -> "RomeHParams":
        self.layer = resolve_layer(model, self.layer, self.v_num_grad_steps, "v_num_grad_steps")
        return self


# --------------------------------------------------------------------------------------------
# Sampling from the model (context templates, covariance text)
# --------------------------------------------------------------------------------------------


def _start_id(tokenizer) -> int:
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    raise FactscopeError("the tokenizer has neither a BOS nor an EOS token to start sampling from")


def sample(model, n: int, length: int, seed: int = 0, top_k: int | None = None, batch_size: int = 64) -> list[list[int]]:
    """``n`` token sequences of ``length`` tokens sampled from the model after its BOS token (seeded;
    ``top_k`` restricts each draw to the k most likely tokens, as ROME's ``generate_fast``)."""
    g = torch.Generator().manual_seed(seed)
    start = _start_id(model.tokenizer)
    tok = model.tokenizer  # never sample special or added tokens (Gemma's <start_of_image>, <unused..>)
    banned = sorted({int(i) for i in tok.all_special_ids} | {int(i) for i in tok.get_added_vocab().values()})
    banned = torch.tensor([i for i in banned if i < model.vocab_size], dtype=torch.long)
    out: list[list[int]] = []
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        seqs = [[] for _ in range(b)]
        with torch.no_grad():
            prefix = model.prefill(model.batch_from_ids([[start]] * b), logits=True)
            for t in range(length):
                logits = prefix.logits.double().cpu()
                logits[:, banned] = -torch.inf
                if top_k is not None:
                    v, i = logits.topk(top_k, dim=-1)
                    pick = i.gather(-1, torch.multinomial(torch.softmax(v, -1), 1, generator=g))[:, 0]
                else:
                    pick = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
                for r in range(b):
                    seqs[r].append(int(pick[r]))
                if t < length - 1:
                    prefix = model.extend(prefix, model.batch_from_ids([[int(x)] for x in pick]))
        out.extend(seqs)
    return out


_TEMPLATES: dict = {}


def context_templates(model, length_params=((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """ROME's context templates: ``"{}"`` and ``"<sampled text>. {}"`` (cached per model)."""
    key = (id(model), tuple(map(tuple, length_params)), seed)
    if key not in _TEMPLATES:
        out = ["{}"]
        for i, (length, n) in enumerate(length_params):
            for ids in sample(model, n, length, seed=seed + i, top_k=5):
                text = model.tokenizer.decode(ids, skip_special_tokens=True)
                text = re.sub(r"[{}]", " ", text).strip()
                out.append(text + ". {}")
        _TEMPLATES[key] = out
    return _TEMPLATES[key]


# --------------------------------------------------------------------------------------------
# Key statistics C = E[k k^T]
# --------------------------------------------------------------------------------------------


def _text_sequences(model, texts: list[str], max_len: int = 128) -> list[list[int]]:
    seqs = []
    for t in texts:
        ids = list(model.tokenizer(t)["input_ids"])
        for s in range(0, len(ids), max_len):
            if len(ids[s : s + max_len]) > 1:
                seqs.append(ids[s : s + max_len])
    if not seqs:
        raise FactscopeError("the covariance text holds no tokens")
    return seqs


def second_moment(model, layer: int, seqs: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """``E[k k^T]`` (float64) of ``mlp_hidden`` at ``layer`` over every token of ``seqs`` except a
    leading special token (Gemma's BOS position carries outlier activations that no fact reads)."""
    special = set(model.tokenizer.all_special_ids)
    S, N = None, 0
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        batch = model.batch_from_ids(chunk)
        with torch.no_grad(), hooks.cache(model, "mlp_hidden", [layer]) as c:
            model.forward(batch)
        h = c["mlp_hidden", layer].double().cpu()
        rows = []
        for i, ids in enumerate(chunk):
            first = 1 if ids[0] in special else 0
            rows.append(h[i, batch.offset[i] + first :])
        k = torch.cat(rows)
        S = k.T @ k if S is None else S + k.T @ k
        N += k.shape[0]
    return S / N


def covariance(model, layer: int, hp: RomeHParams, texts: list[str] | None = None, cache: bool = True,
               progress: bool = False) -> torch.Tensor:
    """C for ``layer`` from ``texts`` or from ``hp.mom2_texts`` seeded generations (cached on disk)."""
    from factscope.models import cache_dir

    if texts is None:
        source = f"gen-s{hp.seed}-{hp.mom2_texts}x{hp.mom2_text_length}"
    else:
        source = "text-" + hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.name)
    path = cache_dir() / "edit" / safe / f"{source}-layer{layer}.pt"
    if cache and path.exists():
        return torch.load(path)
    if texts is None:  # the generated tokens are cached too: another layer needs only a forward pass
        start = _start_id(model.tokenizer)
        tok_path = path.parent / f"{source}-tokens.pt"
        if cache and tok_path.exists():
            seqs = torch.load(tok_path)
        else:
            seqs = [[start] + s for s in sample(model, hp.mom2_texts, hp.mom2_text_length, seed=hp.seed + 1000)]
            if cache:
                _save(seqs, tok_path)
    else:
        seqs = _text_sequences(model, texts)
    C = second_moment(model, layer, seqs)
    if cache:
        _save(C, path)
    return C


def _save(obj, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# k*, v*, the update
# --------------------------------------------------------------------------------------------


def _prompts(case, templates: list[str]) -> tuple[list[str], list[int]]:
    """The rewrite prompt after each context template and the character where its subject starts."""
    texts, starts = [], []
    for ctx in templates:
        tmpl = ctx.replace("{}", case.prompt, 1)
        starts.append(tmpl.index("{}"))
        texts.append(tmpl.replace("{}", case.subject, 1))
    return texts, starts


def _subject_last(tokenizer, text: str, subject: str, start: int) -> int:
    return subject_span(tokenizer, text, subject, occurrence=start)[1] - 1


def compute_key(model, layer: int, texts: list[str], lookup: list[int]) -> torch.Tensor:
    """Mean of ``mlp_hidden`` at ``layer`` over the texts, each at its token ``lookup[i]``."""
    batch = model.encode(texts)
    with torch.no_grad(), hooks.cache(model, "mlp_hidden", [layer]) as c:
        model.forward(batch)
    h = c["mlp_hidden", layer]
    return torch.stack([h[i, batch.offset[i] + j] for i, j in enumerate(lookup)]).mean(0)


@dataclass
class ValueResult:
    v: torch.Tensor  # v* = v_0 + delta
    v0: torch.Tensor  # down-projection output at the subject's last token of the unprefixed prompt
    nll: list[float] = field(default_factory=list)  # NLL of target_new (mean over prompts) per step
    steps: int = 0


def compute_value(model, layer: int, case, templates: list[str], hp: RomeHParams) -> ValueResult:
    """ROME's ``compute_v``: optimize ``delta`` added to the down projection's output at the subject."""
    tok = model.tokenizer
    texts, starts = _prompts(case, templates)
    tgt = target_ids(tok, texts[0], case.target_new)
    kl_text = f"{case.subject} is a"
    seqs, lookup, tpos = [], [], []
    for text, st in zip(texts, starts):
        p = list(tok(text)["input_ids"])
        seqs.append(p + tgt[:-1])
        lookup.append(_subject_last(tok, text, case.subject, st))
        tpos.append([len(p) - 1 + j for j in range(len(tgt))])
    kl_ids = list(tok(kl_text)["input_ids"])
    seqs.append(kl_ids)
    lookup.append(_subject_last(tok, kl_text, case.subject, 0))
    tpos.append([lookup[-1]] * len(tgt))
    batch = model.batch_from_ids(seqs)
    off = batch.offset
    R = len(texts)
    rows = torch.arange(len(seqs), device=model.device)
    cols = torch.tensor([off[i] + j for i, j in enumerate(lookup)], device=model.device)
    pos = torch.tensor([[off[i] + j for j in tp] for i, tp in enumerate(tpos)], device=model.device)
    tgt_t = torch.tensor(tgt, device=model.device)

    with torch.no_grad(), hooks.cache(model, "resid_pre", [layer]) as c:
        model.forward(batch)
    resid = c["resid_pre", layer]

    delta = torch.zeros(model.d_model, dtype=model.dtype, device=model.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    state: dict = {}

    def add_delta(out):
        if "v0" not in state:
            state["v0"] = out[0, cols[0]].detach().clone()
        add = torch.zeros_like(out)
        add[rows, cols] = delta.to(out.dtype)
        return out + add

    res = ValueResult(v=None, v0=None)
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        with torch.enable_grad(), hooks.start_at(model, layer, resid), model.mlp_down_output(layer, add_delta):
            lp = torch.log_softmax(model.forward(batch, positions=pos).float(), -1)  # [B, n_t, V]
            nll_each = -lp[:R].gather(-1, tgt_t.expand(R, -1)[..., None])[..., 0].mean(-1)
            nll = nll_each.mean()
            kl_lp = lp[R, 0]
            if "kl0" not in state:
                state["kl0"] = kl_lp.detach().clone()
            kl = hp.kl_factor * torch.nn.functional.kl_div(state["kl0"][None], kl_lp[None], log_target=True,
                                                            reduction="batchmean")
            v0 = state["v0"]
            wd = hp.v_weight_decay * (delta.norm() / v0.norm() ** 2)
            loss = nll + kl + wd
        res.nll.append(float(nll.detach()))
        res.steps = it
        if loss.item() < 5e-2 or it == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        max_norm = hp.clamp_norm_factor * v0.norm()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    res.v0 = state["v0"]
    res.v = (state["v0"] + delta).detach()
    return res


def rank_one_update(model, layer: int, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Apply ``W += (v - W k - b) (C^-1 k)^T / (k^T C^-1 k)`` to layer's down projection in place
    (computed in float64); returns the update ``[d_model, d_mlp]``."""
    W = model.mlp_down(layer)
    b = model.mlp_down_bias(layer)
    kd = k.detach().double().cpu()
    Cinv_k = torch.linalg.solve(C.double().cpu(), kd)
    out = W.detach().double().cpu() @ kd
    if b is not None:
        out = out + b.detach().double().cpu()
    upd = torch.outer(v.detach().double().cpu() - out, Cinv_k) / (kd @ Cinv_k)
    with torch.no_grad():
        W.add_(upd.to(W.dtype).to(W.device))
    return upd


@dataclass
class RomeResult:
    layer: int
    k: torch.Tensor
    v: torch.Tensor
    update_norm: float
    nll: list[float]


class Editor:
    """What the editors share: ``model``, ``hp`` (with the resolved ``layer``), the edited ``parameter``."""

    method = ""
    model = None
    hp = None

    @property
    def layer(self) -> int:
        return self.hp.layer

    @property
    def parameter(self) -> torch.Tensor:
        return self.model.mlp_down_parameter(self.layer)


class Rome(Editor):
    """A ROME editor for one model: context templates and C are computed once (C cached on disk)."""

    method = "rome"

    def __init__(self, model, hp: RomeHParams | None = None, cov_texts: list[str] | None = None, cache: bool = True):
        self.model = model
        self.hp = (hp or RomeHParams()).check(model)
        self.cov_texts = cov_texts
        self.cache = cache
        self._C = None

    def templates(self) -> list[str]:
        return context_templates(self.model, self.hp.context_template_length_params, self.hp.seed)

    @property
    def C(self) -> torch.Tensor:
        if self._C is None:
            C = covariance(self.model, self.layer, self.hp, self.cov_texts, cache=self.cache)
            self._C = C + self.hp.mom2_ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
        return self._C

    def edit(self, case) -> RomeResult:
        """Edit the model in place (wrap in ``model.restoring(editor.parameter)`` to undo)."""
        texts, starts = _prompts(case, self.templates())
        lookup = [_subject_last(self.model.tokenizer, t, case.subject, s) for t, s in zip(texts, starts)]
        k = compute_key(self.model, self.layer, texts, lookup)
        val = compute_value(self.model, self.layer, case, self.templates(), self.hp)
        upd = rank_one_update(self.model, self.layer, k, val.v, self.C)
        return RomeResult(self.layer, k, val.v, float(upd.norm()), val.nll)
