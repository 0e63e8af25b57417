"""Standalone evaluation of a circuit (the paper's Table 1, done right) and MIB's faithfulness curve.

Everything runs on D_test (facts never used for discovery) with the masked forward
(:func:`factscope.circuits.run_masked`): edges outside the circuit are ablated (zero by default, as
KnowledgeCircuits' run script). Per model variant (full, circuit, random circuits of the same edge
count over several seeds):

- Hit@1, Hit@10 and MRR of the target's first token at the last prompt position; its rank is the
  number of other vocabulary entries whose logit is at least the target's (0 = top; ties count
  against the target: with every edge into the logits removed the output is constant, and counting
  ties in the target's favour would score that collapsed model perfectly), MRR = mean of
  1 / (rank + 1). The labels are D_test's own targets (KnowledgeCircuits' final evaluation compares
  D_test's logits with the validation labels).
- faithfulness = (m(circuit) - m(empty)) / (m(full) - m(empty)) of the mean metric m (ratio of
  means, as MIB's ``evaluate_area_under_curve``).
- MIB's faithfulness curve over edge fractions {0.1, ..., 100}%: the top-k edges by |score|,
  dead edges pruned, faithfulness per point; CPR = area under the curve and CMD = area between the
  curve and 1, trapezoids over x = the fraction of edges actually kept (after pruning) on a linear
  scale, so both lie in [0, 1] for a curve within [0, 1]. (MIB's code integrates over edge counts,
  optionally in log scale; the fraction keeps the numbers comparable across models.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from factscope.errors import FactscopeError
from factscope.notebook import callable_module

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
RANK_KEYS = ("hit1", "hit10", "mrr")

Runner = Callable[[torch.Tensor], torch.Tensor]  # mask float [n_up, n_down] -> logits [B, P, V]


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def target_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """long [B]: 0-based rank of ``targets`` in ``logits`` [B, V]: the number of other tokens whose
    logit is at least the target's (ties count against the target, so a collapsed, constant output
    ranks it last, not first)."""
    lg = logits.float()
    t = lg.gather(-1, targets.to(lg.device).long()[:, None])
    return (lg >= t).sum(-1) - 1


def rank_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Hit@1, Hit@10 and MRR of ``targets`` under ``logits`` [B, V]."""
    r = target_ranks(logits, targets).float()
    return {"hit1": float((r < 1).float().mean()), "hit10": float((r < 10).float().mean()),
            "mrr": float((1.0 / (r + 1)).mean())}


def faithfulness(circuit: float, full: float, empty: float) -> float:
    """(circuit - empty) / (full - empty); NaN when full == empty."""
    den = full - empty
    return float("nan") if den == 0 else (circuit - empty) / den


