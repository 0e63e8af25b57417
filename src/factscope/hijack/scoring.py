"""Batched scoring of hijacked prompts, and the metrics (efficacy score with bootstrap CI).

``score_prompts`` returns, per prompt, the log-probability of target_true and target_false at the
answer position and the top-1 token id. The metric says which log-probability:

- ``"first"``: of the target's first token (the paper's comparison of answer tokens);
- ``"full"``: the mean over all the target's tokens of their log-probabilities by teacher forcing
  (every prompt+target prefix is one more last-position prediction) -- the comparison of ROME's
  CounterFact evaluation (kmeng01/rome, ``experiments/py/eval_utils_counterfact.py``,
  ``test_batch_prediction``: mean per-token negative log-likelihood), which does not penalize a
  target for having more tokens;
- ``"full-sum"``: the sum of the same log-probabilities, the log-probability of the whole target. It runs on :func:`factscope.predict.map_last` (length-sorted batches, last-position
logits, a reducer that keeps only the few numbers needed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from factscope.errors import FactscopeError
from factscope.facts import n_trailing_special
from factscope.models import Model
from factscope.predict import length_batches, map_last

METRICS = ("first", "full", "full-sum")
UNEMBED_ROWS = 128  # queries of a shared context batch unembedded together (see score_shared)


@dataclass(frozen=True)
class Score:
    lp_true: float  # natural-log probability of target_true (first token, per-token mean, or sum: the metric)
    lp_false: float
    top1: int  # the model's top-1 next token id at the answer position


def tokenize(model: Model, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as the model sees it (default special tokens, none trailing)."""
    if not prompts:
        return []
    tok = model.tokenizer
    n_trail = n_trailing_special(tok)
    ids = tok(list(prompts))["input_ids"]
    return [list(x[: len(x) - n_trail]) if n_trail else list(x) for x in ids]


def _check_args(metric: str, name: str, prompts, true_ids, false_ids) -> None:
    if metric not in METRICS:
        raise FactscopeError(f"unknown metric {metric!r}: use {' or '.join(METRICS)}")
    if not (len(prompts) == len(true_ids) == len(false_ids)):
        raise ValueError(f"{name}, true_ids and false_ids must have the same length")


def score_ids(
    model: Model,
    seqs: Sequence[Sequence[int]],
    true_ids: Sequence[Sequence[int]],
    false_ids: Sequence[Sequence[int]],
    metric: str = "first",
    batch_size: int = 32,
    max_tokens: int | None = 4096,
    on_progress: Callable[[float], None] | None = None,
) -> list[Score]:
    """Score tokenized prompts (see the module docstring); ``on_progress(f)`` is told the fraction
    ``f`` of the forwards done as each batch finishes."""
    _check_args(metric, "seqs", seqs, true_ids, false_ids)
    if any(len(s) == 0 for s in seqs):
        raise FactscopeError("empty prompt")
    run_seqs, wants, plans = _plan([tuple(int(x) for x in s) for s in seqs], true_ids, false_ids, metric,
                                   lambda base, toks: base + toks)
    res = map_last(model, run_seqs, _reducer(model, wants), batch_size=batch_size, max_tokens=max_tokens,
                   on_batch=_fractions(len(run_seqs), on_progress), hidden=True)
    return _scores(plans, res, metric)


def _fractions(total: int, on_progress: Callable[[float], None] | None) -> Callable[[int], None] | None:
    """A counter of finished forwards that reports the fraction done to ``on_progress``."""
    if on_progress is None:
        return None
    done = [0]

    def count(n: int) -> None:
        done[0] += n
        on_progress(done[0] / max(1, total))

    return count


