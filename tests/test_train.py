import math
import os
import signal

import numpy as np
import pytest

from minisparse import train as train_mod
from minisparse.checkpoint import load_checkpoint, save_checkpoint
from minisparse.data import DataError, make_dataset, synthetic_text
from minisparse.model import GPT
from minisparse.train import TrainSettings, evaluate, train

TEXT = synthetic_text(np.random.default_rng(0), 20_000)
TINY = {"context": 16, "d_model": 16, "n_layers": 1, "n_heads": 2}


def settings(**overrides):
    base = dict(iters=20, batch=8, lr=1e-2, min_lr=1e-3, warmup=4, eval_interval=10,
                eval_batches=3, final_eval_batches=6, ckpt_interval=10, seed=3)
    return {**base, **overrides}


def run(out_dir, model=TINY, backend="numpy", **kw):
    """A tiny run on the NumPy reference ops (no Numba compile time), unless told otherwise."""
    s = kw.pop("settings", settings())
    return train(model, s, text=TEXT, out_dir=out_dir, backend=backend, progress=False, **kw)


def assert_same_state(a, b):
    """Checkpoints a and b hold identical parameters, optimizer state, RNG state, history."""
    assert a.step == b.step
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    assert a.optimizer.keys() == b.optimizer.keys()
    for key in a.optimizer:
        np.testing.assert_array_equal(a.optimizer[key], b.optimizer[key], err_msg=key)
    assert a.rng_state == b.rng_state
    assert a.history == b.history


def interrupt_at(monkeypatch, step):
    """Send a real SIGINT (Ctrl-C) from inside the training loop's get_batch of ``step``."""
    calls = {"n": 0}
    real = train_mod.get_batch

    def get_batch(rng, data, batch, context):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(rng, data, batch, context)

    monkeypatch.setattr(train_mod, "get_batch", get_batch)


def test_short_run_loss_falls(tmp_path):
    result = run(tmp_path, settings=settings(iters=40))
    assert result.stopped is None and result.step == 40
    assert len(result.train_loss) == 40
    first, last = np.mean(result.train_loss[:5]), np.mean(result.train_loss[-5:])
    assert first > math.log(result.config.vocab_size) - 0.3  # starts near uniform
    assert last < first - 0.5
    assert result.final_val_loss < first - 0.5
    assert [s for s, _ in result.val_loss] == [10, 20, 30, 40]
    assert result.val_loss[-1][1] == result.final_val_loss
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.step == 40 and ckpt.history["train_loss"] == result.train_loss


def test_ctrl_c_saves_and_resume_is_bit_identical(tmp_path, monkeypatch):
    # on the default backend (Numba kernels) and a sparse model: the path users run
    sparse = {**TINY, "sparsity": 0.5}
    full = run(tmp_path / "full", model=sparse, backend=None)
    interrupt_at(monkeypatch, step=7)
    stopped = run(tmp_path / "cut", model=sparse, backend=None)
    assert stopped.stopped.startswith("interrupted at step 7")
    assert stopped.step == 7 and load_checkpoint(stopped.checkpoint).step == 7
    monkeypatch.undo()
    resumed = train(None, None, text=TEXT, out_dir=tmp_path / "cut", resume=True,
                    progress=False)
    assert resumed.stopped is None and resumed.step == 20
    assert resumed.train_loss == full.train_loss
    assert resumed.final_val_loss == full.final_val_loss
    assert_same_state(load_checkpoint(resumed.checkpoint), load_checkpoint(full.checkpoint))


def test_ste_setting_reaches_the_model_and_survives_resume(tmp_path, monkeypatch):
    sparse = {**TINY, "sparsity": 0.5}
    s = settings(iters=4, eval_interval=2, ste=False)
    seen = []

    def callback(step, model):  # called after every validation
        seen.append((step, model.blocks[0].attn.q.sparsifier.ste,
                     model.blocks[0].ffn.down.sparsifier.ste))

    full = run(tmp_path / "full", model=sparse, settings=s, callback=callback)
    assert seen == [(2, False, False), (4, False, False)]
    assert load_checkpoint(full.checkpoint).settings["ste"] is False
    with_ste = run(tmp_path / "ste", model=sparse, settings={**s, "ste": True})
    assert with_ste.train_loss[0] == full.train_loss[0]  # same forward, different backward
    assert with_ste.train_loss[1:] != full.train_loss[1:]

    interrupt_at(monkeypatch, step=2)
    run(tmp_path / "cut", model=sparse, settings=s)
    monkeypatch.undo()
    seen.clear()
    resumed = train(None, {"iters": 4}, text=TEXT, out_dir=tmp_path / "cut", resume=True,
                    backend="numpy", progress=False, callback=callback)
    assert resumed.settings.ste is False and seen == [(4, False, False)]
    assert resumed.train_loss == full.train_loss
    with pytest.raises(ValueError, match="ste must be true or false"):
        TrainSettings(ste=0)


