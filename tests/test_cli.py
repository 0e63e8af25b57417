"""The substrate's commands through click's runner (analysis commands are tested with their packages)."""

from __future__ import annotations

import json
import re

import pytest
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
    summary = json.loads((out / "summary.json").read_text())["known"]
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
    assert r.exit_code == 0 and json.loads((out / "summary.json").read_text())["known"]["n_known"] == summary["n_known"]


def test_demo_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "demo"
    r = _run("demo", "--model", "tiny-gpt2", "--limit", "20", "--skip", "flow", "--skip", "hijack",
             "--skip", "lca", "--out", str(out))
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text()
    assert "Facts the model knows" in html
    page = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)  # Plotly's inlined bundle names URLs
    assert "http://" not in page and "https://" not in page and "<script src" not in html


def test_models_list():
    r = _run("models", "list")
    assert r.exit_code == 0
    assert "gemma-3-270m" in r.output and "tiny-gemma3" in r.output


# --------------------------------------------------------------------------------------------
# the common options of every analysis command (commands.analysis_options)
# --------------------------------------------------------------------------------------------

COMMON = ["--model", "--dataset", "--limit", "--seed", "--out", "--resume", "--batch-size", "--threads", "--device",
          "--dtype", "--no-progress"]
FLOW = ["knockout", "extraction", "enrichment", "sublayer", "heads", "all"]
LCA = ["value-matrix", "constructed", "embeddings", "attention", "hijack", "all"]
# the options that do not apply: circuits have no batched loop of their own; lca trains its own
# small float32 model on the CPU on a synthetic task (no model to load, no facts)
NOT_APPLICABLE = {"circuit": {"--batch-size"},
                  "lca": {"--model", "--dataset", "--limit", "--batch-size", "--device", "--dtype"}}
ANALYSIS_COMMANDS = ([["flow", c] for c in FLOW] + [["hijack", "run"], ["circuit", "discover"], ["circuit", "evaluate"],
                     ["facts", "known"], ["demo"]] + [["lca", c] for c in LCA])


def _command(path):
    import click

    ctx = click.Context(main)
    cmd = main.get_command(ctx, path[0])
    for name in path[1:]:
        cmd = cmd.get_command(ctx, name)
    return cmd


def _expected(path):
    return [o for o in COMMON if o not in NOT_APPLICABLE.get(path[0], set())]


@pytest.mark.parametrize("path", ANALYSIS_COMMANDS, ids=" ".join)
def test_every_analysis_command_has_the_common_options(path):
    import click

    r = CliRunner().invoke(main, [*path, "--help"])
    assert r.exit_code == 0, r.output
    listed = set(re.findall(r"^\s+(--[a-z-]+)", r.output, flags=re.M))
    assert set(_expected(path)) <= listed, set(_expected(path)) - listed
    # the same variable names and validation everywhere (one definition, not per-command copies)
    params = {p.opts[0]: p for p in _command(path).params if p.opts[0] in COMMON}
    assert set(params) == set(_expected(path))
    names = {"--model": "model_spec", "--batch-size": "batch_size", "--no-progress": "no_progress"}
    for opt, p in params.items():
        assert p.name == names.get(opt, opt[2:]), (opt, p.name)
    for opt in ("--limit", "--batch-size", "--threads"):
        if opt in params:
            t = params[opt].type
            assert isinstance(t, click.IntRange) and t.min == 1 and not t.min_open and t.max is None, (opt, t)
    if "--dtype" in params:
        assert list(params["--dtype"].type.choices) == ["float32", "bfloat16", "float16"]
    if "--model" in params:
        from factscope import DEFAULT_MODEL

        assert params["--model"].default in (DEFAULT_MODEL, (DEFAULT_MODEL,))


