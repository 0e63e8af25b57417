"""docs/outputs.md describes every file each analysis writes: the test runs every command on a tiny
model and checks that each file, each top-level config.json and summary.json key and each CSV
column it wrote is named in the command's section, and that each file the page names was written
(rows saying "Written only when" excepted)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from factscope.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
OPTIONAL = "Written only when"
M = ["--model", "tiny-llama", "--no-progress", "--threads", "1"]
# the case studies need facts the model gets wrong: no all_known for them
NEEDS_UNKNOWN = {"circuit hallucination", "circuit icl"}
CIRCUIT_CASE = ["--ablation", "counterfactual", "--edges", "40", "--limit", "8"]
CF_SAMPLE = resources.files("factscope.hijack") / "counterfact_sample.json"
# section of docs/outputs.md -> the commands whose runs it describes
RUNS = {
    "flow": [["flow", "all", *M, "--all-facts", "--limit", "2"]],
    "hijack": [["hijack", "run", *M, "--model", "tiny-gpt2", "--all-facts", "--limit", "3", "--max-prepends", "1",
                "--bootstrap", "5"]],
    "circuit": [["circuit", "discover", *M, "--all-facts", "--limit", "4", "--method", "eap"],
                ["circuit", "evaluate", *M, "--all-facts", "--limit", "8", "--method", "eap", "--random-seeds", "1"]],
    "lca": [["lca", "all", "--quick", "--m", "3", "--steps", "3", "--no-progress", "--threads", "1"]],
    "facts known": [["facts", "known", *M, "--limit", "10"]],
    "trace": [["trace", *M, "--all-facts", "--limit", "2", "--samples", "2", "--window", "2", "--figures", "1"]],
    "edit": [["edit", *M, "--method", "ft-m", "--dataset", str(CF_SAMPLE), "--limit", "2", "--circuits", "1",
              "--edges", "10", "--layer", "1"]],
    "circuit lens": [["circuit", "lens", *M, "--all-facts", "--limit", "6", "--bootstrap", "20"]],
    "circuit roles": [["circuit", "roles", *M, *CIRCUIT_CASE, "--all-facts"]],
    "circuit hallucination": [["circuit", "hallucination", *M, *CIRCUIT_CASE]],
    "circuit icl": [["circuit", "icl", *M, *CIRCUIT_CASE, "--shots", "2"]],
    # every part but lca (its files are lca's, run above); a random model knows no fact, so the
    # test declares every fact known (below) and the flow, hijack and circuit parts run
    "demo": [["demo", *M, "--limit", "12", "--skip", "lca"]],
}


def _sections() -> dict[str, list[tuple[list[str], str]]]:
    """{section title: [(names in the row's first cell, the whole row)]} of docs/outputs.md."""
    out: dict[str, list] = {}
    title = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            out[title] = []
        elif title and line.startswith("| `"):
            first = line.split("|")[1]
            out[title].append((re.findall(r"`([^`]+)`", first), line))
    return out


def _pattern(name: str) -> re.Pattern:
    """A documented name as a regex: `*` and `<placeholder>` stand for any part of a name."""
    parts = re.split(r"(\*|<[^>]+>)", name)
    return re.compile("".join("[^/]+" if p == "*" or p.startswith("<") else re.escape(p) for p in parts))


def _named(row: str, word: str) -> bool:
    """``word`` (a key or column) is named in backticks in ``row``."""
    return any(_pattern(n).fullmatch(word) for n in re.findall(r"`([^`]+)`", row))


def _row(rows, file: str):
    hits = [r for names, r in rows if any(_pattern(n).fullmatch(file) for n in names)]
    return hits[0] if hits else None


@pytest.fixture
def all_known(monkeypatch):
    """Every fact counts as known (tiny random models know none), so the demo runs every part."""
    import factscope.flow.select as S
    import factscope.predict as P

    real = P.known_facts

    def known_facts(model, facts, *a, **k):
        _, table = real(model, facts, *a, **k)
        return list(facts), table.assign(known=True)

    # flow.select binds the name at import: patch it there too, so that no module keeps the fake
    # after the test (it would if it were first imported while the patch is in place)
    for module in (P, S):
        monkeypatch.setattr(module, "known_facts", known_facts)


@pytest.mark.parametrize("section", list(RUNS))
def test_every_output_file_is_documented(tmp_path, section, request):
    if section not in NEEDS_UNKNOWN:
        request.getfixturevalue("all_known")
    sections = _sections()
    assert set(RUNS) | {"Every run"} <= set(sections)
    rows = sections[section] + sections["Every run"]
    written: set[str] = set()
    for i, args in enumerate(RUNS[section]):
        out = tmp_path / f"run{i}"
        r = CliRunner().invoke(main, [*args, "--out", str(out)])
        assert r.exit_code == 0, r.output
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        written |= set(files)
        for f in files:
            row = _row(rows, f)
            assert row is not None, f"{section}: {f} is not in docs/outputs.md"
            if f.endswith(".csv"):
                for col in pd.read_csv(out / f, nrows=1).columns:
                    assert _named(row, col), f"{section}: column {col!r} of {f} is not in its row"
        for name in ("config.json", "summary.json"):
            keys = json.loads((out / name).read_text())
            row_here = _row(sections[section], name) or ""
            row_all = _row(sections["Every run"], name)
            for key in keys:
                assert _named(row_here, key) or (name == "config.json" and _named(row_all, key)), \
                    f"{section}: {name} key {key!r} is not in docs/outputs.md"
    for names, row in sections[section]:
        if OPTIONAL in row:
            continue
        for n in names:
            if "." in n and not any(_pattern(n).fullmatch(f) for f in written):
                pytest.fail(f"{section}: docs/outputs.md names {n}, which the run did not write")
