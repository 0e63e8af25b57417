"""The five LCA experiments, each a plain function returning dataclasses / DataFrames, plus the
figure makers and :func:`run_all`, which writes everything into a :class:`factscope.runs.Run`.

Defaults (:class:`LCAConfig`) and why:

* task: ``m = 6`` latents (``V = 64`` tokens), ``L = 64``, ``w = 0.2``, ``beta = 1``, Hamming-1
  neighbourhood: the Bayes-optimal accuracy is about 0.96 at L = 64 and 0.997 at L = 128, so the task
  is solvable but not trivial (with ``w = 0.5`` every variant is at 100 % and nothing can be told
  apart); ``V = 64`` keeps both ``d < V`` and ``d > V`` cheap on a CPU;
* model: ``d = d_a = 32`` (under-parameterized, ``d < V``), Gaussian init (std ``1/sqrt(d)``);
* training: AdamW, lr ``1e-2`` with cosine decay, weight decay ``1e-4``, batch 256, 800 steps of
  fresh samples; accuracy on 4096 held-out contexts (seed 999), ties counted fractionally;
* seeds: every experiment is repeated for ``seeds`` (3) training seeds ``seed, seed + 1, ...``
  (initialization and training data); the tables report the mean and the standard deviation over
  seeds (``*_std``, ddof 1), the per-seed numbers are kept in ``*_seeds`` tables, the figures
  draw mean +- std error bars.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from factscope.findings import Claim
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
    seeds: int = 3
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
        if not isinstance(self.seeds, (int, np.integer)) or self.seeds < 1:
            raise FactscopeError(f"LCA: seeds (number of training seeds) must be an integer >= 1, got {self.seeds!r}")
        for name in ("value_d", "embed_d", "value_L", "hijack_L"):
            vals = getattr(self, name)
            if not vals or any(int(v) < 1 for v in vals):
                raise FactscopeError(f"LCA: {name} must be a non-empty list of positive integers, got {vals!r}")

    @classmethod
    def quick(cls, **kw) -> "LCAConfig":
        """The short demo configuration (well under a minute on a CPU)."""
        base = dict(m=5, w=0.25, d=16, d_a=16, steps=250, eval_n=2048, seeds=1, value_L=(64,), value_d=(8, 16, 64),
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

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def defining(self) -> dict:
        """The run config's keys: every field but ``threads`` (how fast, not what: under runtime)."""
        return {k: v for k, v in self.to_dict().items() if k != "threads"}


class Trainer:
    """Trains models on demand and remembers them, so experiments share identical trainings."""

    def __init__(self, cfg: LCAConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self._cache: dict = {}

    def get(self, task: LCATask, model: ModelConfig, label: str = "", seed: int | None = None) -> TrainResult:
        seed = self.cfg.seed if seed is None else int(seed)
        key = (task, model, seed)
        if key not in self._cache:
            torch.set_num_threads(self.cfg.threads)
            desc = f"LCA {label} d={model.d} L={task.L} seed={seed}" if self.progress else False
            self._cache[key] = train(task, model, self.cfg.train_cfg(seed=seed), progress=desc)
        return self._cache[key]


def _trainer(cfg, trainer, progress):
    return trainer if trainer is not None else Trainer(cfg, progress)


def aggregate(df: pd.DataFrame, by: list[str], values: list[str]) -> pd.DataFrame:
    """Mean over the ``seed`` column of ``values`` per group ``by``, with ``<value>_std`` (ddof 1; 0 for
    one seed) and ``n_seeds``; other columns constant within a group are kept (first value)."""
    g = df.groupby(by, sort=False, dropna=False)
    out = g[values].mean()
    std = g[values].std(ddof=1).fillna(0.0).add_suffix("_std")
    rest = [c for c in df.columns if c not in set(by) | set(values) | {"seed"}]
    parts = [out, std, g["seed"].nunique().rename("n_seeds")]
    if rest:
        parts.append(g[rest].first())
    res = pd.concat(parts, axis=1).reset_index()
    cols = list(by) + [c for v in values for c in (v, f"{v}_std")] + rest + ["n_seeds"]
    return res[cols]


# ---- 1. value matrix --------------------------------------------------------------------------


def value_matrix_experiment(cfg: LCAConfig = LCAConfig(), trainer: Trainer | None = None,
                            progress: bool = True) -> pd.DataFrame:
    """Accuracy with ``W_V`` trained vs frozen at the identity for each ``L`` and ``d`` (Figure 3a)."""
    tr = _trainer(cfg, trainer, progress)
    rows = []
    for L in cfg.value_L:
        task = cfg.task(L=int(L))
        bayes = bayes_accuracy(task, n=cfg.eval_n)
        for seed in cfg.seed_list():
            for d in cfg.value_d:
                for value in ("trained", "identity"):
                    r = tr.get(task, cfg.model(d=int(d), d_a=int(d), value=value), f"value={value}", seed)
                    rows.append({"seed": seed, "L": int(L), "d": int(d), "W_V": value, "accuracy": r.accuracy,
                                 "final_loss": r.final_loss, "bayes_accuracy": bayes, "seconds": r.seconds})
    return pd.DataFrame(rows)


def plot_value_matrix(df: pd.DataFrame, V: int):
    """``df``: the per-seed table of :func:`value_matrix_experiment` (or its aggregate)."""
    from factscope.plotting import PALETTE, new_figure

    if "seed" in df.columns:
        df = aggregate(df, ["L", "d", "W_V"], ["accuracy"])
    n_seeds = int(df.n_seeds.max())
    Ls = sorted(df.L.unique())
    fig, axes = new_figure(1, len(Ls), squeeze=False, sharey=True, width=5.2 * len(Ls), height=4.0,
                           title="Value matrix: trained vs frozen at the identity")
    for ax, L in zip(axes[0], Ls):
        sub = df[df.L == L]
        for i, (value, label) in enumerate((("trained", "W_V trained"), ("identity", "W_V = I (frozen)"))):
            s = sub[sub.W_V == value].sort_values("d")
            ax.errorbar(s.d, s.accuracy, yerr=s.accuracy_std, fmt="o-", color=PALETTE[i], capsize=3, label=label)
        ax.axhline(sub.bayes_accuracy.iloc[0], color="grey", ls="--", label="Bayes optimal")
        ax.axvline(V, color="grey", ls=":", lw=1)
        ax.text(V, 0.55, f"d = V = {V} ", color="grey", fontsize=8, va="center", ha="right", rotation=90)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sub.d.unique()), [str(d) for d in sorted(sub.d.unique())])
        ax.set_xlabel("embedding dimension d")
        ax.set_title(f"context length L = {L}")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel(f"test accuracy (mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''})")
    axes[0][0].legend(loc="lower right")
    return fig


