"""Tests of the fact data layer: records, loaders, subject spans, target tokens, CounterFact fetch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from factscope import facts as F
from factscope.errors import FactscopeError
from factscope.facts import (
    Fact,
    add_false_targets,
    counterfact_path,
    fact_subject_span,
    fetch_counterfact,
    load_facts,
    subject_span,
    target_ids,
)
from factscope.models import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CF_SAMPLE = SHARED / "counterfact_sample.json"
# Record case_id 0 of CounterFact (trimmed lists): the embedded one-record sample, always tested.
CF_RECORD = {
    "case_id": 0, "pararel_idx": 2796,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Danielle Darrieux, a native"], "neighborhood_prompts": ["The mother tongue of L\u00e9on Blum is"],
    "attribute_prompts": ["Barack Obama, speaker of"], "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


@pytest.fixture(params=["embedded-record", "shared-sample"])
def cf_file(request, tmp_path):
    """A CounterFact-schema file and its record count: the embedded one-record file, then the shared
    five-record sample from ../shared/data (skipped, with the reason shown, when it is not there)."""
    if request.param == "shared-sample":
        if not CF_SAMPLE.is_file():
            pytest.skip(f"shared CounterFact sample not found at {CF_SAMPLE} (the embedded record is tested instead)")
        return CF_SAMPLE, 5
    p = tmp_path / "cf_sample.json"
    p.write_text(json.dumps([CF_RECORD]))
    return p, 1


LRE_COUNTS = {"factual": (26, 9696), "linguistic": (6, 806), "commonsense": (8, 374), "bias": (7, 213)}


@pytest.fixture(scope="module")
def gpt2_tok():
    return load_tokenizer("tiny-gpt2")  # byte-level BPE, "Ġ" leading spaces, no BOS


@pytest.fixture(scope="module")
def llama_tok():
    return load_tokenizer("tiny-llama")  # Metaspace "▁" BPE with BOS


@pytest.fixture(scope="module")
def gemma_tok():
    return load_tokenizer("gemma-3-270m")  # the real Gemma 3 SentencePiece-style tokenizer, BOS


def toks(tok, prompt, span):
    ids = tok(prompt)["input_ids"]
    return tok.convert_ids_to_tokens(ids[span[0] : span[1]])


class NoOffsets:
    """A tokenizer without offset mappings (like a slow, Python-only tokenizer)."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok
        self.all_special_ids = tok.all_special_ids

    def __call__(self, text, add_special_tokens=True, **kw):
        assert not kw, "the fallback must not ask for offsets"
        return {"input_ids": self._tok(text, add_special_tokens=add_special_tokens)["input_ids"]}

    def decode(self, ids, **kw):
        return self._tok.decode(ids, **kw)


# ------------------------------------------------------------------------------ shipped data


def test_every_shipped_lre_file_loads_with_expected_counts():
    rels = F.lre_relations()
    assert len(rels) == 47
    total = 0
    for cat, (n_files, n_facts) in LRE_COUNTS.items():
        assert sum(1 for rid, _ in rels if rid.startswith(cat + "/")) == n_files
        facts = load_facts(f"lre:{cat}")
        assert len(facts) == n_facts
        assert all(f.relation_id.startswith(cat + "/") for f in facts)
        total += n_facts
    allf = load_facts("lre")
    assert len(allf) == total == 11089
    assert len({f.id for f in allf}) == 11089
    for f in allf:  # the invariant every loader guarantees
        assert f.template.count("{}") == 1
        assert f.template.replace("{}", f.subject) == f.prompt
        assert f.prompt[f.subject_start :].startswith(f.subject)
        assert f.target_true and f.target_true == f.target_true.strip()
        assert f.subject == f.subject.strip()
        assert "\\u" not in f.target_true and "\\u" not in f.subject
        assert f.source == "lre"


def test_lre_single_relation_and_its_fields():
    facts = load_facts("lre:factual/person_native_language")
    assert len(facts) == 919
    f = facts[0]
    assert f.subject == "Danielle Darrieux"
    assert f.relation_id == "factual/person_native_language"
    assert f.relation_name == "person native language"
    assert f.template == "{} speaks the language of"
    assert f.prompt == "Danielle Darrieux speaks the language of"
    assert f.target_true == "French"
    assert f.id == "lre:factual/person_native_language:0"


