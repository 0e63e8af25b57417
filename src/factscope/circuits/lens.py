"""How the answer forms across layers: the logit lens of the residual stream (the paper's Figure 5).

For each fact and each point of the residual stream (the embeddings fed to layer 0, then the output
of every layer), the stream is read through the model's own final norm and unembedding
(:meth:`Model.logit_lens`), and we record, for chosen tokens (the target's first token, and any
other, e.g. the model's own wrong answer):

- the token's **rank** at the last prompt position (0 = top; tokens with an equal logit count
  against it, as :func:`~factscope.circuits.evaluate.target_ranks`) and its **probability**;
- its **minimum rank over the subject's positions** (KnowledgeCircuits' ``get_min_rank_at_subject``:
  the answer often surfaces at the subject before it reaches the last token).

The point after the last layer is the model's output (its logits, exactly). Points are labelled by
layer: ``-1`` = the embeddings, ``l`` = the output of layer ``l``.

Tiers: :func:`lens_batch` (one batch, pure computation), :func:`lens_facts` (facts in length-sorted
batches -> :class:`LensResult`), :func:`run_lens` (tables, figure, summary, report section).
KnowledgeCircuits (``notebook/component.ipynb``, ``ComponentAnalyzer``) reads TransformerLens'
``accumulated_resid(apply_ln=True)`` with the final LayerNorm's scale of each point and the folded,
centred unembedding; we apply the model's own final norm module to each point (the standard logit
lens, what the model would output if it stopped there), so the last point equals the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from factscope.findings import Claim
from factscope import hooks
from factscope.circuits.evaluate import target_ranks
from factscope.errors import FactscopeError
from factscope.facts import Fact, fact_subject_span, target_ids
from factscope.notebook import callable_module


def point_labels(model) -> list[int]:
    """Layer labels of the residual points: -1 (embeddings), then 0..L-1 (output of layer l)."""
    return list(range(-1, model.n_layers))


def residual_points(model, batch) -> torch.Tensor:
    """``[L + 1, B, T, d]``: the stream entering layer 0, then leaving every layer (one forward)."""
    L = model.n_layers
    with torch.no_grad(), hooks.cache(model, ["resid_pre"], [0]) as c0, hooks.cache(model, ["resid_post"]) as c:
        model.forward(batch, last_only=True)
    return torch.stack([c0["resid_pre", 0]] + [c["resid_post", l] for l in range(L)])


def ranks_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """long ``[B, K]``: rank of each of ``tokens [B, K]`` in ``logits [B, V]`` (ties count against)."""
    B, K = tokens.shape
    return target_ranks(logits.repeat_interleave(K, 0), tokens.reshape(-1)).view(B, K)


def lens_batch(model, batch, tokens: torch.Tensor, spans: Sequence[tuple[int, int]] | None = None) -> dict:
    """Logit lens of one left-padded batch.

    ``tokens``: long ``[B, K]`` token ids to follow per prompt; ``spans``: per prompt the subject's
    ``[start, end)`` token positions (prompt positions, BOS counted), or None.
    Returns ``rank_last``/``prob_last``/``rank_subject`` ``[B, K, P]`` (``P = L + 1`` points;
    ``rank_subject`` is -1 without spans) and ``top1`` ``[B, P]`` (the lens' top token at the last
    position).
    """
    B = len(batch)
    tokens = tokens.to(model.device).long()
    if tokens.shape[0] != B:
        raise FactscopeError(f"{tokens.shape[0]} token rows for a batch of {B} prompts")
    stack = residual_points(model, batch)
    P = stack.shape[0]
    K = tokens.shape[1]
    rank_last = torch.zeros(B, K, P, dtype=torch.long)
    prob_last = torch.zeros(B, K, P)
    rank_sub = torch.full((B, K, P), -1, dtype=torch.long)
    top1 = torch.zeros(B, P, dtype=torch.long)
    cols = None
    if spans is not None:
        if len(spans) != B:
            raise FactscopeError(f"{len(spans)} subject spans for a batch of {B} prompts")
        cols = hooks.columns(batch, [range(s, e) for s, e in spans])
        if any(not c for c in cols):
            raise FactscopeError("a subject span is empty")
    with torch.no_grad():
        for p in range(P):
            lg = model.logit_lens(stack[p, :, -1]).float()  # [B, V]
            rank_last[:, :, p] = ranks_of(lg, tokens).cpu()
            prob_last[:, :, p] = lg.softmax(-1).gather(1, tokens).cpu()
            top1[:, p] = lg.argmax(-1).cpu()
            if cols is not None:
                for i, c in enumerate(cols):
                    ls = model.logit_lens(stack[p, i, c]).float()  # [S, V]
                    r = ranks_of(ls, tokens[i : i + 1].expand(len(c), K))  # [S, K]
                    rank_sub[i, :, p] = r.min(0).values.cpu()
    return {"rank_last": rank_last, "prob_last": prob_last, "rank_subject": rank_sub, "top1": top1}


@dataclass
class LensResult:
    """Logit-lens curves of facts: ``[N, K, P]`` tensors (``K`` followed tokens, ``P`` points)."""

    facts: list[Fact]
    token_ids: torch.Tensor  # long [N, K]; column 0 is the target's first token
    token_names: list[str]  # what each column is ("target", "answer", ...)
    layers: list[int]  # point labels: -1 embeddings, then layers
    rank_last: torch.Tensor
    prob_last: torch.Tensor
    rank_subject: torch.Tensor
    top1: torch.Tensor  # long [N, P]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.facts)

    def table(self, tokenizer=None):
        """One row per (fact, followed token, point): rank and probability at the last position and
        the minimum rank over the subject positions."""
        import pandas as pd

        rows = []
        for i, f in enumerate(self.facts):
            for k, name in enumerate(self.token_names):
                tok = int(self.token_ids[i, k])
                s = tokenizer.decode([tok]) if tokenizer is not None else str(tok)
                for p, layer in enumerate(self.layers):
                    rows.append({"fact": f.id or f.subject, "subject": f.subject, "token": name,
                                 "token_str": s, "layer": layer, "rank_last": int(self.rank_last[i, k, p]),
                                 "prob_last": float(self.prob_last[i, k, p]),
                                 "rank_subject_min": int(self.rank_subject[i, k, p])})
        return pd.DataFrame(rows)

    def by_layer(self, k: int = 0, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
        """Per point, over the facts: median rank at the last position and its bootstrap interval,
        mean probability and its interval, median subject minimum rank and its interval."""
        import pandas as pd

        rows = []
        for p, layer in enumerate(self.layers):
            r = self.rank_last[:, k, p].double().numpy()
            pr = self.prob_last[:, k, p].double().numpy()
            rs = self.rank_subject[:, k, p].double().numpy()
            mlo, mhi = bootstrap(r, np.median, n_boot, seed, level)
            plo, phi = bootstrap(pr, np.mean, n_boot, seed, level)
            slo, shi = bootstrap(rs, np.median, n_boot, seed, level)
            rows.append({"layer": layer, "n_facts": len(r), "median_rank_last": float(np.median(r)),
                         "median_rank_last_lo": mlo, "median_rank_last_hi": mhi,
                         "mean_prob_last": float(pr.mean()), "mean_prob_last_lo": plo, "mean_prob_last_hi": phi,
                         "median_rank_subject": float(np.median(rs)), "median_rank_subject_lo": slo,
                         "median_rank_subject_hi": shi, "top1_share": float((r == 0).mean()),
                         "top10_share": float((r < 10).mean())})
        return pd.DataFrame(rows)


def bootstrap(values: np.ndarray, stat: Callable, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (e.g. ``np.median``) over ``values`` (seeded)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if n_boot < 1:
        raise FactscopeError(f"bootstrap resamples must be at least 1, not {n_boot}")
    draws = x[np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))]
    vals = stat(draws, axis=1)
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def emergence_layer(ranks: Sequence[int], layers: Sequence[int], top: int = 10) -> int | None:
    """The first layer from which the token stays within the lens' top ``top`` through the output
    (None when it is not in the top ``top`` at the output)."""
    r = list(ranks)
    if not r or r[-1] >= top:
        return None
    p = len(r) - 1
    while p > 0 and r[p - 1] < top:
        p -= 1
    return int(layers[p])


def lens_facts(model, facts: Sequence[Fact], extra: Sequence[Sequence[int]] | None = None,
               extra_names: Sequence[str] = (), batch_size: int = 16, progress: bool = False) -> LensResult:
    """:func:`lens_batch` over ``facts`` in length-sorted batches; the followed tokens are each fact's
    target's first token, then ``extra[i]`` (token ids, one list per fact, all of one length)."""
    from factscope.predict import length_batches

    if not facts:
        raise FactscopeError("no facts for the logit lens")
    tok = model.tokenizer
    seqs = [list(tok(f.prompt)["input_ids"]) for f in facts]
    spans = [fact_subject_span(tok, f) for f in facts]
    ids = [[target_ids(tok, f.prompt, f.target_true)[0]] + list(extra[i] if extra is not None else [])
           for i, f in enumerate(facts)]
    if len({len(x) for x in ids}) != 1:
        raise FactscopeError("every fact needs the same number of extra tokens")
    names = ["target"] + list(extra_names)
    if len(names) != len(ids[0]):
        raise FactscopeError(f"{len(ids[0])} followed tokens but {len(names)} names")
    token_ids = torch.tensor(ids, dtype=torch.long)
    N, K, P = len(facts), token_ids.shape[1], model.n_layers + 1
    out = {"rank_last": torch.zeros(N, K, P, dtype=torch.long), "prob_last": torch.zeros(N, K, P),
           "rank_subject": torch.zeros(N, K, P, dtype=torch.long), "top1": torch.zeros(N, P, dtype=torch.long)}
    bar = tqdm(total=N, desc="logit lens", disable=not progress, unit="fact")
    for idx in length_batches([len(s) for s in seqs], batch_size):
        res = lens_batch(model, model.batch_from_ids([seqs[i] for i in idx]), token_ids[idx], [spans[i] for i in idx])
        for key, v in res.items():
            out[key][idx] = v
        bar.update(len(idx))
    bar.close()
    return LensResult(list(facts), token_ids, names, point_labels(model), out["rank_last"], out["prob_last"],
                      out["rank_subject"], out["top1"])


