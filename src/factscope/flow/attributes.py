"""Attribute sets of subjects and the attributes rate of vocabulary projections (Geva et al. 2023, sec. 4).

An attribute set is the set of cleaned tokens of text about the subject, tokenized by the model's
tokenizer: each token is decoded, stripped and case-folded; stop words (NLTK's English list, as
in the paper's code) and tokens of two characters or less are dropped. By default the subject's
own tokens are dropped too (the rate then measures attributes, not the subject echoing itself;
``keep_subject_tokens=True`` restores the paper's behaviour).

Sources of text, in order of preference:

1. a user file mapping subject -> paragraphs (the paper used Wikipedia): JSON ``{subject: text or
   [texts]}``, JSONL lines ``{"subject": ..., "text" or "paragraphs": ...}``, or a CSV with columns
   ``subject`` and ``paragraphs`` (the paper's format);
2. the built-in source, which needs no network: the objects of every shipped fact about the
   subject (known_1000 and all LRE relations, matched case-insensitively) plus the model's own
   greedy continuations of neutral prompts about the subject (:data:`NEUTRAL_PROMPTS`). The
   continuations are what the model itself says about the subject, so the rate then measures how
   much of the model's own subject knowledge is readable at a layer and position.

The attributes rate of a projection: the top ``top_n`` (500) tokens, cleaned the same way, the
first ``keep`` (50) distinct ones kept; the rate is the share of those in the attribute set. The
attribute mass (:func:`mass`) is a continuous companion: the softmax probability of the projection
summed over every vocabulary token whose cleaned form is in the set.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from factscope.errors import FactscopeError
from factscope.models import Model

NEUTRAL_PROMPTS = ("{} is", "{} was", "Here are some facts about {}:")
GEN_TOKENS = 24

# NLTK's English stop words (the list the paper's code downloads), inlined: no network, no nltk.
STOPWORDS = frozenset(
    ["i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "you're", "you've", "you'll", "you'd", "your", "yours", "yourself", "yourselves", "he", "him", "his", "himself", "she", "she's", "her", "hers", "herself", "it", "it's", "its", "itself", "they", "them", "their", "theirs", "themselves", "what", "which", "who", "whom", "this", "that", "that'll", "these", "those", "am", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "having", "do", "does", "did", "doing", "a", "an", "the", "and", "but", "if", "or", "because", "as", "until", "while", "of", "at", "by", "for", "with", "about", "against", "between", "into", "through", "during", "before", "after", "above", "below", "to", "from", "up", "down", "in", "out", "on", "off", "over", "under", "again", "further", "then", "once", "here", "there", "when", "where", "why", "how", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such", "no", "nor", "not", "only", "own", "same", "so", "than", "too", "very", "s", "t", "can", "will", "just", "don", "don't", "should", "should've", "now", "d", "ll", "m", "o", "re", "ve", "y", "ain", "aren", "aren't", "couldn", "couldn't", "didn", "didn't", "doesn", "doesn't", "hadn", "hadn't", "hasn", "hasn't", "haven", "haven't", "isn", "isn't", "ma", "mightn", "mightn't", "mustn", "mustn't", "needn", "needn't", "shan", "shan't", "shouldn", "shouldn't", "wasn", "wasn't", "weren", "weren't", "won", "won't", "wouldn", "wouldn't"]
)


def clean_token(text: str) -> str | None:
    """The normalized form of a decoded token, or None when it is a stop word or <= 2 characters."""
    t = text.strip().casefold()
    if len(t) <= 2 or t in STOPWORDS:
        return None
    return t


class Vocab:
    """Lazily decoded, cleaned vocabulary of a model."""

    def __init__(self, model: Model):
        self.tok = model.tokenizer
        self._cache: dict[int, str | None] = {}

        self._index: dict[str, list[int]] | None = None
        self.size = model.vocab_size

    def clean(self, i: int) -> str | None:
        if i not in self._cache:
            self._cache[i] = clean_token(self.tok.decode([i]))
        return self._cache[i]

    def ids(self, strings: set[str]) -> list[int]:
        """Every vocabulary id whose cleaned form is in ``strings`` (the whole vocabulary is decoded
        once per model: a few seconds for Gemma's 262k tokens)."""
        if self._index is None:
            index: dict[str, list[int]] = {}
            for i in range(min(self.size, len(self.tok))):
                c = self.clean(i)
                if c:
                    index.setdefault(c, []).append(i)
            self._index = index
        return sorted(i for s in strings for i in self._index.get(s, ()))


@lru_cache(maxsize=4)
def _vocab(model: Model) -> Vocab:
    return Vocab(model)


def text_tokens(model: Model, text: str) -> set[str]:
    """Cleaned token set of a text under the model's tokenizer."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    v = _vocab(model)
    return {c for c in (v.clean(int(i)) for i in ids) if c}


def attribute_set(model: Model, subject: str, texts: Sequence[str], keep_subject_tokens: bool = False) -> set[str]:
    out: set[str] = set()
    for t in texts:
        out |= text_tokens(model, t)
    if not keep_subject_tokens:
        out -= text_tokens(model, subject) | text_tokens(model, " " + subject)
    return out


def top_clean(model: Model, logits: torch.Tensor, top_n: int = 500, keep: int = 50) -> list[list[str]]:
    """For each row of ``logits``: the first ``keep`` distinct cleaned tokens among its top ``top_n``
    (distinct after normalization: " Xbox" and "Xbox" count once)."""
    v = _vocab(model)
    ids = logits.topk(min(top_n, logits.shape[-1]), dim=-1).indices.tolist()
    out = []
    for row in ids:
        kept: list[str] = []
        for i in row:
            c = v.clean(i)
            if c and c not in kept:
                kept.append(c)
                if len(kept) >= keep:
                    break
        out.append(kept)
    return out


def rate(tokens: Sequence[str], attrs: set[str]) -> float:
    return sum(t in attrs for t in tokens) / len(tokens) if tokens else float("nan")


def attribute_ids(model: Model, attrs: set[str]) -> list[int]:
    """Vocabulary ids of the attribute set's tokens (every id that cleans to a member)."""
    return _vocab(model).ids(attrs)


def mass(logits: torch.Tensor, ids: Sequence[int]) -> float:
    """Softmax probability of ``logits`` ([V]) summed over the token ids (the attribute mass)."""
    if not len(ids):
        return 0.0
    return float(logits.float().softmax(-1)[list(ids)].sum())


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


def load_paragraphs(path: str | Path) -> dict[str, list[str]]:
    """subject -> texts from a JSON, JSONL or CSV file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FactscopeError(f"attribute text file not found: {p}")
    out: dict[str, list[str]] = {}

    def add(subject, text):
        if subject is None or text is None:
            raise FactscopeError(f"{p}: every entry needs a subject and text")
        texts = text if isinstance(text, list) else [text]
        out.setdefault(str(subject), []).extend(str(t) for t in texts)

    try:
        if p.suffix == ".csv":
            with p.open(encoding="utf-8", newline="") as f:
                for row in csv.DictReader(f):
                    add(row.get("subject"), row.get("paragraphs") or row.get("text"))
        elif p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    r = json.loads(line)
                    add(r.get("subject"), r.get("paragraphs", r.get("text")))
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise FactscopeError(f"{p}: expected a JSON object subject -> text(s)")
            for s, t in data.items():
                add(s, t)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FactscopeError(f"{p}: cannot read attribute texts ({e})") from None
    return out


@lru_cache(maxsize=1)
def _shipped_objects() -> dict[str, tuple[str, ...]]:
    from factscope.facts import load_facts

    objs: dict[str, set[str]] = {}
    for ds in ("known_1000", "lre"):
        try:
            facts = load_facts(ds)
        except FactscopeError:
            continue
        for f in facts:
            objs.setdefault(f.subject.casefold(), set()).add(f.target_true)
    return {k: tuple(sorted(v)) for k, v in objs.items()}


def shipped_objects(subject: str) -> list[str]:
    """Objects of every shipped fact (known_1000, LRE) about the subject."""
    return list(_shipped_objects().get(subject.casefold(), ()))


def continuations(model: Model, subjects: Sequence[str], prompts: Sequence[str] = NEUTRAL_PROMPTS, n_tokens: int = GEN_TOKENS,
                  batch_size: int = 32, progress: bool = False) -> dict[str, list[str]]:
    """The model's greedy continuations of neutral prompts about each subject."""
    from tqdm.auto import tqdm

    texts = [(s, p.format(s)) for s in subjects for p in prompts]
    out: dict[str, list[str]] = {s: [] for s in subjects}
    bar = tqdm(total=len(texts), desc="attribute texts", unit="prompt", disable=not progress)
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            batch = model.encode([t for _, t in chunk])
            for (s, _), row in zip(chunk, model.generate(batch, n_tokens)):
                out[s].append(model.tokenizer.decode(row.tolist(), skip_special_tokens=True))
            bar.update(len(chunk))
    bar.close()
    return out
