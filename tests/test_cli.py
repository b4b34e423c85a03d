import json
import subprocess
import sys

import numpy as np
import pytest

from minisparse import cli
from minisparse.checkpoint import load_checkpoint
from minisparse.data import synthetic_text
from minisparse.model import GPTConfig, count_params
from minisparse.train import TrainSettings

TINY = ["--context", "16", "--d-model", "16", "--n-layers", "1", "--n-heads", "2"]
FAST = ["--iters", "12", "--batch", "4", "--eval-interval", "6", "--eval-batches", "2",
        "--final-eval-batches", "4", "--ckpt-interval", "6", "--lr", "1e-2", "--warmup", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by the CLI on synthetic text: (data path, checkpoint path)."""
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "text.txt"
    data.write_text(synthetic_text(np.random.default_rng(0), 5_000))
    rc = cli.main(["train", "--data", str(data), "--out", str(tmp / "run"), "--quiet",
                   "--backend", "numpy", "--sparsity", "0.5", *TINY, *FAST])
    assert rc == 0
    return data, tmp / "run" / "ckpt.npz"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("minisparse: error: ")
    return lines[0]


def test_train_writes_a_checkpoint(trained):
    _, ckpt_path = trained
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.step == 12 and ckpt.config.sparsity == 0.5 and ckpt.config.d_model == 16
    assert ckpt.settings["iters"] == 12 and ckpt.settings["batch"] == 4


def test_train_resume_extends_a_run(trained, tmp_path, capsys):
    data, ckpt_path = trained
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.npz").write_bytes(ckpt_path.read_bytes())
    assert cli.main(["train", "--out", str(out), "--resume", "--iters", "14",
                     "--backend", "numpy"]) == 0
    assert "done: 14 steps, val loss" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "ckpt.npz")
    assert ckpt.step == 14 and ckpt.data["source"] == str(data.resolve())


def test_eval_json_matches_the_final_validation(trained, capsys):
    _, ckpt_path = trained
    argv = ["eval", str(ckpt_path), "--json", "--batches", "4", "--backend", "numpy"]
    assert cli.main(argv) == 0
    val_loss = json.loads(capsys.readouterr().out)["val_loss"]
    assert val_loss == load_checkpoint(ckpt_path).history["val_loss"][-1][1]
    assert cli.main(["eval", str(ckpt_path), "--batches", "2"]) == 0
    assert capsys.readouterr().out.startswith("val loss ")


def test_info_for_a_checkpoint_and_for_flags(trained, capsys):
    _, ckpt_path = trained
    assert cli.main(["info", str(ckpt_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config = load_checkpoint(ckpt_path).config
    assert info["config"] == config.to_dict() and info["step"] == 12
    assert info["N_a"] == count_params(config)["N_a"]
    argv = ["info", "--block", "16:32", "--ffn-hidden", "320", "--bits", "1.58", "--json"]
    assert cli.main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    config = GPTConfig(vocab_size=65, block=(16, 32), ffn_hidden=320, bits=1.58)
    assert info["N"] == count_params(config)["N"] and info["sparsity"] == pytest.approx(0.5)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "d_model: 128" in out and "N_a:" in out and "overall sparsity:" in out


def test_sample_is_seeded_and_continues_the_prompt(trained, capsys):
    _, ckpt_path = trained
    argv = ["sample", str(ckpt_path), "--prompt", "The", "--max-new-tokens", "20",
            "--seed", "5", "--top-k", "5", "--temperature", "0.8"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("The") and len(first) == 3 + 20 + 1
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first


def test_train_without_arguments_is_the_default_recipe(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "train", lambda *a, **kw: calls.append((a, kw)) or _Done())
    assert cli.main(["train", "--quiet"]) == 0
    (model, settings), kw = calls[0]
    assert model == {} and settings == {}  # nothing overridden: GPTConfig / TrainSettings defaults
    assert kw["out_dir"] == "runs/default" and kw["data_path"] is None
    assert not kw["resume"] and kw["init_from"] is None
    assert TrainSettings.from_dict(settings).iters == 2000


class _Done:
    stopped, step, final_val_loss, checkpoint = None, 2000, 1.7, "runs/default/ckpt.npz"
    signal = None


def test_train_reports_interrupt_and_non_finite_stop(monkeypatch, capsys):
    stopped = _Done()
    monkeypatch.setattr(cli, "train", lambda *a, **kw: stopped)
    stopped.stopped = "interrupted at step 7 (SIGINT); checkpoint saved to runs/x/ckpt.npz"
    stopped.signal = 2
    assert cli.main(["train", "--out", "runs/x"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 7" in err and "minisparse train --resume --out runs/x" in err
    stopped.signal = 15
    assert cli.main(["train", "--out", "runs/x"]) == 143
    capsys.readouterr()
    stopped.signal = None
    stopped.stopped = "loss is nan at step 3; stopped and no checkpoint was written"
    assert cli.main(["train"]) == 1
    assert "loss is nan at step 3" in one_error_line(capsys)


def test_train_refuses_to_clobber_a_checkpoint(trained, capsys):
    data, ckpt_path = trained
    assert cli.main(["train", "--data", str(data), "--out", str(ckpt_path.parent)]) == 1
    assert "exists: resume it (--resume)" in one_error_line(capsys)


@pytest.mark.parametrize("argv, fragment", [
    ([], "required"),
    (["bogus"], "invalid choice"),
    (["train", "--sparsity", "abc"], "--sparsity: invalid float value"),
    (["train", "--block", "16-32"], "expected N:M"),
    (["train", "--bits", "2"], "expected 1.58 or none"),
    (["train", "--iters", "0"], "--iters: must be > 0"),
    (["train", "--ffn-act", "gelu"], "invalid choice"),
    (["train", "--resume", "--init-from", "x.npz"], "not allowed with"),
    (["train", "--data", "/no/such/file.txt"], "data file not found"),
    (["train", "--sparsity", "1.5", "--out", "{tmp}"], "sparsity must be in [0, 1)"),
    (["train", "--d-model", "30", "--out", "{tmp}"], "d_model=30"),
    (["train", "--lr", "-1", "--out", "{tmp}"], "--lr: must be > 0"),
    (["train", "--resume", "--out", "{tmp}"], "nothing to resume"),
    (["eval", "/no/such/ckpt.npz"], "checkpoint not found"),
    (["eval", "{corrupt}"], "not an .npz"),
    (["sample", "{ckpt}", "--prompt", "€"], "'€' at position 0"),
    (["sample", "{ckpt}", "--temperature", "-1"], "temperature"),
    (["info", "--n-heads", "3"], "n_heads=3"),
    (["info", "--block", "16:32"], "ffn_hidden=336"),
])
def test_bad_input_exits_nonzero_with_one_line(argv, fragment, trained, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_text("not a zip")
    argv = [a.format(tmp=tmp_path / "out", corrupt=corrupt, ckpt=trained[1]) for a in argv]
    assert cli.main(argv) != 0
    assert fragment in one_error_line(capsys)


def test_help_exits_zero(capsys):
    assert cli.main(["train", "--help"]) == 0
    assert "--init-from" in capsys.readouterr().out


def test_python_dash_m(trained):
    _, ckpt_path = trained
    proc = subprocess.run([sys.executable, "-m", "minisparse", "info", str(ckpt_path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["step"] == 12
    proc = subprocess.run([sys.executable, "-m", "minisparse", "eval", "missing.npz"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("minisparse: error: checkpoint not")


def test_init_from_can_switch_bits_and_block_back_off(trained, tmp_path):
    data, _ = trained
    ternary = tmp_path / "ternary"
    argv = ["train", "--data", str(data), "--quiet", "--backend", "numpy", *TINY, *FAST]
    assert cli.main([*argv, "--out", str(ternary), "--bits", "1.58", "--block", "4:8"]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "fp"), "--init-from",
                     str(ternary / "ckpt.npz"), "--bits", "none", "--block", "none"]) == 0
    config = load_checkpoint(tmp_path / "fp" / "ckpt.npz").config
    assert config.bits is None and config.block is None and config.sparsity == 0.5
