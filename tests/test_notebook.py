"""The analyses called from Python (factscope.notebook): the same numbers as the CLI, result objects
that read the run back, nothing left behind by a failing call, and the docs notebook executed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import factscope.circuits
import factscope.flow
import factscope.hijack
import factscope.lca
import factscope.trace
from factscope.cli import main
from factscope.errors import FactscopeError
from factscope.findings import Claim
from factscope.runs import Run

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> None:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


def test_flow_knockout_equals_the_cli(tmp_path):
    """The same facts, curves and per-fact numbers as `factscope flow knockout` with the same options
    (a wrapper that dropped an option or chose other facts would differ)."""
    _cli("flow", "knockout", "--model", "tiny-llama", "--dataset", "known_1000", "--limit", "5", "--all-facts",
         "--window", "2", "--seed", "3", "--out", str(tmp_path / "cli"), "--no-progress")
    cli = Run.open(tmp_path / "cli")
    res = factscope.flow.knockout("tiny-llama", "known_1000", limit=5, seed=3, known_only=False, window=2,
                                  progress=False)
    for name in ("facts", "knockout", "knockout_facts"):
        _same_table(res.tables[name], cli.load_table(name))
    assert res.summary == cli.summary["knockout"]
    assert res.table.equals(res.tables["knockout"])
    sec = next(s for s in cli.sections if s["key"] == "knockout")
    assert res.findings == sec["findings"] and res.findings
    assert [c.to_dict() for c in res.claims] == sec["claims"] and all(isinstance(c, Claim) for c in res.claims)
    for k in ("analysis", "model", "dataset", "limit", "seed", "known_only", "window"):
        assert res.run.config[k] == cli.config[k], k


def test_the_plot_is_the_reports_figure_and_holds_the_tables_numbers():
    import plotly.graph_objects as go

    res = factscope.flow.knockout("tiny-gpt2", limit=4, known_only=False, progress=False)
    fig = res.plot()
    assert isinstance(fig, go.Figure)
    sub = res.table[res.table["set"] == "subject"].sort_values("layer")
    line = next(t for t in fig.data if t.name and t.name.startswith("subject") and t.mode and "lines" in t.mode)
    assert list(line.y) == pytest.approx(sub["mean"].tolist())
    with pytest.raises(FactscopeError, match="no figure 'nope'"):
        res.plot("nope")
    from factscope.report import esc

    html = res._repr_html_()
    assert all(esc(c.claim) in html and esc(c.this_model) in html for c in res.claims) and res.claims
    assert "data:image/png;base64," in html and "Attention knockout" in html


def test_save_writes_the_run_directory_and_refuses_a_used_one(tmp_path):
    res = factscope.flow.extraction("tiny-llama", limit=3, known_only=False, progress=False, heads=False)
    out = res.save(tmp_path / "saved")
    saved = Run.open(out)
    assert (out / "report.html").is_file()
    assert sorted(saved.tables()) == sorted(res.run.tables())
    assert saved.summary == res.run.summary and saved.sections == res.run.sections
    with pytest.raises(FactscopeError, match="not an empty directory"):
        res.save(out)


def test_out_names_the_run_directory_and_a_failing_call_leaves_nothing(tmp_path):
    res = factscope.flow.heads("tiny-llama", limit=2, known_only=False, progress=False, out=tmp_path / "h")
    assert res.dir == tmp_path / "h" and (res.dir / "heads.csv").is_file()
    with pytest.raises(FactscopeError, match="unknown option.*'windw'.*window"):
        factscope.flow.knockout("tiny-llama", limit=2, known_only=False, progress=False, windw=2, out=tmp_path / "bad")
    with pytest.raises(FactscopeError, match="unknown option.*'windw'"):
        factscope.flow.sublayer("tiny-llama", limit=2, known_only=False, progress=False, windw=2, out=tmp_path / "bad")
    with pytest.raises(FactscopeError, match="limit must be at least 1"):
        factscope.flow.knockout("tiny-llama", limit=0, progress=False, out=tmp_path / "bad")
    with pytest.raises(FactscopeError, match="knows none"):  # fails after the run directory was created
        factscope.flow.knockout("tiny-llama", [], progress=False, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FactscopeError):
        factscope.flow.knockout("tiny-llama", "no-such-dataset", limit=2, progress=False, out=tmp_path / "bad2")
    assert not (tmp_path / "bad2").exists()


def test_a_list_of_facts_is_analysed_as_given(tmp_path):
    from factscope.facts import load_facts

    facts = load_facts("known_1000", limit=4, seed=1)
    res = factscope.flow.knockout("tiny-llama", facts, limit=None, known_only=False, progress=False)
    assert sorted(res.tables["facts"]["subject"]) == sorted(f.subject for f in facts if f.subject in
                                                            set(res.tables["facts"]["subject"]))
    assert res.summary["n_facts"] + res.summary["n_skipped"] == len(res.tables["facts"])
    assert "facts given in Python" in res.run.config["dataset"]


def test_the_calls_need_no_import_of_their_modules():
    import subprocess
    import sys

    code = ("import factscope.flow, factscope.trace, factscope.circuits, factscope.hijack, factscope.lca, "
            "factscope.edit; fs = [factscope.flow.knockout, factscope.flow.heads, factscope.trace.run, factscope.circuits.lens, "
            "factscope.circuits.evaluate, factscope.circuits.discover, factscope.hijack.run, factscope.lca.run, "
            "factscope.edit.run, factscope.circuits.hallucination, factscope.circuits.icl, "
            "factscope.circuits.roles]; "
            "assert all(map(callable, fs))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_modules_stay_modules():
    from factscope.circuits.lens import run_lens
    from factscope.flow.knockout import run_knockout

    assert factscope.flow.knockout.run_knockout is run_knockout
    assert factscope.circuits.lens.run_lens is run_lens
    assert callable(factscope.flow.sublayer) and callable(factscope.circuits.evaluate)


def test_hijack_equals_the_cli(tmp_path):
    _cli("hijack", "run", "--model", "tiny-qwen2", "--dataset", "counterfact-sample", "--limit", "6",
         "--all-facts", "--max-prepends", "2", "--bootstrap", "50", "--scheme", "generic", "--scheme", "reverse",
         "--out", str(tmp_path / "cli"), "--no-progress")
    cli = Run.open(tmp_path / "cli")
    res = factscope.hijack.run("tiny-qwen2", "counterfact-sample", limit=6, known_only=False, max_prepends=2,
                               n_boot=50, progress=False)
    for name in ("hijack_results", "hijack_efficacy"):
        _same_table(res.tables[name], cli.load_table(name))
    assert res.table.equals(res.tables["hijack_efficacy"])
    assert res.summary == cli.summary["hijack"]


def test_circuit_evaluate_equals_the_cli(tmp_path):
    _cli("circuit", "evaluate", "--model", "tiny-llama", "--limit", "8", "--all-facts", "--random-seeds", "2",
         "--no-curve", "--method", "eap", "--out", str(tmp_path / "cli"), "--no-progress")
    cli = Run.open(tmp_path / "cli")
    res = factscope.circuits.evaluate("tiny-llama", limit=8, known_only=False, n_random=2, curve=False, method="eap",
                                      progress=False)
    _same_table(res.table, cli.load_table("circuit_eval"))
    _same_table(res.tables["circuit_scores"], cli.load_table("circuit_scores"))
    assert res.summary == cli.summary["circuit"]


def test_lens_discover_and_lca_return_their_tables(tmp_path):
    lens = factscope.circuits.lens("tiny-gemma3", limit=3, known_only=False, n_boot=20, progress=False)
    assert set(lens.tables) >= {"lens", "lens_by_layer", "known_facts"} and "median_rank_output" in lens.summary
    disc = factscope.circuits.discover("tiny-gemma3", limit=3, known_only=False, method="eap", progress=False)
    g = factscope.circuits.Graph.from_json(disc.dir / "graph.json")
    assert int(g.in_graph.sum()) == int(disc.table["in_circuit"].sum()) == disc.summary["n_edges"]
    lca = factscope.lca.run(["value_matrix"], quick=True, steps=5, progress=False)
    assert lca.tables["lca_value_matrix"] is not None and lca.findings
    assert json.loads((lca.dir / "config.json").read_text())["steps"] == 5


def test_the_docs_notebook_runs_on_a_tiny_model():
    """docs/walkthrough.ipynb executed top to bottom (nbclient) with its parameters cell set to a tiny
    model: every cell runs, and each paper's part shows its result."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (pip install -e '.[test]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel not installed (pip install -e '.[test]')")
    nb = nbformat.read(ROOT / "docs" / "walkthrough.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs one cell tagged 'parameters'"
    params[0].source = 'MODEL = "tiny-llama"\nN_FACTS = 8\nKNOWN_ONLY = False\nLCA = {"quick": True, "steps": 10}\nPROGRESS = False'
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    shown = [c.get("outputs", []) for c in nb.cells if c.cell_type == "code"]
    assert all(shown[2:]), "every analysis cell shows its result"
    text = json.dumps(shown)
    for part in ("Attention knockout", "holds", "median rank", "hit10", ": ES ", "LCA 1", "report.html"):
        assert part in text, part


def test_trace_equals_the_cli(tmp_path):
    _cli("trace", "--model", "tiny-gemma3", "--limit", "3", "--all-facts", "--samples", "2", "--window", "2",
         "--figures", "1", "--kind", "mlp", "--seed", "2", "--out", str(tmp_path / "cli"), "--no-progress")
    cli = Run.open(tmp_path / "cli")
    res = factscope.trace.run("tiny-gemma3", limit=3, known_only=False, samples=2, window=2, n_figures=1,
                              kinds=["mlp"], seed=2, progress=False)
    for name in ("facts", "trace", "trace_average"):
        _same_table(res.tables[name], cli.load_table(name))
    assert res.table.equals(res.tables["trace_average"]) and res.summary == cli.summary["trace"]
    with pytest.raises(FactscopeError, match="unknown option.*'sample'"):
        factscope.trace.run("tiny-gemma3", limit=3, known_only=False, sample=2)


def test_edit_equals_the_cli(tmp_path):
    from importlib import resources

    import factscope.edit

    cf = str(resources.files("factscope.hijack") / "counterfact_sample.json")
    _cli("edit", "--model", "tiny-llama", "--method", "ft-m", "--dataset", cf, "--limit", "2", "--circuits", "1",
         "--edges", "10", "--layer", "1", "--out", str(tmp_path / "cli"), "--no-progress")
    cli = Run.open(tmp_path / "cli")
    res = factscope.edit.run("tiny-llama", cf, method="ft-m", limit=2, circuit_cases=1, circuit_edges=10, layer=1,
                             progress=False)
    for name in cli.tables():
        _same_table(res.tables[name], cli.load_table(name))
    assert res.table.equals(res.tables["edits"]) and res.summary == cli.summary["edit"]
    for k in ("method", "layer", "circuits", "edges", "hparams", "dataset", "limit", "seed"):
        assert res.run.config[k] == cli.config[k], k


@pytest.mark.parametrize("command", ["hallucination", "icl", "roles"])
def test_circuit_case_studies_equal_the_cli(tmp_path, command):
    args = ["--model", "tiny-llama", "--ablation", "counterfactual", "--edges", "40", "--limit", "8", "--no-progress"]
    extra = {"icl": ["--shots", "2", "--known-top-k", "1"], "roles": ["--all-facts"]}.get(command, [])
    _cli("circuit", command, *args, *extra, "--out", str(tmp_path / "cli"))
    cli = Run.open(tmp_path / "cli")
    kw = {"icl": {"shots": 2, "known_top_k": 1}, "roles": {"known_only": False}}.get(command, {})
    res = getattr(factscope.circuits, command)("tiny-llama", ablation="counterfactual", n_edges=40, limit=8,
                                               progress=False, **kw)
    for name in cli.tables():
        _same_table(res.tables[name], cli.load_table(name))
    assert res.table.equals(res.tables[command]) and res.summary == cli.summary[command]
    assert res.findings == next(s for s in cli.sections if s["key"] == f"circuit_{command}")["findings"]


def test_roles_take_a_given_circuit_and_refuse_another_models(tmp_path):
    disc = factscope.circuits.discover("tiny-llama", limit=4, known_only=False, method="eap", n_edges=30,
                                       progress=False)
    res = factscope.circuits.roles("tiny-llama", graph=disc.dir / "graph.json", limit=4, known_only=False,
                                   progress=False)
    from factscope.circuits.roles import circuit_nodes

    g = factscope.circuits.Graph.from_json(disc.dir / "graph.json")
    assert sorted(res.table["node"]) == sorted(circuit_nodes(g))  # the given circuit's nodes, no new discovery
    assert res.run.config["graph"] == str(disc.dir / "graph.json") and not (res.dir / "graph.json").exists()
    with pytest.raises(FactscopeError, match="is not a graph of tiny-gpt2"):
        factscope.circuits.roles("tiny-gpt2", graph=disc.dir / "graph.json", limit=4, known_only=False,
                                 progress=False, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