def test_doubly_escaped_brasilia_is_fixed_and_only_that():
    raw = json.loads((Path(F.__file__).parent / "data/lre/factual/country_capital_city.json").read_text())
    assert "Bras\\u00edlia" in {s["object"] for s in raw["samples"]}  # the quirk is in the shipped file
    objs = {f.target_true for f in load_facts("lre:factual/country_capital_city")}
    assert "Brasília" in objs and "Bogotá" in objs
    assert not any("\\" in o for o in objs)
    assert F._fix_escapes("Bras\\u00edlia") == "Brasília"
    assert F._fix_escapes("C:\\new\\path") == "C:\\new\\path"  # other backslashes untouched


def test_whitespace_in_lre_subjects_and_objects_is_stripped():
    carter = [f for f in load_facts("lre:factual/presidents_birth_year") if f.subject.startswith("Jimmy Carter")]
    assert [(f.subject, f.prompt, f.target_true) for f in carter] == [
        ("Jimmy Carter", "Jimmy Carter was born in", "1924")]
    singer = {f.subject: f.target_true for f in load_facts("lre:factual/person_band_lead_singer")}
    assert singer["Jon Bon Jovi"] == "Bon Jovi"


def test_dataset_names():
    names = F.dataset_names()
    assert names[:3] == ["known_1000", "counterfact", "lre"]
    assert "lre:factual" in names and "lre:factual/person_native_language" in names
    assert len([n for n in names if n.count("/") == 1]) == 47


def test_known_1000_loads_all_records():
    facts = load_facts("known_1000")
    assert len(facts) == 1209
    assert len({f.relation_id for f in facts}) == 33
    f = facts[0]
    assert f.prompt == "Vinson Massif is located in the continent of"  # the prompt field, not the template
    assert f.template == "{} is located in the continent of"
    assert (f.subject, f.target_true, f.relation_id, f.relation_name) == (
        "Vinson Massif", "Antarctica", "P30", "continent")
    assert f.id == "known_1000:0" and f.source == "known_1000"
    assert all(x.template.replace("{}", x.subject) == x.prompt for x in facts)


def test_counterfact_schema_file_loads(cf_file):
    path, n = cf_file
    facts = load_facts(str(path))
    assert len(facts) == n
    f = facts[0]
    assert f.subject == "Danielle Darrieux"
    assert f.template == "The mother tongue of {} is"
    assert f.prompt == "The mother tongue of Danielle Darrieux is"
    assert (f.target_true, f.target_false) == ("French", "English")
    assert (f.relation_id, f.relation_name, f.id) == ("P103", "native language", "counterfact:0")


def test_unknown_dataset_names_are_clear_errors():
    with pytest.raises(FactscopeError, match="unknown dataset 'knwon_1000'"):
        load_facts("knwon_1000")
    with pytest.raises(FactscopeError, match="lre:factual/person_native_langauge"):
        load_facts("lre:factual/person_native_langauge")
    with pytest.raises(FactscopeError, match="lre:nonsense"):
        load_facts("lre:nonsense")


def test_limit_is_seeded_subset_in_order():
    a = load_facts("known_1000", limit=20, seed=1)
    b = load_facts("known_1000", limit=20, seed=1)
    c = load_facts("known_1000", limit=20, seed=2)
    assert a == b and a != c and len(a) == 20
    ids = [int(f.id.split(":")[1]) for f in a]
    assert ids == sorted(ids)
    assert load_facts("known_1000", limit=0) == []
    for bad in (-1, -5):
        with pytest.raises(FactscopeError, match=f"limit must be >= 0, got {bad}"):
            load_facts("known_1000", limit=bad)


def test_object_column_aliases(tmp_path):
    """LRE/known_1000 names of the object column are accepted for target_true."""
    for alias in ("object", "attribute", "target"):
        p = tmp_path / f"{alias}.jsonl"
        p.write_text(json.dumps({"subject": "Rome", "prompt": "Rome is in", alias: "Italy"}) + "\n", encoding="utf-8")
        (f,) = load_facts(str(p))
        assert (f.subject, f.target_true, f.template) == ("Rome", "Italy", "{} is in"), alias


# ------------------------------------------------------------------------------ user files