# ---- 2. constructed value matrix ---------------------------------------------------------------


CONSTRUCTED_NAMES = ("trained", "constructed", "random", "initial")


@dataclass
class ConstructedResult:
    accuracy: pd.DataFrame  # seed, W_V (trained / constructed / random / initial), accuracy
    angles: pd.DataFrame  # seed, versus, space: principal angles vs the trained W_V
    trained_spectrum: np.ndarray  # [seeds, d] singular values of the trained W_V
    rank: int

    def mean_accuracy(self) -> dict:
        return self.accuracy.groupby("W_V").accuracy.mean().to_dict()


def constructed_experiment(cfg: LCAConfig = LCAConfig(), trainer: Trainer | None = None,
                           progress: bool = True) -> ConstructedResult:
    """Replace the trained ``W_V`` with ``W_E A W_E^T`` (A = Hamming-1 pairing) and with a random
    pairing of the same degree; compare accuracies and the principal angles between rank-m
    approximations (for each seed)."""
    tr = _trainer(cfg, trainer, progress)
    task = cfg.task()
    k = cfg.m
    acc_rows, rows, spectra = [], [], []
    for seed in cfg.seed_list():
        model = tr.get(task, cfg.model(), "value=trained", seed).model
        E = model.W_E.detach()
        W_trained = model.W_V.detach()
        mats = {
            "trained": W_trained,
            "constructed": constructed_value_matrix(E, hamming1_adjacency(cfg.m)),
            "random": constructed_value_matrix(E, random_pairing_adjacency(task.V, cfg.m, seed=seed + 7)),
            "initial": model.W_V_init,
        }
        for name, M in mats.items():
            acc_rows.append({"seed": seed, "W_V": name, "accuracy": evaluate(model, task, cfg.eval_n, seed=999, W_V=M)})
        for name in ("constructed", "random", "initial"):
            for side in ("left", "right"):
                ang = principal_angles(W_trained, mats[name], k, side=side)
                rows.append({"seed": seed, "versus": name, "space": "column" if side == "left" else "row",
                             "smallest_angle_deg": float(ang[0]), "median_angle_deg": float(np.median(ang)),
                             "largest_angle_deg": float(ang[-1])})
        spectra.append(np.linalg.svd(W_trained.double().numpy(), compute_uv=False))
    return ConstructedResult(pd.DataFrame(acc_rows), pd.DataFrame(rows), np.array(spectra), k)


def plot_constructed(r: ConstructedResult, bayes: float):
    from factscope.plotting import PALETTE, new_figure

    n_seeds = r.accuracy.seed.nunique()
    fig, (a1, a2) = new_figure(1, 2, width=11, height=4.0, title="Constructed value matrix W_V = W_E A W_E^T")
    labels = ["trained W_V", "Hamming-1\nconstruction", "random-pairing\nconstruction", "W_V at init"]
    acc = aggregate(r.accuracy, ["W_V"], ["accuracy"]).set_index("W_V").loc[list(CONSTRUCTED_NAMES)]
    vals, errs = acc.accuracy.to_numpy(), acc.accuracy_std.to_numpy()
    a1.bar(labels, vals, yerr=errs, capsize=4, color=[PALETTE[i] for i in range(4)])
    for i, (v, e) in enumerate(zip(vals, errs)):
        a1.text(i, v + e + 0.01, f"{v:.3f}" + (f"\n±{e:.3f}" if n_seeds > 1 else ""), ha="center", va="bottom",
                fontsize=8)
    a1.axhline(bayes, color="grey", ls="--", label=f"Bayes optimal ({bayes:.3f})")
    a1.set_ylim(0, 1.3)
    a1.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a1.set_ylabel(f"test accuracy (mean ± std, {n_seeds} seed{'s' if n_seeds > 1 else ''})")
    a1.legend(loc="upper right")
    a1.set_title("accuracy with each W_V (other weights trained)")
    ang = aggregate(r.angles[r.angles.space == "column"], ["versus"], ["smallest_angle_deg", "median_angle_deg"])
    x = np.arange(len(ang))
    a2.bar(x - 0.2, ang.smallest_angle_deg, 0.4, yerr=ang.smallest_angle_deg_std, capsize=3, color=PALETTE[0],
           label="smallest")
    a2.bar(x + 0.2, ang.median_angle_deg, 0.4, yerr=ang.median_angle_deg_std, capsize=3, color=PALETTE[5],
           label="median")
    a2.set_xticks(x, [f"trained vs\n{v}" for v in ang.versus])
    a2.set_ylabel("principal angle (degrees, mean ± std)")
    a2.set_ylim(0, 95)
    a2.set_title(f"angles between rank-{r.rank} column spaces")
    a2.legend(loc="upper left")
    return fig


# ---- 3. embeddings ------------------------------------------------------------------------------


