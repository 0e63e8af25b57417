"""Edit requests in CounterFact's format and ROME's CounterFact scores.

An :class:`EditCase` is one requested rewrite (subject, prompt template, true and new object) with
its paraphrase prompts (generalization) and neighbourhood prompts (specificity: other subjects, each
with the answer it should keep). CounterFact records map one to one (a neighbourhood prompt's
answer is the record's ``target_true``, as CounterFact builds them from subjects sharing the true
object). Other fact sets (LRE, known_1000, fact files) become cases as follows: the rewrite prompt
is the fact's prompt, ``target_new`` its ``target_false`` (sampled from the relation's other
objects, seeded), paraphrases are the relation's other LRE templates, and neighbours are up to 10
other facts of the relation (those sharing the true object first, like CounterFact), each scored
against its own true object; and ``subject_facts`` are up to 10 facts about the same subject in the
other relations of the set and of the shipped LRE (an edit of "The Eiffel Tower is in" should not change what the model says
about the tower's architect), each scored against its own true object like a neighbour.

Scores as in ROME's ``experiments/py/eval_utils_counterfact.py`` (``test_batch_prediction``) and
``experiments/summarize.py``: for each prompt the mean per-token negative log-probability of
``" " + target_new`` and of the true answer, teacher-forced; efficacy = NLL(new) < NLL(true) on
the rewrite prompt, paraphrase = the same averaged over the paraphrase prompts, neighbourhood =
NLL(own true answer) < NLL(new) averaged over the neighbourhood prompts; same-subject (not in
ROME: the Knowledge Circuits paper's side effects on other facts of the subject) = the same over
``subject_facts``.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from factscope.errors import FactscopeError
from factscope.facts import Fact, target_ids

N_NEIGHBOURS = 10


@dataclass(frozen=True)
class EditCase:
    case_id: str
    subject: str
    prompt: str  # template with "{}" where the subject goes
    target_true: str
    target_new: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[tuple[str, str], ...] = ()  # (prompt, the answer it should keep)
    relation_id: str = ""
    subject_facts: tuple[tuple[str, str], ...] = ()  # other relations' facts of the subject: (prompt, answer)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    def to_dict(self) -> dict:
        return asdict(self)


def check_case(c: EditCase) -> EditCase:
    """``c`` itself, or a FactscopeError naming the case: a prompt without '{}', an empty field, or a new
    target equal to the true one."""
    if "{}" not in c.prompt:
        raise FactscopeError(f"case {c.case_id}: prompt {c.prompt!r} has no '{{}}' for the subject")
    for name in ("subject", "target_true", "target_new"):
        if not str(getattr(c, name) or "").strip():
            raise FactscopeError(f"case {c.case_id}: empty {name}")
    if c.target_new.strip().lower() == c.target_true.strip().lower():
        raise FactscopeError(f"case {c.case_id}: target_new equals target_true ({c.target_new!r})")
    return c


def _counterfact_cases(records, where: str) -> list[EditCase]:
    out = []
    for i, r in enumerate(records):
        try:
            rw = r["requested_rewrite"]
            cid = str(r.get("case_id", i))
            true = rw["target_true"]["str"]
            out.append(check_case(EditCase(
                case_id=f"counterfact:{cid}", subject=rw["subject"], prompt=rw["prompt"], target_true=true,
                target_new=rw["target_new"]["str"], paraphrase_prompts=tuple(r.get("paraphrase_prompts") or ()),
                neighborhood=tuple((p, true) for p in r.get("neighborhood_prompts") or ()),
                relation_id=rw.get("relation_id", ""))))
        except (KeyError, TypeError):
            raise FactscopeError(
                f"{where}: record {i} is not a CounterFact record (needs requested_rewrite{{prompt, subject, "
                "target_true{str}, target_new{str}}})") from None
    return out


def _lre_templates() -> dict[str, list[str]]:
    """relation id -> every prompt template of that LRE relation (prompt_templates, then the zero-shot ones)."""
    from factscope.facts import lre_relations

    out = {}
    for rid, f in lre_relations():
        d = json.loads(Path(f).read_text(encoding="utf-8"))
        ts = [t for t in list(d.get("prompt_templates") or []) + list(d.get("prompt_templates_zs") or []) if "{}" in t]
        out[rid] = list(dict.fromkeys(ts))
    return out


def cases_from_facts(facts: list[Fact], chosen: list[Fact], seed: int = 0,
                     subject_pool: list[Fact] | None = None) -> list[EditCase]:
    """CounterFact-style cases for ``chosen`` (neighbours drawn from ``facts``, same-subject facts from
    ``facts`` and ``subject_pool``); see the module docstring."""
    templates = _lre_templates()
    by_rel: dict[str, list[Fact]] = {}
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation_id, []).append(f)
    for f in {(g.relation_id, g.prompt): g for g in [*(subject_pool or []), *facts]}.values():
        by_subject.setdefault(f.subject, []).append(f)
    out = []
    for f in chosen:
        if not f.target_false:
            raise FactscopeError(f"fact {f.id or f.subject!r}: no other object of its relation to edit it to")
        rng = random.Random(f"{seed}:{f.id}:{f.subject}")
        others = [g for g in by_rel.get(f.relation_id, []) if g.subject != f.subject
                  and g.target_true.strip().lower() != f.target_false.strip().lower()]
        same = [g for g in others if g.target_true.strip().lower() == f.target_true.strip().lower()]
        rest = [g for g in others if g not in same]
        rng.shuffle(same)
        rng.shuffle(rest)
        neigh = tuple((g.prompt, g.target_true) for g in (same + rest)[:N_NEIGHBOURS])
        par = tuple(t.replace("{}", f.subject, 1) for t in templates.get(f.relation_id, []) if t != f.template)
        own = [g for g in by_subject.get(f.subject, []) if g.relation_id != f.relation_id
               and g.target_true.strip().lower() != f.target_false.strip().lower()]
        rng.shuffle(own)
        out.append(check_case(EditCase(case_id=f.id or f"{f.relation_id}:{f.subject}", subject=f.subject,
                                        prompt=f.template, target_true=f.target_true, target_new=f.target_false,
                                        paraphrase_prompts=par, neighborhood=neigh, relation_id=f.relation_id,
                                        subject_facts=tuple((g.prompt, g.target_true) for g in own[:N_NEIGHBOURS]))))
    return out


def load_cases(dataset: str, limit: int | None = None, seed: int = 0, subject: str | None = None) -> list[EditCase]:
    """Edit cases from CounterFact (``counterfact`` once fetched, or a file in its schema) or any fact set
    (``subject``: only the facts about that subject, before ``limit``)."""
    from factscope.facts import counterfact_path, load_facts

    path = counterfact_path() if dataset.strip() == "counterfact" else Path(dataset).expanduser()
    if path.suffix.lower() == ".json" and path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise FactscopeError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, list) and data and isinstance(data[0], dict) and "requested_rewrite" in data[0]:
            cases = _counterfact_cases(data, str(path))
            if subject is not None:
                cases = [c for c in cases if c.subject == subject]
            if limit is not None and limit < len(cases):
                keep = sorted(random.Random(seed).sample(range(len(cases)), limit))
                cases = [cases[i] for i in keep]
            return cases
    facts = load_facts(dataset, seed=seed)
    chosen = facts if subject is None else [f for f in facts if f.subject == subject]
    if limit is not None and limit < len(chosen):
        keep = sorted(random.Random(seed).sample(range(len(chosen)), limit))
        chosen = [chosen[i] for i in keep]
    # the subject's facts in other relations come from the whole shipped LRE too
    return cases_from_facts(facts, chosen, seed=seed, subject_pool=load_facts("lre"))


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def answer_nll(model, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """Mean per-token negative log-probability of each answer continuing its prompt (teacher-forced)."""
    seqs, spans = [], []
    for prompt, answer in pairs:
        p = _prompt_ids(model.tokenizer, prompt)
        a = target_ids(model.tokenizer, prompt, answer)
        seqs.append(p + a[:-1])
        spans.append((len(p), a))
    out: list[float] = []
    for s in range(0, len(seqs), batch_size):
        chunk, sp = seqs[s : s + batch_size], spans[s : s + batch_size]
        batch = model.batch_from_ids(chunk)
        W = max(len(a) for _, a in sp)
        pos = torch.zeros(len(chunk), W, dtype=torch.long)
        for i, (n, a) in enumerate(sp):
            cols = [batch.offset[i] + n - 1 + j for j in range(len(a))]
            pos[i] = torch.tensor(cols + [cols[-1]] * (W - len(a)))
        with torch.no_grad():
            lp = torch.log_softmax(model.forward(batch, positions=pos.to(model.device)).double(), -1)
        for i, (n, a) in enumerate(sp):
            ids = torch.tensor(a, device=lp.device)
            out.append(float(-lp[i, torch.arange(len(a)), ids].mean()))
    return out


def _kept(pairs: list[tuple[float, float]]) -> float | None:
    """Share of (NLL new, NLL own answer) pairs where the own answer is still the likelier."""
    return sum(t < n for n, t in pairs) / len(pairs) if pairs else None


@dataclass
class CaseScores:
    """Per-prompt NLLs of a case; ``efficacy`` etc. are ROME's success rates for this case."""

    rewrite: tuple[float, float]  # (NLL new, NLL true) on the rewrite prompt
    paraphrase: list[tuple[float, float]] = field(default_factory=list)
    neighborhood: list[tuple[float, float]] = field(default_factory=list)  # (NLL new, NLL own true)
    same_subject: list[tuple[float, float]] = field(default_factory=list)  # (NLL new, NLL own true)

    @property
    def efficacy(self) -> float:
        return float(self.rewrite[0] < self.rewrite[1])

    @property
    def paraphrase_score(self) -> float | None:
        return sum(n < t for n, t in self.paraphrase) / len(self.paraphrase) if self.paraphrase else None

    @property
    def neighborhood_score(self) -> float | None:
        return _kept(self.neighborhood)

    @property
    def same_subject_score(self) -> float | None:
        return _kept(self.same_subject)

    def row(self, prefix: str) -> dict:
        import math

        new, true = self.rewrite
        return {f"{prefix}efficacy": self.efficacy, f"{prefix}paraphrase": self.paraphrase_score,
                f"{prefix}neighborhood": self.neighborhood_score, f"{prefix}same_subject": self.same_subject_score,
                f"{prefix}p_new": math.exp(-new), f"{prefix}p_true": math.exp(-true)}


def score_case(model, case: EditCase) -> CaseScores:
    """NLL of the new and the true answer on the rewrite, paraphrase, neighbourhood and same-subject prompts."""
    pairs = [(case.rewrite_prompt, case.target_new), (case.rewrite_prompt, case.target_true)]
    for p in case.paraphrase_prompts:
        pairs += [(p, case.target_new), (p, case.target_true)]
    for p, a in (*case.neighborhood, *case.subject_facts):
        pairs += [(p, case.target_new), (p, a)]
    nll = answer_nll(model, pairs)
    two = [(nll[i], nll[i + 1]) for i in range(0, len(nll), 2)]
    k, m = len(case.paraphrase_prompts), len(case.neighborhood)
    return CaseScores(two[0], two[1 : 1 + k], two[1 + k : 1 + k + m], two[1 + k + m :])
