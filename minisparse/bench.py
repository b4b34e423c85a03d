"""``minisparse bench``: the fast path against its baseline, side by side in one process.

Each comparison is warmed up, then baseline and candidate run in alternating repetitions (the
machine is shared and noisy) and the medians are compared: ratio = baseline time / ours.
Numba's OpenMP pool and OpenBLAS's pool both spin after a call by default; on 2 cores each then
steals the other's cores and both timings turn to noise. Importing minisparse asks both to sleep
when idle, OpenMP's after a short spin (OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=30000,
OPENBLAS_THREAD_TIMEOUT=4, unless set by the user; PyTorch's own OpenMP pool reads them too);
the table's header shows the settings in force.

Whole-model rows (decode, training) run with OpenBLAS on one thread for both minisparse
backends: their many small matmuls lose more to waking a second BLAS thread than they gain.
PyTorch runs at its faster intra-op thread count here (1 or its default).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import lru_cache

import numba
import numpy as np
from numba import njit, prange

from . import SET_BY_US
from .backend import blas_threads
from .data import bundled_text, get_batch, make_dataset
from .generate import generate
from .kernels import pack_linear, pack_model, pack_sparse_weights, sparse_gemv, topk_indices
from .kernels.decode import decoder_for
from .kernels.linear import PackedLinear
from .kernels.simd import simd_level
from .model import GPT, GPTConfig, KVCache
from .optim import AdamW
from .sparsity import k_for

GEMV_SHAPES = [(1024, 4096), (2048, 5632), (4096, 11008)]  # (d_in, d_out)
GEMV_SPARSITY = [0.5, 0.75, 0.9]
# ~50M parameters: 16 layers of 4 * 512^2 + 3 * 512 * 1360 weights (SPEC 6 default ffn_hidden).
# ffn 1280 (not the default 1360): a multiple of 256, so every projection of the llama.cpp
# peer's GGUF is TQ2_0 (a 1360-input ffn.down would be F16 there, 22 MB instead of 2.6)
DECODE_CONFIG = dict(d_model=512, n_layers=16, n_heads=8, context=64, ffn_hidden=1280)
# Untimed calls before each timed one of a "hot" row. The last-level cache of the Xeon here is
# non-inclusive: a line read once from memory mostly skips it, and is kept only once reused.
# After the float32 baseline's 180 MB, the 11 MB of 4096x11008 codes took 5 calls to be
# resident (ms per call, medians of 30: 1.05, 0.68, 0.41, 0.32, 0.34, 0.31, 0.29), and a
# 50M-parameter model about 16 decoded tokens (2.11, 1.89, 1.82, ... 1.52 ... 1.44 ms).
HOT_CALLS = 5
DECODE_RUN = 16  # tokens per timed run of a decode row (after a run of as many untimed)
TRAIN_CONFIG = dict(d_model=128, n_layers=4, n_heads=4, context=64)  # SPEC 9
TRAIN_BATCH = 12


def add_parser(sub):
    """Register ``bench`` on an argparse subparsers object (used by cli.py)."""
    p = sub.add_parser("bench", help="time the Numba fast path against dense NumPy")
    p.add_argument("--quick", action="store_true", help="small shapes, few repetitions (smoke)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--reps", type=_positive_reps, default=None,
                   help="timed repetitions per side (a positive integer)")
    p.add_argument("--llama-bench", type=_executable, metavar="PATH",
                   default=os.environ.get("MINISPARSE_LLAMA_BENCH") or None,
                   help="a llama.cpp llama-bench binary: also time llama.cpp decoding a GGUF of "
                        "the decode rows' model (default: $MINISPARSE_LLAMA_BENCH)")
    p.set_defaults(handler=run)
    return p


def _executable(text):
    """--llama-bench: an executable file, or argparse's one-line usage error."""
    import argparse

    if not (os.path.isfile(text) and os.access(text, os.X_OK)):
        raise argparse.ArgumentTypeError(f"not an executable file: {text!r}")
    return text


