"""Fact records, fact-set loaders, subject spans and target tokens.

Data sets (see docs/data.md for provenance and attribution):

- ``known_1000``: ROME's "knowns" (1,209 facts, shipped in ``factscope/data/known_1000.json``).
- ``lre``: the 47 relation files of "Linearity of Relation Decoding" (11,089 facts, shipped in
  ``factscope/data/lre/<category>/<relation>.json``); ``lre:factual`` is one category and
  ``lre:factual/person_native_language`` one relation.
- ``counterfact``: the full CounterFact file, downloaded once with ``factscope data fetch
  counterfact`` (:func:`fetch_counterfact`) into the cache (:func:`counterfact_path`).
- a path: a ``.json`` file in the LRE, known_1000 or CounterFact schema (or a JSON list of fact
  records), a directory of LRE relation files, or a ``.jsonl``/``.csv`` file whose rows have the
  :class:`Fact` fields (at least ``subject``, ``target_true`` and ``prompt`` or ``template``).

Invariant of every loaded fact: ``fact.template`` holds ``{}`` exactly once and
``fact.template.replace("{}", fact.subject) == fact.prompt``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from factscope.errors import FactscopeError

__all__ = [
    "COUNTERFACT_URL",
    "Fact",
    "add_false_targets",
    "cache_root",
    "counterfact_path",
    "data_cli",
    "dataset_names",
    "fact_subject_span",
    "fetch_counterfact",
    "load_facts",
    "subject_span",
    "target_ids",
    "target_logprob",
]

COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
COUNTERFACT_FILENAME = "counterfact.json"

# Wikidata property labels for the relation ids used by known_1000 and CounterFact.
WIKIDATA_RELATIONS: dict[str, str] = {
    "P17": "country",
    "P19": "place of birth",
    "P20": "place of death",
    "P27": "country of citizenship",
    "P30": "continent",
    "P36": "capital",
    "P37": "official language",
    "P39": "position held",
    "P101": "field of work",
    "P103": "native language",
    "P106": "occupation",
    "P108": "employer",
    "P127": "owned by",
    "P131": "located in the administrative territorial entity",
    "P136": "genre",
    "P138": "named after",
    "P140": "religion",
    "P159": "headquarters location",
    "P176": "manufacturer",
    "P178": "developer",
    "P190": "twinned administrative body",
    "P264": "record label",
    "P276": "location",
    "P364": "original language of film or TV show",
    "P407": "language of work or name",
    "P413": "position played on team",
    "P449": "original broadcaster",
    "P463": "member of",
    "P495": "country of origin",
    "P641": "sport",
    "P740": "location of formation",
    "P937": "work location",
    "P1303": "instrument",
    "P1412": "languages spoken, written or signed",
}

FACT_FIELDS = (
    "subject",
    "relation_id",
    "relation_name",
    "template",
    "prompt",
    "target_true",
    "target_false",
    "source",
    "id",
)


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One subject-relation-object fact with the prompt that queries it.

    ``template`` holds ``{}`` where the subject goes; ``prompt`` is the template with the subject
    filled in; ``target_true`` is the correct object and ``target_false`` an alternative object
    (CounterFact's ``target_new``, or one sampled by :func:`add_false_targets`).
    """

    subject: str
    relation_id: str
    relation_name: str
    template: str
    prompt: str
    target_true: str
    target_false: str | None = None
    source: str = ""
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fact:
        unknown = set(d) - set(FACT_FIELDS)
        if unknown:
            raise FactscopeError(f"unknown Fact field(s) {sorted(unknown)} in {d!r}")
        missing = [k for k in FACT_FIELDS[:6] if k not in d]
        if missing:
            raise FactscopeError(f"missing Fact field(s) {missing} in {d!r}")
        return cls(**d)

    @property
    def subject_start(self) -> int:
        """Character offset of the subject in ``prompt`` (where the template's ``{}`` sits)."""
        return self.template.index("{}")


# --------------------------------------------------------------------------------------------
# Cleaning helpers
# --------------------------------------------------------------------------------------------

_LITERAL_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _fix_escapes(s: str) -> str:
    r"""Undo doubly escaped ``\uXXXX`` sequences (the literal text ``Bras\u00edlia``) and only those."""
    if "\\u" not in s:
        return s
    return _LITERAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), s)


