"""Shared fixtures: models are loaded once per test session."""

from __future__ import annotations

import functools

import pytest
import torch

TINY = ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-gemma", "tiny-gptj", "tiny-neox"]


@functools.lru_cache(maxsize=None)
def _load(name: str):
    from factscope.models import load_model

    return load_model(name)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(params=TINY)
def tiny(request):
    """Each tiny random-weight model family in turn."""
    return _load(request.param)


@pytest.fixture(params=TINY + ["gemma-3-270m", "smollm2-135m"])
def any_model(request):
    """Each tiny family, then the real Gemma 3 270M and SmolLM2-135M (Llama, 9 heads / 3 kv heads)."""
    return _load(request.param)


@pytest.fixture(scope="session")
def gemma():
    """The real default model, Gemma 3 270M (dequantized once, cached)."""
    return _load("gemma-3-270m")
