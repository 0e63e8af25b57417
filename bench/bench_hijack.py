"""Context-hijacking throughput (issue 4): the batched, checkpointed runner vs a naive loop.

Naive: one prompt at a time, the plain HF forward with logits at every position, log-softmax of
the last row, the two target tokens gathered.
factscope: `hijack.run_model` -- length-sorted batches through `predict.map_last`, logits at the
last position only, a reducer that keeps three numbers per prompt, chunks appended to a
checkpoint (the whole runner, run directory and all).
Both score the same prompts (generic + reverse schemes, n = 0..N, on facts Gemma knows) in one
run; the log-probabilities must agree.

    python bench/bench_hijack.py [--model gemma-3-270m] [--facts 8] [--max-prepends 3] [--batch-size 32]
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
from factscope.hijack.schemes import build_prompt, scheme_sentence  # noqa: E402
from factscope.models import load_model  # noqa: E402
from factscope.runs import Run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--facts", type=int, default=8, help="number of known facts")
    ap.add_argument("--max-prepends", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--all-facts", action="store_true", help="do not require known facts (tiny models)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

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

    def fast():
        with tempfile.TemporaryDirectory() as d:
            run = Run.create(Path(d) / "run", {"bench": 1})
            res = run_model(run, model, [p.fact for p in chosen], schemes, N, batch_size=args.batch_size,
                            known_only=not args.all_facts, progress=False)
        r = res.results
        return {(("-" if n == 0 else s), n, f): (lt, lf) for s, n, f, lt, lf in
                zip(r["scheme"], r["n"], r["fact_id"], r["lp_true"], r["lp_false"])}

    score_ids(model, seqs[:4], [it[2].true_ids for it in items[:4]], [it[2].false_ids for it in items[:4]])  # warm-up
    t = time.perf_counter()
    ref = naive()
    t_naive = time.perf_counter() - t
    t = time.perf_counter()
    got = fast()
    t_fast = time.perf_counter() - t
    assert set(got) == set(ref), "the runner scored other prompts than the naive loop"
    diff = max(max(abs(got[k][0] - ref[k][0]), abs(got[k][1] - ref[k][1])) for k in ref)
    flips = sum((got[k][1] > got[k][0]) != (ref[k][1] > ref[k][0]) for k in ref)

    # useful work: every token through the layers + one vocabulary projection per prompt
    flops = sum(forward_flops(model, len(s), logits_positions=1) for s in seqs)
    res = {
        "model": model.name,
        "n_prompts": len(items),
        "n_tokens": n_tokens,
        "naive_prompts_per_s": len(items) / t_naive,
        "factscope_prompts_per_s": len(items) / t_fast,
        "speedup": t_naive / t_fast,
        "max_abs_logprob_diff": diff,
        "hijack_decisions_differing": flips,
        "matmul_peak_gflops": peak / 1e9,
        "factscope_gflops": flops / t_fast / 1e9,
        "fraction_of_peak": flops / t_fast / peak,
        "threads": torch.get_num_threads(),
    }
    for k, v in res.items():
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
