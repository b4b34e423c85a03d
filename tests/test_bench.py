"""``minisparse bench --quick`` runs end to end and emits well-formed rows (timings are never
asserted: the machine is shared)."""

import json
import math
import subprocess
import sys

from minisparse import bench


def test_quick_bench_emits_json_rows():
    out = subprocess.run([sys.executable, "-m", "minisparse", "bench", "--quick", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    names = {r["name"] for r in rows}
    assert {"sparse_gemv", "ternary_gemv", "sparse_ternary_gemv", "cold_first_call"} <= names
    for row in rows:
        assert set(row) == {"name", "shape", "sparsity", "baseline", "ratio"}
        assert isinstance(row["name"], str) and isinstance(row["shape"], str)
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
