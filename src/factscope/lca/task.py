"""The latent concept association (LCA) task of Jiang et al. (2024), sections 4-6.

There are ``m`` binary latent variables and ``V = 2**m`` tokens; the token of a latent vector
``z = (z_1, ..., z_m)`` is its binary number with ``z_1`` the most significant bit.  A context for
the output token ``y = token(z*)`` is generated as follows:

* ``z*`` is uniform over the ``V`` latent vectors;
* the first ``L - 1`` context tokens are drawn i.i.d. from
  ``p(z | z*) = w * pi(z | z*) + (1 - w) * Uniform(V)``;
* the last context token is drawn from ``pi(z | z*)``;

with ``pi(z | z*)`` proportional to ``exp(-Hamming(z, z*) / beta)`` on a neighbourhood ``N(z*)``
and 0 outside.  Every neighbourhood offered here is XOR-invariant, ``N(z*) = {z* ^ delta :
delta in D}`` for a fixed set ``D`` of non-zero "deltas", so sampling draws deltas from one
categorical distribution and XORs them onto ``z*`` (vectorized, tens of millions of tokens per
second on one CPU core).

Neighbourhoods (``neighbourhood=``):

``"all"``       every token but ``z*``;
``"hamming1"``  the ``m`` tokens at Hamming distance 1;
``"cluster1"``  the tokens sharing ``z*``'s first latent (its cluster), ``z*`` excluded;
``"cluster2"``  the tokens sharing ``z*``'s first two latents, ``z*`` excluded.

The exact conditional ``p(y | x)`` (:func:`posterior`) gives the Bayes-optimal accuracy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from factscope.errors import FactscopeError

NEIGHBOURHOODS = ("all", "hamming1", "cluster1", "cluster2")
MAX_M = 12


def popcount(x: np.ndarray | torch.Tensor):
    """Number of set bits of each (non-negative, < 2**16) integer."""
    if isinstance(x, torch.Tensor):
        out = torch.zeros_like(x)
        y = x.clone()
        while bool((y > 0).any()):
            out += y & 1
            y = y >> 1
        return out
    x = np.asarray(x, dtype=np.int64)
    out = np.zeros_like(x)
    y = x.copy()
    while (y > 0).any():
        out += y & 1
        y >>= 1
    return out


def hamming_matrix(m: int) -> np.ndarray:
    """``[V, V]`` integer matrix of Hamming distances between tokens."""
    v = np.arange(2**m)
    return popcount(v[:, None] ^ v[None, :])


def latents(m: int) -> np.ndarray:
    """``[V, m]`` 0/1 matrix: row t is the latent vector of token t (column 0 = first latent = MSB)."""
    v = np.arange(2**m)
    return ((v[:, None] >> np.arange(m - 1, -1, -1)[None, :]) & 1).astype(np.int64)


def cluster_of(m: int, k: int) -> np.ndarray:
    """Cluster id of every token when clustering by the first ``k`` latents (its top ``k`` bits)."""
    return np.arange(2**m) >> (m - k)


@dataclass(frozen=True)
class LCATask:
    """One LCA task: ``m`` latents, context length ``L``, mixing weight ``w``, temperature ``beta``."""

    m: int = 6
    L: int = 64
    w: float = 0.2
    beta: float = 1.0
    neighbourhood: str = "hamming1"

    def __post_init__(self):
        if not isinstance(self.m, (int, np.integer)) or not 1 <= self.m <= MAX_M:
            raise FactscopeError(
                f"LCA: m (number of latent variables) must be an integer in [1, {MAX_M}] "
                f"(V = 2**m tokens), got {self.m!r}"
            )
        if not isinstance(self.L, (int, np.integer)) or self.L < 1:
            raise FactscopeError(f"LCA: context length L must be an integer >= 1, got {self.L!r}")
        if not (0.0 <= float(self.w) <= 1.0) or math.isnan(float(self.w)):
            raise FactscopeError(f"LCA: mixing weight w must lie in [0, 1], got {self.w!r}")
        if not float(self.beta) > 0 or math.isinf(float(self.beta)):
            raise FactscopeError(f"LCA: temperature beta must be a positive finite number, got {self.beta!r}")
        if self.neighbourhood not in NEIGHBOURHOODS:
            raise FactscopeError(
                f"LCA: unknown neighbourhood {self.neighbourhood!r}; choose one of {', '.join(NEIGHBOURHOODS)}"
            )
        if not delta_set(self.m, self.neighbourhood).any():
            raise FactscopeError(
                f"LCA: neighbourhood {self.neighbourhood!r} is empty for m={self.m}; use a larger m"
            )

    @property
    def V(self) -> int:
        return 2**self.m

    def with_(self, **kw) -> "LCATask":
        d = asdict(self)
        d.update(kw)
        return LCATask(**d)

    # ---- distributions -------------------------------------------------------------------
    def delta_probs(self) -> np.ndarray:
        """``q[delta] = pi(z* ^ delta | z*)`` (the same for every ``z*``), float64 of length V."""
        return delta_probs(self.m, self.neighbourhood, self.beta)

    def pi_matrix(self) -> np.ndarray:
        """``[V, V]``: ``pi[z*, z]``."""
        q = self.delta_probs()
        v = np.arange(self.V)
        return q[v[:, None] ^ v[None, :]]

    def p_matrix(self) -> np.ndarray:
        """``[V, V]``: ``p[z*, z] = w pi(z|z*) + (1-w)/V`` (law of the first L-1 tokens)."""
        return self.w * self.pi_matrix() + (1.0 - self.w) / self.V

    # ---- sampling ------------------------------------------------------------------------
    def sample(self, n: int, seed: int | torch.Generator = 0, L: int | None = None, y: torch.Tensor | None = None):
        """Draw ``n`` contexts. Returns ``(x [n, L] int64, y [n] int64)``.

        ``seed`` is an int or a ``torch.Generator`` (advanced in place).  ``y`` fixes the outputs.
        """
        g = generator(seed)
        L = self.L if L is None else int(L)
        if L < 1:
            raise FactscopeError(f"LCA: context length L must be >= 1, got {L}")
        if y is None:
            y = torch.randint(0, self.V, (n,), generator=g)
        x = sample_context_tokens(self, y, L, g)
        return x, y


def generator(seed) -> torch.Generator:
    """A seeded CPU ``torch.Generator`` (a generator passes through unchanged)."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def delta_set(m: int, neighbourhood: str) -> np.ndarray:
    """Boolean mask over deltas: ``z* ^ delta`` is in ``N(z*)``."""
    d = np.arange(2**m)
    if neighbourhood == "all":
        mask = d != 0
    elif neighbourhood == "hamming1":
        mask = popcount(d) == 1
    elif neighbourhood in ("cluster1", "cluster2"):
        k = 1 if neighbourhood == "cluster1" else 2
        mask = ((d >> (m - k)) == 0) & (d != 0) if m > k else np.zeros(2**m, bool)
    else:
        raise FactscopeError(
            f"LCA: unknown neighbourhood {neighbourhood!r}; choose one of {', '.join(NEIGHBOURHOODS)}"
        )
    return mask


