"""Latent concept association: generator, exact posterior, model, theory constructions, experiments, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from factscope.errors import FactscopeError
from factscope.lca.model import ModelConfig, OneLayerTransformer, TrainConfig, evaluate, expected_accuracy, train
from factscope.lca.task import (
    LCATask,
    bayes_accuracy,
    hamming_matrix,
    latents,
    log_posterior,
    mixed_contexts,
    neighbourhood_adjacency,
    posterior,
)
from factscope.lca.theory import (
    constructed_value_matrix,
    inner_product_by_hamming,
    linear_fit,
    orthonormal_embeddings,
    principal_angles,
    random_pairing_adjacency,
    theorem1_model,
)

torch.set_num_threads(1)


# ---- task -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nb", ["all", "hamming1", "cluster1", "cluster2"])
def test_generator_frequencies_match_exact_distribution(nb):
    task = LCATask(m=3, L=6, w=0.6, beta=0.7, neighbourhood=nb)
    x, y = task.sample(60_000, seed=1)
    V = task.V
    # empirical p(z | z*) over the first L-1 positions and pi(z | z*) at the last one
    emp = np.zeros((V, V))
    np.add.at(emp, (np.repeat(y.numpy(), task.L - 1), x[:, :-1].reshape(-1).numpy()), 1)
    emp /= emp.sum(1, keepdims=True)
    last = np.zeros((V, V))
    np.add.at(last, (y.numpy(), x[:, -1].numpy()), 1)
    last /= last.sum(1, keepdims=True)
    assert np.abs(emp - task.p_matrix()).max() < 0.012
    assert np.abs(last - task.pi_matrix()).max() < 0.025
    # the last token is never outside N(z*), and never z* itself
    assert (task.pi_matrix()[y, x[:, -1]] > 0).all()
    assert (x[:, -1] != y).all()
    # outputs are uniform
    assert np.abs(np.bincount(y.numpy(), minlength=V) / len(y) - 1 / V).max() < 0.01


def test_pi_definition():
    task = LCATask(m=4, beta=2.0, neighbourhood="all")
    pi = task.pi_matrix()
    H = hamming_matrix(4)
    assert np.allclose(pi.sum(1), 1)
    assert np.all(np.diag(pi) == 0)
    # ratio between distances 1 and 3 is exp(2 / beta)
    assert math.isclose(pi[0, 1] / pi[0, 7], math.exp(2 / 2.0))
    assert np.all((neighbourhood_adjacency(4, "hamming1") > 0) == (H == 1))
    # cluster by the first latent = the most significant bit
    A = neighbourhood_adjacency(4, "cluster1")
    assert A[0, 7] == 1 and A[0, 8] == 0 and A[9, 15] == 1 and A[9, 9] == 0
    assert latents(3)[5].tolist() == [1, 0, 1]


def test_sampling_is_seeded():
    task = LCATask(m=5, L=16)
    a, ya = task.sample(100, seed=3)
    b, yb = task.sample(100, seed=3)
    c, _ = task.sample(100, seed=4)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)


def test_posterior_agrees_with_brute_force_count():
    task = LCATask(m=2, L=2, w=0.5, beta=1.0, neighbourhood="all")
    x, y = task.sample(400_000, seed=7)
    V = task.V
    ctx = (x[:, 0] * V + x[:, 1]).numpy()
    counts = np.zeros((V * V, V))
    np.add.at(counts, (ctx, y.numpy()), 1)
    seen = counts.sum(1) > 2000
    emp = counts[seen] / counts[seen].sum(1, keepdims=True)
    all_ctx = torch.tensor([[i // V, i % V] for i in range(V * V)])
    exact = posterior(task, all_ctx).numpy()[seen]
    assert seen.sum() >= 8
    assert np.abs(emp - exact).max() < 0.02
    # contexts whose last token cannot come from pi(.|y) get zero posterior for that y
    lp = log_posterior(task, torch.tensor([[1, 2]]))
    assert lp[0, 2].item() == -math.inf


def test_bayes_accuracy_grows_with_L():
    task = LCATask(m=5, w=0.2)
    accs = [bayes_accuracy(task, n=3000, L=L) for L in (4, 16, 64)]
    assert accs[0] < accs[1] < accs[2]
    assert 1 / task.V < accs[0]


def test_mixed_contexts():
    task = LCATask(m=5, L=40, w=1.0, neighbourhood="hamming1")
    x, y, y2 = mixed_contexts(task, 2000, 1.0, seed=0)
    assert (y != y2).all()
    H = torch.as_tensor(hamming_matrix(5))
    assert (H[y2[:, None], x[:, :-1]] == 1).all()  # all from y' when frac = 1
    assert (H[y, x[:, -1]] == 1).all()  # last from pi(.|y)
    x0, y0, _ = mixed_contexts(task, 2000, 0.0, seed=0)
    assert (H[y0[:, None], x0] == 1).all()


@pytest.mark.parametrize(
    "kw",
    [dict(m=0), dict(m=13), dict(m=2.5), dict(w=1.5), dict(w=-0.1), dict(beta=0), dict(L=0),
     dict(neighbourhood="hamming2"), dict(m=2, neighbourhood="cluster2"), dict(m=1, neighbourhood="cluster1")],
)
def test_bad_task_input_raises(kw):
    with pytest.raises(FactscopeError):
        LCATask(**kw)


def test_bad_other_input_raises():
    task = LCATask(m=3)
    with pytest.raises(FactscopeError, match="context tokens"):
        log_posterior(task, torch.tensor([[0, 8]]))
    with pytest.raises(FactscopeError, match="fraction"):
        mixed_contexts(task, 10, 1.5)
    with pytest.raises(FactscopeError):
        ModelConfig(value="random")
    with pytest.raises(FactscopeError):
        ModelConfig(d=0)
    with pytest.raises(FactscopeError):
        random_pairing_adjacency(8, 8)
    with pytest.raises(FactscopeError):
        orthonormal_embeddings(16, d=8)


# ---- model ------------------------------------------------------------------------------------------


def test_forward_matches_the_paper_formula():
    V, d, da, L = 16, 6, 5, 7
    model = OneLayerTransformer(V, ModelConfig(d=d, d_a=da), seed=3)
    x = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        for b in range(4):
            U = model.W_E[:, x[b]]  # [d, L]
            A = torch.softmax((model.W_K @ U).T @ (model.W_Q @ U) / math.sqrt(da), dim=0)  # columns
            attn = U @ A
            f = model.W_E.T @ model.W_V @ attn  # [V, L]
            assert torch.allclose(out[b], f[:, -1], atol=1e-5)


def test_model_options():
    V = 32
    m = OneLayerTransformer(V, ModelConfig(d=8, d_a=4, value="identity", embedding="frozen", attention="uniform"))
    assert torch.equal(m.W_V, torch.eye(8)) and not m.W_V.requires_grad
    assert not m.W_E.requires_grad and not m.W_K.requires_grad
    assert (m.W_K == 0).all() and (m.W_Q == 0).all()
    x = torch.randint(0, V, (3, 9))
    assert torch.allclose(m.attention(x), torch.full((3, 9), 1 / 9))
    assert not any(p.requires_grad for p in m.parameters())
    # d > V is allowed
    big = OneLayerTransformer(V, ModelConfig(d=64, d_a=8))
    assert big(x).shape == (3, V)


def test_frozen_weights_do_not_move_in_training():
    task = LCATask(m=4, L=16, w=0.5)
    r = train(task, ModelConfig(d=8, d_a=8, value="identity", embedding="frozen"), TrainConfig(steps=20, eval_n=256))
    init = OneLayerTransformer(task.V, ModelConfig(d=8, d_a=8, value="identity", embedding="frozen"), seed=0)
    assert torch.equal(r.model.W_E, init.W_E)
    assert torch.equal(r.model.W_V, torch.eye(8))
    assert not torch.equal(r.model.W_K, init.W_K)


def test_training_learns_the_task():
    task = LCATask(m=4, L=32, w=0.3)
    cfg = TrainConfig(steps=150, batch=128, eval_n=1024)
    r = train(task, ModelConfig(d=16, d_a=16), cfg)
    r2 = train(task, ModelConfig(d=16, d_a=16), cfg)
    assert r.accuracy == r2.accuracy  # seeded
    assert np.mean(r.losses[:10]) > np.mean(r.losses[-10:]) + 0.5
    assert r.accuracy > 0.6 > 1 / task.V


def test_expected_accuracy_counts_ties_fractionally():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    assert math.isclose(expected_accuracy(logits, y), (0.5 + 0 + 1) / 3)


# ---- theory -----------------------------------------------------------------------------------------


def test_construction_is_an_associative_memory():
    # with orthonormal embeddings, W_E^T W_V W_E = A, so the logit of t = fraction of context in N(t)
    m = 4
    A = neighbourhood_adjacency(m, "hamming1")
    E = orthonormal_embeddings(16, d=24, seed=1)
    W_V = constructed_value_matrix(E, A)
    assert torch.allclose(E.T @ W_V @ E, torch.as_tensor(A, dtype=torch.float32), atol=1e-5)
    task = LCATask(m=m, L=10, w=0.5, neighbourhood="hamming1")
    model = theorem1_model(task, d=24, seed=1)
    x, _ = task.sample(50, seed=2)
    counts = torch.zeros(50, 16).scatter_add(1, x, torch.ones_like(x, dtype=torch.float32))
    with torch.no_grad():
        assert torch.allclose(model(x), counts @ torch.as_tensor(A, dtype=torch.float32).T / 10, atol=1e-5)


def test_theorem1_hamming1_construction_beats_least_frequent_rule():
    # Theorem 1: N = all but z*, w = 1, uniform attention, orthonormal W_E and the Hamming-1 construction.
    # z*'s Hamming-1 neighbours are the most frequent context tokens, so "the token whose neighbours are
    # most frequent" is z* long before "the least frequent token" (W_V = -I) is.
    task = LCATask(m=6, L=64, w=1.0, beta=1.0, neighbourhood="all")
    err = {v: 1 - evaluate(theorem1_model(task, v), task, n=2000, seed=5)
           for v in ("constructed", "negative-identity")}
    assert err["constructed"] < 0.01
    assert err["negative-identity"] > 0.5
    # and the error vanishes with L (m = 4): 0.14 at L = 16, 0 from L = 256
    small = LCATask(m=4, L=16, w=1.0, neighbourhood="all")
    e16 = 1 - evaluate(theorem1_model(small), small, n=2000, seed=5)
    e256 = 1 - evaluate(theorem1_model(small.with_(L=256)), small.with_(L=256), n=2000, seed=5)
    assert 0.05 < e16 < 0.3 and e256 == 0.0


def test_theorem1_model_pairs_each_token_with_exactly_its_hamming1_neighbours():
    # E^T W_V E must be the Hamming-1 adjacency itself (not Hamming {1, 2}, not the task's own "all").
    task = LCATask(m=5, L=16, w=1.0, neighbourhood="all")
    model = theorem1_model(task)
    E = model.W_E.detach().double()
    A = (E.T @ model.W_V.detach().double() @ E).numpy()
    H = hamming_matrix(task.m)
    assert np.allclose(A, (H == 1).astype(float), atol=1e-5)


def test_task_neighbourhood_construction_is_the_least_frequent_rule():
    # the old (wrong) Theorem 1 model: W_E (J - I) W_E^T has logits 1 - count/L, the ranking of W_V = -I
    task = LCATask(m=4, L=32, w=1.0, neighbourhood="all")
    x, _ = task.sample(500, seed=3)
    with torch.no_grad():
        own = theorem1_model(task, "constructed", neighbourhood="all")(x)
        neg = theorem1_model(task, "negative-identity")(x)
    assert torch.allclose(own, 1 + neg, atol=1e-5)


def test_lemma2_hamming1_constructed_exact_identity_fails():
    for seed in (None, 4):
        task = LCATask(m=5, L=64, w=1.0, neighbourhood="hamming1")
        d = None if seed is None else 40
        acc_c = evaluate(theorem1_model(task, "constructed", d=d, seed=seed), task, n=3000, seed=1)
        acc_i = evaluate(theorem1_model(task, "identity", d=d, seed=seed), task, n=3000, seed=1)
        assert acc_c == 1.0
        assert acc_i == 0.0  # error exactly 1: z* never appears in the context, so W_V = I never picks it


def test_principal_angles_and_fit():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(10, 10))
    assert principal_angles(M, M, 3).max() < 1e-5
    P = np.zeros((10, 10))
    P[:3, :3] = np.eye(3)
    Q = np.zeros((10, 10))
    Q[5:8, 5:8] = np.eye(3)
    assert np.allclose(principal_angles(P, Q, 3), 90)
    f = linear_fit([1, 2, 3, 4], [3, 1, -1, -3])
    assert math.isclose(f["slope"], -2) and math.isclose(f["r2"], 1.0)


def test_inner_product_by_hamming_on_sign_embeddings():
    m = 4
    E = torch.as_tensor(2 * latents(m).T - 1, dtype=torch.float64)  # [m, V], +-1 codes
    ip = inner_product_by_hamming(E, m)
    assert np.allclose(ip.mean_inner, m - 2 * ip.hamming)
    assert np.allclose(ip.std_inner, 0)
    assert ip.pairs.tolist() == [16 * math.comb(4, h) for h in range(5)]


def test_random_pairing_degree():
    A = random_pairing_adjacency(32, 5, seed=0)
    assert (A.sum(1) == 5).all() and np.diag(A).sum() == 0


def test_efficacy_counts_logit_of_other_answer_above_true_answer():
    from factscope.lca.experiments import efficacy

    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    y, y_alt = torch.tensor([2, 0]), torch.tensor([1, 1])
    # row 0: logit y'=2 > logit y=1; row 1: logit y'=3 > logit y=1 -> efficacy 1.0,
    # while y' is the top prediction in row 1 only (rate of predicting y' = 0.5)
    assert efficacy(scores, y, y_alt) == 1.0
    assert efficacy(scores, torch.tensor([0, 1]), torch.tensor([1, 1])) == 0.0
    assert efficacy(scores, torch.tensor([0, 1]), torch.tensor([2, 2])) == 0.0
    assert efficacy(scores, torch.tensor([2, 0]), torch.tensor([0, 2])) == 1.0