def _clean(s: Any) -> str:
    return _fix_escapes(str(s)).strip()


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _occurrences(text: str, sub: str) -> list[int]:
    """Start offsets of ``sub`` in ``text``, preferring whole-word matches.

    Occurrences not glued to letters/digits on either side (so "cat" is found in "A cat is" but
    not in "category") are returned if there are any; otherwise all substring occurrences (which
    keeps scripts written without spaces, such as CJK, working).
    """
    if not sub:
        return []
    starts = []
    i = text.find(sub)
    while i >= 0:
        starts.append(i)
        i = text.find(sub, i + 1)
    whole = [
        s
        for s in starts
        if (s == 0 or not (_is_word_char(text[s - 1]) and _is_word_char(sub[0])))
        and (
            s + len(sub) == len(text)
            or not (_is_word_char(text[s + len(sub)]) and _is_word_char(sub[-1]))
        )
    ]
    return whole or starts


def _template_from_prompt(prompt: str, subject: str, where: str) -> str:
    occ = _occurrences(prompt, subject)
    if not occ:
        raise FactscopeError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}")
    s = occ[0]
    return prompt[:s] + "{}" + prompt[s + len(subject) :]


def _make_fact(
    *,
    subject: Any,
    target_true: Any,
    where: str,
    template: Any = None,
    prompt: Any = None,
    relation_id: Any = "",
    relation_name: Any = "",
    target_false: Any = None,
    source: str = "",
    id: Any = "",
) -> Fact:
    """Build a validated Fact; ``where`` names the culprit in error messages (file:line, id)."""
    subject = _clean(subject) if subject is not None else ""
    target_true = _clean(target_true) if target_true is not None else ""
    if not subject:
        raise FactscopeError(f"{where}: empty subject")
    if not target_true:
        raise FactscopeError(f"{where}: empty target_true for subject {subject!r}")
    tf = None
    if target_false is not None and str(target_false).strip() != "":
        tf = _clean(target_false)
    if template is not None and str(template) != "":
        template = _fix_escapes(str(template))
        if template.count("{}") != 1:
            raise FactscopeError(
                f"{where}: template {template!r} must contain '{{}}' exactly once "
                f"(subject {subject!r})"
            )
        filled = template.replace("{}", subject)
        if prompt is not None and str(prompt) != "" and _fix_escapes(str(prompt)) != filled:
            raise FactscopeError(
                f"{where}: prompt {prompt!r} is not the template {template!r} filled with "
                f"subject {subject!r}"
            )
        prompt = filled
    elif prompt is not None and str(prompt) != "":
        prompt = _fix_escapes(str(prompt))
        template = _template_from_prompt(prompt, subject, where)
    else:
        raise FactscopeError(f"{where}: fact for subject {subject!r} has neither prompt nor template")
    if not prompt.strip():
        raise FactscopeError(f"{where}: empty prompt for subject {subject!r}")
    rid = str(relation_id or "").strip()
    rname = str(relation_name or "").strip() or WIKIDATA_RELATIONS.get(rid, rid)
    return Fact(
        subject=subject,
        relation_id=rid,
        relation_name=rname,
        template=template,
        prompt=prompt,
        target_true=target_true,
        target_false=tf,
        source=source,
        id=str(id if id is not None else ""),
    )


# --------------------------------------------------------------------------------------------
# Loaders, one per schema
# --------------------------------------------------------------------------------------------


def _data_root():
    return resources.files("factscope") / "data"


