"""The resumable context-hijacking benchmark runner.

For each model (loaded one at a time): every candidate fact's plain prompt is scored first
("base" phase, n = 0); by default only facts the model knows (top-1 token is target_true's first
token) are kept; then every (scheme, n = 1..N, fact) prompt is scored ("hijack" phase). The base
prompts are sorted by token length and cut into chunks; each finished chunk is appended to the
run's checkpoint ``checkpoints/hijack_<model>.jsonl`` (its record lists the (scheme, n, fact id)
keys and their scores), so a killed run resumes at the first unfinished chunk. The chunks depend
only on the run's configuration and the model, so a resumed run computes exactly the same
batches and gives results identical to an uninterrupted run.

The hijacked prompts share prefixes: prompt(n) is the first n prepended sentences of prompt(N)
followed by the query. By default (``shared_prefix=True``, phase "hijack-shared") the prompts of
a (scheme, fact) stay together, grouped by context length, and each chunk computes the keys and
values of each of its contexts once (``Model.prefill``) and runs every n's query against the
first n sentences' keys/values (``Model.forward_from``), batched across facts. The token split is
checked against the tokenizer (:func:`shared_prompts`); a prompt whose tokens do not split at its
context is scored whole and counted in ``counts["unshared_prompts"]``. ``shared_prefix=False``
(phase "hijack") scores every prompt whole, length-sorted; both give the same scores within
float32 rounding (tests/test_prefix.py).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from factscope.errors import FactscopeError
from factscope.facts import Fact, load_facts, target_ids
from factscope.findings import Claim, with_interval
from factscope.hijack.schemes import Scheme, build_prompt, relation_sentence, related_words, scheme_sentence
from factscope.hijack.scoring import METRICS, Score, efficacy_table, score_ids, score_shared, tokenize
from factscope.loop import publish, resumable
from factscope.models import Model, load_model
from factscope.runs import Run

BASE = "-"  # scheme name of the shared n = 0 prompts
METRIC_TEXT = {"first": "first answer token", "full": "mean log-probability per target token, as ROME's "
               "CounterFact evaluation", "full-sum": "whole-target log-probability (sum over its tokens)"}


@dataclass
class Prepared:
    fact: Fact
    true_ids: list[int]
    false_ids: list[int]

    def top1_is_true(self, score: Score) -> bool:
        """The model's top-1 token is target_true's first token: for the plain prompt, the fact is
        known (:func:`factscope.predict.known_facts` with top-k 1, read off the score)."""
        return score.top1 == self.true_ids[0]


@dataclass
class ModelResult:
    model: str
    results: pd.DataFrame  # one row per (scheme, n, fact)
    counts: dict = field(default_factory=dict)


@dataclass
class HijackResult:
    models: list[ModelResult]
    efficacy: pd.DataFrame  # per model, scheme, n
    by_relation: pd.DataFrame  # per model, scheme, n, relation
    summary: dict

    @property
    def results(self) -> pd.DataFrame:
        return pd.concat([m.results for m in self.models], ignore_index=True)


# --------------------------------------------------------------------------------------------
# data


def load_dataset(name: str, limit: int | None = None, seed: int = 0,
                 relations: Sequence[str] | None = None) -> tuple[list[Fact], str]:
    """Facts for the benchmark and a note on where they came from.

    ``counterfact`` is the full file when downloaded (``factscope data fetch counterfact``), else
    the shipped five-record sample; ``counterfact-sample`` is always the sample. Everything else is
    :func:`factscope.facts.load_facts` (known_1000, lre, lre:<...>, a path), whose facts get a
    seeded false target from the other objects of the same relation (drawn on the whole data set).
    ``relations`` keeps only facts of these relation ids, before the seeded ``limit`` subset is
    drawn (no check here: see :func:`load_datasets`).
    """
    from importlib import resources

    from factscope.facts import counterfact_path

    sample = str(resources.files("factscope.hijack") / "counterfact_sample.json")
    source = name
    if name == "counterfact-sample" or (name == "counterfact" and not counterfact_path().exists()):
        note = "CounterFact sample shipped with factscope (5 records)"
        if name == "counterfact":
            note += "; the full file is not downloaded (factscope data fetch counterfact)"
        source = sample
    else:
        note = name
    if not relations:
        facts = load_facts(source, limit=limit, seed=seed)
        return facts, note + (f" (seeded subset of {limit})" if limit is not None and source != sample else "")
    want = set(relations)
    facts = [f for f in load_facts(source, seed=seed) if f.relation_id in want]
    note += f", relations {', '.join(relations)}"
    if limit is not None:
        if limit < 0:
            raise FactscopeError(f"limit must be >= 0, got {limit}")
        if limit < len(facts):  # the same seeded draw as load_facts
            keep = sorted(random.Random(seed).sample(range(len(facts)), limit))
            facts = [facts[i] for i in keep]
        note += f" (seeded subset of {limit})"
    return facts, note


def load_datasets(names: Sequence[str], limit: int | None = None, seed: int = 0,
                  relations: Sequence[str] | None = None) -> tuple[list[Fact], list[str]]:
    """:func:`load_dataset` for each name, combined; with ``relations``, a FactscopeError naming
    each requested relation that has no usable fact (none at all, or none with a false target)
    in the combined data."""
    facts: list[Fact] = []
    notes: list[str] = []
    for d in names:
        f, note = load_dataset(d, limit=limit, seed=seed, relations=relations)
        facts.extend(f)
        notes.append(note)
    if relations:
        problems = []
        for r in dict.fromkeys(relations):
            of_r = [f for f in facts if f.relation_id == r]
            if not of_r:
                avail = sorted({f.relation_id for d in names for f in load_dataset(d, seed=seed)[0]
                                if f.target_false is not None}, key=_rel_key)
                problems.append(f"relation {r} has no facts in {', '.join(names)}"
                                + (f" (after --limit {limit})" if limit is not None else "")
                                + f"; relations with usable facts: {', '.join(avail)}")
            elif all(f.target_false is None for f in of_r):
                ex = of_r[0]
                problems.append(
                    f"relation {r} has {len(of_r)} fact{'s' if len(of_r) > 1 else ''} in {', '.join(names)} "
                    f"(e.g. {ex.subject!r} -> {ex.target_true!r}) but none with a false target: all its facts "
                    "share one object, so there is no other object of the relation to use as the false target "
                    f"(so {r} is missing from the usable facts of {', '.join(names)}); use a data set with more "
                    f"{r} facts, e.g. CounterFact (factscope data fetch counterfact, then --dataset counterfact)")
        if problems:
            raise FactscopeError("; ".join(problems))
    return facts, notes


def _rel_key(r: str):
    return (0, int(r[1:]), r) if r[:1] == "P" and r[1:].isdigit() else (1, 0, r)


def prepare(model: Model, facts: Sequence[Fact], metric: str = "first") -> tuple[list[Prepared], dict]:
    """Facts that can be scored: a false target, and target tokens that can tell true from false
    (different first tokens for ``metric="first"``, different token sequences for "full")."""
    out, counts = [], {"candidates": len(facts), "no_false_target": 0, "same_answer_token": 0}
    seen = set()
    for f in facts:
        if f.id in seen:
            raise FactscopeError(f"fact id {f.id!r} occurs twice; the benchmark needs unique fact ids")
        seen.add(f.id)
        if f.target_false is None:
            counts["no_false_target"] += 1
            continue
        t = target_ids(model.tokenizer, f.prompt, f.target_true)
        fl = target_ids(model.tokenizer, f.prompt, f.target_false)
        if (t[0] == fl[0]) if metric == "first" else (t == fl):
            counts["same_answer_token"] += 1
            continue
        out.append(Prepared(f, t, fl))
    return out, counts


# --------------------------------------------------------------------------------------------
# chunked, checkpointed execution


def safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._-")
    return s or "model"


def _run_chunks(
    ck,
    phase: str,
    chunks: list[list[tuple]],
    score: Callable[[int, Callable[[float], None]], list[Score]],
    *,
    progress: bool,
    desc: str,
    on_chunk: Callable[[str], None] | None,
) -> dict[tuple, Score]:
    """Score prompts chunk by chunk through the resumable loop (:func:`factscope.loop.resumable`):
    chunk ``c`` (its prompts' keys ``chunks[c]``) is the checkpoint unit ``"{phase}:{c}"``, whose
    record lists ``[scheme, n, fact id, lp_true, lp_false, top1]`` per prompt; ``score(c, report)``
    scores it (reporting the fraction done, so the bar moves per batch). A finished chunk that
    holds other prompts than ``chunks[c]`` means the run changed: one clear error, before any
    work."""
    ckeys = [f"{phase}:{c}" for c in range(len(chunks))]
    done = {r["key"]: r for r in ck.records()}
    for ckey, keys in zip(ckeys, chunks):
        rec = done.get(ckey)
        if rec is not None and [r[:3] for r in rec["items"]] != [list(k) for k in keys]:
            raise FactscopeError(
                f"checkpoint {ck.path} does not match this run (chunk {ckey} holds other prompts); "
                "was the model or the data changed? Use a new --out directory"
            )

    def work(idx: list[int], report) -> list[dict]:
        (c,) = idx
        scores = score(c, report)
        return [{"items": [list(k) + [s.lp_true, s.lp_false, s.top1] for k, s in zip(chunks[c], scores)]}]

    recs = resumable(ckeys, work, ck, batches=1, sizes=[len(k) for k in chunks], progress=progress, desc=desc,
                     unit="prompt", on_batch=(lambda finished: on_chunk(finished[0])) if on_chunk is not None else None)
    return {tuple(r[:3]): Score(r[3], r[4], r[5]) for ckey in ckeys for r in recs[ckey]["items"]}


def _execute(
    model: Model,
    ck,
    phase: str,
    items: list[tuple[tuple, str, Prepared]],
    *,
    metric: str,
    batch_size: int,
    max_tokens: int | None,
    chunk_size: int,
    progress: bool,
    desc: str,
    on_chunk: Callable[[str], None] | None,
) -> dict[tuple, Score]:
    """Score ``items`` = [(key, prompt, prepared fact)] in length-sorted chunks, reusing finished
    chunks from the checkpoint ``ck``."""
    seqs = tokenize(model, [p for _, p, _ in items])
    order = sorted(range(len(items)), key=lambda i: (-len(seqs[i]), i))
    parts = [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]

    def score(c: int, report) -> list[Score]:
        idx = parts[c]
        return score_ids(
            model,
            [seqs[i] for i in idx],
            [items[i][2].true_ids for i in idx],
            [items[i][2].false_ids for i in idx],
            metric=metric,
            batch_size=batch_size,
            max_tokens=max_tokens,
            on_progress=report,
        )

    return _run_chunks(ck, phase, [[items[i][0] for i in idx] for idx in parts], score, progress=progress, desc=desc,
                       on_chunk=on_chunk)


def shared_prompts(model: Model, sentence: str, prompt: str, max_prepends: int) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """Token ids of the longest prepended context (``sentence`` N times) and, for n = 1..N,
    (m, suffix): prompt(n) tokenizes to the context's first m tokens followed by ``suffix``.

    The split is checked against the tokenizer: the context text of n sentences must tokenize to
    the first tokens of both the full prompt(n) and the N-sentence context (joining the tokenized
    pieces gives the tokenized joined text). Where it does not (a merge across the boundary),
    m = 0 and the suffix is the whole prompt: it is then scored without a shared prefix.
    """
    n_all = range(1, max_prepends + 1)
    ctx = tokenize(model, [" ".join([sentence] * n) for n in n_all])
    full = tokenize(model, [build_prompt(sentence, prompt, n) for n in n_all])
    longest = ctx[-1]
    out = []
    for c, f in zip(ctx, full):
        m = len(c)
        if 0 < m < len(f) and f[:m] == c and longest[:m] == c:
            out.append((m, f[m:]))
        else:
            out.append((0, f))
    return longest, out


def _execute_shared(
    model: Model,
    ck,
    phase: str,
    groups: list[tuple[list[int], list[tuple[tuple, int, list[int], Prepared]]]],
    *,
    metric: str,
    batch_size: int,
    max_tokens: int | None,
    chunk_size: int,
    progress: bool,
    desc: str,
    on_chunk: Callable[[str], None] | None,
) -> dict[tuple, Score]:
    """Score prompts that share prefixes: ``groups`` = [(context ids, [(key, m, suffix ids,
    prepared fact)])], the prompts of one (scheme, fact). Groups are sorted by context (longest
    first, identical contexts together), their prompts cut into chunks of ``chunk_size``
    (checkpointed like :func:`_execute`), and each chunk runs through :func:`score_shared` (each
    distinct context's keys/values computed once per chunk, up to the longest prefix its prompts
    read)."""
    order = sorted(range(len(groups)), key=lambda g: (-len(groups[g][0]), groups[g][0], g))
    flat = [(g, it) for g in order for it in groups[g][1]]
    parts = [flat[start : start + chunk_size] for start in range(0, len(flat), chunk_size)]

    def score(c: int, report) -> list[Score]:
        part = parts[c]
        ctx_index: dict[int, int] = {}
        for g, _ in part:
            ctx_index.setdefault(g, len(ctx_index))
        return score_shared(
            model,
            [groups[g][0] for g in ctx_index],
            [(ctx_index[g], it[1], it[2]) for g, it in part],
            [it[3].true_ids for _, it in part],
            [it[3].false_ids for _, it in part],
            metric=metric,
            batch_size=batch_size,
            max_tokens=max_tokens,
            on_progress=report,
        )

    return _run_chunks(ck, phase, [[it[0] for _, it in part] for part in parts], score, progress=progress, desc=desc,
                       on_chunk=on_chunk)


def run_model(
    run: Run,
    model: Model,
    facts: Sequence[Fact],
    schemes: Sequence[Scheme],
    max_prepends: int = 10,
    *,
    metric: str = "first",
    known_only: bool = True,
    related: dict | None = None,
    batch_size: int = 32,
    max_tokens: int | None = 4096,
    chunk_size: int = 256,
    progress: bool = True,
    on_chunk: Callable[[str], None] | None = None,
    shared_prefix: bool = True,
) -> ModelResult:
    """The benchmark for one loaded model (see the module docstring). With ``shared_prefix`` (the
    default) the prompts of a (scheme, fact) share the keys/values of their prepended sentences
    (:func:`shared_prompts`, :func:`factscope.hijack.scoring.score_shared`); without, every
    prompt runs whole. Both give the same scores (within float32 rounding)."""
    if metric not in METRICS:
        raise FactscopeError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if max_prepends < 0:
        raise FactscopeError(f"--max-prepends must be >= 0, not {max_prepends}")
    if chunk_size < 1:
        raise FactscopeError(f"chunk size must be >= 1, not {chunk_size}")
    prepared, counts = prepare(model, facts, metric)
    if any(s.uses_related for s in schemes) and related is None:
        related = related_words()
    ck = run.checkpoint(f"hijack_{safe_name(model.name)}")
    base_items = [((BASE, 0, p.fact.id), p.fact.prompt, p) for p in prepared]
    base = _execute(model, ck, "base", base_items, metric=metric, batch_size=batch_size, max_tokens=max_tokens,
                    chunk_size=chunk_size, progress=progress, desc=f"hijack {model.name}: base", on_chunk=on_chunk)
    known = [p for p in prepared if p.top1_is_true(base[(BASE, 0, p.fact.id)])]
    counts["known"] = len(known)
    kept = known if known_only else prepared
    counts["kept"] = len(kept)
    by_rel: dict[str, int] = {}
    for p in kept:
        by_rel[p.fact.relation_id] = by_rel.get(p.fact.relation_id, 0) + 1
    counts["kept_by_relation"] = dict(sorted(by_rel.items(), key=lambda kv: _rel_key(kv[0])))

    items, sentences, groups = [], {}, []
    counts["skipped"] = {}
    counts["fallback_template"] = {}
    if shared_prefix:
        counts["unshared_prompts"] = {}  # prompts whose tokens do not split at the prepended context
    for s in schemes:
        n_skip = n_fb = n_whole = 0
        for p in kept:
            sent = scheme_sentence(s, p.fact, related)
            if sent is None:
                n_skip += 1
                continue
            if s.kind == "relation":
                n_fb += relation_sentence(p.fact, "x")[1]
            sentences[(s.name, p.fact.id)] = sent
            if shared_prefix:
                if max_prepends:
                    ctx, parts = shared_prompts(model, sent, p.fact.prompt, max_prepends)
                    n_whole += sum(m == 0 for m, _ in parts)
                    groups.append((ctx, [((s.name, n, p.fact.id), m, suf, p) for n, (m, suf) in enumerate(parts, 1)]))
                continue
            for n in range(1, max_prepends + 1):
                items.append(((s.name, n, p.fact.id), build_prompt(sent, p.fact.prompt, n), p))
        counts["skipped"][s.name] = n_skip
        if shared_prefix:
            counts["unshared_prompts"][s.name] = n_whole
        if s.kind == "relation":
            counts["fallback_template"][s.name] = n_fb
    kw = dict(metric=metric, batch_size=batch_size, max_tokens=max_tokens, chunk_size=chunk_size, progress=progress,
              desc=f"hijack {model.name}", on_chunk=on_chunk)
    if shared_prefix:
        scores = _execute_shared(model, ck, "hijack-shared", groups, **kw)
    else:
        scores = _execute(model, ck, "hijack", items, **kw)

    tok = model.tokenizer
    rows = []
    for s in schemes:
        for p in kept:
            sent = sentences.get((s.name, p.fact.id))
            if sent is None:
                continue
            for n in range(0, max_prepends + 1):
                sc = base[(BASE, 0, p.fact.id)] if n == 0 else scores[(s.name, n, p.fact.id)]
                f = p.fact
                rows.append({
                    "model": model.name, "scheme": s.name, "n": n, "fact_id": f.id,
                    "relation_id": f.relation_id, "subject": f.subject, "prompt": f.prompt,
                    "target_true": f.target_true, "target_false": f.target_false, "sentence": sent,
                    "lp_true": sc.lp_true, "lp_false": sc.lp_false, "top1": tok.decode([sc.top1]),
                    "top1_is_true": p.top1_is_true(sc),
                })
    cols = ["model", "scheme", "n", "fact_id", "relation_id", "subject", "prompt", "target_true", "target_false",
            "sentence", "lp_true", "lp_false", "top1", "top1_is_true"]
    return ModelResult(model.name, pd.DataFrame(rows, columns=cols), counts)


def run_benchmark(
    run: Run,
    models: Sequence[str | Model],
    facts: Sequence[Fact],
    schemes: Sequence[Scheme],
    max_prepends: int = 10,
    *,
    metric: str = "first",
    known_only: bool = True,
    related: dict | None = None,
    batch_size: int = 32,
    max_tokens: int | None = 4096,
    chunk_size: int = 256,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    on_chunk: Callable[[str], None] | None = None,
    device: str = "cpu",
    figures: bool = True,
    shared_prefix: bool = True,
) -> HijackResult:
    """Run the benchmark for each model in turn (names are loaded one at a time, then freed) and
    write ``hijack_results.csv``, ``hijack_efficacy.csv``, ``hijack_relations.csv``, the figures
    (``hijack_efficacy``: a panel per model; with several models also
    ``hijack_efficacy_by_scheme``, the paper's Figure 2 layout; ``hijack_probs``),
    ``summary.json`` under ``"hijack"`` (``efficacy`` = {model: {scheme: [ES for n = 0..N]}}, ``mean_p_true``,
    ``mean_p_false`` and ``top1_acc`` of the same shape, ``n_facts`` = {model: facts kept}) and a
    report section into ``run``."""
    if not models:
        raise FactscopeError("no model given")
    if not schemes:
        raise FactscopeError("no hijacking scheme given")
    out = []
    for m in models:
        model = load_model(m, device=device) if isinstance(m, str) else m
        out.append(run_model(run, model, facts, schemes, max_prepends, metric=metric, known_only=known_only,
                             related=related, batch_size=batch_size, max_tokens=max_tokens,
                             chunk_size=chunk_size, progress=progress, on_chunk=on_chunk,
                             shared_prefix=shared_prefix))
        del model
    return finish(run, out, schemes, max_prepends, metric=metric, n_boot=n_boot, seed=seed, figures=figures)


def finish(run: Run, out: list[ModelResult], schemes: Sequence[Scheme], max_prepends: int, *, metric: str,
           n_boot: int = 1000, seed: int = 0, figures: bool = True, prefix: str = "hijack") -> HijackResult:
    results = pd.concat([m.results for m in out], ignore_index=True)
    eff = efficacy_table(results, ("model", "scheme", "n"), n_boot=n_boot, seed=seed)
    rel = efficacy_table(results, ("model", "scheme", "n", "relation_id"), ci=False)
    efficacy, ci, p_true, p_false, top1 = {}, {}, {}, {}, {}
    for m in out:
        efficacy[m.model], ci[m.model], p_true[m.model], p_false[m.model], top1[m.model] = {}, {}, {}, {}, {}
        for s in schemes:
            g = eff[(eff["model"] == m.model) & (eff["scheme"] == s.name)].sort_values("n")
            efficacy[m.model][s.name] = g["es"].tolist()
            ci[m.model][s.name] = g[["es_lo", "es_hi"]].values.tolist()
            p_true[m.model][s.name] = g["p_true"].tolist()
            p_false[m.model][s.name] = g["p_false"].tolist()
            top1[m.model][s.name] = g["top1_acc"].tolist()
    summary = {
        "efficacy": efficacy,
        "efficacy_ci95": ci,
        "mean_p_true": p_true,
        "mean_p_false": p_false,
        "top1_acc": top1,
        "n_facts": {m.model: m.counts["kept"] for m in out},
        "fact_counts": {m.model: m.counts for m in out},
        "schemes": [s.name for s in schemes],
        "max_prepends": max_prepends,
        "metric": metric,
    }
    res = HijackResult(out, eff, rel, summary)
    figs, captions, section = {}, [], None
    if figures:
        from factscope.hijack.plots import efficacy_by_scheme_figure, efficacy_figure, probability_figure

        rows = ("Top: efficacy score ES(n), the share of facts with P(target_false) > P(target_true) after "
                "n prepended sentences (bands: bootstrap 95% intervals); middle: mean P(target_true); bottom: "
                "top-1 accuracy (the top-1 token is target_true's first token).")
        if len(out) > 1:  # the paper's Figure 2: one panel per scheme, the models overlaid
            figs[f"{prefix}_efficacy_by_scheme"] = efficacy_by_scheme_figure(eff, metric=metric)
            captions.append("One panel per scheme, one line per model (the layout of Jiang et al.'s Figure 2). " + rows)
        figs[f"{prefix}_efficacy"] = efficacy_figure(eff, metric=metric)
        captions.append("One panel per model, one line per scheme. " + rows)
        figs[f"{prefix}_probs"] = probability_figure(eff)
        captions.append("Mean probability of the true and the false target against n.")
        findings, claims = hijack_findings(summary)
        section = {"title": "Context hijacking", "text": section_text(res), "tables": [f"{prefix}_efficacy"],
                   "figures": [{"name": f, "caption": c} for f, c in zip(figs, captions)],
                   "findings": findings, "claims": claims}
    publish(run, prefix, summary, tables={f"{prefix}_results": results, f"{prefix}_efficacy": eff, f"{prefix}_relations": rel},
            figures=figs, section=section)
    return res


def hijack_findings(summary: dict) -> tuple[list[str], list[Claim]]:
    """Per model and scheme, how the efficacy score moves from n = 0 to n = N, and the paper's claim
    that prepending the scheme's sentences hijacks facts. Rule: holds when ES(N)'s bootstrap 95%
    interval lies above ES(0)'s, does not hold when ES does not rise at all, else undecided."""
    findings, claims = [], []
    N = summary["max_prepends"]
    for model, by_scheme in summary["efficacy"].items():
        for scheme, es in by_scheme.items():
            if len(es) < 2:
                continue
            ci = summary["efficacy_ci95"][model][scheme]
            (lo0, hi0), (loN, hiN) = ci[0], ci[-1]
            n_facts = summary["n_facts"][model]
            findings.append(f"{model}, {scheme}: ES rises from {with_interval(es[0], lo0, hi0)} to "
                            f"{with_interval(es[-1], loN, hiN)} with {N} prepended sentences ({n_facts} facts)."
                            if es[-1] > es[0] else
                            f"{model}, {scheme}: ES stays at {with_interval(es[-1], loN, hiN)} after {N} prepended "
                            f"sentences (from {with_interval(es[0], lo0, hi0)}; {n_facts} facts).")
            holds = True if loN > hi0 else False if es[-1] <= es[0] else None
            claims.append(Claim(f"Prepending '{scheme}' sentences hijacks facts ({model})",
                                "GPT-2 to LLaMA-7B: ES grows with the number of prepended sentences",
                                f"ES {es[0]:.2f} -> {es[-1]:.2f} at n = {N}", holds))
    return findings, claims


def section_text(res: HijackResult) -> str:
    s = res.summary
    lines = [
        "Prepending harmless sentences (Jiang et al. 2024, sec. 3) before a factual prompt; the "
        f"efficacy score ES(n) is the share of facts whose false target outscores the true one "
        f"({METRIC_TEXT.get(s['metric'], s['metric'])}).",
        "",
    ]
    for m, by in s["efficacy"].items():
        c = s["fact_counts"][m]
        lines.append(f"- **{m}**: {c['kept']} facts kept of {c['candidates']} ({c['known']} known)")
        for name, es in by.items():
            if es:
                pt, acc = s["mean_p_true"][m][name], s["top1_acc"][m][name]
                k = len(es) - 1
                lines.append(f"- {m} `{name}`: ES(0) = {es[0]:.2f}, ES({k}) = {es[-1]:.2f}, max {max(es):.2f}; "
                             f"mean P(true) {pt[0]:.3f} -> {pt[-1]:.3f}, top-1 accuracy {acc[0]:.2f} -> "
                             f"{acc[-1]:.2f}")
    return "\n".join(lines)


def analyse(models, dataset: str | Sequence = "counterfact-sample", *, schemes: Sequence[str | Scheme] = ("generic", "reverse"),
            templates: Sequence[str] = (), max_prepends: int = 10, limit: int | None = None, seed: int = 0,
            relations: Sequence[str] | None = None, known_only: bool = True, metric: str = "first", n_boot: int = 1000,
            batch_size: int = 32, chunk_size: int = 256, out=None, progress: bool = True):
    """``factscope hijack run`` from Python (a notebook): the benchmark of :func:`run_benchmark` for
    ``models`` (a Model, a name, or a list of them) on ``dataset`` (a data set name, a list of names,
    or a list of facts), with the built-in ``schemes`` (names or :class:`Scheme` objects) and the
    custom ``templates`` (``'NAME=TEMPLATE'``). Returns a :class:`factscope.notebook.Result` whose
    ``table`` is the efficacy per model, scheme and n (``tables["hijack_results"]``: every prompt's
    scores); ``out``: its run directory (default: a temporary one)."""
    from factscope.hijack.schemes import parse_schemes
    from factscope.notebook import analysis, config_of

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    sch = [s for s in schemes if isinstance(s, Scheme)] + parse_schemes([s for s in schemes if not isinstance(s, Scheme)],
                                                                        list(templates))
    if isinstance(dataset, str) or (dataset and isinstance(dataset[0], str)):
        facts, notes = load_datasets([dataset] if isinstance(dataset, str) else list(dataset), limit=limit, seed=seed,
                                     relations=relations)
    else:
        facts, notes = list(dataset), [f"{len(dataset)} facts given in Python"]
    cfg = config_of("hijack", models, dataset, limit, seed, known_only=known_only, relations=relations,
                    schemes=[s.__dict__ for s in sch], max_prepends=max_prepends, metric=metric, bootstrap=n_boot,
                    chunk_size=chunk_size)

    def body(run: Run) -> None:
        run_benchmark(run, models, facts, sch, max_prepends, metric=metric, known_only=known_only, batch_size=batch_size,
                      chunk_size=chunk_size, n_boot=n_boot, seed=seed, progress=progress)
        run.update_summary({"data": notes})

    return analysis("hijack", cfg, body, out)
