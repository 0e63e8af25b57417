"""Attention knockout (issue 3, part 1): factscope's fast method against the naive method.

Naive: one full forward per fact x window x position set, vocabulary logits at every position
(`flow.knockout.naive_knockout`). factscope: `flow.knockout.knockout_batch` - one clean forward
per batch of facts (residual stream and keys/values cached), then per window the facts x sets
are run as one batch from the window's first layer, only the last position recomputed, logits at
the last position only. Both on the same known facts of known_1000 in one run; the % changes
must agree within 0.1 percentage points.

    python bench/bench_flow.py [--model gemma-3-270m] [--n 4] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import forward_flops, matmul_peak

from factscope.facts import load_facts
from factscope.flow.common import default_window, usable
from factscope.flow.knockout import SETS, knockout_batch, naive_knockout, windows
from factscope.flow.select import select_known
from factscope.models import load_model


def fast_flops(model, items, k: int) -> float:
    """Matmul FLOPs of the fast method: one clean forward per fact, then per window and set the
    last token from the window's first layer (attending to T cached keys) and one logit row."""
    H, hd = model.n_heads, model.head_dim
    total = 0.0
    for t in items:
        total += forward_flops(model, t.n, 1)
        for win in windows(model.n_layers, k):
            s = win[0]
            one = forward_flops(model, 1, 1, start_layer=s) + (model.n_layers - s) * 4 * H * hd * (t.n - 1)
            total += len(SETS) * one
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n", type=int, default=4, help="number of known facts (the naive method takes ~2 min per fact on 1 core)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both methods and the matmul peak")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    facts, _ = select_known(model, load_facts("known_1000"), args.n, seed=args.seed, progress=False)
    items, _ = usable(model, facts)
    k = default_window(model.n_layers)
    print(f"{model.name}: {len(items)} known facts, {model.n_layers} layers, window {k}, {len(SETS)} position sets, "
          f"{args.threads} thread(s); prompt lengths {[t.n for t in items]}", flush=True)

    peak = matmul_peak()
    t0 = time.perf_counter()
    fast = []
    for i in range(0, len(items), args.batch_size):
        fast += knockout_batch(model, items[i : i + args.batch_size], window=k)
    t_fast = time.perf_counter() - t0
    print(f"fast : {t_fast:8.2f} s", flush=True)

    t0 = time.perf_counter()
    naive = [naive_knockout(model, t, window=k) for t in items]
    t_naive = time.perf_counter() - t0
    print(f"naive: {t_naive:8.2f} s", flush=True)

    diff = max(abs(a - b) for f, n in zip(fast, naive) for s in SETS for a, b in zip(f["change"][s], n["change"][s]))
    f_fast = fast_flops(model, items, k)
    f_naive = sum(forward_flops(model, t.n, t.n) * (1 + model.n_layers * len(SETS)) for t in items)
    res = {
        "model": model.name,
        "n_facts": len(items),
        "n_forwards_naive": len(items) * (1 + model.n_layers * len(SETS)),
        "threads": args.threads,
        "window": k,
        "naive_s": t_naive,
        "fast_s": t_fast,
        "speedup": t_naive / t_fast,
        "max_diff_pp": diff,
        "matmul_peak_gflops": peak / 1e9,
        "fast_gflops": f_fast / t_fast / 1e9,
        "naive_gflops": f_naive / t_naive / 1e9,
        "fast_peak_fraction": f_fast / t_fast / peak,
        "naive_peak_fraction": f_naive / t_naive / peak,
        "flop_ratio": f_naive / f_fast,
    }
    print(
        f"speedup {res['speedup']:.1f}x (FLOP ratio {res['flop_ratio']:.1f}x); max difference {diff:.2e} percentage points\n"
        f"matmul peak {res['matmul_peak_gflops']:.1f} GFLOP/s; fast reaches {res['fast_gflops']:.1f} GFLOP/s "
        f"({100 * res['fast_peak_fraction']:.0f}% of peak), naive {res['naive_gflops']:.1f} GFLOP/s "
        f"({100 * res['naive_peak_fraction']:.0f}%)"
    )
    ok = diff <= 0.1 and res["speedup"] >= 10
    print("PASS" if ok else "FAIL", "(identical within 0.1 pp and >= 10x faster)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