def test_resume_after_a_crash_from_the_interval_checkpoint(tmp_path, monkeypatch):
    full = run(tmp_path / "full")
    real = train_mod.get_batch
    calls = {"n": 0}

    def crash(*args):
        calls["n"] += 1
        if calls["n"] == 15:  # during step 11 (step 10's validation drew 3 batches and the
            # check of its checkpoint 1)
            raise MemoryError("simulated crash")
        return real(*args)

    monkeypatch.setattr(train_mod, "get_batch", crash)
    with pytest.raises(MemoryError):
        run(tmp_path / "crash")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "crash" / "ckpt.npz").step == 10
    resumed = run(tmp_path / "crash", resume=True)
    assert_same_state(load_checkpoint(resumed.checkpoint), load_checkpoint(full.checkpoint))


def test_second_ctrl_c_quits_at_once(tmp_path, monkeypatch):
    real = train_mod.get_batch
    calls = {"n": 0}

    def double(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(train_mod, "get_batch", double)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    assert not (tmp_path / "ckpt.npz").exists()
    assert signal.getsignal(signal.SIGINT) is before  # our handler is removed again


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    class Exploding(GPT):
        train_calls = 0

        def forward(self, idx, targets=None, kv_cache=None):
            logits, loss = super().forward(idx, targets, kv_cache)
            if loss is not None and loss.requires_grad:  # training steps, not validation
                Exploding.train_calls += 1
                if Exploding.train_calls == 14:
                    loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(train_mod, "GPT", Exploding)
    result = run(tmp_path)
    assert result.stopped.startswith("loss is nan at step 14")
    assert "last good checkpoint" in result.stopped and "(step 10)" in result.stopped
    assert result.step == 13 and result.final_val_loss is None
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.step == 10
    assert all(np.isfinite(a).all() for a in ckpt.params.values())


def test_init_from_dense_into_sparse(tmp_path):
    dense = run(tmp_path / "dense", settings=settings(iters=30))
    fresh = run(tmp_path / "fresh", model={**TINY, "sparsity": 0.5}, settings=settings(iters=2))
    sparse = run(tmp_path / "sparse", model={"sparsity": 0.5, "bits": 1.58},
                 settings=settings(iters=10), init_from=dense.checkpoint)
    assert sparse.config.sparsity == 0.5 and sparse.config.bits == 1.58
    assert sparse.config.d_model == 16 and sparse.step == 10
    # it starts from the trained weights, not from a fresh init
    assert sparse.train_loss[0] < fresh.train_loss[0] - 0.5
    ckpt = load_checkpoint(sparse.checkpoint)
    assert ckpt.step == 10 and ckpt.optimizer["step.0"] == 10  # fresh optimizer
    with pytest.raises(ValueError, match="d_model 16 -> 32"):
        run(tmp_path / "wide", model={"d_model": 32}, init_from=dense.checkpoint)


def test_resume_refuses_a_different_config_or_data(tmp_path):
    run(tmp_path, settings=settings(iters=2))
    with pytest.raises(ValueError, match=r"resume with sparsity 0\.0 -> 0\.5"):
        run(tmp_path, model={"sparsity": 0.5}, resume=True)
    with pytest.raises(DataError, match="data differs"):
        train(None, None, text=TEXT[:-100], out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="exists"):
        run(tmp_path)  # a fresh run does not clobber a checkpoint by accident
    assert run(tmp_path, settings=settings(iters=2), overwrite=True).step == 2
    with pytest.raises(ValueError, match="nothing to resume"):
        run(tmp_path / "empty", resume=True)
    ckpt = load_checkpoint(tmp_path / "ckpt.npz")
    ckpt.optimizer = None  # e.g. parameters converted from another framework
    save_checkpoint(tmp_path / "ckpt.npz", ckpt)
    with pytest.raises(ValueError, match="no optimizer or RNG state.*init_from"):
        run(tmp_path, resume=True)


def test_evaluate_is_deterministic_given_rng(tmp_path):
    result = run(tmp_path, settings=settings(iters=4))
    ckpt = load_checkpoint(result.checkpoint)
    model = GPT.from_params(ckpt.config, ckpt.params, backend="numpy")  # as the run trained
    val = make_dataset(TEXT, 16).val
    a = evaluate(model, val, np.random.default_rng(0), batches=6, batch=8)
    assert a == evaluate(model, val, np.random.default_rng(0), batches=6, batch=8)
    assert a == result.final_val_loss  # the run validated with eval_seed 0, same batches


def test_plain_log_lines_when_not_a_terminal(tmp_path, capsys):
    train(TINY, settings(iters=4, log_interval=2, eval_interval=2), text=TEXT, out_dir=tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("step 2/4 | loss ") and "tok/s | eta " in line for line in out)
    assert "step 2: val loss" in "\n".join(out)


def test_settings_defaults_are_the_spec_recipe_and_are_validated():
    s = TrainSettings()
    assert (s.iters, s.batch, s.lr, s.min_lr, s.warmup) == (2000, 12, 1e-3, 1e-4, 100)
    assert (s.beta1, s.beta2, s.eps, s.weight_decay, s.grad_clip) == (0.9, 0.99, 1e-8, 0.1, 1.0)
    assert s.final_eval_batches == 200
    with pytest.raises(ValueError, match="iters must be > 0"):
        TrainSettings(iters=0)
    with pytest.raises(ValueError, match="beta2 must be in"):
        TrainSettings(beta2=1.0)
    with pytest.raises(ValueError, match="batch must be an integer"):
        TrainSettings(batch=2.5)
    with pytest.raises(ValueError, match=r"unknown train settings \['lr_max'\]"):
        TrainSettings.from_dict({"lr_max": 1.0})


def test_weight_decay_only_on_matrices():
    model = GPT(train_mod.GPTConfig(vocab_size=5, **TINY), np.random.default_rng(0))
    decay, no_decay = train_mod.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.parameters())


