"""The PyTorch trainer: it follows the NumPy trainer (same init, batches and recipe), its
checkpoints are minisparse's own (eval reproduces its val loss, resume continues it), and a
2-process torchrun follows the 1-process run.

Expected differences: the NumPy engine and PyTorch sum matmuls in different orders, and two
processes all-reduce their gradient halves (another summation order): float32 rounding only,
so the loss curves agree to ~1e-5 relative over a short run (asserted: 1e-4)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (the torch extra)")

from minisparse.checkpoint import load_checkpoint  # noqa: E402
from minisparse.cli import main  # noqa: E402
from minisparse.data import synthetic_text  # noqa: E402
from minisparse.torch import train as torch_train  # noqa: E402
from minisparse.train import train as numpy_train  # noqa: E402

MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "context": 16, "sparsity": 0.5}
SETTINGS = {"iters": 8, "batch": 4, "eval_interval": 4, "eval_batches": 3,
            "final_eval_batches": 6, "warmup": 2}
FLAGS = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--context", "16",
         "--sparsity", "0.5", "--iters", "8", "--batch", "4", "--eval-interval", "4",
         "--eval-batches", "3", "--final-eval-batches", "6", "--warmup", "2", "--quiet"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "syn.txt"
    path.write_text(synthetic_text(np.random.default_rng(0), 20_000))
    return path


def test_one_process_follows_the_numpy_trainer_and_eval_reads_it(text_file, tmp_path, capsys):
    ours = torch_train.train(MODEL, SETTINGS, data_path=text_file, out_dir=tmp_path / "t",
                             progress=False, device="cpu")
    engine = numpy_train(MODEL, SETTINGS, data_path=text_file, out_dir=tmp_path / "n",
                         backend="numpy", progress=False)
    np.testing.assert_allclose(ours.train_loss, engine.train_loss, rtol=1e-4)
    assert len(ours.train_loss) == 8 and ours.train_loss[-1] < ours.train_loss[0]
    assert main(["eval", str(ours.checkpoint), "--batches", "6", "--json"]) == 0
    val = json.loads(capsys.readouterr().out)["val_loss"]
    assert abs(val - ours.final_val_loss) < 1e-4  # minisparse eval on the torch checkpoint
    assert main(["sample", str(ours.checkpoint), "--max-new-tokens", "5"]) == 0


def test_a_second_run_on_a_held_out_dir_is_refused_at_once(text_file, tmp_path):
    from minisparse import rundir

    with rundir.claim(tmp_path):  # e.g. minisparse train, or another torch run, holds it
        with pytest.raises(rundir.OutputDirError, match="in use by another training run"):
            torch_train.train(MODEL, SETTINGS, data_path=text_file, out_dir=tmp_path,
                              progress=False, device="cpu")
    assert not (tmp_path / "ckpt.npz").exists()


def test_either_trainer_resumes_a_torch_checkpoint(text_file, tmp_path):
    """The checkpoint holds the AdamW moments in the engine's format: resuming it in PyTorch
    and in the NumPy trainer gives the same continuation (float rounding apart)."""
    for out in ("t", "n"):
        torch_train.train(MODEL, {**SETTINGS, "iters": 4}, data_path=text_file,
                          out_dir=tmp_path / out, progress=False, device="cpu")
    saved = load_checkpoint(tmp_path / "t" / "ckpt.npz")
    assert saved.step == 4 and saved.optimizer["step.0"] == 4
    assert np.abs(saved.optimizer["m.0"]).max() > 0
    ours = torch_train.train(settings={"iters": 8}, resume=True, out_dir=tmp_path / "t",
                             progress=False, device="cpu")
    engine = numpy_train(settings={"iters": 8}, resume=True, out_dir=tmp_path / "n",
                         backend="numpy", progress=False)
    assert ours.step == engine.step == 8
    np.testing.assert_allclose(ours.train_loss, engine.train_loss, rtol=1e-4)
    np.testing.assert_array_equal(ours.train_loss[:4], saved.history["train_loss"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_processes(*flags):
    """``torchrun --nproc_per_node 2 -m minisparse.torch.train FLAGS`` on the CPU (gloo)."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU, as the 1-process run
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "minisparse.torch.train", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_follow_one(text_file, tmp_path):
    one = torch_train.train(MODEL, SETTINGS, data_path=text_file, out_dir=tmp_path / "one",
                            progress=False, device="cpu")
    out = _torchrun_two_processes(*FLAGS, "--data", str(text_file), "--out", str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr[-2000:]
    two = load_checkpoint(tmp_path / "two" / "ckpt.npz")
    np.testing.assert_allclose(two.history["train_loss"], one.train_loss, rtol=1e-4)
    assert two.history["val_loss"][-1][1] == pytest.approx(one.final_val_loss, rel=1e-4)
    worst = np.max(np.abs(np.subtract(two.history["train_loss"], one.train_loss))
                   / np.abs(one.train_loss))
    print(f"2 processes vs 1: largest relative loss difference {worst:.2g}")


# --- divergence: the last good checkpoint is kept, as minisparse train keeps it -----------
DIVERGE = ["--lr", "1e38", "--warmup", "0", "--ckpt-interval", "1"]


def test_a_diverging_resume_keeps_the_last_good_checkpoint_byte_identical(text_file, tmp_path,
                                                                           capsys):
    torch_train.train(MODEL, {**SETTINGS, "iters": 4}, data_path=text_file, out_dir=tmp_path,
                      progress=False, device="cpu")
    before = (tmp_path / "ckpt.npz").read_bytes()
    code = torch_train.main(["--resume", "--out", str(tmp_path), "--iters", "8", *DIVERGE,
                             "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"kept the last good checkpoint {tmp_path / 'ckpt.npz'} (step 4)" in err
    assert "a lower lr may help" in err and err.count("\n") == 1  # one line
    assert (tmp_path / "ckpt.npz").read_bytes() == before


@pytest.mark.parametrize("lr", [1e38, 1e10])
def test_a_run_that_diverges_from_scratch_saves_only_sane_states(text_file, tmp_path, lr):
    # lr 1e10 passes through finite but absurd states (huge weights, a huge loss): the guard
    # catches them before a save, not only NaNs
    result = torch_train.train(MODEL, {**SETTINGS, "iters": 21, "lr": lr, "warmup": 0,
                                       "ckpt_interval": 1},
                               data_path=text_file, out_dir=tmp_path, progress=False,
                               device="cpu")
    assert result.stopped is not None and "a lower lr may help" in result.stopped
    assert result.final_val_loss is None
    if result.checkpoint is not None:  # only states that passed the check were written
        ckpt = load_checkpoint(result.checkpoint)
        assert max(np.abs(a).max() for a in ckpt.params.values()) < 1e6
        assert f"(step {ckpt.step})" in result.stopped


def test_the_guard_is_the_numpy_trainers(text_file, tmp_path, monkeypatch):
    """A state the shared check refuses is not written, whatever the loss says."""
    seen = []

    def refuse(params, optimizer_state, val_loss, limit):
        seen.append(sorted(params) == sorted(load_checkpoint(tmp_path / "ok" / "ckpt.npz")
                                             .params))
        return "parameter blocks.0.attn.q is not finite"

    torch_train.train(MODEL, {**SETTINGS, "iters": 2}, data_path=text_file,
                      out_dir=tmp_path / "ok", progress=False, device="cpu")
    monkeypatch.setattr(torch_train, "_diverged", refuse)
    result = torch_train.train(MODEL, {**SETTINGS, "iters": 2}, data_path=text_file,
                               out_dir=tmp_path / "no", progress=False, device="cpu")
    assert seen == [True]  # called once, with every SPEC parameter, at the final save
    assert result.stopped == ("parameter blocks.0.attn.q is not finite after step 2; stopped "
                              "and no checkpoint was written; a lower lr may help")
    assert result.checkpoint is None


@pytest.mark.slow
def test_on_two_processes_rank_0_decides_and_every_rank_stops(text_file, tmp_path):
    flags = [*FLAGS, "--data", str(text_file), "--out", str(tmp_path)]
    assert _torchrun_two_processes(*flags, "--iters", "4").returncode == 0
    before = (tmp_path / "ckpt.npz").read_bytes()
    out = _torchrun_two_processes(*flags, "--resume", *DIVERGE)
    assert out.returncode != 0  # torchrun: a worker exited with 1
    assert out.stderr.count("kept the last good checkpoint") == 1, out.stderr[-2000:]
    assert (tmp_path / "ckpt.npz").read_bytes() == before


def test_trains_on_each_device(text_file, tmp_path, torch_device):
    """On a GPU the trainer runs under bf16 autocast: it must still learn and write a
    checkpoint minisparse reads (its curve is not held to the float32 one)."""
    result = torch_train.train(MODEL, {**SETTINGS, "iters": 20}, data_path=text_file,
                               out_dir=tmp_path, progress=False, device=torch_device)
    assert result.train_loss[-1] < result.train_loss[0]
    assert load_checkpoint(result.checkpoint).step == 20


def test_ctrl_c_saves_and_stops(text_file, tmp_path, monkeypatch):
    import signal

    step = torch_train._Progress.step

    def press_ctrl_c_at_step_2(self, n, *args):
        step(self, n, *args)
        if n == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(torch_train._Progress, "step", press_ctrl_c_at_step_2)
    result = torch_train.train(MODEL, SETTINGS, data_path=text_file, out_dir=tmp_path,
                               progress=False, device="cpu")
    assert result.stopped.startswith("interrupted at step 2")
    assert load_checkpoint(result.checkpoint).step == 2


def test_the_backend_flag_is_refused(capsys):
    assert torch_train.main(["--backend", "numpy", "--iters", "1"]) == 2
    assert "--backend" in capsys.readouterr().err


def test_bench_row_of_the_torch_trainer():
    from minisparse import bench

    (row,) = bench.trainer_tokens_row(quick=True)
    assert row["name"] == "trainer_tokens_torch" and row["shape"] == "2x16"
    assert 0 < row["baseline"] < 1 and 0 < row["ratio"] < float("inf")
