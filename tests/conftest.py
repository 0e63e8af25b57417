"""Shared fixtures: models are loaded once per test session.

Tests that load a real model (Gemma 3 270M, SmolLM2-135M, or the real Gemma tokenizer) carry the
``realmodel`` marker, added here from the fixtures they use, so that ``-m "not realmodel"`` (or
``-k "not realmodel"``) runs every tiny family, tiny-gemma3 included. ``-k "not gemma"`` would
also drop tiny-gemma3: do not use it for that.
"""

from __future__ import annotations

import functools

import pytest
import torch

TINY = ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-gemma", "tiny-gptj", "tiny-neox"]
REAL = ["gemma-3-270m", "smollm2-135m"]
# fixtures that load a real model or its tokenizer: a test using one is a real-model test
REAL_FIXTURES = {"gemma", "gemma_tok"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if names & REAL_FIXTURES or item.get_closest_marker("gemma") or set(map(str, params.values())) & set(REAL):
            item.add_marker(pytest.mark.realmodel)


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


@pytest.fixture(params=TINY + [pytest.param(n, marks=pytest.mark.realmodel) for n in REAL])
def any_model(request):
    """Each tiny family, then the real Gemma 3 270M and SmolLM2-135M (Llama, 9 heads / 3 kv heads)."""
    return _load(request.param)


@pytest.fixture(scope="session")
def gemma():
    """The real default model, Gemma 3 270M (dequantized once, cached)."""
    return _load("gemma-3-270m")