def test_resuming_a_finished_run_reports_its_result(tmp_path):
    done = run(tmp_path, settings=settings(iters=4))
    again = run(tmp_path, settings=settings(iters=4), resume=True)
    assert again.step == 4 and again.stopped is None
    assert again.final_val_loss == done.final_val_loss and again.train_loss == done.train_loss
    with pytest.raises(ValueError, match="at step 4, beyond iters=2"):
        run(tmp_path, settings=settings(iters=2), resume=True)


# --- nothing lost: divergence, the output lock, an unusable --out, SIGTERM / SIGHUP ---------


def test_diverging_resume_leaves_the_last_good_checkpoint_byte_identical(tmp_path):
    run(tmp_path, settings=settings(iters=10))
    before = (tmp_path / "ckpt.npz").read_bytes()
    result = run(tmp_path, resume=True,
                 settings=settings(iters=20, lr=1e38, warmup=0, ckpt_interval=1))
    assert result.stopped is not None and "kept the last good checkpoint" in result.stopped
    assert "(step 10)" in result.stopped
    assert (tmp_path / "ckpt.npz").read_bytes() == before


@pytest.mark.parametrize("lr", [1e38, 1e20, 1e10])
def test_a_run_that_diverges_from_scratch_saves_nothing(tmp_path, lr):
    # the finite but absurd states in between (weights of 1e37, a loss of 1e30) are caught too
    result = run(tmp_path, settings=settings(iters=21, lr=lr, warmup=0, ckpt_interval=1))
    assert result.stopped is not None and "a lower lr may help" in result.stopped
    if result.checkpoint is not None:  # only states that passed the check were written
        ckpt = load_checkpoint(result.checkpoint)
        assert max(np.abs(a).max() for a in ckpt.params.values()) < 1e6


