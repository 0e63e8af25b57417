"""GPU throughput (issue 14): forward passes on CUDA in float32 and bfloat16, and a hijacking sweep.

Skips with a reason (one JSON line, exit 0) when no CUDA GPU is visible. Otherwise, for the model:
prompt tokens per second (padding included: the prompts are random token ids of one length) of the next-token forward pass (`Model.forward(..., last_only=True)`) at
batch 32 and 64 tokens per prompt, in float32 and bfloat16, the largest difference of bfloat16's
next-token log-probabilities from float32's, with two or more GPUs the same forward split over
two (`--device cuda:0,cuda:1`: layers per GPU, tokens per second, largest difference from one
GPU), and the wall time of `factscope hijack run` on `--device cuda --dtype bfloat16` (prompts per
second). The last line is a JSON object.

    python bench/bench_gpu.py [--model gemma-3-270m] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402


def tokens_per_second(model, batch, repeats: int = 20) -> float:
    with torch.inference_mode():
        model.forward(batch, last_only=True)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            model.forward(batch, last_only=True)
        torch.cuda.synchronize()
    return repeats * batch.input_ids.numel() / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        emit({"skipped": f"no CUDA GPU visible to torch {torch.__version__} (CPU build or no device)"}, args.json)
        return

    from click.testing import CliRunner

    from factscope.cli import main as cli
    from factscope.models import load_model

    out: dict = {"model": args.model, "gpu": torch.cuda.get_device_name(0)}
    logprobs = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(args.model, device="cuda", dtype=dtype)
        ids = torch.randint(100, 10000, (32, 64), generator=torch.Generator().manual_seed(0)).tolist()
        batch = model.batch_from_ids(ids)
        out[f"tokens_per_second_{dtype}"] = round(tokens_per_second(model, batch))
        with torch.inference_mode():
            logprobs[dtype] = model.forward(batch, last_only=True).float().log_softmax(-1).cpu()
        del model
        torch.cuda.empty_cache()
    out["max_abs_logprob_diff_bf16"] = float((logprobs["float32"] - logprobs["bfloat16"]).abs().max())
    if torch.cuda.device_count() >= 2:  # the model split over two GPUs (--device cuda:0,cuda:1)
        model = load_model(args.model, device="cuda:0,cuda:1", dtype="bfloat16")
        batch = model.batch_from_ids(ids)
        out["split_layers_per_gpu"] = [sum(model.layer_device(l) == d for l in range(model.n_layers))
                                       for d in model.devices]
        out["tokens_per_second_bfloat16_split"] = round(tokens_per_second(model, batch))
        with torch.inference_mode():
            split = model.forward(batch, last_only=True).float().log_softmax(-1).cpu()
        out["max_abs_logprob_diff_split"] = float((split - logprobs["bfloat16"]).abs().max())
        del model
        torch.cuda.empty_cache()

    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    t = time.perf_counter()
    r = CliRunner().invoke(cli, ["hijack", "run", "--model", args.model, "--dataset", "known_1000", "--limit", "200",
                                 "--max-prepends", "10", "--device", "cuda", "--dtype", "bfloat16", "--no-progress",
                                 "--out", str(tmp / "hijack")], catch_exceptions=False)
    if r.exit_code:
        sys.exit(r.output)
    seconds = time.perf_counter() - t
    n = sum(1 for _ in open(tmp / "hijack" / "hijack_results.csv")) - 1
    out.update(hijack_seconds=round(seconds, 1), hijack_prompts=n, hijack_prompts_per_second=round(n / seconds, 1))
    emit(out, args.json)


if __name__ == "__main__":
    main()
