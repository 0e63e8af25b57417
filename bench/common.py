"""Shared helpers for the benchmarks: the machine's matmul peak and a transformer FLOP count."""

from __future__ import annotations

import time

import torch


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Achieved FLOP/s of a large square matmul on this machine (the practical peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def forward_flops(model, n_tokens: int, logits_positions: int = 1, start_layer: int = 0) -> float:
    """Matmul FLOPs of one forward pass over ``n_tokens`` tokens (projections, MLP, attention scores
    and mixing), from ``start_layer`` up, plus the vocabulary projection at ``logits_positions``."""
    cfg = model.hf.config
    d, hd = model.d_model, model.head_dim
    H, K = model.n_heads, model.n_kv_heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
    gated = model.spec.family != "gpt2"  # gate/up/down vs fc/proj
    per_token = 2 * d * hd * (2 * H + 2 * K) + 2 * d * inter * (3 if gated else 2)
    attn = 2 * 2 * H * hd * n_tokens * (n_tokens + 1) / 2  # scores + mixing, causal
    layers = model.n_layers - start_layer
    return layers * (per_token * n_tokens + attn) + 2 * d * model.vocab_size * logits_positions


def emit(result: dict, path=None) -> None:
    """Print ``result`` as the script's last line (one JSON object) and write it to ``path`` (``--json``)."""
    import json

    line = json.dumps(result)
    print(line)
    if path:
        path.write_text(line + "\n")