@dataclass
class EmbeddingResult:
    accuracy: pd.DataFrame  # seed, d, embedding, W_V, accuracy
    inner: pd.DataFrame  # seed, neighbourhood, w, d, W_V, hamming, mean_inner, std_inner, mean_assoc
    fits: pd.DataFrame  # seed, neighbourhood, w, d, W_V, slope, intercept, r2
    spectra: pd.DataFrame  # seed, neighbourhood, w, d, W_V, index, singular_value
    V: int

    def mean_fits(self) -> pd.DataFrame:
        """Fits averaged over seeds (``slope``, ``r2``, ``accuracy`` with ``_std``)."""
        return aggregate(self.fits, ["neighbourhood", "w", "d", "W_V"], ["slope", "intercept", "r2", "accuracy"])


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
    seeds = cfg.seed_list()
    for seed in seeds:
        for d in cfg.embed_d:
            d = int(d)
            for emb in ("trained", "frozen"):
                r = tr.get(task, cfg.model(d=d, d_a=d, embedding=emb), f"embedding={emb}", seed)
                acc_rows.append({"seed": seed, "d": d, "regime": "d < V" if d < task.V else "d >= V",
                                 "embedding": emb, "W_V": "trained", "accuracy": r.accuracy})
    gtasks = [task]
    if cfg.geometry_all_w is not None and task.neighbourhood != "all":
        gtasks.append(cfg.task(neighbourhood="all", w=float(cfg.geometry_all_w)))
    for gt, d, value, seed in ((gt, int(d), v, s) for gt in gtasks for d in cfg.embed_d
                               for v in ("trained", "identity") for s in seeds):
        r = tr.get(gt, cfg.model(d=d, d_a=d, value=value), f"value={value} {gt.neighbourhood}", seed)
        E = r.model.W_E.detach()
        ip = inner_product_by_hamming(E, cfg.m)
        M = (E.T @ r.model.W_V.detach() @ E).double().numpy()
        ip["mean_assoc"] = [float(M[hamming_matrix(cfg.m) == h].mean()) for h in ip.hamming]
        meta = {"seed": seed, "neighbourhood": gt.neighbourhood, "w": gt.w, "d": d, "W_V": value}
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
    n_seeds = r.fits.seed.nunique()
    sd = f"mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}"
    fig, axes = new_figure(2, 2, squeeze=False, width=13, height=9, title=f"Embeddings ({sd})")
    a1, a3 = axes[0]
    geo_axes = list(axes[1])
    acc = aggregate(r.accuracy, ["d", "embedding"], ["accuracy"])
    ds = sorted(acc.d.unique())
    x = np.arange(len(ds))
    for i, emb in enumerate(("trained", "frozen")):
        s = acc[acc.embedding == emb].set_index("d").loc[ds]
        a1.bar(x + (i - 0.5) * 0.38, s.accuracy, 0.38, yerr=s.accuracy_std, capsize=3, color=PALETTE[i],
               label="W_E trained" if emb == "trained" else "W_E frozen (Gaussian init)")
        for xi, (v, e) in enumerate(zip(s.accuracy, s.accuracy_std)):
            a1.text(xi + (i - 0.5) * 0.38, v + e + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7.5)
    a1.set_xticks(x, [f"d={d}\n({'d<V' if d < r.V else 'd>=V'})" for d in ds])
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
    fits = r.mean_fits()
    for ax, nb in zip(geo_axes, nbs):
        k = 0
        for d in show:
            for value in ("trained", "identity"):
                sel = (r.inner.neighbourhood == nb) & (r.inner.d == d) & (r.inner.W_V == value)
                ip = r.inner[sel]
                # per seed: inner products relative to the mean squared norm; then mean +- std over seeds
                norm = ip[ip.hamming == 0].set_index("seed").mean_inner
                rel = ip[ip.hamming >= 1].assign(rel=lambda t: t.mean_inner / t.seed.map(norm).to_numpy())
                g = rel.groupby("hamming").rel
                h, mu, sdv = g.mean().index.to_numpy(), g.mean().to_numpy(), g.std(ddof=1).fillna(0.0).to_numpy()
                f = fits[(fits.neighbourhood == nb) & (fits.d == d) & (fits.W_V == value)].iloc[0]
                line = np.polyfit(h, mu, 1)
                r2 = f"R²={f.r2:.2f}" + (f"±{f.r2_std:.2f}" if n_seeds > 1 else "")
                lab = f"d={d}, W_V {'trained' if value == 'trained' else '= I'} ({r2})"
                ax.errorbar(h, mu, yerr=sdv, fmt="o", color=PALETTE[k], capsize=3, ms=4)
                hh = np.array([1, m])
                ax.plot(hh, np.polyval(line, hh), styles[value], color=PALETTE[k], label=lab)
                k += 1
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("Hamming distance between the two tokens")
        ax.set_ylabel("mean <W_E(t), W_E(t')> / mean |W_E(t)|²")
        w = r.fits[r.fits.neighbourhood == nb].w.iloc[0]
        ax.set_title(f"embedding geometry, {NB_NAMES.get(nb, nb)}, w = {w:g}\n(points: mean over token pairs, "
                     f"± std over seeds; lines: linear fits)", fontsize=10)
        ax.legend(fontsize=7.5, loc="upper right")
    for ax in geo_axes[len(nbs):]:
        ax.set_visible(False)

    k = 0
    for d in show:
        for value in ("trained", "identity"):
            s = r.spectra[(r.spectra.neighbourhood == nbs[0]) & (r.spectra.d == d) & (r.spectra.W_V == value)]
            s = s.assign(rel=s.singular_value / s.groupby("seed").singular_value.transform("max"))
            g = s.groupby("index").rel
            a3.errorbar(g.mean().index, g.mean(), yerr=g.std(ddof=1).fillna(0.0), marker="o", ms=3, capsize=2,
                        color=PALETTE[k], ls=styles[value],
                        label=f"d={d}, W_V {'trained' if value == 'trained' else '= I'}")
            k += 1
    a3.axvline(m, color="grey", ls=":", lw=1)
    a3.text(m, 0.55, f" m = {m}", color="grey", fontsize=8, transform=a3.get_xaxis_transform())
    a3.set_yscale("log")
    a3.set_xlabel("singular value index")
    a3.set_ylabel("singular value / largest")
    a3.set_title(f"spectrum of W_E ({NB_NAMES.get(nbs[0], nbs[0])})")
    a3.legend(fontsize=7.5, loc="lower left")
    return fig


