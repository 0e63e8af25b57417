"""Metrics for circuit discovery and evaluation (the contract in the circuits spec).

A :class:`Metric` names the padded columns whose next-token logits it reads (``positions``,
long ``[B, P]``) and a function ``fn(logits [N, P, V], rows [N]) -> [N]`` where ``rows[i]`` is the
example of the batch that row ``i`` belongs to (exact patching and ACDC evaluate copies of the
examples). ``run_masked(..., positions=metric.positions)`` returns exactly such logits.

Batches are teacher-forced: prompt tokens then the answer's tokens but the last, left-padded, so
answer token j of an example with an n-token answer is predicted at column ``T - n + j``.

- ``target_nll``: negative log-probability of the answer tokens, averaged over the answer's
  positions only (KnowledgeCircuits' ``negative_log_probs(..., last_seq_element_only=False)``
  averages over every position of the sequence, prompt included, which dilutes the answer's
  share by the prompt length and makes ACDC's threshold depend on it).
- ``logit_diff``: target logit minus the counterfactual answer's logit at the first answer position.
- ``kl_to_clean``: KL(clean || patched) of the next-token distributions, averaged over the answer
  positions (ACDC's default metric, over answer positions instead of the last one only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from factscope.errors import FactscopeError

METRICS = ("nll", "logit_diff", "kl")


@dataclass
class Metric:
    name: str
    positions: torch.Tensor
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool
    # optional: the vocabulary ids the metric reads per example (long [B, K]) and the same values
    # from the logits of those ids only (``fn_vocab(logits [N, P, K], rows) -> [N]``, column k of
    # row i = id ``vocab[rows[i], k]``): exact patching then unembeds K rows instead of the vocabulary
    vocab: torch.Tensor | None = None
    fn_vocab: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # optional: the same values from the final-normed hidden states ``[N, P, d]`` at ``positions``
    # without the vocabulary table (the target NLL through :meth:`Model.log_probs`)
    fn_hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def values(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row values [N] (rows default to 0..N-1)."""
        if rows is None:
            rows = torch.arange(logits.shape[0], device=logits.device)
        return self.fn(logits, rows)

    def mean(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.values(logits, rows).mean()

    def badness(self, value: torch.Tensor | float) -> torch.Tensor | float:
        """The value oriented so that larger is worse (for thresholds on a metric change)."""
        return -value if self.higher_is_better else value


def _answers(answers: Sequence) -> list[list[int]]:
    out = []
    for a in answers:
        a = [int(a)] if isinstance(a, int) or (torch.is_tensor(a) and a.dim() == 0) else [int(x) for x in a]
        if not a:
            raise FactscopeError("an answer has no tokens")
        out.append(a)
    return out


def answer_positions(batch, answers: Sequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions long [B, P], answer ids long [B, P], valid bool [B, P]) for a teacher-forced batch."""
    answers = _answers(answers)
    B, T = batch.input_ids.shape
    if len(answers) != B:
        raise FactscopeError(f"{len(answers)} answers for a batch of {B} prompts")
    P = max(len(a) for a in answers)
    pos = torch.zeros(B, P, dtype=torch.long)
    ids = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for i, a in enumerate(answers):
        n = len(a)
        if n > batch.lengths[i]:
            raise FactscopeError(f"answer {i} has {n} tokens but its sequence only {batch.lengths[i]}")
        cols = [T - n + j for j in range(n)]
        pos[i] = torch.tensor(cols + [cols[-1]] * (P - n))
        ids[i] = torch.tensor(a + [a[-1]] * (P - n))
        valid[i, :n] = True
    dev = batch.input_ids.device
    return pos.to(dev), ids.to(dev), valid.to(dev)


def target_nll(model, batch, answers: Sequence) -> Metric:
    """Mean negative log-probability of the answer tokens over the answer positions (lower is better)."""
    pos, ids, valid = answer_positions(batch, answers)

    def mean_nll(tok: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # tok: [N, P] log-probs
        m = valid[rows].to(tok.device).float()
        return -(tok * m).sum(-1) / m.sum(-1)

    def fn(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(ids.device)
        lp = torch.log_softmax(logits.float(), dim=-1)
        return mean_nll(lp.gather(-1, ids[rows].to(lp.device)[..., None])[..., 0], rows)

    def fn_hidden(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(ids.device)
        return mean_nll(model.log_probs(h, ids[rows]), rows)

    return Metric("nll", pos, fn, higher_is_better=False, fn_hidden=fn_hidden)


def logit_diff(model, batch, answers: Sequence, cf_answers: Sequence) -> Metric:
    """Logit of the answer's first token minus the counterfactual answer's first token, at the
    first answer position (higher is better)."""
    pos, ids, _ = answer_positions(batch, answers)
    cf = torch.tensor([a[0] for a in _answers(cf_answers)], dtype=torch.long, device=ids.device)
    if len(cf) != len(ids):
        raise FactscopeError(f"{len(cf)} counterfactual answers for {len(ids)} prompts")
    tgt = ids[:, 0]

    def fn(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(tgt.device)
        lg = logits[:, 0].float()
        return (lg.gather(-1, tgt[rows, None].to(lg.device)) - lg.gather(-1, cf[rows, None].to(lg.device)))[:, 0]

    def fn_vocab(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        lg = logits[:, 0].float()  # [N, 2]: the target's and the counterfactual answer's logits
        return lg[:, 0] - lg[:, 1]

    return Metric("logit_diff", pos[:, :1].contiguous(), fn, higher_is_better=True,
                  vocab=torch.stack([tgt, cf], 1), fn_vocab=fn_vocab)


def clean_logits(model, batch, positions: torch.Tensor) -> torch.Tensor:
    """float [B, P, V]: the unpatched model's logits at ``positions`` (only those are unembedded)."""
    with torch.no_grad():
        return model.forward(batch, positions=positions).float()


def kl_to_clean(model, batch, answers: Sequence, reference: torch.Tensor | None = None) -> Metric:
    """KL(clean || patched) averaged over the answer positions (lower is better).

    ``reference``: the clean logits [B, P, V] at the answer positions (computed when omitted).
    """
    pos, _, valid = answer_positions(batch, answers)
    ref = clean_logits(model, batch, pos) if reference is None else reference.float()
    ref_lp = torch.log_softmax(ref, dim=-1)

    def fn(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(ref_lp.device)
        lp = torch.log_softmax(logits.float(), dim=-1)
        r = ref_lp[rows].to(lp.device)
        kl = (r.exp() * (r - lp)).sum(-1)
        m = valid[rows].to(lp.device).float()
        return (kl * m).sum(-1) / m.sum(-1)

    return Metric("kl", pos, fn, higher_is_better=False)


def make(name: str, model, data) -> Metric:
    """The metric ``name`` ("nll" | "logit_diff" | "kl") for a :class:`~factscope.circuits.data.CircuitData`."""
    if name == "nll":
        return target_nll(model, data.clean, data.answers)
    if name == "logit_diff":
        return logit_diff(model, data.clean, data.answers, data.cf_first)
    if name == "kl":
        return kl_to_clean(model, data.clean, data.answers)
    raise FactscopeError(f"unknown metric {name!r}: use one of {', '.join(METRICS)}")
