"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", sec. 2.1).

Compared with kmeng01/rome ``experiments/causal_trace.py`` (``trace_with_patch``,
``trace_important_states``, ``trace_important_window``, ``collect_embedding_std``):

- Corruption: Gaussian noise of standard deviation ``noise * std`` is added to the subject tokens'
  embeddings in ``samples`` copies of the prompt. ``std`` is :func:`embedding_std`: the standard
  deviation over all elements of the embedded subject tokens of the facts analysed together (ROME's
  ``collect_embedding_std`` over the known facts' subjects). ROME's paper uses ``noise = 3``. The
  noise is added at layer 0's ``resid_pre`` (the embedding as the model feeds it: Gemma's
  sqrt(d) scale included, GPT-2's position embedding added, which does not change an additive
  corruption). Each fact draws its own noise from a generator seeded by ``(seed, fact key)``
  (ROME reuses ``RandomState(1)`` for every fact); all restorations of one fact see the same noise.
- Restoration: ``hidden`` restores one layer's ``resid_post`` at one position (ROME: the output of
  ``transformer.h.{l}``); ``mlp``/``attn`` restore ``mlp_out``/``attn_out`` at one position in the
  window of layers ``[l - window // 2, l + ceil(window / 2))`` clipped to the model (ROME's
  ``trace_important_window``). The restored value is the clean run's at that point.
- Score: P(answer) averaged over the noise samples, the answer being the clean run's top-1 token
  (ROME's ``predict_from_input``); indirect effect = P(answer | corrupted + restored) -
  P(answer | corrupted).
- Speed (not in ROME): all positions of one layer (times the noise samples) run in one batch, and
  each batch starts at the lowest restored layer from the corrupted run's cached residual
  (``hooks.start_at``), since nothing below it differs from the corrupted run. Positions before the
  subject are not corrupted (the model is causal), so restoring them is the corrupted run itself:
  their score is P(answer | corrupted) without a forward pass. :func:`naive_trace` is the
  reference: one full patched forward per (layer, position).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from factscope import hooks
from factscope.errors import FactscopeError
from factscope.models import Model

KINDS = ("hidden", "mlp", "attn")
POINTS = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
# ROME's position classes (notebooks/average_causal_effects.ipynb); a token may be in two classes
# (a one-token subject is its first and last token).
CLASSES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
           "further tokens", "last token")


