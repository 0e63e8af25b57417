"""Bad input as a new user types it: one line naming the culprit, exit 2, no traceback, and no run
directory left behind to block the corrected command (issue 10, sec. 4)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from factscope.cli import main


def _fails(args, *needles):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, (n, r.output)
    return r


FLOW = ["flow", "knockout", "--all-facts", "--limit", "2", "--no-progress", "--threads", "1"]
HIJACK = ["hijack", "run", "--dataset", "known_1000", "--limit", "3", "--max-prepends", "1", "--all-facts",
          "--no-progress", "--bootstrap", "10"]


@pytest.mark.parametrize("cmd", ["flow", "hijack"])
def test_a_failed_load_leaves_no_directory_and_the_corrected_rerun_works(tmp_path, cmd):
    out = tmp_path / "parent" / "run"  # a missing parent chain is created, and removed again on failure
    base = FLOW if cmd == "flow" else HIJACK
    _fails([*base, "--model", "no-such-model", "--out", out], "unknown model 'no-such-model'")
    assert not (tmp_path / "parent").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"subject": "Paris", "prompt": "Paris is in", "target_true": "  "}) + "\n")
    data = ["--dataset", bad]
    _fails([*base[:2], *data, *base[2 + 2 * (cmd == "hijack"):], "--model", "tiny-llama", "--out", out], "empty target_true for subject")
    assert not out.exists()
    r = CliRunner().invoke(main, [str(a) for a in [*base, "--model", "tiny-llama", "--out", out]])
    assert r.exit_code == 0, r.output
    assert (out / "summary.json").is_file()


def test_a_run_with_results_is_kept_on_failure(tmp_path):
    from factscope.runs import Run, discard_unstarted_runs, forget_unstarted_runs

    import pandas as pd

    forget_unstarted_runs()
    done = Run.create(tmp_path / "done", {"analysis": "t"})
    done.save_table("t", pd.DataFrame({"a": [1]}))
    bare = Run.create(tmp_path / "deep" / "bare", {"analysis": "t"})
    bare.update_summary({"n": 1})
    (tmp_path / "empty").mkdir()
    empty = Run.create(tmp_path / "empty", {"analysis": "t"})
    removed = discard_unstarted_runs()
    assert (tmp_path / "done" / "t.csv").is_file()  # results are never removed
    assert not (tmp_path / "deep").exists()  # the directories the run created are gone
    assert empty.dir.is_dir() and not any(empty.dir.iterdir())  # an existing directory is left empty
    assert sorted(map(str, removed)) == sorted(map(str, [tmp_path / "deep", tmp_path / "empty"]))


def test_a_failed_command_leaves_runs_started_before_it_alone(tmp_path):
    """A run a Python caller started (only its config.json yet) is not the failing command's."""
    from factscope.runs import Run, forget_unstarted_runs

    forget_unstarted_runs()
    mine = Run.create(tmp_path / "mine", {"analysis": "t"})
    _fails(["flow", "knockout", "--model", "no-such-model", "--out", tmp_path / "x"], "unknown model")
    assert (mine.dir / "config.json").is_file()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args", [
    ["flow", "knockout", "--limit", "0"],
    ["flow", "enrichment", "--limit", "-3"],
    ["hijack", "run", "--limit", "0"],
    ["facts", "known", "--limit", "0"],
])
def test_limit_below_one_is_refused_before_loading(tmp_path, args):
    out = tmp_path / "x"
    _fails([*args, "--model", "no-such-model", "--out", out], "--limit")  # not the model's error: nothing loaded
    assert not out.exists()


def test_window_zero_is_refused(tmp_path):
    _fails(["flow", "knockout", "--window", "0", "--model", "tiny-llama", "--out", tmp_path / "x"], "--window")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(prompt):
    _fails(["predict", "--model", "tiny-llama", prompt], "the prompt is empty")


@pytest.mark.parametrize("device,needle", [("gpu", "unknown --device 'gpu'"), ("cuda", "--device cuda")])
def test_bad_or_missing_device(device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _fails(["predict", "--model", "tiny-llama", "--device", device, "x"], needle)


def test_model_directory_without_tokenizer(tmp_path):
    from factscope.models import load_model

    load_model("tiny-llama").hf.save_pretrained(tmp_path / "m")
    _fails(["predict", "--model", tmp_path / "m", "x"], "could not load the tokenizer", "tokenizer.json")


def test_fake_gguf_is_named_before_dequantizing(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model at all" * 10)
    r = _fails(["predict", "--model", fake, "x"], "is not a GGUF file")
    assert "dequantizing" not in r.output
