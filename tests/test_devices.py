"""Every analysis off the CPU, and on a model split over two devices, without a GPU.

tests/simdevice.py simulates accelerator devices (``meta:0``, ``meta:1``) whose tensors compute on
the CPU but are checked as CUDA checks its tensors. A CPU tensor made without ``device=`` and mixed
into a model computation fails here as on a GPU, and a model split over two simulated devices
fails wherever a layer's activations meet another device's tensors. Each analysis command runs on
the CPU and split over two devices, and must give the same numbers.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from simdevice import SimTensor, simulated

import factscope.models as M
from factscope import hooks
from factscope.cli import main
from factscope.errors import FactscopeError

TWO = "meta:0,meta:1"


@pytest.fixture
def sim_devices(monkeypatch):
    """check_device accepts the simulated devices (the real one refuses ``meta``)."""
    real = M.check_device
    monkeypatch.setattr(M, "check_device", lambda d: torch.device(d) if str(d).startswith("meta") else real(d))


# --------------------------------------------------------------------------------------------
# the simulator itself: strict where CUDA is, and computing the CPU's numbers
# --------------------------------------------------------------------------------------------


def test_the_simulator_checks_devices_as_cuda_does():
    with simulated():
        a = torch.arange(4.0, device="meta:0")
        assert isinstance(a, SimTensor) and a.device == torch.device("meta:0")
        def put(x, idx, values):
            x[idx] = values

        for bad in (lambda: a + torch.ones(4), lambda: a + a.to("meta:1"), lambda: torch.ones(4) @ a,
                    lambda: a.index_select(0, torch.tensor([0])), lambda: a.index_select(0, torch.tensor(0)),
                    lambda: torch.stack([a[0], torch.tensor(1.0)]), lambda: torch.ones(4)[a.long()],
                    lambda: put(a.clone(), torch.tensor([0, 1]), torch.ones(2))):
            with pytest.raises(RuntimeError, match="same device"):
                bad()
        assert (a + torch.tensor(2.0)).tolist() == [2.0, 3.0, 4.0, 5.0]  # a 0-dim CPU tensor is a scalar
        assert a[torch.tensor([3, 0])].tolist() == [3.0, 0.0]  # CPU indices, as CUDA allows
        c = torch.zeros(4)
        c.copy_(a)  # copy_ copies between devices
        assert c.tolist() == [0.0, 1.0, 2.0, 3.0]
        t = torch.tensor([1, 2], device="meta:1")
        assert isinstance(t, SimTensor) and t.device == torch.device("meta:1") and int(t.sum()) == 3
        b = a.cpu()
        assert type(b) is torch.Tensor and b.device.type == "cpu"
        a[1:].mul_(10)  # an in-place write through a view reaches the base
        assert a.tolist() == [0.0, 10.0, 20.0, 30.0]
        lin = torch.nn.Linear(4, 3).to("meta:1")
        x = torch.randn(2, 4, device="meta:1", requires_grad=True)
        lin(x).square().sum().backward()
        assert x.grad.device == lin.weight.grad.device == torch.device("meta:1")
        # the same numbers as on the CPU
        w, xc = lin.weight.detach().cpu(), x.detach().cpu().requires_grad_()
        torch.nn.functional.linear(xc, w, lin.bias.detach().cpu()).square().sum().backward()
        assert torch.allclose(xc.grad, x.grad.cpu())


# --------------------------------------------------------------------------------------------
# splitting a model over devices
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gpt2", "tiny-neox"])
def test_shard_map_splits_whole_layers_in_order(name):
    m = M.load_model(name)
    dm = M.shard_map(m.hf, m.spec, [torch.device("cuda:0"), torch.device("cuda:1")])
    # every parameter and buffer has a place (accelerate's own check), the head is listed
    from accelerate.utils import check_device_map

    check_device_map(m.hf, dm)
    assert m.spec.lm_head in dm
    layer_devs = [dm[f"{m.spec.layers}.{i}"] for i in range(m.n_layers)]
    assert layer_devs == sorted(layer_devs) and set(layer_devs) == {"cuda:0", "cuda:1"}  # contiguous, both used
    assert dm[m.spec.embed] == "cuda:0" and dm[m.spec.final_norm] == "cuda:1"
    tied = m.unembed_weight is M._get(m.hf, m.spec.embed).weight
    assert dm[m.spec.lm_head] == ("cuda:0" if tied else "cuda:1")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gpt2", "gemma-3-270m"])
@pytest.mark.parametrize("n_dev", [2, 3, 4])
def test_shard_map_balances_the_bytes(name, n_dev, request):
    """The largest device load is within one layer of the best contiguous split (found by trying
    every split), the parts outside the layers pinned to the first and last devices. (Gemma 3
    270M's tied embedding is 62% of its bytes: the layers go evenly to the other devices.)"""
    import itertools

    m = request.getfixturevalue("gemma") if name == "gemma-3-270m" else M.load_model(name)
    devs = [torch.device(f"cuda:{i}") for i in range(n_dev)]
    dm = M.shard_map(m.hf, m.spec, devs)
    size = lambda mod: sum(p.numel() * p.element_size() for p in mod.parameters())  # noqa: E731
    layers = [size(l) for l in m.layers]
    tied = m.unembed_weight is M._get(m.hf, m.spec.embed).weight
    first = size(m.hf) - sum(layers) - (0 if tied else size(M._get(m.hf, m.spec.lm_head)))
    rest = size(m.hf) - first - sum(layers)

    def loads(cuts):  # cuts: the first layer index of devices 1..n-1
        b = [0, *cuts, len(layers)]
        out = [sum(layers[b[d]:b[d + 1]]) for d in range(n_dev)]
        out[0] += first
        out[-1] += rest
        return out

    where = [int(dm[f"{m.spec.layers}.{i}"].split(":")[1]) for i in range(m.n_layers)]
    assert where == sorted(where)
    got = loads([sum(w < d for w in where) for d in range(1, n_dev)])
    best = min(max(loads(c)) for c in itertools.combinations_with_replacement(range(len(layers) + 1), n_dev - 1))
    assert max(got) <= best + max(layers), (where, got, best)
    if name == "gemma-3-270m":
        counts = [where.count(d) for d in range(1, n_dev)]
        assert where.count(0) == 0 and max(counts) - min(counts) <= 1, counts


def test_a_device_list_is_checked_before_loading(sim_devices):
    assert M.check_devices(TWO) == [torch.device("meta:0"), torch.device("meta:1")]
    for bad, needle in [("meta:0,meta:0", "each GPU once"), ("meta:0,meta", "each GPU once"),
                        ("meta:0,cpu", "of one kind"), ("auto,meta:1", "each GPU once")]:
        with pytest.raises(FactscopeError, match=needle):
            M.check_devices(bad)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="two GPUs are visible: the list is valid here")