def delta_probs(m: int, neighbourhood: str, beta: float) -> np.ndarray:
    mask = delta_set(m, neighbourhood)
    d = np.arange(2**m)
    wts = np.where(mask, np.exp(-popcount(d) / float(beta)), 0.0)
    return wts / wts.sum()


def neighbourhood_adjacency(m: int, neighbourhood: str) -> np.ndarray:
    """``[V, V]`` 0/1 matrix ``A[t, t'] = 1`` iff ``t'`` is in ``N(t)`` (symmetric)."""
    mask = delta_set(m, neighbourhood)
    v = np.arange(2**m)
    return mask[v[:, None] ^ v[None, :]].astype(np.float64)


def sample_context_tokens(task: LCATask, y: torch.Tensor, L: int, g: torch.Generator) -> torch.Tensor:
    """Context tokens ``[n, L]`` for the outputs ``y`` (vectorized)."""
    n = y.shape[0]
    q = torch.as_tensor(task.delta_probs(), dtype=torch.float64)
    # deltas from pi for every position; the last one always from pi
    deltas = torch.multinomial(q, n * L, replacement=True, generator=g).view(n, L)
    x = y[:, None] ^ deltas
    if L > 1 and task.w < 1.0:
        unif = torch.randint(0, task.V, (n, L - 1), generator=g)
        keep = torch.rand((n, L - 1), generator=g) < task.w
        x[:, :-1] = torch.where(keep, x[:, :-1], unif)
    return x


