"""Shared helpers of the flow analyses: fact positions, batching, keys, statistics."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from factscope.errors import FactscopeError
from factscope.facts import Fact, fact_subject_span
from factscope.loop import resumable
from factscope.models import Batch, Model
from factscope.predict import length_batches, token_rank


@dataclass
class FactTokens:
    """A fact's prompt tokens and the token indices the flow analyses use (0 = first token, BOS
    included when the tokenizer adds one)."""

    fact: Fact
    ids: list[int]
    subject: list[int]  # subject token indices
    bos: list[int]  # [0] when the prompt starts with the BOS token, else []
    non_subject: list[int] = field(default_factory=list)  # not subject, not BOS, not last

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def last(self) -> int:
        return self.n - 1

    @property
    def subject_first(self) -> int:
        return self.subject[0]

    @property
    def subject_last(self) -> int:
        return self.subject[-1]

    @property
    def after_subject(self) -> int:
        """The token right after the subject (the first relation token)."""
        return self.subject[-1] + 1


def fact_tokens(model: Model, fact: Fact) -> FactTokens:
    """Tokenize a fact's prompt and locate its subject; raises FactscopeError when the subject
    touches the last token (nothing would follow the subject)."""
    ids = list(model.tokenizer(fact.prompt)["input_ids"])
    s, e = fact_subject_span(model.tokenizer, fact)
    if e >= len(ids):
        raise FactscopeError(f"fact {fact.id or fact.subject!r}: the subject ends at the last token of the prompt")
    bos_id = model.tokenizer.bos_token_id
    bos = [0] if (bos_id is not None and ids[0] == bos_id and s > 0) else []
    subj = list(range(s, e))
    non = [i for i in range(len(ids) - 1) if i not in subj and i not in bos]
    return FactTokens(fact, ids, subj, bos, non)


def usable(model: Model, facts: Sequence[Fact]) -> tuple[list[FactTokens], list[Fact]]:
    """Tokenized facts, and the facts skipped because their subject touches the last token."""
    ok, skipped = [], []
    for f in facts:
        try:
            ok.append(fact_tokens(model, f))
        except FactscopeError:
            skipped.append(f)
    return ok, skipped


def fact_key(i: int, fact: Fact) -> str:
    return fact.id or f"#{i}:{fact.subject}"


def batches(items: Sequence[FactTokens], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``items`` in batches of similar prompt length."""
    yield from length_batches([t.n for t in items], batch_size)


def encode(model: Model, items: Sequence[FactTokens]) -> Batch:
    return model.batch_from_ids([t.ids for t in items])


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and the half-width of its normal-approximation 95% interval (1.96 standard errors)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(vals) / n
    if n == 1:
        return m, float("nan"), 1
    var = sum((v - m) ** 2 for v in vals) / (n - 1)
    return m, 1.96 * math.sqrt(var / n), n


def prob_of(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Softmax probability of ``token[i]`` under ``logits[i]`` (float32)."""
    return logits.float().softmax(-1).gather(1, token.view(-1, 1)).squeeze(1)


def project_rank(model: Model, vectors: torch.Tensor, tokens: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Rank (0 = top) of ``tokens[i]`` in the logit-lens projection of ``vectors[i]``: ``[N, d] -> [N]``
    (:func:`factscope.predict.token_rank` on ``model.logit_lens``, ``chunk`` vectors at a time)."""
    out = [token_rank(model.logit_lens(vectors[i : i + chunk]).float(), tokens[i : i + chunk]) for i in range(0, len(vectors), chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def default_window(n_layers: int) -> int:
    """The issue's default window: max(1, round(n_layers / 5)) (the paper used 9 of 48 layers)."""
    return max(1, round(n_layers / 5))


def upper_layer(n_layers: int) -> int:
    """round(0.83 * n_layers), the paper's layer 40 of 48, clipped to the model."""
    return min(n_layers - 1, round(0.83 * n_layers))


def run_facts(model, facts, batch_fn, *, batch_size: int, checkpoint=None, progress=False, desc="facts") -> dict:
    """The flow parts' per-fact loop (:func:`factscope.loop.resumable`): the usable facts (keyed by
    :func:`fact_key`) not yet in ``checkpoint``, in batches of similar prompt length, through
    ``batch_fn(items) -> list[dict]``; each record starts with the fact's ``fact_id``,
    ``subject``, ``prompt`` and ``target``. Returns {key: record} of every finished usable fact."""
    items, _ = usable(model, facts)
    ok = {id(t.fact) for t in items}
    keys = [fact_key(i, f) for i, f in enumerate(facts) if id(f) in ok]

    def group(pending: list[int]):
        for b in batches([items[i] for i in pending], batch_size):
            yield [pending[j] for j in b]

    def work(idx: list[int], report) -> list[dict]:
        recs = batch_fn([items[i] for i in idx])
        return [{**_fact_fields(items[i].fact), **r} for i, r in zip(idx, recs)]

    return resumable(keys, work, checkpoint, batches=group, progress=progress, desc=desc, unit="fact")


def _fact_fields(f: Fact) -> dict:
    return {"fact_id": f.id, "subject": f.subject, "prompt": f.prompt, "target": f.target_true}
