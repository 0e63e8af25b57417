"""The one-layer transformer of Jiang et al. (2024), sec. 5, and its training loop.

No residual connection, no normalization, tied embeddings::

    f(x) = [W_E^T W_V attn(W_E onehot(x))]  at the last position,
    attn(U) = U softmax_columns((W_K U)^T (W_Q U) / sqrt(d_a)).

At the last position this is ``logits = W_E^T W_V sum_i a_i W_E(x_i)`` with
``a = softmax_i(<W_K W_E(x_i), W_Q W_E(x_L)> / sqrt(d_a))``.

Shapes: ``W_E [d, V]`` (column t = embedding of token t), ``W_V [d, d]``, ``W_K, W_Q [d_a, d]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from factscope.errors import FactscopeError
from factscope.lca.task import LCATask, generator


@dataclass(frozen=True)
class ModelConfig:
    """Architecture options.

    ``value``: ``"trained"`` (Gaussian init, trained) or ``"identity"`` (frozen at I; needs only d).
    ``embedding``: ``"trained"`` or ``"frozen"`` (kept at its Gaussian initialization).
    ``attention``: ``"trained"`` or ``"uniform"`` (W_K = W_Q = 0, frozen).
    """

    d: int = 64
    d_a: int = 64
    value: str = "trained"
    embedding: str = "trained"
    attention: str = "trained"

    def __post_init__(self):
        if not isinstance(self.d, (int, np.integer)) or self.d < 1:
            raise FactscopeError(f"LCA: embedding dimension d must be an integer >= 1, got {self.d!r}")
        if not isinstance(self.d_a, (int, np.integer)) or self.d_a < 1:
            raise FactscopeError(f"LCA: attention dimension d_a must be an integer >= 1, got {self.d_a!r}")
        for name, val, ok in (
            ("value", self.value, ("trained", "identity")),
            ("embedding", self.embedding, ("trained", "frozen")),
            ("attention", self.attention, ("trained", "uniform")),
        ):
            if val not in ok:
                raise FactscopeError(f"LCA: {name} must be one of {', '.join(ok)}, got {val!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW on the cross-entropy at the last position, fresh samples every step."""

    steps: int = 2000
    batch: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    eval_n: int = 8192
    eval_seed: int = 999

    def __post_init__(self):
        if self.steps < 0 or self.batch < 1 or not self.lr > 0 or self.eval_n < 1:
            raise FactscopeError(
                f"LCA: need steps >= 0, batch >= 1, lr > 0 and eval_n >= 1, got steps={self.steps}, "
                f"batch={self.batch}, lr={self.lr}, eval_n={self.eval_n}"
            )