def test_user_jsonl_and_csv(tmp_path):
    rows = [
        {"subject": "Émile Zola", "relation_id": "birth", "template": "{} was born in", "target_true": "Paris"},
        {"subject": "東京", "relation_id": "birth", "prompt": "東京は日本の首都", "target_true": "日本",
         "target_false": "中国", "id": "tokyo"},
    ]
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    facts = load_facts(str(p))
    assert [f.prompt for f in facts] == ["Émile Zola was born in", "東京は日本の首都"]
    assert facts[1].template == "{}は日本の首都" and facts[1].id == "tokyo"
    assert facts[1].target_false == "中国"
    assert facts[0].target_false == "日本"  # sampled from the other object of relation "birth"

    c = tmp_path / "mine.csv"
    c.write_text(
        "subject,relation_id,relation_name,prompt,target_true\n"
        '"Washington, D.C.",P36,capital,"Washington, D.C. is the capital of",United States\n',
        encoding="utf-8",
    )
    (f,) = load_facts(str(c))
    assert f.subject == "Washington, D.C." and f.template == "{} is the capital of"
    assert f.relation_name == "capital" and f.target_false is None

    # round trip through to_dict/from_dict and our own JSONL
    out = tmp_path / "round.jsonl"
    out.write_text("\n".join(json.dumps(x.to_dict()) for x in facts))
    assert load_facts(str(out)) == facts
    assert Fact.from_dict(facts[0].to_dict()) == facts[0]
    with pytest.raises(FactscopeError, match=r"missing Fact field\(s\) \['template'\]"):
        Fact.from_dict({k: v for k, v in facts[0].to_dict().items() if k != "template"})
    with pytest.raises(FactscopeError, match="unknown Fact field"):
        Fact.from_dict({**facts[0].to_dict(), "colour": "red"})


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"subject": "A", "prompt": "A is", "target_true": "B"}\n{"subject": "C", "prompt": \n')
    with pytest.raises(FactscopeError, match=r"bad\.jsonl:2: invalid JSON"):
        load_facts(str(p))


@pytest.mark.parametrize(
    "row, msg",
    [
        ({"subject": "Paris", "prompt": "Rome is in", "target_true": "Italy"}, r"bad\.jsonl:1: subject 'Paris' does not occur"),
        ({"subject": "Rome", "prompt": "Rome is in", "target_true": " "}, r"bad\.jsonl:1: empty target_true for subject 'Rome'"),
        ({"subject": "Rome", "prompt": "Rome is in", "target_true": ""}, r"bad\.jsonl:1: empty target_true for subject 'Rome'"),
        ({"subject": "Rome", "target_true": "Italy"}, r"bad\.jsonl:1: .*neither prompt nor template"),
        ({"subject": "Rome", "template": "{} {} is", "target_true": "Italy"}, r"bad\.jsonl:1: template .* exactly once"),
        ({"prompt": "Rome is in", "target_true": "Italy"}, r"bad\.jsonl:1: missing field\(s\) \['subject'\]"),
    ],
)
def test_malformed_rows_name_the_culprit(tmp_path, row, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(row) + "\n")
    with pytest.raises(FactscopeError, match=msg):
        load_facts(str(p))


def test_malformed_csv_row_names_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("subject,prompt,target_true\nRome,Rome is in,Italy\nParis,Rome is in,France\n")
    with pytest.raises(FactscopeError, match=r"bad\.csv:3: subject 'Paris'"):
        load_facts(str(p))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FactscopeError, match="unknown dataset"):
        load_facts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FactscopeError, match="unsupported fact file type '.txt'"):
        load_facts(str(tmp_path / "x.txt"))
    (tmp_path / "b.json").write_text("[1, 2")
    with pytest.raises(FactscopeError, match=r"b\.json:1: invalid JSON"):
        load_facts(str(tmp_path / "b.json"))


def test_lre_file_and_directory_paths(tmp_path):
    d = tmp_path / "rels" / "mine"
    d.mkdir(parents=True)
    rel = {"name": "thing color", "prompt_templates": ["The color of {} is"],
           "properties": {"relation_type": "mine"},
           "samples": [{"subject": "grass", "object": "green"}, {"subject": "sky", "object": "blue"}]}
    (d / "thing_color.json").write_text(json.dumps(rel))
    by_file = load_facts(str(d / "thing_color.json"))
    by_dir = load_facts(str(tmp_path / "rels"))
    assert [f.prompt for f in by_file] == ["The color of grass is", "The color of sky is"]
    assert by_dir[0].relation_id == "mine/thing_color" and by_dir[0].relation_name == "thing color"
    assert [f.target_false for f in by_dir] == ["blue", "green"]


# ------------------------------------------------------------------------------ false targets