def curve_areas(x: Sequence[float], f: Sequence[float]) -> tuple[float, float]:
    """(CPR, CMD): trapezoid areas under ``f`` and of ``|1 - f|`` over ``x`` (sorted by x)."""
    pts = sorted(zip(x, f))
    cpr = cmd = 0.0
    for (x1, f1), (x2, f2) in itertools.pairwise(pts):
        cpr += (x2 - x1) * (f1 + f2) / 2
        cmd += (x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2
    return cpr, cmd


def random_mask(real: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """bool like ``real``: ``n`` real edges drawn uniformly without replacement (seeded)."""
    idx = real.flatten().nonzero()[:, 0]
    if n > len(idx):
        raise FactscopeError(f"cannot draw {n} edges from a graph of {len(idx)}")
    g = torch.Generator().manual_seed(int(seed))
    pick = idx[torch.randperm(len(idx), generator=g)[:n].to(idx.device)]
    out = torch.zeros(real.numel(), dtype=torch.bool, device=real.device)
    out[pick] = True
    return out.view_as(real)


SELECTIONS = ("topn", "greedy")


def top_mask(graph, n: int, prune: bool = True, selection: str = "topn") -> torch.Tensor:
    """bool [n_up, n_down]: ``n`` edges of ``graph`` chosen by |score|, dead edges pruned.

    ``selection``: "topn" (the ``n`` highest |scores|, as KnowledgeCircuits and MIB's default) or
    "greedy" (EAP-IG's ``apply_greedy``: grow from the logits, always adding the highest-scoring
    edge into a node already in the circuit)."""
    if selection == "greedy":
        graph.greedy(n, absolute=True)
    elif selection == "topn":
        graph.top_n(n, absolute=True)
    else:
        raise FactscopeError(f"unknown selection {selection!r}: use one of {', '.join(SELECTIONS)}")
    if prune:
        graph.prune_dead()
    return graph.in_graph.clone()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class CircuitEval:
    n_edges_total: int
    n_edges: int
    ranks: dict[str, dict[str, float]]          # hit1/hit10/mrr -> full/circuit/random/random_std/empty
    metric: str
    metric_values: dict[str, float]             # full/circuit/empty/random (mean metric on D_test)
    faithfulness: float
    curve: list[dict[str, float]] = field(default_factory=list)  # fraction, n_edges, x, metric, faithfulness
    cpr: float = float("nan")
    cmd: float = float("nan")
    random_runs: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"n_edges_total": self.n_edges_total, "n_edges": self.n_edges,
               "edge_fraction": self.n_edges / self.n_edges_total}
        out.update({k: dict(self.ranks[k]) for k in RANK_KEYS})
        out.update({"metric": self.metric, "metric_values": dict(self.metric_values),
                    "faithfulness": self.faithfulness, "cpr": self.cpr, "cmd": self.cmd})
        return out

    def table(self):
        """One row per model variant: Hit@1, Hit@10, MRR (random: mean and std over seeds)."""
        import pandas as pd

        rows = []
        for v in ("full", "circuit", "random", "empty"):
            r = {"variant": v, "n_edges": {"full": self.n_edges_total, "circuit": self.n_edges,
                                            "random": self.n_edges, "empty": 0}[v]}
            for k in RANK_KEYS:
                r[k] = self.ranks[k][v]
                r[k + "_std"] = self.ranks[k]["random_std"] if v == "random" else "-"  # over random seeds
            r[f"{self.metric} (mean)"] = self.metric_values[v]
            rows.append(r)
        return pd.DataFrame(rows)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def evaluate_masks(runner: Runner, metric, targets: torch.Tensor, real: torch.Tensor, circuit: torch.Tensor,
                   n_random: int = 5, seed: int = 0) -> tuple[dict, dict, list]:
    """(ranks, metric values, per-seed random runs) for full / circuit / empty / random masks.

    ``runner(mask)`` returns logits [B, P, V] at ``metric.positions``; column 0 is the first answer
    position (Hit@k and MRR read it).
    """
    if n_random < 1:
        raise FactscopeError("need at least one random circuit")
    real = real.bool()
    n = int((circuit & real).sum())

    def one(mask):
        with torch.no_grad():
            lg = runner(mask.float())
        out = rank_metrics(lg[:, 0], targets)
        out["metric"] = float(metric.mean(lg))
        return out

    res = {"full": one(real), "circuit": one(circuit & real), "empty": one(torch.zeros_like(real))}
    rand = [one(random_mask(real, n, seed + 1000 + s)) for s in range(n_random)]
    ranks = {}
    for k in RANK_KEYS:
        m, sd = _mean_std([r[k] for r in rand])
        ranks[k] = {"full": res["full"][k], "circuit": res["circuit"][k], "random": m, "random_std": sd,
                    "empty": res["empty"][k]}
    mv = {v: res[v]["metric"] for v in ("full", "circuit", "empty")}
    mv["random"], mv["random_std"] = _mean_std([r["metric"] for r in rand])
    return ranks, mv, rand


def faithfulness_curve(runner: Runner, metric, graph, full: float, empty: float,
                       fractions: Sequence[float] = FRACTIONS, prune: bool = True,
                       selection: str = "topn") -> list[dict[str, float]]:
    """MIB's faithfulness curve: per fraction, the top edges by |score| (dead ones pruned)."""
    total = int(graph.real.sum())
    saved = graph.in_graph.clone()
    pts = []
    try:
        for fr in fractions:
            k = int(fr * total)
            mask = top_mask(graph, k, prune=prune, selection=selection)
            with torch.no_grad():
                m = float(metric.mean(runner(mask.float())))
            kept = int(mask.sum())
            pts.append({"fraction": fr, "n_edges": kept, "x": kept / total, "metric": m,
                        "faithfulness": faithfulness(m, full, empty)})
    finally:
        graph.in_graph.copy_(saved)
    return pts


def evaluate_circuit(runner: Runner, metric, targets: torch.Tensor, graph, n_edges: int, n_random: int = 5,
                     seed: int = 0, fractions: Sequence[float] | None = FRACTIONS, prune: bool = True,
                     selection: str = "topn") -> CircuitEval:
    """Evaluate the top-``n_edges`` circuit of ``graph`` (by |score|, then dead edges pruned, so the
    circuit may hold fewer edges; ``CircuitEval.n_edges`` is the count kept) on the data behind
    ``runner``/``metric``/``targets``; random circuits get as many edges as the circuit kept.
    Leaves ``graph.in_graph`` set to the circuit."""
    total = int(graph.real.sum())
    if not 1 <= n_edges <= total:
        raise FactscopeError(f"circuit size must be between 1 and {total} edges, got {n_edges}")
    curve = faithfulness_curve(runner, metric, graph, 0.0, 0.0, fractions, prune, selection) if fractions else []
    mask = top_mask(graph, n_edges, prune=prune, selection=selection)
    ranks, mv, rand = evaluate_masks(runner, metric, targets, graph.real, mask, n_random, seed)
    for p in curve:
        p["faithfulness"] = faithfulness(p["metric"], mv["full"], mv["empty"])
    cpr, cmd = curve_areas([p["x"] for p in curve], [p["faithfulness"] for p in curve]) if curve else (math.nan,) * 2
    return CircuitEval(total, int(mask.sum()), ranks, metric.name, mv,
                       faithfulness(mv["circuit"], mv["full"], mv["empty"]), curve, cpr, cmd, rand)


def masked_runner(model, batch, positions: torch.Tensor, ablation: str = "zero", corrupted=None, reference=None,
                  batch_size: int | None = None) -> Runner:
    """``mask -> logits [B, P, V]`` with :func:`factscope.circuits.run_masked` (chunked over examples)."""
    from factscope.circuits import run_masked

    def run(mask: torch.Tensor) -> torch.Tensor:
        return run_masked(model, batch, mask, ablation=ablation, corrupted=corrupted, reference=reference,
                          positions=positions)

    return run


def analyse(*args, **kwargs):
    """``factscope.circuits.evaluate(model, dataset, ...)``: ``factscope circuit evaluate`` from Python,
    :func:`factscope.circuits.run.analyse_evaluate`."""
    from factscope.circuits.run import analyse_evaluate

    return analyse_evaluate(*args, **kwargs)


callable_module(__name__)