def _positive_reps(text):
    """--reps: a positive integer, or argparse's one-line usage error (never replaced)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


JSON_FIELDS = ("name", "shape", "sparsity", "baseline", "ratio")
OPTIONAL_FIELDS = ("roofline", "value")  # decode rows; sample_tiny (characters per second)


def run(args) -> int:
    """Handler: measure every row, print the table (or, with --json, only the JSON list on
    stdout; the header lines then go to stderr)."""
    reps = args.reps if args.reps is not None else (3 if args.quick else 15)
    out = sys.stderr if args.json else sys.stdout
    rows = []
    llama = args.llama_bench
    if llama is not None:  # the environment's default skipped argparse's type check
        llama = _executable(llama)
    for row in _all_rows(args.quick, reps, out, llama):
        rows.append(row)
        if not args.json:
            print(_format(row), flush=True)
    if args.json:
        print(json.dumps([_json_row(r) for r in rows]))
    return 0


def _json_row(row):
    """The row's JSON fields: shapes of products (GEMV rows) as [d_in, d_out], other shapes
    (model sizes, batch x context) as the table's strings."""
    r = {k: row[k] for k in JSON_FIELDS}
    r.update({k: row[k] for k in OPTIONAL_FIELDS if k in row})
    if "gemv" in r["name"]:
        r["shape"] = [int(d) for d in r["shape"].split("x")]
    return r


def _all_rows(quick, reps, out=sys.stdout, llama=None):
    if not quick:
        _print_header(out)
    yield from gemv_rows(quick, reps)
    yield from ternary_rows(quick, reps)
    yield ternary_cold_row(quick, reps)
    with blas_threads(1):
        for row in decode_rows(quick, reps):
            yield row
            if llama is not None and row["name"] == "decode_ternary":
                yield llama_row(llama, quick, row["baseline"] / row["ratio"])
        yield sample_row(quick)
        yield from train_rows(quick, reps)
        yield from trainer_tokens_row(quick)
    yield cold_start_row()


def _print_header(out):
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                          "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                          "OPENBLAS_THREAD_TIMEOUT")}
    print(f"# numpy {np.__version__}, numba {numba.__version__} ({numba.config.NUMBA_NUM_THREADS}"
          f" threads), {os.cpu_count()} cpus; ternary SIMD level {simd_level()}; env {env}",
          file=out)
    print(f"# one parallel region that does nothing takes {_region_seconds() * 1e6:.0f} µs here "
          "(median): the fixed cost of every threaded kernel call", file=out)
    print(f"# memory read bandwidth {stream_bandwidth() / 1e9:.1f} GB/s (the roofline's)",
          file=out)
    print(f"# {'name':<22} {'shape':<12} {'S':>5} {'baseline':>11} {'ours':>11} {'ratio':>7}",
          file=out)


@njit(parallel=True, cache=True)
def _empty_region(out):
    for t in prange(out.shape[0]):
        out[t] = t


