"""Hijacking schemes, negation templates, related words and prompt building.

A scheme turns a fact into one sentence that is prepended ``n`` times (joined by spaces) before
the fact's prompt:

- ``generic``          "Do not think of {target_false}."
- ``relation``         a true negative sentence for the relation, e.g. "The Eiffel Tower is not
                       located in Guam." (``templates.json``; unknown relation ids use its fallback)
- ``reverse``          ``generic`` with target_true ("Do not think of Paris.")
- ``reverse-relation`` ``relation`` with target_true
- ``related-word``     ``generic`` with a word related to target_false (the country of a false city,
                       the capital of a false country, a country speaking a false language) instead
                       of target_false itself; facts without a related word are skipped
- ``reverse-related-word`` ``generic`` with a word related to target_true ("Do not think of
                       France." for Paris); skipped without one, or when it is target_false
- custom               a user template with ``{subject}``, ``{target_true}``, ``{target_false}``,
                       ``{prompt}``, ``{target}`` (= target_false), ``{related}`` (a word related to
                       target_false) and ``{related_true}`` (a word related to target_true); a fact
                       lacking a placeholder's value is skipped
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from factscope.errors import FactscopeError
from factscope.facts import Fact

GENERIC_TEMPLATE = "Do not think of {target}."
BUILTIN = ("generic", "relation", "reverse", "reverse-relation", "related-word", "reverse-related-word")
CUSTOM_FIELDS = {"subject", "target_true", "target_false", "target", "prompt", "related", "related_true"}
RELATED_FIELDS = {"related", "related_true"}


@dataclass(frozen=True)
class Scheme:
    """One way of building the prepended sentence.

    ``kind`` is "generic" (``template`` with ``{target}``), "relation" (the relation's negation
    template) or "custom" (``template`` with the custom fields). ``target`` says which object
    fills ``{target}``: "false", "true", "related" (a word related to target_false) or
    "related-true" (a word related to target_true).
    """

    name: str
    kind: str = "generic"
    target: str = "false"
    template: str = GENERIC_TEMPLATE

    @property
    def fields(self) -> set[str]:
        """The placeholders of a custom template (empty for built-in schemes)."""
        if self.kind != "custom":
            return set()
        return {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}

    @property
    def uses_related(self) -> bool:
        """Whether the scheme needs the related-word mapping."""
        return self.target in ("related", "related-true") or bool(self.fields & RELATED_FIELDS)


def builtin_scheme(name: str) -> Scheme:
    table = {
        "generic": Scheme("generic", "generic", "false"),
        "relation": Scheme("relation", "relation", "false", ""),
        "reverse": Scheme("reverse", "generic", "true"),
        "reverse-relation": Scheme("reverse-relation", "relation", "true", ""),
        "related-word": Scheme("related-word", "generic", "related"),
        "reverse-related-word": Scheme("reverse-related-word", "generic", "related-true"),
    }
    if name not in table:
        raise FactscopeError(f"unknown hijacking scheme {name!r}: use one of {', '.join(BUILTIN)}, 'all', "
                             "or a custom template")
    return table[name]


def custom_scheme(spec: str, index: int = 0) -> Scheme:
    """``"NAME=TEMPLATE"`` or just ``"TEMPLATE"`` (named custom, custom2, ...)."""
    name, template = None, spec
    head, sep, tail = spec.partition("=")
    if sep and head and "{" not in head and " " not in head.strip():
        name, template = head.strip(), tail
    name = name or ("custom" if index == 0 else f"custom{index + 1}")
    if name in BUILTIN or name == "all":
        raise FactscopeError(f"custom scheme name {name!r} clashes with a built-in scheme")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise FactscopeError(f"custom template {template!r} is malformed: {e}") from None
    bad = fields - CUSTOM_FIELDS
    if bad:
        raise FactscopeError(
            f"custom template {template!r} uses unknown placeholder(s) {sorted(bad)}; "
            f"allowed: {', '.join('{' + f + '}' for f in sorted(CUSTOM_FIELDS))}"
        )
    if not template.strip():
        raise FactscopeError("empty custom template")
    return Scheme(name, "custom", "false", template)


def parse_schemes(names: Sequence[str], templates: Sequence[str] = ()) -> list[Scheme]:
    """Scheme names (``all`` = every built-in) plus custom templates, without duplicates."""
    out: list[Scheme] = []
    for n in names:
        for part in str(n).split(","):
            part = part.strip()
            if not part:
                continue
            for s in (BUILTIN if part == "all" else (part,)):
                sch = builtin_scheme(s)
                if sch not in out:
                    out.append(sch)
    for i, t in enumerate(templates):
        sch = custom_scheme(t, i)
        if any(s.name == sch.name for s in out):
            raise FactscopeError(f"two schemes are named {sch.name!r}")
        out.append(sch)
    if not out:
        raise FactscopeError("no hijacking scheme given")
    return out


# --------------------------------------------------------------------------------------------
# negation templates


@functools.lru_cache(maxsize=None)
def negation_templates() -> tuple[dict[str, str], str]:
    """(relation id -> template, fallback) from the shipped ``templates.json``."""
    data = json.loads((resources.files("factscope.hijack") / "templates.json").read_text(encoding="utf-8"))
    return dict(data["relations"]), data["fallback"]


def _fill(template: str, values: Mapping[str, str], articles: bool = False) -> str:
    """Fill ``{field}`` placeholders (field by field: str.format would choke on braces inside
    subjects or targets). With ``articles``, an "a"/"A" right before a placeholder becomes
    "an"/"An" when the filled value starts with a vowel letter."""
    out: list[str] = []
    for literal, field, spec, conv in string.Formatter().parse(template):
        if field is not None and articles:
            value = values[field]
            m = re.search(r"(^|\s)([aA]) $", literal)
            if m and value[:1].lower() in "aeiou" and value[:1]:
                literal = literal[: m.start(2)] + m.group(2) + "n "
        out.append(literal)
        if field is not None:
            out.append(values[field])
    return "".join(out)


def _sentence_case(s: str) -> str:
    first = s.split(" ", 1)[0]
    if first and first[0].islower() and first.islower():
        return s[0].upper() + s[1:]
    return s


def relation_sentence(fact: Fact, target: str, templates: Mapping[str, str] | None = None,
                      fallback: str | None = None) -> tuple[str, bool]:
    """The negative sentence for ``fact``'s relation with ``target``; and whether the fallback
    template was used."""
    if templates is None or fallback is None:
        t0, f0 = negation_templates()
        templates = t0 if templates is None else templates
        fallback = f0 if fallback is None else fallback
    tpl = templates.get(fact.relation_id)
    used_fallback = tpl is None
    tpl = fallback if tpl is None else tpl
    return _sentence_case(_fill(tpl, {"subject": fact.subject, "target": target}, articles=True)), used_fallback


def scheme_sentence(scheme: Scheme, fact: Fact, related: Mapping[str, str] | None = None) -> str | None:
    """The sentence ``scheme`` prepends for ``fact``, or None when the scheme does not apply
    (no false target, or no related word for it).

    A word related to target_false is never target_true (that sentence would be a reverse one),
    and a word related to target_true is never target_false (that would be a generic hijack)."""

    def rel_false() -> str | None:
        if fact.target_false is None:
            return None
        return related_word(fact.target_false, related or {}, exclude=fact.target_true)

    def rel_true() -> str | None:
        return related_word(fact.target_true, related or {}, exclude=fact.target_false)

    if scheme.kind == "custom":
        fields = scheme.fields
        if fact.target_false is None and fields & {"target_false", "target", "related"}:
            return None
        values = {
            "subject": fact.subject, "target_true": fact.target_true, "target_false": fact.target_false or "",
            "target": fact.target_false or "", "prompt": fact.prompt,
        }
        for name, get in (("related", rel_false), ("related_true", rel_true)):
            if name in fields:
                values[name] = get()
                if values[name] is None:
                    return None
        return _fill(scheme.template, values)
    if scheme.target == "true":
        target = fact.target_true
    elif scheme.target == "related-true":
        target = rel_true()
        if target is None:
            return None
    else:
        if fact.target_false is None:
            return None
        target = fact.target_false
        if scheme.target == "related":
            target = rel_false()
            if target is None:
                return None
    if scheme.kind == "relation":
        return relation_sentence(fact, target)[0]
    return _fill(scheme.template, {"target": target})


def build_prompt(sentence: str | None, prompt: str, n: int) -> str:
    """``sentence`` repeated ``n`` times, then the prompt, separated by single spaces."""
    if n < 0:
        raise FactscopeError(f"number of prepended sentences must be >= 0, not {n}")
    if n == 0:
        return prompt
    if sentence is None:
        raise FactscopeError("no sentence to prepend")
    return " ".join([sentence] * n + [prompt])


# --------------------------------------------------------------------------------------------
# related words

# (LRE relation, direction): "forward" maps subject -> object, "reverse" object -> subject.
RELATED_SOURCES = (
    ("factual/city_in_country", "forward"),  # false city -> its country
    ("factual/country_capital_city", "reverse"),  # false capital -> its country
    ("factual/country_largest_city", "reverse"),  # false city -> its country
    ("factual/country_capital_city", "forward"),  # false country -> its capital
    ("factual/country_language", "reverse"),  # false language -> a country speaking it
)


@functools.lru_cache(maxsize=None)
def _builtin_related() -> dict[str, str]:
    from factscope.facts import load_facts

    votes: dict[str, Counter] = {}
    order: list[str] = []
    for rel, direction in RELATED_SOURCES:
        for f in load_facts(f"lre:{rel}"):
            a, b = (f.subject, f.target_true) if direction == "forward" else (f.target_true, f.subject)
            key = a.casefold()
            if key == b.casefold():
                continue
            if key not in votes:
                votes[key] = Counter()
                order.append(key)
            votes[key][b] += 1
    # most frequent related word; ties broken alphabetically (deterministic)
    return {k: sorted(votes[k].items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for k in order}


def related_words(mapping: str | Path | Mapping[str, str] | None = None) -> dict[str, str]:
    """Word -> related word (keys case-folded).

    ``None`` builds the mapping from the shipped LRE relations (``RELATED_SOURCES``); a path is a
    JSON object ``{"Guam": "Pacific", ...}``; a dict is used as is. A user mapping is used alone.
    """
    if mapping is None:
        return dict(_builtin_related())
    if isinstance(mapping, (str, Path)):
        p = Path(mapping).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FactscopeError(f"related-word file not found: {p}") from None
        except json.JSONDecodeError as e:
            raise FactscopeError(f"{p}: invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise FactscopeError(f"{p}: expected a JSON object mapping words to related words")
        mapping = data
    return {str(k).casefold(): str(v) for k, v in mapping.items() if str(v).strip()}


def related_word(word: str, related: Mapping[str, str], exclude: str | None = None) -> str | None:
    """The word related to ``word`` (case-insensitive), or None (also when it equals ``exclude``
    or ``word`` itself)."""
    r = related.get(word.casefold())
    if r is None or r.casefold() == word.casefold() or (exclude is not None and r.casefold() == exclude.casefold()):
        return None
    return r
