"""Batched next-token prediction at the last position, and known-fact filtering.

Prompts are sorted by length and cut into batches (little padding), the model computes vocabulary
logits at the last position only, and a reducer turns each batch's ``[B, V]`` logits into small
per-prompt results, so tens of thousands of prompts never hold full vocabularies in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from factscope.errors import FactscopeError
from factscope.facts import Fact, target_ids
from factscope.loop import resumable
from factscope.models import Model


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), at most ``batch_size``
    prompts and, if given, ``max_tokens`` padded tokens each."""
    if batch_size < 1:
        raise FactscopeError(f"batch size must be at least 1, not {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (max_tokens and width * (len(cur) + 1) > max_tokens)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def map_last(
    model: Model,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    reduce: Callable[[torch.Tensor, list[int]], list],
    batch_size: int = 32,
    max_tokens: int | None = 4096,
    progress: bool | str = False,
    on_batch: Callable[[int], None] | None = None,
    hidden: bool = False,
) -> list:
    """Run every prompt (text or token ids) and return ``reduce(logits[B, V], indices)`` results in
    prompt order (``reduce`` returns one item per prompt of the batch); ``on_batch(n)`` is called
    as each batch of ``n`` prompts finishes. With ``hidden`` ``reduce`` gets the final-normed
    hidden states ``[B, d]`` instead of the logits (for :meth:`Model.vocab_scores`)."""
    seqs = [model.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    results: list = [None] * len(seqs)
    batches = length_batches([len(s) for s in seqs], batch_size, max_tokens)
    bar = tqdm(total=len(seqs), desc=progress if isinstance(progress, str) else "predict", disable=not progress, unit="prompt")
    with torch.inference_mode():
        for idx in batches:
            batch = model.batch_from_ids([seqs[i] for i in idx])
            if hidden:
                out = model.final_hidden(batch, torch.full((len(idx), 1), batch.input_ids.shape[1] - 1))[:, 0]
            else:
                out = model.forward(batch, last_only=True).float()
            for i, r in zip(idx, reduce(out, idx)):
                results[i] = r
            bar.update(len(idx))
            if on_batch is not None:
                on_batch(len(idx))
    bar.close()
    return results


def last_logits(model: Model, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """``[N, V]`` float32 next-token logits (for a handful of prompts; use :func:`map_last` for many)."""
    return torch.stack(map_last(model, prompts, lambda lg, idx: list(lg.cpu()), batch_size))


@dataclass
class Prediction:
    token_ids: list[int]
    tokens: list[str]
    probs: list[float]


def top_k(model: Model, prompts: Sequence[str], k: int = 10, batch_size: int = 32) -> list[Prediction]:
    def reduce(lg, idx):
        p, ix = lg.softmax(-1).topk(k, dim=-1)
        return [
            Prediction(ix[j].tolist(), model.to_str_tokens(ix[j].tolist()), p[j].tolist()) for j in range(len(idx))
        ]

    return map_last(model, prompts, reduce, batch_size)


def token_rank(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rank (0 = top) of ``tokens[i]`` under ``logits[i]`` ``[N, V]``: the number of tokens with a
    strictly larger logit (ties share the better rank)."""
    return (logits > logits.gather(1, tokens.view(-1, 1))).sum(-1)


def known_facts(
    model: Model, facts: Sequence[Fact], top_k: int = 1, batch_size: int = 32, progress: bool = True
) -> tuple[list[Fact], pd.DataFrame]:
    """Facts whose target's first token is within the model's top-k next tokens.

    Returns the known facts and a per-fact table (rank of the target's first token, its
    probability, the model's top-1 token).
    """
    if top_k < 1:
        raise FactscopeError(f"top-k must be at least 1, not {top_k}")
    first = [target_ids(model.tokenizer, f.prompt, f.target_true)[0] for f in facts]
    seqs = [model.tokenizer(f.prompt)["input_ids"] for f in facts]

    def work(idx: list[int], report) -> list[dict]:
        with torch.inference_mode():
            lg = model.forward(model.batch_from_ids([seqs[i] for i in idx]), last_only=True).float()
        tgt = torch.tensor([first[i] for i in idx], device=lg.device)
        rank, top = token_rank(lg, tgt), lg.argmax(-1)
        prob = lg.softmax(-1).gather(1, tgt[:, None])[:, 0]
        return [{"rank": int(r), "prob": float(p), "top": int(t)} for r, p, t in zip(rank, prob, top)]

    # through the one loop, so that it runs on the current executor (Ray with --executor ray)
    def batches(pending: list[int]) -> list[list[int]]:
        return [[pending[j] for j in b] for b in length_batches([len(seqs[i]) for i in pending], batch_size, 4096)]

    recs = resumable(range(len(facts)), work, batches=batches, progress=progress, desc="known facts", unit="prompt")
    res = [(recs[i]["rank"], recs[i]["prob"], recs[i]["top"]) for i in range(len(facts))]
    rows = []
    for f, tid, (rank, prob, top) in zip(facts, first, res):
        rows.append(
            {
                "id": f.id,
                "relation_id": f.relation_id,
                "relation": f.relation_name,
                "subject": f.subject,
                "prompt": f.prompt,
                "target": f.target_true,
                "target_token": model.tokenizer.decode([tid]),
                "rank": rank,
                "prob": prob,
                "top1": model.tokenizer.decode([top]),
                "known": rank < top_k,
            }
        )
    table = pd.DataFrame(rows)
    known = [f for f, r in zip(facts, rows) if r["known"]]
    return known, table


def known_rate_by_relation(table: pd.DataFrame) -> pd.DataFrame:
    g = table.groupby(["relation_id", "relation"], dropna=False)["known"]
    out = g.agg(n="size", known="sum", rate="mean").reset_index()
    return out.sort_values(["rate", "n"], ascending=False).reset_index(drop=True)