def _region_seconds(reps=101):
    """Median seconds of one Numba parallel region with no work: waking the idle threads and
    joining them again, as each threaded GEMV call does."""
    out = np.empty(numba.get_num_threads())
    _empty_region(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _empty_region(out)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _format(row):
    """One table line, times in ms whatever the row's unit (a decoded token takes 0.1-30 ms)."""
    s = "" if row["sparsity"] is None else f"{row['sparsity']:.2f}"
    ours = row["baseline"] / row["ratio"]
    extra = "".join(f"  {k} {row[k]:.3g}" for k in OPTIONAL_FIELDS if k in row)
    return (f"  {row['name']:<22} {row['shape']:<12} {s:>5} {row['baseline'] * 1e3:>9.3f}ms"
            f" {ours * 1e3:>9.3f}ms {row['ratio']:>6.2f}x{extra}")


@njit(cache=True)
def _read_all(a):
    total = 0
    for i in range(a.shape[0]):
        total += a[i]
    return total


@lru_cache(maxsize=1)
def stream_bandwidth(nbytes=1 << 27, reps=5):
    """Bytes per second one thread reads from memory: the best of ``reps`` sums over an array
    larger than the last-level cache (the roofline's denominator)."""
    a = np.ones(nbytes // 8, np.int64)
    _read_all(a)
    best = min(_timed(_read_all, a) for _ in range(reps))
    return nbytes / best


def _timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _llc_bytes():
    """The last-level cache size (Linux sysfs), or 64 MiB when unknown."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
        return int(text.rstrip("K")) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 64 << 20


def compare(name, shape, sparsity, baseline, ours, reps, warmup=2, warm=0):
    """Median seconds of ``baseline()`` and of ``ours()``, measured in alternating repetitions.

    warm: untimed calls of the same side before each timed call, so each side finds its own
    data in cache as far as it fits (alternating alone, the float32 baseline's 180 MB evict
    the ternary codes from the last-level cache before every call of ours)."""
    for _ in range(warmup):
        baseline()
        ours()
    tb, to = [], []
    for r in range(reps):
        order = ((baseline, tb), (ours, to))
        for fn, times in order if r % 2 == 0 else order[::-1]:
            for _ in range(warm):
                fn()
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    b, o = statistics.median(tb), statistics.median(to)
    return {"name": name, "shape": shape, "sparsity": sparsity, "baseline": b, "ratio": b / o}


# --- single-token products: what a decode step does per projection ---


def gemv_rows(quick, reps):
    """Sparse float GEMV (top-K of x, then the kept rows of Wt) vs dense NumPy x @ W.T."""
    rng = np.random.default_rng(0)
    for d_in, d_out in [(256, 512)] if quick else GEMV_SHAPES:
        w = rng.standard_normal((d_out, d_in), dtype=np.float32)
        wt = pack_sparse_weights(w)
        x = rng.standard_normal(d_in, dtype=np.float32)
        for s in [0.5] if quick else GEMV_SPARSITY:
            k = k_for(d_in, sparsity=s)
            yield compare("sparse_gemv", f"{d_in}x{d_out}", s, lambda x=x, w=w: x @ w.T,
                          lambda x=x, k=k, wt=wt: sparse_gemv(x, topk_indices(x, k), wt), reps)


def ternary_rows(quick, reps):
    """Packed ternary GEMV (int8 x, 2-bit W, int32 sums, SPEC 5 scaling) vs float32 dense,
    each side hot (its weights in cache as far as they fit: HOT_CALLS untimed calls before
    each timed one, see compare's ``warm``). The dense row packs the output-major (I2_S)
    codes, the sparse one the input-major codes, as pack_linear does for a projection with
    dense / sparse inputs."""
    rng = np.random.default_rng(1)
    for d_in, d_out in [(256, 512)] if quick else GEMV_SHAPES:
        w = rng.standard_normal((d_out, d_in), dtype=np.float32)
        x = rng.standard_normal(d_in, dtype=np.float32)
        for name, s in (("ternary_gemv", 0.0), ("sparse_ternary_gemv", 0.5)):
            k = None if s == 0 else k_for(d_in, sparsity=s)
            packed = pack_linear(w, bits=1.58, sparse_inputs=k is not None)
            yield compare(name, f"{d_in}x{d_out}", s, lambda x=x, w=w: x @ w.T,
                          lambda x=x, k=k, p=packed: p.gemv(x, k, "none"), reps,
                          warm=HOT_CALLS)


def ternary_cold_row(quick, reps):
    """The dense ternary GEMV (output-major codes) with codes that come from memory: copies of
    the packed weight, together more than twice the last-level cache, used in turn (the
    float32 baseline at this size never fits in cache either). Each timed call follows an
    untimed call of the same side on the next copy, as in a decode loop: the thread pools are
    awake, the codes still cold (alternating alone, half of our calls followed 7 ms of BLAS and
    paid a sleeping pool's wake-up, 40-75 µs here, which is not memory)."""
    d_in, d_out = (256, 512) if quick else GEMV_SHAPES[-1]
    rng = np.random.default_rng(2)
    w = rng.standard_normal((d_out, d_in), dtype=np.float32)
    x = rng.standard_normal(d_in, dtype=np.float32)
    packed = pack_linear(w, bits=1.58, sparse_inputs=False)
    copies = 2 if quick else 2 + 2 * _llc_bytes() // packed.ternary.codes.nbytes
    ring = [PackedLinear(w, None, dataclasses.replace(packed.ternary,
                                                      codes=packed.ternary.codes.copy()))
            for _ in range(copies)]
    turn = itertools.cycle(ring)
    return compare("ternary_gemv_cold", f"{d_in}x{d_out}", 0.0, lambda: x @ w.T,
                   lambda: next(turn).gemv(x, None, "none"), reps, warm=1)


# --- whole models ---


def _gpt(config, backend, seed=0):
    return GPT(GPTConfig(vocab_size=65, **config), np.random.default_rng(seed), backend=backend)


def decode_rows(quick, reps):
    """Seconds per decoded token (KV cache, one position per step): the compiled decode step
    of a packed sparse (and ternary) ~50M-parameter config vs the dense float32 model of the
    same size on the NumPy backend (no top-K, no quantization: plain x @ W.T per projection);
    the default tiny model (``minisparse train``'s, dense float) compiled vs the same model on
    the NumPy backend; and the ternary + sparse model vs the dense float32 baseline model in
    PyTorch eager (minisparse.torch's GPT with a KV cache: F.linear per projection), when
    torch is installed."""
    base = _decode_config(quick)
    slow = fast = None
    for extra in (dict(sparsity=0.5), dict(sparsity=0.5, bits=1.58)):
        config = dict(base, **extra)
        slow, fast = _gpt(base, "numpy"), _gpt(config, "numba")
        pack_model(fast)
        name = "decode_ternary" if "bits" in extra else "decode"
        yield _decode_row(name, extra["sparsity"], _engine_step(slow), fast, reps)
    tiny = dict(TRAIN_CONFIG, d_model=32, n_layers=1, n_heads=2) if quick else TRAIN_CONFIG
    model = _gpt(tiny, "numba")
    pack_model(model)
    yield _decode_row("decode_tiny", None, _engine_step(_gpt(tiny, "numpy")), model, reps)
    torch_step = _torch_decode_step(slow)
    if torch_step is None:
        print("# decode_vs_torch: skipped (torch not installed)", file=sys.stderr)
        return
    import torch

    threads = _fastest_threads(torch, torch_step)
    with _torch_threads(torch, threads):
        row = _decode_row("decode_vs_torch", 0.5, torch_step, fast, reps)
    print(f"# decode_vs_torch: PyTorch eager on {threads} intra-op thread(s), its faster "
          "setting here", file=sys.stderr)
    yield row


def _decode_row(name, sparsity, baseline, model, reps):
    """compare() of decoded tokens, ``baseline`` against ``model``'s compiled step, per token,
    with the roofline field: (weight bytes per token / stream bandwidth) / our seconds per
    token.

    Each side is timed over a run of DECODE_RUN tokens that follows an untimed run of as many,
    as tokens follow each other in a decode loop (llama-bench, too, reports the mean of a run
    of tokens): alternating alone, the 190 MB float baseline would evict the 12 MB of ternary
    codes from the last-level cache before every token of ours. A model whose weights fit in
    that cache can so beat the DRAM roofline (> 1)."""
    n = sum(p.size for _, p in model.named_parameters())
    row = compare(name, f"{n / 1e6:.1f}M", sparsity, _run(baseline), _run(_compiled_step(model)),
                  reps, warm=1)
    row["baseline"] /= DECODE_RUN  # seconds per token (the ratio is the same)
    roofline = weight_bytes_per_token(model.config) / stream_bandwidth()
    return dict(row, unit="s", roofline=roofline * row["ratio"] / row["baseline"])


def _run(step):
    """DECODE_RUN calls of step, one after the other."""
    def run():
        for _ in range(DECODE_RUN):
            step()
    return run


def _decode_config(quick):
    """The decode rows' model (and llama.cpp's GGUF of it); --quick: a 2-layer, d 64 one."""
    return dict(d_model=64, n_layers=2, n_heads=2, context=64) if quick else DECODE_CONFIG


PROMPT = list(range(8))  # every decode row restarts from this prompt when the cache is full


def _engine_step(model):
    """One decoded token through the engine with a KV cache (the reference path)."""
    cache = KVCache(model.config)
    prompt = np.array([PROMPT])

    def step():
        if cache.length == model.config.context:
            cache.reset()
        if cache.length == 0:
            model(prompt, kv_cache=cache)
        model(prompt[:, -1:], kv_cache=cache)

    return step


def _compiled_step(model):
    """One decoded token of a packed model through the compiled decode step."""
    decoder = decoder_for(model)

    def step():
        if decoder.length == model.config.context:
            decoder.reset()
        if decoder.length == 0:
            for t in PROMPT:
                decoder.step(t)
        decoder.step(PROMPT[-1])

    return step


def _torch_decode_step(model):
    """One decoded token of ``model``'s config and weights in PyTorch eager: minisparse.torch's
    GPT with its KV cache, no autograd; None when torch is not installed. (On a ternary or
    sparse config that GPT re-quantizes every weight and runs top-K per call, as it trains:
    the rows give it the dense float32 model.)"""
    try:
        import torch

        from .torch.model import GPT as TorchGPT
        from .torch.model import KVCache as TorchKVCache
    except ImportError:
        return None

    params = {name: p.data for name, p in model.named_parameters()}
    net = TorchGPT.from_params(model.config.to_dict(), params)
    cache = TorchKVCache()
    prompt = torch.tensor([PROMPT])

    @torch.no_grad()
    def step():
        nonlocal cache
        if cache.length == model.config.context:
            cache = TorchKVCache()
        if cache.length == 0:
            net(prompt, kv_cache=cache)
        net(prompt[:, -1:], kv_cache=cache)

    return step


def weight_bytes_per_token(config) -> float:
    """Bytes of weights one decoded token reads: K_in * D_out per projection at 4 bytes
    (float32) or 2 bits (ternary), plus the dense tied head [V, d] in float32 (SPEC 7)."""
    d, f = config.d_model, config.ffn_hidden
    kept = {n: _kept(config, n) for n in (d, f)}
    per_weight = 0.25 if config.bits else 4.0
    block = 4 * kept[d] * d + 2 * kept[d] * f + kept[f] * d
    return config.n_layers * block * per_weight + 4.0 * config.vocab_size * d


def _kept(config, d_in):
    if config.block is not None:
        return d_in * config.block[0] // config.block[1]
    return k_for(d_in, sparsity=config.sparsity) if config.sparsity else d_in


def llama_row(binary, quick, ours_seconds, tokens=64):
    """llama.cpp's decode speed on a GGUF of the decode rows' ternary model (llama
    architecture, TQ2_0 where rows allow it; see minisparse.gguf), run by ``binary``
    (llama-bench) on this machine's threads: baseline = its seconds per token, ratio = that
    over ours (the decode_ternary row's compiled step, ternary + sparse 0.5)."""
    import tempfile

    from .gguf import write_gguf

    base = _decode_config(quick)
    model = _gpt(dict(base, bits=1.58, ffn_act="silu"), "numpy")  # llama's FFN, same shapes
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.gguf")
        write_gguf(model.params_dict(), model.config, [chr(32 + i) for i in range(65)], path)
        # llama.cpp's OpenMP pool runs under the user's environment, not the PASSIVE wait
        # policy minisparse sets for its own pools (sleeping at every barrier cost it ~4x)
        env = {k: v for k, v in os.environ.items() if k not in SET_BY_US}
        out = subprocess.run([binary, "-m", path, "-p", "0", "-n", str(tokens), "-t",
                              str(numba.get_num_threads()), "-r", "2" if quick else "5",
                              "-o", "json"], capture_output=True, text=True, timeout=600,
                             env=env)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    runs = [r for r in json.loads(out.stdout) if r.get("n_gen", 0) > 0]
    if not runs:
        raise RuntimeError("llama-bench printed no decode (n_gen > 0) result")
    per_token = 1.0 / float(runs[0]["avg_ts"])
    n = sum(p.size for _, p in model.named_parameters())
    return {"name": "llama_cpp_tq2_0", "shape": f"{n / 1e6:.1f}M", "sparsity": 0.5,
            "baseline": per_token, "ratio": per_token / ours_seconds, "unit": "s"}


SAMPLE_TARGET = 3000.0  # characters per second the sample_tiny row aims at


def sample_row(quick):
    """Characters per second of ``minisparse sample``'s path (pack_model, then generate with a
    KV cache) on the default tiny model (``minisparse train``'s config). baseline = the target's
    seconds per character, ratio = characters per second / target (>= 1 meets it)."""
    model = _gpt(TRAIN_CONFIG, "numba")
    pack_model(model)
    size = sum(p.size for _, p in model.named_parameters())
    n = 20 if quick else 300
    generate(model, [0], 4, seed=0)  # warm-up: compiles
    t = time.perf_counter()
    generate(model, [0], n, seed=0)
    value = n / (time.perf_counter() - t)
    return {"name": "sample_tiny", "shape": f"{size / 1e6:.1f}M", "sparsity": None,
            "baseline": 1.0 / SAMPLE_TARGET, "ratio": value / SAMPLE_TARGET, "unit": "s",
            "value": value}


def train_rows(quick, reps):
    """Seconds per training step (forward, backward, AdamW) on SPEC 9's config, sparsity 0.5:
    the Numba backend vs the NumPy reference backend, and vs PyTorch eager when installed."""
    base, batch = (dict(d_model=32, n_layers=1, n_heads=2, context=16), 2) if quick \
        else (TRAIN_CONFIG, TRAIN_BATCH)
    config = dict(base, sparsity=0.5)
    data = make_dataset(bundled_text()[:200_000], config["context"]).train
    rng = np.random.default_rng(0)
    steps = {}
    for backend in ("numpy", "numba"):
        model = _gpt(config, backend)
        opt = AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)

        def step(model=model, opt=opt):
            x, y = get_batch(rng, data, batch, config["context"])
            model.zero_grad()
            _, loss = model(x, y)
            loss.backward()
            opt.step()

        steps[backend] = step
    r = 2 if quick else reps
    shape = f"{batch}x{config['context']}"
    yield dict(compare("train_vs_numpy", shape, 0.5, steps["numpy"], steps["numba"], r), unit="s")
    torch_step = _torch_train_step(config, batch, data, rng)
    if torch_step is None:
        print("# train_vs_torch: skipped (torch not installed)", file=sys.stderr)
        return
    import torch

    threads = _fastest_threads(torch, torch_step)
    with _torch_threads(torch, threads):
        row = compare("train_vs_torch", shape, 0.5, torch_step, steps["numba"], r)
    print(f"# train_vs_torch: PyTorch on {threads} intra-op thread(s), its faster setting here",
          file=sys.stderr)
    yield dict(row, unit="s")


def _fastest_threads(torch, step, tries=3):
    """PyTorch's faster intra-op thread count for ``step``: 1 or its default (the baseline gets
    its best setting on this machine)."""
    times = {}
    for n in sorted({1, torch.get_num_threads()}):
        with _torch_threads(torch, n):
            step()
            t = time.perf_counter()
            for _ in range(tries):
                step()
            times[n] = time.perf_counter() - t
    return min(times, key=times.get)


@contextmanager
def _torch_threads(torch, n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_train_step(config, batch, data, rng):
    """One eager PyTorch training step of the same model: minisparse.torch's GPT (top-K with
    the STE, relu2 GLU, RoPE) and torch's AdamW."""
    try:
        import torch

        from .torch import GPT as TorchGPT
    except ImportError:
        return None

    model = TorchGPT(dict(config, vocab_size=65), np.random.default_rng(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)

    def step():
        x, y = (torch.from_numpy(a) for a in get_batch(rng, data, batch, config["context"]))
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def trainer_tokens_row(quick):
    """Training tokens/s of the two trainers, whole loop (batches, clip, lr, AdamW) on SPEC 9's
    config at sparsity 0.5: ``minisparse train`` (Numba backend) is the baseline,
    ``python -m minisparse.torch.train`` (one process) the candidate; shown as ms per token."""
    try:
        from .torch.train import train as torch_train
    except ImportError:
        print("# trainer_tokens_torch: skipped (torch not installed)", file=sys.stderr)
        return
    import tempfile

    from .train import train as numpy_train

    base, batch = (dict(d_model=32, n_layers=1, n_heads=2, context=16), 2) if quick \
        else (TRAIN_CONFIG, TRAIN_BATCH)
    settings = dict(iters=3 if quick else 30, batch=batch, eval_interval=10**6,
                    final_eval_batches=1, ckpt_interval=10**6)
    text = bundled_text()[:200_000]
    with tempfile.TemporaryDirectory() as out:
        tokens = {fn.__module__: fn(dict(base, sparsity=0.5), settings, text=text,
                                    out_dir=f"{out}/{i}", progress=False).tokens_per_second
                  for i, fn in enumerate((numpy_train, torch_train))}
    numpy_tps, torch_tps = tokens["minisparse.train"], tokens["minisparse.torch.train"]
    print(f"# trainer_tokens_torch: NumPy trainer {numpy_tps:,.0f} tok/s, PyTorch trainer "
          f"{torch_tps:,.0f} tok/s", file=sys.stderr)
    yield {"name": "trainer_tokens_torch", "shape": f"{batch}x{base['context']}",
           "sparsity": 0.5, "baseline": 1.0 / numpy_tps, "ratio": torch_tps / numpy_tps,
           "unit": "ms"}



def cold_start_row():
    """A second process's first kernel call (import + load from the compile cache) must take
    < 1 s: baseline = that 1 s budget, ratio = budget / measured seconds (>= 1 passes)."""
    code = ("import time; import numpy as np; from minisparse.kernels import topk_mask; "
            "t = time.perf_counter(); topk_mask(np.ones((2, 8), np.float32), 3); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    seconds = float(out.stdout.strip().splitlines()[-1])
    return {"name": "cold_first_call", "shape": "-", "sparsity": None, "baseline": 1.0,
            "ratio": 1.0 / seconds, "unit": "s"}
