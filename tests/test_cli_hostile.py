"""The command line under hostile or careless use: every user error is one line on stderr,
``minisparse: error: ...``, with a non-zero exit code and never a traceback."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from minisparse import cli
from minisparse.data import synthetic_text

TINY = "--context 16 --d-model 16 --n-layers 1 --n-heads 2 --backend numpy --quiet"
FAST = "--iters 3 --batch 2 --eval-interval 2 --eval-batches 1 --final-eval-batches 1"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A data file, a good checkpoint, and hostile files of every kind, in one directory."""
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "text.txt").write_text(synthetic_text(np.random.default_rng(0), 3_000))
    assert cli.main(["train", "--data", str(tmp / "text.txt"), "--out", str(tmp / "good"),
                     *TINY.split(), *FAST.split()]) == 0
    good = (tmp / "good" / "ckpt.npz").read_bytes()
    (tmp / "bin.txt").write_bytes(b"\x00\x01\xff binary")
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp / "adir").mkdir()
    (tmp / "bad.py").write_text("def f(:\n")
    (tmp / "trunc.npz").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    entry = good.rfind(b"PK\x01\x02")  # the last central directory entry
    flipped[entry + 10] = 99  # its compression method: zipfile raises NotImplementedError
    (tmp / "flipped.npz").write_bytes(bytes(flipped))
    return tmp


NOT_NUMBERS = ["-1", "inf", "nan", "1e400", "abc", ""]
INVALID = {  # flag -> values it must refuse
    **{flag: [*NOT_NUMBERS, "0", "1.5", "1e-320"] for flag in (
        "--iters", "--batch", "--eval-batches", "--ckpt-interval", "--context", "--d-model",
        "--n-layers")},
    **{flag: [*NOT_NUMBERS, "1.5", "1e-320"] for flag in ("--warmup", "--seed")},
    **{flag: [*NOT_NUMBERS, "0"] for flag in ("--lr", "--grad-clip")},
    **{flag: NOT_NUMBERS for flag in ("--min-lr", "--weight-decay")},
    "--sparsity": [*NOT_NUMBERS, "1.5"],
}
CASES = [
    *(f"train --data text.txt --out o {TINY} {FAST} {flag} '{v}'"
      for flag, values in INVALID.items() for v in values),
    *(f"sample good/ckpt.npz --max-new-tokens 2 {flag} '{v}'"
      for flag in ("--max-new-tokens", "--temperature", "--top-k", "--seed")
      for v in ("-1", "inf", "nan", "abc", "")),
    *(f"eval good/ckpt.npz --batches 1 {flag} '{v}'"
      for flag in ("--batches", "--batch", "--seed") for v in ("-1", "nan", "1e9", "abc")),
    *(f"{cmd} {f}" for f in ("bin.txt", "empty.txt", "adir", "missing.npz", "trunc.npz",
                             "flipped.npz", "text.txt")
      for cmd in ("eval", "sample", "info", f"train --out o {TINY} {FAST} --init-from")),
    *(f"train --data {f} --out o {TINY} {FAST}"
      for f in ("bin.txt", "empty.txt", "latin1.txt", "adir", "missing.txt", "good/ckpt.npz")),
    f"train --out text.txt {TINY} {FAST}",
    "train --out good --resume --lr 1e38 --iters 9 --ckpt-interval 1 --quiet --backend numpy",
    "check bad.py:f --op topk", "check missing.py:f --op topk", "check math:sqrt --op nope",
    "check nocolon --op topk", "vectors text.txt", "bogus", "",
    "sweep --out o --sparsities nan --iters 1 --no-plot", "sweep --out o --lr inf",
    "ablate ste --out o --sparsity 2 --iters 1 --no-plot", "ablate ste --out o --batch 0",
]


@pytest.mark.parametrize("command", CASES)
def test_user_errors_are_one_line(command, files, capsys, monkeypatch):
    import shlex

    monkeypatch.chdir(files)
    rc = cli.main(shlex.split(command))
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Warning" not in err, err
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("minisparse: error: "), (rc, err)


def test_an_unexpected_exception_is_one_line(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_info", broken)
    assert cli.main(["info"]) == 1
    assert capsys.readouterr().err == "minisparse: error: ZeroDivisionError: division by zero\n"


def test_ctrl_c_outside_training_exits_130_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "minisparse: error: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is before


def test_version(capsys):
    from minisparse import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"minisparse {__version__}\n"


def test_check_names_the_file_and_line_of_a_syntax_error(files, capsys):
    assert cli.main(["check", f"{files / 'bad.py'}:f", "--op", "topk"]) == 1
    line = capsys.readouterr().err
    assert "bad.py, line 1" in line and len(line.splitlines()) == 1


def test_check_help_lists_the_ops(capsys):
    from minisparse.oracle.harness import OPS

    assert cli.main(["check", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ", ".join(sorted(OPS)) in out


def test_help_defaults_come_from_the_settings_objects(capsys, monkeypatch):
    from minisparse.train import TrainSettings

    monkeypatch.setattr(cli, "TRAIN_DEFAULTS", TrainSettings(lr=0.00123, batch=7))
    monkeypatch.setattr(cli, "MODEL_DEFAULTS", {**cli.MODEL_DEFAULTS, "d_model": 96})
    assert cli.main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate (0.00123)" in out and "batch size (7)" in out
    assert "model width (96)" in out


def _run(args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "minisparse", *args], capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def _at_most_6_gb():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps memory on Linux only")
@pytest.mark.parametrize("args", [["train", "--out", "o", "--n-layers", "1000000000000000000"],
                                  ["info", "--n-layers", "1000000000000000000"]])
def test_an_absurd_model_is_refused_before_it_is_built(args, files):
    # in a subprocess capped at 6 GB: without the check, these lists or allocate forever
    proc = _run([*args, "--data", "text.txt"] if args[0] == "train" else args, cwd=files,
                preexec_fn=_at_most_6_gb)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("minisparse: error: ") and "parameter" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("args", [["train", "--lr", "nan"], ["eval", "flipped.npz"],
                                  ["check", "bad.py:f", "--op", "topk"], ["--version"]])
def test_the_installed_command_never_prints_a_traceback(args, files):
    proc = _run(args, cwd=files)
    assert "Traceback" not in proc.stderr
    if args != ["--version"]:
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1


def test_sample_streams_each_character_as_it_is_generated(files):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "minisparse", "sample", "good/ckpt.npz",
                             "--max-new-tokens", "100000", "--backend", "numpy"],
                            cwd=files, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = proc.stdout.read(20)  # arrives long before the 100000 characters are done
        assert len(first) == 20
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()


def test_ctrl_c_while_the_command_line_imports(monkeypatch, capsys):
    import builtins

    from minisparse import __main__ as entry

    real = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "cli":  # `from .cli import main`, while NumPy and Numba load
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert entry.run() == 130
    assert capsys.readouterr().err == "minisparse: error: interrupted\n"
