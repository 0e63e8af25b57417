"""Context-hijacking throughput (issues 4 and 10): the runner with shared prefixes vs a naive loop.

Naive: one prompt at a time, the plain HF forward with logits at every position, log-softmax of
the last row, the two target tokens gathered.
batched: `hijack.run_model(..., shared_prefix=False)` -- every prompt whole, length-sorted batches
through `predict.map_last`, logits at the last position only, chunks appended to a checkpoint.
shared: `hijack.run_model` (the default) -- per (fact, scheme) the keys/values of the N prepended
sentences are computed once (`Model.prefill`) and the query of every n runs against the first n
sentences' keys/values (`Model.forward_from`), batched across facts.
All three score the same prompts (generic + reverse schemes, n = 0..N, on facts the model knows)
in one run; the log-probabilities must agree. The last line is a JSON object (`--json FILE`
writes it too).

    python bench/bench_hijack.py [--model gemma-3-270m] [--facts 10] [--max-prepends 10] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import forward_flops, matmul_peak  # noqa: E402

from factscope.facts import load_facts  # noqa: E402
from factscope.hijack import parse_schemes, prepare, run_model, score_ids, tokenize  # noqa: E402
from factscope.hijack.runner import shared_prompts  # noqa: E402
from factscope.hijack.schemes import build_prompt, scheme_sentence  # noqa: E402
from factscope.models import load_model  # noqa: E402
from factscope.runs import Run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--facts", type=int, default=10, help="number of known facts")
    ap.add_argument("--max-prepends", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--all-facts", action="store_true", help="do not require known facts (tiny models)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    pool, _ = prepare(model, load_facts("known_1000", limit=6 * args.facts, seed=0))
    base = score_ids(model, tokenize(model, [p.fact.prompt for p in pool]), [p.true_ids for p in pool],
                     [p.false_ids for p in pool], batch_size=args.batch_size)
    chosen = [p for p, s in zip(pool, base) if args.all_facts or s.top1 == p.true_ids[0]][: args.facts]
    schemes = parse_schemes(["generic", "reverse"])
    N = args.max_prepends

    # the prompts the runner scores: every fact at n = 0, then scheme x n = 1..N
    items = [(("-", 0, p.fact.id), p.fact.prompt, p) for p in chosen]
    for s in schemes:
        for p in chosen:
            sent = scheme_sentence(s, p.fact)
            items += [((s.name, n, p.fact.id), build_prompt(sent, p.fact.prompt, n), p) for n in range(1, N + 1)]
    seqs = tokenize(model, [it[1] for it in items])
    n_tokens = sum(len(s) for s in seqs)
    print(f"{model.name}: {len(chosen)} {'' if args.all_facts else 'known '}facts, {len(items)} prompts, {n_tokens} tokens; "
          f"threads={torch.get_num_threads()}")

    peak = matmul_peak()

    def naive():
        out = {}
        with torch.inference_mode():
            for (key, _, p), s in zip(items, seqs):
                logits = model.hf(input_ids=torch.tensor([s]), use_cache=False).logits  # [1, T, V]
                logp = torch.log_softmax(logits[0, -1].float(), -1)
                out[key] = (float(logp[p.true_ids[0]]), float(logp[p.false_ids[0]]), int(logp.argmax()))
        return out

    def runner(shared: bool):
        def go():
            with tempfile.TemporaryDirectory() as d:
                run = Run.create(Path(d) / "run", {"bench": 1})
                res = run_model(run, model, [p.fact for p in chosen], schemes, N, batch_size=args.batch_size,
                                known_only=not args.all_facts, progress=False, shared_prefix=shared)
            r = res.results
            return {(("-" if n == 0 else s), n, f): (lt, lf) for s, n, f, lt, lf in
                    zip(r["scheme"], r["n"], r["fact_id"], r["lp_true"], r["lp_false"])}, res.counts

        return go

    score_ids(model, seqs[:4], [it[2].true_ids for it in items[:4]], [it[2].false_ids for it in items[:4]])  # warm-up
    times, got = {}, {}
    for name, fn in (("naive", naive), ("batched", runner(False)), ("shared", runner(True))):
        t = time.perf_counter()
        got[name] = fn()
        times[name] = time.perf_counter() - t
    ref = got["naive"]
    counts = got["shared"][1]
    check = {}
    for name in ("batched", "shared"):
        g = got[name][0]
        assert set(g) == set(ref), f"the {name} runner scored other prompts than the naive loop"
        check[name] = (
            max(max(abs(g[k][0] - ref[k][0]), abs(g[k][1] - ref[k][1])) for k in ref),
            sum((g[k][1] > g[k][0]) != (ref[k][1] > ref[k][0]) for k in ref),
        )

    # FLOPs. naive: every token through the layers + the vocabulary projection at every position;
    # batched: the same layers, one vocabulary projection per prompt; shared: each (fact, scheme)'s
    # N-sentence context once, then per prompt the query tokens (attending to the first n
    # sentences) and one vocabulary projection; identical contexts (one target in two facts or
    # schemes: "Do not think of X.") are prefilled once.
    naive_flops = sum(forward_flops(model, len(s), logits_positions=len(s)) for s in seqs)
    batched_flops = sum(forward_flops(model, len(s), logits_positions=1) for s in seqs)
    shared_flops = sum(forward_flops(model, len(s), logits_positions=1) for s in seqs[: len(chosen)])  # n = 0
    distinct = set()
    for s in schemes:
        for p in chosen:
            ctx, parts = shared_prompts(model, scheme_sentence(s, p.fact), p.fact.prompt, N)
            if tuple(ctx) not in distinct:
                distinct.add(tuple(ctx))
                shared_flops += forward_flops(model, len(ctx), logits_positions=0)
            for m, suf in parts:
                shared_flops += forward_flops(model, m + len(suf)) - forward_flops(model, m, logits_positions=0)
    res = {
        "model": model.name,
        "facts": len(chosen),
        "max_prepends": N,
        "contexts": len(schemes) * len(chosen),
        "distinct_contexts": len(distinct),
        "n_prompts": len(items),
        "n_tokens": n_tokens,
        "threads": torch.get_num_threads(),
        "naive_s": times["naive"],
        "batched_s": times["batched"],
        "shared_s": times["shared"],
        "naive_prompts_per_s": len(items) / times["naive"],
        "batched_prompts_per_s": len(items) / times["batched"],
        "shared_prompts_per_s": len(items) / times["shared"],
        "speedup": times["naive"] / times["shared"],
        "speedup_batched": times["naive"] / times["batched"],
        "flop_ratio": naive_flops / shared_flops,
        "max_abs_logprob_diff": check["shared"][0],
        "hijack_decisions_differing": check["shared"][1],
        "batched_max_abs_logprob_diff": check["batched"][0],
        "batched_hijack_decisions_differing": check["batched"][1],
        "unshared_prompts": sum(counts.get("unshared_prompts", {}).values()),
        "matmul_peak_gflops": peak / 1e9,
        "gflops": shared_flops / times["shared"] / 1e9,
        "fraction_of_peak": shared_flops / times["shared"] / peak,
        "naive_gflops": naive_flops / times["naive"] / 1e9,
        "batched_gflops": batched_flops / times["batched"] / 1e9,
    }
    for k, v in res.items():
        print(f"{k:>36}: {v:.4g}" if isinstance(v, float) else f"{k:>36}: {v}")
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
