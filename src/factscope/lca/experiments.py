"""The five LCA experiments, each a plain function returning dataclasses / DataFrames, plus the
figure makers and :func:`run_all`, which writes everything into a :class:`factscope.runs.Run`.

Defaults (:class:`LCAConfig`) and why:

* task: ``m = 6`` latents (``V = 64`` tokens), ``L = 64``, ``w = 0.2``, ``beta = 1``, Hamming-1
  neighbourhood: the Bayes-optimal accuracy is about 0.96 at L = 64 and 0.997 at L = 128, so the task
  is solvable but not trivial (with ``w = 0.5`` every variant is at 100 % and nothing can be told
  apart); ``V = 64`` keeps both ``d < V`` and ``d > V`` cheap on a CPU;
* model: ``d = d_a = 32`` (under-parameterized, ``d < V``), Gaussian init (std ``1/sqrt(d)``);
* training: AdamW, lr ``1e-2`` with cosine decay, weight decay ``1e-4``, batch 256, 800 steps of
  fresh samples, seed 0; accuracy on 4096 held-out contexts (seed 999), ties counted fractionally.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from factscope.errors import FactscopeError
from factscope.lca.model import ModelConfig, OneLayerTransformer, TrainConfig, TrainResult, evaluate, train, expected_accuracy
from factscope.lca.task import LCATask, bayes_accuracy, cluster_of, hamming_matrix, mixed_contexts, posterior
from factscope.lca.theory import (
    constructed_value_matrix,
    hamming1_adjacency,
    inner_product_by_hamming,
    linear_fit,
    principal_angles,
    random_pairing_adjacency,
)


@dataclass(frozen=True)
class LCAConfig:
    m: int = 6
    L: int = 64
    w: float = 0.2
    beta: float = 1.0
    neighbourhood: str = "hamming1"
    d: int = 32
    d_a: int = 32
    steps: int = 800
    batch: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    eval_n: int = 4096
    threads: int = 1
    # experiment grids
    value_L: tuple = (64, 128)
    value_d: tuple = (8, 16, 32, 64, 128)
    embed_d: tuple = (8, 16, 32, 128)
    geometry_all_w: float | None = 0.5
    attention_neighbourhoods: tuple = ("cluster1", "cluster2")
    attention_w: float = 0.5
    hijack_fracs: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    hijack_L: tuple = (2, 4, 8, 16, 32, 64, 128, 256)

    def __post_init__(self):
        self.task()  # validates m, L, w, beta, neighbourhood
        self.model()  # validates d, d_a
        self.train_cfg()  # validates batch, lr
        if self.steps < 1:
            raise FactscopeError(f"LCA: steps must be >= 1, got {self.steps}")
        for name in ("value_d", "embed_d", "value_L", "hijack_L"):
            vals = getattr(self, name)
            if not vals or any(int(v) < 1 for v in vals):
                raise FactscopeError(f"LCA: {name} must be a non-empty list of positive integers, got {vals!r}")

    @classmethod
    def quick(cls, **kw) -> "LCAConfig":
        """The short demo configuration (well under a minute on a CPU)."""
        base = dict(m=5, w=0.25, d=16, d_a=16, steps=250, eval_n=2048, value_L=(64,), value_d=(8, 16, 64),
                    embed_d=(8, 16, 64), attention_neighbourhoods=("cluster1",),
                    hijack_fracs=(0.0, 0.25, 0.5, 0.75, 1.0), hijack_L=(4, 16, 64, 256))
        base.update(kw)
        return cls(**base)

    def task(self, **kw) -> LCATask:
        t = LCATask(m=self.m, L=self.L, w=self.w, beta=self.beta, neighbourhood=self.neighbourhood)
        return t.with_(**kw) if kw else t

    def model(self, **kw) -> ModelConfig:
        return ModelConfig(**{"d": self.d, "d_a": self.d_a, **kw})

    def train_cfg(self, **kw) -> TrainConfig:
        return TrainConfig(**{"steps": self.steps, "batch": self.batch, "lr": self.lr,
                              "weight_decay": self.weight_decay, "seed": self.seed, "eval_n": self.eval_n, **kw})

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


class Trainer:
    """Trains models on demand and remembers them, so experiments share identical trainings."""

    def __init__(self, cfg: LCAConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self._cache: dict = {}

    def get(self, task: LCATask, model: ModelConfig, label: str = "") -> TrainResult:
        key = (task, model)
        if key not in self._cache:
            torch.set_num_threads(self.cfg.threads)
            desc = f"LCA {label} d={model.d} L={task.L}" if self.progress else False
            self._cache[key] = train(task, model, self.cfg.train_cfg(), progress=desc)
        return self._cache[key]


def _trainer(cfg, trainer, progress):
    return trainer if trainer is not None else Trainer(cfg, progress)


# ---- 1. value matrix --------------------------------------------------------------------------


def value_matrix_experiment(cfg: LCAConfig = LCAConfig(), trainer: Trainer | None = None,
                            progress: bool = True) -> pd.DataFrame:
    """Accuracy with ``W_V`` trained vs frozen at the identity for each ``L`` and ``d`` (Figure 3a)."""
    tr = _trainer(cfg, trainer, progress)
    rows = []
    for L in cfg.value_L:
        task = cfg.task(L=int(L))
        bayes = bayes_accuracy(task, n=cfg.eval_n)
        for d in cfg.value_d:
            for value in ("trained", "identity"):
                r = tr.get(task, cfg.model(d=int(d), d_a=int(d), value=value), f"value={value}")
                rows.append({"L": int(L), "d": int(d), "W_V": value, "accuracy": r.accuracy,
                             "final_loss": r.final_loss, "bayes_accuracy": bayes, "seconds": r.seconds})
    return pd.DataFrame(rows)


def plot_value_matrix(df: pd.DataFrame, V: int):
    from factscope.plotting import PALETTE, new_figure

    Ls = sorted(df.L.unique())
    fig, axes = new_figure(1, len(Ls), squeeze=False, sharey=True, width=5.2 * len(Ls), height=4.0,
                           title="Value matrix: trained vs frozen at the identity")
    for ax, L in zip(axes[0], Ls):
        sub = df[df.L == L]
        for i, (value, label) in enumerate((("trained", "W_V trained"), ("identity", "W_V = I (frozen)"))):
            s = sub[sub.W_V == value].sort_values("d")
            ax.plot(s.d, s.accuracy, "o-", color=PALETTE[i], label=label)
        ax.axhline(sub.bayes_accuracy.iloc[0], color="grey", ls="--", label="Bayes optimal")
        ax.axvline(V, color="grey", ls=":", lw=1)
        ax.text(V, 0.55, f"d = V = {V} ", color="grey", fontsize=8, va="center", ha="right", rotation=90)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sub.d.unique()), [str(d) for d in sorted(sub.d.unique())])
        ax.set_xlabel("embedding dimension d")
        ax.set_title(f"context length L = {L}")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(loc="lower right")
    return fig


# ---- 2. constructed value matrix ---------------------------------------------------------------


@dataclass
class ConstructedResult:
    accuracy: dict  # trained / constructed / random / initial
    angles: pd.DataFrame  # principal angles vs the trained W_V
    trained_spectrum: np.ndarray
    rank: int


def constructed_experiment(cfg: LCAConfig = LCAConfig(), trainer: Trainer | None = None,
                           progress: bool = True) -> ConstructedResult:
    """Replace the trained ``W_V`` with ``W_E A W_E^T`` (A = Hamming-1 pairing) and with a random
    pairing of the same degree; compare accuracies and the principal angles between rank-m
    approximations."""
    tr = _trainer(cfg, trainer, progress)
    task = cfg.task()
    res = tr.get(task, cfg.model(), "value=trained")
    model = res.model
    E = model.W_E.detach()
    W_trained = model.W_V.detach()
    mats = {
        "trained": W_trained,
        "constructed": constructed_value_matrix(E, hamming1_adjacency(cfg.m)),
        "random": constructed_value_matrix(E, random_pairing_adjacency(task.V, cfg.m, seed=cfg.seed + 7)),
        "initial": model.W_V_init,
    }
    acc = {k: evaluate(model, task, cfg.eval_n, seed=999, W_V=M) for k, M in mats.items()}
    k = cfg.m
    rows = []
    for name in ("constructed", "random", "initial"):
        for side in ("left", "right"):
            ang = principal_angles(W_trained, mats[name], k, side=side)
            rows.append({"versus": name, "space": "column" if side == "left" else "row",
                         "smallest_angle_deg": float(ang[0]), "median_angle_deg": float(np.median(ang)),
                         "largest_angle_deg": float(ang[-1])})
    spectrum = np.linalg.svd(W_trained.double().numpy(), compute_uv=False)
    return ConstructedResult(acc, pd.DataFrame(rows), spectrum, k)


def plot_constructed(r: ConstructedResult, bayes: float):
    from factscope.plotting import PALETTE, new_figure

    fig, (a1, a2) = new_figure(1, 2, width=11, height=4.0, title="Constructed value matrix W_V = W_E A W_E^T")
    names = ["trained", "constructed", "random", "initial"]
    labels = ["trained W_V", "Hamming-1\nconstruction", "random-pairing\nconstruction", "W_V at init"]
    vals = [r.accuracy[n] for n in names]
    a1.bar(labels, vals, color=[PALETTE[i] for i in range(4)])
    for i, v in enumerate(vals):
        a1.text(i, v + 0.01, f"{v:.3f}", ha="center", va="bottom")
    a1.axhline(bayes, color="grey", ls="--", label=f"Bayes optimal ({bayes:.3f})")
    a1.set_ylim(0, 1.1)
    a1.set_ylabel("test accuracy (other weights trained)")
    a1.legend(loc="upper right")
    a1.set_title("accuracy with each W_V")
    ang = r.angles[r.angles.space == "column"]
    x = np.arange(len(ang))
    a2.bar(x - 0.2, ang.smallest_angle_deg, 0.4, color=PALETTE[0], label="smallest")
    a2.bar(x + 0.2, ang.median_angle_deg, 0.4, color=PALETTE[5], label="median")
    a2.set_xticks(x, [f"trained vs\n{v}" for v in ang.versus])
    a2.set_ylabel("principal angle (degrees)")
    a2.set_ylim(0, 95)
    a2.set_title(f"angles between rank-{r.rank} column spaces")
    a2.legend(loc="upper left")
    return fig


# ---- 3. embeddings ------------------------------------------------------------------------------


@dataclass
class EmbeddingResult:
    accuracy: pd.DataFrame  # d, embedding, W_V, accuracy
    inner: pd.DataFrame  # d, W_V, hamming, mean_inner, std_inner
    fits: pd.DataFrame  # d, W_V, slope, intercept, r2
    spectra: pd.DataFrame  # d, W_V, index, singular_value
    V: int


def embeddings_experiment(cfg: LCAConfig = LCAConfig(), trainer: Trainer | None = None,
                          progress: bool = True) -> EmbeddingResult:
    """Trained vs frozen (Gaussian) embeddings for d < V and d > V; inner product of embeddings
    against Hamming distance with a linear fit (W_V trained, and W_V frozen at I); spectra of W_E.

    The geometry is measured on the main task and, if ``cfg.geometry_all_w`` is set, also on the
    task with the "all but z*" neighbourhood and ``w = cfg.geometry_all_w`` (there the log-likelihood
    ``log p(x | z*)`` is close to linear in the Hamming distance).  ``mean_assoc`` in the inner-product
    table is the mean of ``(W_E^T W_V W_E)[t, t']``, the association the value matrix makes."""
    tr = _trainer(cfg, trainer, progress)
    task = cfg.task()
    acc_rows, inner_rows, fit_rows, spec_rows = [], [], [], []
    for d in cfg.embed_d:
        d = int(d)
        for emb in ("trained", "frozen"):
            r = tr.get(task, cfg.model(d=d, d_a=d, embedding=emb), f"embedding={emb}")
            acc_rows.append({"d": d, "regime": "d < V" if d < task.V else "d >= V", "embedding": emb,
                             "W_V": "trained", "accuracy": r.accuracy})
    gtasks = [task]
    if cfg.geometry_all_w is not None and task.neighbourhood != "all":
        gtasks.append(cfg.task(neighbourhood="all", w=float(cfg.geometry_all_w)))
    for gt in gtasks:
        for d in cfg.embed_d:
            d = int(d)
            for value in ("trained", "identity"):
                r = tr.get(gt, cfg.model(d=d, d_a=d, value=value), f"value={value} {gt.neighbourhood}")
                E = r.model.W_E.detach()
                ip = inner_product_by_hamming(E, cfg.m)
                M = (E.T @ r.model.W_V.detach() @ E).double().numpy()
                ip["mean_assoc"] = [float(M[hamming_matrix(cfg.m) == h].mean()) for h in ip.hamming]
                meta = {"neighbourhood": gt.neighbourhood, "w": gt.w, "d": d, "W_V": value}
                for i, (k, v) in enumerate(meta.items()):
                    ip.insert(i, k, v)
                inner_rows.append(ip)
                off = ip[ip.hamming >= 1]
                fit = linear_fit(off.hamming, off.mean_inner)
                fit_rows.append({**meta, "regime": "d < V" if d < task.V else "d >= V", "accuracy": r.accuracy,
                                 **fit})
                sv = np.linalg.svd(E.double().numpy(), compute_uv=False)
                spec_rows += [{**meta, "index": i + 1, "singular_value": float(v)} for i, v in enumerate(sv)]
    return EmbeddingResult(pd.DataFrame(acc_rows), pd.concat(inner_rows, ignore_index=True),
                           pd.DataFrame(fit_rows), pd.DataFrame(spec_rows), task.V)


def plot_embeddings(r: EmbeddingResult, m: int, main_d: int | None = None):
    from factscope.plotting import PALETTE, new_figure

    nbs = list(dict.fromkeys(r.fits.neighbourhood))
    fig, axes = new_figure(2, 2, squeeze=False, width=13, height=9, title="Embeddings")
    a1, a3 = axes[0]
    geo_axes = list(axes[1])
    acc = r.accuracy
    ds = sorted(acc.d.unique())
    x = np.arange(len(ds))
    for i, emb in enumerate(("trained", "frozen")):
        s = acc[acc.embedding == emb].set_index("d").loc[ds]
        a1.bar(x + (i - 0.5) * 0.38, s.accuracy, 0.38, color=PALETTE[i],
               label="W_E trained" if emb == "trained" else "W_E frozen (Gaussian init)")
    a1.set_xticks(x, [f"d={d}\n({'d<V' if d < r.V else 'd>=V'})" for d in ds])
    for xi, d in enumerate(ds):
        for i, emb in enumerate(("trained", "frozen")):
            v = float(acc[(acc.d == d) & (acc.embedding == emb)].accuracy.iloc[0])
            a1.text(xi + (i - 0.5) * 0.38, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7.5)
    a1.set_ylim(0, 1.25)
    a1.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a1.set_ylabel("test accuracy (W_V trained)")
    a1.set_title(f"trained vs frozen embeddings (V = {r.V})")
    a1.legend(loc="upper center", fontsize=8, ncol=2)

    under = [d for d in ds if d < r.V]
    show = [main_d if main_d in under else (under[len(under) // 2] if under else ds[0])]
    over = [d for d in ds if d >= r.V]
    if over:
        show.append(over[-1])
    styles = {"trained": "-", "identity": "--"}
    for ax, nb in zip(geo_axes, nbs):
        k = 0
        for d in show:
            for value in ("trained", "identity"):
                sel = (r.inner.neighbourhood == nb) & (r.inner.d == d) & (r.inner.W_V == value)
                s = r.inner[sel & (r.inner.hamming >= 1)]
                norm = float(r.inner[sel & (r.inner.hamming == 0)].mean_inner.iloc[0])  # mean squared norm
                f = r.fits[(r.fits.neighbourhood == nb) & (r.fits.d == d) & (r.fits.W_V == value)].iloc[0]
                lab = f"d={d}, W_V {'trained' if value == 'trained' else '= I'} (R²={f.r2:.2f})"
                ax.errorbar(s.hamming, s.mean_inner / norm, yerr=s.std_inner / norm, fmt="o", color=PALETTE[k],
                            capsize=3, ms=4)
                hh = np.array([1, m])
                ax.plot(hh, (f.slope * hh + f.intercept) / norm, styles[value], color=PALETTE[k], label=lab)
                k += 1
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("Hamming distance between the two tokens")
        ax.set_ylabel("mean <W_E(t), W_E(t')> / mean |W_E(t)|² (± std)")
        w = r.fits[r.fits.neighbourhood == nb].w.iloc[0]
        ax.set_title(f"embedding geometry, {NB_NAMES.get(nb, nb)}, w = {w:g}\n(points: means over token pairs; lines: linear fits)")
        ax.legend(fontsize=7.5, loc="upper right")
    for ax in geo_axes[len(nbs):]:
        ax.set_visible(False)

    k = 0
    for d in show:
        for value in ("trained", "identity"):
            s = r.spectra[(r.spectra.neighbourhood == nbs[0]) & (r.spectra.d == d) & (r.spectra.W_V == value)]
            a3.plot(s["index"], s.singular_value / s.singular_value.max(), marker="o", ms=3, color=PALETTE[k],
                    ls=styles[value], label=f"d={d}, W_V {'trained' if value == 'trained' else '= I'}")
            k += 1
    a3.axvline(m, color="grey", ls=":", lw=1)
    a3.text(m, 0.55, f" m = {m}", color="grey", fontsize=8, transform=a3.get_xaxis_transform())
    a3.set_yscale("log")
    a3.set_xlabel("singular value index")
    a3.set_ylabel("singular value / largest")
    a3.set_title("spectrum of W_E")
    a3.legend(fontsize=7.5, loc="lower left")
    return fig


# ---- 4. attention selection -----------------------------------------------------------------------


@dataclass
class AttentionResult:
    table: pd.DataFrame  # neighbourhood, same/other mean weight per key position, mass, accuracy
    heat: dict  # neighbourhood -> [k, k] mean attention per key position x L (query cluster, key cluster)
    scores: dict  # neighbourhood -> [V, V] pre-softmax score matrix (query token, key token)


def attention_experiment(cfg: LCAConfig = LCAConfig(), trainer: Trainer | None = None,
                         progress: bool = True) -> AttentionResult:
    """In the cluster settings, the attention of the last position to context tokens of its own
    cluster vs the other cluster(s) (Figure 3c)."""
    tr = _trainer(cfg, trainer, progress)
    rows, heat, scores = [], {}, {}
    for nb in cfg.attention_neighbourhoods:
        kbits = 1 if nb == "cluster1" else 2
        task = cfg.task(neighbourhood=nb, w=cfg.attention_w)
        r = tr.get(task, cfg.model(), f"attention {nb}")
        model = r.model
        x, y = task.sample(cfg.eval_n, seed=4242)
        with torch.no_grad():
            a = model.attention(x)[:, :-1].double()  # weights on the first L-1 positions
            E = model.W_E
            S = ((model.W_Q @ E).T @ (model.W_K @ E) / np.sqrt(model.W_K.shape[0])).double().numpy()
        cl = torch.as_tensor(cluster_of(task.m, kbits))
        cq = cl[x[:, -1]]  # cluster of the last (query) token
        ck = cl[x[:, :-1]]
        same = ck == cq[:, None]
        w_same = float(a[same].mean())
        w_other = float(a[~same].mean())
        k = 2**kbits
        H = np.full((k, k), np.nan)
        for i in range(k):
            for j in range(k):
                sel = (cq[:, None] == i) & (ck == j)
                if sel.any():
                    H[i, j] = float(a[sel].mean()) * task.L
        heat[nb] = H
        scores[nb] = S
        rows.append({"neighbourhood": nb, "clusters": k, "w": task.w, "L": task.L,
                     "attention_same_cluster": w_same, "attention_other_cluster": w_other,
                     "uniform_weight": 1.0 / task.L, "ratio_same_over_other": w_same / w_other,
                     "mass_same_cluster": float((a * same).sum(1).mean()),
                     "mass_other_cluster": float((a * ~same).sum(1).mean()),
                     "accuracy": r.accuracy, "accuracy_uniform_attention":
                         tr.get(task, cfg.model(attention="uniform"), f"uniform attention {nb}").accuracy,
                     "bayes_accuracy": bayes_accuracy(task, n=cfg.eval_n)})
    return AttentionResult(pd.DataFrame(rows), heat, scores)


def plot_attention(r: AttentionResult):
    from factscope.plotting import heatmap, new_figure

    nbs = list(r.heat)
    fig, axes = new_figure(len(nbs), 2, squeeze=False, width=11, height=4.4 * len(nbs),
                           title="Attention of the last token by cluster")
    for row, nb in zip(axes, nbs):
        H = r.heat[nb]
        k = H.shape[0]
        names = [format(i, f"0{int(np.log2(k))}b") + "…" for i in range(k)]
        heatmap(row[0], H, xlabels=names, ylabels=names, xlabel="cluster of the attended context token",
                ylabel="cluster of the last token", cmap="viridis",
                colorbar="mean attention per token × L (1 = uniform)")
        for i in range(k):
            for j in range(k):
                row[0].text(j, i, f"{H[i, j]:.2f}", ha="center", va="center",
                            color="white" if H[i, j] < np.nanmax(H) * 0.6 else "black")
        what = "first latent" if k == 2 else "first two latents"
        row[0].set_title(f"{nb} ({k} clusters by the {what}): attention")
        S = r.scores[nb]
        V = S.shape[0]
        im = heatmap(row[1], S, xlabel="attended token (id; clusters are contiguous)", ylabel="last token (id)",
                     cmap="RdBu_r", center=0.0, colorbar="attention score q·k/√d_a", max_ticks=9)
        for b in range(1, k):
            row[1].axhline(b * V / k - 0.5, color="black", lw=0.8)
            row[1].axvline(b * V / k - 0.5, color="black", lw=0.8)
        row[1].set_title(f"{nb}: pre-softmax scores, token by token")
    return fig


# ---- 5. hijacking -----------------------------------------------------------------------------------


@dataclass
class HijackResult:
    by_fraction: pd.DataFrame
    by_length: pd.DataFrame


def hijack_experiment(cfg: LCAConfig = LCAConfig(), trainer: Trainer | None = None,
                      progress: bool = True) -> HijackResult:
    """Mix samples of ``p(x|y')`` into contexts for ``y``: accuracy and rate of predicting ``y'`` against
    the mixing fraction (trained model and the Bayes predictor of the clean task); accuracy against L."""
    tr = _trainer(cfg, trainer, progress)
    task = cfg.task()
    model = tr.get(task, cfg.model(), "value=trained").model
    rows = []
    for f in cfg.hijack_fracs:
        x, y, y2 = mixed_contexts(task, cfg.eval_n, float(f), seed=777)
        with torch.no_grad():
            logits = model(x)
        post = posterior(task, x)
        rows.append({"fraction": float(f),
                     "accuracy": expected_accuracy(logits, y), "rate_y_alt": expected_accuracy(logits, y2),
                     "bayes_accuracy": expected_accuracy(post, y), "bayes_rate_y_alt": expected_accuracy(post, y2)})
    lrows = []
    for L in cfg.hijack_L:
        lrows.append({"L": int(L), "accuracy": evaluate(model, task, cfg.eval_n, seed=555, L=int(L)),
                      "bayes_accuracy": bayes_accuracy(task, n=cfg.eval_n, L=int(L)), "trained_at_L": task.L})
    return HijackResult(pd.DataFrame(rows), pd.DataFrame(lrows))


def plot_hijack(r: HijackResult, V: int):
    from factscope.plotting import PALETTE, new_figure

    fig, (a1, a2) = new_figure(1, 2, width=11, height=4.2, title="Hijacking the LCA model")
    df = r.by_fraction
    a1.plot(df.fraction, df.accuracy, "o-", color=PALETTE[0], label="model: predicts y (correct)")
    a1.plot(df.fraction, df.rate_y_alt, "s-", color=PALETTE[1], label="model: predicts y' (hijacked)")
    a1.plot(df.fraction, df.bayes_accuracy, "o--", color=PALETTE[0], alpha=0.5, label="Bayes (clean task): y")
    a1.plot(df.fraction, df.bayes_rate_y_alt, "s--", color=PALETTE[1], alpha=0.5, label="Bayes (clean task): y'")
    a1.set_xlabel("fraction of the first L-1 tokens drawn from p(x | y')")
    a1.set_ylabel("rate")
    a1.set_ylim(-0.02, 1.02)
    a1.set_title("mixing in samples for another output y'")
    a1.legend(fontsize=8, loc="center left")
    dl = r.by_length
    a2.plot(dl.L, dl.accuracy, "o-", color=PALETTE[0], label=f"model (trained at L={dl.trained_at_L.iloc[0]})")
    a2.plot(dl.L, dl.bayes_accuracy, "o--", color="grey", label="Bayes optimal")
    a2.axhline(1.0 / V, color="grey", ls=":", lw=1, label=f"chance (1/V = 1/{V})")
    a2.set_xscale("log", base=2)
    a2.set_xticks(list(dl.L), [str(v) for v in dl.L])
    a2.set_xlabel("context length L")
    a2.set_ylabel("test accuracy")
    a2.set_ylim(-0.02, 1.02)
    a2.set_title("accuracy against context length")
    a2.legend(fontsize=8, loc="lower right")
    return fig


# ---- writing into a Run -------------------------------------------------------------------------------

NB_NAMES = {"hamming1": "Hamming-1 neighbourhood", "all": "all-but-z* neighbourhood",
            "cluster1": "cluster neighbourhood", "cluster2": "two-latent cluster neighbourhood"}

EXPERIMENTS = ("value_matrix", "constructed", "embeddings", "attention", "hijack")


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def write_value_matrix(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    df = value_matrix_experiment(cfg, trainer, progress)
    run.save_table("lca_value_matrix", df)
    run.save_figure("lca_value_matrix", plot_value_matrix(df, 2**cfg.m))
    L0 = 64 if 64 in set(df.L) else int(df.L.min())
    sub = df[(df.L == L0) & (df.d == (cfg.d if cfg.d in set(df.d) else df.d.min()))]
    acc = {r.W_V: float(r.accuracy) for r in sub.itertuples()}
    summary = {"value_matrix": {"trained": acc["trained"], "identity": acc["identity"], "L": L0,
                                "d": int(sub.d.iloc[0])}}
    run.update_summary(summary)
    lines = []
    for L in sorted(df.L.unique()):
        s = df[df.L == L]
        wins = sum(float(s[(s.d == d) & (s.W_V == "trained")].accuracy.iloc[0]) >
                   float(s[(s.d == d) & (s.W_V == "identity")].accuracy.iloc[0]) for d in s.d.unique())
        lines.append(f"- L = {L}: trained W_V beats W_V = I at {wins} of {s.d.nunique()} dimensions "
                     f"(Bayes optimal {_fmt(s.bayes_accuracy.iloc[0])}).")
    text = (f"One-layer transformer on the LCA task (m = {cfg.m}, V = {2**cfg.m}, w = {cfg.w}, "
            f"Hamming-1 neighbourhood), value matrix trained or frozen at the identity. At L = {L0}, "
            f"d = {summary['value_matrix']['d']}: trained {_fmt(acc['trained'])}, identity {_fmt(acc['identity'])}.\n\n"
            + "\n".join(lines))
    run.add_section("lca_value_matrix", "LCA 1: value matrix (trained vs identity)", text,
                    figures=["lca_value_matrix"], tables=["lca_value_matrix"])
    return summary


def write_constructed(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    r = constructed_experiment(cfg, trainer, progress)
    bayes = bayes_accuracy(cfg.task(), n=cfg.eval_n)
    acc = pd.DataFrame([{"W_V": k, "accuracy": v} for k, v in r.accuracy.items()])
    run.save_table("lca_constructed_accuracy", acc)
    run.save_table("lca_constructed_angles", r.angles)
    run.save_figure("lca_constructed", plot_constructed(r, bayes))
    summary = {"constructed": {k: r.accuracy[k] for k in ("trained", "constructed", "random")}}
    summary["constructed"]["initial"] = r.accuracy["initial"]
    col = r.angles[r.angles.space == "column"].set_index("versus").smallest_angle_deg
    summary["constructed_smallest_angle_deg"] = {k: float(v) for k, v in col.items()}
    run.update_summary(summary)
    text = (f"The trained W_V (d = {cfg.d}) is replaced by W_V = Σ_t W_E(t) Σ_(t'∈N1(t)) W_E(t')ᵀ built from the "
            f"trained embeddings, and by the same construction with each token paired with {cfg.m} random tokens. "
            f"Accuracy: trained {_fmt(r.accuracy['trained'])}, Hamming-1 construction "
            f"{_fmt(r.accuracy['constructed'])}, random pairing {_fmt(r.accuracy['random'])}, "
            f"W_V at initialization {_fmt(r.accuracy['initial'])} (Bayes optimal {_fmt(bayes)}).\n\n"
            f"Smallest principal angle between the rank-{r.rank} column spaces of the trained W_V and: "
            + ", ".join(f"{k} {v:.1f}°" for k, v in col.items()) + ".")
    run.add_section("lca_constructed", "LCA 2: constructed value matrix", text, figures=["lca_constructed"],
                    tables=["lca_constructed_accuracy", "lca_constructed_angles"])
    return summary


def write_embeddings(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    r = embeddings_experiment(cfg, trainer, progress)
    run.save_table("lca_embeddings_accuracy", r.accuracy)
    run.save_table("lca_embeddings_inner", r.inner)
    run.save_table("lca_embeddings_fit", r.fits)
    run.save_table("lca_embeddings_spectrum", r.spectra)
    run.save_figure("lca_embeddings", plot_embeddings(r, cfg.m, cfg.d))
    d0 = cfg.d if cfg.d in set(r.fits.d) else int(r.fits.d.min())
    main_nb = cfg.neighbourhood
    fits = r.fits.set_index(["neighbourhood", "d", "W_V"])
    f_tr, f_id = fits.loc[(main_nb, d0, "trained")], fits.loc[(main_nb, d0, "identity")]
    summary = {"embedding_fit_r2": float(f_tr.r2), "embedding_fit_slope": float(f_tr.slope),
               "embedding_fit_r2_identity": float(f_id.r2), "embedding_fit_slope_identity": float(f_id.slope),
               "embedding_fit_d": d0, "embedding_fit_neighbourhood": main_nb}
    if "all" in set(r.fits.neighbourhood) and main_nb != "all":
        summary["embedding_fit_r2_all_neighbourhood"] = {v: float(fits.loc[("all", d0, v)].r2)
                                                         for v in ("trained", "identity")}
    run.update_summary(summary)
    lines = [f"- {f.neighbourhood} (w = {f.w:g}), d = {f.d} ({f.regime}), W_V {'trained' if f.W_V == 'trained' else '= I'}: "
             f"slope {f.slope:+.3f} per unit Hamming distance, R² = {f.r2:.3f} (accuracy {f.accuracy:.3f})"
             for f in r.fits.itertuples()]
    acc_lines = []
    for d in sorted(r.accuracy.d.unique()):
        s = r.accuracy[r.accuracy.d == d].set_index("embedding").accuracy
        acc_lines.append(f"- d = {d}: trained W_E {_fmt(s['trained'])}, frozen W_E {_fmt(s['frozen'])}")
    text = ("Accuracy with trained vs frozen (Gaussian-initialized) embeddings:\n\n" + "\n".join(acc_lines)
            + "\n\nMean inner product of two distinct tokens' embeddings against their Hamming distance "
              "(linear fit over distances 1..m on the per-distance means):\n\n" + "\n".join(lines))
    run.add_section("lca_embeddings", "LCA 3: embeddings", text, figures=["lca_embeddings"],
                    tables=["lca_embeddings_accuracy", "lca_embeddings_fit"])
    return summary


def write_attention(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    r = attention_experiment(cfg, trainer, progress)
    run.save_table("lca_attention", r.table)
    run.save_figure("lca_attention", plot_attention(r))
    row = r.table.iloc[0]
    summary = {"attention_same_cluster": float(row.attention_same_cluster),
               "attention_other_cluster": float(row.attention_other_cluster),
               "attention_neighbourhood": row.neighbourhood}
    run.update_summary(summary)
    lines = [f"- {t.neighbourhood} (w = {t.w}, L = {t.L}): mean weight per context token {t.attention_same_cluster:.4f} "
             f"on the last token's own cluster vs {t.attention_other_cluster:.4f} on the other(s) "
             f"(uniform = {t.uniform_weight:.4f}, ratio {t.ratio_same_over_other:.2f}); attention mass "
             f"{t.mass_same_cluster:.2f} vs {t.mass_other_cluster:.2f}; accuracy {t.accuracy:.3f} "
             f"(uniform attention {t.accuracy_uniform_attention:.3f}, Bayes {t.bayes_accuracy:.3f})"
             for t in r.table.itertuples()]
    run.add_section("lca_attention", "LCA 4: attention selects the last token's cluster",
                    "\n".join(lines), figures=["lca_attention"], tables=["lca_attention"])
    return summary


def write_hijack(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    r = hijack_experiment(cfg, trainer, progress)
    run.save_table("lca_hijack_fraction", r.by_fraction)
    run.save_table("lca_hijack_length", r.by_length)
    run.save_figure("lca_hijack", plot_hijack(r, 2**cfg.m))
    df = r.by_fraction
    cross = df[df.rate_y_alt > df.accuracy]
    summary = {"lca_hijack": {"accuracy_clean": float(df.accuracy.iloc[0]), "accuracy_full": float(df.accuracy.iloc[-1]),
                          "rate_y_alt_full": float(df.rate_y_alt.iloc[-1]),
                          "crossover_fraction": float(cross.fraction.min()) if len(cross) else None}}
    run.update_summary(summary)
    h = summary["lca_hijack"]
    text = (f"Contexts for y whose first L-1 tokens come from p(x | y') with probability f (last token still "
            f"from π(·|y)). Model accuracy falls from {h['accuracy_clean']:.3f} at f = 0 to {h['accuracy_full']:.3f} "
            f"at f = 1, where it predicts y' {h['rate_y_alt_full']:.3f} of the time"
            + (f"; y' overtakes y from f = {h['crossover_fraction']:.2f}." if h["crossover_fraction"] is not None
               else ".")
            + " The Bayes predictor of the clean task is shown for comparison.\n\nAccuracy against context length "
              "(same model, evaluated at each L): "
            + ", ".join(f"L={t.L}: {t.accuracy:.3f} (Bayes {t.bayes_accuracy:.3f})" for t in r.by_length.itertuples()))
    run.add_section("lca_hijack", "LCA 5: hijacking the synthetic task", text, figures=["lca_hijack"],
                    tables=["lca_hijack_fraction", "lca_hijack_length"])
    return summary


WRITERS = {"value_matrix": write_value_matrix, "constructed": write_constructed, "embeddings": write_embeddings,
           "attention": write_attention, "hijack": write_hijack}


def run_experiments(run, names, config: LCAConfig | None = None, progress: bool = True,
                    trainer: Trainer | None = None) -> dict:
    cfg = config or LCAConfig()
    tr = _trainer(cfg, trainer, progress)
    summary = {}
    t0 = time.time()
    for name in names:
        if name not in WRITERS:
            raise FactscopeError(f"LCA: unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
        summary.update(WRITERS[name](run, cfg, tr, progress))
    summary = run.update_summary({"lca_seconds": time.time() - t0})
    return summary


def run_all(run, config: LCAConfig | None = None, quick: bool = False, progress: bool = True) -> dict:
    """Run all five LCA experiments into ``run`` (tables, figures, summary keys, report sections).

    ``quick=True`` uses :meth:`LCAConfig.quick` (the demo configuration) unless ``config`` is given.
    Returns the merged summary.
    """
    cfg = config or (LCAConfig.quick() if quick else LCAConfig())
    return run_experiments(run, EXPERIMENTS, cfg, progress)