# ---- 4. attention selection -----------------------------------------------------------------------


@dataclass
class AttentionResult:
    table: pd.DataFrame  # seed, neighbourhood, same/other mean weight per key position, mass, accuracy
    heat: dict  # neighbourhood -> [k, k] mean attention per key position x L (query, key cluster), mean over seeds
    scores: dict  # neighbourhood -> [V, V] pre-softmax score matrix (query token, key token), first seed


def attention_experiment(cfg: LCAConfig = LCAConfig(), trainer: Trainer | None = None,
                         progress: bool = True) -> AttentionResult:
    """In the cluster settings, the attention of the last position to context tokens of its own
    cluster vs the other cluster(s) (Figure 3c), for each seed."""
    tr = _trainer(cfg, trainer, progress)
    rows, heat, scores = [], {}, {}
    for nb in cfg.attention_neighbourhoods:
        kbits = 1 if nb == "cluster1" else 2
        task = cfg.task(neighbourhood=nb, w=cfg.attention_w)
        bayes = bayes_accuracy(task, n=cfg.eval_n)
        k = 2**kbits
        heats = []
        for seed in cfg.seed_list():
            r = tr.get(task, cfg.model(), f"attention {nb}", seed)
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
            H = np.full((k, k), np.nan)
            for i in range(k):
                for j in range(k):
                    sel = (cq[:, None] == i) & (ck == j)
                    if sel.any():
                        H[i, j] = float(a[sel].mean()) * task.L
            heats.append(H)
            scores.setdefault(nb, S)
            rows.append({"seed": seed, "neighbourhood": nb, "clusters": k, "w": task.w, "L": task.L,
                         "attention_same_cluster": w_same, "attention_other_cluster": w_other,
                         "uniform_weight": 1.0 / task.L, "ratio_same_over_other": w_same / w_other,
                         "mass_same_cluster": float((a * same).sum(1).mean()),
                         "mass_other_cluster": float((a * ~same).sum(1).mean()),
                         "accuracy": r.accuracy, "accuracy_uniform_attention":
                             tr.get(task, cfg.model(attention="uniform"), f"uniform attention {nb}", seed).accuracy,
                         "bayes_accuracy": bayes})
        heat[nb] = np.mean(heats, axis=0)
    return AttentionResult(pd.DataFrame(rows), heat, scores)


ATTENTION_VALUES = ["attention_same_cluster", "attention_other_cluster", "ratio_same_over_other",
                    "mass_same_cluster", "mass_other_cluster", "accuracy", "accuracy_uniform_attention"]


def plot_attention(r: AttentionResult):
    from factscope.plotting import heatmap, new_figure

    nbs = list(r.heat)
    fig, axes = new_figure(len(nbs), 2, squeeze=False, width=11, height=4.4 * len(nbs),
                           title="Attention of the last token by cluster")
    for row, nb in zip(axes, nbs):
        H = r.heat[nb]
        k = H.shape[0]
        bits = int(np.log2(k))  # clusters by the first latent(s): "z1=0", "z1z2=01" (ASCII: one font)
        names = ["".join(f"z{b + 1}" for b in range(bits)) + "=" + format(i, f"0{bits}b") for i in range(k)]
        heatmap(row[0], H, xlabels=names, ylabels=names, xlabel="cluster of the attended context token",
                ylabel="cluster of the last token", cmap="viridis",
                colorbar="mean attention per token × L (1 = uniform)")
        for i in range(k):
            for j in range(k):
                row[0].text(j, i, f"{H[i, j]:.2f}", ha="center", va="center",
                            color="white" if H[i, j] < np.nanmax(H) * 0.6 else "black")
        what = "first latent" if k == 2 else "first two latents"
        row[0].set_title(f"{nb} ({k} clusters by the {what}):\nattention, mean over seeds", fontsize=10.5)
        S = r.scores[nb]
        V = S.shape[0]
        im = heatmap(row[1], S, xlabel="attended token (id; clusters are contiguous)", ylabel="last token (id)",
                     cmap="RdBu_r", center=0.0, colorbar="attention score q·k/√d_a", max_ticks=9)
        for b in range(1, k):
            row[1].axhline(b * V / k - 0.5, color="black", lw=0.8)
            row[1].axvline(b * V / k - 0.5, color="black", lw=0.8)
        row[1].set_title(f"{nb}: pre-softmax scores, token by token\n(first seed)", fontsize=10.5)
    return fig


# ---- 5. hijacking -----------------------------------------------------------------------------------


@dataclass
class HijackResult:
    by_fraction: pd.DataFrame  # seed, fraction, accuracy, rate_y_alt, efficacy, bayes_*
    by_length: pd.DataFrame  # seed, L, accuracy, bayes_accuracy


def efficacy(scores: torch.Tensor, y: torch.Tensor, y_alt: torch.Tensor) -> float:
    """Fraction of contexts with ``score[y_alt] > score[y]``: the analogue of the efficacy score of
    context hijacking (the false answer is preferred to the true one)."""
    return float((scores.gather(1, y_alt[:, None]) > scores.gather(1, y[:, None])).double().mean())


