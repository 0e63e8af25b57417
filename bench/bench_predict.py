"""Next-token prediction throughput on the known facts of known_1000 (issue 2, section 9).

Naive: one prompt at a time, the plain HF forward with logits at every position.
factscope: `predict.map_last` — length-sorted batches, logits at the last position only.
Both on the same prompts in one run; the top-1 predictions must agree.

    python bench/bench_predict.py [--model gemma-3-270m] [--n 200] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import forward_flops, matmul_peak  # noqa: E402

from factscope.facts import load_facts  # noqa: E402
from factscope.models import load_model  # noqa: E402
from factscope.predict import known_facts, map_last  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n", type=int, default=200, help="number of known facts to time")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    model = load_model(args.model)
    known, _ = known_facts(model, load_facts("known_1000"), progress=True)
    prompts = [f.prompt for f in known[: args.n]]
    seqs = [model.tokenizer(p)["input_ids"] for p in prompts]
    n_tokens = sum(len(s) for s in seqs)
    print(f"{model.name}: {len(prompts)} known facts of known_1000, {n_tokens} tokens; threads={torch.get_num_threads()}")

    peak = matmul_peak()

    def naive():
        out = []
        with torch.inference_mode():
            for s in seqs:
                logits = model.hf(input_ids=torch.tensor([s]), use_cache=False).logits  # [1, T, V]
                out.append(int(logits[0, -1].argmax()))
        return out

    def fast():
        return map_last(model, seqs, lambda lg, idx: lg.argmax(-1).tolist(), batch_size=args.batch_size)

    fast()  # warm-up (allocator, kernels)
    t = time.perf_counter()
    top_naive = naive()
    t_naive = time.perf_counter() - t
    t = time.perf_counter()
    top_fast = fast()
    t_fast = time.perf_counter() - t
    agree = sum(a == b for a, b in zip(top_naive, top_fast)) / len(prompts)

    # useful work: every token through the layers + one vocabulary projection per prompt
    flops = sum(forward_flops(model, len(s), logits_positions=1) for s in seqs)
    res = {
        "model": model.name,
        "n_prompts": len(prompts),
        "naive_prompts_per_s": len(prompts) / t_naive,
        "factscope_prompts_per_s": len(prompts) / t_fast,
        "speedup": t_naive / t_fast,
        "top1_agreement": agree,
        "matmul_peak_gflops": peak / 1e9,
        "factscope_gflops": flops / t_fast / 1e9,
        "fraction_of_peak": flops / t_fast / peak,
        "threads": torch.get_num_threads(),
    }
    for k, v in res.items():
        print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