def test_a_device_list_without_gpus_is_one_clear_error(tmp_path):
    r = CliRunner().invoke(main, ["facts", "known", "--model", "tiny-llama", "--device", "cuda:0,cuda:1",
                                  "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--device cuda:0" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_a_ray_actor_with_several_gpus_splits_its_model():
    from factscope.executors import RayExecutor, actor_device

    assert [actor_device(g) for g in (0, 0.5, 1, 2, 3)] == [None, "cuda", "cuda", "cuda:0,cuda:1", "cuda:0,cuda:1,cuda:2"]
    with pytest.raises(FactscopeError, match="whole GPUs"):
        RayExecutor(gpus_per_worker=1.5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_a_split_model_gives_the_one_device_numbers(name, sim_devices):
    """Logits, hook recordings, patches, gradients and shared prefixes of a model split over two
    devices equal the CPU model's, and everything the substrate returns is on the first device."""
    cpu = M.load_model(name)
    prompts = ["The Eiffel Tower is in the city of", "Paris is the capital of", "A B C"]
    L = cpu.n_layers

    def probe(m):
        b = m.encode(prompts)
        out = {"last": m.run(b), "all": m.run(b, last_only=False)}
        pos = torch.tensor([[b.input_ids.shape[1] - 2, b.input_ids.shape[1] - 1]] * len(prompts))
        with torch.no_grad():
            out["positions"] = m.forward(b, positions=pos.to(m.device))
            with hooks.cache(m, ["resid_post", "head_out", "attn_probs"], [0, L - 1]) as c:
                m.forward(b)
            out.update({f"{p}{l}": c[p, l] for p, l in c})
            with hooks.patch(m, "resid_post", 0, c["resid_post", L - 1], positions=[[-1]] * len(prompts)):
                out["patched"] = m.forward(b)
            with hooks.ablate(m, "head", [L - 1], heads=[0], how="zero"):
                out["ablated"] = m.forward(b)
            def halve(x, l):  # an edit in place that returns None
                x.mul_(0.5)

            with hooks.edit(m, "resid_post", L - 2, halve):
                out["in_place"] = m.forward(b)
        with hooks.grads(m, ["resid_pre", "head_out"], [0, L - 1]) as g:
            m.forward(b).float().logsumexp(-1).sum().backward()
        out.update({f"grad_{p}{l}": g[p, l] for p, l in g})
        pre = m.prefill(m.encode(["The Eiffel Tower is", "Paris"]))
        out["from_prefix"] = m.forward_from(pre, m.encode([" in the city of", " is the capital"]))
        out["lens"] = m.logit_lens(out[f"resid_post{L - 1}"][:, -1])
        out["vocab"] = m.vocab_scores(out[f"resid_post{L - 1}"][:, -1], torch.tensor([[1, 2]] * 3).to(m.device))[0]
        return out

    ref = probe(cpu)
    with simulated():
        split = M.load_model(name, device=TWO)
        assert split.devices == [torch.device("meta:0"), torch.device("meta:1")] and split.device == torch.device("meta:0")
        assert split.layer_device(0) == torch.device("meta:0") and split.layer_device(L - 1) == torch.device("meta:1")
        assert split.origin == (name, TWO, "float32")  # what a Ray actor loads again
        got = probe(split)
        assert {k: v.device for k, v in got.items()} == {k: torch.device("meta:0") for k in got}
        got = {k: v.cpu() for k, v in got.items()}
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.allclose(ref[k].float(), got[k].float(), atol=1e-4, rtol=1e-4), k


# --------------------------------------------------------------------------------------------
# every analysis command: CPU, one simulated device, two
# --------------------------------------------------------------------------------------------

CF = str(resources.files("factscope.hijack") / "counterfact_sample.json")
EDIT = ["--dataset", CF, "--limit", "1", "--circuits", "1", "--edges", "10", "--layer", "1"]
COMMANDS = {  # name -> (model, arguments)
    "facts known": ("tiny-gemma3", ["facts", "known", "--limit", "6"]),
    "flow all": ("tiny-gemma3", ["flow", "all", "--limit", "3", "--all-facts"]),
    "hijack run": ("tiny-gemma3", ["hijack", "run", "--dataset", "counterfact-sample", "--limit", "4", "--all-facts",
                                   "--max-prepends", "2", "--bootstrap", "20"]),
    "circuit discover eap-ig": ("tiny-gemma3", ["circuit", "discover", "--limit", "3", "--all-facts", "--method", "eap-ig"]),
    # (tiny-gemma3's ACDC keeps an edge more or less at float noise: 29 or 28 edges)
    "circuit discover acdc": ("tiny-llama", ["circuit", "discover", "--limit", "2", "--all-facts", "--method", "acdc"]),
    # other methods, ablations and metrics; GPT-2's Conv1D weights
    "circuit discover exact mean kl": ("tiny-llama", ["circuit", "discover", "--limit", "3", "--all-facts", "--method",
                                                      "exact", "--ablation", "mean", "--metric", "kl"]),
    "circuit discover eap-ig-act counterfactual": ("tiny-gpt2", ["circuit", "discover", "--limit", "6", "--all-facts",
                                                                "--method", "eap-ig-act", "--ablation", "counterfactual",
                                                                "--metric", "logit_diff"]),
    # parallel attention and MLP (GPT-NeoX); biases everywhere (Qwen2)
    "flow all (neox)": ("tiny-neox", ["flow", "all", "--limit", "2", "--all-facts"]),
    "hijack run (qwen2)": ("tiny-qwen2", ["hijack", "run", "--dataset", "counterfact-sample", "--limit", "3",
                                          "--all-facts", "--max-prepends", "2", "--bootstrap", "20"]),
    "circuit evaluate": ("tiny-llama", ["circuit", "evaluate", "--limit", "8", "--all-facts", "--random-seeds", "2",
                                        "--no-curve", "--method", "eap"]),
    "circuit lens": ("tiny-gemma3", ["circuit", "lens", "--limit", "3", "--all-facts"]),
    # (an untied unembedding: on the second device, away from the activations)
    "circuit roles": ("tiny-llama", ["circuit", "roles", "--limit", "3", "--all-facts"]),
    "circuit hallucination": ("tiny-gemma3", ["circuit", "hallucination", "--limit", "6", "--edges", "30"]),
    "circuit icl": ("tiny-gemma3", ["circuit", "icl", "--limit", "6", "--shots", "2", "--known-top-k", "1", "--edges", "30"]),
    "trace": ("tiny-gemma3", ["trace", "--limit", "2", "--all-facts", "--samples", "2", "--window", "2"]),
    "edit rome": ("tiny-gemma3", ["edit", "--method", "rome", *EDIT]),
    "edit ft-m": ("tiny-gemma3", ["edit", "--method", "ft-m", *EDIT]),
}


def _run(args: list[str], model: str, device: str, out: Path) -> dict:
    r = CliRunner().invoke(main, [*args, "--model", model, "--device", device, "--no-progress", "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, (device, r.output)
    return json.loads((out / "summary.json").read_text())


def _close(a, b, where: str = "") -> list[str]:
    """Where two summaries differ beyond float noise: 1e-3 relative, 3e-4 absolute (measured: the
    split runs' floats differ from the CPU's by up to 2e-4 relative, and tiny-gemma3's knockout
    intervals of values near 0 by 1.2e-4 absolute)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _close(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        ok = math.isclose(a, b, rel_tol=1e-3, abs_tol=3e-4) or (math.isnan(a) and math.isnan(b))
        return [] if ok else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    """The run's tables, rows in the order of their text columns (rows sorted by a score, e.g. a
    circuit's edges, may swap places where scores tie within float noise)."""
    out_ = {}
    for p in sorted(out.glob("*.csv")):
        t = pd.read_csv(p)
        keys = [c for c in t.columns if c not in t.select_dtypes("number").columns]
        out_[p.stem] = t.sort_values(keys, kind="stable").reset_index(drop=True) if keys else t
    return out_


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_analysis_runs_split_over_two_devices_with_the_cpu_numbers(command, tmp_path, sim_devices, monkeypatch):
    """(Split over two devices covers one device too: what the analysis makes lives on the first,
    so a CPU tensor mixed in fails there as well. Each run has a cache of its own, so that the
    split run computes what the CPU run cached, e.g. ROME's covariance.)"""
    model, args = COMMANDS[command]
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache-cpu"))
    ref = _run(args, model, "cpu", tmp_path / "cpu")
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache-two"))
    with simulated():
        two = _run(args, model, TWO, tmp_path / "two")
    assert not _close(ref, two), _close(ref, two)
    want, got = _tables(tmp_path / "cpu"), _tables(tmp_path / "two")
    assert got.keys() == want.keys()
    for name, t in want.items():
        u = got[name]
        assert list(u.columns) == list(t.columns) and u.shape == t.shape, name
        num = t.select_dtypes("number").columns
        pd.testing.assert_frame_equal(u[num], t[num], check_exact=False, rtol=1e-3, atol=3e-4, obj=name)
        rest = [c for c in t.columns if c not in num]
        pd.testing.assert_frame_equal(u[rest], t[rest], obj=name)


def test_gemma_split_over_three_devices_gives_its_cpu_numbers(gemma, sim_devices):
    """The real model: its 262k-row tied embedding fills the first device, the layers are split
    over the other two; logits, a recorded stream and a shared-prefix forward equal the CPU's."""
    prompts = ["The Eiffel Tower is located in the city of", "Miles Davis plays the"]
    L = gemma.n_layers

    def probe(m):
        with torch.inference_mode(), hooks.cache(m, "resid_post", [L // 2, L - 1]) as c:
            logits = m.forward(m.encode(prompts))
        pre = m.prefill(m.encode(["The Eiffel Tower is located", "Miles Davis"]))
        with torch.inference_mode():
            tail = m.forward_from(pre, m.encode([" in the city of", " plays the"]))
        return {"logits": logits, "mid": c["resid_post", L // 2], "last": c["resid_post", L - 1], "prefix": tail}

    ref = probe(gemma)
    with simulated():
        split = M.load_model("gemma-3-270m", device="meta:0,meta:1,meta:2")
        layers = [split.layer_device(l).index for l in range(L)]
        assert split.devices == [torch.device(f"meta:{i}") for i in range(3)]
        assert layers == sorted(layers) and set(layers) == {1, 2}, layers
        got = {k: v.cpu() for k, v in probe(split).items()}
    for k in ref:  # (float noise relative to each tensor's scale: Gemma's stream reaches ~1e4)
        err = float((ref[k] - got[k]).abs().max() / ref[k].abs().max())
        assert err < 1e-5, (k, err)
