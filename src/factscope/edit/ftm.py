"""FT-M: fine-tune one MLP layer's down projection on the target tokens only.

As EasyEdit's FT with ``objective_optimization: target_new`` (``easyeditor/models/ft/ft_main.py``,
which its survey calls FT-M): the prompt followed by ``" " + target_new`` teacher-forced, cross
entropy over the target tokens only (mean over them), Adam on the one weight matrix
(``hparams/FT/*.yaml``: 25 steps, lr 5e-4, weight decay 0), a step taken only while the loss is at
least 1e-2, stop when it falls below; ``norm_constraint`` (EasyEdit: 5e-4 for GPT-2 XL, none for
the Llama configs; default none here) clamps every entry to within that of its original value.
Every other parameter stays frozen (and is checked bit-identical in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from factscope.edit.rome import Editor
from factscope.facts import target_ids


@dataclass
class FTMHParams:
    layer: int | None = None
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: float | None = None

    def check(self, model) -> "FTMHParams":
        from factscope.edit.rome import resolve_layer

        self.layer = resolve_layer(model, self.layer, self.num_steps, "num_steps")
        return self


@dataclass
class FTMResult:
    layer: int
    loss: list[float] = field(default_factory=list)
    update_norm: float = 0.0


def target_loss(model, prompt: str, target: str):
    """(batch, positions, ids): the teacher-forced prompt + target and where each target token is predicted."""
    tok = model.tokenizer
    p = list(tok(prompt)["input_ids"])
    a = target_ids(tok, prompt, target)
    batch = model.batch_from_ids([p + a[:-1]])
    pos = torch.tensor([[batch.offset[0] + len(p) - 1 + j for j in range(len(a))]], device=model.device)
    return batch, pos, torch.tensor(a, device=model.device)


class FTM(Editor):
    """An FT-M editor for one model (edits in place; restore with ``model.restoring(editor.parameter)``)."""

    method = "ft-m"

    def __init__(self, model, hp: FTMHParams | None = None):
        self.model = model
        self.hp = (hp or FTMHParams()).check(model)

    def edit(self, case) -> FTMResult:
        model, hp = self.model, self.hp
        w = self.parameter
        orig = w.detach().clone()
        batch, pos, ids = target_loss(model, case.rewrite_prompt, case.target_new)
        opt = torch.optim.Adam([w], lr=hp.lr, weight_decay=hp.weight_decay)
        res = FTMResult(self.layer)
        w.requires_grad_(True)
        try:
            for _ in range(hp.num_steps):
                opt.zero_grad()
                with torch.enable_grad():
                    lp = torch.log_softmax(model.forward(batch, positions=pos)[0].float(), -1)
                    loss = -lp[torch.arange(len(ids)), ids].mean()
                res.loss.append(float(loss.detach()))
                if loss.item() < 1e-2:
                    break
                loss.backward()
                opt.step()
                if hp.norm_constraint is not None:
                    with torch.no_grad():
                        w.copy_(torch.clamp(w, min=orig - hp.norm_constraint, max=orig + hp.norm_constraint))
        finally:
            w.requires_grad_(False)
            w.grad = None
        res.update_norm = float((w.detach() - orig).norm())
        return res