def _plan(bases: Sequence, true_ids, false_ids, metric: str, extend):
    """The unique runs (hashable keys) and, for each, the token ids whose log-probs we want.

    ``bases[i]`` is prompt i's run key; ``extend(key, tokens)`` the key of that prompt followed by
    the target tokens (teacher forcing for the "full" metrics). Returns (runs, wants, plans), a
    plan per prompt being (base run index, [(run, slot)] for true, [(run, slot)] for false)."""
    runs: list = []
    wants: list[list[int]] = []
    index: dict = {}

    def want(key, tid: int) -> tuple[int, int]:
        j = index.get(key)
        if j is None:
            j = index[key] = len(runs)
            runs.append(key)
            wants.append([])
        if tid not in wants[j]:
            wants[j].append(tid)
        return j, wants[j].index(tid)

    plans = []
    for b, t, f in zip(bases, true_ids, false_ids):
        if not t or not f:
            raise FactscopeError("empty target token ids")
        k_t = 1 if metric == "first" else len(t)
        k_f = 1 if metric == "first" else len(f)
        tp = [want(extend(b, tuple(int(x) for x in t[:j])), int(t[j])) for j in range(k_t)]
        fp = [want(extend(b, tuple(int(x) for x in f[:j])), int(f[j])) for j in range(k_f)]
        plans.append((index[b], tp, fp))
    return runs, wants, plans


def _reducer(model: Model, wants: list[list[int]]):
    """``reduce(h, idx)``: for final-normed hidden states ``h [B, d]`` of runs ``idx``, each run's
    (log-probabilities of its wanted ids, top-1 id), by :meth:`Model.vocab_scores`."""

    def reduce(h: torch.Tensor, idx: list[int]) -> list:
        k = max(len(wants[i]) for i in idx)
        ids = torch.tensor([wants[i] + wants[i][:1] * (k - len(wants[i])) for i in idx])
        logp, top = model.vocab_scores(h, ids)
        logp, top = logp.tolist(), top.tolist()
        return [(logp[row][: len(wants[i])], int(top[row])) for row, i in enumerate(idx)]

    return reduce


def _scores(plans, res: list, metric: str) -> list[Score]:
    scores = []
    for base, tp, fp in plans:
        lt = sum(res[j][0][slot] for j, slot in tp)
        lf = sum(res[j][0][slot] for j, slot in fp)
        if metric == "full":  # mean per token (ROME)
            lt, lf = lt / len(tp), lf / len(fp)
        scores.append(Score(float(lt), float(lf), res[base][1]))
    return scores


def score_shared(
    model: Model,
    contexts: Sequence[Sequence[int]],
    prompts: Sequence[tuple[int, int, Sequence[int]]],
    true_ids: Sequence[Sequence[int]],
    false_ids: Sequence[Sequence[int]],
    metric: str = "first",
    batch_size: int = 32,
    max_tokens: int | None = 4096,
    on_progress: Callable[[float], None] | None = None,
) -> list[Score]:
    """:func:`score_ids` for prompts that share prefixes: prompt i is ``contexts[c][:m] + suffix``
    for ``prompts[i] = (c, m, suffix)``. The keys/values of each context are computed once
    (:meth:`Model.prefill`, in length-sorted batches of contexts) and every prompt's suffix is run
    against the first ``m`` tokens of its context (:meth:`Model.forward_from`); prompts with
    ``m = 0`` run whole. Identical contexts (facts whose prepended sentence is the same, e.g. one
    false target, or one scheme's false target being another's true one) are prefilled once, and
    identical prompts scored once. Equals :func:`score_ids` on the joined token sequences.
    ``on_progress`` as for :func:`score_ids`."""
    _check_args(metric, "prompts", prompts, true_ids, false_ids)
    canon: dict[tuple, int] = {}
    cid = [canon.setdefault(tuple(int(x) for x in ctx), len(canon)) for ctx in contexts]
    contexts = list(canon)
    bases = []
    for c, m, suffix in prompts:
        if not 0 <= c < len(cid) or not 0 <= m <= len(contexts[cid[c]]):
            raise FactscopeError(f"prompt ({c}, {m}, ...) does not fit the {len(cid)} contexts given")
        if not suffix:
            raise FactscopeError("empty suffix: every prompt needs at least one token after its context")
        bases.append((cid[c], int(m) if m else -1, tuple(int(x) for x in suffix)))
    runs, wants, plans = _plan(bases, true_ids, false_ids, metric, lambda b, toks: (b[0], b[1], b[2] + toks))
    reduce = _reducer(model, wants)
    count = _fractions(len(runs), on_progress)
    res: list = [None] * len(runs)
    # runs without a shared context (m = 0): ordinary forwards
    whole = [j for j, (c, m, _) in enumerate(runs) if m < 0]
    if whole:
        part = map_last(model, [runs[j][2] for j in whole], lambda h, idx: reduce(h, [whole[i] for i in idx]),
                        batch_size=batch_size, max_tokens=max_tokens, on_batch=count, hidden=True)
        for j, r in zip(whole, part):
            res[j] = r
    by_ctx: dict[int, list[int]] = {}
    for j, (c, m, _) in enumerate(runs):
        if m > 0:
            by_ctx.setdefault(c, []).append(j)
    used = sorted(by_ctx)
    need = [max(runs[j][1] for j in by_ctx[c]) for c in used]  # tokens of each context any prompt reads
    with torch.inference_mode():
        for cb in length_batches(need, batch_size, max_tokens):
            prefix = model.prefill(model.batch_from_ids([list(contexts[used[i]][: need[i]]) for i in cb]))
            row = {used[i]: r for r, i in enumerate(cb)}
            todo = [j for i in cb for j in by_ctx[used[i]]]
            qbs = length_batches([len(runs[j][2]) for j in todo], batch_size, max_tokens)
            done, hs = [], []
            for b, qb in enumerate(qbs):
                js = [todo[q] for q in qb]
                sub = prefix.take([row[runs[j][0]] for j in js], [runs[j][1] for j in js])
                hs.append(model.forward_from(sub, model.batch_from_ids([runs[j][2] for j in js]), unembed=False))
                done += js
                if len(done) >= UNEMBED_ROWS or b == len(qbs) - 1:
                    # the vocabulary pass of many queries at once: its 262k x d matrix read once
                    for j, r in zip(done, reduce(torch.cat(hs), done)):
                        res[j] = r
                    done, hs = [], []
                if count is not None:
                    count(len(js))
    return _scores(plans, res, metric)


