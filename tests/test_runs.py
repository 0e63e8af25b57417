"""Run directories, checkpoints, atomic writes, the HTML report and the CLI's error handling."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from factscope.cli import FactscopeGroup, main
from factscope.errors import FactscopeError
from factscope.plotting import new_figure
from factscope.runs import Checkpoint, Run, atomic_open

CONFIG = {"command": "test", "model": "tiny-llama", "data": "known_1000", "seed": 0, "layers": [0, 1]}


def _hidden_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name.startswith("."))


def _make_run(tmp_path: Path, n_rows: int = 45) -> Run:
    run = Run.create(tmp_path / "run", CONFIG)
    fig, ax = new_figure()
    ax.plot([0, 1, 2], [0.1, 0.5, 0.2], label="subject")
    ax.legend()
    run.save_figure("curve", fig)
    df = pd.DataFrame({"layer": np.arange(n_rows), "effect": np.linspace(-1, 1, n_rows) / 3,
                       "token": ["<b>tok</b>"] * n_rows})
    run.save_table("effects", df)
    run.update_summary({"accuracy": 0.712345678, "n_facts": 45, "peak": {"layer": 7}})
    run.add_section("main", "Main result", "First paragraph <script>alert(1)</script>.\nSame paragraph.\n\n- a **bold** item",
                    figures=["curve"], tables=["effects"])
    run.write_report()
    return run


# ---- Run.create / resume -------------------------------------------------------------------


def test_create_writes_config_with_versions_and_timestamp(tmp_path):
    run = Run.create(tmp_path / "out", {**CONFIG, "layers": (0, 1), "path": tmp_path / "x"})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model"] == "tiny-llama" and cfg["seed"] == 0
    assert cfg["layers"] == [0, 1] and cfg["path"] == str(tmp_path / "x")
    assert set(cfg["versions"]) >= {"python", "torch", "transformers", "factscope"}
    assert cfg["versions"]["torch"]  # installed, so known
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cfg["created_utc"])
    assert run.config == cfg


def test_existing_empty_dir_is_fine(tmp_path):
    (tmp_path / "out").mkdir()
    Run.create(tmp_path / "out", CONFIG)
    assert (tmp_path / "out" / "config.json").is_file()


def test_nonempty_dir_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FactscopeError) as e:
        Run.create(out, CONFIG)
    msg = str(e.value)
    assert str(out) in msg and "--resume" in msg
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # a non-run directory cannot be resumed into either
    with pytest.raises(FactscopeError, match="not a factscope run"):
        Run.create(out, CONFIG, resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_previous_run_dir_is_refused_without_resume(tmp_path):
    Run.create(tmp_path / "out", CONFIG)
    before = (tmp_path / "out" / "config.json").read_bytes()
    with pytest.raises(FactscopeError, match="already exists and is not empty"):
        Run.create(tmp_path / "out", CONFIG)
    assert (tmp_path / "out" / "config.json").read_bytes() == before


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FactscopeError, match="not a directory"):
        Run.create(tmp_path / "f", CONFIG)


def test_resume_with_matching_config_keeps_work(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    run.checkpoint("units").append("a", {"v": 1.5})
    run.save_table("t", pd.DataFrame({"x": [1, 2]}))
    # same config (tuple instead of list, different runtime settings): resumable
    again = Run.create(tmp_path / "out", {**CONFIG, "layers": (0, 1), "runtime": {"device": "cuda"}}, resume=True)
    assert again.checkpoint("units").done() == {"a"}
    assert again.load_table("t")["x"].tolist() == [1, 2]
    assert again.config["created_utc"] == run.config["created_utc"]
    assert len(again.config["resumed_utc"]) == 1
    # the runtime settings of the resumed run are recorded (not compared)
    assert again.config["runtime"] == {"device": "cuda"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["runtime"] == {"device": "cuda"}


def test_reserved_config_keys_are_refused(tmp_path):
    for key in ("versions", "created_utc", "resumed_utc"):
        with pytest.raises(ValueError, match=key):
            Run.create(tmp_path / key, {**CONFIG, key: "mine"})
        assert not (tmp_path / key).exists()


def test_resume_with_different_config_names_the_keys(tmp_path):
    Run.create(tmp_path / "out", CONFIG)
    with pytest.raises(FactscopeError) as e:
        Run.create(tmp_path / "out", {**CONFIG, "seed": 1, "extra": True}, resume=True)
    msg = str(e.value)
    assert "seed: was 0 in the existing run, now 1" in msg
    assert "extra" in msg
    assert "model" not in msg and "layers" not in msg  # only the differing keys


def test_resume_into_missing_dir_creates_it(tmp_path):
    run = Run.create(tmp_path / "new", CONFIG, resume=True)
    assert (run.dir / "config.json").is_file()


def test_resume_removes_stale_temp_files(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    stale = run.dir / ".effects.csv.abc123.tmp"
    stale.write_text("half a tab")
    Run.create(tmp_path / "out", CONFIG, resume=True)
    assert not stale.exists()


def test_open_requires_a_run(tmp_path):
    with pytest.raises(FactscopeError, match="not a directory"):
        Run.open(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(FactscopeError, match="no config.json"):
        Run.open(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{broken")
    with pytest.raises(FactscopeError, match=r"config.json is not valid JSON"):
        Run.open(tmp_path / "d")


# ---- tables, figures, summary --------------------------------------------------------------


def test_table_round_trip_is_exact(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "x": rng.normal(size=50) * 1e-7,
        "y": rng.random(50),
        "i": np.arange(50),
        "s": ["None", "NA", "null", "nan", "Paris"] * 10,  # real answers, not missing values
    })
    path = run.save_table("t", df)
    assert path == run.dir / "t.csv"
    back = run.load_table("t")
    pd.testing.assert_frame_equal(back, df)
    assert run.load_table("absent") is None


def test_table_keeps_a_meaningful_index(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    df = pd.DataFrame({"v": [0.5, 0.25]}, index=pd.Index(["a", "b"], name="relation"))
    run.save_table("t", df)
    assert run.load_table("t").to_dict("list") == {"relation": ["a", "b"], "v": [0.5, 0.25]}


def test_bad_names_are_rejected(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    for bad in ("../evil", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            run.save_table(bad, pd.DataFrame({"x": [1]}))
    assert not (tmp_path / "evil.csv").exists()


def test_summary_merges_and_converts_numpy(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    run.update_summary({"a": np.float32(0.5), "b": np.int64(3)})
    run.update_summary({"b": 4, "c": [np.float64(0.1)]})
    assert json.loads((run.dir / "summary.json").read_text()) == {"a": 0.5, "b": 4, "c": [0.1]}


def test_writes_leave_no_temp_files(tmp_path):
    run = _make_run(tmp_path)
    run.checkpoint("c").append(1, {"x": 1.0})
    assert _hidden_files(run.dir) == []
    names = sorted(p.name for p in run.dir.iterdir())
    assert names == ["checkpoints", "config.json", "curve.plotly.json", "curve.png", "effects.csv", "report.html",
                     "sections.json", "summary.json"]
    assert (run.dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # atomic writes give ordinary permissions (mkstemp's 0600 would hide results from others)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "curve.png", "effects.csv", "report.html"):
        assert (run.dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("new and half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_killed_process_never_leaves_a_half_written_table(tmp_path):
    """A process that dies hard (os._exit) while saving leaves the previous complete file."""
    out = tmp_path / "out"
    run = Run.create(out, CONFIG)
    run.save_table("t", pd.DataFrame({"x": [1, 2, 3]}))
    script = textwrap.dedent(f"""
        import os, pandas as pd
        from factscope.runs import Run
        run = Run.open({str(out)!r})
        os.replace = lambda *a, **k: os._exit(9)   # die between writing the temp file and renaming it
        run.save_table("t", pd.DataFrame({{"x": list(range(100000))}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert run.load_table("t")["x"].tolist() == [1, 2, 3]
    # the orphaned temp file is hidden and not a table; resuming cleans it up
    assert run.tables() == ["t"]
    Run.create(out, CONFIG, resume=True)
    assert _hidden_files(out) == []


# ---- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trips_exactly(tmp_path):
    ck = Checkpoint(tmp_path / "c.jsonl")
    values = {"a": 0.1 + 0.2, "b": 1e-300, "c": np.float32(1 / 3), "d": float("nan"), "e": [1.0 / 7, 2],
              "f": -0.0, "s": "ünïcode"}
    ck.append(("Paris", 3), values)
    ck.append(7, {"a": 2.5})
    again = Checkpoint(tmp_path / "c.jsonl")
    assert again.done() == {("Paris", 3), 7}
    rec = again.records()[0]
    assert rec["key"] == ("Paris", 3)
    assert rec["a"] == 0.1 + 0.2 and rec["b"] == 1e-300 and rec["c"] == float(np.float32(1 / 3))
    assert math.isnan(rec["d"]) and rec["e"] == [1.0 / 7, 2] and math.copysign(1, rec["f"]) == -1
    assert rec["s"] == "ünïcode"
    assert ("Paris", 3) in again and ["Paris", 3] in again
    assert again.get(7) == {"key": 7, "a": 2.5}
    assert len(again) == 2


def test_checkpoint_drops_truncated_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    ck = Checkpoint(path)
    ck.append("a", {"x": 1.0})
    ck.append("b", {"x": 2.0})
    good = path.read_bytes()
    with open(path, "ab") as f:  # killed in the middle of writing record "c"
        f.write(b'{"key": "c", "x": 3.00')
    ck2 = Checkpoint(path)
    assert ck2.done() == {"a", "b"}
    assert path.read_bytes() == good  # partial line removed from the file
    ck2.append("c", {"x": 3.0})
    assert [r["key"] for r in Checkpoint(path).records()] == ["a", "b", "c"]


def test_checkpoint_drops_complete_json_without_newline(tmp_path):
    # a last line that happens to parse but lacks its newline is also an interrupted write
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"key": "a", "x": 1}\n{"key": "b", "x": 12}')
    ck = Checkpoint(path)
    assert ck.done() == {"a"}
    ck.append("b", {"x": 123})
    assert Checkpoint(path).get("b")["x"] == 123


def test_checkpoint_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"key": "a"}\nGARBAGE\n{"key": "b"}\n')
    with pytest.raises(FactscopeError, match=r"c.jsonl is corrupt at line 2"):
        Checkpoint(path)


def test_checkpoint_rejects_duplicates_and_bad_records(tmp_path):
    ck = Checkpoint(tmp_path / "c.jsonl")
    ck.append("a", {"x": 1})
    with pytest.raises(ValueError, match="already recorded"):
        ck.append("a", {"x": 2})
    with pytest.raises(ValueError, match="'key'"):
        ck.append("b", {"key": 1})
    with pytest.raises(TypeError):
        ck.append("c", {"x": object()})
    assert Checkpoint(tmp_path / "c.jsonl").records() == [{"key": "a", "x": 1}]


def test_run_checkpoint_location(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    ck = run.checkpoint("knockout")
    ck.append(0, {})
    assert (run.dir / "checkpoints" / "knockout.jsonl").read_text() == '{"key": 0}\n'


# ---- sections and report -------------------------------------------------------------------


def test_add_section_is_idempotent_and_keeps_order(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    run.add_section("a", "A", "one")
    run.add_section("b", "B", "two", figures=["fig.png"], tables=[{"name": "t", "caption": "cap"}])
    run.add_section("a", "A2", "one again")
    secs = json.loads((run.dir / "sections.json").read_text())
    assert [s["key"] for s in secs] == ["a", "b"]
    assert secs[0]["title"] == "A2" and secs[0]["text"] == "one again"
    assert secs[1]["figures"] == [{"name": "fig", "caption": ""}]
    assert secs[1]["tables"] == [{"name": "t", "caption": "cap"}]


def test_interactive_report_loads_nothing(tmp_path):
    """The interactive page: Plotly's bundle and the figure's data are inline scripts; nothing
    outside them names a URL, nothing has a src but data URIs."""
    run = _make_run(tmp_path)
    html = (run.dir / "report.html").read_text()
    assert html.count('<script type="application/json" class="plotly-spec">') == 1
    assert "<script src" not in html and "Plotly.newPlot" in html
    outside = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)
    assert "http://" not in outside and "https://" not in outside
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', outside))
    spec = json.loads(re.search(r'class="plotly-spec">(.*?)</script>', html, re.S).group(1))
    assert spec == json.loads((run.dir / "curve.plotly.json").read_text())
    assert run.write_report(static=True).read_text().count("<script") == 0


def test_report_is_self_contained(tmp_path):
    run = _make_run(tmp_path)
    html = run.write_report(static=True).read_text()
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html  # section text is escaped, and the page has no scripts
    assert "<p>First paragraph &lt;script&gt;alert(1)&lt;/script&gt;.<br>\nSame paragraph.</p>" in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert all(h.startswith("#") or h.startswith("data:") for h in hrefs), hrefs
    assert re.search(r'<img [^>]*alt="Main result: curve"', html)
    # table: at most 30 rows shown, with a note, numbers shortened, cells escaped
    table = re.search(r"<table.*?</table>", html, re.S).group(0)
    assert table.count("<tr>") == 1 + 30
    assert "first 30 of 45 rows; full table in <code>effects.csv</code>" in html
    assert ">-0.3333<" in table  # -1/3 to 4 significant digits
    assert "&lt;b&gt;tok&lt;/b&gt;" in table
    # summary and config
    assert "0.7123" in html and "peak.layer" in html
    assert "tiny-llama" in html and "known_1000" in html and "torch" in html
    assert "<strong>bold</strong>" in html and "<li>" in html
    # config rows: the head keys in their order, then the other defining keys, then runtime ones
    labels = re.findall(r"<dt>([^<]+)</dt>", re.search(r'id="config".*?</dl>', html, re.S).group(0))
    assert labels == ["command", "model", "data", "seed", "layers", "created"], labels
    assert 'href="#sec-main"' in html and 'id="sec-main"' in html


# tags the page itself uses; anything else in the HTML came from data that was not escaped
_PAGE_TAGS = {"html", "head", "meta", "title", "link", "style", "body", "main", "header", "h1", "h2", "h3", "div",
              "nav", "strong", "ol", "ul", "li", "a", "p", "dl", "dt", "dd", "section", "figure", "img", "figcaption",
              "span", "details", "summary", "table", "caption", "thead", "tbody", "tr", "th", "td", "code", "br", "footer"}


def test_report_escapes_captions_summary_config_and_files(tmp_path):
    """Every place that shows run data escapes it: figure and table captions (and the img alt),
    summary keys and values (cards and the long list), config values, file names and the directory."""
    evil = 'r<i>&"x'
    run = Run.create(tmp_path / evil, {**CONFIG, "runtime": {"device": "cpu"}, "model": "<u>m</u>", "note": "<blink>cfg</blink>"})
    fig, ax = new_figure()
    ax.plot([0, 1], [0, 1])
    run.save_figure("curve", fig)
    run.save_table("effects", pd.DataFrame({"x": [1.5]}))
    run.update_summary({"short": "<em>s</em>", "long": "<script>alert('x')</script> " + "and more words " * 3,
                        "k<marquee>": 1, "nested": {"v": "<i>n</i>"}})
    run.add_section("main", "S <blink>t</blink>", "", figures=[{"name": "curve", "caption": "<em>cap</em> & more"}],
                    tables=[{"name": "effects", "caption": "<u>tab</u> caption"}])
    (run.dir / "x<y>&.json").write_text("{}")
    interactive = run.write_report().read_text()
    assert 'aria-label="S &lt;blink&gt;t&lt;/blink&gt;: &lt;em&gt;cap&lt;/em&gt; &amp; more"' in interactive
    html = run.write_report(static=True).read_text()
    # scripts are the page's own (Plotly's bundle and the figures' JSON, whose "</" are escaped)
    specs = re.findall(r'<script type="application/json" class="plotly-spec">(.*?)</script>', interactive, re.S)
    assert specs and all("</" not in x for x in specs)
    for page in (html, re.sub(r"<script[^>]*>.*?</script>", "", interactive, flags=re.S)):
        tags = {t.lower() for t in re.findall(r"<\s*/?\s*([A-Za-z][A-Za-z0-9]*)", page)}
        assert tags <= _PAGE_TAGS, tags - _PAGE_TAGS
    assert "<figcaption>&lt;em&gt;cap&lt;/em&gt; &amp; more" in html
    assert 'alt="S &lt;blink&gt;t&lt;/blink&gt;: &lt;em&gt;cap&lt;/em&gt; &amp; more"' in html
    assert "<h3>&lt;u&gt;tab&lt;/u&gt; caption</h3>" in html
    assert '<div class="v">&lt;em&gt;s&lt;/em&gt;</div>' in html
    assert "<dd>&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; and more" in html
    assert html.count("alert(&#x27;x&#x27;)") == 1  # long values in the list only, not also in a card
    assert '<div class="k">K&lt;marquee&gt;</div>' in html and 'title="k&lt;marquee&gt;"' in html
    assert "&lt;i&gt;n&lt;/i&gt;" in html
    assert "&lt;u&gt;m&lt;/u&gt;" in html and "&lt;blink&gt;cfg&lt;/blink&gt;" in html
    assert "<dt>x&lt;y&gt;&amp;.json</dt>" in html
    assert "r&lt;i&gt;&amp;&quot;x" in html  # the directory in the subtitle, the files block and the footer
    # config rows: head keys in their order, other defining keys, then run-time settings, then times
    labels = re.findall(r"<dt>([^<]+)</dt>", re.search(r'id="config".*?</dl>', html, re.S).group(0))
    assert labels == ["command", "model", "data", "seed", "layers", "note", "runtime", "created"], labels


def test_report_files_block_counts_only_finished_checkpoint_lines(tmp_path):
    """A torn last checkpoint line (killed mid-write) is not a finished unit, whether or not it
    parses; rendering the report does not touch the checkpoint."""
    run = Run.create(tmp_path / "out", CONFIG)
    ck = run.checkpoint("units")
    for k in ("a", "b"):
        ck.append(k, {"x": 1.0})
    torn = run.dir / "checkpoints" / "units.jsonl"
    with open(torn, "ab") as f:
        f.write(b'{"key": "c", "x": 3.0')
    (run.dir / "checkpoints" / "one.jsonl").write_bytes(b'{"key": "a"}\n{"key": "b"}')  # parses, no newline
    (run.dir / "checkpoints" / "none.jsonl").write_bytes(b"")
    before = torn.read_bytes()
    html = run.write_report().read_text()
    assert "<dt>checkpoints/units.jsonl</dt><dd>2 finished units</dd>" in html
    assert "<dt>checkpoints/one.jsonl</dt><dd>1 finished unit</dd>" in html
    assert "<dt>checkpoints/none.jsonl</dt><dd>0 finished units</dd>" in html
    assert torn.read_bytes() == before
    assert Checkpoint(torn).done() == {"a", "b"}  # the same count a resume sees


def test_report_table_limits_and_unique_anchors(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    run.save_table("exact", pd.DataFrame({"x": range(30)}))
    run.save_table("long", pd.DataFrame({"text": ["y" * 300]}))
    # three section keys with the same slug, and one that collides with a page anchor
    for key in ("a b", "a-b", "a_b", "summary"):
        run.add_section(key, f"S {key}", "", tables=["exact"] if key == "a b" else ["long"] if key == "a-b" else [])
    html = run.write_report().read_text()
    assert "30 rows, 1 column; <code>exact.csv</code>" in html and "first 30 of 30" not in html
    cell = re.search(r"<td title=\"(y+)\">(y+)…</td>", html)
    assert cell and len(cell.group(1)) == 300 and len(cell.group(2)) == 119
    ids = re.findall(r'id="([^"]+)"', html)
    assert len(ids) == len(set(ids)), ids
    assert {"sec-a-b", "sec-a-b-2", "sec-a-b-3", "sec-summary"} <= set(ids)
    for a in re.findall(r'<a href="#([^"]+)"', html):
        assert a in ids


def test_report_marks_missing_files_instead_of_failing(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    run.add_section("s", "S", "", figures=["nofig"], tables=["notab"])
    html = run.write_report().read_text()
    assert "figure nofig.png is missing" in html and "table notab.csv is missing" in html


def test_report_without_sections_shows_all_files(tmp_path):
    run = Run.create(tmp_path / "out", CONFIG)
    run.save_table("orphan", pd.DataFrame({"x": [0.123456]}))
    html = run.write_report().read_text()
    assert "orphan.csv" in html and ">0.1235<" in html


def test_format_number():
    from factscope.report import format_number

    assert format_number(0.123456) == "0.1235"
    assert format_number(12345.678) == "12346"
    assert format_number(3.0) == "3"
    assert format_number(1.5e-7) == "1.500e-07"
    assert format_number(float("nan")) == "NaN"
    assert format_number(True) == "True"
    assert (format_number(float("inf")), format_number(float("-inf"))) == ("∞", "−∞")


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_report_rerenders(tmp_path):
    run = _make_run(tmp_path)
    (run.dir / "report.html").unlink()
    run.update_summary({"added_later": 42})
    res = CliRunner().invoke(main, ["report", str(run.dir), "--title", "My title"])
    assert res.exit_code == 0, res.output
    html = (run.dir / "report.html").read_text()
    assert "<title>My title</title>" in html and "added_later" in html
    assert "data:image/png;base64," in html


def test_cli_report_rejects_non_run_without_traceback(tmp_path):
    run = _make_run(tmp_path)
    before = (run.dir / "report.html").read_bytes()
    (tmp_path / "plain").mkdir()
    res = CliRunner().invoke(main, ["report", str(run.dir), str(tmp_path / "plain")])
    assert res.exit_code == 2
    assert f"error: {tmp_path / 'plain'} is not a factscope run" in res.output
    assert "Traceback" not in res.output
    assert (run.dir / "report.html").read_bytes() == before  # nothing rendered before the check


def test_factscope_error_exits_2_with_message_only():
    @click.group(cls=FactscopeGroup)
    def grp():
        pass

    @grp.group()
    def sub():
        pass

    @sub.command()
    def deep():
        def inner():
            raise FactscopeError("model 'nope' not found; try one of: tiny-llama")
        inner()

    res = CliRunner().invoke(grp, ["sub", "deep"])
    assert res.exit_code == 2
    assert res.output == "error: model 'nope' not found; try one of: tiny-llama\n"
    assert not isinstance(res.exception, FactscopeError)


def test_lazy_commands_are_not_imported_for_help_and_broken_ones_fail_cleanly():
    @click.group(cls=FactscopeGroup)
    def grp():
        pass

    grp.add_lazy_command("broken", "factscope._no_such_module_xyz:cli", "A broken analysis.")
    grp.add_lazy_command("works", "factscope.cli:main", "Nested main.")
    runner = CliRunner()
    res = runner.invoke(grp, ["--help"])
    assert res.exit_code == 0
    assert "broken" in res.output and "A broken analysis." in res.output
    assert "factscope._no_such_module_xyz" not in sys.modules
    res = runner.invoke(grp, ["broken", "--some-flag", "x"])
    assert res.exit_code == 2
    assert "the 'broken' command is unavailable" in res.output and "ModuleNotFoundError" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(grp, ["works", "--version"])
    assert res.exit_code == 0 and "0.1.0" in res.output


def test_version_and_help():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and "factscope" in res.output
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "report" in res.output


def test_entry_point_process_exit_code_and_stderr(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from factscope.cli import main; main()", "report", str(tmp_path / "missing")],
        capture_output=True, text=True, env={**os.environ, "FACTSCOPE_DEBUG": ""},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'} is not a directory (expected a factscope run directory)"
    assert proc.stdout == ""


# ---- resuming a long computation -----------------------------------------------------------


def _analysis(out: Path, resume: bool, stop_after: int | None = None) -> Run:
    """A toy analysis in the pattern the real ones use: checkpoint per unit, table at the end."""
    run = Run.create(out, CONFIG, resume=resume)
    ck = run.checkpoint("units")
    keys = [("fact", i) for i in range(10)]
    for n, key in enumerate(ck.pending(keys)):
        if stop_after is not None and n == stop_after:
            raise KeyboardInterrupt
        rng = np.random.default_rng(key[1])
        ck.append(key, {"value": float(rng.normal() / 3), "unit": key[1]})
    run.save_table("result", pd.DataFrame([{k: v for k, v in r.items() if k != "key"} for r in ck.records()]))
    return run


def test_interrupted_and_resumed_run_gives_identical_results(tmp_path):
    full = _analysis(tmp_path / "full", resume=False)
    with pytest.raises(KeyboardInterrupt):
        _analysis(tmp_path / "part", resume=False, stop_after=4)
    part = Run.open(tmp_path / "part")
    assert part.checkpoint("units").done() == {("fact", i) for i in range(4)}
    assert part.load_table("result") is None
    with pytest.raises(FactscopeError, match="--resume"):
        _analysis(tmp_path / "part", resume=False)
    resumed = _analysis(tmp_path / "part", resume=True)
    assert (resumed.dir / "result.csv").read_bytes() == (full.dir / "result.csv").read_bytes()
    assert resumed.checkpoint("units").pending([("fact", 3), ("fact", 99)]) == [("fact", 99)]


def test_keyboard_interrupt_suggests_resume():
    @click.group(cls=FactscopeGroup)
    def grp():
        pass

    @grp.command()
    def work():
        raise KeyboardInterrupt

    res = CliRunner().invoke(grp, ["work"])
    assert res.exit_code == 130
    assert "--resume" in res.output and "Traceback" not in res.output