def hijack_experiment(cfg: LCAConfig = LCAConfig(), trainer: Trainer | None = None,
                      progress: bool = True) -> HijackResult:
    """Mix samples of ``p(x|y')`` into contexts for ``y``: accuracy, rate of predicting ``y'`` and
    efficacy (logit y' > logit y) against the mixing fraction (trained model and the Bayes predictor
    of the clean task); accuracy against L.  For each seed."""
    tr = _trainer(cfg, trainer, progress)
    task = cfg.task()
    rows, lrows = [], []
    bayes_L = {int(L): bayes_accuracy(task, n=cfg.eval_n, L=int(L)) for L in cfg.hijack_L}
    for seed in cfg.seed_list():
        model = tr.get(task, cfg.model(), "value=trained", seed).model
        for f in cfg.hijack_fracs:
            x, y, y2 = mixed_contexts(task, cfg.eval_n, float(f), seed=777)
            with torch.no_grad():
                logits = model(x)
            post = posterior(task, x)
            rows.append({"seed": seed, "fraction": float(f),
                         "accuracy": expected_accuracy(logits, y), "rate_y_alt": expected_accuracy(logits, y2),
                         "efficacy": efficacy(logits, y, y2),
                         "bayes_accuracy": expected_accuracy(post, y), "bayes_rate_y_alt": expected_accuracy(post, y2),
                         "bayes_efficacy": efficacy(post, y, y2)})
        for L in cfg.hijack_L:
            lrows.append({"seed": seed, "L": int(L), "accuracy": evaluate(model, task, cfg.eval_n, seed=555, L=int(L)),
                          "bayes_accuracy": bayes_L[int(L)], "trained_at_L": task.L})
    return HijackResult(pd.DataFrame(rows), pd.DataFrame(lrows))


HIJACK_VALUES = ["accuracy", "rate_y_alt", "efficacy", "bayes_accuracy", "bayes_rate_y_alt", "bayes_efficacy"]


def plot_hijack(r: HijackResult, V: int):
    from factscope.plotting import PALETTE, new_figure

    n_seeds = r.by_fraction.seed.nunique()
    sd = f"model: mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}"
    fig, (a1, a2) = new_figure(1, 2, width=11.5, height=4.4, title=f"Hijacking the LCA model ({sd})")
    df = aggregate(r.by_fraction, ["fraction"], HIJACK_VALUES)
    for col, mk, c, lab in (("accuracy", "o", 0, "predicts y (correct)"), ("rate_y_alt", "s", 1, "predicts y'"),
                            ("efficacy", "^", 3, "efficacy: logit y' > logit y")):
        a1.errorbar(df.fraction, df[col], yerr=df[f"{col}_std"], fmt=mk + "-", color=PALETTE[c], capsize=3,
                    ms=4, label=f"model: {lab}")
        a1.plot(df.fraction, df[f"bayes_{col}"], mk + "--", color=PALETTE[c], alpha=0.45, ms=4,
                label=f"Bayes (clean task): {lab.split(':')[0]}")
    a1.set_xlabel("fraction of the first L-1 tokens drawn from p(x | y')")
    a1.set_ylabel("rate")
    a1.set_ylim(-0.02, 1.02)
    a1.set_title("mixing in samples for another output y'")
    a1.legend(fontsize=7, loc="center left")
    dl = aggregate(r.by_length, ["L"], ["accuracy"])
    a2.errorbar(dl.L, dl.accuracy, yerr=dl.accuracy_std, fmt="o-", color=PALETTE[0], capsize=3,
                label=f"model (trained at L={dl.trained_at_L.iloc[0]})")
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