def test_add_false_targets_same_relation_seeded_and_order_independent():
    facts = load_facts("lre:factual/country_capital_city")
    bare = [Fact(**{**f.to_dict(), "target_false": None}) for f in facts]
    a = add_false_targets(bare, seed=0)
    objects = {f.target_true for f in facts}
    for f in a:
        assert f.target_false in objects and f.target_false != f.target_true
    assert add_false_targets(bare, seed=0) == a
    assert add_false_targets(bare, seed=1) != a
    shuffled = bare[:]
    random.Random(3).shuffle(shuffled)
    assert sorted(add_false_targets(shuffled, seed=0), key=lambda f: f.id) == sorted(a, key=lambda f: f.id)
    # existing false targets are kept; a relation with one object gets none
    kept = add_false_targets([Fact("x", "r", "r", "{} is", "x is", "A", "B")])
    assert kept[0].target_false == "B"
    lone = add_false_targets([Fact("x", "r", "r", "{} is", "x is", "A"), Fact("y", "r", "r", "{} is", "y is", "a")])
    assert [f.target_false for f in lone] == [None, None]  # "a" is the same object, case aside
    # known_1000: candidates come from the same relation only
    k = load_facts("known_1000")
    by_rel = {}
    for f in k:
        by_rel.setdefault(f.relation_id, set()).add(f.target_true)
    assert all(f.target_false in by_rel[f.relation_id] for f in k if f.target_false)
    assert [f.relation_id for f in k if f.target_false is None] == ["P190"]  # its only record


# ------------------------------------------------------------------------------ subject spans


@pytest.mark.parametrize("name", ["gpt2_tok", "llama_tok"])
def test_subject_span_tricky_cases_tiny(request, name):
    tok = request.getfixturevalue(name)
    bos = 1 if name == "llama_tok" else 0
    cases = [
        ("Émile Zola was born in", "Émile Zola"),
        ("The capital of Brazil is Brasília", "Brasília"),
        ("東京 is in", "東京"),
        ("Washington, D.C. is the capital", "Washington, D.C."),
        ("Toyota is headquartered in", "Toyota"),
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ]
    for prompt, subject in cases:
        s, e = subject_span(tok, prompt, subject)
        ids = tok(prompt)["input_ids"]
        assert bos <= s < e <= len(ids)
        text = tok.decode(ids[s:e])
        assert subject in text, (prompt, text)
        # minimal: dropping the first or last token loses part of the subject
        assert subject not in tok.decode(ids[s + 1 : e]) and subject not in tok.decode(ids[s : e - 1])
        if prompt.startswith(subject):
            assert s == bos


@pytest.mark.realmodel
def test_subject_span_gemma_exact_tokens(gemma_tok):
    t = gemma_tok
    assert subject_span(t, "Émile Zola was born in", "Émile Zola") == (1, 5)  # BOS at 0
    assert toks(t, "Émile Zola was born in", (1, 5)) == ["É", "mile", "▁Z", "ola"]
    p = "The capital of Brazil is Brasília"
    assert toks(t, p, subject_span(t, p, "Brazil")) == ["▁Brazil"]  # "▁" belongs to the subject
    assert toks(t, p, subject_span(t, p, "Brasília")) == ["▁Brasília"]
    p = "Washington, D.C. is the capital of the United States"
    assert toks(t, p, subject_span(t, p, "Washington, D.C.")) == ["Washington", ",", "▁D", ".", "C", "."]
    p = "東京 is in"
    assert toks(t, p, subject_span(t, p, "東京")) == ["東京"]


def test_subject_twice_first_and_last(gpt2_tok, llama_tok):
    p = "Paris is in France. Paris is"
    for tok, bos in ((gpt2_tok, 0), (llama_tok, 1)):
        first = subject_span(tok, p, "Paris", "first")
        last = subject_span(tok, p, "Paris", "last")
        assert first[0] == bos and last[0] > first[1]
        assert "Paris" in tok.decode(tok(p)["input_ids"][last[0] : last[1]])


def test_subject_inside_another_word_is_skipped(gpt2_tok):
    # LRE holds "A cat is in the category of a" and "The sentiment of 'time' is"
    facts = {f.subject: f for f in load_facts("lre:commonsense")}
    cat = facts["cat"]
    assert subject_span(gpt2_tok, cat.prompt, "cat", "last") == subject_span(gpt2_tok, cat.prompt, "cat", "first")
    time_f = facts["time"]
    s, e = subject_span(gpt2_tok, time_f.prompt, "time")
    assert fact_subject_span(gpt2_tok, time_f) == (s, e)
    ids = gpt2_tok(time_f.prompt)["input_ids"]
    assert "sentiment" not in gpt2_tok.decode(ids[s:e])


