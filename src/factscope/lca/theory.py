"""Exact constructions of Jiang et al. (2024), sec. 5, and the geometry used to compare them with
trained weights.

* :func:`constructed_value_matrix` -- ``W_V = sum_t W_E(t) (sum_{t' in N(t)} W_E(t')^T) = W_E A W_E^T``
  (the value matrix as an associative memory from each token to its neighbours);
* :func:`random_pairing_adjacency` -- the same construction with each token paired with random tokens;
* :func:`theorem1_model` -- uniform attention (``W_K = W_Q = 0``), orthonormal embeddings and the
  Hamming-1 construction ``W_V = sum_t W_E(t) sum_{t' in N1(t)} W_E(t')^T`` of the paper (Theorem 1,
  Lemma 2, experiment 2), whatever the task's neighbourhood.  With orthonormal embeddings the logit
  of token ``t`` is the fraction of context tokens at Hamming distance 1 from ``t``.  (Building
  ``W_V`` from the task's own neighbourhood instead is *not* Theorem 1's model: for the "all but z*"
  task that is ``W_E (J - I) W_E^T``, whose logits ``1 - count(t)/L`` rank tokens exactly as
  ``W_V = -I`` does, "predict the least frequent token"; it needs L far beyond ``V`` to work);
* :func:`principal_angles` between the rank-k approximations of two matrices;
* :func:`inner_product_by_hamming` and :func:`linear_fit` for the embedding geometry (Theorem 3 of the
  paper predicts that ``<W_E(t), W_E(t')>`` is linear in the Hamming distance of ``t`` and ``t'``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from factscope.errors import FactscopeError
from factscope.lca.model import OneLayerTransformer
from factscope.lca.task import LCATask, hamming_matrix, neighbourhood_adjacency


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def constructed_value_matrix(W_E, adjacency) -> torch.Tensor:
    """``W_V = W_E A W_E^T`` for ``W_E [d, V]`` and the 0/1 pairing ``A[t, t'] = [t' in N(t)]``."""
    E, A = _np(W_E), _np(adjacency)
    if A.shape != (E.shape[1], E.shape[1]):
        raise FactscopeError(f"LCA: adjacency must be [V, V] = {(E.shape[1],) * 2}, got {A.shape}")
    return torch.as_tensor(E @ A @ E.T, dtype=torch.float32)


def hamming1_adjacency(m: int) -> np.ndarray:
    return neighbourhood_adjacency(m, "hamming1")


def random_pairing_adjacency(V: int, k: int, seed: int = 0) -> np.ndarray:
    """Each token ``t`` is paired with ``k`` distinct random tokens other than itself (row t)."""
    if not 1 <= k < V:
        raise FactscopeError(f"LCA: random pairing needs 1 <= k < V, got k={k}, V={V}")
    rng = np.random.default_rng(seed)
    A = np.zeros((V, V))
    for t in range(V):
        others = np.delete(np.arange(V), t)
        A[t, rng.choice(others, size=k, replace=False)] = 1.0
    return A


def orthonormal_embeddings(V: int, d: int | None = None, seed: int | None = None) -> torch.Tensor:
    """``[d, V]`` with orthonormal columns (``d >= V``): the identity, or a random isometry if seeded."""
    d = V if d is None else d
    if d < V:
        raise FactscopeError(f"LCA: orthonormal embeddings need d >= V, got d={d}, V={V}")
    if seed is None:
        return torch.eye(d, V)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, V, generator=g, dtype=torch.float64))
    return q.float()


def theorem1_model(task: LCATask, value: str = "constructed", d: int | None = None, seed: int | None = None,
                   neighbourhood: str = "hamming1") -> OneLayerTransformer:
    """The model of Theorem 1 / Lemma 2: ``W_K = W_Q = 0``, orthonormal embeddings and ``W_V`` =

    * ``"constructed"``: ``W_E A W_E^T`` with ``A`` the pairing of ``neighbourhood`` -- by default the
      paper's Hamming-1 pairing ``t -> N1(t)`` (for any task: Theorem 1's task has N = all but z*,
      its construction still pairs each token with its Hamming-1 neighbours);
    * ``"identity"``: ``I`` ("predict the most frequent context token");
    * ``"negative-identity"``: ``-I`` ("predict the least frequent context token").
    """
    E = orthonormal_embeddings(task.V, d, seed)
    if value == "constructed":
        W_V = constructed_value_matrix(E, neighbourhood_adjacency(task.m, neighbourhood))
    elif value == "identity":
        W_V = torch.eye(E.shape[0])
    elif value == "negative-identity":
        W_V = -torch.eye(E.shape[0])
    else:
        raise FactscopeError(
            f"LCA: value must be 'constructed', 'identity' or 'negative-identity', got {value!r}")
    return OneLayerTransformer.from_weights(E, W_V)


def rank_k(M, k: int) -> np.ndarray:
    U, s, Vt = np.linalg.svd(_np(M))
    return (U[:, :k] * s[:k]) @ Vt[:k]


def principal_angles(A, B, k: int, side: str = "left") -> np.ndarray:
    """Principal angles (degrees, ascending) between the k-dim column ("left") or row ("right")
    spaces of the rank-k approximations of ``A`` and ``B``."""
    A, B = _np(A), _np(B)
    if side == "right":
        A, B = A.T, B.T
    Ua = np.linalg.svd(A)[0][:, :k]
    Ub = np.linalg.svd(B)[0][:, :k]
    cos = np.clip(np.linalg.svd(Ua.T @ Ub, compute_uv=False), -1.0, 1.0)
    return np.sort(np.degrees(np.arccos(cos)))


def inner_product_by_hamming(W_E, m: int) -> pd.DataFrame:
    """Mean/std of ``<W_E(t), W_E(t')>`` over token pairs ``t != t'`` at each Hamming distance 1..m
    (and of the squared norms at distance 0)."""
    E = _np(W_E)
    G = E.T @ E
    H = hamming_matrix(m)
    rows = []
    for h in range(m + 1):
        vals = G[H == h]
        rows.append({"hamming": h, "mean_inner": float(vals.mean()), "std_inner": float(vals.std()),
                     "pairs": int(vals.size)})
    return pd.DataFrame(rows)


def linear_fit(x, y) -> dict:
    """Least-squares line ``y = slope x + intercept`` and its R^2."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}
