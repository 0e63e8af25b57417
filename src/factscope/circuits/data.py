"""Circuit data: known facts of a relation, a seeded D_val/D_test split and counterfactual prompts.

A :class:`CircuitData` holds, for a list of facts, the teacher-forced clean batch (prompt tokens
followed by every answer token but the last, so the logits at the answer positions predict each
answer token), the counterfactual ("corrupted") batch and the answer token ids.

Counterfactual prompt of a fact: the prompt of another fact of the same relation whose answer's
first token differs and whose prompt has the same number of tokens (chosen with a seeded RNG from
the facts passed in, so a D_test fact is only paired with D_test facts). The corrupted sequence is
that prompt followed by the clean fact's answer tokens, so both sequences have the same length and
every position lines up (what counterfactual patching needs). KnowledgeCircuits corrupts by
shuffling the prompts of the batch (``shuffle_tensor``), which pairs prompts of different lengths
and, with padding, misaligns positions; we match lengths instead.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from factscope.errors import FactscopeError
from factscope.facts import Fact, load_facts, target_ids


@dataclass
class CircuitData:
    """Facts with their counterfactual partners as model inputs (see the module docstring).

    ``clean`` / ``corrupted``: left-padded batches of prompt + answer[:-1] tokens.
    ``answers[i]``: token ids of fact i's answer; ``cf_first[i]``: first answer token of its partner.
    ``prompt_len[i]``: tokens of fact i's prompt (incl. a BOS), so answer token j is predicted at
    column ``clean.offset[i] + prompt_len[i] - 1 + j``.
    """

    facts: list[Fact]
    partners: list[Fact]
    clean: object  # factscope.models.Batch
    corrupted: object
    answers: list[list[int]]
    cf_first: list[int]
    prompt_len: list[int]
    dropped: list[Fact] = field(default_factory=list)
    model: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.facts)

    @property
    def first(self) -> torch.Tensor:
        """long [B]: first answer token of each fact."""
        return torch.tensor([a[0] for a in self.answers], dtype=torch.long)

    def subset(self, idx: Sequence[int]) -> CircuitData:
        """The facts at ``idx`` (re-encoded, so padding is as tight as the subset allows)."""
        return encode(self.model, [self.facts[i] for i in idx], [self.partners[i] for i in idx])


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def pair_counterfactuals(model, facts: Sequence[Fact], seed: int = 0) -> tuple[list[Fact], list[Fact], list[Fact]]:
    """(facts kept, their partners, facts dropped for lack of a partner), seeded.

    A partner has the same relation, the same prompt token length and a different first answer
    token (and a different answer string).
    """
    tok = model.tokenizer
    info = []
    for f in facts:
        if not f.target_true or not str(f.target_true).strip():
            raise FactscopeError(f"fact {f.id or f.subject!r} has an empty target")
        info.append((len(_prompt_ids(tok, f.prompt)), target_ids(tok, f.prompt, f.target_true)[0]))
    rng = random.Random(seed)
    kept, partners, dropped = [], [], []
    for i, f in enumerate(facts):
        n, first = info[i]
        cands = [
            j for j, g in enumerate(facts)
            if j != i and g.relation_id == f.relation_id and info[j][0] == n and info[j][1] != first
            and g.target_true.strip().lower() != f.target_true.strip().lower()
        ]
        if not cands:
            dropped.append(f)
            continue
        kept.append(f)
        partners.append(facts[rng.choice(cands)])
    return kept, partners, dropped


def encode(model, facts: Sequence[Fact], partners: Sequence[Fact], dropped=()) -> CircuitData:
    """Facts and their (already chosen) counterfactual partners as a :class:`CircuitData`."""
    tok = model.tokenizer
    clean_seqs, cf_seqs, answers, cf_first, plen = [], [], [], [], []
    for f, g in zip(facts, partners):
        p = _prompt_ids(tok, f.prompt)
        q = _prompt_ids(tok, g.prompt)
        if len(p) != len(q):
            raise FactscopeError(f"counterfactual prompt {g.prompt!r} is not as long as {f.prompt!r}")
        a = target_ids(tok, f.prompt, f.target_true)
        answers.append(a)
        cf_first.append(target_ids(tok, g.prompt, g.target_true)[0])
        clean_seqs.append(p + a[:-1])
        cf_seqs.append(q + a[:-1])
        plen.append(len(p))
    if not facts:
        raise FactscopeError("no facts to build circuit data from")
    return CircuitData(list(facts), list(partners), model.batch_from_ids(clean_seqs),
                       model.batch_from_ids(cf_seqs), answers, cf_first, plen, list(dropped), model)


def build(model, facts: Sequence[Fact], seed: int = 0) -> CircuitData:
    """Pair each fact with a counterfactual (seeded) and encode both batches."""
    kept, partners, dropped = pair_counterfactuals(model, facts, seed)
    if not kept:
        raise FactscopeError(
            f"none of the {len(facts)} facts has a counterfactual partner (same relation, same prompt "
            f"length in tokens, different answer); use more facts"
        )
    return encode(model, kept, partners, dropped)


def split(facts: Sequence[Fact], n_val: float = 0.5, seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """Seeded disjoint (D_val, D_test): ``n_val`` facts (or that fraction) for validation, the rest test.

    Facts keep their data-set order inside each part.
    """
    n = len(facts)
    k = round(n_val * n) if isinstance(n_val, float) else int(n_val)
    if n < 2 or not 1 <= k < n:
        raise FactscopeError(f"cannot split {n} facts into a validation part of {n_val} and a non-empty test part")
    val = set(random.Random(seed).sample(range(n), k))
    return [facts[i] for i in range(n) if i in val], [facts[i] for i in range(n) if i not in val]


def known_relation_facts(model, dataset: str, limit: int | None = None, seed: int = 0, top_k: int = 1,
                         progress: bool = False, known_only: bool = True) -> tuple[list[Fact], object]:
    """The facts of ``dataset`` the model knows (target's first token in its top-k), capped at ``limit``
    (seeded subset of the known ones), and the per-fact known table. ``known_only=False`` keeps every
    fact (random test models know none)."""
    from factscope.predict import known_facts

    facts = load_facts(dataset, seed=seed)
    known, table = known_facts(model, facts, top_k=top_k, progress=progress)
    if not known_only:
        known = list(facts)
    if limit is not None and limit < len(known):
        keep = sorted(random.Random(seed).sample(range(len(known)), limit))
        known = [known[i] for i in keep]
    return known, table


def relation_data(model, dataset: str, n_val: float = 0.5, limit: int | None = None, seed: int = 0,
                  top_k: int = 10, progress: bool = False) -> tuple[CircuitData, CircuitData, dict]:
    """(D_val, D_test, info) for the known facts of ``dataset`` (a relation such as
    ``lre:factual/country_capital_city``); partners are drawn inside each split."""
    known, table = known_relation_facts(model, dataset, limit=limit, seed=seed, top_k=top_k, progress=progress)
    if len(known) < 4:
        raise FactscopeError(
            f"{model.name} knows only {len(known)} of the {len(table)} facts of {dataset} (top-{top_k}); "
            f"circuit evaluation needs at least 4 (choose another relation or a larger --known-top-k)"
        )
    val, test = split(known, n_val, seed)
    d_val, d_test = build(model, val, seed), build(model, test, seed + 1)
    info = {"n_facts": len(table), "n_known": int(table["known"].sum()), "n_used": len(known),
            "n_val": len(d_val), "n_test": len(d_test), "dropped_val": len(d_val.dropped),
            "dropped_test": len(d_test.dropped)}
    return d_val, d_test, info