def test_second_run_on_a_held_out_dir_is_refused_at_once(tmp_path, monkeypatch):
    from minisparse import rundir

    steps = []
    monkeypatch.setattr(train_mod, "get_batch", lambda *a: steps.append(1))
    with rundir.claim(tmp_path):
        with pytest.raises(rundir.OutputDirError, match=rf"in use by another training run "
                                                         rf"\(pid {os.getpid()}\)"):
            run(tmp_path)
    assert steps == []  # refused before any step


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    (tmp_path / ".minisparse.lock").write_text("99999999\n")  # nobody holds the flock
    assert run(tmp_path, settings=settings(iters=2)).stopped is None
    assert "left by pid 99999999" in capsys.readouterr().err
    assert not (tmp_path / ".minisparse.lock").exists()  # released on exit


def test_stale_temp_files_are_removed_at_the_next_run(tmp_path, capsys):
    run(tmp_path, settings=settings(iters=2))
    stale = tmp_path / ".ckpt.npz.4242.0badc0de.tmp"
    stale.write_bytes(b"PK half a checkpoint")  # what a SIGKILL during a save leaves
    run(tmp_path, settings=settings(iters=4), resume=True)
    assert not stale.exists()
    assert stale.name in capsys.readouterr().err


def test_an_unusable_out_is_refused_before_training(tmp_path, monkeypatch):
    from minisparse import rundir

    steps = []
    monkeypatch.setattr(train_mod, "get_batch", lambda *a: steps.append(1))
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError, match="cannot create output directory"):
        run(tmp_path / "file" / "run")
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000}))
    with pytest.raises(OSError, match="free in"):
        run(tmp_path / "full")
    assert steps == [] and not (tmp_path / "full").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_a_read_only_out_is_refused_before_training(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError, match="cannot write to output directory"):
            run(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_sighup_saves_like_ctrl_c(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.get_batch

    def get_batch(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGHUP)
        return real(*args)

    monkeypatch.setattr(train_mod, "get_batch", get_batch)
    before = signal.getsignal(signal.SIGHUP)
    result = run(tmp_path)
    assert result.signal == signal.SIGHUP and result.stopped.startswith("interrupted at step 5")
    assert load_checkpoint(result.checkpoint).step == 5
    assert signal.getsignal(signal.SIGHUP) is before


def test_sigterm_to_the_command_saves_and_resume_is_bit_identical(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    argv = [sys.executable, "-m", "minisparse", "train", "--data", str(data), "--backend",
            "numpy", "--context", "16", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
            "--iters", "300", "--batch", "8", "--eval-interval", "100", "--eval-batches", "2",
            "--final-eval-batches", "2", "--ckpt-interval", "1000", "--log-interval", "1",
            "--seed", "3"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([*argv, "--out", str(tmp_path / "cut")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "--resume" in err
    cut = load_checkpoint(tmp_path / "cut" / "ckpt.npz")
    assert 3 <= cut.step < 300
    full = run(tmp_path / "full", settings=settings(
        iters=300, eval_interval=100, eval_batches=2, final_eval_batches=2, ckpt_interval=1000,
        lr=1e-3, min_lr=1e-4, warmup=100, seed=3))
    resumed = train(None, None, out_dir=tmp_path / "cut", resume=True, backend="numpy",
                    progress=False)
    assert resumed.step == 300
    assert_same_state(load_checkpoint(resumed.checkpoint), load_checkpoint(full.checkpoint))


def test_init_from_trains_on_the_checkpoints_own_data(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    dense = train(TINY, settings(iters=2), data_path=data, out_dir=tmp_path / "dense",
                  backend="numpy", progress=False)
    sparse = train({"sparsity": 0.5}, settings(iters=2), init_from=dense.checkpoint,
                   out_dir=tmp_path / "sparse", backend="numpy", progress=False)
    assert load_checkpoint(sparse.checkpoint).data == load_checkpoint(dense.checkpoint).data


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_training_on_the_kernels_keeps_blas_on_one_thread(tmp_path, backend):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    outside, seen = blas_threads(), []
    run(tmp_path, backend=backend, settings=settings(iters=2, eval_interval=1),
        callback=lambda step, model: seen.append(blas_threads()))
    # numba's kernels run their own parallel regions; the reference keeps the library default
    assert seen and all(s == ({1} if backend == "numba" else outside) for s in seen)
    assert blas_threads() == outside  # restored after the run
