"""The README's Python example runs as written, and its knockout blocks exactly the subject."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs(gemma, monkeypatch):
    import factscope.models

    blocks = [b for b in _python_blocks(README.read_text(encoding="utf-8")) if "hooks.cache" in b]
    assert blocks, "README.md has no python example of the substrate"
    monkeypatch.setattr(factscope.models, "load_model", lambda *a, **k: gemma)  # reuse the session's copy
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    tokens = gemma.to_str_tokens(ns["batch"].input_ids[0])
    blocked = ns["block"][0, -1].nonzero().flatten().tolist()
    assert "".join(tokens[i] for i in blocked).strip() == "The Eiffel Tower"
    assert ns["logits"].shape == (1, gemma.vocab_size)
    assert not torch.allclose(ns["logits"], ns["knocked"])
