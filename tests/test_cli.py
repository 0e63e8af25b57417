"""The substrate's commands through click's runner (analysis commands are tested with their packages)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from factscope.cli import main


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_predict_json_on_gemma(gemma):
    r = _run("predict", "--json", "--top-k", "3", "The Eiffel Tower is located in the city of")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["model"] == "gemma-3-270m" and out["top"][0]["token"] == " Paris"
    assert len(out["top"]) == 3 and out["top"][0]["prob"] > out["top"][1]["prob"]


def test_unknown_model_is_one_clear_line():
    r = CliRunner().invoke(main, ["predict", "--model", "no-such-model", "x"])
    assert r.exit_code == 2
    assert "error: unknown model 'no-such-model'" in r.output and "Traceback" not in r.output


def test_facts_known_writes_a_run_and_refuses_to_overwrite(tmp_path, gemma):
    out = tmp_path / "known"
    args = ["facts", "known", "--dataset", "known_1000", "--limit", "24", "--out", str(out)]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_facts"] == 24 and 0 < summary["n_known"] <= 24
    known = [json.loads(line) for line in (out / "known.jsonl").read_text().splitlines()]
    assert len(known) == summary["n_known"]
    for name in ("config.json", "known_facts.csv", "known_by_relation.csv", "known_by_relation.png", "report.html"):
        assert (out / name).is_file(), name
    before = (out / "summary.json").read_text()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--resume" in r.output
    assert (out / "summary.json").read_text() == before
    r = _run(*args, "--resume")
    assert r.exit_code == 0 and json.loads((out / "summary.json").read_text())["n_known"] == summary["n_known"]


def test_demo_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "demo"
    r = _run("demo", "--model", "tiny-gpt2", "--limit", "20", "--skip", "flow", "--skip", "hijack",
             "--skip", "lca", "--out", str(out))
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text()
    assert "Facts the model knows" in html and "http://" not in html and "https://" not in html


def test_models_list():
    r = _run("models", "list")
    assert r.exit_code == 0
    assert "gemma-3-270m" in r.output and "tiny-gemma3" in r.output
