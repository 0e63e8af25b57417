"""Ray scaling on this machine (issue 14): one hijacking sweep (`factscope hijack run`), or one
circuit discovery (`factscope circuit discover`, EAP-IG), three ways.

local-1t: the local executor with one torch thread (what one Ray actor gets: one CPU).
ray-1:    --executor ray --workers 1 (Ray already started; actor start and model load included).
ray-2:    --executor ray --workers 2.
All three must give the same results (efficacy scores; edge scores within 1e-4). Prints the wall
times, the speed-up of 2 workers over 1, the overhead of Ray with one worker over local, Ray's own
start time, and items per second; the last line is a JSON object (`--json FILE` writes it too).

    python bench/bench_scale.py [--model gemma-3-270m] [--dataset known_1000] [--limit 200] [--max-prepends 5] [--chunk-size 32]
    python bench/bench_scale.py --sweep circuit [--dataset lre:factual/country_capital_city] [--limit 24]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402
from click.testing import CliRunner

from factscope.cli import main as cli
from factscope.runs import Run


def sweep(args, out: Path, *extra: str) -> tuple[float, Run]:
    if args.sweep == "hijack":
        cmd = ["hijack", "run", "--dataset", args.dataset, "--limit", str(args.limit), "--max-prepends",
               str(args.max_prepends), "--chunk-size", str(args.chunk_size), "--bootstrap", "100"]
    else:
        cmd = ["circuit", "discover", "--dataset", args.dataset, "--limit", str(args.limit), "--method", "eap-ig"]
    t = time.perf_counter()
    r = CliRunner().invoke(cli, [*cmd, "--model", args.model, "--no-progress", "--out", str(out), *extra],
                           catch_exceptions=False)
    if r.exit_code:
        sys.exit(r.output)
    return time.perf_counter() - t, Run.open(out)


def results(run: Run, kind: str):
    """What must not depend on the executor: efficacy, or the edge scores (by edge)."""
    if kind == "hijack":
        return run.summary["hijack"]["efficacy"]
    return run.load_table("circuit_scores").set_index("edge")["score"].sort_index()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", choices=["hijack", "circuit"], default="hijack")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dataset", default=None, help="default: known_1000 (hijack), lre:factual/country_capital_city (circuit)")
    ap.add_argument("--limit", type=int, default=None, help="facts checked, the known ones kept (default 200 / 24)")
    ap.add_argument("--max-prepends", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=32, help="prompts per checkpointed chunk (the unit a worker gets)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    hijack = args.sweep == "hijack"
    args.dataset = args.dataset or ("known_1000" if hijack else "lre:factual/country_capital_city")
    args.limit = args.limit or (200 if hijack else 24)
    try:
        import ray
    except ImportError:
        emit({"skipped": "Ray is not installed: pip install 'factscope[ray]'"}, args.json)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    torch.set_num_threads(1)
    t_local, local = sweep(args, tmp / "local")
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t
    t_ray1, ray1 = sweep(args, tmp / "ray1", "--executor", "ray", "--workers", "1")
    t_ray2, ray2 = sweep(args, tmp / "ray2", "--executor", "ray", "--workers", "2")
    ray.shutdown()

    res = [results(r, args.sweep) for r in (local, ray1, ray2)]
    if hijack:
        n, unit = len(local.load_table("hijack_results")), "prompts"
        facts = sum(c["kept"] for c in local.summary["hijack"]["fact_counts"].values())
        same = res[0] == res[1] == res[2]
    else:
        n = facts = local.summary["circuit"]["n_facts_discovery"]
        unit = "facts"
        same = all(bool(((r - res[0]).abs() <= 1e-4 * (1 + res[0].abs())).all()) for r in res[1:])
    out = {
        "sweep": args.sweep, "model": args.model, "cpus": os.cpu_count(), unit: n, "facts": facts,
        "seconds": {"local_1_thread": round(t_local, 1), "ray_1_worker": round(t_ray1, 1),
                    "ray_2_workers": round(t_ray2, 1), "ray_init": round(t_init, 1)},
        f"{unit}_per_second": {"local_1_thread": round(n / t_local, 2), "ray_2_workers": round(n / t_ray2, 2)},
        "speedup_2_over_1_worker": round(t_ray1 / t_ray2, 2),
        "ray_1_worker_overhead_over_local": round(t_ray1 / t_local - 1, 3),
        "same_results": same,
    }
    print(f"{n} {unit}: local (1 thread) {t_local:.1f} s, Ray 1 worker {t_ray1:.1f} s, "
          f"Ray 2 workers {t_ray2:.1f} s (Ray start {t_init:.1f} s)")
    print(f"speed-up of 2 workers over 1: {out['speedup_2_over_1_worker']}x; "
          f"Ray overhead with 1 worker: {100 * out['ray_1_worker_overhead_over_local']:.0f}%")
    emit(out, args.json)


if __name__ == "__main__":
    main()