def score_prompts(
    model: Model,
    prompts: Sequence[str],
    targets_true: Sequence[str],
    targets_false: Sequence[str],
    metric: str = "first",
    batch_size: int = 32,
    answer_prompts: Sequence[str] | None = None,
) -> list[Score]:
    """Score text prompts against text targets (target token ids are computed on
    ``answer_prompts``, by default the prompts themselves)."""
    from factscope.facts import target_ids

    ap = answer_prompts if answer_prompts is not None else prompts
    t = [target_ids(model.tokenizer, p, x) for p, x in zip(ap, targets_true)]
    f = [target_ids(model.tokenizer, p, x) for p, x in zip(ap, targets_false)]
    return score_ids(model, tokenize(model, prompts), t, f, metric=metric, batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# metrics


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded, vectorized)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    if n_boot < 1:
        raise FactscopeError(f"bootstrap resamples must be >= 1, not {n_boot}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


def efficacy_table(results: pd.DataFrame, by: Sequence[str] = ("model", "scheme", "n"),
                   n_boot: int = 1000, seed: int = 0, ci: bool = True) -> pd.DataFrame:
    """Per group: n_facts, es (share with P(target_false) > P(target_true)), es_lo/es_hi
    (bootstrap 95% interval), mean p_true, mean p_false, top1_acc (top-1 is target_true)."""
    rows = []
    by = list(by)
    if results.empty:
        return pd.DataFrame(columns=by + ["n_facts", "es", "es_lo", "es_hi", "p_true", "p_false", "top1_acc"])
    for key, g in results.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        hij = (g["lp_false"].to_numpy() > g["lp_true"].to_numpy()).astype(float)
        lo, hi = bootstrap_ci(hij, n_boot, seed) if ci else (float("nan"), float("nan"))
        rows.append({
            **dict(zip(by, key)),
            "n_facts": len(g),
            "es": float(hij.mean()),
            "es_lo": lo,
            "es_hi": hi,
            "p_true": float(np.exp(g["lp_true"].to_numpy()).mean()),
            "p_false": float(np.exp(g["lp_false"].to_numpy()).mean()),
            "top1_acc": float(g["top1_is_true"].to_numpy().astype(float).mean()),
        })
    return pd.DataFrame(rows)