def layer_window(layer: int, n_layers: int, kind: str, window: int) -> list[int]:
    """The layers restored for the heat-map cell ``layer``: itself for ``hidden``, else ROME's window."""
    if kind not in KINDS:
        raise FactscopeError(f"unknown trace kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "hidden":
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def position_classes(s: int, e: int, n: int) -> dict[str, list[int]]:
    """Token indices of each of ROME's position classes for a prompt of ``n`` tokens whose subject
    is tokens ``s..e-1`` (``e < n``)."""
    return {
        CLASSES[0]: [s],
        CLASSES[1]: list(range(s + 1, e - 1)),
        CLASSES[2]: [e - 1],
        CLASSES[3]: [e],
        CLASSES[4]: list(range(e + 1, n - 1)),
        CLASSES[5]: [n - 1],
    }


def embedding_std(model: Model, subject_ids: Sequence[Sequence[int]]) -> float:
    """Standard deviation over all elements of the embedded subject tokens (ROME's
    ``collect_embedding_std``); ``subject_ids``: each fact's subject token ids."""
    ids = [i for ids in subject_ids for i in ids]
    if not ids:
        raise FactscopeError("no subject tokens to estimate the embedding standard deviation from")
    with torch.inference_mode():
        e = model.embed(torch.tensor(ids, dtype=torch.long))
    return float(e.float().std())


def fact_noise(key: str, seed: int, samples: int, n_subject: int, d_model: int) -> torch.Tensor:
    """Standard normal noise ``[samples, n_subject, d_model]`` (float32) for one fact, reproducible
    from ``(seed, key)`` alone (independent of the other facts and of their order)."""
    g = torch.Generator().manual_seed((int(seed) * 2_654_435_761 + zlib.crc32(key.encode("utf-8"))) % 2**63)
    return torch.randn(samples, n_subject, d_model, generator=g, dtype=torch.float32)


@dataclass
class TraceInput:
    """One fact prepared for tracing: its token ids, subject span ``[s, e)`` and scaled noise
    ``[samples, e - s, d]`` (already multiplied by the noise standard deviation)."""

    ids: list[int]
    span: tuple[int, int]
    noise: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def samples(self) -> int:
        return self.noise.shape[0]


@dataclass
class TraceResult:
    """Causal trace of one fact and one kind. ``probs[t][l]``: P(answer) with position t restored at
    layer l (its window for mlp/attn), averaged over the noise samples."""

    kind: str
    window: int
    answer_id: int
    p_clean: float
    p_corrupt: float
    probs: list[list[float]] = field(default_factory=list)

    @property
    def effects(self) -> list[list[float]]:
        return [[p - self.p_corrupt for p in row] for row in self.probs]


def _corrupt(model: Model, inp: TraceInput):
    """Add the fact's noise to the subject embeddings of every row (rows = copies x samples)."""
    s, e = inp.span

    def fn(x, l):
        x = x.clone()
        reps = x.shape[0] // inp.samples
        x[:, s:e] += inp.noise.repeat(reps, 1, 1).to(x.device, x.dtype)
        return x

    return hooks.edit(model, "resid_pre", 0, fn)


def _answer_prob(logits: torch.Tensor, answer: int, samples: int) -> torch.Tensor:
    """P(answer) per group of ``samples`` consecutive rows, averaged over the group."""
    p = logits.float().softmax(-1)[:, answer]
    return p.view(-1, samples).mean(1)


def clean_run(model: Model, inp: TraceInput, points: Sequence[str]) -> tuple[int, float, dict]:
    """The clean prompt: its top-1 token, that token's probability and the points' activations
    ``{(point, layer): [T, ...]}``."""
    batch = model.batch_from_ids([inp.ids])
    with torch.inference_mode(), hooks.cache(model, list(points)) as c:
        logits = model.forward(batch)
    p = logits.float().softmax(-1)[0]
    answer = int(p.argmax())
    return answer, float(p[answer]), {k: v[0] for k, v in c.items()}


def restored_prob(model: Model, inp: TraceInput, answer: int, point: str, restore: dict[int, Sequence[int]],
                  clean: dict) -> float:
    """P(answer) of the corrupted prompt with ``point`` at ``restore = {layer: [positions]}`` set to
    the clean values: one full forward of ``samples`` rows through ``hooks.patch`` (the reference;
    ``restore={}`` is the corrupted run)."""
    batch = model.batch_from_ids([inp.ids] * inp.samples)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(_corrupt(model, inp))
        for l, pos in restore.items():
            mask = torch.zeros(inp.samples, inp.n, dtype=torch.bool)
            mask[:, list(pos)] = True
            stack.enter_context(hooks.patch(model, point, l, clean[point, l].unsqueeze(0), positions=mask))
        logits = model.forward(batch)
    return float(_answer_prob(logits, answer, inp.samples)[0])


def naive_trace(model: Model, inp: TraceInput, kind: str, window: int = 10) -> TraceResult:
    """Reference trace: one patched full forward per (layer, position), as ROME computes it."""
    point = POINTS[kind]
    answer, p_clean, clean = clean_run(model, inp, [point])
    p_low = restored_prob(model, inp, answer, point, {}, clean)
    probs = [[restored_prob(model, inp, answer, point, {L: [t] for L in layer_window(l, model.n_layers, kind, window)},
                            clean) for l in range(model.n_layers)] for t in range(inp.n)]
    return TraceResult(kind, window, answer, p_clean, p_low, probs)


def trace(model: Model, inp: TraceInput, kinds: Sequence[str] = KINDS, window: int = 10,
          max_rows: int = 256) -> dict[str, TraceResult]:
    """Causal traces of one fact for each kind (the fast path; equals :func:`naive_trace`).

    Per kind and layer, the restorations of every position from the subject on run together
    (``samples`` rows each, at most ``max_rows`` rows per forward), starting at the lowest restored
    layer from the corrupted run's residual there.
    """
    for k in kinds:
        layer_window(0, model.n_layers, k, window)  # validates the kind
    points = sorted({POINTS[k] for k in kinds})
    answer, p_clean, clean = clean_run(model, inp, points)
    S, L, T = inp.samples, model.n_layers, inp.n
    s = inp.span[0]
    with torch.inference_mode(), _corrupt(model, inp), hooks.cache(model, "resid_pre") as c:
        logits = model.forward(model.batch_from_ids([inp.ids] * S))
    p_low = float(_answer_prob(logits, answer, S)[0])
    corrupt_resid = {l: c["resid_pre", l] for l in range(L)}  # [S, T, d]
    positions = list(range(s, T))
    per_chunk = max(1, max_rows // S)
    out = {}
    for kind in kinds:
        point = POINTS[kind]
        probs = [[p_low] * L for _ in range(T)]
        for l in range(L):
            layers = layer_window(l, L, kind, window)
            lo = layers[0]
            for c0 in range(0, len(positions), per_chunk):
                chunk = positions[c0 : c0 + per_chunk]
                cols = torch.tensor(chunk, dtype=torch.long).repeat_interleave(S)
                rows = torch.arange(len(cols))
                batch = model.batch_from_ids([inp.ids] * len(cols))
                resid = corrupt_resid[lo].repeat(len(chunk), 1, 1)

                def fn(x, layer, rows=rows, cols=cols):
                    x = x.clone()
                    x[rows, cols] = clean[point, layer][cols].to(x.dtype)
                    return x

                with torch.inference_mode(), hooks.start_at(model, lo, resid), hooks.edit(model, point, layers, fn):
                    p = _answer_prob(model.forward(batch), answer, S)
                for t, v in zip(chunk, p.tolist()):
                    probs[t][l] = v
        out[kind] = TraceResult(kind, window, answer, p_clean, p_low, probs)
    return out