class OneLayerTransformer(nn.Module):
    def __init__(self, V: int, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.V, self.cfg = V, cfg
        g = generator(seed)
        d, da = cfg.d, cfg.d_a
        self.W_E = nn.Parameter(torch.randn(d, V, generator=g) / math.sqrt(d), requires_grad=cfg.embedding == "trained")
        if cfg.value == "identity":
            self.W_V = nn.Parameter(torch.eye(d), requires_grad=False)
        else:
            self.W_V = nn.Parameter(torch.randn(d, d, generator=g) / math.sqrt(d))
        if cfg.attention == "uniform":
            self.W_K = nn.Parameter(torch.zeros(da, d), requires_grad=False)
            self.W_Q = nn.Parameter(torch.zeros(da, d), requires_grad=False)
        else:
            self.W_K = nn.Parameter(torch.randn(da, d, generator=g) / math.sqrt(d))
            self.W_Q = nn.Parameter(torch.randn(da, d, generator=g) / math.sqrt(d))
        self.W_V_init = self.W_V.detach().clone()

    @classmethod
    def from_weights(cls, W_E, W_V, W_K=None, W_Q=None) -> "OneLayerTransformer":
        """A model with the given weights (``W_K = W_Q = None`` means uniform attention)."""
        W_E = torch.as_tensor(W_E, dtype=torch.float32)
        d, V = W_E.shape
        uniform = W_K is None
        da = 1 if uniform else torch.as_tensor(W_K).shape[0]
        model = cls(V, ModelConfig(d=d, d_a=da, attention="uniform" if uniform else "trained"))
        with torch.no_grad():
            model.W_E.copy_(W_E)
            model.W_V.copy_(torch.as_tensor(W_V, dtype=torch.float32))
            if not uniform:
                model.W_K.copy_(torch.as_tensor(W_K, dtype=torch.float32))
                model.W_Q.copy_(torch.as_tensor(W_Q, dtype=torch.float32))
        return model

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[n, L]`` of the last position over all positions.

        Computed token-wise: ``score_i = (W_Q W_E(x_L))^T (W_K W_E)[:, x_i] / sqrt(d_a)``, so no
        ``[n, L, d]`` tensor is ever formed.
        """
        if self.cfg.attention == "uniform":
            return torch.full(x.shape, 1.0 / x.shape[1])
        K_tok = self.W_K @ self.W_E  # [d_a, V]
        q = (self.W_Q @ self.W_E)[:, x[:, -1]].T  # [n, d_a]
        S = (q @ K_tok) / math.sqrt(self.W_K.shape[0])  # [n, V]: score of every token
        return torch.softmax(S.gather(1, x), dim=1)

    def mixture(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, V]``: total attention weight the last position puts on each token type."""
        a = self.attention(x)
        return torch.zeros(x.shape[0], self.V, dtype=a.dtype).scatter_add(1, x, a)

    def forward(self, x: torch.Tensor, W_V: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[n, V]`` at the last position. ``W_V`` overrides the value matrix."""
        h = self.mixture(x) @ self.W_E.T  # [n, d] = sum_i a_i W_E(x_i)
        Wv = self.W_V if W_V is None else W_V
        return (h @ Wv.T) @ self.W_E  # [n, V]


def expected_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy with ties broken uniformly at random (a tie of k tokens counts 1/k if y is among them)."""
    mx = logits.max(dim=1, keepdim=True).values
    tol = 1e-6 * mx.abs().clamp(min=1.0)
    top = logits >= mx - tol
    hit = top.gather(1, y[:, None]).squeeze(1).float()
    return float((hit / top.sum(1).float()).mean())


@torch.no_grad()
def evaluate(model: OneLayerTransformer, task: LCATask, n: int = 8192, seed: int = 999, L: int | None = None,
             W_V: torch.Tensor | None = None, batch: int = 4096) -> float:
    """Accuracy of ``model`` on ``n`` fresh contexts (seeded; ties count fractionally)."""
    g = generator(seed)
    accs, ns = [], []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x, y = task.sample(b, g, L=L)
        accs.append(expected_accuracy(model(x, W_V=W_V), y))
        ns.append(b)
    return float(np.average(accs, weights=ns))


@dataclass
class TrainResult:
    model: OneLayerTransformer
    task: LCATask
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    accuracy: float
    final_loss: float
    seconds: float
    losses: list = field(default_factory=list)

    def record(self) -> dict:
        return {**asdict(self.task), **asdict(self.model_cfg), "steps": self.train_cfg.steps,
                "lr": self.train_cfg.lr, "batch": self.train_cfg.batch, "seed": self.train_cfg.seed,
                "accuracy": self.accuracy, "final_loss": self.final_loss, "seconds": self.seconds}


def train(task: LCATask, model_cfg: ModelConfig = ModelConfig(), train_cfg: TrainConfig = TrainConfig(),
          progress: bool | str = False) -> TrainResult:
    """Train a fresh model on ``task`` (fresh samples each step) and evaluate it on held-out contexts."""
    torch.manual_seed(train_cfg.seed)
    model = OneLayerTransformer(task.V, model_cfg, seed=train_cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    g = generator(train_cfg.seed + 1_000_003)
    losses = []
    t0 = time.time()
    if params and train_cfg.steps > 0:
        opt = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=train_cfg.steps)
        desc = progress if isinstance(progress, str) else "train LCA"
        it = tqdm(range(train_cfg.steps), desc=desc, leave=False, disable=not progress, mininterval=1.0)
        for _ in it:
            x, y = task.sample(train_cfg.batch, g)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    acc = evaluate(model, task, train_cfg.eval_n, train_cfg.eval_seed)
    tail = losses[-max(1, len(losses) // 20):] if losses else [float("nan")]
    return TrainResult(model, task, model_cfg, train_cfg, acc, float(np.mean(tail)), time.time() - t0, losses)
