"""LCA experiments end to end: run_all into a Run, and the `factscope lca` commands."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from factscope.lca.experiments import LCAConfig, Trainer, constructed_experiment, run_all
from factscope.runs import Run

torch.set_num_threads(1)

TINY = dict(m=4, L=32, w=0.3, d=8, d_a=8, steps=60, batch=128, eval_n=512, value_L=(32,), value_d=(4, 8),
            embed_d=(8, 32), attention_neighbourhoods=("cluster1",), attention_w=0.6,
            hijack_fracs=(0.0, 0.5, 1.0), hijack_L=(4, 32))


def test_run_all_writes_everything(tmp_path):
    run = Run.create(tmp_path / "lca", {"analysis": "lca"})
    summary = run_all(run, LCAConfig.quick(**TINY, seeds=2), progress=False)
    for key in ("value_matrix", "constructed", "embeddings", "attention", "lca_hijack"):
        assert summary[key]["seeds"] == 2
    assert set(summary["value_matrix"]) >= {"trained", "identity", "trained_std", "identity_std"}
    assert set(summary["constructed"]) >= {"trained", "constructed", "random", "constructed_std", "smallest_angle_deg"}
    # the headline embedding fit is the "all but z*" task's, the Hamming-1 fit a second key
    emb = summary["embeddings"]
    assert emb["neighbourhood"] == "all" and {"fit_r2", "fit_r2_std", "fit_r2_hamming1", "fit_r2_identity"} <= set(emb)
    assert set(summary["attention"]) >= {"same_cluster", "other_cluster", "same_cluster_std"}
    assert set(summary["lca_hijack"]["efficacy"]) == {"0", "0.5", "1"}
    on_disk = json.loads((tmp_path / "lca" / "summary.json").read_text())
    assert on_disk["constructed"] == summary["constructed"]
    for name in ("lca_value_matrix", "lca_constructed", "lca_embeddings", "lca_attention", "lca_hijack"):
        assert (tmp_path / "lca" / f"{name}.png").stat().st_size > 10_000
    vm = run.load_table("lca_value_matrix")
    assert len(vm) == 4 and set(vm.W_V) == {"trained", "identity"} and (vm.n_seeds == 2).all()
    # the summary numbers are the table's numbers, which are the mean and std of the per-seed table
    row = vm[(vm.L == 32) & (vm.d == 8) & (vm.W_V == "trained")].iloc[0]
    assert summary["value_matrix"]["trained"] == pytest.approx(row.accuracy)
    per_seed = run.load_table("lca_value_matrix_seeds")
    accs = per_seed[(per_seed.L == 32) & (per_seed.d == 8) & (per_seed.W_V == "trained")].accuracy
    assert len(accs) == 2 and accs.iloc[0] != accs.iloc[1]  # two different trainings
    assert row.accuracy == pytest.approx(accs.mean()) and row.accuracy_std == pytest.approx(accs.std(ddof=1))
    fit = run.load_table("lca_embeddings_fit").set_index(["neighbourhood", "d", "W_V"]).loc[("all", 8, "trained")]
    assert emb["fit_r2"] == pytest.approx(fit.r2) and emb["fit_r2_std"] == pytest.approx(fit.r2_std)
    # attention shares: per-token weights are probabilities, the masses add up to at most 1
    # the cluster heat map's ticks name the latent bits in plain ASCII (one font), e.g. z1=0
    spec = json.loads(run.path("lca_attention.plotly.json").read_text())
    ticks = {t for ax in ("xaxis", "yaxis") for t in spec["layout"][ax]["ticktext"]}
    assert ticks and all(re.fullmatch(r"(z\d)+=[01]+", t) for t in ticks), ticks
    att = run.load_table("lca_attention").iloc[0]
    assert 0 <= att.mass_same_cluster + att.mass_other_cluster <= 1 + 1e-6
    fits = run.load_table("lca_embeddings_fit_seeds")
    assert set(fits.neighbourhood) == {"hamming1", "all"} and set(fits.W_V) == {"trained", "identity"}
    inner = run.load_table("lca_embeddings_inner")
    assert {"mean_inner", "mean_assoc", "pairs"} <= set(inner.columns)
    # with W_V = I the association W_E^T W_V W_E is the Gram matrix
    ident = inner[inner.W_V == "identity"]
    assert (ident.mean_assoc - ident.mean_inner).abs().max() < 1e-4
    # the slope in the figure's units: over the mean squared norm of the same setting, every setting
    mean_fits = run.load_table("lca_embeddings_fit")
    for t in mean_fits.itertuples():
        sel = lambda df: df[(df.neighbourhood == t.neighbourhood) & (df.d == t.d) & (df.W_V == t.W_V)]  # noqa: E731
        sq = sel(inner)[sel(inner).hamming == 0].mean_inner.mean()
        assert t.slope_relative == pytest.approx(sel(fits).slope.mean() / sq, rel=1e-6)
    hj = run.load_table("lca_hijack_fraction")
    assert hj.rate_y_alt.iloc[0] < hj.rate_y_alt.iloc[-1]
    assert hj.efficacy.iloc[0] < hj.efficacy.iloc[-1]
    assert summary["lca_hijack"]["efficacy_full"] == pytest.approx(hj.efficacy.iloc[-1])
    keys = [s["key"] for s in run.sections]
    assert keys == ["lca_value_matrix", "lca_constructed", "lca_embeddings", "lca_attention", "lca_hijack"]


def test_constructed_experiment_replaces_only_W_V():
    cfg = LCAConfig.quick(**TINY)
    tr = Trainer(cfg, progress=False)
    r = constructed_experiment(cfg, tr)
    model = tr.get(cfg.task(), cfg.model()).model
    assert r.mean_accuracy()["trained"] == pytest.approx(tr.get(cfg.task(), cfg.model()).accuracy)
    assert set(r.angles.versus) == {"constructed", "random", "initial"}
    assert ((r.angles.smallest_angle_deg >= 0) & (r.angles.smallest_angle_deg <= 90)).all()
    assert model.W_V_init.shape == model.W_V.shape


def test_cli(tmp_path):
    from factscope.cli import main

    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["lca", "hijack", "--out", str(out), "--quick", "--m", "4", "--steps", "30",
                                    "--seeds", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "lca_hijack.png").exists() and (out / "report.html").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["m"] == 4 and cfg["steps"] == 30 and cfg["seeds"] == 1
    assert isinstance(pd.read_csv(out / "lca_hijack_length.csv"), pd.DataFrame)
    bad = CliRunner().invoke(main, ["lca", "constructed", "--out", str(tmp_path / "b"), "--m", "40"])
    assert bad.exit_code == 2 and "m (number of latent variables)" in bad.output
    bad = CliRunner().invoke(main, ["lca", "constructed", "--out", str(tmp_path / "b2"), "--w", "1.5"])
    assert bad.exit_code == 2 and "w must lie in [0, 1]" in bad.output
    bad = CliRunner().invoke(main, ["lca", "all", "--out", str(tmp_path / "b3"), "--d", "0"])
    assert bad.exit_code == 2 and "embedding dimension d" in bad.output
    assert not (tmp_path / "b3").exists()  # refused before anything is written
    bad = CliRunner().invoke(main, ["lca", "all", "--out", str(tmp_path / "b4"), "--seeds", "0"])
    assert bad.exit_code == 2 and "seeds" in bad.output