def test_subject_absent_names_subject(gpt2_tok):
    with pytest.raises(FactscopeError, match="subject 'Berlin' does not occur in prompt 'Paris is in'"):
        subject_span(gpt2_tok, "Paris is in", "Berlin")
    bad = Fact("Berlin", "r", "r", "{} is", "Paris is", "X", id="my-fact-7")
    with pytest.raises(FactscopeError, match="fact 'my-fact-7'"):
        fact_subject_span(gpt2_tok, bad)


def test_fact_spans_match_offset_free_fallback_on_real_facts(gpt2_tok, llama_tok):
    """The prefix-tokenization fallback (slow tokenizers) agrees with the offset mapping."""
    facts = load_facts("known_1000", limit=150, seed=0) + load_facts("lre", limit=150, seed=0)
    for tok in (gpt2_tok, llama_tok):
        for f in facts:
            s = f.subject_start
            span = fact_subject_span(tok, f)
            ids = tok(f.prompt)["input_ids"]
            assert f.subject in tok.decode(ids[span[0] : span[1]]), f
            # offsets recovered by decoding (tokenizers without offset mappings) agree
            assert fact_subject_span(NoOffsets(tok), f) == span, f
            if tok is gpt2_tok:  # "Ġ" leading spaces: the last-resort prefix counting is exact too
                assert F._span_by_prefix(tok, f.prompt, s, s + len(f.subject)) == span, f


@pytest.mark.realmodel
def test_fact_spans_gemma_offsets_and_fallback_agree(gemma_tok):
    facts = load_facts("known_1000", limit=100, seed=3) + load_facts("lre", limit=100, seed=3)
    for f in facts:
        s = f.subject_start
        span = fact_subject_span(gemma_tok, f)
        assert F._span_by_prefix(gemma_tok, f.prompt, s, s + len(f.subject)) == span, f
        assert fact_subject_span(NoOffsets(gemma_tok), f) == span, f
        for target in (f.target_true, f.target_false or "x"):
            assert target_ids(NoOffsets(gemma_tok), f.prompt, target) == target_ids(gemma_tok, f.prompt, target)
        ids = gemma_tok(f.prompt)["input_ids"]
        assert gemma_tok.decode(ids[span[0] : span[1]]).strip() == f.subject, f


# ------------------------------------------------------------------------------ targets


@pytest.mark.parametrize("name", ["gpt2_tok", "llama_tok"])
def test_target_ids_continue_the_prompt(request, name):
    tok = request.getfixturevalue(name)
    cases = [
        ("The capital of France is", "Paris", "The capital of France is Paris"),
        ("The capital of France is ", "Paris", "The capital of France is Paris"),  # merge case
        ("The capital of Brazil is", "Brasília", "The capital of Brazil is Brasília"),
        ("Danielle Darrieux's mother is named", "Jacqueline Darrieux", None),
        ("He lives in Washington", ", D.C.", "He lives in Washington, D.C."),
        ("X is", " Y", "X is Y"),
        ("He was born in ", "New York City", "He was born in New York City"),  # merge, then more tokens
    ]
    for prompt, target, full in cases:
        t = target_ids(tok, prompt, target)
        p = tok(prompt)["input_ids"]
        full = full or f"{prompt} {target}"
        assert tok.decode(p + t, skip_special_tokens=True) == full, (prompt, target)
        # no prompt token leaks into the target: the target's tokens alone decode to (space+)target
        assert tok.decode(t).strip() == target.strip()


@pytest.mark.realmodel
def test_target_ids_gemma_leading_space_convention(gemma_tok):
    t = gemma_tok
    first = lambda p, x: t.convert_ids_to_tokens(target_ids(t, p, x))  # noqa: E731
    assert first("The capital of France is", "Paris") == ["▁Paris"]
    assert first("The capital of France is", " Paris") == ["▁Paris"]
    assert first("The capital of France is ", "Paris") == ["Paris"]  # prompt's "▁" token already there
    ids = target_ids(t, "The mother tongue of Danielle Darrieux is", "Jacqueline Darrieux")
    assert len(ids) > 1 and t.decode(ids) == " Jacqueline Darrieux"
    p = t("The capital of France is")["input_ids"]
    assert p[0] == t.bos_token_id and t("The capital of France is Paris")["input_ids"] == p + target_ids(
        t, "The capital of France is", "Paris")


