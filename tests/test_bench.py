"""``minisparse bench --quick`` runs end to end and emits well-formed rows (timings are never
asserted: the machine is shared)."""

import importlib.util
import json
import math
import subprocess
import sys
import time

import pytest

from minisparse import bench


def test_quick_bench_emits_json_rows():
    out = subprocess.run([sys.executable, "-m", "minisparse", "bench", "--quick", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    names = {r["name"] for r in rows}
    assert {"sparse_gemv", "ternary_gemv", "sparse_ternary_gemv", "ternary_gemv_cold",
            "decode_ternary", "decode_tiny", "sample_tiny", "cold_first_call"} <= names
    assert ("decode_vs_torch" in names) == (importlib.util.find_spec("torch") is not None)
    assert all(line.startswith("#") for line in out.stderr.splitlines() if line.strip())
    for row in rows:
        optional = {"roofline"} if row["name"].startswith("decode") else set()
        optional |= {"value"} if row["name"] == "sample_tiny" else set()
        assert set(row) == {"name", "shape", "sparsity", "baseline", "ratio"} | optional
        assert isinstance(row["name"], str)
        if "gemv" in row["name"]:  # products: [d_in, d_out]
            assert len(row["shape"]) == 2 and all(isinstance(d, int) for d in row["shape"])
        else:
            assert isinstance(row["shape"], str)
        for key in optional:
            assert math.isfinite(row[key]) and row[key] > 0
        assert row["sparsity"] is None or 0 <= row["sparsity"] < 1
        assert math.isfinite(row["baseline"]) and row["baseline"] > 0
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0


def test_compare_interleaves_and_reports_the_ratio():
    calls = []
    row = bench.compare("x", "1x1", 0.5, lambda: calls.append("b"), lambda: calls.append("o"),
                        reps=4, warmup=1)
    assert calls == ["b", "o", "b", "o", "o", "b", "b", "o", "o", "b"]
    assert row["ratio"] > 0 and row["name"] == "x" and row["sparsity"] == 0.5
    assert "x" in bench._format(row)


def test_compare_warm_runs_each_side_untimed_before_its_timed_call():
    calls = []

    def side(name, seconds):
        def fn():  # the third call of each triple (the timed one, if warm works) sleeps
            calls.append(name)
            if len(calls) % 3 == 0:
                time.sleep(seconds)
        return fn

    row = bench.compare("x", "1x1", None, side("b", 0.02), side("o", 0.01), reps=2, warmup=0,
                        warm=2)
    assert calls == ["b"] * 3 + ["o"] * 3 + ["o"] * 3 + ["b"] * 3
    # the timed calls were the sleeping ones (sleep only bounds from below)
    assert row["baseline"] >= 0.02 and row["baseline"] / row["ratio"] >= 0.01


def test_decode_row_times_runs_of_tokens_and_reports_seconds_per_token(monkeypatch):
    calls = {"b": 0, "o": 0}

    def baseline():
        calls["b"] += 1

    def compiled_step(model):
        def step():
            calls["o"] += 1
        return step

    monkeypatch.setattr(bench, "_compiled_step", compiled_step)
    monkeypatch.setattr(bench, "compare", lambda name, shape, s, b, o, reps, warm: (
        b(), o(), {"name": name, "shape": shape, "sparsity": s, "baseline": 0.32,
                   "ratio": 2.0})[-1])
    model = bench._gpt(dict(d_model=8, n_layers=1, n_heads=2, context=8), "numpy")
    row = bench._decode_row("d", 0.5, baseline, model, reps=1)
    assert calls == {"b": bench.DECODE_RUN, "o": bench.DECODE_RUN}
    assert row["baseline"] == 0.32 / bench.DECODE_RUN and row["ratio"] == 2.0
    assert row["roofline"] > 0


def test_reps_must_be_a_positive_integer():
    for bad in ("0", "-3", "two"):
        out = subprocess.run([sys.executable, "-m", "minisparse", "bench", "--quick", "--reps",
                              bad], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stdout == ""
        assert "--reps: must be a positive integer" in out.stderr, out.stderr


def test_weight_bytes_per_token_counts_kept_inputs_and_code_width():
    from minisparse.model import GPTConfig

    dense = GPTConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2, ffn_hidden=16)
    head = 4 * 10 * 8
    assert bench.weight_bytes_per_token(dense) == 2 * 4 * (4 * 8 * 8 + 3 * 8 * 16) + head
    ternary = GPTConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2, ffn_hidden=16,
                        sparsity=0.5, bits=1.58)
    kept = 2 * (4 * 4 * 8 + 2 * 4 * 16 + 8 * 8)  # K = 4 of 8, 8 of 16
    assert bench.weight_bytes_per_token(ternary) == kept / 4 + head


FAKE_LLAMA_BENCH = """#!{python}
import json, sys
args = sys.argv[1:]
model = args[args.index("-m") + 1]
import gguf
reader = gguf.GGUFReader(model)  # the file must be a readable GGUF
assert reader.fields["general.architecture"].contents() == "llama"
print(json.dumps([{{"n_prompt": 0, "n_gen": int(args[args.index("-n") + 1]), "avg_ts": 250.0}}]))
"""


def test_llama_bench_row_with_a_fake_binary(tmp_path):
    pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    fake.chmod(0o755)
    row = bench.llama_row(str(fake), quick=True, ours_seconds=0.002)
    assert row["name"] == "llama_cpp_tq2_0"
    assert row["baseline"] == pytest.approx(1 / 250.0)
    assert row["ratio"] == pytest.approx((1 / 250.0) / 0.002)


def test_llama_bench_must_be_an_executable(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minisparse", "bench", "--quick",
                          "--llama-bench", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not an executable file" in out.stderr
