"""Sweeps and ablations on micro grids: CSV rows, resume, fit, activation sparsity, CLI."""

import csv
import hashlib
import json
import math

import numpy as np
import pytest

from minisparse import sweep
from minisparse.cli import build_parser, main
from minisparse.data import synthetic_text
from minisparse.model import GPT, GPTConfig, count_params
from minisparse.scaling import ScalingFit, ScalingLaw
from minisparse.train import CKPT_NAME, train

TEXT = synthetic_text(np.random.default_rng(0), 6_000)
TINY = dict(iters=3, batch=2, context=8, final_eval_batches=2)


def micro_grid(sparsities=(0.0, 0.5)):
    return sweep.Grid(sizes=((16, 1), (32, 1)), sparsities=sparsities, **TINY)


def counting_train(monkeypatch):
    """Replace sweep.train by a wrapper that counts its calls."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(kwargs["out_dir"])
        return train(*args, **kwargs)

    monkeypatch.setattr(sweep, "train", wrapped)
    return calls


def test_micro_sweep_writes_rows_resumes_and_fits(tmp_path, monkeypatch):
    calls = counting_train(monkeypatch)
    rows, fits = sweep.run_sweep(micro_grid(), tmp_path, text=TEXT, plot=False, log=lambda m: 0)
    assert len(calls) == 4
    with open(tmp_path / sweep.RESULTS, newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert [r["S"] for r in rows] == [0.0, 0.5, 0.0, 0.5]
    assert rows[0]["N"] < rows[2]["N"] and rows[1]["N_a"] < rows[1]["N"]
    for r in rows:
        assert np.isfinite(r["val_loss"]) and r["iters"] == 3 and r["stopped"] is None
        assert r["act_sparsity"] >= r["S"] - 1e-9  # top-K zeros, plus relu² ones
    assert isinstance(fits["fp"], str) and "not fitted" in fits["fp"]  # 4 < 5 points

    # again: nothing retrained, the same rows come back from the CSV
    again, _ = sweep.run_sweep(micro_grid(), tmp_path, text=TEXT, plot=False, log=lambda m: 0)
    assert len(calls) == 4 and again == rows

    # a larger grid trains only its new points, then fits the law to all six
    rows6, fits6 = sweep.run_sweep(micro_grid((0.0, 0.5, 0.8)), tmp_path, text=TEXT,
                                   plot=False, log=lambda m: 0)
    assert len(calls) == 6 and len(rows6) == 6
    assert isinstance(fits6["fp"], ScalingFit) and np.isfinite(fits6["fp"].objective)
    assert (tmp_path / "fit.json").exists()


def test_interrupted_run_continues_from_its_checkpoint(tmp_path):
    run = micro_grid().runs()[1]  # a top-K run
    run_dir = tmp_path / "runs" / run.name
    partial = train(run.config, {**run.settings, "iters": 2}, text=TEXT, out_dir=run_dir,
                    progress=False)  # as if stopped after step 2 of 3
    row = sweep.run_one(run, tmp_path, text=TEXT)
    history = sweep.load_checkpoint(run_dir / CKPT_NAME).history["train_loss"]
    assert row["iters"] == 3 and len(history) == 3
    assert history[:2] == partial.train_loss


def test_activation_sparsity_is_logged_at_every_evaluation(tmp_path):
    grid = sweep.Grid(sizes=((16, 1),), sparsities=(0.5,), **{**TINY, "iters": 4})
    run = grid.runs()[0]
    run = sweep.Run(run.variant, run.config, {**run.settings, "eval_interval": 2})
    row = sweep.run_one(run, tmp_path, text=TEXT)
    measured = sweep.read_sparsity_log(tmp_path / "runs" / run.name)
    assert [step for step, _ in measured] == [2, 4]  # periodic evaluations; the last is final
    assert all(0.5 <= s <= 1 for _, s in measured)  # at least the top-K zeros
    assert row["act_sparsity"] == measured[-1][1]


def test_plot_sweep_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    law = ScalingLaw(E=1.5, B=0.5, C=1.0, alpha=0.3, beta=0.1)
    rows = law_rows(law)
    sweep.plot_sweep(rows, sweep.fit_rows(rows), tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000


def law_rows(law, bits=""):
    return [{"N": n, "N_a": int(n * (1 - s)), "S": s, "sparsity": s, "bits": bits,
             "val_loss": float(law.loss(n, s))}
            for n in (1e4, 1e5, 1e6, 1e7) for s in (0.0, 0.5, 0.7, 0.9)]


def test_fit_rows_groups_by_bits_and_skips_failed_runs():
    fp, ternary = ScalingLaw(1.5, 0.5, 1.0, 0.3, 0.1), ScalingLaw(1.7, 0.4, 1.2, 0.25, 0.06)
    failed = {"N": 1e5, "N_a": 1, "S": 0.3, "sparsity": 0.3, "bits": "",
              "val_loss": float("nan")}
    fits = sweep.fit_rows(law_rows(fp) + law_rows(ternary, bits=1.58) + [failed])
    assert fits["fp"].optimal_sparsity() == pytest.approx(fp.optimal_sparsity(), abs=1e-3)
    assert fits["1.58"].optimal_sparsity() == pytest.approx(ternary.optimal_sparsity(),
                                                            abs=1e-3)
    assert "E=" in sweep.format_report([], fits)


def test_activation_sparsity_counts_topk_and_natural_zeros():
    rng = np.random.default_rng(0)
    idx = [rng.integers(0, 20, (2, 8))]

    def measured(**fields):
        config = GPTConfig(vocab_size=20, context=8, d_model=32, n_layers=1, n_heads=1,
                           **fields)
        return sweep.activation_sparsity(GPT(config, np.random.default_rng(1)), idx), config

    dense_silu, _ = measured(ffn_act="silu")
    assert dense_silu == pytest.approx(0.0, abs=1e-6)
    relu_only, config = measured(ffn_act="relu2")
    down_share = config.d_model * config.ffn_hidden / count_params(config)["N_proj"]
    # relu² zeros about half the inputs of the down projection and nothing else
    assert 0.25 * down_share < relu_only < 0.75 * down_share
    for fields in ({"sparsity": 0.5}, {"block": (16, 32), "ffn_hidden": 64},
                   {"sparsity": 0.7, "bits": 1.58}):
        got, config = measured(**fields)
        assert count_params(config)["sparsity"] - 1e-9 <= got < 1.0


def test_no_ste_arm_trains_with_the_masked_gradient(tmp_path):
    settings = {**micro_grid().settings(0), "iters": 2}
    config = dict(d_model=16, n_layers=1, n_heads=1, context=8, sparsity=0.5)
    ste = sweep.Run("ste", config, settings)
    masked = sweep.Run("no-ste", config, {**settings, "ste": False})
    # names hash ste where Run.ste used to be: earlier sweeps' runs keep their names
    old_spec = json.dumps([config, settings, False, None], sort_keys=True)
    assert masked.name == f"no-ste-{hashlib.sha256(old_spec.encode()).hexdigest()[:8]}"
    rows = [sweep.run_one(run, tmp_path, text=TEXT) for run in (ste, masked)]
    assert [r["ste"] for r in rows] == [True, False]
    losses = [sweep.load_checkpoint(tmp_path / "runs" / run.name / CKPT_NAME)
              .history["train_loss"] for run in (ste, masked)]
    assert losses[0][0] == losses[1][0] and losses[0][1] != losses[1][1]


def test_ablation_presets():
    ste = sweep.ablation_runs("ste", sparsity=0.6)
    assert [r.variant for r in ste] == ["topk-ste", "topk-no-ste", "relu-only"]
    assert [r.settings.get("ste", True) for r in ste] == [True, False, True]
    assert ste[0].config["sparsity"] == 0.6 and "sparsity" not in ste[2].config
    block = sweep.ablation_runs("block", d_model=64)
    assert block[2].config["block"] == (16, 32) and block[2].config["ffn_hidden"] % 32 == 0
    cont = sweep.ablation_runs("continue", iters=101)
    assert cont[3].init_from == cont[2].name
    assert cont[2].settings["iters"] + cont[3].settings["iters"] == cont[0].settings["iters"]
    with pytest.raises(ValueError, match="ablation must be one of"):
        sweep.ablation_runs("dropout")
    with pytest.raises(ValueError, match="divisible by 32"):
        sweep.ablation_runs("block", d_model=48)


def test_continue_ablation_runs_end_to_end(tmp_path):
    rows = sweep.run_ablation("continue", tmp_path, text=TEXT, plot=False, log=lambda m: 0,
                              d_model=16, n_layers=1, iters=4, batch=2, context=8)
    assert [r["variant"] for r in rows] == ["dense", "topk-scratch", "dense-pretrain",
                                            "dense-then-topk"]
    assert rows[3]["init_from"] == rows[2]["run"] and rows[3]["iters"] == 2
    assert all(np.isfinite(r["val_loss"]) for r in rows)


def test_bad_grid_fails_before_training(tmp_path):
    grid = sweep.Grid(sizes=((16, 1),), sparsities=(0.0, 1.5), **TINY)
    with pytest.raises(ValueError, match="sparsity"):
        sweep.run_sweep(grid, tmp_path, text=TEXT, plot=False)
    assert not (tmp_path / sweep.RESULTS).exists()


def test_read_rows_rejects_a_foreign_csv(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a minisparse results CSV"):
        sweep.read_rows(tmp_path / "x.csv")


def test_cli_sweep_and_ablate(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    argv = ["sweep", "--out", str(tmp_path / "s"), "--data", str(data), "--sizes", "16x1",
            "--sparsities", "0,0.5", "--iters", "2", "--batch", "2", "--context", "8",
            "--final-eval-batches", "1", "--no-plot"]
    assert main(argv) == 0
    assert "not fitted" in capsys.readouterr().out
    assert main(["sweep", "--sizes", "64"]) == 2
    assert "DxL" in capsys.readouterr().err
    assert main(["ablate", "dropout"]) == 2
    # the CLI's defaults are the library's
    args = build_parser().parse_args(["sweep"])
    grid = sweep.Grid()
    assert (args.sizes, args.sparsities, args.bits, args.iters) == \
        (grid.sizes, grid.sparsities, grid.bits, grid.iters)


def test_moe_ablation_runs_end_to_end(tmp_path):
    runs = sweep.ablation_runs("moe", d_model=16)
    assert [r.variant for r in runs] == ["glu-topk-0.5", "moe-4x-top1-topk-0.5"]
    assert (runs[1].config["n_experts"], runs[1].config["top_experts"]) == (4, 1)
    rows = sweep.run_ablation("moe", tmp_path, text=TEXT, plot=True, log=lambda m: 0,
                              d_model=16, n_layers=1, iters=3, batch=2, context=8)
    glu, moe = rows
    assert moe["N"] > glu["N"]  # four experts' weights ...
    assert moe["N_a"] == glu["N_a"] + 4 * 16  # ... but the same active ones, plus the router
    arms = json.loads((tmp_path / "moe.json").read_text())
    assert arms[0]["expert_load"] is None and math.isclose(sum(arms[1]["expert_load"][0]), 1)
    table = (tmp_path / "moe.md").read_text()
    assert table.count("\n") == 4 and "moe-4x-top1-topk-0.5" in table
    assert (tmp_path / "moe.png").stat().st_size > 0


def test_threshold_ablation_runs_end_to_end(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    argv = ["ablate", "threshold", "--out", str(tmp_path / "a"), "--data", str(data),
            "--d-model", "16", "--n-layers", "1", "--iters", "2", "--batch", "2",
            "--context", "8"]
    assert main(argv) == 0
    arms = json.loads((tmp_path / "a" / "threshold.json").read_text())
    assert [(a["method"], a["S"]) for a in arms[:3]] == [("dense", 0.0), ("threshold", 0.25),
                                                         ("topk", 0.25)]
    assert len(arms) == 1 + 2 * len(sweep.THRESHOLD_SPARSITIES)
    thresholds = [a["act_sparsity"] for a in arms if a["method"] == "threshold"]
    assert thresholds == sorted(thresholds)  # a higher S drops more, measured
    assert all(np.isfinite(a["val_loss"]) for a in arms)
    assert "| 0.7 |" in (tmp_path / "a" / "threshold.md").read_text()
    assert (tmp_path / "a" / "threshold.png").stat().st_size > 0