def mixed_contexts(task: LCATask, n: int, frac: float, seed=0, L: int | None = None):
    """Hijacking contexts: each of the first ``L-1`` tokens comes from ``p(x | y')`` with probability
    ``frac`` and from ``p(x | y)`` otherwise; the last token from ``pi(. | y)``.

    ``y'`` is uniform over the tokens other than ``y``.  Returns ``(x, y, y_alt)``.
    """
    if not 0.0 <= frac <= 1.0:
        raise FactscopeError(f"LCA: mixing fraction must lie in [0, 1], got {frac!r}")
    g = generator(seed)
    L = task.L if L is None else int(L)
    y = torch.randint(0, task.V, (n,), generator=g)
    y_alt = (y + torch.randint(1, task.V, (n,), generator=g)) % task.V
    x = sample_context_tokens(task, y, L, g)
    x_alt = sample_context_tokens(task, y_alt, L, g)
    if L > 1:
        use_alt = torch.rand((n, L - 1), generator=g) < frac
        x[:, :-1] = torch.where(use_alt, x_alt[:, :-1], x[:, :-1])
    return x, y, y_alt


# ---- exact posterior ----------------------------------------------------------------------


def log_posterior(task: LCATask, x: torch.Tensor) -> torch.Tensor:
    """Exact ``log p(y | x)`` for contexts ``x [n, L]`` drawn from ``task`` (any L >= 1): ``[n, V]``.

    ``p(y | x) ∝ prod_{i<L} p(x_i | y) * pi(x_L | y)`` (uniform prior over ``y``).
    """
    V = task.V
    x = torch.as_tensor(x, dtype=torch.int64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise FactscopeError(f"LCA: contexts must be an [n, L] integer array, got shape {tuple(x.shape)}")
    if x.min() < 0 or x.max() >= V:
        raise FactscopeError(f"LCA: context tokens must lie in [0, {V}), got range [{int(x.min())}, {int(x.max())}]")
    logp = torch.as_tensor(np.log(task.p_matrix()), dtype=torch.float64)  # [z*, z]
    with np.errstate(divide="ignore"):
        logpi = torch.as_tensor(np.log(task.pi_matrix()), dtype=torch.float64)
    n, L = x.shape
    counts = torch.zeros(n, V, dtype=torch.float64)
    if L > 1:
        counts.scatter_add_(1, x[:, :-1], torch.ones(n, L - 1, dtype=torch.float64))
    ll = counts @ logp.T + logpi[:, x[:, -1]].T  # [n, V]
    return ll - torch.logsumexp(ll, dim=1, keepdim=True)


def posterior(task: LCATask, x: torch.Tensor) -> torch.Tensor:
    return log_posterior(task, x).exp()


def bayes_accuracy(task: LCATask, n: int = 20000, seed: int = 12345, L: int | None = None) -> float:
    """Accuracy of the Bayes-optimal predictor (expected accuracy ``E max_y p(y|x)``, a Monte Carlo
    average over ``n`` contexts; lower variance than counting hits)."""
    x, _ = task.sample(n, seed, L=L)
    return float(posterior(task, x).max(dim=1).values.mean())