def _read_json(path: Path, label: str | None = None) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FactscopeError(f"fact file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise FactscopeError(f"{label or path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise FactscopeError(f"{label or path}: not UTF-8 text ({e})") from None


def _lre_facts(data: Any, relation_id: str, where: str, source: str) -> list[Fact]:
    if not isinstance(data, dict) or "samples" not in data:
        raise FactscopeError(f"{where}: not an LRE relation file (no 'samples')")
    templates = data.get("prompt_templates") or []
    if not templates or not isinstance(templates, list):
        raise FactscopeError(f"{where}: LRE relation file has no 'prompt_templates'")
    template = templates[0]
    name = str(data.get("name") or relation_id)
    facts = []
    for i, s in enumerate(data["samples"]):
        if not isinstance(s, dict) or "subject" not in s or "object" not in s:
            raise FactscopeError(f"{where}: sample {i} lacks 'subject'/'object': {s!r}")
        facts.append(
            _make_fact(
                subject=s["subject"],
                target_true=s["object"],
                template=template,
                relation_id=relation_id,
                relation_name=name,
                where=f"{where} sample {i}",
                source=source,
                id=f"lre:{relation_id}:{i}" if source == "lre" else f"{relation_id}:{i}",
            )
        )
    return facts


def _known_facts(data: Any, where: str, source: str) -> list[Fact]:
    facts = []
    for i, r in enumerate(data):
        if not isinstance(r, dict) or not {"subject", "attribute", "prompt"} <= set(r):
            raise FactscopeError(f"{where}: record {i} is not a known_1000 record: {r!r}")
        kid = r.get("known_id", i)
        # The prompt field is authoritative; the template field of 478 records is shorter than the
        # prompt, so the template is derived from the prompt.
        facts.append(
            _make_fact(
                subject=r["subject"],
                target_true=r["attribute"],
                prompt=r["prompt"],
                relation_id=r.get("relation_id", ""),
                where=f"{where} known_id {kid}",
                source=source,
                id=f"known_1000:{kid}",
            )
        )
    return facts


def _counterfact_facts(data: Any, where: str, source: str) -> list[Fact]:
    facts = []
    for i, r in enumerate(data):
        rw = r.get("requested_rewrite") if isinstance(r, dict) else None
        cid = r.get("case_id", i) if isinstance(r, dict) else i
        try:
            facts.append(
                _make_fact(
                    subject=rw["subject"],
                    target_true=rw["target_true"]["str"],
                    target_false=rw["target_new"]["str"],
                    template=rw["prompt"],
                    relation_id=rw.get("relation_id", ""),
                    where=f"{where} case_id {cid}",
                    source=source,
                    id=f"counterfact:{cid}",
                )
            )
        except (KeyError, TypeError):
            raise FactscopeError(
                f"{where}: record {i} (case_id {cid}) is not a CounterFact record "
                "(needs requested_rewrite{prompt, subject, target_true{str}, target_new{str}})"
            ) from None
    return facts


def _row_fact(row: dict[str, Any], where: str, source: str, default_id: str) -> Fact:
    row = {k.strip() if isinstance(k, str) else k: v for k, v in row.items()}
    if "target_true" not in row:  # accept the LRE / known_1000 names of the object
        for alias in ("object", "attribute", "target"):
            if alias in row:
                row["target_true"] = row[alias]
                break
    missing = [k for k in ("subject", "target_true") if row.get(k) is None]
    if missing:
        raise FactscopeError(f"{where}: missing field(s) {missing} in row {row!r}")
    return _make_fact(
        subject=row["subject"],
        target_true=row["target_true"],
        template=row.get("template"),
        prompt=row.get("prompt"),
        relation_id=row.get("relation_id") or "",
        relation_name=row.get("relation_name") or "",
        target_false=row.get("target_false"),
        source=str(row.get("source") or source),
        id=str(row.get("id") or default_id),
        where=where,
    )


def _load_json_path(path: Path) -> list[Fact]:
    data = _read_json(path)
    src = str(path)
    if isinstance(data, dict):
        if "samples" in data:
            return _lre_facts(data, path.stem, str(path), src)
        raise FactscopeError(f"{path}: unrecognised JSON object (expected an LRE relation file)")
    if not isinstance(data, list):
        raise FactscopeError(f"{path}: expected a JSON list of facts or an LRE relation file")
    if not data:
        return []
    first = data[0]
    if isinstance(first, dict) and "requested_rewrite" in first:
        return _counterfact_facts(data, str(path), src)
    if isinstance(first, dict) and "known_id" in first and "attribute" in first:
        return _known_facts(data, str(path), src)
    facts = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise FactscopeError(f"{path}: item {i} is not an object: {row!r}")
        facts.append(_row_fact(row, f"{path} item {i}", src, f"{path.stem}:{i}"))
    return facts


def _load_jsonl(path: Path) -> list[Fact]:
    facts = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FactscopeError(f"fact file not found: {path}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FactscopeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise FactscopeError(f"{path}:{lineno}: expected a JSON object, got {row!r}")
            facts.append(_row_fact(row, f"{path}:{lineno}", str(path), f"{path.stem}:{lineno}"))
    return facts


def _load_csv(path: Path) -> list[Fact]:
    facts = []
    try:
        f = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise FactscopeError(f"fact file not found: {path}") from None
    with f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return []
        for row in reader:
            lineno = reader.line_num
            if None in row:
                raise FactscopeError(f"{path}:{lineno}: more cells than header columns")
            if all((v or "").strip() == "" for v in row.values()):
                continue
            facts.append(_row_fact(row, f"{path}:{lineno}", str(path), f"{path.stem}:{lineno}"))
    return facts


def lre_relations() -> list[tuple[str, Any]]:
    """(relation id "category/relation", resource) for every shipped LRE file, sorted."""
    root = _data_root() / "lre"
    out = []
    for cat in sorted(root.iterdir(), key=lambda p: p.name):
        if not cat.is_dir():
            continue
        for f in sorted(cat.iterdir(), key=lambda p: p.name):
            if f.name.endswith(".json"):
                out.append((f"{cat.name}/{f.name[:-5]}", f))
    return out


def _load_lre(selector: str) -> list[Fact]:
    rels = lre_relations()
    if selector:
        chosen = [(rid, f) for rid, f in rels if rid == selector or rid.split("/")[0] == selector]
        if not chosen:
            cats = sorted({rid.split("/")[0] for rid, _ in rels})
            close = [rid for rid, _ in rels if selector.split("/")[-1] in rid]
            hint = f"; did you mean {', '.join('lre:' + c for c in close[:5])}?" if close else ""
            raise FactscopeError(
                f"unknown LRE selection 'lre:{selector}': categories are {', '.join(cats)} "
                f"(e.g. lre:factual or lre:factual/person_native_language){hint}"
            )
    else:
        chosen = rels
    facts = []
    for rid, f in chosen:
        data = json.loads(f.read_text(encoding="utf-8"))
        facts.extend(_lre_facts(data, rid, f"lre/{rid}.json", "lre"))
    return facts


def _load_lre_dir(path: Path) -> list[Fact]:
    files = sorted(path.rglob("*.json"))
    if not files:
        raise FactscopeError(f"{path}: directory holds no .json relation files")
    facts = []
    for f in files:
        rid = f.relative_to(path).with_suffix("").as_posix()
        facts.extend(_lre_facts(_read_json(f), rid, str(f), str(path)))
    return facts


def dataset_names() -> list[str]:
    """Every built-in dataset name: known_1000, counterfact, lre, lre:<category>, lre:<relation>."""
    rels = [rid for rid, _ in lre_relations()]
    cats = sorted({r.split("/")[0] for r in rels})
    return ["known_1000", "counterfact", "lre"] + [f"lre:{c}" for c in cats] + [f"lre:{r}" for r in rels]


def _load_all(dataset: str) -> list[Fact]:
    name = dataset.strip()
    if name == "known_1000":
        data = json.loads((_data_root() / "known_1000.json").read_text(encoding="utf-8"))
        return _known_facts(data, "known_1000.json", "known_1000")
    if name == "lre" or name.startswith("lre:"):
        return _load_lre(name[4:].strip("/") if name.startswith("lre:") else "")
    if name == "counterfact":
        p = counterfact_path()
        if not p.exists():
            raise FactscopeError(
                f"CounterFact is not downloaded yet (looked for {p}); run "
                f"`factscope data fetch counterfact` while online, or pass the path of a file in "
                f"CounterFact's schema"
            )
        facts = _counterfact_facts(_read_json(p), str(p), "counterfact")
        return facts
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_lre_dir(path)
    if path.exists():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return _load_json_path(path)
        if suffix == ".jsonl":
            return _load_jsonl(path)
        if suffix == ".csv":
            return _load_csv(path)
        raise FactscopeError(f"{path}: unsupported fact file type {suffix!r} (use .json, .jsonl or .csv)")
    raise FactscopeError(
        f"unknown dataset {dataset!r}: use known_1000, lre, lre:<category>, lre:<category>/<relation>, "
        f"counterfact, or the path of an existing .json/.jsonl/.csv file"
    )


def load_facts(dataset: str, limit: int | None = None, seed: int = 0) -> list[Fact]:
    """Load a fact set by name or path (see the module docstring).

    Facts lacking a false target get one sampled from the other objects of their relation in the
    whole data set (:func:`add_false_targets`, seeded with ``seed``). With ``limit``, a seeded
    random subset of ``limit`` facts is returned in data-set order.
    """
    return seeded_subset(add_false_targets(_load_all(dataset), seed=seed), limit, seed)


def seeded_subset(facts: Sequence[Fact], limit: int | None, seed: int = 0) -> list[Fact]:
    """A seeded random subset of ``limit`` of ``facts`` (all when ``limit`` is None or larger), in
    their order."""
    facts = list(facts)
    if limit is not None:
        if limit < 0:
            raise FactscopeError(f"limit must be >= 0, got {limit}")
        if limit < len(facts):
            keep = sorted(random.Random(seed).sample(range(len(facts)), limit))
            facts = [facts[i] for i in keep]
    return facts


def add_false_targets(facts: Iterable[Fact], seed: int = 0) -> list[Fact]:
    """Give each fact without ``target_false`` one sampled from other objects of its relation.

    The candidates are the distinct ``target_true`` values of facts with the same ``relation_id``
    in ``facts`` that differ from the fact's own (case-insensitively). The draw for each fact
    depends only on ``seed``, the fact's relation, id, subject and target and the candidate set,
    so it does not change with the order of ``facts``. A fact whose relation has no other object
    keeps ``target_false=None``.
    """
    facts = list(facts)
    pools: dict[str, list[str]] = {}
    for f in facts:
        pools.setdefault(f.relation_id, []).append(f.target_true)
    for rid in pools:
        pools[rid] = sorted(set(pools[rid]))
    out = []
    for f in facts:
        if f.target_false is not None:
            out.append(f)
            continue
        own = f.target_true.casefold()
        cands = [o for o in pools[f.relation_id] if o.casefold() != own]
        if not cands:
            out.append(f)
            continue
        rng = random.Random(f"{seed}|{f.relation_id}|{f.id}|{f.subject}|{f.target_true}")
        out.append(dataclasses.replace(f, target_false=rng.choice(cands)))
    return out


# --------------------------------------------------------------------------------------------
# CounterFact download
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$FACTSCOPE_CACHE`` or ``~/.cache/factscope``."""
    env = os.environ.get("FACTSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "factscope"


def counterfact_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the downloaded CounterFact file lives (it may not exist yet)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return base / COUNTERFACT_FILENAME


def fetch_counterfact(
    url: str = COUNTERFACT_URL, cache_dir: str | os.PathLike | None = None, timeout: float = 30.0
) -> Path:
    """Download CounterFact into the cache (atomically: temp file, check, rename); return its path.

    Raises FactscopeError with a clear message when offline or when the download is not valid
    CounterFact JSON; a partial download never replaces or leaves a file at the final path.
    """
    dest = counterfact_path(cache_dir)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FactscopeError(f"cannot create cache directory {dest.parent}: {e}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=".counterfact.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise FactscopeError(
                f"could not download CounterFact from {url}: {reason}. This machine seems to be "
                f"offline or the server is unreachable; download the file elsewhere and copy it to "
                f"{dest}, or pass its path as the dataset"
            ) from None
        try:
            data = json.loads(tmp.read_text(encoding="utf-8"))
            ok = isinstance(data, list) and data and "requested_rewrite" in data[0]
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise FactscopeError(f"the file downloaded from {url} is not CounterFact JSON")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


# --------------------------------------------------------------------------------------------
# Subject spans
# --------------------------------------------------------------------------------------------


def _char_span_to_tokens(offsets: list[tuple[int, int]], special: list[int], s: int, e: int):
    idx = [
        i
        for i, (a, b) in enumerate(offsets)
        if not special[i] and b > a and a < e and b > s
    ]
    if not idx:
        return None
    return idx[0], idx[-1] + 1


def _encode_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _decoded_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]], list[int]] | None:
    """Token ids, character offsets and special-token mask of ``text`` without native offsets.

    Offsets come from decoding growing prefixes of the ids (tokens that end inside a UTF-8
    character share the span of the token that completes it). None when the decoded text is not
    exactly ``text`` (a normalising tokenizer), in which case callers fall back further.
    """
    ids = _encode_ids(tokenizer, text)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    offsets: list[tuple[int, int]] = []
    special: list[int] = []
    pending: list[int] = []
    prev = 0
    for i, tid in enumerate(ids):
        if tid in specials:
            offsets.append((prev, prev))
            special.append(1)
            continue
        offsets.append((prev, prev))
        special.append(0)
        d = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        if d.endswith("\ufffd") and not text[: len(d)].endswith("\ufffd"):
            pending.append(i)
            continue
        if text[: len(d)] != d:
            return None
        for j in pending + [i]:
            offsets[j] = (prev, len(d))
        pending = []
        prev = len(d)
    if pending or prev != len(text):
        return None
    return ids, offsets, special


def _offsets(tokenizer, text: str):
    """(ids, offsets, special mask) from the tokenizer's offset mapping or by decoding; or None."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], list(enc["special_tokens_mask"])
    try:
        return _decoded_offsets(tokenizer, text)
    except Exception:  # a tokenizer whose decode cannot handle prefixes
        return None


def _span_by_prefix(tokenizer, prompt: str, s: int, e: int) -> tuple[int, int]:
    """Token span of prompt[s:e] without offsets: count the tokens of the prefixes.

    A space before the subject belongs to the subject's first token (BPE "Ġ", SentencePiece "▁"),
    so the prefix before the subject is counted without its trailing whitespace.
    """
    n_trail = n_trailing_special(tokenizer)
    before = prompt[:s].rstrip()
    start = len(_encode_ids(tokenizer, before)) - n_trail
    if not before:  # only the leading special tokens (BOS) come before the subject
        start = len(_encode_ids(tokenizer, "x")) - n_trail - len(_encode_ids(tokenizer, "x", False))
    end = len(_encode_ids(tokenizer, prompt[:e])) - n_trail
    full = _encode_ids(tokenizer, prompt)
    end = min(max(end, start + 1), len(full) - n_trail)
    # A space the vocabulary could not merge into the subject stays a token of its own ("Ġ", "▁").
    while start < end - 1 and not tokenizer.decode([full[start]]).strip():
        start += 1
    return start, end


def n_trailing_special(tokenizer) -> int:
    """How many special tokens the tokenizer appends after a text by default (e.g. an EOS)."""
    ids = _encode_ids(tokenizer, "a")
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = 0
    while n < len(ids) and ids[len(ids) - 1 - n] in specials:
        n += 1
    return n


def subject_span(tokenizer, prompt: str, subject: str, occurrence: str | int = "first") -> tuple[int, int]:
    """``[start, end)`` positions of the subject's tokens in ``tokenizer(prompt)["input_ids"]``.

    Positions count the tokenizer's default special tokens (e.g. Gemma's BOS at 0). The subject's
    character span is mapped to every token that overlaps it, so a leading "Ġ"/"▁" merged into the
    subject's first token, a subject at the very start, Unicode split over byte tokens and
    punctuation all come out right. ``occurrence`` picks among repeated occurrences: "first" or
    "last" (whole-word matches preferred, so "cat" is not found inside "category"), or an ``int``
    character offset where the subject starts (see :func:`fact_subject_span`).
    """
    if not subject:
        raise FactscopeError(f"empty subject for prompt {prompt!r}")
    if isinstance(occurrence, int) and not isinstance(occurrence, bool):
        if prompt[occurrence : occurrence + len(subject)] != subject:
            raise FactscopeError(
                f"subject {subject!r} does not occur at character {occurrence} of prompt {prompt!r}"
            )
        s = occurrence
    else:
        occ = _occurrences(prompt, subject)
        if not occ:
            raise FactscopeError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        if occurrence == "first":
            s = occ[0]
        elif occurrence == "last":
            s = occ[-1]
        else:
            raise FactscopeError(f"occurrence must be 'first', 'last' or a character offset, got {occurrence!r}")
    e = s + len(subject)
    enc = _offsets(tokenizer, prompt)
    if enc is None:
        return _span_by_prefix(tokenizer, prompt, s, e)
    _, offsets, special = enc
    span = _char_span_to_tokens(offsets, special, s, e)
    if span is None:
        raise FactscopeError(f"subject {subject!r} covers no token of prompt {prompt!r}")
    return span


def fact_subject_span(tokenizer, fact: Fact) -> tuple[int, int]:
    """The subject span of ``fact.prompt`` at the template's ``{}`` position (never ambiguous)."""
    try:
        return subject_span(tokenizer, fact.prompt, fact.subject, occurrence=fact.subject_start)
    except (FactscopeError, ValueError) as e:
        raise FactscopeError(f"fact {fact.id or fact.subject!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

_ATTACHING = set(",.;:!?)]}%'’\"”»…")


def _continuation(prompt: str, target: str) -> str:
    if not prompt or prompt[-1].isspace() or target[0].isspace() or target[0] in _ATTACHING:
        return target
    return " " + target


def target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as the model would continue ``prompt``; ``[0]`` is the first token.

    The continuation is ``" " + target`` unless the target starts with whitespace or attaching
    punctuation or the prompt ends with whitespace. The ids are those after the prompt's tokens in
    ``tokenizer(prompt + continuation)``; if the tokenizer merges across the boundary (a prompt
    ending in a space whose "Ġ"/"▁" token joins the target's first word), the text of the target
    that the merged token covered is tokenized on its own, so ``tokenizer(prompt) + target_ids``
    decodes to ``prompt + continuation``.
    """
    if target is None or not str(target).strip():
        raise FactscopeError(f"empty target for prompt {prompt!r}")
    cont = _continuation(prompt, target)
    text = prompt + cont
    L = len(prompt)
    p_ids = _encode_ids(tokenizer, prompt)
    enc = _offsets(tokenizer, text)
    if enc is not None:
        ids, offs, special = enc
        tail = [i for i in range(len(ids)) if not special[i] and offs[i][1] > L]
        if not tail:
            raise FactscopeError(f"target {target!r} produced no tokens after prompt {prompt!r}")
        if offs[tail[0]][0] >= L:
            return [ids[i] for i in tail]
        # Merge across the boundary: tokenize the target text the merged token(s) covered.
        rest = [i for i in tail if offs[i][0] >= L]
        cut = offs[rest[0]][0] if rest else len(text)
        head = _encode_ids(tokenizer, text[L:cut], add_special_tokens=False)
        return head + [ids[i] for i in rest]
    # No offsets at all: prefix comparison.
    full = _encode_ids(tokenizer, text)
    n_trail = n_trailing_special(tokenizer)
    core = p_ids[: len(p_ids) - n_trail] if n_trail else p_ids
    end = len(full) - n_trail if n_trail else len(full)
    if full[: len(core)] == core:
        out = full[len(core) : end]
    else:
        out = _encode_ids(tokenizer, cont, add_special_tokens=False)
    if not out:
        raise FactscopeError(f"target {target!r} produced no tokens after prompt {prompt!r}")
    return out


def target_logprob(model, tokenizer, prompt: str, target: str) -> float:
    """Total log-probability (natural log) of all tokens of ``target`` continuing ``prompt``.

    ``model`` is a factscope Model or a Hugging Face causal LM.
    """
    import torch

    p_ids = _encode_ids(tokenizer, prompt)
    n_trail = n_trailing_special(tokenizer)
    if n_trail:
        p_ids = p_ids[:-n_trail]
    t_ids = target_ids(tokenizer, prompt, target)
    with torch.no_grad():
        if hasattr(model, "batch_from_ids"):  # a factscope Model
            device = model.device
            logits = model.forward(model.batch_from_ids([p_ids + t_ids]), last_only=False)[0].float()
        else:
            device = next(model.parameters()).device
            logits = model(input_ids=torch.tensor([p_ids + t_ids], device=device)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    n = len(p_ids)
    pos = torch.arange(n - 1, n - 1 + len(t_ids), device=device)
    return float(logp[pos, torch.tensor(t_ids, device=device)].sum())


# --------------------------------------------------------------------------------------------
# CLI: `factscope data ...` (registered by factscope.cli)
# --------------------------------------------------------------------------------------------


def _make_cli():
    import click

    from factscope.commands import CommandGroup

    @click.group("data", cls=CommandGroup, help="Fact data sets: list them, show facts, download CounterFact.")
    def data_cli():
        pass

    @data_cli.command("fetch", help="Download a data set into the cache (only: counterfact).")
    @click.argument("name", type=click.Choice(["counterfact"]))
    @click.option("--url", default=COUNTERFACT_URL, show_default=True, help="Where to download from.")
    def fetch_cmd(name, url):
        path = fetch_counterfact(url=url)
        n = len(load_facts(str(path)))
        click.echo(f"CounterFact: {n} facts in {path}")

    @data_cli.command("list", help="List the built-in data set names with their fact counts.")
    def list_cmd():
        for name in dataset_names():
            if name == "counterfact":
                p = counterfact_path()
                click.echo(f"counterfact\t{'downloaded: ' + str(p) if p.exists() else 'not downloaded'}")
                continue
            click.echo(f"{name}\t{len(_load_all(name))}")

    @data_cli.command("show", help="Print facts of a data set as JSON lines.")
    @click.argument("dataset")
    @click.option("--limit", type=int, default=5, show_default=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    def show_cmd(dataset, limit, seed):
        for f in load_facts(dataset, limit=limit, seed=seed):
            click.echo(json.dumps(f.to_dict(), ensure_ascii=False))

    return data_cli


data_cli = _make_cli()