_BAD = {  # option -> (arguments, what the one-line error must say)
    "--model": (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    "--dataset": (["--dataset", "no-such-dataset"], "unknown dataset 'no-such-dataset'"),
    "--limit": (["--limit", "0"], "'--limit'"),
    "--seed": (["--seed", "x"], "'--seed'"),
    "--out": (["--out", "{file}"], "'--out'"),
    "--resume": (["--out", "{notarun}", "--resume"], "not a factscope run"),
    "--batch-size": (["--batch-size", "0"], "'--batch-size'"),
    "--threads": (["--threads", "-1"], "'--threads'"),
    "--device": (["--device", "gpu"], "unknown --device 'gpu'"),
    "--dtype": (["--dtype", "float8"], "'--dtype'"),
    "--no-progress": (["--no-progress=yes"], "--no-progress"),
}
_FIRST = [["flow", "knockout"], ["hijack", "run"], ["circuit", "discover"], ["facts", "known"], ["demo"],
          ["lca", "attention"]]


@pytest.mark.parametrize("path", _FIRST, ids=" ".join)
def test_a_bad_common_option_is_refused_before_anything_loads(tmp_path, path):
    """Each bad value: exit 2, one line naming it, no model loaded (--model no-such-model is given
    too, so loading it would be the error) and no run directory."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "data.txt").write_text("x")
    for opt in _expected(path):
        args, needle = _BAD[opt]
        args = [a.format(file=tmp_path / "file", notarun=tmp_path / "notarun") for a in args]
        model = [] if opt == "--model" or "--model" not in _expected(path) else ["--model", "no-such-model"]
        out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
        r = CliRunner().invoke(main, [*path, *model, *out, *args])
        assert r.exit_code == 2, (opt, r.output)
        assert needle in r.output and "Traceback" not in r.output, (opt, needle, r.output)
        if opt != "--model":
            assert "unknown model" not in r.output, (opt, r.output)
        assert not (tmp_path / "run").exists(), opt


def test_config_keys_are_the_same_in_every_command(tmp_path):
    """analysis, model (the resolved name) and model_spec (as typed) in every run's config.json;
    the model is a local directory, so the two differ."""
    from factscope.models import load_model

    tiny = load_model("tiny-llama")
    spec = tmp_path / "my-model"
    tiny.hf.save_pretrained(spec)
    tiny.tokenizer.save_pretrained(spec)
    base = ["--model", str(spec), "--no-progress", "--threads", "1"]
    runs = {
        "flow knockout": ["flow", "knockout", *base, "--all-facts", "--limit", "2"],
        "hijack": ["hijack", "run", *base, "--all-facts", "--limit", "3", "--max-prepends", "1", "--bootstrap", "5"],
        "circuit": ["circuit", "discover", *base, "--all-facts", "--limit", "4", "--method", "eap"],
        "facts known": ["facts", "known", *base, "--limit", "5"],
        "demo": ["demo", *base, "--limit", "5", *[a for p in ("flow", "hijack", "lca", "circuit") for a in ("--skip", p)]],
    }
    for analysis, args in runs.items():
        out = tmp_path / analysis.replace(" ", "_")
        r = _run(*args, "--out", str(out))
        assert r.exit_code == 0, (analysis, r.output)
        cfg = json.loads((out / "config.json").read_text())
        many = analysis == "hijack"  # takes several models and data sets: lists
        assert cfg["analysis"] == analysis
        assert cfg["model"] == (["my-model"] if many else "my-model")
        assert cfg["model_spec"] == ([str(spec)] if many else str(spec))
        assert cfg["weights"] == ({str(spec): "as stored in the model directory"} if many
                                  else "as stored in the model directory")
        assert cfg["seed"] == 0 and cfg["dtype"] == "float32" and cfg["runtime"]["device"] == "cpu"
        assert cfg["runtime"]["threads"] == 1 and cfg["dataset"] in ("known_1000", ["known_1000"],
                                                                     "lre:factual/country_capital_city")


def _first_sentence(text: str) -> str:
    """Independent of commands.first_sentence: the first paragraph up to the first period that ends
    it or is followed by a capital letter."""
    para = " ".join(text.strip().split("\n\n")[0].split())
    m = re.search(r"\.(?=\s+[A-Z]|$)", para)
    return para[: m.end()] if m else para


@pytest.mark.parametrize("group", [[], ["flow"], ["hijack"], ["circuit"], ["lca"], ["facts"], ["models"], ["data"]],
                         ids=lambda g: " ".join(g) or "factscope")
def test_group_help_shows_whole_first_sentences(group):
    """click cuts a command's short help at the terminal width with '...': the listings show it whole."""
    import click

    r = CliRunner().invoke(main, [*group, "--help"], terminal_width=80)
    assert r.exit_code == 0, r.output
    listing = r.output.split("Commands:")[1]
    assert "..." not in listing, listing
    flat = " ".join(listing.split())
    grp = _command(group) if group else main
    ctx = click.Context(grp)
    names = grp.list_commands(ctx)
    assert names
    for name in names:
        if not group and name in main._lazy:  # factscope --help shows the registered line, importing nothing
            expected = main._lazy[name][1]
        else:
            expected = _first_sentence(grp.get_command(ctx, name).help)
        assert len(expected) > 10 and f"{name} {expected}" in flat, (name, expected, listing)