# --------------------------------------------------------------------------------------------
# Figure and run
# --------------------------------------------------------------------------------------------


def layer_x(ax, layers: Sequence[int]) -> None:
    """Integer ticks for a residual-point axis (-1 = embeddings, then layers)."""
    step = max(1, -(-len(layers) // 12))
    ax.set_xticks([x for x in layers if (x + 1) % step == 0])
    ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    ax.set_xlabel("layer (-1 = embeddings)")


def plot_lens(res: LensResult, title: str, k: int = 0, agg=None, groups: dict | None = None):
    """Figure 5 style: the target's rank (log scale) at the last position and its minimum over the
    subject's positions by layer (median over facts with bootstrap 95% bands, thin lines per fact),
    and its mean probability at the last position. ``groups``: {label: fact indices} draws one
    median line per group instead (e.g. facts the model gets right / wrong)."""
    from factscope.plotting import COLORS, PALETTE, new_figure

    fig, (ax, bx) = new_figure(1, 2, size=(11, 4.0))
    xs = res.layers
    if groups is None:
        agg = res.by_layer(k) if agg is None else agg
        for i in range(len(res)):
            ax.plot(xs, res.rank_last[i, k].numpy() + 1, color=COLORS["last"], alpha=0.15, lw=0.7)
        for col, lab, c in (("rank_last", "last position", COLORS["last"]),
                            ("rank_subject", "subject positions (min)", COLORS["subject"])):
            med = agg[f"median_{col}"] + 1
            ax.plot(xs, med, color=c, lw=2, label=f"{lab}, median")
            ax.fill_between(xs, agg[f"median_{col}_lo"] + 1, agg[f"median_{col}_hi"] + 1, color=c, alpha=0.2)
        bx.plot(xs, agg["mean_prob_last"], color=COLORS["last"], lw=2, label="last position, mean")
        bx.fill_between(xs, agg["mean_prob_last_lo"], agg["mean_prob_last_hi"], color=COLORS["last"], alpha=0.2)
    else:
        for j, (lab, idx) in enumerate(groups.items()):
            if not len(idx):
                continue
            c = PALETTE[j % len(PALETTE)]
            r = res.rank_last[idx, k].double()
            ax.plot(xs, r.median(0).values.numpy() + 1, color=c, lw=2, label=f"{lab} ({len(idx)}), last")
            ax.plot(xs, res.rank_subject[idx, k].double().median(0).values.numpy() + 1, color=c, lw=1.2, ls="--",
                    label=f"{lab}, subject (min)")
            bx.plot(xs, res.prob_last[idx, k].double().mean(0).numpy(), color=c, lw=2, label=lab)
    ax.set_yscale("log")
    ax.invert_yaxis()
    layer_x(ax, xs)
    ax.set_ylabel(f"rank of the {res.token_names[k]} + 1 (log)")
    ax.axhline(1, color="#999999", lw=0.6, ls=":")
    ax.axhline(10, color="#bbbbbb", lw=0.6, ls=":")
    ax.legend(fontsize=7, loc="center left")
    ax.set_title("rank", fontsize=10)
    layer_x(bx, xs)
    bx.set_ylabel(f"P({res.token_names[k]}) at the last position")
    bx.set_title("probability", fontsize=10)
    bx.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=11)
    return fig


def lens_summary(res: LensResult, agg, top: int = 10) -> dict:
    """Headline numbers: the output's median rank, the layer where the median rank enters the top
    ``top`` and stays, the same at the subject, and per-fact emergence layers."""
    layers = res.layers
    em = [emergence_layer(res.rank_last[i, 0].tolist(), layers, top) for i in range(len(res))]
    known = [e for e in em if e is not None]
    return {
        "n_facts": len(res),
        "median_rank_output": float(agg["median_rank_last"].iloc[-1]),
        "mean_prob_output": float(agg["mean_prob_last"].iloc[-1]),
        "top1_output": float(agg["top1_share"].iloc[-1]),
        "top10_output": float(agg["top10_share"].iloc[-1]),
        "median_enters_top": emergence_layer(agg["median_rank_last"].tolist(), layers, top),
        "median_subject_enters_top": emergence_layer(agg["median_rank_subject"].tolist(), layers, top),
        "best_subject_layer": int(layers[int(np.argmin(agg["median_rank_subject"].to_numpy()))]),
        "best_subject_median_rank": float(agg["median_rank_subject"].min()),
        "emergence_top": top,
        "emergence_layer_median": float(np.median(known)) if known else None,
        "n_emerged": len(known),
    }


def lens_findings(s: dict, n_layers: int) -> tuple[list[str], list[Claim]]:
    """Findings and Yao et al.'s Figure 5 claims from a lens summary. Rules: "the answer forms in
    middle-to-late layers" holds when the median rank at the last position enters the top k at a
    layer in the upper two thirds, does not hold when earlier or never; "the answer is at the subject
    before the last position" holds when the subject positions' median enters the top k at an earlier
    layer than the last position's, does not hold when later or never, undecided when the same."""
    top, last, subj = s["emergence_top"], s.get("median_enters_top"), s.get("median_subject_enters_top")
    never = "never"
    where = lambda x: never if x is None else f"at layer {x}"  # noqa: E731
    f = [f"At the last position the target's median rank enters the top {top} {where(last)} of {n_layers} "
         f"layers; at the subject positions {where(subj)} ({s['n_facts']} facts; at the output top-1 {s['top1_output']:.2f}, "
         f"top-10 {s['top10_output']:.2f})."]
    claims = [
        Claim("The answer forms in middle-to-late layers at the last position",
              "GPT-2 medium: the target's rank rises in the middle-to-late layers (Figure 5)",
              f"top {top} from layer {last if last is not None else never} of {n_layers}",
              True if last is not None and last >= n_layers / 3 else False),
        Claim("The answer appears at the subject positions before the last position",
              "GPT-2 medium: the target already ranks high at the subject positions in earlier layers, then "
              "mover heads bring it to the last position",
              f"subject: layer {subj if subj is not None else never}, last position: layer "
              f"{last if last is not None else never}",
              None if subj is not None and subj == last else
              True if subj is not None and (last is None or subj < last) else False),
    ]
    return f, claims


def _fmt_rank(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.0f}"


def run_lens(run, model, facts: Sequence[Fact], dataset: str, n_boot: int = 1000, seed: int = 0,
             top: int = 10, batch_size: int = 16, progress: bool = False) -> LensResult:
    """Logit lens of ``facts``: ``lens.csv`` (per fact and layer), ``lens_by_layer.csv`` (median rank,
    mean probability with bootstrap intervals), ``lens.png``, ``summary["lens"]`` and a section."""
    res = lens_facts(model, facts, batch_size=batch_size, progress=progress)
    agg = res.by_layer(0, n_boot=n_boot, seed=seed)
    run.save_table("lens", res.table(model.tokenizer))
    run.save_table("lens_by_layer", agg)
    rel = dataset.split("/")[-1]
    run.save_figure("lens", plot_lens(res, f"{model.name} · {rel} · logit lens of the target ({len(res)} facts)",
                                      agg=agg))
    s = lens_summary(res, agg, top)
    run.update_summary({"lens": s})
    L = model.n_layers
    text = (
        f"Logit lens of the residual stream on {len(res)} facts of `{dataset}` ({model.weights}): at every "
        f"layer the stream is passed through the model's final norm and unembedding, and the rank (0 = top) "
        f"and probability of the target's first token are read at the last prompt position; the minimum "
        f"rank over the subject's positions shows the answer at the subject. Bands: bootstrap 95% "
        f"intervals ({n_boot} resamples) of the median rank and the mean probability.\n\n"
        f"- at the output (after layer {L - 1}): median rank {_fmt_rank(s['median_rank_output'])}, mean "
        f"probability {s['mean_prob_output']:.3f}, top-1 {s['top1_output']:.2f}, top-10 {s['top10_output']:.2f}\n"
        f"- the median rank at the last position enters the top {top} (and stays) at layer "
        f"{s['median_enters_top'] if s['median_enters_top'] is not None else 'never'}; per fact the median "
        f"such layer is {s['emergence_layer_median'] if s['emergence_layer_median'] is not None else 'n/a'} "
        f"({s['n_emerged']} of {len(res)} facts end in the top {top})\n"
        f"- at the subject positions the median minimum rank is lowest after layer {s['best_subject_layer']} "
        f"({_fmt_rank(s['best_subject_median_rank'])})"
    )
    findings, claims = lens_findings(s, L)
    run.add_section("circuit_lens", "How the answer forms (logit lens)", text, findings=findings, claims=claims,
                    figures=[{"name": "lens", "caption": "target rank by layer (median, 95% band; thin: facts) "
                              "and mean probability at the last position"}],
                    tables=["lens_by_layer"])
    return res


def analyse(model, dataset: str = "lre:factual/country_capital_city", *, limit: int | None = 40, seed: int = 0,
            known_only: bool = True, known_top_k: int = 10, n_boot: int = 1000, emerge_top: int = 10, out=None,
            progress: bool = True):
    """``factscope circuit lens`` from Python (``factscope.circuits.lens(model, dataset)``): the logit
    lens of :func:`run_lens` on the facts of ``dataset`` whose target is in ``model``'s top
    ``known_top_k``. Returns a :class:`factscope.notebook.Result` (``tables["lens"]``: per fact and
    layer; ``tables["lens_by_layer"]``: the aggregate)."""
    from factscope.circuits.data import known_relation_facts
    from factscope.notebook import analysis, as_model, config_of

    model = as_model(model)
    facts, table = known_relation_facts(model, dataset, limit=limit, seed=seed, top_k=known_top_k, progress=progress,
                                        known_only=known_only)
    if not facts:
        raise FactscopeError(f"{model.name} knows none of the facts of {dataset} (top-{known_top_k}); use "
                             "known_only=False or a larger known_top_k")
    cfg = config_of("circuit", model, dataset, limit, seed, known_only=known_only, command="circuit lens",
                    known_top_k=known_top_k, bootstrap=n_boot, emerge_top=emerge_top)

    def body(run) -> None:
        run.save_table("known_facts", table)
        run_lens(run, model, facts, dataset, n_boot=n_boot, seed=seed, top=emerge_top, progress=progress)

    return analysis("lens", cfg, body, out)


callable_module(__name__)  # factscope.circuits.lens(model, dataset) is analyse(model, dataset)
