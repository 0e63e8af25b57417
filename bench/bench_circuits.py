"""Knowledge circuits (issue 11): EAP-IG and exact edge scores on Gemma 3 270M, against the naive loop.

For one fact of a relation (teacher-forced answer; `--metric nll`: the target NLL over the answer
positions, every copy unembeds the whole vocabulary; `--metric logit_diff`: the target's minus the
counterfactual answer's logit at the first answer position, two vocabulary rows and the copies cut
after that position; zero ablation by default as in the paper):
- EAP-IG (m = 5 steps, interpolating the input embeddings): one batched forward + backward.
- exact: the metric change of removing each of the ~5.6k edges alone, `attribute(method="exact")`
  (per receiver layer, many copies run from that layer on, logits only at the answer positions).
- naive: one `run_masked` forward per edge (mask = full graph minus that edge), timed on a seeded
  sample of edges and extrapolated to all edges; the sampled values must equal the exact scores.
Then, on a few facts: Spearman correlation of EAP-IG (on inputs and on activations) and of EAP
with exact (signed and |score|) and the overlap of their top-50 edges by |score|. All in one run; FLOPs counted with bench/common.py.

    python bench/bench_circuits.py [--model gemma-3-270m] [--facts 3] [--naive-edges 24] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import forward_flops, matmul_peak

from factscope.circuits import Graph, attribute, run_masked
from factscope.circuits import metrics as M
from factscope.circuits.data import build, known_relation_facts
from factscope.models import load_model


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    import pandas as pd

    return float(pd.Series(a.double().numpy()).rank().corr(pd.Series(b.double().numpy()).rank()))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 50) -> float:
    return len(set(a.abs().topk(k).indices.tolist()) & set(b.abs().topk(k).indices.tolist())) / k


def exact_flops(model, g: Graph, T: int, P: int, t_copy: int, rows: int) -> float:
    """Copies from each receiver layer on (``t_copy`` tokens: up to the last column the metric reads;
    P positions x ``rows`` vocabulary rows unembedded each), the logits edges' unembedding, and the
    clean forward (T tokens, P full-vocabulary positions)."""
    unembed = 2 * model.d_model * rows * P
    total = forward_flops(model, T, P)
    for l in range(model.n_layers):
        c = g.receiver_cols(l)
        n = int(g.real[:, c["q"][0] : c["m"] + 1].sum())
        total += n * (forward_flops(model, t_copy, 0, start_layer=l) + unembed)
    total += (g.n_up + 1) * unembed
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--relation", default="lre:factual/country_capital_city")
    ap.add_argument("--facts", type=int, default=3, help="facts for the EAP-IG vs exact agreement (the first is timed)")
    ap.add_argument("--naive-edges", type=int, default=24, help="edges timed with one run_masked each")
    ap.add_argument("--ablation", default="zero", choices=["zero", "mean", "counterfactual"])
    ap.add_argument("--metric", default="nll", choices=["nll", "logit_diff"],
                    help="target NLL over the answer positions (every copy unembeds the whole vocabulary) "
                         "or the logit difference at the first answer position (two vocabulary rows)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-rows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]

    model = load_model(args.model)
    facts, _ = known_relation_facts(model, args.relation, seed=args.seed, top_k=10)
    data = build(model, facts, seed=args.seed)
    peak = matmul_peak()
    g = Graph.from_model(model)
    real = g.real
    kw = dict(ablation=args.ablation)
    res: dict = {"model": args.model, "relation": args.relation, "threads": args.threads, "ablation": args.ablation,
                 "metric": args.metric,
                 "n_edges": g.n_edges, "matmul_peak_gflops": peak / 1e9}

    sub = data.subset([0])
    metric = M.make(args.metric, model, sub)
    T, P = sub.clean.input_ids.shape[1], metric.positions.shape[1]
    t_copy = int(metric.positions.max()) + 1
    rows_unembedded = model.vocab_size if metric.vocab is None else metric.vocab.shape[1]
    res.update(fact=sub.facts[0].prompt if hasattr(sub.facts[0], "prompt") else str(sub.facts[0]), tokens=T,
               answer_positions=P, copy_tokens=t_copy, vocab_rows_per_position=rows_unembedded)

    t = time.perf_counter()
    ig = attribute(model, Graph.from_model(model), sub.clean, sub.corrupted, metric, method="eap-ig",
                   steps=args.steps, **kw)[real].clone()
    res["eap_ig_s"] = time.perf_counter() - t
    print(f"EAP-IG (m={args.steps}) on one fact ({T} tokens, {P} answer positions): {res['eap_ig_s']:.2f} s", flush=True)

    t = time.perf_counter()
    ge = Graph.from_model(model)
    attribute(model, ge, sub.clean, sub.corrupted, metric, method="exact", max_rows=args.max_rows, **kw)
    res["exact_s"] = time.perf_counter() - t
    ex = ge.scores[real].clone()
    fl = exact_flops(model, g, T, P, t_copy, rows_unembedded)
    res["exact_gflops"] = fl / res["exact_s"] / 1e9
    print(f"exact, all {g.n_edges} edges: {res['exact_s']:.1f} s ({res['exact_gflops']:.1f} GFLOP/s, "
          f"{100 * fl / res['exact_s'] / peak:.0f}% of the {peak / 1e9:.0f} GFLOP/s matmul peak)", flush=True)

    edges = real.nonzero()
    pick = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(args.seed))[: args.naive_edges]]
    rows = torch.arange(1)
    with torch.no_grad():
        base = float(metric.fn(model.forward(sub.clean, positions=metric.positions), rows).mean())
    diffs, t = [], time.perf_counter()
    for u, r in pick.tolist():
        mask = real.float()
        mask[u, r] = 0
        out = run_masked(model, sub.clean, mask, corrupted=sub.corrupted, reference=sub.clean,
                         positions=metric.positions, **kw)
        diffs.append(abs(float(metric.fn(out, rows).mean()) - base - float(ge.scores[u, r])))
    per = (time.perf_counter() - t) / len(pick)
    res["naive_s_per_edge"] = per
    res["naive_s_extrapolated"] = per * g.n_edges
    res["naive_vs_exact_max_abs_diff"] = max(diffs)
    one = forward_flops(model, T, P) + (forward_flops(model, T, 1) if args.ablation != "zero" else 0)  # + ablated run
    naive_fl = one * g.n_edges
    res["naive_gflops"] = one / per / 1e9
    res["speedup"] = res["naive_s_extrapolated"] / res["exact_s"]
    res["flop_ratio"] = naive_fl / fl
    print(f"naive: {per * 1000:.0f} ms per edge -> {res['naive_s_extrapolated']:.0f} s for all edges "
          f"({res['naive_gflops']:.1f} GFLOP/s); exact is {res['speedup']:.1f}x faster (FLOP ratio "
          f"{res['flop_ratio']:.2f}x); largest |naive - exact| on {len(pick)} edges: {max(diffs):.2e}", flush=True)

    def compare(i: int, s, m, ig: torch.Tensor, ex: torch.Tensor) -> dict:
        eap = attribute(model, Graph.from_model(model), s.clean, s.corrupted, m, method="eap", **kw)[real]
        act = attribute(model, Graph.from_model(model), s.clean, s.corrupted, m, method="eap-ig-act",
                        steps=args.steps, **kw)[real]
        row = {"fact": i, "prompt": getattr(s.facts[0], "prompt", "")}
        for name, sc in (("eap_ig", ig), ("eap_ig_act", act), ("eap", eap)):
            row[name] = {"spearman": spearman(sc, ex), "spearman_abs": spearman(sc.abs(), ex.abs()),
                         "top50_overlap": top_overlap(sc, ex)}
        print(f"fact {i} ({row['prompt']!r}): " + "; ".join(
            f"{n}: Spearman {r['spearman']:.3f} (|score| {r['spearman_abs']:.3f}), top-50 overlap {r['top50_overlap']:.2f}"
            for n, r in (("EAP-IG", row["eap_ig"]), ("EAP-IG on activations", row["eap_ig_act"]),
                         ("EAP", row["eap"]))), flush=True)
        return row

    agree = [compare(0, sub, metric, ig, ex)]
    for i in range(1, min(args.facts, len(data))):
        s = data.subset([i])
        m = M.make(args.metric, model, s)
        a = attribute(model, Graph.from_model(model), s.clean, s.corrupted, m, method="eap-ig", steps=args.steps, **kw)[real]
        b = attribute(model, Graph.from_model(model), s.clean, s.corrupted, m, method="exact",
                      max_rows=args.max_rows, **kw)[real]
        agree.append(compare(i, s, m, a, b))
    res["agreement"] = agree
    res["load_before"], res["load_after"] = load0, os.getloadavg()[0]
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
