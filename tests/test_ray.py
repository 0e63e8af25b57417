"""--executor ray: the same run directory and numbers as the local executor, resume across
executors, a killed worker's batch retried without duplicates (a local Ray instance, 2 CPU workers,
tiny models). Skipped with the reason when Ray is not installed (make test installs it)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from factscope import executors
from factscope.cli import main
from factscope.errors import FactscopeError
from factscope.runs import Checkpoint, Run


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'factscope[ray]' (make test does)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _cli(*args: str) -> Run:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return Run.open(args[args.index("--out") + 1])


def _close(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-6) -> None:
    """Equal tables: the same rows and columns, every non-float column exactly, the floats within
    ``atol`` + 1e-4 relative (the actors run torch on one thread each, so sums may round differently)."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    floats = list(a.select_dtypes("float").columns)
    rest = [c for c in a.columns if c not in floats]
    pd.testing.assert_frame_equal(a[rest], b[rest], check_exact=True)
    for c in floats:
        assert np.allclose(a[c], b[c], rtol=1e-4, atol=atol, equal_nan=True), c


@pytest.fixture
def ray_batches(monkeypatch):
    """Counts the batches the commands hand to RayExecutor (an option ignored would hand none)."""
    sent = []
    original = executors.RayExecutor.map

    def counting(self, work, batches, report_for):
        for idx, records in original(self, work, batches, report_for):
            sent.append(idx)
            yield idx, records

    monkeypatch.setattr(executors.RayExecutor, "map", counting)
    return sent


def test_flow_knockout_on_ray_equals_local(ray, ray_batches, tmp_path):
    args = ["flow", "knockout", "--model", "tiny-llama", "--limit", "6", "--all-facts", "--batch-size", "2",
            "--no-progress"]
    loc = _cli(*args, "--out", str(tmp_path / "local"))
    assert not ray_batches
    on_ray = _cli(*args, "--executor", "ray", "--workers", "2", "--out", str(tmp_path / "ray"))
    assert sorted(i for b in ray_batches for i in b) == list(range(6))
    _close(on_ray.load_table("knockout_facts"), loc.load_table("knockout_facts"), atol=1e-3)  # change in %
    _close(on_ray.load_table("knockout"), loc.load_table("knockout"), atol=1e-3)
    assert on_ray.config["runtime"]["executor"] == "ray" and on_ray.config["runtime"]["workers"] == 2
    # the records came back in batch order: the checkpoint lists the facts as the local one does
    keys = [[r["key"] for r in Run.open(d).checkpoint("knockout").records()] for d in (tmp_path / "local", tmp_path / "ray")]
    assert keys[0] == keys[1]


def _hijack(out: Path, *extra: str) -> Run:
    return _cli("hijack", "run", "--model", "tiny-qwen2", "--dataset", "counterfact-sample", "--limit", "8",
                "--all-facts", "--max-prepends", "3", "--bootstrap", "50", "--chunk-size", "8", "--no-progress",
                "--out", str(out), *extra)


def test_hijack_on_ray_gives_the_same_summary_and_resumes_across_executors(ray, ray_batches, tmp_path):
    loc = _hijack(tmp_path / "local")
    on_ray = _hijack(tmp_path / "ray", "--executor", "ray", "--workers", "2")
    assert ray_batches
    _close(on_ray.load_table("hijack_results"), loc.load_table("hijack_results"), atol=1e-4)
    s_loc, s_ray = loc.summary["hijack"], on_ray.summary["hijack"]
    assert s_ray["efficacy"] == s_loc["efficacy"] and s_ray["fact_counts"] == s_loc["fact_counts"]
    assert s_ray["top1_acc"] == s_loc["top1_acc"]

    # start locally, stop half way, finish on Ray: the same results, each chunk recorded once
    part = tmp_path / "mixed"
    _hijack(part)
    ck = next((part / "checkpoints").glob("hijack_*.jsonl"))
    lines = ck.read_text().splitlines()
    assert len(lines) >= 4
    ck.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    (part / "summary.json").unlink()
    mixed = _hijack(part, "--resume", "--executor", "ray", "--workers", "2")
    _close(mixed.load_table("hijack_results"), loc.load_table("hijack_results"), atol=1e-4)
    keys = [json.loads(x)["key"] for x in ck.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(lines)
    assert mixed.config["runtime"]["executor"] == "ray"


def test_facts_known_on_ray_equals_local(ray, ray_batches, tmp_path):
    args = ["facts", "known", "--model", "tiny-gpt2", "--dataset", "known_1000", "--limit", "20", "--top-k", "50",
            "--no-progress"]
    loc = _cli(*args, "--out", str(tmp_path / "local"))
    on_ray = _cli(*args, "--executor", "ray", "--out", str(tmp_path / "ray"))
    assert sum(map(len, ray_batches)) == 20
    names = [n for n in loc.tables() if n.startswith("known")]
    assert names
    for n in names:
        _close(on_ray.load_table(n), loc.load_table(n))


def test_circuit_discovery_on_ray_equals_local(ray, ray_batches, tmp_path):
    """EAP-IG's edge scores: the facts in one shard per actor, combined on the driver."""
    args = ["circuit", "discover", "--model", "tiny-llama", "--limit", "8", "--all-facts", "--method", "eap-ig",
            "--no-progress"]
    loc = _cli(*args, "--out", str(tmp_path / "local"))
    on_ray = _cli(*args, "--executor", "ray", "--workers", "2", "--out", str(tmp_path / "ray"))
    assert ray_batches[-2:] == [[0], [1]]  # two shards, one per actor (after the known-facts check)
    for n in loc.tables():
        a, b = on_ray.load_table(n), loc.load_table(n)
        if "edge" in a.columns:  # (edges of equal score may swap places)
            a, b = a.sort_values("edge").reset_index(drop=True), b.sort_values("edge").reset_index(drop=True)
        _close(a, b, atol=1e-6)
    assert on_ray.summary["circuit"]["n_edges"] == loc.summary["circuit"]["n_edges"]


def _flaky_work(marker: str):
    """A batch function whose worker process dies the first time it runs (a killed worker)."""

    def work(idx, report):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return [{"square": i * i, "pid": os.getpid()} for i in idx]

    return work


def test_a_killed_workers_batch_is_retried_without_duplicates(ray, tmp_path):
    from factscope.loop import resumable

    ck = Checkpoint(tmp_path / "ck.jsonl")
    with executors.using(executors.RayExecutor(workers=2)):
        recs = resumable([f"k{i}" for i in range(10)], _flaky_work(str(tmp_path / "died")), ck, batches=3)
    assert (tmp_path / "died").exists()
    assert [r["key"] for r in ck.records()] == [f"k{i}" for i in range(10)]
    assert [recs[f"k{i}"]["square"] for i in range(10)] == [i * i for i in range(10)]
    assert os.getpid() not in {r["pid"] for r in recs.values()}


def test_a_model_not_loaded_by_name_cannot_travel(ray, tmp_path):
    from factscope.loop import resumable
    from factscope.models import load_model

    model = load_model("tiny-gpt2")
    del model.origin
    with pytest.raises(Exception, match="not loaded by name"):
        with executors.using(executors.RayExecutor(workers=1)):
            resumable([1], lambda idx, report: [{"n": model.n_layers}], None)


def test_without_ray_the_executor_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FactscopeError, match=r"pip install 'factscope\[ray\]'"):
        executors.make("ray")
    r = CliRunner().invoke(main, ["flow", "knockout", "--model", "tiny-gpt2", "--executor", "ray",
                                  "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "factscope[ray]" in r.output and not (tmp_path / "x").exists()
