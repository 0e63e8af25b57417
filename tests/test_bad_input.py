"""Bad input as a new user types it: one line naming the culprit, exit 2, no traceback, and no run
directory left behind to block the corrected command (issue 10, sec. 4)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from factscope.cli import main
from factscope.errors import FactscopeError


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


def test_device_auto_is_the_gpu_when_there_is_one():
    from factscope.models import check_device, load_model

    want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert check_device("auto").type == want
    assert load_model("tiny-llama", device="auto").device.type == want


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


# --------------------------------------------------------------------------------------------
# an uncached hub id fails fast: offline without a request, online after one short probe
# --------------------------------------------------------------------------------------------

FAKE_ID = "nobody-factscope/no-such-model"


@pytest.fixture
def hub(monkeypatch):
    """Records what the hub check asks: ``calls`` of model_info (with their timeout); loading the
    weights through transformers raises (so a test sees whether the real hub path was taken)."""
    import huggingface_hub
    import transformers

    calls = []

    def from_pretrained(*a, **k):
        raise FactscopeError("reached from_pretrained")

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # nothing cached

    def answer(result):
        def model_info(repo_id, timeout=None, **k):
            calls.append((repo_id, timeout))
            if isinstance(result, Exception):
                raise result
            return result

        monkeypatch.setattr(huggingface_hub, "model_info", model_info)

    answer(AssertionError("the hub was asked"))
    return calls, answer



@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_uncached_hub_id_offline_fails_without_a_request(tmp_path, monkeypatch, hub, var):
    calls, _ = hub
    monkeypatch.setenv(var, "1")
    _fails(["flow", "knockout", "--model", FAKE_ID, "--out", tmp_path / "x"],
           f"model '{FAKE_ID}' cannot load", "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
    _fails(["hijack", "run", "--model", "tiny-llama", "--model", FAKE_ID, "--out", tmp_path / "x"], FAKE_ID)
    assert calls == [] and not (tmp_path / "x").exists()


def test_uncached_hub_id_online_is_one_short_probe(tmp_path, hub):
    from unittest import mock

    from huggingface_hub.errors import RepositoryNotFoundError

    calls, answer = hub
    answer(OSError("[Errno -2] Name or service not known"))  # no network: one request, no retries
    _fails(["predict", "--model", FAKE_ID, "x"], f"model '{FAKE_ID}' cannot load", "not in the local Hugging Face "
           "cache", "cannot be reached", "Name or service not known")
    assert len(calls) == 1 and calls[0][0] == FAKE_ID and 0 < calls[0][1] <= 5
    answer(RepositoryNotFoundError("404", response=mock.MagicMock()))
    _fails(["facts", "known", "--model", FAKE_ID, "--out", tmp_path / "x"], "the Hugging Face hub has no such model")
    # the hub has it: the usual download path runs (here stopped by the fake from_pretrained)
    answer(object())
    _fails(["predict", "--model", FAKE_ID, "x"], "reached from_pretrained")
    assert not (tmp_path / "x").exists()


def test_cached_hub_id_is_not_probed_even_offline(monkeypatch, hub):
    import huggingface_hub

    from factscope.models import resolve

    calls, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/hf/cache/config.json")
    assert resolve(FAKE_ID) == (FAKE_ID, None) and calls == []