def test_byte_level_first_token_has_leading_space(gpt2_tok):
    ids = target_ids(gpt2_tok, "The capital of France is", "Paris")
    assert gpt2_tok.convert_ids_to_tokens(ids)[0].startswith("Ġ")
    ids2 = target_ids(gpt2_tok, "The capital of France is ", "Paris")
    assert not gpt2_tok.convert_ids_to_tokens(ids2)[0].startswith("Ġ")


def test_empty_target_is_an_error(gpt2_tok):
    with pytest.raises(FactscopeError, match="empty target"):
        target_ids(gpt2_tok, "The capital of France is", "  ")


def test_target_logprob_is_sum_over_tokens():
    import torch

    from factscope.models import load_model

    m = load_model("tiny-gpt2")
    tok = m.tokenizer
    prompt, target = "The mother tongue of Danielle Darrieux is", "Jacqueline Darrieux"
    t = target_ids(tok, prompt, target)
    p = tok(prompt)["input_ids"]
    assert len(t) > 1
    expected = 0.0
    with torch.no_grad():
        for k in range(len(t)):
            logits = m.hf(input_ids=torch.tensor([p + t[:k]])).logits[0, -1]
            expected += torch.log_softmax(logits.float(), -1)[t[k]].item()
    got = F.target_logprob(m, tok, prompt, target)
    assert got == pytest.approx(expected, abs=1e-4)
    assert got < 0


@pytest.mark.parametrize("name", ["gpt2_tok", "llama_tok"])
def test_tokenizers_without_offsets_use_the_prefix_fallback(request, name):
    tok = request.getfixturevalue(name)
    slow = NoOffsets(tok)
    for prompt, subject in [("Toyota is headquartered in", "Toyota"),
                            ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
                            ("The capital of Brazil is Brasília", "Brasília")]:
        assert subject_span(slow, prompt, subject) == subject_span(tok, prompt, subject)
    for prompt, target in [("The capital of France is", "Paris"), ("Toyota is headquartered in", "Japan")]:
        assert target_ids(slow, prompt, target) == target_ids(tok, prompt, target)
    # the merge case still decodes to the right text
    p = "The capital of France is "
    t = target_ids(slow, p, "Paris")
    assert tok.decode(tok(p)["input_ids"] + t, skip_special_tokens=True) == "The capital of France is Paris"


# ------------------------------------------------------------------------------ CounterFact fetch


def test_fetch_counterfact_offline_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    assert counterfact_path() == tmp_path / "cache" / "counterfact.json"
    with pytest.raises(FactscopeError, match="CounterFact is not downloaded"):
        load_facts("counterfact")
    with pytest.raises(FactscopeError, match="could not download CounterFact from http://127.0.0.1:9/.*offline"):
        fetch_counterfact(url="http://127.0.0.1:9/counterfact.json", timeout=5)
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_counterfact_downloads_atomically(tmp_path, monkeypatch, cf_file):
    sample, n = cf_file
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "counterfact"}')
    with pytest.raises(FactscopeError, match="not CounterFact JSON"):
        fetch_counterfact(url=bad.as_uri())
    for wrong in ("[]", '[{"subject": "Paris", "target_true": "France"}]'):  # JSON lists, but not CounterFact
        bad.write_text(wrong)
        with pytest.raises(FactscopeError, match="not CounterFact JSON"):
            fetch_counterfact(url=bad.as_uri())
    assert list((tmp_path / "cache").iterdir()) == []
    path = fetch_counterfact(url=sample.as_uri())
    assert path == counterfact_path() and path.read_bytes() == sample.read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["counterfact.json"]
    facts = load_facts("counterfact")
    assert len(facts) == n and facts[0].source == "counterfact"
    # explicit cache_dir
    other = fetch_counterfact(url=sample.as_uri(), cache_dir=tmp_path / "other")
    assert other == tmp_path / "other" / "counterfact.json"


def test_data_cli_fetch_offline_message(tmp_path, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    r = CliRunner().invoke(F.data_cli, ["fetch", "counterfact", "--url", "http://127.0.0.1:9/cf.json"])
    assert isinstance(r.exception, FactscopeError) and "offline" in str(r.exception)
    r = CliRunner().invoke(F.data_cli, ["show", "lre:factual/country_capital_city", "--limit", "3"])
    assert r.exit_code == 0
    rows = [json.loads(x) for x in r.output.splitlines()]
    assert len(rows) == 3 and all(x["relation_id"] == "factual/country_capital_city" for x in rows)