def _pm(mean: float, std: float, n_seeds: int, digits: int = 3) -> str:
    """``0.948 ± 0.004`` (mean ± std over seeds), or just the mean for one seed."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n_seeds > 1 else f"{mean:.{digits}f}"


def _seeds_note(cfg: LCAConfig) -> str:
    n = cfg.seeds
    return (f"Mean ± std over {n} training seeds ({', '.join(map(str, cfg.seed_list()))})." if n > 1
            else f"One training seed ({cfg.seed}).")


def write_value_matrix(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    per_seed = value_matrix_experiment(cfg, trainer, progress)
    df = aggregate(per_seed, ["L", "d", "W_V"], ["accuracy", "final_loss"])
    run.save_table("lca_value_matrix", df)
    run.save_table("lca_value_matrix_seeds", per_seed)
    run.save_figure("lca_value_matrix", plot_value_matrix(per_seed, 2**cfg.m))
    L0 = 64 if 64 in set(df.L) else int(df.L.min())
    sub = df[(df.L == L0) & (df.d == (cfg.d if cfg.d in set(df.d) else df.d.min()))].set_index("W_V")
    n = cfg.seeds
    vm = {"trained": float(sub.accuracy["trained"]), "identity": float(sub.accuracy["identity"]),
          "trained_std": float(sub.accuracy_std["trained"]), "identity_std": float(sub.accuracy_std["identity"]),
          "L": L0, "d": int(sub.d.iloc[0]), "seeds": n}
    summary = {"value_matrix": vm}
    run.update_summary(summary)
    lines = []
    for L in sorted(df.L.unique()):
        s = per_seed[per_seed.L == L]
        piv = s.pivot_table(index=["d", "seed"], columns="W_V", values="accuracy")
        wins = int((piv.trained > piv.identity).sum())
        lines.append(f"- L = {L}: trained W_V beats W_V = I in {wins} of {len(piv)} (dimension, seed) pairs "
                     f"(Bayes optimal {_fmt(s.bayes_accuracy.iloc[0])}).")
    text = (f"One-layer transformer on the LCA task (m = {cfg.m}, V = {2**cfg.m}, w = {cfg.w}, "
            f"Hamming-1 neighbourhood), value matrix trained or frozen at the identity. {_seeds_note(cfg)} "
            f"At L = {L0}, d = {vm['d']}: trained {_pm(vm['trained'], vm['trained_std'], n)}, identity "
            f"{_pm(vm['identity'], vm['identity_std'], n)}.\n\n" + "\n".join(lines))
    run.add_section("lca_value_matrix", "LCA 1: value matrix (trained vs identity)", text,
                    figures=["lca_value_matrix"], tables=["lca_value_matrix"], **lca_findings(summary))
    return summary


def write_constructed(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    r = constructed_experiment(cfg, trainer, progress)
    bayes = bayes_accuracy(cfg.task(), n=cfg.eval_n)
    acc = aggregate(r.accuracy, ["W_V"], ["accuracy"])
    angles = aggregate(r.angles, ["versus", "space"], ["smallest_angle_deg", "median_angle_deg", "largest_angle_deg"])
    run.save_table("lca_constructed_accuracy", acc)
    run.save_table("lca_constructed_accuracy_seeds", r.accuracy)
    run.save_table("lca_constructed_angles", angles)
    run.save_table("lca_constructed_angles_seeds", r.angles)
    run.save_figure("lca_constructed", plot_constructed(r, bayes))
    a = acc.set_index("W_V")
    n = cfg.seeds
    col = angles[angles.space == "column"].set_index("versus")
    piv = r.accuracy.pivot(index="seed", columns="W_V", values="accuracy")
    c = {k: float(a.accuracy[k]) for k in CONSTRUCTED_NAMES}
    c.update({f"{k}_std": float(a.accuracy_std[k]) for k in CONSTRUCTED_NAMES})
    c["smallest_angle_deg"] = {k: float(v) for k, v in col.smallest_angle_deg.items()}
    c["constructed_beats_random_seeds"] = int((piv.constructed > piv.random).sum())
    c["seeds"] = n
    summary = {"constructed": c}
    run.update_summary(summary)
    text = (f"The trained W_V (d = {cfg.d}) is replaced by W_V = Σ_t W_E(t) Σ_(t'∈N1(t)) W_E(t')ᵀ built from the "
            f"trained embeddings, and by the same construction with each token paired with {cfg.m} random tokens. "
            f"{_seeds_note(cfg)} Accuracy: trained {_pm(c['trained'], c['trained_std'], n)}, Hamming-1 construction "
            f"{_pm(c['constructed'], c['constructed_std'], n)}, random pairing {_pm(c['random'], c['random_std'], n)}, "
            f"W_V at initialization {_pm(c['initial'], c['initial_std'], n)} (Bayes optimal {_fmt(bayes)}).\n\n"
            f"Smallest principal angle between the rank-{r.rank} column spaces of the trained W_V and: "
            + ", ".join(f"{k} {_pm(t.smallest_angle_deg, t.smallest_angle_deg_std, n, 1)}°" for k, t in col.iterrows())
            + ".")
    run.add_section("lca_constructed", "LCA 2: constructed value matrix", text, figures=["lca_constructed"],
                    tables=["lca_constructed_accuracy", "lca_constructed_angles"], **lca_findings(summary))
    return summary


def write_embeddings(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    r = embeddings_experiment(cfg, trainer, progress)
    fits = r.mean_fits()
    # the figure plots inner products relative to the mean squared norm: the slope in those units too
    sq = r.inner[r.inner.hamming == 0].groupby(["neighbourhood", "d", "W_V"]).mean_inner.mean()
    fits["slope_relative"] = fits.slope.to_numpy() / sq.reindex(
        pd.MultiIndex.from_frame(fits[["neighbourhood", "d", "W_V"]])).to_numpy()
    acc = aggregate(r.accuracy, ["d", "embedding"], ["accuracy"])
    run.save_table("lca_embeddings_accuracy", acc)
    run.save_table("lca_embeddings_accuracy_seeds", r.accuracy)
    run.save_table("lca_embeddings_inner", r.inner)
    run.save_table("lca_embeddings_fit", fits)
    run.save_table("lca_embeddings_fit_seeds", r.fits)
    run.save_table("lca_embeddings_spectrum", r.spectra)
    run.save_figure("lca_embeddings", plot_embeddings(r, cfg.m, cfg.d))
    d0 = cfg.d if cfg.d in set(fits.d) else int(fits.d.min())
    n = cfg.seeds
    fi = fits.set_index(["neighbourhood", "d", "W_V"])
    nbs = list(dict.fromkeys(fits.neighbourhood))
    # headline: the "all but z*" task (Theorem 3's setting), W_V trained; then the main (Hamming-1) task
    head = "all" if "all" in nbs else nbs[0]
    emb = {"neighbourhood": head, "w": float(fi.loc[(head, d0, "trained")].w), "d": d0, "seeds": n}
    for nb, suffix in ((head, ""),) + tuple((nb, f"_{nb}") for nb in nbs if nb != head):
        for value, vs in (("trained", ""), ("identity", "_identity")):
            f = fi.loc[(nb, d0, value)]
            emb[f"fit_r2{suffix}{vs}"] = float(f.r2)
            emb[f"fit_r2{suffix}{vs}_std"] = float(f.r2_std)
            emb[f"fit_slope{suffix}{vs}"] = float(f.slope)
            emb[f"fit_slope{suffix}{vs}_std"] = float(f.slope_std)
    under = r.fits[(r.fits.W_V == "trained") & (r.fits.d < r.V)]
    emb["negative_slope_under_parameterized"] = f"{int((under.slope < 0).sum())}/{len(under)}"
    summary = {"embeddings": emb}
    run.update_summary(summary)
    lines = [f"- {f.neighbourhood} (w = {f.w:g}), d = {f.d} ({'d < V' if f.d < r.V else 'd ≥ V'}), "
             f"W_V {'trained' if f.W_V == 'trained' else '= I'}: slope {f.slope_relative:+.3f} of the mean squared "
             f"norm per unit Hamming distance (as plotted; raw {_pm(f.slope, f.slope_std, n)}), "
             f"R² = {_pm(f.r2, f.r2_std, n)} (accuracy {_pm(f.accuracy, f.accuracy_std, n)})"
             for f in fits.itertuples()]
    acc_lines = []
    for d in sorted(acc.d.unique()):
        s = acc[acc.d == d].set_index("embedding")
        acc_lines.append(f"- d = {d}: trained W_E {_pm(s.accuracy['trained'], s.accuracy_std['trained'], n)}, "
                         f"frozen W_E {_pm(s.accuracy['frozen'], s.accuracy_std['frozen'], n)}")
    text = (f"{_seeds_note(cfg)} Accuracy with trained vs frozen (Gaussian-initialized) embeddings:\n\n"
            + "\n".join(acc_lines)
            + "\n\nMean inner product of two distinct tokens' embeddings against their Hamming distance "
              "(linear fit over distances 1..m on the per-distance means). The headline is the \"all but z*\" "
              "task, the setting of Theorem 3; on the Hamming-1 task the trained value matrix carries the "
              "association and the inner product need not be linear:\n\n" + "\n".join(lines))
    run.add_section("lca_embeddings", "LCA 3: embeddings", text, figures=["lca_embeddings"],
                    tables=["lca_embeddings_accuracy", "lca_embeddings_fit"], **lca_findings(summary))
    return summary


def write_attention(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    r = attention_experiment(cfg, trainer, progress)
    table = aggregate(r.table, ["neighbourhood"], ATTENTION_VALUES)
    run.save_table("lca_attention", table)
    run.save_table("lca_attention_seeds", r.table)
    run.save_figure("lca_attention", plot_attention(r))
    n = cfg.seeds
    row = table.iloc[0]
    first = r.table[r.table.neighbourhood == row.neighbourhood]
    summary = {"attention": {"same_cluster": float(row.attention_same_cluster),
                             "same_cluster_std": float(row.attention_same_cluster_std),
                             "other_cluster": float(row.attention_other_cluster),
                             "other_cluster_std": float(row.attention_other_cluster_std),
                             "ratio": float(row.ratio_same_over_other), "neighbourhood": row.neighbourhood,
                             "same_beats_other_seeds": int((first.attention_same_cluster >
                                                            first.attention_other_cluster).sum()),
                             "seeds": n}}
    run.update_summary(summary)
    lines = [f"- {t.neighbourhood} (w = {t.w}, L = {t.L}): mean weight per context token "
             f"{_pm(t.attention_same_cluster, t.attention_same_cluster_std, n, 4)} on the last token's own cluster vs "
             f"{_pm(t.attention_other_cluster, t.attention_other_cluster_std, n, 4)} on the other(s) "
             f"(uniform = {t.uniform_weight:.4f}, ratio {_pm(t.ratio_same_over_other, t.ratio_same_over_other_std, n, 1)}); "
             f"attention mass {t.mass_same_cluster:.2f} vs {t.mass_other_cluster:.2f}; accuracy "
             f"{_pm(t.accuracy, t.accuracy_std, n)} (uniform attention "
             f"{_pm(t.accuracy_uniform_attention, t.accuracy_uniform_attention_std, n)}, Bayes {t.bayes_accuracy:.3f})"
             for t in table.itertuples()]
    run.add_section("lca_attention", "LCA 4: attention selects the last token's cluster",
                    _seeds_note(cfg) + "\n\n" + "\n".join(lines), figures=["lca_attention"], tables=["lca_attention"],
                    **lca_findings(summary))
    return summary


def write_hijack(run, cfg: LCAConfig, trainer: Trainer, progress=True) -> dict:
    r = hijack_experiment(cfg, trainer, progress)
    df = aggregate(r.by_fraction, ["fraction"], HIJACK_VALUES)
    dl = aggregate(r.by_length, ["L"], ["accuracy"])
    run.save_table("lca_hijack_fraction", df)
    run.save_table("lca_hijack_fraction_seeds", r.by_fraction)
    run.save_table("lca_hijack_length", dl)
    run.save_table("lca_hijack_length_seeds", r.by_length)
    run.save_figure("lca_hijack", plot_hijack(r, 2**cfg.m))
    n = cfg.seeds
    cross = df[df.rate_y_alt > df.accuracy]
    h = {"accuracy_clean": float(df.accuracy.iloc[0]), "accuracy_full": float(df.accuracy.iloc[-1]),
         "rate_y_alt_full": float(df.rate_y_alt.iloc[-1]),
         "efficacy_clean": float(df.efficacy.iloc[0]), "efficacy_full": float(df.efficacy.iloc[-1]),
         "efficacy_full_std": float(df.efficacy_std.iloc[-1]),
         "efficacy": {f"{f:g}": float(e) for f, e in zip(df.fraction, df.efficacy)},
         "crossover_fraction": float(cross.fraction.min()) if len(cross) else None, "seeds": n}
    summary = {"lca_hijack": h}
    run.update_summary(summary)
    text = (f"Contexts for y whose first L-1 tokens come from p(x | y') with probability f (last token still "
            f"from π(·|y)). {_seeds_note(cfg)} Model accuracy falls from {h['accuracy_clean']:.3f} at f = 0 to "
            f"{h['accuracy_full']:.3f} at f = 1, where it predicts y' {h['rate_y_alt_full']:.3f} of the time"
            + (f"; y' overtakes y from f = {h['crossover_fraction']:.2f}." if h["crossover_fraction"] is not None
               else ".")
            + " Efficacy (the analogue of the efficacy score of context hijacking: the fraction of contexts with "
              "logit y' > logit y): " + ", ".join(f"f = {t.fraction:g}: {_pm(t.efficacy, t.efficacy_std, n)}"
                                                  for t in df.itertuples())
            + ". The Bayes predictor of the clean task is shown for comparison.\n\nAccuracy against context length "
              "(same model, evaluated at each L): "
            + ", ".join(f"L={t.L}: {_pm(t.accuracy, t.accuracy_std, n)} (Bayes {t.bayes_accuracy:.3f})"
                        for t in dl.itertuples()))
    run.add_section("lca_hijack", "LCA 5: hijacking the synthetic task", text, figures=["lca_hijack"],
                    tables=["lca_hijack_fraction", "lca_hijack_length"], **lca_findings(summary))
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
    summary = run.update_summary({"seconds": {**run.summary.get("seconds", {}), "lca": time.time() - t0}})
    return summary


def run_all(run, config: LCAConfig | None = None, quick: bool = False, progress: bool = True) -> dict:
    """Run all five LCA experiments into ``run`` (tables, figures, summary keys, report sections).

    ``quick=True`` uses :meth:`LCAConfig.quick` (the demo configuration) unless ``config`` is given.
    Returns the merged summary.
    """
    cfg = config or (LCAConfig.quick() if quick else LCAConfig())
    return run_experiments(run, EXPERIMENTS, cfg, progress)


def _above(a: float, b: float, sa: float = 0.0, sb: float = 0.0) -> bool | None:
    """True when a exceeds b by more than 2 standard deviations of the difference over seeds (with
    one seed, when a > b), False when b exceeds a likewise, else None."""
    margin = 2 * (sa ** 2 + sb ** 2) ** 0.5
    return True if a - b > margin else False if b - a > margin else None


def lca_findings(summary: dict) -> dict:
    """``findings`` and ``claims`` (for ``Run.add_section``) of one LCA experiment's summary
    (``{"value_matrix": ...}``, ``{"constructed": ...}``, ...), against Jiang et al. 2024's claims.
    Rules: a comparison holds when the difference exceeds twice its standard deviation over seeds
    (one seed: any difference), see :func:`_above`; the embedding claim holds when the fitted slope
    of inner product on latent distance is negative in every setting fitted."""
    paper = "Jiang et al. 2024 (one-layer transformer on the latent concept task)"
    (key, s), = summary.items()
    f, c = [], []
    if key == "value_matrix":
        f.append(f"A trained value matrix reaches accuracy {s['trained']:.2f}, the identity {s['identity']:.2f} "
                 f"(L = {s['L']}, d = {s['d']}, {s['seeds']} seed(s)).")
        c.append(Claim("Training the value matrix helps over the identity", f"{paper}: trained W_V beats the identity",
                       f"{s['trained']:.2f} vs {s['identity']:.2f}",
                       _above(s["trained"], s["identity"], s["trained_std"], s["identity_std"])))
    elif key == "constructed":
        f.append(f"The theorem's constructed value matrix reaches {s['constructed']:.2f} (trained {s['trained']:.2f}, "
                 f"random {s['random']:.2f}, the training's start {s['initial']:.2f}).")
        c.append(Claim("The theorem's constructed value matrix solves the task (above a random one)",
                       f"{paper}: the construction of the theorem solves the task, as a trained W_V does",
                       f"constructed {s['constructed']:.2f}, trained {s['trained']:.2f}, random {s['random']:.2f}",
                       _above(s["constructed"], s["random"], s["constructed_std"], s["random_std"])))
    elif key == "embeddings":
        k, n = (int(x) for x in str(s["negative_slope_under_parameterized"]).split("/"))
        f.append(f"Embedding inner products {'fall' if s['fit_slope'] < 0 else 'do not fall'} with latent distance: "
                 f"fitted slope {s['fit_slope']:.2f} (R² {s['fit_r2']:.2f}; raw inner-product units per unit of "
                 f"distance)" + (f", negative in {k} of {n} under-parameterized settings." if n else "."))
        c.append(Claim("Tokens closer in latent space get larger embedding inner products",
                       f"{paper}: the inner product decreases with the latent distance (under-parameterized)",
                       f"slope {s['fit_slope']:.2f}, negative in {k} of {n} settings",
                       True if n and k == n else False if n and k == 0 else None))
    elif key == "attention":
        f.append(f"The last token's attention per token of its own cluster is {s['same_cluster']:.3f}, per token of "
                 f"another cluster {s['other_cluster']:.4f} (ratio {s['ratio']:.1f}).")
        c.append(Claim("Attention selects the last token's latent cluster",
                       f"{paper}: attention weights are larger on tokens of the same cluster",
                       f"{s['same_cluster']:.3f} vs {s['other_cluster']:.4f}",
                       _above(s["same_cluster"], s["other_cluster"], s["same_cluster_std"], s["other_cluster_std"])))
    elif key == "lca_hijack":
        f.append(f"Replacing the context with the other latent's tokens raises the hijacking efficacy from "
                 f"{s['efficacy_clean']:.2f} to {s['efficacy_full']:.2f}.")
        c.append(Claim("Context hijacking works on the synthetic task",
                       f"{paper}: enough misleading context flips the prediction",
                       f"efficacy {s['efficacy_clean']:.2f} -> {s['efficacy_full']:.2f}",
                       _above(s["efficacy_full"], s["efficacy_clean"], s.get("efficacy_full_std", 0.0))))
    return {"findings": f, "claims": c}


def analyse(experiments: Sequence[str] = EXPERIMENTS, *, quick: bool = False, out=None, progress: bool = True,
            **config):
    """``factscope lca all`` (or some of its ``experiments``) from Python (a notebook): trains the
    one-layer models of :class:`LCAConfig` (``quick``: :meth:`LCAConfig.quick`; ``config``: its
    fields, e.g. ``m=5, seeds=2``) and returns a :class:`factscope.notebook.Result` (one report
    section per experiment; ``tables`` by name); ``out``: its run directory (default: temporary)."""
    from factscope.notebook import analysis

    cfg = LCAConfig.quick(**config) if quick else LCAConfig(**config)
    run_config = {"analysis": "lca", "experiments": list(experiments), "quick": bool(quick), **cfg.defining()}
    return analysis("lca", run_config, lambda run: run_experiments(run, list(experiments), cfg, progress), out)
